"""Wire contract: Structs, identifiers, generated JSON Schema, seed examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

import swarmbus
from swarmbus import _schemas
from swarmbus._messages import MESSAGE_TYPES, envelope_for, validate_body
from swarmbus._subjects import (
    event_subject,
    parse_event_subject,
    request_subject,
    safe_token,
    validate_agent_id,
    validate_session_id,
)

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
SOURCE = {"agent": "ops/release-manager", "session": "INC-1234"}
BASE = {"id": "0b7c3a0e-7a57-4a39-9f0c-7f3c1f6c9a01", "timestamp": "2025-01-02T10:30:00Z"}

# The seed's example messages, as external services would write them.
SEED_EXAMPLES: list[dict[str, Any]] = [
    {
        **BASE,
        "source": SOURCE,
        "type": "finding",
        "finding": {
            "category": "observation",
            "content": "error rate spike correlates with deploy",
            "confidence": 0.9,
            "evidence": [{"source": "prometheus", "query": "rate(errors[5m])", "result": "0.05"}],
        },
    },
    {
        **BASE,
        "source": SOURCE,
        "type": "action",
        "action": {
            "type": "modify",
            "target": "deploy/checkout",
            "parameters": {"version": "v1.2.2"},
            "requires_approval": True,
        },
    },
    {
        **BASE,
        "source": SOURCE,
        "type": "request",
        "request": {"to": "any", "capability": "analyze_logs", "parameters": {"since": "10:00"}},
    },
    {
        **BASE,
        "source": SOURCE,
        "type": "response",
        "response": {"request_id": BASE["id"], "status": "success", "result": {"errors": 42}},
    },
    {
        **BASE,
        "source": SOURCE,
        "type": "session.started",
        "session.started": {
            "session_id": "INC-1234",
            "initiator": "ops/release-manager",
            "context": {"task": "investigate incident INC-1234"},
        },
    },
    {
        **BASE,
        "source": SOURCE,
        "type": "hypothesis.proposed",
        "hypothesis.proposed": {
            "hypothesis_id": "h1",
            "agent_id": "ops/release-manager",
            "description": "database connection pool exhaustion",
            "confidence": 0.7,
        },
    },
    {
        **BASE,
        "source": SOURCE,
        "type": "vote",
        "vote": {
            "proposal_id": "p1",
            "vote": "yes",
            "confidence": 0.9,
            "reason": "Error rate 5x baseline",
        },
    },
    {
        **BASE,
        "source": SOURCE,
        "type": "decision",
        "decision": {
            "proposal_id": "p1",
            "decision": "rollback",
            "outcome": "approved",
            "votes_for": 2,
            "votes_against": 0,
            "abstentions": 1,
        },
    },
]


def _bad(example: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    bad = json.loads(json.dumps(example))
    node = bad
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return bad


_DELETE = object()
FINDING = SEED_EXAMPLES[0]
BAD_EXAMPLES = {
    "confidence above 1": _bad(FINDING, ["finding", "confidence"], 1.7),
    "unknown category": _bad(FINDING, ["finding", "category"], "guess"),
    "missing content": _bad(FINDING, ["finding", "content"], _DELETE),
    "agent id with spaces": _bad(FINDING, ["source", "agent"], "ops/deploy validator"),
    "session id with a dot": _bad(FINDING, ["source", "session"], "INC.1234"),
    "timestamp with an hour 25": _bad(FINDING, ["timestamp"], "2025-01-02T25:30:00Z"),
    "unknown type": _bad(FINDING, ["type"], "gossip"),
    "no id": _bad(FINDING, ["id"], _DELETE),
    "vote maybe": _bad(SEED_EXAMPLES[6], ["vote", "vote"], "maybe"),
}


@pytest.fixture(scope="module")
def envelope_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / "envelope.schema.json").read_text())
    return schema


def test_schemas_are_fresh() -> None:
    assert _schemas.stale(SCHEMAS) == [], "run `swarmbus schemas` to regenerate schemas/"


def test_every_message_type_has_a_schema_file() -> None:
    for cls in MESSAGE_TYPES:
        assert (SCHEMAS / f"{cls.__struct_config__.tag}.schema.json").is_file()


@pytest.mark.parametrize("example", SEED_EXAMPLES, ids=lambda e: e["type"])
def test_seed_examples_validate_and_decode(example: dict[str, Any], envelope_schema: Any) -> None:
    jsonschema.validate(example, envelope_schema, format_checker=jsonschema.FormatChecker())
    per_type = json.loads((SCHEMAS / f"{example['type']}.schema.json").read_text())
    jsonschema.validate(example, per_type)
    message = swarmbus.decode(json.dumps(example).encode())
    assert message.type == example["type"]
    assert message.source.agent == SOURCE["agent"]


@pytest.mark.parametrize("name", sorted(BAD_EXAMPLES))
def test_bad_examples_are_rejected_by_schema_and_decoder(name: str, envelope_schema: Any) -> None:
    bad = BAD_EXAMPLES[name]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, envelope_schema, format_checker=jsonschema.FormatChecker())
    with pytest.raises(swarmbus.InvalidMessageError):
        swarmbus.decode(json.dumps(bad).encode())


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"not json at all", "not_json"),
        (b"[1, 2, 3]", "not_envelope"),
        (b'{"hello": "world"}', "not_envelope"),
        (json.dumps(BAD_EXAMPLES["confidence above 1"]).encode(), "schema"),
        (b"{" + b'"x":"' + b"a" * 2_000_000 + b'"}', "too_large"),
    ],
)
def test_decode_classifies_bad_input(data: bytes, code: str) -> None:
    with pytest.raises(swarmbus.InvalidMessageError) as info:
        swarmbus.decode(data)
    assert info.value.code == code


def test_roundtrip_every_body_type() -> None:
    finding = swarmbus.Finding(category="conclusion", content="x", confidence=0.5)
    message = envelope_for(finding, agent="ops/a", session="S1")
    again = swarmbus.decode(swarmbus.encode(message))
    assert again == message
    assert again.body == finding


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    newer = json.loads(json.dumps(FINDING))
    newer["added_in_v2"] = {"anything": 1}
    newer["finding"]["severity"] = "high"
    message = swarmbus.decode(json.dumps(newer).encode())
    assert isinstance(message, swarmbus.FindingMessage)
    assert message.finding.content == FINDING["finding"]["content"]


def test_validate_body_catches_constraint_violations_before_sending() -> None:
    with pytest.raises(swarmbus.InvalidMessageError, match="confidence"):
        validate_body(swarmbus.Finding(category="observation", content="x", confidence=1.7))


@pytest.mark.parametrize(
    "agent", ["ops/deploy-validator", "security/incident-response-lead", "a", "a/b/c_d-1"]
)
def test_valid_agent_ids(agent: str) -> None:
    assert validate_agent_id(agent) == agent


@pytest.mark.parametrize(
    "agent", ["", "ops/", "/ops", "ops//x", "ops.x", "ops x", "ops/*", "a>", "x" * 129, 5]
)
def test_invalid_agent_ids(agent: Any) -> None:
    with pytest.raises(swarmbus.InvalidIdentifierError):
        validate_agent_id(agent)


@pytest.mark.parametrize("session", ["", "INC.1234", "a/b", "x" * 129, "*", "é"])
def test_invalid_session_ids(session: str) -> None:
    with pytest.raises(swarmbus.InvalidIdentifierError):
        validate_session_id(session)


def test_subjects_follow_the_contract() -> None:
    subject = event_subject("finding", "reported", "INC-1234", "ops/deploy-validator")
    assert subject == "agent.finding.reported.INC-1234.ops/deploy-validator"
    assert parse_event_subject(subject) == (
        "finding",
        "reported",
        "INC-1234",
        "ops/deploy-validator",
    )
    assert parse_event_subject("agent.finding.reported.INC-1234") is None
    assert (
        request_subject("check_deployment", "any", "INC-1", "ops/a")
        == "swarmbus.request.check_deployment.any.INC-1.ops/a"
    )
    with pytest.raises(swarmbus.InvalidIdentifierError):
        request_subject("check.deployment", "any", "INC-1", "ops/a")


def test_safe_token_is_injective_and_safe() -> None:
    a, b = safe_token("ops/x"), safe_token("ops_x")
    assert a != b
    assert all(c.isalnum() or c in "_-" for c in a + b)


def test_body_structs_are_frozen() -> None:
    finding = swarmbus.Finding(category="observation", content="x", confidence=0.1)
    with pytest.raises(AttributeError):
        finding.content = "y"  # type: ignore[misc]
    assert msgspec.structs.asdict(finding)["content"] == "x"
