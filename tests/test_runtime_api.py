"""The runtime API (``swarmbus.api.>``) as a plain nats-py client sees it.

No swarmbus import on the client side: requests are JSON built by hand, replies are
validated against the generated schemas (schemas/api/).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import nats
import pytest
from nats.aio.client import Client as NatsClient

from swarmbus import NatsServer, Settings
from swarmbus._runtime.supervisor import RuntimeConfig, running
from tests._stores import store_options

ROOT = Path(__file__).resolve().parents[1]
WAIT = 10.0


@contextlib.asynccontextmanager
async def up(nats_url: str, **config: Any) -> AsyncIterator[NatsClient]:
    """A runtime on the test server and a plain nats-py client. (Not a fixture: the
    runtime's task group must be entered and left by the test's own task.)"""
    async with running(RuntimeConfig(settings=Settings(url=nats_url), http=None, **config)):
        nc = await nats.connect(nats_url)
        try:
            yield nc
        finally:
            await nc.drain()


def _schema(op: str, part: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((ROOT / f"schemas/api/{op}.{part}.schema.json").read_text())
    return schema


async def call(
    nc: NatsClient,
    op: str,
    session: str,
    agent: str,
    body: object = None,
    *,
    raw: bytes | None = None,
) -> dict[str, Any]:
    """Request ``op``; the reply, checked against the operation's reply schema."""
    data = raw if raw is not None else json.dumps(body or {}).encode()
    msg = await nc.request(f"swarmbus.api.{op}.{session}.{agent}", data, timeout=WAIT)
    reply: dict[str, Any] = json.loads(msg.data)
    jsonschema.validate(reply, _schema(op, "reply"))
    if body is not None:
        jsonschema.validate(body, _schema(op, "request"))
    return reply


async def test_a_task_is_created_claimed_heartbeaten_and_completed(
    fresh_server: NatsServer, session_id: str
) -> None:
    # Claims create durable consumers: on a server of its own, the shared one stays
    # under its consumer limit.
    nats_url = fresh_server.url
    async with up(nats_url) as client:
        created = await call(
            client, "task.create", session_id, "ext/boss", {"type": "analyze", "timeout": "5m"}
        )
        assert created["ok"], created
        task_id = created["result"]["task"]["id"]
        assert created["result"]["task"]["constraints"]["timeout"] == 300.0

        claimed = await call(client, "task.claim", session_id, "ext/worker", {"types": ["analyze"]})
        assert claimed["result"]["task"]["id"] == task_id
        assert claimed["result"]["attempt"] == 1
        beat = await call(client, "task.heartbeat", session_id, "ext/worker", {"task_id": task_id})
        assert beat["ok"], beat
        done = await call(
            client,
            "task.complete",
            session_id,
            "ext/worker",
            {"task_id": task_id, "result": {"x": 1}},
        )
        assert done["result"]["task"]["status"] == "completed"
        state = await call(client, "task.get", session_id, "ext/boss", {"task_id": task_id})
        assert state["result"]["task"]["result"] == {"x": 1}


async def test_completing_a_task_not_claimed_names_the_api_to_use(
    nats_url: str, session_id: str
) -> None:
    async with up(nats_url) as client:
        reply = await call(client, "task.complete", session_id, "ext/w", {"task_id": "nope"})
        assert reply["ok"] is False
        assert reply["error"]["code"] == "not_found"
        assert reply["error"]["use"] == "swarmbus.api.task.claim.<session>.<agent>"


@pytest.mark.parametrize(
    ("op", "raw", "code"),
    [
        ("task.create", b"not json", "invalid_request"),
        ("task.create", b'{"type": "x", "typo": 1}', "invalid_request"),
        ("task.create", b'{"type": "x", "timeout": "5 minutes"}', "invalid_request"),
        ("task.explode", b"{}", "unknown_operation"),
    ],
)
async def test_a_malformed_request_gets_an_error_reply(
    nats_url: str, session_id: str, op: str, raw: bytes, code: str
) -> None:
    async with up(nats_url) as client:
        msg = await client.request(f"swarmbus.api.{op}.{session_id}.ext/x", raw, timeout=WAIT)
        reply = json.loads(msg.data)
        assert reply["ok"] is False
        assert reply["error"]["code"] == code
        assert reply["error"]["reason"]


async def test_a_request_on_a_subject_of_the_wrong_shape_gets_an_error_reply(nats_url: str) -> None:
    async with up(nats_url) as client:
        msg = await client.request("swarmbus.api.task.claim.only-session", b"{}", timeout=WAIT)
        reply = json.loads(msg.data)
        assert reply["error"]["code"] == "wrong_subject"
        assert reply["error"]["use"] == "swarmbus.api.<domain>.<verb>.<session>.<agent>"


