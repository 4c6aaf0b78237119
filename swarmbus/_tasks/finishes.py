"""Waiting for tasks to finish: ``TaskQueue.wait``, fed by one watch of the records.

A task is final once its record says ``completed`` or ``failed`` (the record is the
source of truth; the ``task.completed`` event comes later and may be missing, see
docs/how/delivery.md). So a waiter learns the outcome from the record's write itself:
one watch per queue object over the session's records (an ordered push consumer kept
in memory, made at the first ``wait`` and deleted by ``close``), and a future per
waiting call. ``wait`` registers its future, then reads the record once: a task that
finished before the watch or the registration is seen by that read, one that
finishes later by the watch. Nothing runs in the background but the watch's callback.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import anyio

from swarmbus._errors import InvalidMessageError
from swarmbus._jetstream.watch import KvChange, KvWatch
from swarmbus._jetstream.workqueue import KeyValue
from swarmbus._tasks.model import TASKS_BUCKET, TERMINAL, Task, record_of

__all__ = ["Finishes"]


class FinishView(Protocol):
    """What waiting needs of a ``TaskQueue``."""

    session: str

    @property
    def kv(self) -> KeyValue: ...

    async def _read(self, task_id: str) -> tuple[Task, int]: ...


class Finishes:
    """The waiters of one queue object for its session's tasks to finish."""

    def __init__(self, queue: FinishView) -> None:
        self._queue = queue
        self._watch: KvWatch | None = None
        self._starting = anyio.Lock()
        self._waiters: dict[str, set[asyncio.Future[Task]]] = {}
        self._prefix = len(queue.session) + 1

    async def wait(self, task_id: str) -> Task:
        """See ``TaskQueue.wait``."""
        await self._start()
        future: asyncio.Future[Task] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(task_id, set())
        waiters.add(future)
        try:
            # Read once the watch runs: a write before that is seen here, any later
            # one by the watch. NotFoundError: no such task.
            task, _ = await self._queue._read(task_id)
            if task.status in TERMINAL:
                return task
            return await future
        finally:
            waiters.discard(future)
            if not waiters:
                self._waiters.pop(task_id, None)

    async def _start(self) -> None:
        async with self._starting:
            if self._watch is None:
                kv = self._queue.kv
                watch = KvWatch(
                    kv._js,
                    TASKS_BUCKET,
                    self._on_change,
                    keys=f"{self._queue.session}.*",
                    memory=True,  # a file-backed consumer costs ~10 ms to create
                )
                await watch.start()
                self._watch = watch

    def _on_change(self, change: KvChange) -> None:
        task_id = change.key[self._prefix :]
        waiters = self._waiters.get(task_id)
        if not waiters or change.removed:
            return
        try:
            task = record_of(change.value, self._queue.session, task_id)
        except InvalidMessageError:  # written by something else: the read decides
            return
        if task.status in TERMINAL:
            for future in waiters:
                if not future.done():
                    future.set_result(task)

    async def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()
