"""StoreTaskQueue: the task queue on Redis or PostgreSQL (``SWARM_BACKEND``).

``TaskQueue(bus, session)`` is one of these when ``bus.settings.backend`` is not
``nats``: same API, same guarantees, no dispatch stream. Each task is one record in
the ``swarmbus-tasks`` bucket of the configured ``StateStore`` under
``<session>.<task id>`` (Redis: ``agent:swarm:{session}:tasks:{id}``; PostgreSQL:
``swarm_state``, mirrored into the seed's ``agent_tasks``), created with the task
(create-once) and changed only by compare-and-set on its revision. Claiming is in
``store_claims`` (listing, priority, leases, retries, dead letter, the wake key).

Claimers do not list the records: a session's finished tasks would make every claim
read more. On PostgreSQL they read the open rows of the store's ``agent_tasks``
mirror (``store_reads.open_records``). Elsewhere they list the open-task index, bucket
``swarmbus-task-open``, one key
``<session>.<task id>`` (value: the task's type) per task not yet finished: written
before the record is created, deleted once a write made the task completed or failed
(completion, final failure, dead letter, rejection, cancellation). A key left behind by
a crash in between is deleted by the next claimer that reads a finished record through
it; one whose record was never created (a create that failed) is skipped.
Lifecycle events are still published on NATS after each transition is stored.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import anyio
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._backends import open_store
from swarmbus._bus import Bus
from swarmbus._errors import (
    ConflictError,
    InvalidMessageError,
    InvalidTaskError,
    InvalidTransitionError,
    NotFoundError,
    PublishError,
    SwarmbusError,
)
from swarmbus._messages import TaskCreated
from swarmbus._state import StateStore
from swarmbus._tasks.model import (
    STATUSES,
    TASKS_BUCKET,
    TERMINAL,
    Claim,
    Handler,
    Task,
    TaskSpec,
    build,
    encoder,
    now,
    record_of,
    state,
)
from swarmbus._tasks.queue import TaskQueue
from swarmbus._tasks.store_claims import (
    WAKE_BUCKET,
    StoreClaimer,
    StoreTransitions,
    Wake,
    stamped,
)
from swarmbus._tasks.store_reads import lists_open

__all__ = ["StoreTaskQueue"]

log = logging.getLogger("swarmbus.tasks")

CREATE_CONCURRENCY: Final = 64
"""Record creations of one ``create_many`` in flight at once."""
OPEN_BUCKET: Final = "swarmbus-task-open"
"""The open-task index: ``<session>.<task id>`` -> the task's type, while unfinished."""


