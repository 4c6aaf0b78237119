"""tail, timeline and dead against a recorded demo session on the real server (goldens)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from swarmbus import Bus
from swarmbus._bus import DEAD_LETTER_STREAM
from swarmbus._observe._deadletters import dead_letters, retry_dead_letter
from swarmbus._observe._events import Step, session_steps, step_of, trace_id_of
from swarmbus._observe._tail import Tail, agent_matches, type_matches
from swarmbus._observe._timeline import Timeline, task_label
from tests._observe_recording import GOLDEN_DIR, check_golden, replay

ROOT = Path(__file__).resolve().parents[1]
RECORDING = GOLDEN_DIR / "demo_session.jsonl"
EVENTS = 35  # events in the recording (34 of the demo, then the rejected one's error)


def cli(
    nats_url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarmbus._cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "NATS_URL": nats_url, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )


@pytest.fixture
async def recorded(bus: Bus, session_id: str) -> str:
    """The recorded demo session, replayed under this test's session id."""
    await replay(bus, RECORDING, session_id)
    return session_id


# --- pure logic ----------------------------------------------------------------------------


def test_trace_id_comes_from_traceparent() -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of({"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}) == trace
    assert trace_id_of({"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"}) is None
    assert trace_id_of({"traceparent": "garbage"}) is None
    assert trace_id_of({"traceparent": '00-"><script>alert(1)</script>xxxxxxxxx-0-01'}) is None
    assert trace_id_of(None) is None


def test_filters_match_types_by_prefix_and_agents_by_path() -> None:
    step = step_of(
        1, "agent.task.created.S.ops/architect", b"{}", None, datetime.now(UTC)
    )  # undecodable: type "undecodable", agent from the subject
    assert step.agent == "ops/architect"
    assert step.type == "undecodable"
    assert agent_matches(step, ["ops"])
    assert agent_matches(step, ["ops/architect"])
    assert not agent_matches(step, ["op"])
    assert not agent_matches(step, ["ops/arch"])
    assert type_matches(step, [])
    assert type_matches(step, ["undecodable"])
    assert not type_matches(step, ["task"])


def test_task_label_drops_the_routing_suffix() -> None:
    assert task_label("investigate-ops_deploy-validator-1cba3e87", "ops/deploy-validator") == (
        "investigate"
    )
    assert task_label("investigate", "") == "investigate"


# --- timeline --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("format", "golden"), [("text", "timeline.txt"), ("markdown", "timeline.md")]
)
async def test_timeline_replays_the_recorded_session(
    recorded: str, nats_url: str, format: str, golden: str
) -> None:
    result = await anyio.to_thread.run_sync(
        lambda: cli(nats_url, "timeline", recorded, "--format", format)
    )
    assert result.returncode == 0, result.stderr
    check_golden(golden, result.stdout, recorded)


async def test_timeline_json_has_the_decision_tasks_and_errors(recorded: str, bus: Bus) -> None:
    timeline = Timeline.of(recorded, await session_steps(bus, recorded))
    data = json.loads(timeline.render("json"))
    assert len(data["steps"]) == EVENTS
    assert [s["seq"] for s in data["steps"]] == sorted(s["seq"] for s in data["steps"])
    (proposal,) = data["proposals"]
    assert proposal["decision"]["decision"] == "rollback"
    assert {v["voter"]: v["vote"] for v in proposal["votes"]} == {
        "ops/deploy-validator": "yes",
        "ops/rollback-advisor": "yes",
        "security/incident-response-lead": "abstain",
    }
    assert [t["status"] for t in data["tasks"]] == ["completed"] * 4
    assert all(t["duration"] > 0 for t in data["tasks"])
    assert data["hypotheses"][0]["confidence"] == pytest.approx(0.82, abs=0.005)
    assert [e["code"] for e in data["errors"]] == ["undecodable", "not_json"]
    assert data["outcome"] == {"decision": "rollback", "consensus": "approved"}
    assert all(s["trace_id"] for s in data["steps"] if s["type"] != "undecodable")


async def test_timeline_of_an_unknown_session_fails(nats_url: str, unique: str) -> None:
    result = await anyio.to_thread.run_sync(lambda: cli(nats_url, "timeline", f"none-{unique}"))
    assert result.returncode == 1
    assert "no events" in result.stderr


# --- tail --------------------------------------------------------------------------------------


async def test_tail_prints_events_live(bus: Bus, nats_url: str, session_id: str) -> None:
    command = [sys.executable, "-m", "swarmbus._cli", "tail", session_id, "--limit", str(EVENTS)]
    env = {**os.environ, "NATS_URL": nats_url, "PYTHONPATH": str(ROOT)}
    async with await anyio.open_process(command, env=env, cwd=ROOT) as process:
        assert process.stdout
        assert process.stderr
        with anyio.fail_after(30):
            note = b""
            while b"tailing" not in note:
                note += await process.stderr.receive()
            await replay(bus, RECORDING, session_id)  # only after tail is following
            out = b""
            async for chunk in process.stdout:
                out += chunk
            assert await process.wait() == 0
    check_golden("tail.txt", out.decode(), session_id)


async def test_tail_filters_by_type_and_agent_and_prints_json(bus: Bus, recorded: str) -> None:
    lines: list[str] = []
    tail = Tail(bus, session=recorded, types=["task"], agents=["ops/architect"], as_json=True,
                echo=lines.append)  # fmt: skip
    with anyio.fail_after(20):
        await tail.run(from_start=True, limit=4)
    events = [json.loads(line) for line in lines]
    assert [e["type"] for e in events] == ["task.created"] * 3 + ["task.created"]
    assert {e["agent"] for e in events} == {"ops/architect"}
    assert events[0]["message"]["task.created"]["parameters"]["target"] == "ops/deploy-validator"
    assert events[-1]["text"] == "created task 'synthesize' for ops/architect"


# --- dead letters ------------------------------------------------------------------------------


async def test_dead_lists_the_sessions_dead_letter(recorded: str, nats_url: str) -> None:
    result = await anyio.to_thread.run_sync(lambda: cli(nats_url, "dead", "--session", recorded))
    assert result.returncode == 0, result.stderr
    check_golden("dead.txt", result.stdout, recorded)

    def by_code(code: str) -> list[dict[str, object]]:
        out = cli(nats_url, "dead", "--session", recorded, "--code", code, "--json")
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout))

    (letter,) = await anyio.to_thread.run_sync(by_code, "not_json")
    assert letter["data"] == "{not json"
    assert letter["receiver"] == "ops/deploy-validator"
    assert await anyio.to_thread.run_sync(by_code, "handler_error") == []


