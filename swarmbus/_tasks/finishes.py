"""Waiting for tasks to finish: ``TaskQueue.wait``, fed by one watch of the records.

A task is final once its record says ``completed`` or ``failed`` (the record is the
source of truth; the ``task.completed`` event comes later and may be missing, see
docs/how/delivery.md). So a waiter learns the outcome from the record's write itself:
one watch per queue object over the session's records (an ordered push consumer kept
in memory, made at the first ``wait`` and deleted by ``close``), and a future per
waiting call. ``wait`` registers its future, then reads the record once: a task that
finished before the watch or the registration is seen by that read, one that
finishes later by the watch.

The read is skipped for a task this queue object created while its watch ran (``noted``):
the watch sees every write of that record, so its final one either comes after the
registration, or came before it and was kept (``_finals``, bounded; a task forgotten
there is read as above). Nothing runs in the background but the watch's callback,
which runs in the connection's read loop (``KvWatch(inline=True)``: a waiter wakes one
loop turn sooner); it only decodes a record and settles futures, and a record it
cannot decode is left to the waiter's own read.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final, Protocol

import anyio

from swarmbus._errors import InvalidMessageError, SwarmbusError
from swarmbus._jetstream.watch import KvChange, KvWatch
from swarmbus._jetstream.workqueue import KeyValue
from swarmbus._tasks.model import TASKS_BUCKET, TERMINAL, Task, record_of

__all__ = ["Finishes"]

REMEMBERED: Final = 4096
"""Tasks created while the watch ran, and their final records, kept for ``wait``."""


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
        #: Tasks created after the watch started, not finished yet as far as it saw.
        self._noted: OrderedDict[str, None] = OrderedDict()
        #: Final records the watch saw for noted tasks nobody waited for yet.
        self._finals: OrderedDict[str, Task] = OrderedDict()

    def note_created(self, task_ids: Iterable[str]) -> None:
        """Tasks created just now, their records not yet written (after this watch
        started, if any: it will see every write of their records)."""
        if self._watch is None:
            return
        noted = self._noted
        for task_id in task_ids:
            noted[task_id] = None
        while len(noted) > REMEMBERED:
            noted.popitem(last=False)

    async def wait(self, task_id: str) -> Task:
        """See ``TaskQueue.wait``."""
        await self._start()
        # No await from here until the future is registered: the watch's callback runs
        # between awaits only.
        final = self._finals.pop(task_id, None)
        if final is not None:
            return final
        seen_whole = task_id in self._noted  # the watch saw each write of its record
        self._noted.pop(task_id, None)
        future: asyncio.Future[Task] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(task_id, set())
        waiters.add(future)
        try:
            if not seen_whole:
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
        if self._watch is not None:
            return  # no checkpoint (see wait)
        async with self._starting:
            if self._watch is None:
                watch = KvWatch(
                    self._queue.kv._js,
                    TASKS_BUCKET,
                    self._on_change,
                    keys=f"{self._queue.session}.*",
                    memory=True,  # a file-backed consumer costs ~10 ms to create
                    inline=True,
                )
                await watch.start()
                self._watch = watch

    def _on_change(self, change: KvChange) -> None:
        task_id = change.key[self._prefix :]
        waiters = self._waiters.get(task_id)
        if (not waiters and task_id not in self._noted) or change.removed:
            return
        try:
            task = record_of(change.value, self._queue.session, task_id)
        except InvalidMessageError:  # written by something else: a read decides
            self._noted.pop(task_id, None)
            return
        if task.status not in TERMINAL:
            return
        if waiters:
            for future in waiters:
                if not future.done():
                    future.set_result(task)
        elif task_id in self._noted:
            del self._noted[task_id]
            self._finals[task_id] = task
            while len(self._finals) > REMEMBERED:
                self._finals.popitem(last=False)

    async def close(self) -> None:
        """Stop the watch; a ``wait`` still pending raises (nothing would end it)."""
        watch, self._watch = self._watch, None
        self._noted.clear()
        self._finals.clear()
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(SwarmbusError("the TaskQueue was closed"))
        if watch is not None:
            await watch.stop()
