"""TaskQueue: a session's queue (creation, reads, listing, prune, approval).

The design note of the whole task queue is in ``swarmbus._tasks``. This module holds
the queue object and what does not involve a claim; claiming and the transitions of
claimed tasks are in ``claims``, the worker loop in ``worker``, and NATS in
``swarmbus._jetstream.workqueue``.

``TaskQueue(bus, session)`` is a ``store_queue.StoreTaskQueue`` (registered as
``TaskQueue.on_store`` by ``swarmbus._tasks``) when ``bus.settings.backend`` is redis or
postgres: its records on the ``StateStore`` are the whole queue, no dispatch stream.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import anyio
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._bus import Bus
from swarmbus._errors import (
    ConnectionError,
    InvalidMessageError,
    InvalidTaskError,
    InvalidTransitionError,
    NotFoundError,
    PublishError,
    SwarmbusError,
)
from swarmbus._jetstream.acks import AckPublisher, Refused
from swarmbus._jetstream.headers import EXPECTED_LAST_SUBJECT_SEQUENCE as EXPECTED_LAST_HEADER
from swarmbus._jetstream.headers import MSG_ID as MSG_ID_HEADER
from swarmbus._jetstream.headers import SUBJECT as STORED_SUBJECT_HEADER
from swarmbus._jetstream.headers import TASK_REVISION as REVISION_HEADER
from swarmbus._jetstream.kv import kv_context
from swarmbus._jetstream.latest import entry_keys
from swarmbus._jetstream.reads import stored_messages
from swarmbus._jetstream.store import NatsStore
from swarmbus._jetstream.workqueue import (
    KeyValue,
    purge_key,
    read_entry,
    read_last,
    work_queue_stream,
)
from swarmbus._messages import TaskCreated, TaskFailed, envelope_for
from swarmbus._tasks.claims import Claimer, Event, Transitions, announce
from swarmbus._tasks.finishes import Finishes
from swarmbus._tasks.model import (
    RECORD_SLACK,
    STATUSES,
    TASKS_BUCKET,
    TASKS_STREAM,
    TERMINAL,
    Claim,
    Handler,
    Task,
    TaskSpec,
    build,
    count,
    created_key,
    encoder,
    hint_of,
    now,
    offer_of,
    record_of,
    state,
)
from swarmbus._tasks.worker import Worker
from swarmbus._telemetry import continued, traced

__all__ = ["TaskQueue", "offer_lost"]

log = logging.getLogger("swarmbus.tasks")

KV_STREAM = f"KV_{TASKS_BUCKET}"


class TaskQueue:
    """The task queue of one session.

    ``async with TaskQueue(bus, session) as queue`` provisions the stream and bucket
    (idempotent) and closes the claimer's subscriptions on exit.

    Args:
        bus: a connected bus; replicas and storage come from ``bus.settings``.
        session: the session (incident) whose tasks this queue holds.
        ack_wait: seconds before an unacknowledged dispatch message is redelivered;
            the granularity at which expired claims are noticed.
        max_attempts: default claims per task before it goes to dead letter.
        starvation_after: a task waiting this long is claimed before higher
            priorities (0 disables aging).
    """

    #: What ``TaskQueue(bus, ...)`` makes on a Redis/PostgreSQL ``bus`` (module docstring).
    on_store: ClassVar[type[TaskQueue] | None] = None

    def __new__(cls, bus: Bus, *args: Any, **kwargs: Any) -> TaskQueue:
        store = cls.on_store if cls is TaskQueue and bus.settings.backend != "nats" else None
        return object.__new__(store or cls)

    def __init__(
        self,
        bus: Bus,
        session: str,
        *,
        ack_wait: float = 5.0,
        max_attempts: int = 3,
        starvation_after: float = 60.0,
    ) -> None:
        self.bus = bus
        self.session = subjects.validate_session_id(session)
        if not count(max_attempts) or ack_wait <= 0 or max_attempts < 1 or starvation_after < 0:
            raise InvalidTaskError("queue", "ack_wait > 0, max_attempts >= 1, aging >= 0")
        self.ack_wait = ack_wait
        self.max_attempts = max_attempts
        self.starvation_after = starvation_after
        self._store: NatsStore | None = None
        self._acks = AckPublisher(bus.nc, bus.settings.request_timeout)
        self._claimer = Claimer(self)
        self._transitions = Transitions(self, self._claimer.open_claims)
        self._finishes = Finishes(self)

    # --- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> TaskQueue:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the dispatch stream and the record bucket if missing."""
        await self.bus.ensure_stream(
            work_queue_stream(
                TASKS_STREAM,
                subjects.TASK_WILDCARD,
                storage=self.bus._storage(),
                replicas=self.bus.settings.replicas,
                max_consumers=self.bus.settings.task_max_consumers,
            )
        )
        kv = await self.bus.key_value(TASKS_BUCKET, history=1)
        self._store = NatsStore(kv)

    async def close(self) -> None:
        """Stop this claimer's subscriptions (stream, bucket and tasks stay)."""
        await self._claimer.close()
        await self._finishes.close()
        await self._acks.close()

    @property
    def kv(self) -> KeyValue:
        return self.store.kv

    @property
    def store(self) -> NatsStore:
        """The record bucket (listing reads go through it)."""
        if self._store is None:
            raise SwarmbusError("TaskQueue is not open: use `async with TaskQueue(...)`")
        return self._store

    def _key(self, task_id: str) -> str:
        return f"{self.session}.{task_id}"

    # --- create / approve / query -------------------------------------------------

    async def create(
        self,
        type: str,
        *,
        agent: str,
        priority: int = 5,
        target: str = "",
        context: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
        requires_approval: bool = False,
        max_attempts: int | None = None,
        approvers: Iterable[str] = (),
    ) -> Task:
        """Create a pending task and offer it to claimers (after approval, if required).

        ``approvers``: the agents whose vote approves it (none: the session's members).

        Raises:
            InvalidTaskError: bad priority, type, parameters or constraints; nothing stored.
        """
        spec = TaskSpec(
            type=type,
            priority=priority,
            target=target,
            context={} if context is None else context,
            timeout=timeout,
            requires_approval=requires_approval,
            max_attempts=max_attempts,
            approvers=tuple(approvers),
        )
        (task,) = await self.create_many([spec], agent=agent)
        return task

    async def create_many(self, specs: Iterable[TaskSpec], *, agent: str) -> list[Task]:
        """Create several tasks with pipelined writes (every spec is validated first).

        One pipelined round trip: per task its dispatch message and its creation copy
        (the task as created, under a key of its own) and the stored
        ``task.created`` event. The record itself is created by the first claim
        (create-once at revision 0, the exactly-once commit point). A dispatch message
        removed by someone else (a TERM or ACK of a message it fetched) is offered again
        from the copy or the record by the service's sweep (``offer_lost``). A task that
        needs approval gets its record only (votes compare-and-set it), and is offered
        once approved.
        """
        self.bus.act_as(agent)
        tasks = [
            build(spec, agent=agent, session=self.session, max_attempts=self.max_attempts)
            for spec in specs
        ]
        encoded = _encoded(tasks, self.bus.nc.max_payload - RECORD_SLACK)
        writes: list[tuple[str, bytes, dict[str, str]]] = []
        contexts: list[dict[str, str]] = []  # the trace each task's event continues
        for task, data in zip(tasks, encoded, strict=True):
            if task.approval != "none":
                write = self._record(task)
                writes.append(write)
            else:  # the dispatch first: the server hands it to a waiting claimer sooner
                write = self._offer(task, 0, data=data)
                writes += [write, _copy(self.session, task, data)]
            contexts.append(write[2])
        self._finishes.note_created(task.id for task in tasks)  # before a claim can write
        results = iter(await self._acks.collect(await self._acks.send(writes)))
        refused: int | Refused | ConnectionError | None = None
        for t, headers in zip(tasks, contexts, strict=True):
            acks = [next(results) for _ in range(1 if t.approval != "none" else 2)]
            failed = [ack for ack in acks if not isinstance(ack, int)]
            if failed:  # not announced: it may not exist (the caller gets PublishError)
                refused = refused or failed[0]
                continue
            with continued(headers):  # outside a trace: the task's
                await self._events([(_created(t), agent, f"task:{t.id}:created")])
        if refused is not None:
            _stored(refused, self.session)
        return tasks

    def _trace(self, task: Task) -> dict[str, str]:
        return {"swarmbus.session": self.session, "swarmbus.task_id": task.id}

    def _offer(
        self, task: Task, revision: int, again: str = "", *, data: bytes | None = None
    ) -> tuple[str, bytes, dict[str, str]]:
        """The dispatch message of ``task``: the task and the revision its claim
        compares against (0: no record). ``again`` sets a sweep's re-offer apart from
        the dispatch it replaces (the stream de-duplicates by id)."""
        destination = subjects.task_subject(self.session, task.type, task.priority)
        headers = {MSG_ID_HEADER: f"task:{task.id}:dispatch{again}"}
        if revision:  # absent: 0 (nats-py parses headers character by character)
            headers[REVISION_HEADER] = str(revision)
        return (
            f"{destination}.{task.id}",
            encoder.encode(task) if data is None else data,
            traced(headers, destination, self._trace(task)),
        )

    def _record(self, task: Task) -> tuple[str, bytes, dict[str, str]]:
        """The create-once write of ``task``'s record (subject, data, headers)."""
        subject = subjects.kv_subject(TASKS_BUCKET, self._key(task.id))
        headers = traced({EXPECTED_LAST_HEADER: "0"}, subject, self._trace(task), new_trace=False)
        return subject, encoder.encode(task), headers

    async def get(self, task_id: str) -> Task:
        """The current record of a task.

        Raises:
            NotFoundError: no such task in this session.
            InvalidMessageError: its record is broken (written by something else).
        """
        return (await self._read(task_id))[0]

    async def _read(self, task_id: str) -> tuple[Task, int]:
        """The task and the revision to compare-and-set against (0: no record yet)."""
        if not isinstance(task_id, str) or not task_id or len(task_id) > 128:
            raise NotFoundError("task", str(task_id))
        try:
            subjects.validate_name("task id", task_id)
        except SwarmbusError:
            raise NotFoundError("task", task_id) from None
        found = await self._record_of(task_id)
        if found is None:
            # Not claimed yet: the dispatch message is the task. Read the bucket once
            # more if it is gone too: a claim may have created the record meanwhile.
            offered = await self._dispatched(task_id)
            found = (offered, 0) if offered is not None else await self._record_of(task_id)
        if found is None:
            # Its dispatch message was removed before any claim (the sweep offers it
            # again), or it is unknown. A pruned task's copy went before its record.
            copy = await _copy_of(self, task_id)
            found = (copy, 0) if copy is not None else None
        if found is None:
            raise NotFoundError("task", task_id)
        return found

    async def _record_of(self, task_id: str) -> tuple[Task, int] | None:
        entry = await read_entry(self.kv, self._key(task_id), f"cannot read task {task_id}")
        if entry is None:
            return None
        value, revision = entry
        return record_of(value, self.session, task_id), revision

    async def _dispatched(self, task_id: str) -> Task | None:
        """The task a pending dispatch message carries (None if there is none)."""
        pattern = subjects.task_filter(self.session, task_id)
        data = await read_last(self.bus.js, TASKS_STREAM, pattern, f"cannot read task {task_id}")
        task = None if data is None else hint_of(data)
        return task if task is not None and task.id == task_id else None

    async def wait(self, task_id: str) -> Task:
        """The task's final record (completed, or failed for good), once written: see
        ``swarmbus._tasks.finishes``. Bound it with ``anyio.fail_after``; NotFoundError;
        SwarmbusError if the queue is closed meanwhile."""
        return await self._finishes.wait(task_id)

    async def tasks(self, status: str | None = None) -> list[Task]:
        """Every task of the session (optionally only one status), oldest first.

        Raises:
            InvalidTaskError: ``status`` is not a task status.
        """
        if status is not None and status not in STATUSES:
            raise InvalidTaskError("status", f"{status!r} is not one of {', '.join(STATUSES)}")
        # Creation copies, then dispatch messages, then records: a task claimed
        # meanwhile is in the bucket by the time the records are read (the other order
        # could miss it).
        copies = {t.id: t for t in await records_of(self, copies=True)}
        offered = {t.id: t for t in await offered_of(self)}
        records = {t.id: t for t in await records_of(self)}
        for task_id in copies.keys() - offered.keys() - records.keys():
            if await _has_entry(self, task_id):  # pruned meanwhile (or a broken record)
                del copies[task_id]
        tasks = list({**copies, **offered, **records}.values())
        tasks.sort(key=lambda t: t.created_at or now())
        return [t for t in tasks if status is None or t.status == status]

    async def prune(self, *, older_than: float) -> list[str]:
        """Delete the records of this session's tasks that finished ``older_than`` seconds
        ago or earlier; returns their ids.

        Finished records are kept until pruned: an expiry (TTL) on them would not be
        safe, since a dispatch message whose ack was lost can outlive its record and
        would then run its task again. So a record goes only when no dispatch message
        of its task is left in the stream; a finished task is never offered again, so
        none can appear later. Its key is purged, leaving a purge marker (no value): with
        no entry at all, a claimer still holding a copy of the dispatch message (pulled
        before the task finished, settled after the prune) would create the record anew
        and run the task again.

        Raises:
            InvalidTaskError: ``older_than`` is not a number of seconds >= 0.
            ConnectionError: NATS failed (records pruned before that stay pruned).
        """
        if isinstance(older_than, bool) or not isinstance(older_than, int | float):
            raise InvalidTaskError("older_than", f"must be seconds, got {older_than!r}")
        if not 0 <= older_than < math.inf:
            raise InvalidTaskError("older_than", f"must be >= 0 seconds, got {older_than!r}")
        cutoff = time.time() - older_than
        # Records first: a task finishing meanwhile is not in this list, and a
        # dispatch message of a listed one cannot be created after it is read.
        finished = [
            task.id
            for task in await records_of(self)
            if task.status in TERMINAL
            and task.completed_at is not None
            and task.completed_at.timestamp() <= cutoff
        ]
        offered = {t.id for t in await offered_of(self)}
        copies = {t.id for t in await records_of(self, copies=True)}
        pruned = [task_id for task_id in finished if task_id not in offered]
        for task_id in pruned:
            # The copy first: a copy without a record would be offered again (a record
            # left without its copy is harmless).
            keys = [created_key(self.session, task_id)] if task_id in copies else []
            for key in [*keys, self._key(task_id)]:
                subject = subjects.kv_subject(TASKS_BUCKET, key)
                await purge_key(
                    self.kv,
                    key,
                    f"cannot prune the tasks of {self.session}",
                    self.bus._permission_guard(subject, "prune tasks"),
                )
        return pruned

    async def approve(self, task_id: str, *, by: str) -> Task:
        """Let a ``requires_approval`` task be claimed (called by a consensus decision).

        Idempotent: approving an approved task re-offers it and changes nothing else.

        Raises:
            NotFoundError: unknown task.
            InvalidTransitionError: the task needs no approval, or was rejected.
        """
        subjects.validate_agent_id(by)
        created = await kv_context(self.kv, self._key(task_id))  # the trace to continue
        while True:
            task, revision = await self._read(task_id)
            if task.approval == "approved":
                if task.status == "pending":
                    with continued(created):
                        await self._redispatch(task, revision)
                return task
            if task.approval != "required" or task.status != "pending":
                raise InvalidTransitionError("task", task_id, state(task), "approved")
            approved = msgspec.structs.replace(task, approval="approved", approved_by=by)
            with anyio.CancelScope(shield=True):  # a stored approval must be offered
                new_revision = await self._cas(approved, revision)
                if new_revision is not None:
                    with continued(created):
                        await self._redispatch(approved, new_revision)
            if new_revision is None:
                continue
            return approved

    async def reject(self, task_id: str, *, by: str, reason: str = "rejected") -> Task:
        """Refuse a ``requires_approval`` task: it fails without running.

        Raises:
            NotFoundError: unknown task.
            InvalidTransitionError: the task is not awaiting approval.
        """
        subjects.validate_agent_id(by)
        while True:
            task, revision = await self._read(task_id)
            if task.approval != "required" or task.status != "pending":
                raise InvalidTransitionError("task", task_id, state(task), "rejected")
            rejected = msgspec.structs.replace(
                task,
                approval="rejected",
                approved_by=by,
                status="failed",
                error=f"rejected by {by}: {reason}",
                completed_at=now(),
            )
            if await self._cas(rejected, revision) is None:
                continue
            await self._events(
                [(TaskFailed(task_id=task.id, error=rejected.error or ""), by, None)]
            )
            return rejected

    async def cancel(self, task_id: str, *, by: str, reason: str) -> Task:
        """Fail an unfinished task for good, without a claim (e.g. a swarm's deadline).

        A claim still held on it is lost: its next call raises ``TaskClaimLostError``.
        A finished task is returned as it is.

        Raises:
            NotFoundError: unknown task.
        """
        subjects.validate_agent_id(by)
        while True:
            task, revision = await self._read(task_id)
            if task.status in TERMINAL:
                return task
            failed = msgspec.structs.replace(
                task, status="failed", error=f"cancelled by {by}: {reason}", completed_at=now()
            )
            if await self._cas(failed, revision) is None:
                continue
            event = TaskFailed(task_id=task.id, error=failed.error or "", attempts=task.attempts)
            await self._events([(event, by, None)])
            return failed

    async def _redispatch(self, task: Task, revision: int) -> None:
        (result,) = await self._acks.publish([self._offer(task, revision)])
        _stored(result, self.session)

    # --- claims (``claims.Claimer``, ``claims.Transitions``) ------------------------

    async def claim(
        self, *, agent: str, types: Sequence[str], timeout: float | None = None
    ) -> Claim | None:
        """Claim the next task of one of ``types``: highest priority first, FIFO within.

        Waits up to ``timeout`` seconds (None: only what is available now) and returns
        None if nothing could be claimed.
        """
        claims = await self.claim_many(agent=agent, types=types, limit=1, timeout=timeout)
        return claims[0] if claims else None

    async def claim_many(
        self,
        *,
        agent: str,
        types: Sequence[str],
        limit: int,
        timeout: float | None = None,
    ) -> list[Claim]:
        """Claim up to ``limit`` tasks, all from the highest non-empty priority.

        Raises:
            InvalidTaskError: ``limit`` is not a count >= 1, or ``types`` is not a list
                of task types (a bare string would be read as its letters).
        """
        return await self._claimer.claim_many(
            agent=agent, types=types, limit=limit, timeout=timeout
        )

    async def _cas(self, task: Task, revision: int) -> int | None:
        return await self._transitions.cas(task, revision)

    async def _cas_many(
        self, writes_in: Sequence[tuple[Task, int]]
    ) -> list[int | ConnectionError | None]:
        return await self._transitions.cas_many(writes_in)

    async def _settle_unknown(
        self, task: Task, revision: int, subject: str, data: bytes, headers: dict[str, str]
    ) -> int | ConnectionError | None:
        return await self._transitions.settle_unknown(task, revision, subject, data, headers)

    async def _transition(
        self, claim: Claim, change: Callable[[Task], Task], requested: str
    ) -> Task:
        return await self._transitions.transition(claim, change, requested)

    async def _heartbeat(self, claim: Claim) -> None:
        await self._transitions.heartbeat(claim)

    async def _complete(self, claim: Claim, result: Mapping[str, Any] | None) -> Task:
        return await self._transitions.complete(claim, result)

    async def _fail(self, claim: Claim, error: str, *, retry: bool) -> Task:
        return await self._transitions.fail(claim, error, retry=retry)

    async def _announce(self, claim: Claim, agent: str) -> None:
        with continued(claim._msg.headers):  # in its task's trace
            await self._events([announce(claim, agent)])

    # --- worker loop (``worker.Worker``) ---------------------------------------------

    async def work(
        self,
        handler: Handler,
        *,
        agent: str,
        types: Sequence[str],
        stop: anyio.Event,
        concurrency: int = 64,
    ) -> None:
        """Claim and run tasks until ``stop`` is set, then finish the claimed ones.

        ``handler(task)`` returns the result; if it raises (or its result is not a JSON
        object), the task is failed with ``retry=True``. See ``swarmbus._tasks.worker``;
        between claims the claimer keeps its dispatch subscriptions (``claims.Claimer``).
        """
        worker = Worker(self, handler, agent=agent, types=types, stop=stop, concurrency=concurrency)
        async with self._claimer.lingering():
            await worker.run()

    # --- events ------------------------------------------------------------------------

    async def _events(self, items: Iterable[Event]) -> None:
        """Publish lifecycle events without waiting for their acks; failures are logged.

        Notifications, the record is the source of truth: each is published after its
        transition was stored, in order (the event stream de-duplicates them by id; a
        store it refuses goes unnoticed): who must not miss one reads the records.
        """
        for body, agent, id in items:
            try:
                # Bodies built here from validated records: no need for publish()'s
                # encode/decode round trip.
                message = envelope_for(body, agent=agent, session=self.session, id=id)
                await self.bus.publish_message(message, wait=False)
            except SwarmbusError as exc:
                log.error("could not publish %s: %s", type(body).__name__, exc)


