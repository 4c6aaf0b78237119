"""Hostile input on a real nats-server (issue 19): one bad item never stops or stalls a worker.

Each test reproduces a defect found by publishing as an ordinary agent: a malformed
header, a garbage KV value, an id that is not a key. The bad item must be refused with
its reason (dead-lettered once), and good work around it must go on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg

from swarmbus import (
    Blackboard,
    Bus,
    Consensus,
    ConsensusService,
    InvalidMessageError,
    Lock,
    LockLostError,
    NatsServer,
    Proposal,
    Task,
    TaskQueue,
    Vote,
    held_locks,
    lock_holder,
)
from swarmbus import _subjects as subjects
from swarmbus._bus import DEAD_LETTER_STREAM
from swarmbus._jetstream.headers import CODE as CODE_HEADER
from swarmbus._jetstream.headers import ORIGINAL_SUBJECT as ORIGINAL_SUBJECT_HEADER
from swarmbus._jetstream.headers import REASON as REASON_HEADER
from swarmbus._jetstream.headers import TASK_REVISION as REVISION_HEADER
from swarmbus._jetstream.reads import stored_messages
from swarmbus._locks import LOCKS_BUCKET
from swarmbus._query_ledger import QUERIES_BUCKET, QueryLedger, query_key
from swarmbus._tasks import TASKS_BUCKET, TASKS_STREAM

CREATOR = "ops/coordinator"
TYPE = "investigate"


@pytest.fixture
async def queue(fresh_server: NatsServer, session_id: str) -> AsyncIterator[TaskQueue]:
    """A queue on a server of its own: each queue's ten durable consumers live a day, and
    a stream takes at most 1,000 (the shared server's is for the rest of the suite)."""
    async with Bus.open(url=fresh_server.url) as bus, TaskQueue(bus, session_id, ack_wait=0.5) as q:
        yield q


def _task_bytes(session: str, task_id: str, **fields: Any) -> bytes:
    return msgspec.json.encode(
        Task(id=task_id, type=TYPE, session=session, created_by=CREATOR, **fields)
    )


async def _dead_letters(bus: Bus, session: str) -> list[Msg]:
    """Every dead letter of ``session`` (an ephemeral consumer: no direct gets there)."""
    sub = await bus.js.pull_subscribe(f"swarmbus.dead.{session}.>", stream=DEAD_LETTER_STREAM)
    try:
        pending = (await sub.consumer_info()).num_pending
        msgs: list[Msg] = []
        while len(msgs) < pending:
            msgs += await sub.fetch(pending - len(msgs), timeout=5)
        return msgs
    finally:
        await sub.unsubscribe()


async def _pending_dispatches(bus: Bus, session: str) -> list[Msg]:
    return await stored_messages(bus.js, TASKS_STREAM, f"swarmbus.task.{session}.>")


class Workers:
    """``n`` workers on ``queue`` in a task group: good tasks' completions, and any exit."""

    def __init__(self, queue: TaskQueue, n: int = 2) -> None:
        self.queue = queue
        self.n = n
        self.done: dict[str, anyio.Event] = {}
        self.stop = anyio.Event()
        self.exited: list[str] = []

    async def handler(self, task: Task) -> dict[str, Any]:
        self.done.setdefault(task.id, anyio.Event()).set()
        return {"ok": True}

    async def run(self, i: int) -> None:
        try:
            await self.queue.work(self.handler, agent=f"w/{i}", types=[TYPE], stop=self.stop)
        finally:
            if not self.stop.is_set():
                self.exited.append(f"w/{i}")

    async def completed(self, task_id: str, timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            await self.done.setdefault(task_id, anyio.Event()).wait()


class DeadLetters:
    """Dead letters of a session as they are stored (a live subscription: an event each)."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = anyio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.count += 1
        self.changed.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            while self.count < count:
                self.changed = anyio.Event()
                await self.changed.wait()


@pytest.fixture
async def dead(queue: TaskQueue, session_id: str) -> AsyncIterator[DeadLetters]:
    bus = queue.bus
    seen = DeadLetters()
    sub = await bus.nc.subscribe(f"swarmbus.dead.{session_id}.>", cb=seen.on_msg)
    yield seen
    await sub.unsubscribe()


async def _drained(bus: Bus, session: str) -> bool:
    """Whether no dispatch message of ``session`` is left (terminations processed first)."""
    await bus.nc.flush()  # the workers' acks and terminations went out on this connection
    return not await _pending_dispatches(bus, session)


async def test_a_non_numeric_revision_header_is_dead_lettered_and_workers_go_on(
    queue: TaskQueue, session_id: str, dead: DeadLetters
) -> None:
    """Defect 1: ``Swarmbus-Task-Revision: abc`` killed every worker that claimed it."""
    bus = queue.bus
    bad_subject = f"swarmbus.task.{session_id}.{TYPE}.5.poison1"
    data = _task_bytes(session_id, "poison1")
    workers = Workers(queue)
    async with anyio.create_task_group() as tg:
        for i in range(workers.n):
            tg.start_soon(workers.run, i)
        await bus.js.publish(bad_subject, data, headers={REVISION_HEADER: "abc"})
        good = await queue.create(TYPE, agent=CREATOR)
        await workers.completed(good.id)
        await dead.wait_for(1)
        workers.stop.set()
    assert workers.exited == []
    assert await _drained(bus, session_id)
    (letter,) = await _dead_letters(bus, session_id)
    assert letter.data == data
    assert letter.headers is not None
    assert letter.headers[CODE_HEADER] == "bad_header"
    assert REVISION_HEADER in letter.headers[REASON_HEADER]
    assert letter.headers[ORIGINAL_SUBJECT_HEADER] == bad_subject
    assert await queue.claim(agent="w/x", types=[TYPE]) is None


async def test_a_garbage_task_record_never_kills_a_worker_nor_a_listing(
    queue: TaskQueue, session_id: str, dead: DeadLetters
) -> None:
    """Defect 2: garbage on the record key, then a dispatch: work() died, tasks() raised."""
    bus = queue.bus
    await bus.js.publish(f"$KV.{TASKS_BUCKET}.{session_id}.broken", b"\x00garbage{")
    await bus.js.publish(f"$KV.{TASKS_BUCKET}.{session_id}.wrongtype", b'{"id": 5}')
    subject = f"swarmbus.task.{session_id}.{TYPE}.5.broken"
    await bus.js.publish(subject, _task_bytes(session_id, "broken"))
    good = await queue.create(TYPE, agent=CREATOR)
    for _ in range(2):  # and again after a restart
        workers = Workers(queue)
        async with anyio.create_task_group() as tg:
            for i in range(workers.n):
                tg.start_soon(workers.run, i)
            await workers.completed(good.id)
            await dead.wait_for(1)
            workers.stop.set()
        assert workers.exited == []
        assert await _drained(bus, session_id)
        good = await queue.create(TYPE, agent=CREATOR)
    listed = await queue.tasks()
    assert {t.id for t in listed} >= {good.id}
    assert "broken" not in {t.id for t in listed}
    with pytest.raises(InvalidMessageError) as refused:
        await queue.get("broken")
    assert refused.value.code == "not_json"
    (letter,) = await _dead_letters(bus, session_id)
    assert letter.headers is not None
    assert letter.headers[CODE_HEADER] == "not_json"
    assert "broken" in letter.headers[REASON_HEADER]


BAD_IDS = ["ü", "*", ">", "", "..", "$KV", "a\tb", "a.b", "x" * 129]


async def test_dispatches_with_invalid_ids_end_once_and_the_batch_proceeds(
    queue: TaskQueue, session_id: str, dead: DeadLetters
) -> None:
    """Defect 3: ids that are not KV keys were put back forever and failed whole batches."""
    bus = queue.bus
    goods: list[Task] = []
    for i, bad in enumerate(BAD_IDS):
        # The subject's last token as valid as it can be; the id the task carries is bad.
        token = bad if bad in ("ü", "$KV") else f"bad{i}"
        await bus.js.publish(
            f"swarmbus.task.{session_id}.{TYPE}.5.{token}", _task_bytes(session_id, bad)
        )
        goods.append(await queue.create(TYPE, agent=CREATOR))
    workers = Workers(queue)
    async with anyio.create_task_group() as tg:
        for i in range(workers.n):
            tg.start_soon(workers.run, i)
        for good in goods:
            await workers.completed(good.id)
        await dead.wait_for(len(BAD_IDS))
        workers.stop.set()
    assert workers.exited == []
    assert await _drained(bus, session_id)
    letters = await _dead_letters(bus, session_id)
    assert len(letters) == len(BAD_IDS)  # once each, with the reason
    for msg in letters:
        assert msg.headers is not None
        assert msg.headers[CODE_HEADER] == "bad_id"
    assert sorted(msg.data for msg in letters) == sorted(
        _task_bytes(session_id, bad) for bad in BAD_IDS
    )


async def test_a_dispatch_whose_body_contradicts_its_subject_is_refused(
    queue: TaskQueue, session_id: str, unique: str, dead: DeadLetters
) -> None:
    """A dispatch for another session's key (spoofed session or id) never writes there."""
    bus = queue.bus
    other = f"O-{unique}"
    await bus.js.publish(f"swarmbus.task.{session_id}.{TYPE}.5.t1", _task_bytes(other, "t1"))
    await bus.js.publish(f"swarmbus.task.{session_id}.{TYPE}.5.t2", _task_bytes(session_id, "t3"))
    claim = await queue.claim(agent="w/1", types=[TYPE])
    assert claim is None
    await dead.wait_for(2)
    codes = sorted(
        (m.headers or {}).get(CODE_HEADER, "") for m in await _dead_letters(bus, session_id)
    )
    assert codes == ["wrong_subject", "wrong_subject"]
    assert await _drained(bus, session_id)


# --- locks (defect 4) -------------------------------------------------------------------


async def test_a_garbage_lock_value_is_taken_over_with_a_higher_token_and_reported(
    bus: Bus, unique: str
) -> None:
    """Defect 4: garbage (no TTL) on a lock key made the lock impossible to acquire and
    ``lock_holder`` raise. A broken record names no holder: it is taken over by a
    compare-and-set on its revision, so the new token still fences the old holder."""
    resource, owner = f"file:/{unique}", f"a/{unique}"
    victim = Lock(bus, resource, f"b/{unique}", ttl=30)
    held = await victim.acquire()
    assert held is not None
    ack = await bus.js.publish(
        subjects.kv_subject(LOCKS_BUCKET, subjects.lock_key(resource)), b"\x00garbage"
    )
    assert await lock_holder(bus, resource) is None
    reports = DeadLetters()
    sub = await bus.nc.subscribe(f"swarmbus.dead.*.{owner}", cb=reports.on_msg)
    try:
        lease = await Lock(bus, resource, owner, ttl=30).acquire(timeout=0)
        assert lease is not None
        assert lease.token > ack.seq > held.token
        await reports.wait_for(1)
    finally:
        await sub.unsubscribe()
    holder = await lock_holder(bus, resource)
    assert holder is not None
    assert (holder.owner, holder.token) == (owner, lease.token)
    with pytest.raises(LockLostError):  # the overwritten holder is fenced off
        await victim.refresh()


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"{",
        b'{"owner": 5, "ttl": "x"}',
        b'{"owner": "x/y", "ttl": -5}',
        b"[" * 5000,
        b'{"owner": "x/y", "ttl": 30}',  # a record without a TTL header: never expires
    ],
)
async def test_a_waiter_takes_over_a_lock_whose_record_turns_to_garbage(
    bus: Bus, unique: str, value: bytes
) -> None:
    resource = f"job-{unique}"
    victim = Lock(bus, resource, f"b/{unique}", ttl=30)
    held = await victim.acquire()
    assert held is not None
    waiter = Lock(bus, resource, f"a/{unique}", ttl=30)
    async with anyio.create_task_group() as tg:
        got: list[Any] = []

        async def wait() -> None:
            got.append(await waiter.acquire(timeout=5))

        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        await bus.js.publish(subjects.kv_subject(LOCKS_BUCKET, subjects.lock_key(resource)), value)
    (lease,) = got
    assert lease is not None
    assert lease.token > held.token
    assert [h.owner for h in await held_locks(bus) if h.resource == resource] == [waiter.owner]
    await waiter.release()