async def test_dead_retry_republishes_and_removes_the_letter(
    recorded: str, nats_url: str, bus: Bus
) -> None:
    (letter,) = await dead_letters(bus, session=recorded)
    result = await anyio.to_thread.run_sync(lambda: cli(nats_url, "dead", "retry", str(letter.id)))
    assert result.returncode == 0, result.stderr
    assert f"retried dead letter {letter.id} on {letter.original_subject}" in result.stdout
    assert await dead_letters(bus, session=recorded) == []
    steps = await session_steps(bus, recorded)
    assert len(steps) == EVENTS + 1
    assert steps[-1].subject == letter.original_subject
    assert steps[-1].type == "undecodable"  # the same bytes, on the same subject, again

    again = await anyio.to_thread.run_sync(lambda: cli(nats_url, "dead", "retry", str(letter.id)))
    assert again.returncode == 2
    assert f"dead letter '{letter.id}' not found" in again.stderr


async def test_retry_refuses_a_request_and_keeps_it(bus: Bus, session_id: str) -> None:
    subject = f"swarmbus.request.investigate.any.{session_id}.ops/architect"
    headers = {"Swarmbus-Code": "schema", "Swarmbus-Reason": "bad",
               "Swarmbus-Original-Subject": subject}  # fmt: skip
    ack = await bus.js.publish(
        f"swarmbus.dead.{session_id}.ops/deploy-validator", b"{}", headers=headers
    )
    with pytest.raises(Exception, match="requester no longer waits"):
        await retry_dead_letter(bus, ack.seq)
    (kept,) = await dead_letters(bus, session=session_id)
    assert kept.id == ack.seq
    assert kept.code == "schema"
    assert (await bus.js.stream_info(DEAD_LETTER_STREAM)).state.messages >= 1


def test_step_time_falls_back_to_the_stream_time() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    assert isinstance(step_of(1, "x", b"nope", None, at), Step)
    assert step_of(1, "x", b"nope", None, at).time == at


async def test_a_live_timeline_keeps_only_running_tasks(recorded: str, bus: Bus) -> None:
    steps = await session_steps(bus, recorded)
    full, live = Timeline(recorded), Timeline(recorded, keep=False)
    assert [full.add(s) for s in steps] == [live.add(s) for s in steps]  # the same lines
    assert len(full.steps) == EVENTS
    assert len(full.tasks) == 4
    assert live.steps == []
    assert live.tasks == {}
    assert live.findings == []
