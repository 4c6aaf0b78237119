"""Task queue on a real nats-server: lifecycle, priority, approval, timeouts, bad input."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import nats.js.errors
import pytest

from swarmbus import (
    Bus,
    InvalidIdentifierError,
    InvalidTaskError,
    InvalidTransitionError,
    Message,
    NatsServer,
    NotFoundError,
    SwarmbusError,
    Task,
    TaskClaimLostError,
    TaskCompletedMessage,
    TaskFailedMessage,
    TaskQueue,
    TaskSpec,
    decode,
)
from swarmbus._cli import main as cli_main
from swarmbus._jetstream.workqueue import DEFAULT_ACK_WAIT, queue_consumer
from swarmbus._runtime.provision import provisioning
from swarmbus._tasks import MAX_PRIORITY, MIN_PRIORITY, TASKS_STREAM
from swarmbus._tasks.store_reads import get_many, lists_open, open_records
from tests._stores import store_options
from tests.test_auth import DEPLOY, INBOX, LEAD, PASSWORDS, SERVICE, start_with_passwords

CREATOR = "ops/coordinator"


class Events:
    """Every task lifecycle event of one session, as received live."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.changed = anyio.Event()

    async def wait_for(self, count: int, kind: type[Message]) -> list[Message]:
        with anyio.fail_after(5):
            while len(found := [m for m in self.messages if isinstance(m, kind)]) < count:
                self.changed = anyio.Event()
                await self.changed.wait()
        return found


#: The conformance tests run on every state backend (``backend``: nats by default).
ON_EVERY_BACKEND = pytest.mark.parametrize("backend", ["nats", "redis", "postgres"])


@pytest.fixture
def backend() -> str:
    return "nats"


