"""One table of wire edge cases, checked both ways: JSON Schema and the decoder agree.

``tests/fixtures/wire_cases.json`` is plain data so a service in another language can run
the same table against ``schemas/`` with its own validator.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import swarmbus
from swarmbus import ProposalMessage

ROOT = Path(__file__).resolve().parents[1]
CASES: list[dict[str, Any]] = json.loads((ROOT / "tests/fixtures/wire_cases.json").read_text())[
    "cases"
]
ENVELOPE = json.loads((ROOT / "schemas/envelope.schema.json").read_text())


def _schema_accepts(message: object) -> bool:
    try:
        jsonschema.validate(message, ENVELOPE, format_checker=jsonschema.FormatChecker())
    except jsonschema.ValidationError:
        return False
    return True


def _decoder_accepts(message: object) -> bool:
    try:
        swarmbus.decode(json.dumps(message).encode())
    except swarmbus.InvalidMessageError:
        return False
    return True


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_schema_and_decoder_agree(case: dict[str, Any]) -> None:
    assert _schema_accepts(case["message"]) is case["valid"], case["rule"]
    assert _decoder_accepts(case["message"]) is case["valid"], case["rule"]


def test_the_table_covers_both_outcomes_and_the_issue_cases() -> None:
    names = {c["case"] for c in CASES}
    assert {True, False} <= {c["valid"] for c in CASES}
    for needle in ("2025-01-02 10:30:00Z", "2025-02-30", "T25:", ":60Z", "\\n"):
        assert any(needle in n for n in names), needle


def test_a_timestamp_without_a_zone_is_utc() -> None:
    case = next(c for c in CASES if c["case"] == "timestamp '2025-01-02T10:30:00'")
    message = swarmbus.decode(json.dumps(case["message"]).encode())
    assert message.timestamp == datetime(2025, 1, 2, 10, 30, tzinfo=UTC)
    assert b'"timestamp":"2025-01-02T10:30:00Z"' in swarmbus.encode(message)


def test_a_duration_timeout_is_read_as_seconds() -> None:
    case = next(c for c in CASES if c["case"] == "proposal timeout '5m'")
    message = swarmbus.decode(json.dumps(case["message"]).encode())
    assert isinstance(message, ProposalMessage)
    assert message.proposal.timeout == 300.0
    assert b'"timeout":300.0' in swarmbus.encode(message)


def test_an_envelope_wrapped_in_message_says_how_to_fix_it() -> None:
    case = next(c for c in CASES if c["case"] == "wrapped in message:")
    with pytest.raises(swarmbus.InvalidMessageError) as info:
        swarmbus.decode(json.dumps(case["message"]).encode())
    assert info.value.code == "not_envelope"
    assert "wrapped in a 'message' key" in str(info.value)
    assert "send the object inside it" in str(info.value)