# --- the consensus, blackboard and query-ledger decode paths ------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
"""JSON nested past msgspec's depth limit: decoding it raises RecursionError, not
msgspec.DecodeError, wherever the type has a free-form (``Any``) field."""


async def test_a_deeply_nested_proposal_record_does_not_stop_the_consensus_service(
    bus: Bus, unique: str, session_id: str
) -> None:
    bucket = f"CONS_{unique}"
    consensus = await Consensus.open(bus, bucket=bucket)
    record = (
        b'{"proposal_id": "deep", "proposal": {"proposal_id": "deep", "action": "a", '
        b'"parameters": {"a": ' + DEEP + b"}}}"
    )
    with anyio.fail_after(10):
        async with ConsensusService(bus, bucket=bucket, session=session_id, board_bucket=None):
            await bus.js.publish(subjects.kv_subject(bucket, "p.deep"), record)
            proposal = Proposal(proposal_id="ok", action="restart", voters=["v/1"], timeout=60)
            await consensus.propose(proposal, agent="v/1", session=session_id)
            await consensus.vote(Vote(proposal_id="ok", vote="yes"), agent="v/1")
            decision = await consensus.wait_for_decision("ok", timeout=5)
    assert decision.outcome == "approved"


async def test_a_deeply_nested_board_value_is_skipped_by_a_snapshot(
    bus: Bus, unique: str, session_id: str
) -> None:
    bucket = f"BOARD_{unique}"
    board = await Blackboard.open(bus, session_id, bucket=bucket)
    value = b'{"data": {"a": ' + DEEP + b"}}"
    await bus.js.publish(subjects.kv_subject(bucket, f"{session_id}.context"), value)
    snapshot = await board.snapshot()
    assert snapshot.context is None


async def test_a_garbage_query_record_is_taken_over_not_raised(bus: Bus, session_id: str) -> None:
    ledger = await QueryLedger.open(bus, session_id, agent="a/1")
    key = query_key(session_id, "logs", "errors since 10:00")
    await bus.js.publish(subjects.kv_subject(QUERIES_BUCKET, key), b"\x00garbage")

    async def execute() -> str:
        return "42 errors"

    outcome = await ledger.run("logs", "errors since 10:00", execute)
    assert outcome.evidence.result == "42 errors"
