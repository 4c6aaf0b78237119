"""Task timeouts and dead letters for sessions nobody claims from any more.

A claim that outlives its task's timeout is taken over by the next claimer that pulls
the task, or, after the last attempt, failed for good (dead letter) by it. If no
claimer of that type comes back, nothing pulls the task: it would stay ``running``
with an expired lease. This sweeper lists the tasks of every session with task
activity (``note`` is fed by the inbound-event watcher) every ``interval`` seconds
and fails each task whose claim expired after its last attempt, with a dead letter
(``swarmbus.dead.<session>.swarmbus/runtime``, code ``task_timeout``) and the
``agent.error.occurred`` event that goes with it. Earlier attempts are left to the
queue: the next claimer takes them over.

The same pass offers again the tasks whose dispatch message is gone (a claimer may TERM
or ACK any dispatch it fetched, another agent's too): ``offer_lost``, after ``grace``
seconds without activity, at most ``per_pass`` tasks per session and pass.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import anyio
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._bus import Bus
from swarmbus._errors import SwarmbusError
from swarmbus._tasks import TERMINAL, Task, TaskQueue
from swarmbus._tasks.queue import offer_lost

log = logging.getLogger("swarmbus.runtime")

_encoder = msgspec.json.Encoder()


def _expired_for_good(task: Task, at: datetime) -> bool:
    lease = task.lease_until
    return (
        task.status in ("assigned", "running")
        and lease is not None
        and lease < at
        and task.attempts >= task.max_attempts
    )


class TaskTimeouts:
    """Fails tasks whose last claim expired (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        *,
        agent: str,
        interval: float = 5.0,
        grace: float = 10.0,
        per_pass: int = 100,
    ) -> None:
        self.bus = bus
        self.agent = agent
        self.interval = interval
        self.grace = grace
        self.per_pass = per_pass
        self._sessions: set[str] = set()
        self._queues: dict[str, TaskQueue] = {}

    def note(self, session: str) -> None:
        """A session had task activity: sweep it until all its tasks are finished."""
        self._sessions.add(session)

    async def close(self) -> None:
        for queue in self._queues.values():
            await queue.close()
        self._queues.clear()

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            for session in sorted(self._sessions):
                try:
                    await self.sweep(session)
                except SwarmbusError as exc:  # NATS unreachable: next round
                    log.warning("task sweep of %s failed: %s", session, exc)

    async def sweep(self, session: str) -> list[Task]:
        """Fail the expired tasks of ``session``; the tasks failed."""
        queue = self._queues.get(session)
        if queue is None:
            queue = self._queues[session] = TaskQueue(self.bus, session)
            await queue.open()
        tasks = await queue.tasks()
        if all(t.status in TERMINAL for t in tasks):
            self._sessions.discard(session)
            return []
        if self.bus.settings.backend == "nats":  # a store-backed queue has no dispatches
            await offer_lost(queue, grace=self.grace, limit=self.per_pass)
        at = datetime.now(UTC)
        failed = []
        for task in (t for t in tasks if _expired_for_good(t, at)):
            reason = f"claim by {task.assigned_to} timed out after {task.attempts} attempts"
            final = await queue.cancel(task.id, by=self.agent, reason=reason)
            if final.error is None or not final.error.startswith(f"cancelled by {self.agent}"):
                continue  # finished meanwhile
            await self.bus.reject(
                subject=f"{subjects.task_subject(session, task.type, task.priority)}.{task.id}",
                data=_encoder.encode(final),
                code="task_timeout",
                reason=final.error,
                receiver=self.agent,
                dedupe_key=f"task-timeout-{task.id}",
            )
            failed.append(final)
        return failed