@pytest.fixture
def backend_options(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    return store_options(request, backend)


@pytest.fixture
async def backend_bus(
    backend: str, backend_options: dict[str, str], nats_url: str
) -> AsyncIterator[Bus]:
    """A bus whose coordination state is on ``backend``."""
    async with Bus.open(url=nats_url, backend=backend, **backend_options) as bus:
        yield bus


@pytest.fixture
async def events(queue: TaskQueue, session_id: str) -> AsyncIterator[Events]:
    bus = queue.bus
    seen = Events()

    async def on_msg(msg: object) -> None:
        seen.messages.append(decode(msg.data))  # type: ignore[attr-defined]
        seen.changed.set()

    sub = await bus.nc.subscribe(f"agent.task.*.{session_id}.>", cb=on_msg)
    yield seen
    await sub.unsubscribe()


@pytest.fixture
async def queue(backend_bus: Bus, session_id: str) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(backend_bus, session_id, ack_wait=0.5) as queue:
        yield queue


async def test_the_dispatch_stream_is_not_capped_at_the_servers_1000_consumers(
    queue: TaskQueue, bus: Bus
) -> None:
    # One durable per session, type and priority: 1,000 (the server's default) would
    # stop the 101st session with ten priorities of one task type.
    info = await bus.js.stream_info("SWARMBUS_TASKS")
    assert info.config.max_consumers == bus.settings.task_max_consumers
    assert bus.settings.task_max_consumers > 1_000


@ON_EVERY_BACKEND
async def test_lifecycle_create_claim_heartbeat_complete(
    queue: TaskQueue, events: Events, unique: str
) -> None:
    task = await queue.create(
        "investigate", agent=CREATOR, priority=7, target="api", context={"since": "10:15"}
    )
    assert (task.status, task.priority, task.attempts) == ("pending", 7, 0)
    assert task.parameters.context == {"since": "10:15"}

    claim = await queue.claim(agent=f"w/{unique}", types=["investigate"])
    assert claim is not None
    assert (claim.task.id, claim.task.status, claim.attempt) == (task.id, "assigned", 1)
    await claim.heartbeat()
    assert (await queue.get(task.id)).status == "running"

    done = await claim.complete({"cause": "deploy"})
    assert (done.status, done.result, done.assigned_to) == (
        "completed",
        {"cause": "deploy"},
        f"w/{unique}",
    )
    stored = await queue.get(task.id)
    assert stored == done
    assert stored.completed_at is not None
    assert await queue.claim(agent=f"w/{unique}", types=["investigate"]) is None
    assert [t.id for t in await queue.tasks("completed")] == [task.id]
    assert await queue.tasks("pending") == []

    (completed,) = await events.wait_for(1, TaskCompletedMessage)
    assert completed.source.agent == f"w/{unique}"
    kinds = {m.type for m in events.messages}
    assert kinds == {"task.created", "task.assigned", "task.completed"}


@ON_EVERY_BACKEND
async def test_priority_mixed_backlog_highest_first_fifo_within(queue: TaskQueue) -> None:
    rng = random.Random(4)
    priorities = [p for p in range(1, 11) for _ in range(3)]
    rng.shuffle(priorities)
    created = await queue.create_many(
        [TaskSpec(type="analyze", priority=p) for p in priorities], agent=CREATOR
    )
    order = {t.id: i for i, t in enumerate(created)}
    claimed = []
    while (claim := await queue.claim(agent="w/one", types=["analyze", "report"])) is not None:
        claimed.append(claim.task)
        await claim.complete()
    assert len(claimed) == len(created)
    assert [t.priority for t in claimed] == sorted(priorities, reverse=True)
    for p in range(1, 11):
        same = [order[t.id] for t in claimed if t.priority == p]
        assert same == sorted(same), f"priority {p} not FIFO"


@ON_EVERY_BACKEND
async def test_claim_by_type_only(queue: TaskQueue) -> None:
    await queue.create("remediate", agent=CREATOR, priority=10)
    analyze = await queue.create("analyze", agent=CREATOR, priority=1)
    claim = await queue.claim(agent="w/analyst", types=["analyze"])
    assert claim is not None
    assert claim.task.id == analyze.id


@ON_EVERY_BACKEND
async def test_starved_low_priority_task_is_claimed_first(
    backend_bus: Bus, session_id: str
) -> None:
    async with TaskQueue(backend_bus, session_id, ack_wait=0.5, starvation_after=0.3) as queue:
        old = await queue.create("report", agent=CREATOR, priority=1)
        await anyio.sleep(0.4)  # let it age past starvation_after (time is the subject here)
        await queue.create_many([TaskSpec(type="report", priority=10)] * 3, agent=CREATOR)
        claim = await queue.claim(agent="w/one", types=["report"])
        assert claim is not None
        assert claim.task.id == old.id
        second = await queue.claim(agent="w/one", types=["report"])
        assert second is not None
        assert second.task.priority == 10


@ON_EVERY_BACKEND
async def test_approval_gate(queue: TaskQueue, events: Events) -> None:
    gated = await queue.create("remediate", agent=CREATOR, requires_approval=True, priority=9)
    refused = await queue.create("remediate", agent=CREATOR, requires_approval=True)
    assert gated.approval == "required"
    assert await queue.claim(agent="w/fixer", types=["remediate"], timeout=0.3) is None

    approved = await queue.approve(gated.id, by="consensus/decider")
    assert (approved.approval, approved.approved_by) == ("approved", "consensus/decider")
    assert await queue.approve(gated.id, by="consensus/decider") == approved  # idempotent
    claim = await queue.claim(agent="w/fixer", types=["remediate"], timeout=2)
    assert claim is not None
    assert claim.task.id == gated.id
    await claim.complete()

    rejected = await queue.reject(refused.id, by="consensus/decider", reason="too risky")
    assert (rejected.status, rejected.approval) == ("failed", "rejected")
    assert "too risky" in (rejected.error or "")
    assert await queue.claim(agent="w/fixer", types=["remediate"]) is None
    with pytest.raises(InvalidTransitionError):
        await queue.approve(refused.id, by="consensus/decider")
    with pytest.raises(InvalidTransitionError):
        await queue.reject(gated.id, by="consensus/decider")
    (failed,) = await events.wait_for(1, TaskFailedMessage)
    assert failed.task_failed.task_id == refused.id  # type: ignore[attr-defined]


@ON_EVERY_BACKEND
async def test_late_completion_after_reclaim_is_refused(queue: TaskQueue) -> None:
    task = await queue.create("analyze", agent=CREATOR, timeout=0.5)
    slow = await queue.claim(agent="w/slow", types=["analyze"])
    assert slow is not None
    # No heartbeat: the claim expires and the task is offered again.
    fast = await queue.claim(agent="w/fast", types=["analyze"], timeout=5)
    assert fast is not None
    assert (fast.task.id, fast.attempt) == (task.id, 2)

    with pytest.raises(TaskClaimLostError) as lost:
        await slow.complete({"by": "slow"})
    assert (lost.value.attempt, lost.value.current_attempt) == (1, 2)
    with pytest.raises(TaskClaimLostError):
        await slow.heartbeat()
    with pytest.raises(TaskClaimLostError):
        await slow.fail("late")
    assert (await queue.get(task.id)).assigned_to == "w/fast"

    done = await fast.complete({"by": "fast"})
    assert done.result == {"by": "fast"}
    with pytest.raises(InvalidTransitionError):
        await fast.complete({"by": "fast again"})
    assert (await queue.get(task.id)).result == {"by": "fast"}


@ON_EVERY_BACKEND
async def test_heartbeat_keeps_the_claim(queue: TaskQueue) -> None:
    await queue.create("analyze", agent=CREATOR, timeout=0.6)
    claim = await queue.claim(agent="w/busy", types=["analyze"])
    assert claim is not None
    with anyio.move_on_after(1.5):
        while True:
            await claim.heartbeat()
            assert await queue.claim(agent="w/other", types=["analyze"], timeout=0.2) is None
    assert (await claim.complete()).attempts == 1


@ON_EVERY_BACKEND
async def test_timeouts_then_dead_letter(queue: TaskQueue, events: Events) -> None:
    task = await queue.create("analyze", agent=CREATOR, timeout=0.3, max_attempts=2)
    for attempt in (1, 2):
        claim = await queue.claim(agent="w/dies", types=["analyze"], timeout=5)
        assert claim is not None
        assert claim.attempt == attempt
    assert await queue.claim(agent="w/dies", types=["analyze"], timeout=1.5) is None
    dead = await queue.get(task.id)
    assert (dead.status, dead.dead, dead.attempts) == ("failed", True, 2)
    (failed,) = await events.wait_for(1, TaskFailedMessage)
    assert failed.task_failed.dead  # type: ignore[attr-defined]


@ON_EVERY_BACKEND
async def test_fail_with_retry_then_final_failure(queue: TaskQueue) -> None:
    task = await queue.create("analyze", agent=CREATOR)
    first = await queue.claim(agent="w/a", types=["analyze"])
    assert first is not None
    retried = await first.fail("flaky", retry=True)
    assert (retried.status, retried.error) == ("pending", "flaky")
    second = await queue.claim(agent="w/b", types=["analyze"], timeout=3)
    assert second is not None
    assert second.attempt == 2
    final = await second.fail("broken")
    assert (final.status, final.dead, final.error) == ("failed", False, "broken")
    assert (await queue.get(task.id)).status == "failed"


@ON_EVERY_BACKEND
async def test_bad_input_is_refused_and_changes_nothing(queue: TaskQueue) -> None:
    with pytest.raises(NotFoundError):
        await queue.get("no-such-task")
    with pytest.raises(NotFoundError):
        await queue.approve("no-such-task", by="consensus/decider")
    with pytest.raises(NotFoundError):
        await queue.get("../../etc")
    for priority in (0, 11, -3):
        with pytest.raises(InvalidTaskError, match="priority"):
            await queue.create("analyze", agent=CREATOR, priority=priority)
    with pytest.raises(InvalidTaskError, match="priority"):
        await queue.create("analyze", agent=CREATOR, priority="5")  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskError, match="parameters"):
        await queue.create("analyze", agent=CREATOR, target=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskError, match="parameters"):
        await queue.create("analyze", agent=CREATOR, context=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskError, match="parameters"):
        await queue.create("analyze", agent=CREATOR, context={"x": object()})
    with pytest.raises(InvalidTaskError, match="parameters"):
        await queue.create("analyze", agent=CREATOR, timeout=-1)
    with pytest.raises(InvalidTaskError, match="type"):
        await queue.create("bad type!", agent=CREATOR)
    with pytest.raises(InvalidIdentifierError):
        await queue.create("analyze", agent="not an agent")
    with pytest.raises(InvalidTaskError, match="status"):
        await queue.tasks("bogus")
    # A batch with one bad spec stores none of them.
    with pytest.raises(InvalidTaskError):
        await queue.create_many(
            [TaskSpec(type="analyze"), TaskSpec(type="analyze", priority=42)], agent=CREATOR
        )
    assert await queue.tasks() == []

    plain = await queue.create("analyze", agent=CREATOR)
    with pytest.raises(InvalidTransitionError):
        await queue.approve(plain.id, by="consensus/decider")
    with pytest.raises(InvalidTransitionError):
        await queue.reject(plain.id, by="consensus/decider")
    assert await queue.get(plain.id) == plain
    claim = await queue.claim(agent="w/a", types=["analyze"])
    assert claim is not None
    with pytest.raises(InvalidTaskError, match="result"):
        await claim.complete({"x": object()})
    with pytest.raises(InvalidTaskError, match="result"):
        await claim.complete("ab")  # type: ignore[arg-type]
    assert (await queue.get(plain.id)).status == "assigned"
    await claim.complete()
    for limit in (0, -1, True, "5"):
        with pytest.raises(InvalidTaskError, match="limit"):
            await queue.claim_many(agent="w/a", types=["analyze"], limit=limit)  # type: ignore[arg-type]
    for types in ("analyze", []):
        with pytest.raises(InvalidTaskError, match="types"):
            await queue.claim_many(agent="w/a", types=types, limit=1)