async def test_findings_and_hypotheses_reach_the_board(nats_url: str, session_id: str) -> None:
    async with up(nats_url) as client:
        opened = await call(client, "incident.open", session_id, "ext/alerts", {"kind": "unmapped"})
        assert opened["result"] == {
            "session": session_id,
            "swarm": None,
            "spec": None,
            "already_open": False,
        }
        again = await call(client, "incident.open", session_id, "ext/alerts", {"kind": "unmapped"})
        assert again["result"]["already_open"] is True
        posted = await call(
            client,
            "finding.post",
            session_id,
            "ext/go",
            {"category": "observation", "content": "p99 up", "confidence": 0.8},
        )
        assert posted["ok"], posted
        await call(
            client,
            "hypothesis.post",
            session_id,
            "ext/go",
            {"description": "pool", "confidence": 0.7},
        )
        board = (await call(client, "board.get", session_id, "ext/go", {}))["result"]["board"]
        assert [f["content"] for f in board["findings"]] == ["p99 up"]
        assert [h["description"] for h in board["hypotheses"]] == ["pool"]
        closed = await call(
            client, "incident.close", session_id, "ext/alerts", {"outcome": {"ok": 1}}
        )
        assert closed["result"]["status"] == "completed"


async def test_a_proposal_is_decided_by_votes_through_the_api(
    nats_url: str, session_id: str
) -> None:
    async with up(nats_url) as client:
        decided = await client.subscribe(f"agent.action.decided.{session_id}.>")
        joined = await call(client, "session.join", session_id, "ext/voter", {})
        assert joined["result"]["members"] == ["ext/voter"]
        proposal = {"proposal_id": f"P-{session_id}", "action": "rollback", "timeout": "1m"}
        created = await call(
            client, "proposal.create", session_id, "ext/lead", {"proposal": proposal}
        )
        assert created["ok"], created
        vote = {"proposal_id": proposal["proposal_id"], "vote": "yes", "reason": "5x errors"}
        voted = await call(client, "vote.cast", session_id, "ext/voter", {"vote": vote})
        assert voted["ok"], voted
        with anyio.fail_after(WAIT):
            event = json.loads((await decided.next_msg(timeout=WAIT)).data)
        assert event["decision"]["outcome"] == "approved"
        jsonschema.validate(event, json.loads((ROOT / "schemas/envelope.schema.json").read_text()))


async def test_locks_through_the_api_carry_fencing_tokens(
    nats_url: str, session_id: str, unique: str
) -> None:
    async with up(nats_url) as client:
        resource = f"file:/src/{unique}.py"
        first = await call(client, "lock.acquire", session_id, "ext/a", {"resource": resource})
        assert first["result"]["held"] is True
        other = await call(client, "lock.acquire", session_id, "ext/b", {"resource": resource})
        assert other["result"] == {
            "resource": resource,
            "held": False,
            "token": None,
            "owner": "ext/a",
        }
        await call(client, "lock.release", session_id, "ext/a", {"resource": resource})
        second = await call(client, "lock.acquire", session_id, "ext/b", {"resource": resource})
        assert second["result"]["token"] > first["result"]["token"]


def test_the_asyncapi_document_covers_every_api_operation_and_resolves() -> None:
    """schemas/asyncapi.json is checked for staleness with schemas/ (test_messages); here:
    every operation is there, and every reference points at something that exists."""
    doc = json.loads((ROOT / "schemas/asyncapi.json").read_text())
    assert doc["asyncapi"] == "3.0.0"
    ops = json.loads((ROOT / "schemas/api/task.claim.request.schema.json").read_text())
    assert ops["title"].startswith("swarmbus API task.claim request")

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        if ref.startswith("#/"):
            node: Any = doc
            for part in ref[2:].split("/"):
                node = node[part]
        else:
            assert (ROOT / "schemas" / ref).is_file(), ref
    for op in ("incident.open", "session.join", "task.claim", "vote.cast", "board.get"):
        assert f"api.{op}" in doc["operations"]


async def test_a_task_whose_last_claim_expired_is_failed_with_a_dead_letter(
    fresh_server: NatsServer, session_id: str
) -> None:
    """Nobody else claims its type: without the sweeper it would stay running forever."""
    # Claims create durable consumers: on a server of its own, the shared one stays
    # under its consumer limit.
    nats_url = fresh_server.url
    async with up(nats_url, task_sweep_interval=0.2) as client:
        errors = await client.subscribe(f"agent.error.occurred.{session_id}.>")
        body = {"type": "fragile", "timeout": 1, "max_attempts": 1}
        task_id = (await call(client, "task.create", session_id, "ext/boss", body))["result"][
            "task"
        ]["id"]
        claimed = await call(client, "task.claim", session_id, "ext/slow", {"types": ["fragile"]})
        assert claimed["result"]["task"]["id"] == task_id
        with anyio.fail_after(WAIT):
            while True:
                error = json.loads((await errors.next_msg(timeout=WAIT)).data)
                if error["error.occurred"]["code"] == "task_timeout":
                    break
        assert "timed out after 1 attempts" in error["error.occurred"]["reason"]
        assert error["error.occurred"]["dead_letter"] is True
        state = await call(client, "task.get", session_id, "ext/boss", {"task_id": task_id})
        assert state["result"]["task"]["status"] == "failed"
        late = await call(client, "task.complete", session_id, "ext/slow", {"task_id": task_id})
        assert late["error"]["code"] == "claim_lost"


