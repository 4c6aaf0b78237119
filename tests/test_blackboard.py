"""Blackboard: concurrent writers, watch, snapshot, external findings, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import anyio
import anyio.streams.text
import msgspec
import nats
import pytest
import yaml

import swarmbus
from swarmbus import (
    Blackboard,
    BoardChange,
    Bus,
    ConflictError,
    Evidence,
    Finding,
    FindingRecord,
    HypothesisRecord,
    InvalidIdentifierError,
    InvalidMessageError,
    InvalidTransitionError,
    Message,
    NotFoundError,
    Snapshot,
    ValueTooLargeError,
)
from swarmbus._blackboard import ACTION_TRANSITIONS, item_token
from swarmbus._cli import main as cli_main
from swarmbus._subjects import session_filter

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "blackboard"


def finding(content: str, confidence: float = 0.5, category: str = "observation") -> Finding:
    return Finding(category=category, content=content, confidence=confidence)  # type: ignore[arg-type]


@pytest.fixture
async def board(bus: Bus, unique: str, session_id: str) -> Blackboard:
    return await Blackboard.open(bus, session_id, bucket=f"B_{unique}")


async def first_snapshot(board: Blackboard) -> Snapshot:
    async for item in board.watch():
        assert isinstance(item, Snapshot)
        return item
    raise AssertionError("watch ended")


# --- pure logic ------------------------------------------------------------------------


def test_item_token_keeps_safe_ids_and_hashes_others() -> None:
    assert item_token("f-1_A") == "f-1_A"
    odd = item_token("a.b c")
    assert odd != item_token("a_b_c")
    assert odd.startswith("a_b_c-")
    with pytest.raises(InvalidMessageError):
        item_token("")


def test_action_state_machine_shape() -> None:
    assert ACTION_TRANSITIONS["awaiting_approval"] == {"approved", "rejected"}
    assert "completed" in ACTION_TRANSITIONS["approved"]
    assert not ACTION_TRANSITIONS["rejected"]
    assert not ACTION_TRANSITIONS["completed"]


@pytest.mark.parametrize("name", ["finding_older.json", "finding_newer.json"])
def test_values_from_older_and_newer_versions_decode(name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    record = msgspec.json.decode(data, type=FindingRecord)
    assert record.id == "f-1"
    assert record.agent == "ops/deploy-validator"
    assert record.confidence == 0.9
    if name == "finding_older.json":
        assert record.evidence == []  # a field added later takes its default


def test_hypothesis_from_newer_version_ignores_unknown_fields() -> None:
    data = (FIXTURES / "hypothesis_newer.json").read_bytes()
    record = msgspec.json.decode(data, type=HypothesisRecord)
    assert record.status == "proposed"
    assert [u.agent for u in record.updates] == ["ops/a"]


# --- sessions, context, lifecycle events ---------------------------------------------------


async def test_session_lifecycle_and_events(bus: Bus, board: Blackboard, unique: str) -> None:
    seen: list[Message] = []
    got = anyio.Event()

    async def on_event(message: Message) -> None:
        seen.append(message)
        if len(seen) == 7:
            got.set()

    sub = await bus.subscribe(session_filter(board.session), on_event, receiver=f"t/{unique}")
    try:
        await board.start("ops/lead", {"task": "investigate"})
        with pytest.raises(ConflictError):
            await board.start("ops/lead")
        f = await board.append_finding(finding("deploy at 10:15"), agent="ops/a")
        h = await board.propose_hypothesis("pool exhaustion", 0.7, agent="ops/b")
        await board.validate_hypothesis(h.id, True, agent="ops/lead", evidence={"q": "x"})
        await board.complete({"root_cause": "pool"}, agent="ops/lead")
        a = await board.record_action("recommended rollback", agent="ops/r", status="completed")
        with anyio.fail_after(5):
            await got.wait()
    finally:
        await sub.unsubscribe()
    assert [m.type for m in seen] == [
        "session.started",
        "finding",
        "hypothesis.proposed",
        "hypothesis.validated",
        "session.completed",
        "action",
        "action.completed",  # recorded as completed: it was proposed and completed
    ]
    assert seen[1].id == f.id
    assert a.status == "completed"
    info = await board.info()
    assert info.status == "completed"
    assert info.outcome == {"root_cause": "pool"}
    with pytest.raises(InvalidTransitionError):
        await board.complete(agent="ops/lead")
    with pytest.raises(InvalidTransitionError):
        await board.validate_hypothesis(h.id, False, agent="ops/lead")
    sessions = await Blackboard.sessions(bus, bucket=board.bucket)
    assert [s.session_id for s in sessions] == [board.session]


async def test_context_compare_and_set(board: Blackboard) -> None:
    ctx, rev = await board.get_context()
    assert ctx.data == {}
    assert rev == 0
    rev1 = await board.set_context({"task": "t"}, agent="ops/a", revision=0)
    with pytest.raises(ConflictError):
        await board.set_context({"task": "stale"}, agent="ops/b", revision=rev)
    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(
                lambda i=i: board.update_context(
                    lambda d: {**d, f"k{i}": i, "n": d.get("n", 0) + 1}, agent=f"ops/w{i}"
                )
            )
    ctx, rev2 = await board.get_context()
    assert rev2 > rev1
    assert ctx.data["n"] == 10
    assert ctx.data["task"] == "t"
    assert {k for k in ctx.data if k.startswith("k")} == {f"k{i}" for i in range(10)}


async def test_findings_append_once_and_filter(board: Blackboard) -> None:
    evidence = [Evidence(source="prometheus", query="rate(errors[5m])", result="0.05")]
    first = await board.append_finding(
        Finding(category="observation", content="spike", confidence=0.9, evidence=evidence),
        agent="ops/a",
        id="f-1",
    )
    again = await board.append_finding(finding("different"), agent="ops/b", id="f-1")
    assert again == first
    guess = await board.append_finding(finding("guess", category="hypothesis"), agent="ops/b")
    await board.append_finding(finding("odd id"), agent="ops/b", id="ext.id with spaces")
    assert [f.id for f in await board.findings()] == ["f-1", guess.id, "ext.id with spaces"]
    assert [f.content for f in await board.findings(agent="ops/a")] == ["spike"]
    assert [f.content for f in await board.findings(category="hypothesis")] == ["guess"]
    assert (await board.findings(agent="ops/a"))[0].evidence == evidence


async def test_actions_follow_the_state_machine(board: Blackboard) -> None:
    a = await board.record_action("recommended rollback", agent="ops/r", target="api")
    assert a.status == "awaiting_approval"
    await board.set_action_status(a.id, "approved", agent="consensus", reason="3 of 4")
    with pytest.raises(InvalidTransitionError) as info:
        await board.set_action_status(a.id, "rejected", agent="consensus")
    assert (info.value.current, info.value.requested) == ("approved", "rejected")
    done = await board.set_action_status(a.id, "completed", agent="ops/r", result={"ok": True})
    assert [c.status for c in done.history] == ["awaiting_approval", "approved", "completed"]
    assert done.result == {"ok": True}
    assert await board.get_action(a.id) == done
    with pytest.raises(NotFoundError):
        await board.set_action_status("nope", "approved", agent="consensus")
    with pytest.raises(InvalidTransitionError):
        await board.record_action("x", agent="ops/r", status="rejected")


# --- bad input changes nothing -------------------------------------------------------------


async def test_bad_input_raises_typed_errors_and_changes_nothing(
    bus: Bus, board: Blackboard, unique: str
) -> None:
    with pytest.raises(InvalidIdentifierError):
        await Blackboard.open(bus, "bad.session", bucket=board.bucket)
    with pytest.raises(InvalidIdentifierError):
        await Blackboard.open(bus, "x" * 129, bucket=board.bucket)
    await board.start("ops/lead", {"task": "t"})
    h = await board.propose_hypothesis("leak", 0.3, agent="ops/a")
    a = await board.record_action("rollback", agent="ops/r")
    before = await board.snapshot()

    with pytest.raises(InvalidMessageError):
        await board.update_confidence(h.id, 1.7, agent="ops/a")
    with pytest.raises(InvalidMessageError):
        await board.propose_hypothesis("x", 1.7, agent="ops/a")
    with pytest.raises(InvalidMessageError):
        await board.append_finding(finding("x", confidence=1.7), agent="ops/a")
    with pytest.raises(ValueTooLargeError) as too_large:
        await board.append_finding(finding("x" * (board.max_value_bytes + 1)), agent="ops/a")
    assert too_large.value.limit == board.max_value_bytes
    with pytest.raises(ValueTooLargeError):
        await board.set_context({"blob": "y" * board.max_value_bytes}, agent="ops/a")
    with pytest.raises(InvalidTransitionError):
        await board.set_action_status(a.id, "completed", agent="ops/r")
    with pytest.raises(InvalidTransitionError):
        await board.set_action_status(a.id, "exploded", agent="ops/r")
    with pytest.raises(InvalidIdentifierError):
        await board.append_finding(finding("x"), agent="not an agent")

    after = await board.snapshot()
    assert after == before


# --- acceptance: concurrent writers in two processes --------------------------------------

WRITER = """
import sys, anyio
from swarmbus import Blackboard, Bus, Finding

