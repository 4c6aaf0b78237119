"""The one-task latency path's shortcuts (issue 18): what runs in nats-py's read loop.

CAS writes and events are queued with ``publish_nowait`` (HPUB, headers checked as
nats-py checks them). Acks are awaited with ``hotpath.settled`` (``asyncio.wait``, a
loop turn sooner).
A worker runs each batch in a task of its own (a handler's context stays its own).
``TaskQueue.wait`` learns a completion from a KV watch whose changes are taken in the
connection's read loop (``KvWatch(inline=True)``). Nothing a message there carries may
end that loop (the connection's only reader): a message that is no stored entry, a
callback that raises, a record that is not a task; the watch and the connection read on.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg

from swarmbus import Bus, InvalidTaskError, MessageTooLargeError, Task, TaskQueue
from swarmbus._jetstream.acks import AckPublisher
from swarmbus._jetstream.hotpath import flush_now, publish_nowait, settled
from swarmbus._jetstream.watch import KvChange, KvWatch
from swarmbus._tasks.model import TASKS_BUCKET, encoder, now

WAIT = 10
CREATOR = "ops/coordinator"


async def test_an_inline_watch_reads_on_past_a_stray_message_and_a_callback_that_raises(
    bus: Bus, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = f"lat-{unique}"
    kv = await bus.js.create_key_value(bucket=bucket, history=1)
    seen: list[bytes] = []
    got_last = anyio.Event()

    def on_change(change: KvChange) -> None:
        if change.value == b"boom":
            raise RuntimeError("a bug in on_change")
        seen.append(change.value)
        if change.value == b"last":
            got_last.set()

    watch = KvWatch(bus.js, bucket, on_change, memory=True, inline=True)
    await watch.start()
    try:
        assert watch._sub is not None
        deliver = watch._sub.subject  # the push consumer's deliver subject
        with caplog.at_level(logging.ERROR, logger="swarmbus"):
            await kv.put("k", b"first")
            # Anyone allowed to publish there: no JetStream metadata, not a stored entry.
            await bus.nc.publish(deliver, b"stray")
            await kv.put("k", b"boom")
            await kv.put("k", b"last")
            with anyio.fail_after(WAIT):
                await got_last.wait()
        assert seen == [b"first", b"last"]
        assert bus.nc.is_connected
        assert "a bug in on_change" in caplog.text
        assert f"dropped a message on {deliver}" in caplog.text  # the stray one, taken
        assert watch._sub.pending_msgs == 0
        assert watch._sub.pending_bytes == 0
    finally:
        await watch.stop()


async def test_wait_sees_the_completion_after_a_record_that_is_no_task(
    bus: Bus, session_id: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:
        task = await queue.create("probe", agent=CREATOR)
        outcome: list[Task] = []

        async def waits() -> None:
            outcome.append(await queue.wait(task.id))

        key = f"{session_id}.{task.id}"
        kv = await bus.js.key_value(TASKS_BUCKET)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waits)
                await anyio.wait_all_tasks_blocked()
                await kv.put(key, b"\xffnot a task")  # a hostile or broken write
                await kv.put(key, b'{"id": 1}')
                done = msgspec.structs.replace(
                    task, status="completed", result={"ok": True}, completed_at=now()
                )
                await kv.put(key, encoder.encode(done))
        assert outcome[0].status == "completed"
        assert outcome[0].result == {"ok": True}
        assert bus.nc.is_connected
        # The connection and the queue's watch still work.
        again = await queue.create("probe", agent=CREATOR)
        stop = anyio.Event()

        async def handler(t: Task) -> dict[str, Any]:
            return {"id": t.id}

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: queue.work(handler, agent="w/a", types=["probe"], stop=stop))
                finished = await queue.wait(again.id)
                stop.set()
        assert finished.result == {"id": again.id}


async def test_settled_wakes_its_caller_on_the_turn_after_the_last_result() -> None:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[int]] = [loop.create_future() for _ in range(3)]
    returned = anyio.Event()

    async def waits() -> None:
        await settled(futures, WAIT)
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waits)
        await anyio.wait_all_tasks_blocked()
        for i, future in enumerate(futures):
            future.set_result(i)  # as the read loop does, in one go
        await asyncio.sleep(0)  # one turn: asyncio.wait would need two
        assert returned.is_set()
    assert [f.result() for f in futures] == [0, 1, 2]


async def test_settled_cancels_what_is_pending_at_its_timeout_or_when_cancelled() -> None:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[int] = loop.create_future()
    answered.set_result(7)
    silent: asyncio.Future[int] = loop.create_future()
    with anyio.fail_after(WAIT):
        await settled([answered, silent], 0.01)
    assert answered.result() == 7
    assert silent.cancelled()

    await settled([answered], 0)  # all done: returns at once, even with no time left
    forgotten: asyncio.Future[int] = loop.create_future()
    with anyio.move_on_after(0.01) as scope:  # the caller's own deadline
        await settled([forgotten], WAIT)
    assert scope.cancelled_caught
    assert forgotten.cancelled()


async def test_a_claimers_pull_inbox_reads_on_past_stray_messages(
    bus: Bus, session_id: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:
        first = await queue.create("probe", agent=CREATOR)
        claim = await queue.claim(agent="w/a", types=["probe"], timeout=WAIT)
        assert claim is not None
        assert claim.task.id == first.id
        inbox = queue._claimer._inbox._prefix  # its pulls' replies arrive in the read loop
        assert inbox
        # Anyone allowed to publish there: a status for no pull, a message with no ack
        # subject, one that claims to be a dispatch of some consumer, garbage headers.
        await bus.nc.publish(f"{inbox}.999", b"", headers={"Status": "408"})
        await bus.nc.publish(f"{inbox}.1", b"\xff")
        await bus.nc.publish(f"{inbox}.1", b"{}", reply="$JS.ACK.X.Y.1.1.1.1.1")
        await bus.nc.publish(f"{inbox}.x", b"{}", headers={"Status": ""})
        await claim.complete({})
        second = await queue.create("probe", agent=CREATOR)
        again = await queue.claim(agent="w/a", types=["probe"], timeout=WAIT)
        assert again is not None
        assert again.task.id == second.id
        await again.complete({"n": 2})
        with anyio.fail_after(WAIT):
            assert (await queue.wait(second.id)).result == {"n": 2}
        assert bus.nc.is_connected


_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


async def test_a_handlers_context_does_not_reach_the_next_tasks_handler(
    bus: Bus, session_id: str
) -> None:
    """What a handler binds in its context (a logging or request id, an attached trace
    context) is gone when the next task's handler runs (a task per batch)."""
    seen: list[str] = []
    async with TaskQueue(bus, session_id) as queue:
        stop = anyio.Event()

        async def handler(t: Task) -> dict[str, Any]:
            seen.append(_request_id.get())
            _request_id.set(t.id)
            return {}

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: queue.work(handler, agent="w/a", types=["probe"], stop=stop))
                for _ in range(3):
                    task = await queue.create("probe", agent=CREATOR)
                    await queue.wait(task.id)
                    await anyio.wait_all_tasks_blocked()
                stop.set()
                await queue.create("probe", agent=CREATOR)  # wakes the loop to see stop
    assert seen[:3] == ["", "", ""]


