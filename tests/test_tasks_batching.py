"""Task queue batching: coalesced and pipelined writes keep each task's own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import anyio
import pytest
from nats.aio.msg import Msg

import swarmbus
from swarmbus import Bus, Task, TaskClaimLostError, TaskQueue, TaskSpec

CREATOR = "ops/coordinator"


@pytest.fixture
async def queue(bus: Bus, session_id: str) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(bus, session_id, ack_wait=0.5) as queue:
        yield queue


async def test_coalesced_completions_keep_their_own_outcomes(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    expiring = await queue.create("analyze", agent=CREATOR, priority=6, timeout=0.5)
    kept = await queue.create("analyze", agent=CREATOR, priority=5, timeout=60)
    slow_a = await queue.claim(agent="w/slow", types=["analyze"])
    slow_b = await queue.claim(agent="w/slow", types=["analyze"])
    assert slow_a is not None
    assert slow_b is not None
    assert (slow_a.task.id, slow_b.task.id) == (expiring.id, kept.id)
    fast = await queue.claim(agent="w/fast", types=["analyze"], timeout=5)
    assert fast is not None
    assert (fast.task.id, fast.attempt) == (expiring.id, 2)

    batches: list[int] = []
    cas_many = queue._cas_many

    async def spy(writes: Sequence[tuple[Task, int]]) -> list[int | Exception | None]:
        batches.append(len(writes))
        return [*await cas_many(writes)]

    monkeypatch.setattr(queue, "_cas_many", spy)
    # Both completions in one event-loop turn: one pipelined batch, and the lost CAS
    # is answered at once (not after the request timeout).
    with anyio.fail_after(2):
        late, done = await asyncio.gather(
            slow_a.complete({"by": "slow"}), slow_b.complete({"by": "slow"}), return_exceptions=True
        )
    assert batches == [2]
    assert isinstance(late, TaskClaimLostError)
    assert (late.attempt, late.current_attempt) == (1, 2)
    assert isinstance(done, Task)
    assert done.status == "completed"
    assert (await queue.get(kept.id)).result == {"by": "slow"}
    assert (await queue.get(expiring.id)).status == "assigned"
    assert (await fast.complete({"by": "fast"})).result == {"by": "fast"}


async def test_concurrent_batch_claimers_claim_each_task_once(
    bus: Bus, session_id: str, queue: TaskQueue
) -> None:
    created = await queue.create_many([TaskSpec(type="scan") for _ in range(60)], agent=CREATOR)
    async with TaskQueue(bus, session_id, ack_wait=0.5) as other:
        claims = []
        with anyio.fail_after(10):
            while len(claims) < len(created):
                mine, theirs = await asyncio.gather(
                    queue.claim_many(agent="w/one", types=["scan"], limit=25),
                    other.claim_many(agent="w/two", types=["scan"], limit=25),
                )
                claims += mine + theirs
        ids = [c.task.id for c in claims]
        assert sorted(ids) == sorted(t.id for t in created)  # each exactly once
        assert all(c.attempt == 1 for c in claims)
        finished = await asyncio.gather(*(c.complete({"n": i}) for i, c in enumerate(claims)))
    assert {t.status for t in finished} == {"completed"}
    stored = await queue.tasks()
    assert len(stored) == 60
    assert {(t.status, t.attempts) for t in stored} == {("completed", 1)}


async def test_cancelled_first_writer_still_sends_the_batch(queue: TaskQueue) -> None:
    await queue.create_many([TaskSpec(type="x"), TaskSpec(type="x")], agent=CREATOR)
    first, second = await queue.claim_many(agent="w/a", types=["x"], limit=2)
    results: list[Task] = []

    async def cancelled_complete() -> None:
        with anyio.CancelScope() as scope:
            scope.cancel()  # delivered at its first checkpoint, inside the batching
            await first.complete({"n": 1})

    async def complete_second() -> None:
        results.append(await second.complete({"n": 2}))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled_complete)
            tg.start_soon(complete_second)
    assert [t.result for t in results] == [{"n": 2}]
    assert (await queue.get(second.task.id)).status == "completed"


async def test_a_claim_batch_that_fails_half_way_keeps_what_it_won(
    bus: Bus, session_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull fails after a claim was won in the same scan: the won claim is returned
    (its record names this agent), not dropped to wait out its lease unrun."""
    from swarmbus._jetstream.reads import PullInbox as _PullInbox

    async with TaskQueue(bus, session_id, ack_wait=0.5, starvation_after=0) as queue:
        task = await queue.create("alpha", agent="ops/lead", max_attempts=1)
        original = _PullInbox.pull

        async def beta_unreachable(
            self: _PullInbox, next_subject: str, batch: int, wait: float = 0.0
        ) -> list[Msg] | None:
            if "beta" in next_subject and next_subject.endswith("-q5"):  # after alpha's p5
                raise swarmbus.ConnectionError("cannot pull tasks: timeout")
            return await original(self, next_subject, batch, wait)

        monkeypatch.setattr(_PullInbox, "pull", beta_unreachable)
        claims = await queue.claim_many(agent="w/a", types=["alpha", "beta"], limit=2)
        assert [c.task.id for c in claims] == [task.id]
        done = await claims[0].complete({"ok": True})
        assert (done.status, done.attempts) == ("completed", 1)