def _envelope(session: str, agent: str, type: str, body: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "id": f"{type}-{session}",
            "timestamp": "2025-01-02T10:30:00Z",
            "source": {"agent": agent, "session": session},
            "type": type,
            type: body,
        }
    ).encode()


async def _error(sub: Any) -> dict[str, Any]:
    with anyio.fail_after(WAIT):
        body: dict[str, Any] = json.loads((await sub.next_msg(timeout=WAIT)).data)
    jsonschema.validate(body, json.loads((ROOT / "schemas/envelope.schema.json").read_text()))
    return body["error.occurred"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("tail", ["", ".ext/go.extra"])
async def test_an_event_on_a_subject_of_the_wrong_shape_gets_an_error_event(
    nats_url: str, session_id: str, tail: str
) -> None:
    async with up(nats_url) as client:
        errors = await client.subscribe("agent.error.occurred.>")
        finding = {"category": "observation", "content": "x", "confidence": 0.5}
        subject = f"agent.finding.reported.{session_id}{tail}"
        await client.publish(subject, _envelope(session_id, "ext/go", "finding", finding))
        error = await _error(errors)
        while error["subject"] != subject:  # another test's, on the shared server
            error = await _error(errors)
        assert error["code"] == "wrong_subject"
        assert error["subject"] == subject
        assert "agent.<domain>.<event>.<session>.<agent>" in error["reason"]


async def test_a_task_event_for_no_task_names_the_api_to_use(
    nats_url: str, session_id: str
) -> None:
    async with up(nats_url) as client:
        errors = await client.subscribe(f"agent.error.occurred.{session_id}.>")
        body = {"task_id": "T-1", "type": "investigate"}
        data = _envelope(session_id, "ext/go", "task.created", body)
        await client.publish(f"agent.task.created.{session_id}.ext/go", data)
        error = await _error(errors)
        assert error["code"] == "not_acted_on"
        assert "swarmbus.api.task.create.<session>.<agent>" in error["reason"]


async def test_a_session_started_event_with_a_kind_opens_the_incident(
    nats_url: str, session_id: str
) -> None:
    async with up(nats_url) as client:
        started = await client.subscribe(f"agent.session.started.{session_id}.>")
        body = {"session_id": session_id, "initiator": "ext/alerts", "context": {"kind": "x"}}
        data = _envelope(session_id, "ext/alerts", "session.started", body)
        await client.publish(f"agent.session.started.{session_id}.ext/alerts", data)
        await started.next_msg(timeout=WAIT)  # our own
        with anyio.fail_after(WAIT):
            while True:
                board = (await call(client, "board.get", session_id, "ext/x", {}))["result"]
                if board["board"]["context"].get("kind") == "x":
                    break
                await started.next_msg(timeout=WAIT)  # the board's own event
        assert board["board"]["context"] == {"kind": "x"}


async def test_a_malformed_request_without_a_reply_subject_gets_an_error_event(
    nats_url: str, session_id: str
) -> None:
    async with up(nats_url) as client:
        errors = await client.subscribe(f"agent.error.occurred.{session_id}.>")
        await client.publish(f"swarmbus.api.task.create.{session_id}.ext/x", b"{not json")
        error = await _error(errors)
        assert error["code"] == "invalid_request"


async def test_one_service_runs_alone(nats_url: str, session_id: str) -> None:
    """Scale-out: ``--only api`` answers requests without the other services."""
    async with up(nats_url, services=frozenset({"api"})) as client:
        created = await call(client, "task.create", session_id, "ext/boss", {"type": "solo"})
        assert created["ok"]


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_the_runtime_runs_on_a_state_store_backend(
    backend: str, request: pytest.FixtureRequest, nats_url: str, session_id: str
) -> None:
    """``swarmbus up`` with ``SWARM_BACKEND=redis|postgres``: provisioning has no task
    stream to watch there (it used to fail at start), and the API serves tasks."""
    settings = Settings(url=nats_url, backend=backend, **store_options(request, backend))
    async with running(RuntimeConfig(settings=settings, http=None)):
        nc = await nats.connect(nats_url)
        try:
            created = await call(nc, "task.create", session_id, "ext/boss", {"type": "triage"})
            assert created["ok"], created
            claimed = await call(nc, "task.claim", session_id, "ops/worker", {"types": ["triage"]})
            assert claimed["ok"], claimed
            assert claimed["result"]["task"]["id"] == created["result"]["task"]["id"]
            task_id = claimed["result"]["task"]["id"]
            done = await call(
                nc, "task.complete", session_id, "ops/worker", {"task_id": task_id, "result": {}}
            )
            assert done["ok"], done
            assert done["result"]["task"]["status"] == "completed"
        finally:
            await nc.drain()