def _encoded(tasks: Sequence[Task], room: int) -> list[bytes]:
    """Each task encoded; InvalidTaskError if one is larger than ``room`` bytes (the
    server would refuse its writes, and close the connection that sent them)."""
    encoded = [encoder.encode(task) for task in tasks]
    for task, data in zip(tasks, encoded, strict=True):
        if len(data) > room:
            raise InvalidTaskError("parameters", f"task {task.id} is {len(data)} bytes > {room}")
    return encoded


async def records_of(queue: TaskQueue, *, copies: bool = False) -> list[Task]:
    """The session's task records (``copies``: its creation copies), as stored now."""
    prefix = created_key(queue.session, "") if copies else f"{queue.session}."
    records = [
        _task_of(entry.value, queue.session, entry.key.removeprefix(prefix))
        for entry in await queue.store.list(prefix)
        if entry.value
    ]
    return [task for task in records if task is not None]


def _task_of(value: bytes, session: str, task_id: str) -> Task | None:
    """The task a record or copy holds; None if it is broken (written by something
    else: skipped, logged)."""
    try:
        return record_of(value, session, task_id)
    except InvalidMessageError as exc:
        log.warning("skipping a broken task record: %s", exc.reason)
        return None


async def offered_of(queue: TaskQueue) -> list[Task]:
    """The tasks the session's pending dispatch messages carry."""
    msgs = await stored_messages(queue.bus.js, TASKS_STREAM, subjects.task_filter(queue.session))
    offered: list[Task] = []
    for msg in msgs:
        headers = msg.headers or {}
        subject = headers.get(STORED_SUBJECT_HEADER, msg.subject)  # a direct get's reply
        try:
            offered.append(offer_of(subject, msg.data, headers, queue.session).task)
        except InvalidMessageError:  # a claimer dead-letters it
            continue
    return offered