async def test_a_batch_handed_over_while_every_runner_is_busy_gets_a_runner_of_its_own(
    bus: Bus, session_id: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:
        stop = anyio.Event()
        second_ran = anyio.Event()
        first_started = anyio.Event()
        first = await queue.create("probe", agent=CREATOR)

        async def handler(t: Task) -> dict[str, Any]:
            if t.id == first.id:
                first_started.set()
                await second_ran.wait()  # holds its runner until the second ran
            else:
                second_ran.set()
            return {}

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: queue.work(handler, agent="w/a", types=["probe"], stop=stop))
                await first_started.wait()
                second = await queue.create("probe", agent=CREATOR)
                await queue.wait(second.id)
                await queue.wait(first.id)
                stop.set()


async def test_publish_nowait_with_headers_sends_what_client_publish_sends(
    bus: Bus, unique: str
) -> None:
    nc = bus.nc
    got: list[Msg] = []
    both = anyio.Event()

    async def collect(msg: Msg) -> None:
        got.append(msg)
        if len(got) == 2:
            both.set()

    subject = f"hot.{unique}"
    await nc.subscribe(subject, cb=collect)
    await nc.flush()
    headers = {"Nats-Msg-Id": "task:1:completed", "Nats-Expected-Last-Subject-Sequence": " 7 "}
    assert publish_nowait(nc, subject, b"body", f"reply.{unique}", headers)
    await nc.publish(subject, b"body", reply=f"reply.{unique}", headers=headers)
    with anyio.fail_after(WAIT):
        await both.wait()
    ours, theirs = got
    assert (ours.subject, ours.reply, ours.data) == (theirs.subject, theirs.reply, theirs.data)
    assert (
        ours.headers
        == theirs.headers
        == {
            "Nats-Msg-Id": "task:1:completed",
            "Nats-Expected-Last-Subject-Sequence": "7",
        }
    )


@pytest.mark.parametrize(
    ("subject", "reply", "headers"),
    [
        ("a.b", "", {"X-Reason": "two\r\nlines"}),  # nats-py rewrites it: declined
        ("a.b", "", {"Bad Name": "v"}),
        ("a.b", "", {"Bad:Name": "v"}),
        ("a b", "", None),
        ("a.b\r\nPUB x 0", "", None),  # would inject a protocol command
        ("a.b", "r r", {"X": "v"}),
        ("", "", None),
    ],
)
async def test_publish_nowait_declines_what_client_publish_would_rewrite_or_refuse(
    bus: Bus, subject: str, reply: str, headers: dict[str, str] | None
) -> None:
    before = len(bus.nc._pending)
    assert not publish_nowait(bus.nc, subject, b"x", reply, headers)
    assert len(bus.nc._pending) == before
    await bus.nc.flush()
    assert bus.nc.is_connected


