"""Confidence aggregation on hand-computed values."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from swarmbus import (
    Agent,
    Evidence,
    Finding,
    FindingMessage,
    Opinion,
    Source,
    aggregate_confidence,
)
from swarmbus._confidence import evidence_weight, expertise_of, opinion_weight

EXPERTISE = {
    "ops/deploy-validator": {"deployment": 0.9, "hypothesis": 0.8},
    "security/lead": {"security": 1.0, "hypothesis": 0.4},
}


def test_evidence_weight_is_the_seeds() -> None:
    assert evidence_weight(0) == pytest.approx(0.5)
    assert evidence_weight(3) == pytest.approx(0.8)


def test_expertise_falls_back_to_the_default() -> None:
    assert expertise_of(EXPERTISE, "ops/deploy-validator", "deployment") == 0.9
    assert expertise_of(EXPERTISE, "ops/deploy-validator", "network") == 0.5
    assert expertise_of(EXPERTISE, "nobody", "deployment", default=0.2) == 0.2


def test_weight_uses_the_opinion_category_unless_one_is_given() -> None:
    opinion = Opinion("security/lead", 0.7, evidence=2, category="hypothesis")
    assert opinion_weight(opinion, EXPERTISE) == pytest.approx(0.4 * 0.7)
    assert opinion_weight(opinion, EXPERTISE, category="security") == pytest.approx(1.0 * 0.7)


def test_weighted_average_by_hand() -> None:
    # w1 = 0.8 * (0.5 + 0.3) = 0.64 ; w2 = 0.4 * 0.5 = 0.2
    # (0.9 * 0.64 + 0.3 * 0.2) / 0.84 = 0.636 / 0.84 = 0.757142...
    opinions = [
        Opinion("ops/deploy-validator", 0.9, evidence=3, category="hypothesis"),
        Opinion("security/lead", 0.3, evidence=0, category="hypothesis"),
    ]
    assert aggregate_confidence(opinions, EXPERTISE) == pytest.approx(0.636 / 0.84)


def test_log_odds_by_hand() -> None:
    # equal weights: logit(0.99) = ln 99 = 4.59512, logit(0.5) = 0 -> mean 2.29756
    # sigmoid(2.29756) = 1 / (1 + 1/sqrt(99)) = 0.908712...
    opinions = [Opinion("a", 0.99), Opinion("b", 0.5)]
    pooled = aggregate_confidence(opinions, {}, method="log_odds")
    assert pooled == pytest.approx(1 / (1 + 1 / math.sqrt(99)))
    assert aggregate_confidence(opinions, {}) == pytest.approx(0.745)


def test_log_odds_weights_by_hand() -> None:
    # w1 = 0.64, w2 = 0.2 ; logit(0.8) = ln 4, logit(0.2) = -ln 4
    # pooled logit = ln4 * (0.64 - 0.2) / 0.84 ; odds = 4 ** (0.44 / 0.84)
    opinions = [
        Opinion("ops/deploy-validator", 0.8, evidence=3, category="hypothesis"),
        Opinion("security/lead", 0.2, evidence=0, category="hypothesis"),
    ]
    odds = 4 ** (0.44 / 0.84)
    assert aggregate_confidence(opinions, EXPERTISE, method="log_odds") == pytest.approx(
        odds / (1 + odds)
    )


def test_log_odds_clamps_certainty() -> None:
    pooled = aggregate_confidence([Opinion("a", 1.0), Opinion("b", 0.0)], {}, method="log_odds")
    assert pooled == pytest.approx(0.5)
    assert aggregate_confidence([Opinion("a", 1.0)], {}, method="log_odds") == pytest.approx(
        1 - 1e-6
    )


@pytest.mark.parametrize("method", ["weighted_average", "log_odds"])
def test_nothing_to_pool_is_zero(method: str) -> None:
    assert aggregate_confidence([], EXPERTISE, method=method) == 0.0  # type: ignore[arg-type]
    zero = {"a": {"observation": 0.0}}
    assert aggregate_confidence([Opinion("a", 0.9, category="observation")], zero) == 0.0


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="pooling"):
        aggregate_confidence([Opinion("a", 0.5)], {}, method="median")  # type: ignore[arg-type]


def test_findings_are_read_as_opinions() -> None:
    message = FindingMessage(
        id="f1",
        timestamp=datetime(2025, 1, 2, tzinfo=UTC),
        source=Source(agent="ops/deploy-validator", session="INC-1234"),
        finding=Finding(
            category="hypothesis",
            content="pool exhaustion",
            confidence=0.7,
            evidence=[Evidence(source="prometheus"), Evidence(source="logs")],
        ),
    )
    assert Opinion.of(message) == Opinion("ops/deploy-validator", 0.7, 2, "hypothesis")
    other = Opinion("security/lead", 0.2, category="hypothesis")
    # w1 = 0.8 * 0.7 = 0.56, w2 = 0.4 * 0.5 = 0.2 -> (0.392 + 0.04) / 0.76
    assert aggregate_confidence([message, other], EXPERTISE) == pytest.approx(0.432 / 0.76)


def test_inputs_that_would_pool_outside_0_1_are_refused() -> None:
    # A negative expertise, a negative evidence count or a confidence outside [0, 1]
    # used to pool to -1.0, 0.0 or 1.7: the result is promised to be within [0, 1].
    opinions = [Opinion("a", 1.0, category="x"), Opinion("b", 0.0, category="x")]
    with pytest.raises(ValueError, match="expertise"):
        aggregate_confidence(opinions, {"a": {"x": -1.0}, "b": {"x": 1.0}})
    with pytest.raises(ValueError, match="evidence"):
        Opinion("a", 1.0, evidence=-10)
    for bad in (1.7, -0.1, math.nan):
        with pytest.raises(ValueError, match="confidence"):
            Opinion("a", bad)
    for weight in (-1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="expertise"):
            Agent("ops/deploy-validator", expertise={"deployment": weight})