async def main(url, session, bucket, proc, writers, per_writer, hyp):
    async with Bus.open(url=url) as bus:
        board = await Blackboard.open(bus, session, bucket=bucket)

        async def writer(w):
            agent = f"{proc}/w{w}"
            for i in range(per_writer):
                f = Finding(category="observation", content=f"{agent} {i}", confidence=0.5)
                await board.append_finding(f, agent=agent, id=f"{proc}-{w}-{i}")
                await board.update_confidence(hyp, (i % 10) / 10, agent=agent, reason=str(i))

        async with anyio.create_task_group() as tg:
            for w in range(writers):
                tg.start_soon(writer, w)

a = sys.argv
anyio.run(main, a[1], a[2], a[3], a[4], int(a[5]), int(a[6]), a[7])
"""


@pytest.mark.slow
async def test_sixteen_writers_in_two_processes_lose_nothing(
    nats_url: str, board: Blackboard
) -> None:
    per_writer = 15
    hyp = await board.propose_hypothesis("pool exhaustion", 0.5, agent="ops/lead")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [board.session, board.bucket]
    procs = [
        await anyio.open_process(
            [sys.executable, "-c", WRITER, nats_url, *args, proc, "8", str(per_writer), hyp.id],
            env=env,
            stdout=None,
            stderr=None,
        )
        for proc in ("p1", "p2")
    ]
    try:
        with anyio.fail_after(60):
            for p in procs:
                assert await p.wait() == 0
    finally:
        for p in procs:
            if p.returncode is None:
                os.kill(p.pid, signal.SIGKILL)
    snapshot = await board.snapshot()
    expected = {f"{p}-{w}-{i}" for p in ("p1", "p2") for w in range(8) for i in range(per_writer)}
    ids = [f.id for f in snapshot.findings]
    assert len(ids) == len(expected)
    assert set(ids) == expected
    final = await board.get_hypothesis(hyp.id)
    applied = {(u.agent, u.reason) for u in final.updates}
    assert len(final.updates) == len(expected)
    assert applied == {
        (f"{p}/w{w}", str(i)) for p in ("p1", "p2") for w in range(8) for i in range(per_writer)
    }
    for p in ("p1", "p2"):
        for w in range(8):  # each writer's own updates stay in its order
            mine = [u.reason for u in final.updates if u.agent == f"{p}/w{w}"]
            assert mine == [str(i) for i in range(per_writer)]


# --- watch -----------------------------------------------------------------------------------


async def test_watcher_started_mid_session_sees_snapshot_then_every_change(
    bus: Bus, board: Blackboard
) -> None:
    await board.start("ops/lead", {"task": "t"})
    early = [await board.append_finding(finding(f"early {i}"), agent="ops/a") for i in range(5)]
    h = await board.propose_hypothesis("leak", 0.2, agent="ops/b")
    writer = await Blackboard.open(bus, board.session, bucket=board.bucket)
    changes: list[BoardChange] = []
    watch_started = anyio.Event()
    snapshots: list[Snapshot] = []

    async def watch() -> None:
        async for item in board.watch():
            if isinstance(item, Snapshot):
                snapshots.append(item)
                watch_started.set()
                continue
            changes.append(item)
            if len(changes) == 7:
                return

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await watch_started.wait()
            late = [
                await writer.append_finding(finding(f"late {i}"), agent="ops/c") for i in range(3)
            ]
            await writer.update_confidence(h.id, 0.6, agent="ops/c")
            await writer.update_confidence(h.id, 0.9, agent="ops/d")
            await writer.set_context({"task": "t", "phase": "mitigate"}, agent="ops/lead")
            await writer.complete({"done": True}, agent="ops/lead")

    (snapshot,) = snapshots
    assert [f.id for f in snapshot.findings] == [f.id for f in early]
    assert [x.id for x in snapshot.hypotheses] == [h.id]
    assert snapshot.context is not None
    assert snapshot.context.data == {"task": "t"}
    revisions = [c.revision for c in changes]
    assert revisions == sorted(revisions)
    assert revisions[0] > snapshot.revision
    assert [c.kind for c in changes] == ["finding"] * 3 + ["hypothesis"] * 2 + [
        "context",
        "session",
    ]
    assert [c.value.id for c in changes[:3] if isinstance(c.value, FindingRecord)] == [
        f.id for f in late
    ]
    # hypothesis confidence pools each agent's latest assessment (equal weights here)
    pooled = [c.value.confidence for c in changes[3:5] if isinstance(c.value, HypothesisRecord)]
    assert pooled == pytest.approx([(0.2 + 0.6) / 2, (0.2 + 0.6 + 0.9) / 3])
    # applying the changes to the snapshot gives the board as it is now
    rebuilt = snapshot
    for c in changes:
        rebuilt = rebuilt.apply(c)
    now = await board.snapshot()
    assert rebuilt.to_dict() == now.to_dict()
    assert rebuilt.session == now.session

    # resuming after a change yields exactly the changes after it
    resumed: list[BoardChange] = []
    with anyio.fail_after(10):
        async for item in board.watch(after=changes[3].revision):
            assert isinstance(item, BoardChange)
            resumed.append(item)
            if len(resumed) == 3:
                break
    assert [c.revision for c in resumed] == revisions[4:]


async def test_a_watch_deletes_its_consumer_when_it_ends(bus: Bus, board: Blackboard) -> None:
    """A finished watcher leaves no consumer on the board's stream (a stream takes at
    most 1,000, and an ordered consumer would otherwise wait out its inactive threshold)."""
    await board.start("ops/lead", {"task": "t"})
    stream = f"KV_{board.bucket}"
    with anyio.fail_after(10):
        async with contextlib.aclosing(board.watch()) as watch:
            async for item in watch:
                assert isinstance(item, Snapshot)
                await board.append_finding(finding("seen live"), agent="ops/a")
                break
            assert isinstance(await anext(watch), BoardChange)
            assert (await bus.js.stream_info(stream)).state.consumer_count == 1
    assert (await bus.js.stream_info(stream)).state.consumer_count == 0


async def test_a_cancelled_watch_deletes_its_consumer(bus: Bus, board: Blackboard) -> None:
    await board.start("ops/lead", {"task": "t"})
    stream = f"KV_{board.bucket}"
    started, live = anyio.Event(), anyio.Event()

    async def watch() -> None:
        async for item in board.watch():
            (live if isinstance(item, BoardChange) else started).set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await started.wait()
            await board.append_finding(finding("seen live"), agent="ops/a")
            await live.wait()
            tg.cancel_scope.cancel()
    assert (await bus.js.stream_info(stream)).state.consumer_count == 0


async def test_snapshot_exports_the_seed_shape(board: Blackboard) -> None:
    await board.start("ops/lead", {"task": "investigate incident INC-1234"})
    await board.append_finding(finding("deployment v1.2.3 at 10:15 UTC"), agent="ops/dv")
    await board.propose_hypothesis("database connection pool exhaustion", 0.7, agent="ops/a")
    await board.record_action("recommended rollback", agent="ops/rollback-advisor")
    snapshot = await board.snapshot()
    as_json = json.loads(snapshot.to_json())
    assert list(as_json) == ["context", "findings", "hypotheses", "actions_taken"]
    assert as_json["context"] == {"task": "investigate incident INC-1234"}
    assert as_json["findings"][0]["agent"] == "ops/dv"
    assert as_json["hypotheses"][0]["confidence"] == 0.7
    assert as_json["actions_taken"][0]["status"] == "awaiting_approval"
    assert yaml.safe_load(snapshot.to_yaml()) == as_json


async def test_cli_board_prints_the_snapshot(
    nats_url: str,
    board: Blackboard,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await board.start("ops/lead", {"task": "t"})
    await board.append_finding(finding("cli"), agent="ops/a")
    monkeypatch.setenv("NATS_URL", nats_url)
    argv = ["board", board.session, "--bucket", board.bucket, "--format", "yaml"]
    code = await anyio.to_thread.run_sync(cli_main, argv)
    assert code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["context"] == {"task": "t"}
    assert [f["content"] for f in printed["findings"]] == ["cli"]


async def test_cli_board_watch_follows_changes(nats_url: str, board: Blackboard) -> None:
    await board.start("ops/lead", {"task": "t"})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": nats_url}
    argv = [sys.executable, "-m", "swarmbus._cli", "board", board.session, "--watch"]
    process = await anyio.open_process([*argv, "--bucket", board.bucket], env=env)
    assert process.stdout is not None
    lines = anyio.streams.text.TextReceiveStream(process.stdout)
    buffer = ""

    async def next_line() -> dict[str, object]:
        nonlocal buffer
        while "\n" not in buffer:
            buffer += await lines.receive()
        line, buffer = buffer.split("\n", 1)
        parsed: dict[str, object] = json.loads(line)
        return parsed

    try:
        with anyio.fail_after(15):
            snapshot = await next_line()
            assert snapshot["context"] == {"task": "t"}
            added = await board.append_finding(finding("live"), agent="ops/a")
            change = await next_line()
    finally:
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
    assert change["kind"] == "finding"
    assert change["id"] == added.id


# --- external publishers and retention ------------------------------------------------------


async def test_external_nats_py_finding_shows_up(
    nats_url: str, bus: Bus, board: Blackboard, unique: str
) -> None:
    envelope = {
        "id": f"ext-{unique}",
        "timestamp": "2025-01-02T10:30:00Z",
        "source": {"agent": "go/collector", "session": board.session},
        "type": "finding",
        "finding": {"category": "observation", "content": "from Go", "confidence": 0.8},
    }
    subject = f"agent.finding.reported.{board.session}.go/collector"
    async with Blackboard.recording(
        bus, bucket=board.bucket, durable=f"rec-{unique}", deliver_new=True
    ):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.publish(subject, json.dumps(envelope).encode())
            # the same envelope again (past the de-duplication window): still one finding
            await js.publish(subject, json.dumps(envelope).encode(), headers={"Nats-Msg-Id": "x"})
            await js.publish(subject, b"not json")
        finally:
            await nc.close()
        with anyio.fail_after(10):
            async for item in board.watch():
                if isinstance(item, Snapshot) and item.findings:
                    break
                if isinstance(item, BoardChange) and item.kind == "finding":
                    break
    findings = await board.findings()
    assert [(f.id, f.agent, f.content) for f in findings] == [
        (f"ext-{unique}", "go/collector", "from Go")
    ]
    # the board's own findings are not duplicated by the recorder either
    recorder = Blackboard.recording(
        bus, bucket=board.bucket, durable=f"rec-{unique}", deliver_new=True
    )
    async with recorder:
        own = await board.append_finding(finding("own"), agent="ops/a")
    assert [f.id for f in await board.findings()] == [f"ext-{unique}", own.id]


async def test_retention_purges_only_old_completed_sessions(bus: Bus, unique: str) -> None:
    bucket = f"B_{unique}"
    done = await Blackboard.open(bus, f"done-{unique}", bucket=bucket)
    active = await Blackboard.open(bus, f"active-{unique}", bucket=bucket)
    for b in (done, active):
        await b.start("ops/lead", {"task": "t"})
        await b.append_finding(finding("x"), agent="ops/a")
    record = await done.complete(agent="ops/lead")
    assert record.completed is not None
    kept = await Blackboard.purge_completed(bus, timedelta(days=1), bucket=bucket)
    assert kept == []
    later = record.completed + timedelta(days=2)
    purged = await Blackboard.purge_completed(bus, timedelta(days=1), bucket=bucket, at=later)
    assert purged == [done.session]
    assert await done.snapshot() == Snapshot(session_id=done.session)
    assert len((await active.snapshot()).findings) == 1
    assert [s.session_id for s in await Blackboard.sessions(bus, bucket=bucket)] == [active.session]


async def test_hypothesis_confidence_pools_assessments_by_expertise_and_evidence(
    board: Blackboard,
) -> None:
    h = await board.propose_hypothesis(
        "pool exhaustion", 0.8, agent="ops/dba", expertise=0.9, evidence=2
    )
    assert h.confidence == 0.8
    h = await board.update_confidence(h.id, 0.2, agent="ops/intern", expertise=0.3, evidence=0)
    # seed: weight = expertise * (0.5 + 0.1 * evidence) -> 0.9*0.7=0.63 and 0.3*0.5=0.15
    assert h.confidence == pytest.approx((0.8 * 0.63 + 0.2 * 0.15) / (0.63 + 0.15))
    # a later assessment by the same agent replaces its earlier one
    h = await board.update_confidence(h.id, 0.8, agent="ops/intern", expertise=0.3)
    assert h.confidence == pytest.approx(0.8)
    assert len(h.updates) == 2
    with pytest.raises(swarmbus.InvalidMessageError):
        await board.update_confidence(h.id, 0.5, agent="ops/x", expertise=1.5)
    assert (await board.get_hypothesis(h.id)).confidence == pytest.approx(0.8)


async def test_log_odds_pooling_is_configurable(bus: Bus, unique: str, session_id: str) -> None:
    board = await Blackboard.open(bus, session_id, bucket=f"B_{unique}", pooling="log_odds")
    h = await board.propose_hypothesis("leak", 0.99, agent="ops/a")
    h = await board.update_confidence(h.id, 0.5, agent="ops/b")
    assert h.confidence == pytest.approx(0.9090, abs=1e-3)


async def test_negative_evidence_is_refused_and_keeps_the_hypothesis_readable(
    board: Blackboard,
) -> None:
    h = await board.propose_hypothesis("disk full", 0.9, agent="ops/a")
    # weight = 0.5 * (0.5 + 0.1 * -6) < 0 would pool 0.9 and 0.1 to 1.1: unreadable
    with pytest.raises(InvalidMessageError):
        await board.update_confidence(h.id, 0.1, agent="ops/b", evidence=-6)
    with pytest.raises(InvalidMessageError):
        await board.propose_hypothesis("cpu", 0.5, agent="ops/a", evidence=-1)
    assert (await board.get_hypothesis(h.id)).confidence == pytest.approx(0.9)
    assert [x.id for x in (await board.snapshot()).hypotheses] == [h.id]


async def test_an_id_too_long_for_its_event_is_refused_before_it_is_stored(
    board: Blackboard,
) -> None:
    long_id = "x" * 129  # envelope ids and action ids are at most 128 characters on the wire
    with pytest.raises(InvalidMessageError):
        await board.append_finding(finding("too long"), agent="ops/a", id=long_id)
    with pytest.raises(InvalidMessageError):
        await board.record_action("rollback", agent="ops/a", status="running", id=long_id)
    snapshot = await board.snapshot()
    assert (snapshot.findings, snapshot.actions_taken) == ((), ())


async def test_a_failed_retention_purge_keeps_the_recorder_running(
    bus: Bus, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = f"B_{unique}"
    done = await Blackboard.open(bus, f"done-{unique}", bucket=bucket)
    await done.start("ops/lead")
    await done.complete(agent="ops/lead")
    purge = bus.js.purge_stream
    calls = 0
    purged = anyio.Event()

    async def flaky_purge(*args: object, **kwargs: object) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:  # e.g. a stream leader election: the request times out
            raise nats.errors.TimeoutError
        result = await purge(*args, **kwargs)  # type: ignore[arg-type]
        purged.set()
        return result

    monkeypatch.setattr(bus.js, "purge_stream", flaky_purge)
    recorder = Blackboard.recording(
        bus,
        bucket=bucket,
        durable=f"rec-{unique}",
        deliver_new=True,
        retention=timedelta(0),
        retention_interval=0.05,
    )
    async with recorder:
        with anyio.fail_after(10):
            await purged.wait()  # the next interval retried the purge
    assert calls >= 2
    assert (await done.snapshot()).session is None


async def test_snapshot_keeps_a_key_rewritten_past_its_history_while_it_is_read(
    board: Blackboard, monkeypatch: pytest.MonkeyPatch
) -> None:
    await board.set_context({"n": 0}, agent="a")
    await board.append_finding(finding("early"), agent="a", id="f-early")
    add_consumer = board.bus.js.add_consumer
    raced = False

    async def add_consumer_then_write(*args: object, **kwargs: object) -> object:
        # between the snapshot consumer's creation and its pull: a new key, then the
        # context rewritten more often than the bucket's history keeps
        nonlocal raced
        info = await add_consumer(*args, **kwargs)  # type: ignore[arg-type]
        if not raced:
            raced = True
            await board.append_finding(finding("late"), agent="a", id="f-late")
            for n in range(1, 12):
                await board.set_context({"n": n}, agent="a")
        return info

    monkeypatch.setattr(board.bus.js, "add_consumer", add_consumer_then_write)
    snapshot = await board.snapshot()
    monkeypatch.undo()
    assert snapshot.context is not None, "the context was missing from the snapshot"
    assert [f.id for f in snapshot.findings] == ["f-early", "f-late"]
    assert snapshot.context.data == {"n": 11}
    assert snapshot == await board.snapshot()


async def test_a_foreign_value_under_a_board_key_is_an_invalid_message_error(
    board: Blackboard,
) -> None:
    await board._kv.put(f"{board.session}.context", b"not a board value")
    await board._kv.put(f"{board.session}.hypothesis.h1", b'{"id": 1}')
    with pytest.raises(InvalidMessageError):
        await board.get_context()
    with pytest.raises(InvalidMessageError):
        await board.update_context(lambda d: d, agent="ops/a")
    with pytest.raises(InvalidMessageError):
        await board.get_hypothesis("h1")


async def test_start_retried_after_a_crash_before_the_context_completes_it(
    bus: Bus, board: Blackboard, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Message] = []
    got = anyio.Event()

    async def on_event(message: Message) -> None:
        seen.append(message)
        got.set()

    async def crash(*args: object, **kwargs: object) -> int:
        raise RuntimeError("process died here")

    monkeypatch.setattr(board, "_put", crash)
    with pytest.raises(RuntimeError):
        await board.start("ops/lead", {"task": "t"})
    monkeypatch.undo()
    sub = await bus.subscribe(session_filter(board.session), on_event, receiver=f"t/{unique}")
    try:
        with pytest.raises(ConflictError):  # started already, as documented
            await board.start("ops/lead", {"task": "t"})
        with anyio.fail_after(5):
            await got.wait()
    finally:
        await sub.unsubscribe()
    ctx, _ = await board.get_context()
    assert ctx.data == {"task": "t"}
    assert [m.type for m in seen] == ["session.started"]
