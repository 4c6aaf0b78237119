"""Confidence aggregation: combine several agents' confidence in one claim.

Pure functions (no I/O). Each opinion is weighted as in the seed::

    weight = expertise(agent, category) * (0.5 + 0.1 * len(evidence))

where expertise comes from the agents' declared ``Agent.expertise`` (category ->
weight), passed as a mapping ``agent id -> expertise``. Two pooling rules use
those weights, chosen by ``method``:

- ``weighted_average`` (the seed's rule): ``sum(w * p) / sum(w)``. Linear: two
  agents at 0.9 give 0.9, however many agree.
- ``log_odds`` (logarithmic opinion pool): ``sigmoid(sum(w * logit(p)) / sum(w))``,
  the weighted geometric mean of the odds. It respects confident outliers more
  (0.99 and 0.5 pool to 0.909, not 0.745), and 0.0 or 1.0 are clamped to
  ``[1e-6, 1 - 1e-6]`` so one certain agent cannot veto everyone else.

No opinions, or only zero weights, give 0.0 under both rules (the seed's choice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from swarmbus._messages import FindingMessage

Pooling: TypeAlias = Literal["weighted_average", "log_odds"]
Expertise: TypeAlias = Mapping[str, Mapping[str, float]]

DEFAULT_EXPERTISE: Final = 0.5
"""Expertise of an agent that declared none for the category."""
_CLAMP: Final = 1e-6


@dataclass(frozen=True)
class Opinion:
    """One agent's confidence in a claim, with how much evidence backs it."""

    agent: str
    confidence: float
    evidence: int = 0
    category: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be within [0, 1], got {self.confidence!r}")
        if self.evidence < 0:
            raise ValueError(f"evidence must be a count >= 0, got {self.evidence!r}")

    @classmethod
    def of(cls, message: FindingMessage) -> Opinion:
        """The opinion a finding expresses (its category, confidence and evidence)."""
        finding = message.finding
        return cls(
            agent=message.source.agent,
            confidence=finding.confidence,
            evidence=len(finding.evidence),
            category=finding.category,
        )


def evidence_weight(count: int) -> float:
    """The seed's evidence strength: 0.5 plus 0.1 per piece of evidence."""
    return 0.5 + 0.1 * count


def expertise_of(
    expertise: Expertise, agent: str, category: str, default: float = DEFAULT_EXPERTISE
) -> float:
    """An agent's declared expertise in ``category``, or ``default`` if it declared none."""
    weight = expertise.get(agent, {}).get(category, default)
    if not weight >= 0.0:  # a negative weight would pool outside [0, 1]
        raise ValueError(f"expertise of {agent} in {category!r} must be >= 0, got {weight!r}")
    return weight


def opinion_weight(
    opinion: Opinion,
    expertise: Expertise,
    *,
    category: str | None = None,
    default_expertise: float = DEFAULT_EXPERTISE,
) -> float:
    """Expertise in ``category`` (default: the opinion's own) times evidence weight."""
    domain = opinion.category if category is None else category
    return expertise_of(expertise, opinion.agent, domain, default_expertise) * evidence_weight(
        opinion.evidence
    )


def aggregate_confidence(
    opinions: Iterable[Opinion | FindingMessage],
    expertise: Expertise,
    *,
    method: Pooling = "weighted_average",
    category: str | None = None,
    default_expertise: float = DEFAULT_EXPERTISE,
) -> float:
    """Pool confidences into one value in [0, 1].

    Args:
        opinions: opinions, or findings (read with ``Opinion.of``).
        expertise: agent id -> {category: weight}, e.g. ``{a.id: a.expertise}``.
        method: ``weighted_average`` (the seed's) or ``log_odds``.
        category: the expertise category to weigh by (e.g. a hypothesis's domain);
            default: each opinion's own category.
        default_expertise: weight of an agent with no declared expertise there.
    """
    pairs = []
    for item in opinions:
        opinion = Opinion.of(item) if isinstance(item, FindingMessage) else item
        weight = opinion_weight(
            opinion, expertise, category=category, default_expertise=default_expertise
        )
        pairs.append((opinion.confidence, weight))
    total = sum(w for _, w in pairs)
    if total <= 0:
        return 0.0
    if method == "weighted_average":
        return sum(p * w for p, w in pairs) / total
    if method == "log_odds":
        pooled = sum(_logit(p) * w for p, w in pairs) / total
        return 1.0 / (1.0 + math.exp(-pooled))
    raise ValueError(f"unknown pooling method {method!r}")


def _logit(p: float) -> float:
    p = min(max(p, _CLAMP), 1.0 - _CLAMP)
    return math.log(p / (1.0 - p))