class StoreTaskQueue(TaskQueue):
    """The task queue of one session on a ``StateStore`` (see the module docstring).

    Made by ``TaskQueue(bus, session, ...)`` when the bus's backend is not NATS; the
    arguments are ``TaskQueue``'s (``ack_wait`` bounds how often heartbeats are sent).
    """

    def __init__(self, bus: Bus, session: str, **options: Any) -> None:
        super().__init__(bus, session, **options)
        self._record_store: StateStore | None = None
        self._wake_store: StateStore | None = None
        self._open_store: StateStore | None = None
        self._store_claimer = StoreClaimer(self)
        self._store_transitions = StoreTransitions(self)

    async def open(self) -> None:
        """Open the record, open-task index and wake buckets of the configured store."""
        self._record_store = await open_store(self.bus, TASKS_BUCKET, history=1)
        if not lists_open(self._record_store):
            self._open_store = await open_store(self.bus, OPEN_BUCKET, history=1)
        self._wake_store = await open_store(self.bus, WAKE_BUCKET, history=1)

    @property
    def records(self) -> StateStore:
        """The record bucket."""
        if self._record_store is None:
            raise SwarmbusError("TaskQueue is not open: use `async with TaskQueue(...)`")
        return self._record_store

    @property
    def open_tasks(self) -> StateStore | None:
        """The open-task index (module docstring); None where the store lists open
        tasks itself (``store_reads.lists_open``)."""
        if self._record_store is None:
            raise SwarmbusError("TaskQueue is not open: use `async with TaskQueue(...)`")
        return self._open_store

    async def _closed(self, task_id: str) -> None:
        """Take a finished task out of the open-task index (claimers stop reading it)."""
        if self._open_store is None:
            return
        try:
            await self._open_store.delete(self._key(task_id))
        except SwarmbusError as exc:  # the next claimer that reads it deletes it
            log.warning("could not unlist finished task %s: %s", task_id, exc)

    @property
    def wakes(self) -> StateStore:
        """The bucket of wake keys (one per session)."""
        if self._wake_store is None:
            raise SwarmbusError("TaskQueue is not open: use `async with TaskQueue(...)`")
        return self._wake_store

    async def _wake(self) -> None:
        """Tell waiting claimers that a task of the session became claimable."""
        try:
            await self.wakes.put(self.session, stamped())
        except SwarmbusError as exc:  # claimers look again within store_claims.MAX_WAIT
            log.warning("could not wake the claimers of %s: %s", self.session, exc)

    # --- create / approve / query -------------------------------------------------

    async def create_many(self, specs: Iterable[TaskSpec], *, agent: str) -> list[Task]:
        """Create several tasks: one create-once record each (every spec is validated
        first), written concurrently; then the claimers are woken."""
        self.bus.act_as(agent)
        tasks = [
            build(spec, agent=agent, session=self.session, max_attempts=self.max_attempts)
            for spec in specs
        ]
        failures: list[SwarmbusError] = []
        limiter = anyio.CapacityLimiter(CREATE_CONCURRENCY)

        async def create(task: Task) -> None:
            key = self._key(task.id)
            async with limiter:
                try:
                    if self._open_store is not None:
                        # Listed first: a record nobody lists could never be claimed.
                        await self._open_store.put(key, task.type.encode())
                    await self.records.create(key, encoder.encode(task))
                except SwarmbusError as exc:
                    failures.append(exc)

        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(create, task)
        if len(failures) < len(tasks):
            await self._wake()  # those stored are claimable even if others failed
        if failures:
            raise PublishError(f"cannot store tasks of session {self.session}: {failures[0]}")
        await self._events(
            (
                TaskCreated(
                    task_id=t.id,
                    type=t.type,
                    parameters=msgspec.to_builtins(t.parameters),
                    priority=t.priority,
                    requires_approval=t.constraints.requires_approval,
                ),
                agent,
                f"task:{t.id}:created",
            )
            for t in tasks
        )
        return tasks

    async def _read(self, task_id: str) -> tuple[Task, int]:
        """The task and its record's revision."""
        if not isinstance(task_id, str) or not task_id or len(task_id) > 128:
            raise NotFoundError("task", str(task_id))
        try:
            subjects.validate_name("task id", task_id)
        except SwarmbusError:
            raise NotFoundError("task", task_id) from None
        found = await self._record_of(task_id)
        if found is None:
            raise NotFoundError("task", task_id)
        return found

    async def _record_of(self, task_id: str) -> tuple[Task, int] | None:
        entry = await self.records.get(self._key(task_id), fresh=True)
        if entry is None or not entry.value:
            return None
        return record_of(entry.value, self.session, task_id), entry.revision

    async def wait(self, task_id: str) -> Task:
        """See ``TaskQueue.wait``: here a watch of the task's record per call."""
        await self._read(task_id)  # NotFoundError
        async with self.records.watch(self._key(task_id)) as entries:
            async for entry in entries:  # the current entry first, then every write
                if entry is not None and entry.value:
                    task = record_of(entry.value, self.session, task_id)
                    if task.status in TERMINAL:
                        return task
        raise NotFoundError("task", task_id)  # the watch ended (the store closed)

    async def tasks(self, status: str | None = None) -> list[Task]:
        """Every task of the session (optionally only one status), oldest first.

        Raises:
            InvalidTaskError: ``status`` is not a task status.
        """
        if status is not None and status not in STATUSES:
            raise InvalidTaskError("status", f"{status!r} is not one of {', '.join(STATUSES)}")
        tasks = [task for task, _ in await self._listed()]
        tasks.sort(key=lambda t: t.created_at or now())
        return [t for t in tasks if status is None or t.status == status]

    async def _listed(self) -> list[tuple[Task, int]]:
        """The session's task records with their revisions, as stored now."""
        prefix = f"{self.session}."
        records: list[tuple[Task, int]] = []
        for entry in await self.records.list(prefix):
            task_id = entry.key[len(prefix) :]
            if not entry.value or "." in task_id:
                continue
            try:
                records.append((record_of(entry.value, self.session, task_id), entry.revision))
            except InvalidMessageError as exc:  # written by something else: skipped
                log.warning("skipping a broken task record: %s", exc.reason)
        return records

    async def prune(self, *, older_than: float) -> list[str]:
        """Delete the records of this session's tasks that finished ``older_than`` seconds
        ago or earlier; returns their ids.

        A claim still held on a pruned task is lost (its next call raises
        ``TaskClaimLostError``): the delete compares the finished record's revision, and
        no dispatch message can bring the task back. When no task of the session is
        left, its wake key is deleted too (one key per session is all that stays).

        Raises:
            InvalidTaskError: ``older_than`` is not a number of seconds >= 0.
        """
        if isinstance(older_than, bool) or not isinstance(older_than, int | float):
            raise InvalidTaskError("older_than", f"must be seconds, got {older_than!r}")
        if not 0 <= older_than < math.inf:
            raise InvalidTaskError("older_than", f"must be >= 0 seconds, got {older_than!r}")
        cutoff = time.time() - older_than
        pruned = []
        listed = await self._listed()
        for task, revision in listed:
            if (
                task.status in TERMINAL
                and task.completed_at is not None
                and task.completed_at.timestamp() <= cutoff
            ):
                try:
                    await self.records.delete(self._key(task.id), revision=revision)
                except ConflictError:
                    continue
                pruned.append(task.id)
        if listed and len(pruned) == len(listed):
            # Nothing left in the session: its wake key goes too (a later create
            # writes it again; a live watch sees the delete as one more wake).
            await self.wakes.delete(self.session)
        return pruned

    async def approve(self, task_id: str, *, by: str) -> Task:
        """Let a ``requires_approval`` task be claimed (called by a consensus decision).

        Idempotent: approving an approved task wakes the claimers and changes nothing else.

        Raises:
            NotFoundError: unknown task.
            InvalidTransitionError: the task needs no approval, or was rejected.
        """
        subjects.validate_agent_id(by)
        while True:
            task, revision = await self._read(task_id)
            if task.approval == "approved":
                if task.status == "pending":
                    await self._wake()
                return task
            if task.approval != "required" or task.status != "pending":
                raise InvalidTransitionError("task", task_id, state(task), "approved")
            approved = msgspec.structs.replace(task, approval="approved", approved_by=by)
            if await self._cas(approved, revision) is None:
                continue
            await self._wake()
            return approved

    # --- claims (``store_claims``) ------------------------------------------------------

    async def claim_many(
        self,
        *,
        agent: str,
        types: Sequence[str],
        limit: int,
        timeout: float | None = None,
    ) -> list[Claim]:
        """Claim up to ``limit`` tasks, all from the highest claimable priority.

        Raises:
            InvalidTaskError: ``limit`` is not a count >= 1, or ``types`` is not a list
                of task types.
        """
        return await self._store_claimer.claim_many(
            agent=agent, types=types, limit=limit, timeout=timeout
        )

    async def work(
        self,
        handler: Handler,
        *,
        agent: str,
        types: Sequence[str],
        stop: anyio.Event,
        concurrency: int = 64,
    ) -> None:
        """See ``TaskQueue.work``; its claims share one live watch of the wake key."""
        async with anyio.create_task_group() as tg:
            wake = Wake()
            await tg.start(wake.run, self.wakes, self.session)
            self._store_claimer.wakes.append(wake)
            try:
                await super().work(
                    handler, agent=agent, types=types, stop=stop, concurrency=concurrency
                )
            finally:
                self._store_claimer.wakes.remove(wake)
                tg.cancel_scope.cancel()

    async def _cas(self, task: Task, revision: int) -> int | None:
        """Write ``task`` if its record is still at ``revision``; None if it moved on.
        A write that finishes the task also takes it out of the open-task index."""
        try:
            written = await self.records.update(
                self._key(task.id), encoder.encode(task), revision=revision
            )
        except ConflictError:
            return None
        if task.status in TERMINAL:
            await self._closed(task.id)
        return written

    async def _transition(
        self, claim: Claim, change: Callable[[Task], Task], requested: str
    ) -> Task:
        return await self._store_transitions.transition(claim, change, requested)

    async def _heartbeat(self, claim: Claim) -> None:
        await self._store_transitions.heartbeat(claim)

    async def _complete(self, claim: Claim, result: Mapping[str, Any] | None) -> Task:
        return await self._store_transitions.complete(claim, result)

    async def _fail(self, claim: Claim, error: str, *, retry: bool) -> Task:
        return await self._store_transitions.fail(claim, error, retry=retry)