async def test_cli_lists_tasks_by_status(
    queue: TaskQueue,
    nats_url: str,
    session_id: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    done = await queue.create("report", agent=CREATOR)
    waiting = await queue.create("report", agent=CREATOR, requires_approval=True)
    claim = await queue.claim(agent="w/a", types=["report"])
    assert claim is not None
    await claim.complete()
    monkeypatch.setenv("NATS_URL", nats_url)
    assert (
        await anyio.to_thread.run_sync(cli_main, ["tasks", session_id, "--status", "pending"]) == 0
    )
    out = capsys.readouterr().out
    assert waiting.id in out
    assert done.id not in out
    assert "1 task(s)" in out


def test_task_record_reads_newer_records() -> None:
    """Wire-evolution rule: a record written by a newer version still decodes."""
    record = msgspec.json.encode(Task(id="t1", type="analyze", priority=4))
    newer = record.replace(b'"priority":4', b'"priority":4,"future":{"x":1}', 1).replace(
        b'"timeout":60.0', b'"timeout":60.0,"budget":3', 1
    )
    assert newer != record
    decoded = msgspec.json.decode(newer, type=Task)
    assert (decoded.id, decoded.priority, decoded.constraints.timeout) == ("t1", 4, 60.0)


async def test_unclaimed_tasks_are_listed_and_read_from_their_dispatch_messages(
    queue: TaskQueue,
) -> None:
    """Until its first claim a task is its dispatch message; listing pages through them."""
    specs = [TaskSpec(type="sweep", priority=1 + i % 10) for i in range(2500)]
    created = await queue.create_many(specs, agent=CREATOR)
    gated = await queue.create("sweep", agent=CREATOR, requires_approval=True)
    claim = await queue.claim(agent="w/a", types=["sweep"])
    assert claim is not None

    pending = await queue.tasks("pending")
    assert len(pending) == 2500  # 2,499 dispatch messages and the gated record
    assert {t.id for t in pending} == {t.id for t in created} - {claim.task.id} | {gated.id}
    assert [t.id for t in await queue.tasks("assigned")] == [claim.task.id]
    some = created[1234]
    if some.id != claim.task.id:
        assert await queue.get(some.id) == some
    assert (await queue.get(claim.task.id)).status == "assigned"


async def test_a_first_claim_whose_ack_was_lost_is_settled(queue: TaskQueue) -> None:
    """A first claim (a create-once write of the record: none before it) with no ack:
    written now, found written, or lost to another."""
    from swarmbus import _subjects
    from swarmbus._tasks import EXPECTED_LAST_HEADER, TASKS_BUCKET, _claimed

    async def settle(task: Task, agent: str, revision: int) -> int | Exception | None:
        mine = _claimed(task, agent)
        subject = _subjects.kv_subject(TASKS_BUCKET, f"{queue.session}.{task.id}")
        data = msgspec.json.encode(mine)
        headers = {EXPECTED_LAST_HEADER: str(revision)}
        return await queue._settle_unknown(mine, revision, subject, data, headers)

    never_sent = await queue.create("probe", agent=CREATOR)
    _, created = await queue._read(never_sent.id)
    assert created == 0  # the first claim creates the record
    assert await queue._record_of(never_sent.id) is None
    revision = await settle(never_sent, "w/a", created)
    assert isinstance(revision, int)
    assert (await queue.get(never_sent.id)).assigned_to == "w/a"
    assert await settle(never_sent, "w/b", created) is None  # someone else's claim is there

    landed = await queue.create("probe", agent=CREATOR)
    _, landed_at = await queue._read(landed.id)
    # (the first task's dispatch message is delayed: its lease, written above, holds)
    claim = await queue.claim(agent="w/a", types=["probe"], timeout=5)
    assert claim is not None
    assert claim.task.id == landed.id
    stored = await queue.get(landed.id)
    subject = f"$KV.swarmbus-tasks.{queue.session}.{landed.id}"
    headers = {EXPECTED_LAST_HEADER: str(landed_at)}
    again = await queue._settle_unknown(
        stored, landed_at, subject, msgspec.json.encode(stored), headers
    )
    assert again == claim.revision  # our bytes are there: the write had landed


async def test_prune_removes_finished_records_once_no_dispatch_is_left(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = await queue.create("report", agent=CREATOR)
    lost_ack = await queue.create("report", agent=CREATOR)
    claims = {}
    for _ in range(2):
        claim = await queue.claim(agent="w/a", types=["report"], timeout=5)
        assert claim is not None
        claims[claim.task.id] = claim
    waiting = await queue.create("report", agent=CREATOR)
    await claims[done.id].complete()
    dispatch = claims[lost_ack.id]._msg

    async def lost() -> None:  # the dispatch message's ack never reaches the server
        pass

    monkeypatch.setattr(dispatch, "ack", lost)
    await claims[lost_ack.id].complete()

    assert await queue.prune(older_than=3600) == []  # finished too recently
    assert await queue.prune(older_than=0) == [done.id]  # lost_ack's dispatch is still there
    with pytest.raises(NotFoundError):
        await queue.get(done.id)
    assert (await queue.get(lost_ack.id)).status == "completed"
    assert (await queue.get(waiting.id)).status == "pending"

    await dispatch.ack_sync()  # a claimer settles the redelivered message at last
    assert await queue.prune(older_than=0) == [lost_ack.id]
    assert [t.id for t in await queue.tasks()] == [waiting.id]
    for bad in (-1, True, "1h", float("nan")):
        with pytest.raises(InvalidTaskError):
            await queue.prune(older_than=bad)  # type: ignore[arg-type]


async def test_a_dispatch_removed_before_any_claim_is_offered_again_from_its_copy(
    queue: TaskQueue, bus: Bus
) -> None:
    """No record before the first claim: the creation copy is what ``get`` and the
    sweep (``offer_lost``) find once the dispatch message is gone (as after another
    agent's TERM or ACK); never while its record key has an entry, a pruned one too."""
    from swarmbus._jetstream.workqueue import purge_key
    from swarmbus._tasks.queue import offer_lost

    async def erase(task_id: str) -> None:
        subject = f"swarmbus.task.{queue.session}.*.*.{task_id}"
        await bus.js.purge_stream(TASKS_STREAM, subject=subject)
        assert await queue._dispatched(task_id) is None

    lost = await queue.create("report", agent=CREATOR)
    await erase(lost.id)
    assert await queue._record_of(lost.id) is None
    assert await queue.get(lost.id) == lost  # the copy
    assert [t.id for t in await queue.tasks(status="pending")] == [lost.id]
    assert await offer_lost(queue, grace=3600) == []  # too recent: may be on its way
    assert await offer_lost(queue, grace=0) == [lost.id]
    assert await offer_lost(queue, grace=0) == []  # offered: its dispatch is there
    claim = await queue.claim(agent="w/a", types=["report"], timeout=5)
    assert claim is not None
    assert claim.task.id == lost.id
    assert claim.attempt == 1
    await claim.complete({"ok": True})
    assert await offer_lost(queue, grace=0) == []  # the record decides: completed

    marked = await queue.create("report", agent=CREATOR)
    await erase(marked.id)
    await purge_key(queue.kv, f"{queue.session}.{marked.id}", "test")  # a marker only
    assert await offer_lost(queue, grace=0) == []
    assert await queue.prune(older_than=0) == [lost.id]
    with pytest.raises(NotFoundError):
        await queue.get(lost.id)
    assert lost.id not in {t.id for t in await queue.tasks()}  # its copy went too


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_a_store_session_pruned_empty_leaves_no_wake_key(
    queue: TaskQueue, session_id: str
) -> None:
    """On Redis/PostgreSQL each session has a wake key: pruning its last task removes it."""
    store: Any = queue
    task = await queue.create("report", agent=CREATOR)
    assert await store.wakes.get(session_id) is not None
    claim = await queue.claim(agent="w/a", types=["report"], timeout=5)
    assert claim is not None
    assert claim.task.id == task.id
    await claim.complete()
    assert await queue.prune(older_than=0) == [task.id]
    assert await store.wakes.get(session_id) is None
    again = await queue.create("report", agent=CREATOR)  # the session goes on
    claim = await queue.claim(agent="w/a", types=["report"], timeout=5)
    assert claim is not None
    assert claim.task.id == again.id


async def test_cli_prunes_finished_tasks(
    queue: TaskQueue,
    nats_url: str,
    session_id: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    done = await queue.create("report", agent=CREATOR)
    waiting = await queue.create("report", agent=CREATOR, requires_approval=True)
    claim = await queue.claim(agent="w/a", types=["report"])
    assert claim is not None
    assert claim.task.id == done.id
    await claim.complete()
    monkeypatch.setenv("NATS_URL", nats_url)
    argv = ["tasks", session_id, "--prune-older-than", "1ms"]
    assert await anyio.to_thread.run_sync(cli_main, argv) == 0
    assert f"pruned 1 finished task(s) of {session_id}" in capsys.readouterr().out
    assert [t.id for t in await queue.tasks()] == [waiting.id]
    with pytest.raises(SystemExit) as bad:
        cli_main(["tasks", session_id, "--prune-older-than", "soon"])
    assert bad.value.code == 2
    assert "invalid duration" in capsys.readouterr().err


async def test_a_claim_cancelled_while_its_write_is_in_flight_is_given_back(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await queue.create_many(
        [TaskSpec(type="probe"), TaskSpec(type="probe")], agent=CREATOR
    )
    collect = queue._acks.collect
    scope = anyio.CancelScope()

    async def cancel_then_collect(futures: Any) -> Any:
        if futures:
            scope.cancel()  # the caller gives up while the claims' writes are in flight
        return await collect(futures)

    monkeypatch.setattr(queue._acks, "collect", cancel_then_collect)
    with scope:  # the scan goes on to "other" after the writes: there it is cancelled
        await queue.claim_many(agent="w/a", types=["probe", "other"], limit=5, timeout=5)
    assert scope.cancelled_caught
    monkeypatch.undo()
    # Offered again at once (not after the 60 s lease), the attempt not used up.
    claims = await queue.claim_many(agent="w/b", types=["probe"], limit=2, timeout=5)
    while len(claims) < 2:
        more = await queue.claim(agent="w/b", types=["probe"], timeout=5)
        assert more is not None
        claims.append(more)
    assert sorted(c.task.id for c in claims) == sorted(t.id for t in created)
    assert [c.attempt for c in claims] == [1, 1]
    assert all(c.task.assigned_to == "w/b" for c in claims)


@pytest.mark.parametrize("bad", [2.5, True, "3"])
async def test_max_attempts_that_is_not_an_int_is_refused(
    queue: TaskQueue, bus: Bus, session_id: str, bad: Any
) -> None:
    # Stored as is, such a task could not be decoded by a claimer, which dropped it.
    with pytest.raises(InvalidTaskError, match="max_attempts"):
        await queue.create("probe", agent=CREATOR, max_attempts=bad)
    with pytest.raises(InvalidTaskError, match="max_attempts"):
        TaskQueue(bus, session_id, max_attempts=bad)
    assert await queue.tasks() == []


async def test_a_stale_dispatch_copy_settled_after_prune_does_not_run_the_task_again(
    queue: TaskQueue, bus: Bus, session_id: str
) -> None:
    task = await queue.create("probe", agent=CREATOR)
    # This claimer pulls the dispatch message, then stalls before settling it.
    (held,) = await (await queue._claimer.puller("probe", 5)).pull(1)
    async with TaskQueue(bus, session_id, ack_wait=0.5) as other:
        claim = await other.claim(agent="w/b", types=["probe"], timeout=5)  # the redelivery
        assert claim is not None
        assert claim.task.id == task.id
        await claim.complete()
        assert await other.prune(older_than=0) == [task.id]
    assert await queue._claimer.settle_all([held], "w/a") == []
    with pytest.raises(NotFoundError):
        await queue.get(task.id)


@ON_EVERY_BACKEND
async def test_work_fails_a_task_whose_handler_returns_a_bad_result_and_goes_on(
    queue: TaskQueue,
) -> None:
    bad = await queue.create("probe", agent=CREATOR, max_attempts=1)
    good = await queue.create("probe", agent=CREATOR)
    stop = anyio.Event()
    seen: set[str] = set()

    async def handler(task: Task) -> dict[str, Any]:
        seen.add(task.id)
        if len(seen) == 2:
            stop.set()  # work() still settles the claimed tasks
        return {"x": object()} if task.id == bad.id else {"ok": True}

    with anyio.fail_after(10):
        await queue.work(handler, agent="w/a", types=["probe"], stop=stop)
    failed = await queue.get(bad.id)
    assert failed.error is not None
    assert "result" in failed.error
    assert (await queue.get(good.id)).result == {"ok": True}


@ON_EVERY_BACKEND
async def test_late_completion_after_the_record_was_pruned_is_a_lost_claim(
    queue: TaskQueue,
) -> None:
    task = await queue.create("analyze", agent=CREATOR, timeout=0.5)
    slow = await queue.claim(agent="w/slow", types=["analyze"])
    assert slow is not None
    fast = await queue.claim(agent="w/fast", types=["analyze"], timeout=5)
    assert fast is not None
    await fast.complete()
    assert await queue.prune(older_than=0) == [task.id]
    with pytest.raises(TaskClaimLostError) as lost:
        await slow.complete({"by": "slow"})
    assert lost.value.attempt == 1
    with pytest.raises(NotFoundError):
        await queue.get(task.id)


async def test_a_transition_cancelled_as_it_writes_is_followed_by_the_claim(
    queue: TaskQueue, events: Events
) -> None:
    task = await queue.create("probe", agent=CREATOR)
    claim = await queue.claim(agent="w/a", types=["probe"], timeout=5)
    assert claim is not None
    with anyio.CancelScope() as scope:
        scope.cancel()  # delivered at the first checkpoint, as the write starts
        await claim.heartbeat()
    assert (await queue.get(task.id)).status == claim.task.status == "running"
    with anyio.CancelScope() as scope:
        scope.cancel()
        await claim.complete({"ok": True})  # the claim followed its heartbeat: not lost
    assert (await queue.get(task.id)).status == "completed"
    assert claim.finished
    (done,) = await events.wait_for(1, TaskCompletedMessage)
    assert done.body.task_id == task.id  # type: ignore[attr-defined]


async def test_an_approval_cancelled_while_it_writes_still_offers_the_task(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    gated = await queue.create("deploy", agent=CREATOR, requires_approval=True)
    collect = queue._acks.collect
    scope = anyio.CancelScope()

    async def cancel_then_collect(futures: Any) -> Any:
        if futures:
            scope.cancel()  # the caller gives up while the approval is being written
        return await collect(futures)

    redispatch = queue._redispatch

    async def slow_redispatch(task: Task, revision: int) -> None:
        await anyio.lowlevel.checkpoint()  # a publish may wait (a full buffer, a reconnect)
        await redispatch(task, revision)

    monkeypatch.setattr(queue._acks, "collect", cancel_then_collect)
    monkeypatch.setattr(queue, "_redispatch", slow_redispatch)
    with scope:
        await queue.approve(gated.id, by="consensus/decider")
    monkeypatch.undo()
    assert (await queue.get(gated.id)).approval == "approved"
    claim = await queue.claim(agent="w/a", types=["deploy"], timeout=5)
    assert claim is not None
    assert claim.task.id == gated.id


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_a_store_claim_cancelled_while_its_writes_are_in_flight_is_given_back(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await queue.create_many(
        [TaskSpec(type="probe"), TaskSpec(type="probe")], agent=CREATOR
    )
    cas = queue._cas
    scope = anyio.CancelScope()

    async def cas_then_cancel(task: Task, revision: int) -> int | None:
        written = await cas(task, revision)
        scope.cancel()  # the caller gives up while the claims' writes are in flight
        return written

    events = queue._events

    async def checkpoint_then_publish(items: Any) -> None:
        await anyio.lowlevel.checkpoint()  # where the cancellation lands: claims won
        await events(items)

    monkeypatch.setattr(queue, "_cas", cas_then_cancel)
    monkeypatch.setattr(queue, "_events", checkpoint_then_publish)
    with scope:
        await queue.claim_many(agent="w/a", types=["probe"], limit=5, timeout=5)
    assert scope.cancelled_caught
    monkeypatch.undo()
    # Claimable again at once (not after the 60 s lease), the attempt not used up.
    claims = await queue.claim_many(agent="w/b", types=["probe"], limit=2, timeout=5)
    assert sorted(c.task.id for c in claims) == sorted(t.id for t in created)
    assert [c.attempt for c in claims] == [1, 1]


class CountingStore:
    """A ``StateStore`` that counts the entries read through it (lists and gets)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def list(self, prefix: str = "") -> Any:
        entries = await self.store.list(prefix)
        self.read += len(entries)
        return entries

    async def get(self, key: str, *, fresh: bool = False) -> Any:
        self.read += 1
        return await self.store.get(key, fresh=fresh)

    async def get_many(self, keys: list[str]) -> Any:
        self.read += len(keys)
        return await get_many(self.store, keys)

    @property
    def lists_open(self) -> bool:
        return lists_open(self.store)

    async def open_records(self, session: str, types: list[str]) -> Any:
        entries = await open_records(self.store, session, types)
        self.read += len(entries)
        return entries


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_a_store_claim_does_not_read_the_sessions_finished_tasks(
    queue: TaskQueue, session_id: str
) -> None:
    async def complete(claim: Any) -> None:
        await claim.complete({})

    finished = await queue.create_many([TaskSpec(type="probe") for _ in range(1000)], agent=CREATOR)
    for _ in range(10):
        claims = await queue.claim_many(agent="w/a", types=["probe"], limit=100, timeout=5)
        assert len(claims) == 100
        async with anyio.create_task_group() as tg:
            for claim in claims:
                tg.start_soon(complete, claim)
    assert len(await queue.tasks("completed")) == len(finished)

    store: Any = queue
    records = store._record_store = CountingStore(store._record_store)
    index = None if store._open_store is None else CountingStore(store._open_store)
    store._open_store = index
    late = await queue.create("probe", agent=CREATOR)
    other = await queue.create("other", agent=CREATOR)
    claim = await queue.claim(agent="w/a", types=["probe"])
    assert claim is not None
    assert claim.task.id == late.id
    # Nothing of the 1,000 finished tasks is read: on Redis the open-task index (2 keys),
    # then the one record of type "probe"; on PostgreSQL that record from agent_tasks.
    if index is not None:
        assert (index.read, records.read) == (2, 1)
    else:
        assert records.read == 1
    await claim.complete({})
    still_open = (
        [e.key for e in await index.list(f"{session_id}.")]
        if index is not None
        else [e.key for e in await open_records(records.store, session_id, ["other", "probe"])]
    )
    assert still_open == [f"{session_id}.{other.id}"]


# --- queue consumers expire when idle (issue 17) -------------------------------------

IDLE = 1.0
"""task_consumer_inactive_threshold in these tests (seconds)."""


def _durables(session: str, type: str) -> set[str]:
    return {
        str(queue_consumer(session, type, p, DEFAULT_ACK_WAIT).durable_name)
        for p in range(MIN_PRIORITY, MAX_PRIORITY + 1)
    }


async def _existing(bus: Bus, durables: set[str]) -> set[str]:
    found = set()
    for durable in durables:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await bus.js.consumer_info(TASKS_STREAM, durable)
            found.add(durable)
    return found


async def _until_existing(bus: Bus, durables: set[str], existing: set[str]) -> None:
    """Wait until exactly ``existing`` of ``durables`` exist (polled: under the deploy
    config no user may subscribe to JetStream advisories, so there is no event)."""
    with anyio.fail_after(IDLE + 10):
        while await _existing(bus, durables) != existing:  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def _claim_and_complete(queue: TaskQueue, agent: str, within: float) -> str:
    created = await queue.create("investigate", agent=agent)
    with anyio.fail_after(within):  # not a pull timeout (5 s) per expired consumer
        claim = await queue.claim(agent=agent, types=["investigate"], timeout=within)
    assert claim is not None
    assert claim.task.id == created.id
    assert (await claim.complete({"ok": True})).status == "completed"
    return created.id


@pytest.mark.parametrize("provisioner", [False, True], ids=["claimer-creates", "service"])
async def test_idle_queue_consumers_expire_and_later_tasks_are_still_claimed(
    nats_url: str, session_id: str, provisioner: bool
) -> None:
    durables = _durables(session_id, "investigate")
    async with (
        Bus.open(url=nats_url, task_consumer_inactive_threshold=IDLE) as bus,
        provisioning(bus) if provisioner else contextlib.nullcontext(),
        TaskQueue(bus, session_id) as queue,
    ):
        deleted: set[str] = set()
        all_gone = anyio.Event()

        async def on_deleted(msg: Any) -> None:
            deleted.add(msg.subject.rsplit(".", 1)[-1])
            if durables <= deleted:
                all_gone.set()

        advisories = f"$JS.EVENT.ADVISORY.CONSUMER.DELETED.{TASKS_STREAM}.*"
        sub = await bus.nc.subscribe(advisories, cb=on_deleted)
        try:
            await _claim_and_complete(queue, CREATOR, 5)
            assert await _existing(bus, durables) == durables  # one per priority
            info = await bus.js.consumer_info(TASKS_STREAM, next(iter(durables)))
            assert info.config.inactive_threshold == IDLE
            # idle: each consumer is deleted by the server, with or without the service
            with anyio.fail_after(IDLE + 10):
                await all_gone.wait()
            assert not await _existing(bus, durables)
            # the claimer's pull sees "no responders" and makes or finds it again at once
            await _claim_and_complete(queue, CREATOR, 2)
            await _claim_and_complete(queue, CREATOR, 2)  # and keeps it while in use
        finally:
            await sub.unsubscribe()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(
        tmp_path_factory.mktemp("tasks-auth"),
        config_file=DEPLOY / "single.conf",
        extra_args=["--http_port", "-1"],
    )
    start_with_passwords(server)
    try:
        yield server
    finally:
        server.stop()


def _as(server: NatsServer, user: str, **settings: Any) -> Any:
    return Bus.open(
        url=server.url, user=user, password=PASSWORDS[user], inbox_prefix=INBOX[user], **settings
    )


async def test_under_auth_the_service_remakes_expired_queue_consumers(
    auth_server: NatsServer, session_id: str
) -> None:
    """Agents may not create queue consumers: the service makes one again on the next
    dispatch after it expired, and its sweep makes one that was deleted after the
    service saw it exist (a pending task never waits for its queue's next dispatch)."""
    durable = str(queue_consumer(session_id, "investigate", 5, DEFAULT_ACK_WAIT).durable_name)
    async with (
        _as(auth_server, SERVICE, task_consumer_inactive_threshold=IDLE) as service,
        provisioning(service),
        _as(auth_server, LEAD) as agent,
        TaskQueue(agent, session_id) as queue,
    ):
        await _claim_and_complete(queue, LEAD, 5)
        await _until_existing(service, {durable}, set())
        await _claim_and_complete(queue, LEAD, 3)
        # deleted right after the service checked it: the sweep makes it again
        created = await queue.create("investigate", agent=LEAD)
        await _until_existing(service, {durable}, {durable})
        await service.js.delete_consumer(TASKS_STREAM, durable)
        with anyio.fail_after(5):
            claim = await queue.claim(agent=LEAD, types=["investigate"], timeout=5)
        assert claim is not None
        assert claim.task.id == created.id
        await claim.complete({"ok": True})


class ReadsOf:
    """Wraps ``queue._read``: ``done`` is set once a read of ``task_id`` returned."""

    def __init__(self, queue: TaskQueue, task_id: str) -> None:
        self.done = anyio.Event()
        self._read = queue._read
        self._task_id = task_id

    async def __call__(self, task_id: str) -> tuple[Task, int]:
        found = await self._read(task_id)
        if task_id == self._task_id:
            self.done.set()
        return found


@ON_EVERY_BACKEND
async def test_wait_returns_the_final_record_a_retry_is_not_final(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = await queue.create("analyze", agent=CREATOR)
    reads = ReadsOf(queue, task.id)
    monkeypatch.setattr(queue, "_read", reads)
    finals: list[Task] = []

    async def waiter() -> None:
        finals.append(await queue.wait(task.id))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await reads.done.wait()  # the waiter read the record: the rest is the watch's
            first = await queue.claim(agent="w/a", types=["analyze"])
            assert first is not None
            assert (await first.fail("flaky", retry=True)).status == "pending"
            second = await queue.claim(agent="w/b", types=["analyze"], timeout=5)
            assert second is not None
            done = await second.complete({"ok": True})
    assert finals == [done]
    assert (done.status, done.attempts) == ("completed", 2)
    with anyio.fail_after(5):  # finished already: the read answers
        assert await queue.wait(task.id) == done


@ON_EVERY_BACKEND
async def test_wait_returns_a_failed_record_and_refuses_unknown_tasks(queue: TaskQueue) -> None:
    task = await queue.create("analyze", agent=CREATOR, max_attempts=1)
    claim = await queue.claim(agent="w/a", types=["analyze"])
    assert claim is not None
    failed = await claim.fail("broken")
    with anyio.fail_after(5):
        assert await queue.wait(task.id) == failed
        with pytest.raises(NotFoundError):
            await queue.wait("no-such-task")


async def test_wait_watches_with_one_consumer_per_queue_deleted_at_close(
    bus: Bus, session_id: str
) -> None:
    async def watch_consumers() -> int:
        return (await bus.js.stream_info("KV_swarmbus-tasks")).state.consumer_count

    async with TaskQueue(bus, session_id) as creator:
        before = await watch_consumers()
        tasks = await creator.create_many([TaskSpec(type="probe")] * 3, agent=CREATOR)
        stop = anyio.Event()

        async def handler(task: Task) -> dict[str, Any]:
            return {"id": task.id}

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg, TaskQueue(bus, session_id) as worker:
                tg.start_soon(lambda: worker.work(handler, agent="w/a", types=["probe"], stop=stop))
                finals = [await creator.wait(t.id) for t in tasks]
                stop.set()
        assert [f.result for f in finals] == [{"id": t.id} for t in tasks]
        assert await watch_consumers() == before + 1
    assert await watch_consumers() == before


async def test_wait_for_tasks_created_while_the_watch_runs_needs_no_read(
    bus: Bus, session_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with TaskQueue(bus, session_id) as creator, TaskQueue(bus, session_id) as worker:
        first = await creator.create("probe", agent=CREATOR)
        stop = anyio.Event()
        handled = anyio.Event()

        async def handler(task: Task) -> dict[str, Any]:
            if task.id != first.id:
                handled.set()
            return {"id": task.id}

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: worker.work(handler, agent="w/a", types=["probe"], stop=stop))
                await creator.wait(first.id)  # starts the watch (and reads)
                later = await creator.create_many([TaskSpec(type="probe")] * 2, agent=CREATOR)
                read = creator._read

                async def no_read(task_id: str) -> tuple[Task, int]:
                    assert task_id not in {t.id for t in later}, "the watch saw it all"
                    return await read(task_id)

                monkeypatch.setattr(creator, "_read", no_read)
                await handled.wait()
                last = await creator.wait(later[1].id)
                assert (await creator.wait(later[0].id)).result == {"id": later[0].id}
                stop.set()
        assert last.result == {"id": later[1].id}


async def test_wait_pending_when_its_queue_closes_raises(bus: Bus, session_id: str) -> None:
    queue = TaskQueue(bus, session_id)
    await queue.open()
    task = await queue.create("probe", agent="ops/coordinator")

    async def waits() -> None:
        with pytest.raises(SwarmbusError, match="closed"):
            await queue.wait(task.id)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waits)
            await anyio.wait_all_tasks_blocked()
            await queue.close()
