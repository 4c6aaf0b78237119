"""The INC-1234 demo, in-process on the test server: decision, blackboard, timeline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import msgspec

from swarmbus import Bus
from swarmbus._demo import (
    ADVISOR,
    COORDINATOR,
    RESPONDER,
    SYSTEMS,
    VALIDATOR,
    VOTES,
    board_view,
    incident,
)
from swarmbus._query_ledger import QUERIES_BUCKET, query_key

ROOT = Path(__file__).resolve().parents[1]


async def test_the_incident_ends_in_the_seeds_rollback_decision(bus: Bus) -> None:
    lines: list[str] = []
    with anyio.fail_after(60):
        result = await incident(bus, echo=lines.append)

    decision = result.decision
    assert (decision.decision, decision.outcome) == ("rollback", "approved")
    assert (decision.votes_for, decision.votes_against, decision.abstentions) == (2, 0, 1)
    assert {b.voter: (b.vote, b.confidence, b.reason) for b in decision.votes} == VOTES
    assert result.synthesis["decision"] == "rollback"
    assert (result.synthesis["from"], result.synthesis["to"]) == ("v1.2.3", "v1.2.2")

    view = board_view(result.snapshot)
    assert list(view) == ["context", "findings", "hypotheses", "actions_taken"]
    assert view["context"]["task"] == "investigate incident INC-1234"
    assert view["context"]["started"]
    assert {f["agent"] for f in view["findings"]} == {VALIDATOR, RESPONDER, ADVISOR}
    assert {
        "agent": VALIDATOR,
        "finding": "deployment v1.2.3 at 10:15 UTC",
        "confidence": 0.95,
    } in (view["findings"])
    observations = [f for f in result.snapshot.findings if f.category == "observation"]
    assert observations
    assert all(f.evidence for f in observations)
    assert view["hypotheses"] == [
        "deployment v1.2.3 caused the error spike (confidence: 0.82)",
        "database connection pool exhaustion (confidence: 0.70)",
        "memory leak in new feature (confidence: 0.30)",
    ]
    assert view["actions_taken"] == [
        {"agent": ADVISOR, "action": "recommended rollback", "status": "approved"},
        {"agent": COORDINATOR, "action": "decided: rollback", "status": "approved"},
    ]
    session = result.snapshot.session
    assert session is not None
    assert session.status == "completed"
    assert session.outcome["decision"] == "rollback"

    # The live timeline: one line per event, in a sensible order.
    text = "\n".join(lines)
    assert "started the session: investigate incident INC-1234" in lines[0]
    for agent in (VALIDATOR, RESPONDER, ADVISOR, COORDINATOR, "swarmbus/consensus"):
        assert agent in text
    decided = next(i for i, line in enumerate(lines) if "DECISION: rollback" in line)
    assert "(approved; for 2, against 0, abstentions 1)" in lines[decided]
    proposed = next(i for i, line in enumerate(lines) if "proposes 'rollback'" in line)
    closed = next(i for i, line in enumerate(lines) if "closed the session" in line)
    assert proposed < decided < closed == len(lines) - 1
    assert sum("votes " in line for line in lines) == 3

    # avoid_duplicate_queries: each evidence query of the incident ran exactly once.
    kv = await bus.key_value(QUERIES_BUCKET)
    runners = {}
    for source, query in SYSTEMS:
        entry = await kv.get(query_key(result.session, source, query))
        assert entry.value is not None
        record = msgspec.json.decode(entry.value)
        assert record["status"] == "done"
        runners[source] = record["agent"]
    # deploy-log is asked by the validator and the advisor, prometheus by the validator
    # and the responder: one of each pair ran it, the other reused the result.
    assert runners["deploy-log"] in (VALIDATOR, ADVISOR)
    assert runners["prometheus"] in (VALIDATOR, RESPONDER)
    carriers = {
        agent
        for line in lines
        if "[deploy-log: v1.2.3 at 10:15 UTC" in line
        for agent in (VALIDATOR, ADVISOR)
        if agent in line
    }
    assert carriers == {VALIDATOR, ADVISOR}


async def test_the_demo_runs_again_in_a_fresh_session(bus: Bus) -> None:
    with anyio.fail_after(120):
        first = await incident(bus, echo=lambda line: None)
        second = await incident(bus, echo=lambda line: None)
    assert first.session != second.session
    assert first.session.startswith("INC-1234-")
    assert second.decision.decision == "rollback"
    assert len(second.snapshot.findings) == len(first.snapshot.findings) == 9


TRACED_DEMO = """
import sys
import anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from swarmbus._demo import run_demo

trace.set_tracer_provider(TracerProvider())
sys.exit(anyio.run(run_demo))
"""


def test_the_demo_prints_its_trace_id_when_tracing_is_on(nats_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", TRACED_DEMO],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": nats_url},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^trace id: [0-9a-f]{32}$", result.stdout, re.MULTILINE), result.stdout
    assert nats_url in result.stdout, "the demo must use NATS_URL when it is set"