def _copy(session: str, task: Task, data: bytes) -> tuple[str, bytes, dict[str, str]]:
    """The creation copy of ``task`` (subject, data, headers): what the sweep offers again
    if its dispatch message is removed before any claim wrote the record. Its key's
    first token is no session id: no listing or watch of a session's records sees it."""
    return subjects.kv_subject(TASKS_BUCKET, created_key(session, task.id)), data, {}


async def _copy_of(queue: TaskQueue, task_id: str) -> Task | None:
    """The creation copy of ``task_id`` (None if there is none, or if it is broken:
    written by something else, it is no task)."""
    key = created_key(queue.session, task_id)
    entry = await read_entry(queue.kv, key, f"cannot read task {task_id}")
    return None if entry is None else _task_of(entry[0], queue.session, task_id)


async def _has_entry(queue: TaskQueue, task_id: str) -> bool:
    """Whether ``task_id``'s record key has a last entry (a record, readable or not, or
    a pruned record's marker): a direct get of the key's last message."""
    key = subjects.kv_subject(TASKS_BUCKET, queue._key(task_id))
    return await read_last(queue.bus.js, KV_STREAM, key, f"cannot read task {task_id}") is not None


async def offer_lost(queue: TaskQueue, *, grace: float, limit: int = 100) -> list[str]:
    """Offer again the claimable tasks of ``queue`` whose dispatch message is gone.

    Any claimer can TERM or ACK a dispatch it fetched, another agent's too, which
    removes it from the work-queue stream. Before the first claim the task's creation
    copy is then all that is left of it; after a claim, its record (pending again, or
    with an expired lease): either would wait with nothing left to claim it by. Run by
    the service's task sweep (``swarmbus._runtime.timeouts``). A task is a candidate if
    nothing happened to it for ``grace`` seconds (its dispatch may still be on its way)
    and the session's stream holds no message of it; each candidate is checked once
    more by direct gets (the last message on its dispatch subject; a copy's record key,
    which must have no entry at all, not even a pruned record's marker) and offered
    again at the revision read (0 for a copy: the claim creates the record). At most
    ``limit`` offers per call (candidates that turn out not to be lost do not count:
    they cannot starve the ones that are).
    """
    copies = await records_of(queue, copies=True)  # a copy precedes its record
    records = await records_of(queue)  # records first: see ``TaskQueue.tasks``
    offered = {t.id for t in await offered_of(queue)}
    cutoff = now().timestamp() - grace
    recorded = {t.id for t in records}
    # Record keys with any entry (markers and broken records too): their copies are done.
    keys = await entry_keys(queue.store, f"{queue.session}.>")
    lost = [t for t in records if t.id not in offered and _stranded(t, cutoff)]
    lost += [
        t
        for t in copies
        if queue._key(t.id) not in keys and t.id not in offered and _stranded(t, cutoff)
    ]
    again: list[str] = []
    for candidate in lost:
        if len(again) >= limit:
            break
        what = f"cannot re-offer task {candidate.id}"
        pattern = subjects.task_filter(queue.session, candidate.id)
        if await read_last(queue.bus.js, TASKS_STREAM, pattern, what) is not None:
            continue
        if candidate.id in recorded:
            found = await queue._record_of(candidate.id)
        else:  # a copy: offered only while its record key has no entry at all
            found = None if await _has_entry(queue, candidate.id) else (candidate, 0)
        if found is None or not _stranded(found[0], cutoff):
            continue
        task, revision = found
        tag = f":{revision}:{time.time_ns()}"
        (result,) = await queue._acks.publish([queue._offer(task, revision, tag)])
        _stored(result, queue.session)
        log.warning("task %s had lost its dispatch message: offered again", task.id)
        again.append(task.id)
    return again


def _stranded(task: Task, cutoff: float) -> bool:
    """``task`` can be claimed, and nothing happened to it since ``cutoff``."""
    if task.approval in ("required", "rejected") or task.attempts >= task.max_attempts:
        return False
    if task.status in TERMINAL:
        return False
    times = (task.created_at, task.claimed_at, task.lease_until)
    last = max((t.timestamp() for t in times if t is not None), default=0.0)
    return last <= cutoff


def _created(task: Task) -> TaskCreated:
    return TaskCreated(
        task_id=task.id,
        type=task.type,
        parameters=msgspec.to_builtins(task.parameters),
        priority=task.priority,
        requires_approval=task.constraints.requires_approval,
    )


def _stored(ack: int | Refused | ConnectionError, session: str) -> int:
    """The sequence of a publish that must have been stored, else PublishError."""
    if not isinstance(ack, int):
        raise PublishError(f"cannot store tasks of session {session}: {ack}")
    return ack
