"""The task sweep and listings against what other agents may write (review of issue 18's
creation copies): entries that are no task must neither starve the sweep nor stop the
service, and a listing must not resurrect a pruned task."""

from __future__ import annotations

import anyio
import pytest

from swarmbus import Bus, NatsServer, NotFoundError, TaskQueue
from swarmbus._jetstream.workqueue import _queue
from swarmbus._runtime.provision import provisioning
from swarmbus._tasks import TASKS_BUCKET, TASKS_STREAM
from swarmbus._tasks import queue as queue_module
from swarmbus._tasks.model import Task, encoder
from swarmbus._tasks.queue import offer_lost

CREATOR = "ops/coordinator"
PRIORITIES = range(1, 11)


async def erase(bus: Bus, queue: TaskQueue, task_id: str) -> None:
    """What another agent's ACK or TERM of the fetched dispatch does."""
    await bus.js.purge_stream(TASKS_STREAM, subject=f"swarmbus.task.{queue.session}.*.*.{task_id}")
    assert await queue._dispatched(task_id) is None


async def test_copies_that_cannot_be_offered_do_not_starve_the_sweep(
    bus: Bus, session_id: str
) -> None:
    """Copies whose record key holds a delete marker or garbage are not lost tasks: a
    sweep with ``limit`` 3 still offers the one real task whose dispatch was removed."""
    async with TaskQueue(bus, session_id, ack_wait=0.5) as queue:
        for i in range(3):
            fake = Task(id=f"blocker{i}", type="x", session=session_id, created_by="ops/a")
            await bus.js.publish(
                f"$KV.{TASKS_BUCKET}.=created.{session_id}.blocker{i}", encoder.encode(fake)
            )
            record = f"$KV.{TASKS_BUCKET}.{session_id}.blocker{i}"
            if i == 0:
                await bus.js.publish(record, b"\x00junk")
            else:
                await bus.js.publish(record, b"", headers={"KV-Operation": "DEL"})
        victim = await queue.create("report", agent=CREATOR)
        await erase(bus, queue, victim.id)
        assert await offer_lost(queue, grace=0, limit=3) == [victim.id]
        assert await offer_lost(queue, grace=0, limit=3) == []  # offered: not lost


async def test_a_broken_copy_is_no_task(bus: Bus, session_id: str) -> None:
    async with TaskQueue(bus, session_id, ack_wait=0.5) as queue:
        await bus.js.publish(f"$KV.{TASKS_BUCKET}.=created.{session_id}.nosuch", b"\x00junk")
        with pytest.raises(NotFoundError):
            await queue.get("nosuch")
        assert await queue.tasks() == []


async def test_tasks_does_not_list_a_task_pruned_while_it_reads(
    bus: Bus, session_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tasks()`` reads copies, dispatches, then records: a prune in between (copy,
    then record) must not leave the finished task listed as pending from its copy."""
    async with TaskQueue(bus, session_id, ack_wait=0.5) as queue:
        done = await queue.create("report", agent=CREATOR)
        claim = await queue.claim(agent="w/a", types=["report"], timeout=5)
        assert claim is not None
        await claim.complete({"ok": True})
        real = queue_module.records_of

        async def records_then_prune(q: TaskQueue, *, copies: bool = False) -> list[Task]:
            found = await real(q, copies=copies)
            if copies and q is queue:
                monkeypatch.setattr(queue_module, "records_of", real)
                assert await queue.prune(older_than=0) == [done.id]
            return found

        monkeypatch.setattr(queue_module, "records_of", records_then_prune)
        assert await queue.tasks() == []


@pytest.mark.parametrize("token", ["\u00b2", "\u0663", "\uff15", "5"])
def test_a_priority_token_is_ascii_digits(token: str) -> None:
    """``str.isdigit`` is true of these, ``int`` refuses the first; only ASCII counts."""
    queue = _queue(f"swarmbus.task.S-1.report.{token}.t1", PRIORITIES)
    assert queue == (("S-1", "report", 5) if token == "5" else None)


async def test_a_dispatch_with_a_unicode_digit_priority_does_not_stop_the_service(
    fresh_server: NatsServer, session_id: str
) -> None:
    """Any agent may store ``swarmbus.task.<s>.<t>.².<id>``: the service's queue
    provisioner reads every stored dispatch subject at start; it must skip this one."""
    async with Bus.open(url=fresh_server.url) as bus, TaskQueue(bus, session_id) as queue:
        await bus.js.publish(f"swarmbus.task.{session_id}.probe.\u00b2.t1", b"{}")
        async with provisioning(bus):
            task = await queue.create("report", agent=CREATOR)
            claim = await queue.claim(agent="w/a", types=["report"], timeout=5)
            assert claim is not None
            assert claim.task.id == task.id
            await claim.complete(None)


async def test_claims_won_by_a_call_cancelled_before_it_returns_are_given_back(
    bus: Bus, session_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``claim_many`` cancelled after it won claims but before it returned them
    (while it subscribes to dispatches) gives them back: pending again at once, with
    the attempt count they had, not after their leases run out."""
    async with TaskQueue(bus, session_id, ack_wait=30) as queue:
        task = await queue.create("report", agent=CREATOR)
        claimer = queue._claimer
        entered = anyio.Event()

        async def stuck(types: object) -> None:
            entered.set()
            await anyio.Event().wait()  # until cancelled

        monkeypatch.setattr(claimer._signals, "arm", stuck)
        with anyio.fail_after(10):
            async with claimer.lingering(), anyio.create_task_group() as tg:

                async def claim() -> None:
                    await queue.claim_many(agent="w/a", types=["report"], limit=5, timeout=5)

                tg.start_soon(claim)
                await entered.wait()
                tg.cancel_scope.cancel()
            assert (await queue.get(task.id)).status == "pending"
            monkeypatch.undo()
            again = await queue.claim(agent="w/b", types=["report"], timeout=5)
        assert again is not None
        assert again.task.id == task.id
        assert again.task.attempts == 1
