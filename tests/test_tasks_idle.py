"""An idle claimer pulls only the queues a dispatch was published on (``Signals``)."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from nats.aio.msg import Msg

from swarmbus import Bus, Task, TaskQueue
from swarmbus._jetstream.workqueue import Signals
from swarmbus._tasks.model import TASKS_STREAM

CREATOR = "ops/coordinator"


class Handled:
    """A work() handler that sets ``all_done`` once ``expected`` tasks were handled."""

    def __init__(self, expected: int) -> None:
        self.ids: list[str] = []
        self.expected = expected
        self.all_done = anyio.Event()

    async def __call__(self, task: Task) -> dict[str, Any]:
        self.ids.append(task.id)
        if len(self.ids) == self.expected:
            self.all_done.set()
        return {}


class FakeSubscription:
    def __init__(self) -> None:
        self._pending_queue: asyncio.Queue[Msg] = asyncio.Queue()  # InlineDelivery's seam

    async def unsubscribe(self) -> None:
        return None


class FakeNats:
    """Enough of a nats-py client for ``Signals.arm`` and ``disarm``."""

    async def subscribe(self, subject: str, queue: str = "", cb: object = None) -> FakeSubscription:
        return FakeSubscription()


def dispatch(session: str, type: str, priority: int) -> Msg:
    return Msg(_client=None, subject=f"swarmbus.task.{session}.{type}.{priority}.t1")  # type: ignore[arg-type]


async def test_signals_a_queue_is_clean_after_a_pull_that_drained_it_until_its_next_dispatch() -> (
    None
):
    signals = Signals(FakeNats(), "s1", 0.5, range(1, 11))  # type: ignore[arg-type]
    assert signals.owed("probe", 5)  # not subscribed: every queue is owed
    await signals.arm(["probe"])
    assert signals.owed("probe", 5)  # subscribed, never pulled
    mark = signals.mark("probe", 5)
    assert not signals.pulled("probe", 5, mark, got=0, asked=10)
    assert not signals.owed("probe", 5)
    assert signals.owed("probe", 4)

    changed = signals.changed
    signals._take(dispatch("s1", "probe", 5))
    assert changed.is_set()
    assert signals.owed("probe", 5)
    # A pull that found nothing a moment after the dispatch was announced: not stored
    # yet (or another claimer took it): pull once more, waiting.
    mark = signals.mark("probe", 5)
    assert signals.pulled("probe", 5, mark, got=0, asked=10)
    assert signals.owed("probe", 5)
    mark = signals.mark("probe", 5)
    assert not signals.pulled("probe", 5, mark, got=0, asked=1)
    assert not signals.owed("probe", 5)

    # A dispatch announced during a pull that drained the queue: still owed.
    mark = signals.mark("probe", 5)
    signals._take(dispatch("s1", "probe", 5))
    assert not signals.pulled("probe", 5, mark, got=0, asked=10)
    assert signals.owed("probe", 5)
    # A pull from a clean queue that got every dispatch announced meanwhile: clean.
    signals._clean.add(("probe", 5))
    mark = signals.mark("probe", 5)
    signals._take(dispatch("s1", "probe", 5))
    assert not signals.pulled("probe", 5, mark, got=1, asked=1)
    assert not signals.owed("probe", 5)

    # Made-up priority tokens (anyone may publish) leave no state behind.
    changed = signals.changed
    for bogus in (0, 11, 10**12):
        signals._take(dispatch("s1", "probe", bogus))
    assert not changed.is_set()
    assert set(signals._signals) == {("probe", 5)}

    signals.refresh()  # what no publish announces: every queue owed again
    assert signals.owed("probe", 5)
    await signals.disarm()
    assert signals.owed("probe", 5)


async def test_an_idle_work_loop_takes_dispatches_on_other_queues_and_redeliveries(
    bus: Bus, session_id: str
) -> None:
    handled = Handled(expected=4)
    stop = anyio.Event()
    async with TaskQueue(bus, session_id) as worker, TaskQueue(bus, session_id) as other:
        first = await other.create("probe", agent=CREATOR)
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    lambda: worker.work(handled, agent="w/a", types=["probe", "scan"], stop=stop)
                )
                assert (await other.wait(first.id)).status == "completed"
                # Idle now, waiting in a pull on probe/5: a dispatch on another
                # priority and on another type ends that wait.
                high = await other.create("probe", agent=CREATOR, priority=9)
                scan = await other.create("scan", agent=CREATOR, priority=2)
                assert (await other.wait(high.id)).status == "completed"
                assert (await other.wait(scan.id)).status == "completed"
                # A dispatch put back with a delay is announced by no publish.
                late = await other.create("late", agent=CREATOR)
                claim = await other.claim(agent="w/b", types=["late"])
                assert claim is not None
                assert (await claim.fail("again", retry=True)).status == "pending"
                tg.start_soon(lambda: worker.work(handled, agent="w/c", types=["late"], stop=stop))
                assert (await other.wait(late.id)).status == "completed"
                stop.set()
    assert sorted(handled.ids) == sorted([first.id, high.id, scan.id, late.id])


async def _abandon_a_waiting_pull(queue: TaskQueue, type: str, wait: float) -> None:
    """Send a pull of ``wait`` seconds on ``type``/5, then give up on it (it stays open
    on the server until it expires)."""
    claimer = queue._claimer
    puller = await claimer.puller(type, 5)
    await puller.pull(1)  # the consumer exists
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: claimer._pull(puller, type, 5, 1, wait=wait))
        await anyio.wait_all_tasks_blocked()  # sent: waiting for its answer
        tg.cancel_scope.cancel()


async def test_a_pull_given_up_on_hands_its_dispatch_back_not_to_another_queues_pull(
    bus: Bus, session_id: str
) -> None:
    async with (
        TaskQueue(bus, session_id, starvation_after=0) as queue,
        TaskQueue(bus, session_id) as other,
    ):
        await _abandon_a_waiting_pull(queue, "a", wait=5.0)
        task = await other.create("a", agent=CREATOR)
        durable = str(queue._claimer._pullers[("a", 5)]._config.durable_name)
        with anyio.fail_after(10):  # the server delivered it to the abandoned pull
            while (await bus.js.consumer_info(TASKS_STREAM, durable)).delivered.consumer_seq < 1:
                await bus.nc.flush()
        await bus.nc.flush()  # and it reached this connection
        assert await queue.claim_many(agent="w/b", types=["b"], limit=1, timeout=0) == []
        # It went back to its queue (nak): the next pull of "a" gets it.
        (claim,) = await queue.claim_many(agent="w/a", types=["a"], limit=1, timeout=10)
        assert claim.task.id == task.id


async def test_the_end_of_a_pull_given_up_on_does_not_end_the_next_pull(
    bus: Bus, session_id: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:
        await _abandon_a_waiting_pull(queue, "a", wait=0.2)
        puller = await queue._claimer.puller("b", 5)
        started = anyio.current_time()
        assert await puller.pull(1, wait=1.5) == []
        # The abandoned pull's "408 request timeout" came at 0.2 s: ignored.
        assert anyio.current_time() - started >= 1.4