async def test_a_publish_queued_without_waking_the_flusher_goes_out_with_flush_now(
    bus: Bus, unique: str
) -> None:
    nc = bus.nc
    got = anyio.Event()

    async def collect(msg: Msg) -> None:
        got.set()

    subject = f"hot.{unique}"
    await nc.subscribe(subject, cb=collect)
    await nc.flush()
    assert publish_nowait(nc, subject, b"x", "", {"Nats-Msg-Id": "1"}, wake=False)
    assert nc._flush_queue is not None
    assert nc._flush_queue.empty()  # the flusher was not woken for it
    flush_now(nc)
    assert not nc._pending
    with anyio.fail_after(WAIT):
        await got.wait()


async def test_the_outbox_reads_on_past_stray_acks_taken_in_the_read_loop(
    bus: Bus, session_id: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:
        await queue.create("probe", agent=CREATOR)  # its task.created starts the outbox
        assert await bus.outbox.flush(WAIT)
        inbox = bus.outbox._prefix
        assert inbox
        await bus.outbox.send(f"nowhere.{session_id}", b"x", {"Nats-Msg-Id": "stray-1"})
        token = next(iter(bus.outbox._pending))  # never stored: waits for its ack
        # Anyone allowed to publish there: unknown tokens, garbage, a 503, no token.
        await bus.nc.publish(f"{inbox}.999999", b"\xff")
        await bus.nc.publish(f"{inbox}.{token}", b"", headers={"Status": "503"})
        await bus.nc.publish(inbox, b"{}")
        await bus.nc.publish(f"{inbox}.{token}", b"not json")  # taken as an ack
        with anyio.fail_after(WAIT):
            assert await bus.outbox.flush(WAIT)
        second = await queue.create("probe", agent=CREATOR)  # events still acked
        assert await bus.outbox.flush(WAIT)
        assert bus.nc.is_connected
        assert (await queue.get(second.id)).status == "pending"


async def test_a_write_too_large_with_its_headers_is_refused_and_the_connection_lives(
    bus: Bus, unique: str
) -> None:
    """The server counts an HPUB's headers with its payload and closes the connection of
    a client that sends more than max_payload: a write that fits only without its
    headers is refused before anything is sent, and the connection lives."""
    limit = bus.nc.max_payload
    acks = AckPublisher(bus.nc, timeout=WAIT)
    stream = f"BIG_{unique}"
    await bus.js.add_stream(name=stream, subjects=[f"big.{unique}"])
    headers = {"Nats-Msg-Id": "x" * 64}
    with pytest.raises(MessageTooLargeError):
        await acks.send([(f"big.{unique}", b"x" * (limit - 8), headers)])
    assert bus.nc.is_connected
    with anyio.fail_after(WAIT):
        (ack,) = await acks.publish([(f"big.{unique}", b"ok", headers)])
    assert isinstance(ack, int)
    assert bus.nc.is_connected


async def test_a_task_or_result_too_large_for_its_record_is_a_typed_error(
    bus: Bus, session_id: str
) -> None:
    """A task too large for its record is refused at creation (InvalidTaskError, nothing
    stored); a handler's result too large fails that task with the reason (and its
    worker goes on); a handler's unbounded exception text is cut in the record."""
    limit = bus.nc.max_payload
    async with TaskQueue(bus, session_id) as queue:
        with pytest.raises(InvalidTaskError, match="bytes"):
            await queue.create("probe", agent=CREATOR, context={"pad": "x" * (limit - 100)})
        assert await queue.tasks() == []
        stop = anyio.Event()

        async def handler(t: Task) -> dict[str, Any]:
            if t.parameters.target == "big":
                return {"pad": "x" * (limit - 100)}
            if t.parameters.target == "loud":
                raise RuntimeError("y" * limit)
            return {"ok": True}

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: queue.work(handler, agent="w/a", types=["probe"], stop=stop))
                big = await queue.create("probe", agent=CREATOR, target="big", max_attempts=1)
                loud = await queue.create("probe", agent=CREATOR, target="loud", max_attempts=1)
                fine = await queue.create("probe", agent=CREATOR)
                assert (await queue.wait(fine.id)).result == {"ok": True}
                failed = await queue.wait(big.id)
                assert failed.status == "failed"
                assert "bytes" in (failed.error or "")
                cut = await queue.wait(loud.id)
                assert cut.status == "failed"
                assert 0 < len(cut.error or "") <= 4000
                stop.set()
                await queue.create("probe", agent=CREATOR)  # wakes the loop to see stop
        assert bus.nc.is_connected
