"""The one-task latency path's shortcuts (issue 18): what runs in nats-py's read loop.

``TaskQueue.wait`` learns a completion from a KV watch whose changes are taken in the
connection's read loop (``KvWatch(inline=True)``). Nothing a message there carries may
end that loop (the connection's only reader): a message that is no stored entry, a
callback that raises, a record that is not a task; the watch and the connection read on.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import msgspec
import pytest

from swarmbus import Bus, Task, TaskQueue
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
        deliver = watch._sub._sub.subject  # the push consumer's deliver subject
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
