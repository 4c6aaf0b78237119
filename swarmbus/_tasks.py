"""The task queue: distribute a session's work across agents, exactly-once completion.

Two JetStream pieces (see README "Task queue"):

* **Dispatch**: a work-queue stream ``SWARMBUS_TASKS``, one queue per session, task
  type and priority (``swarmbus.task.<session>.<type>.<priority>``, a task's message on
  ``<queue>.<task id>``) and one durable pull consumer per queue, shared by every
  claimer. A claimer drains the highest non-empty priority first; within a priority
  the stream is FIFO. Until its first claim the dispatch message *is* the task; it
  carries the task and the revision a claim compares against (0: no record yet), and
  is acked once the task is final.
* **State**: the KV bucket ``swarmbus-tasks`` holds one record per claimed (or
  approval-gated) task under ``<session>.<task id>``, created by the first claim
  (create-once). Every transition is a compare-and-set on the record's revision, and
  each claim increments ``attempts``, which is the claim's fencing token: the CAS on
  the record, not the JetStream ack, is the commit point, so a redelivered dispatch
  message can never make a task complete twice.

Lifecycle events are notifications published after the record changed, without
waiting for their acks. Writes are pipelined in batches (``AckPublisher``) for throughput;
each keeps its own compare-and-set outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig
from nats.js.kv import KeyValue

from swarmbus import _subjects as subjects
from swarmbus._bus import Bus
from swarmbus._errors import (
    ConnectionError,
    InvalidTaskError,
    InvalidTransitionError,
    NotFoundError,
    PublishError,
    SwarmbusError,
    TaskClaimLostError,
)
from swarmbus._jetstream.acks import AckPublisher, Refused
from swarmbus._jetstream.errors import translate as _translate
from swarmbus._jetstream.headers import EXPECTED_LAST_SUBJECT_SEQUENCE as EXPECTED_LAST_HEADER
from swarmbus._jetstream.headers import MSG_ID as MSG_ID_HEADER
from swarmbus._jetstream.headers import TASK_REVISION as REVISION_HEADER
from swarmbus._jetstream.headers import WRONG_LAST_SEQUENCE as _WRONG_LAST
from swarmbus._jetstream.kv import kv_context
from swarmbus._jetstream.reads import (
    PullInbox,
    deliveries,
    kv_latest,
    quietly,
    stored_messages,
    unsubscribe_all,
)
from swarmbus._messages import (
    TaskAssigned,
    TaskCompleted,
    TaskCreated,
    TaskFailed,
    envelope_for,
    new_id,
)
from swarmbus._telemetry import continued, process_span, traced

__all__ = ["Claim", "Task", "TaskQueue", "TaskSpec"]

log = logging.getLogger("swarmbus.tasks")

TASKS_STREAM: Final = "SWARMBUS_TASKS"
TASKS_BUCKET: Final = "swarmbus-tasks"
MIN_PRIORITY: Final = 1
MAX_PRIORITY: Final = 10
STATUSES: Final = ("pending", "assigned", "running", "completed", "failed")
TERMINAL: Final = frozenset({"completed", "failed"})

Status = Literal["pending", "assigned", "running", "completed", "failed"]
Approval = Literal["none", "required", "approved", "rejected"]
Priority = Annotated[int, msgspec.Meta(ge=MIN_PRIORITY, le=MAX_PRIORITY)]
Timeout = Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)]


class TaskParameters(msgspec.Struct, kw_only=True, frozen=True):
    """What to work on (the seed's ``parameters``)."""

    target: str = ""
    context: dict[str, Any] = {}


class TaskConstraints(msgspec.Struct, kw_only=True, frozen=True):
    """The seed's ``constraints``: seconds without a heartbeat before a claim expires."""

    timeout: Timeout = 60.0
    requires_approval: bool = False


class Task(msgspec.Struct, kw_only=True, frozen=True):
    """A task record as stored in the ``swarmbus-tasks`` bucket (and returned to callers).

    The seed's fields first; the rest is what real use needs. Wire-evolution rule:
    add fields with defaults at the end only.
    """

    id: str
    type: str
    priority: Priority = 5
    assigned_to: str | None = None
    parameters: TaskParameters = TaskParameters()
    constraints: TaskConstraints = TaskConstraints()
    status: Status = "pending"
    result: dict[str, Any] | None = None
    session: str = ""
    created_by: str = ""
    attempts: int = 0
    max_attempts: int = 3
    error: str | None = None
    dead: bool = False
    approval: Approval = "none"
    approved_by: str | None = None
    created_at: datetime | None = None
    claimed_at: datetime | None = None
    completed_at: datetime | None = None
    #: Wall-clock time after which the current claim may be taken over.
    lease_until: datetime | None = None


@dataclass(frozen=True)
class TaskSpec:
    """Arguments of one task for ``TaskQueue.create_many``."""

    type: str
    priority: int = 5
    target: str = ""
    context: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 60.0
    requires_approval: bool = False
    max_attempts: int | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Task)


def _count(value: object) -> bool:
    """Whether ``value`` is an int (a bool is not): what a record's counters decode as."""
    return isinstance(value, int) and not isinstance(value, bool)


def _now() -> datetime:
    return datetime.now(UTC)


def _after(seconds: float) -> datetime:
    return datetime.fromtimestamp(time.time() + seconds, UTC)


class Claim:
    """One agent's hold on a task, fenced by its attempt number.

    Use ``heartbeat`` while working (it extends the claim by the task's timeout) and
    finish with ``complete`` or ``fail``. Once the claim expired and someone else
    claimed the task, every call raises ``TaskClaimLostError`` and changes nothing.
    """

    def __init__(self, queue: TaskQueue, task: Task, revision: int, msg: Msg) -> None:
        self._queue = queue
        self.task = task
        self.revision = revision
        self._msg = msg
        self._lock = asyncio.Lock()  # no checkpoint when free, unlike anyio.Lock
        self.finished = False

    @property
    def attempt(self) -> int:
        """The fencing token of this claim (the task's attempt number)."""
        return self.task.attempts

    async def heartbeat(self) -> None:
        """Mark the task running and extend the claim by its timeout."""
        await self._queue._heartbeat(self)

    async def complete(self, result: Mapping[str, Any] | None = None) -> Task:
        """Record the result; only one completion of a task ever succeeds."""
        return await self._queue._complete(self, result)

    async def fail(self, error: str, *, retry: bool = False) -> Task:
        """Record a failure; with ``retry`` the task is offered again (until max attempts)."""
        return await self._queue._fail(self, error, retry=retry)


Handler = Callable[[Task], Awaitable[Mapping[str, Any] | None]]


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
        if not _count(max_attempts) or ack_wait <= 0 or max_attempts < 1 or starvation_after < 0:
            raise InvalidTaskError("queue", "ack_wait > 0, max_attempts >= 1, aging >= 0")
        self.ack_wait = ack_wait
        self.max_attempts = max_attempts
        self.starvation_after = starvation_after
        self._kv: KeyValue | None = None
        self._pullers: dict[tuple[str, int], _Puller] = {}
        self._inbox = PullInbox(bus.nc, bus.settings.request_timeout)
        self._last_aging = 0.0
        # One pull at a time per queue object: the pullers share one reply inbox.
        self._scan_lock = anyio.Lock()
        self._acks = AckPublisher(bus.nc, bus.settings.request_timeout)
        self._writes: list[tuple[Task, int, asyncio.Future[int | None]]] = []

    # --- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> TaskQueue:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the dispatch stream and the record bucket if missing."""
        await self.bus.ensure_stream(
            StreamConfig(
                name=TASKS_STREAM,
                subjects=[subjects.TASK_WILDCARD],
                retention=RetentionPolicy.WORK_QUEUE,
                allow_direct=True,  # tasks() lists pending tasks with batch direct gets
                storage=self.bus._storage(),
                num_replicas=self.bus.settings.replicas,
                duplicate_window=120.0,
            )
        )
        self._kv = await self.bus.key_value(TASKS_BUCKET, history=1)

    async def close(self) -> None:
        """Stop this claimer's subscriptions (stream, bucket and tasks stay)."""
        self._pullers.clear()
        await self._inbox.close()
        await self._acks.close()

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise SwarmbusError("TaskQueue is not open: use `async with TaskQueue(...)`")
        return self._kv

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
    ) -> Task:
        """Create a pending task and offer it to claimers (after approval, if required).

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
        )
        (task,) = await self.create_many([spec], agent=agent)
        return task

    async def create_many(self, specs: Iterable[TaskSpec], *, agent: str) -> list[Task]:
        """Create several tasks with pipelined writes (every spec is validated first).

        One acknowledged write per task, all in one round trip: the dispatch message,
        which is the task until its first claim creates the record (create-once, so
        two claimers cannot both win). A task that needs approval is stored as a record
        instead, and offered once approved.
        """
        self.bus.act_as(agent)
        tasks = [self._build(spec, agent) for spec in specs]
        writes = [
            self._offer(task, 0) if task.approval == "none" else self._record(task)
            for task in tasks
        ]
        for result in await self._acks.publish(writes):
            _stored(result, self.session)
        for t, (_, _, headers) in zip(tasks, writes, strict=True):
            with continued(headers):  # outside a trace: the one its dispatch started
                await self._events(
                    [
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
                    ]
                )
        return tasks

    def _build(self, spec: TaskSpec, agent: str) -> Task:
        try:
            subjects.validate_name("task type", spec.type)
        except SwarmbusError as exc:
            raise InvalidTaskError("type", str(exc)) from None
        if isinstance(spec.priority, bool) or not isinstance(spec.priority, int):
            raise InvalidTaskError("priority", f"must be an integer, got {spec.priority!r}")
        if not MIN_PRIORITY <= spec.priority <= MAX_PRIORITY:
            raise InvalidTaskError(
                "priority", f"{spec.priority} is outside {MIN_PRIORITY}..{MAX_PRIORITY}"
            )
        max_attempts = self.max_attempts if spec.max_attempts is None else spec.max_attempts
        if not _count(max_attempts) or max_attempts < 1:
            raise InvalidTaskError("max_attempts", f"must be an integer >= 1, got {max_attempts!r}")
        try:
            parameters = msgspec.convert(
                {"target": spec.target, "context": spec.context}, TaskParameters
            )
            constraints = msgspec.convert(
                {"timeout": spec.timeout, "requires_approval": spec.requires_approval},
                TaskConstraints,
            )
            _encoder.encode(parameters)
        except (msgspec.ValidationError, TypeError) as exc:
            raise InvalidTaskError("parameters", str(exc)) from None
        return Task(
            id=new_id(),
            type=spec.type,
            priority=spec.priority,
            parameters=parameters,
            constraints=constraints,
            session=self.session,
            created_by=agent,
            max_attempts=max_attempts,
            approval="required" if spec.requires_approval else "none",
            created_at=_now(),
        )

    def _trace(self, task: Task) -> dict[str, str]:
        return {"swarmbus.session": self.session, "swarmbus.task_id": task.id}

    def _offer(self, task: Task, revision: int) -> tuple[str, bytes, dict[str, str]]:
        """The dispatch message of ``task`` (subject, data, headers).

        It carries the task and the revision its claim must compare against: 0 while
        the task has no record (its first claim creates it).
        """
        destination = subjects.task_subject(self.session, task.type, task.priority)
        headers = {MSG_ID_HEADER: f"task:{task.id}:dispatch"}
        if revision:  # absent: 0 (nats-py parses headers character by character)
            headers[REVISION_HEADER] = str(revision)
        return (
            f"{destination}.{task.id}",
            _encoder.encode(task),
            traced(headers, destination, self._trace(task)),
        )

    def _record(self, task: Task) -> tuple[str, bytes, dict[str, str]]:
        """The create-once write of ``task``'s record (subject, data, headers)."""
        subject = subjects.kv_subject(TASKS_BUCKET, self._key(task.id))
        headers = traced({EXPECTED_LAST_HEADER: "0"}, subject, self._trace(task), new_trace=False)
        return subject, _encoder.encode(task), headers

    async def get(self, task_id: str) -> Task:
        """The current record of a task.

        Raises:
            NotFoundError: no such task in this session.
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
            raise NotFoundError("task", task_id)
        return found

    async def _record_of(self, task_id: str) -> tuple[Task, int] | None:
        try:
            entry = await self.kv.get(self._key(task_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise ConnectionError(f"cannot read task {task_id}: {exc}") from exc
        assert entry.value is not None
        assert entry.revision is not None
        return _decoder.decode(entry.value), entry.revision

    async def _dispatched(self, task_id: str) -> Task | None:
        """The task a pending dispatch message carries (None if there is none)."""
        pattern = subjects.task_filter(self.session, task_id)
        try:
            stored = await self.bus.js.get_msg(TASKS_STREAM, subject=pattern)
        except nats.js.errors.NotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise ConnectionError(f"cannot read task {task_id}: {exc}") from exc
        return _hint_of(stored.data or b"")

    async def tasks(self, status: str | None = None) -> list[Task]:
        """Every task of the session (optionally only one status), oldest first.

        Raises:
            InvalidTaskError: ``status`` is not a task status.
        """
        if status is not None and status not in STATUSES:
            raise InvalidTaskError("status", f"{status!r} is not one of {', '.join(STATUSES)}")
        # Dispatch messages first: a task claimed meanwhile is in the bucket by the
        # time the bucket is read (the other order could miss it).
        filter = subjects.task_filter(self.session)
        offered = {
            t.id: t
            for t in map(_hint, await stored_messages(self.bus.js, TASKS_STREAM, filter))
            if t is not None
        }
        records = {
            t.id: t
            for t in (
                _decoder.decode(msg.data)
                for _, msg in await kv_latest(self.kv, f"{self.session}.>")
                if msg.data
            )
        }
        tasks = list({**offered, **records}.values())
        tasks.sort(key=lambda t: t.created_at or _now())
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
        try:
            # Records first: a task finishing meanwhile is not in this list, and a
            # dispatch message of a listed one cannot be created after it is read.
            finished = [
                task.id
                for task in (
                    _decoder.decode(msg.data)
                    for _, msg in await kv_latest(self.kv, f"{self.session}.>")
                    if msg.data
                )
                if task.status in TERMINAL
                and task.completed_at is not None
                and task.completed_at.timestamp() <= cutoff
            ]
            filter = subjects.task_filter(self.session)
            offered = {
                t.id
                for t in map(_hint, await stored_messages(self.bus.js, TASKS_STREAM, filter))
                if t is not None
            }
            pruned = [task_id for task_id in finished if task_id not in offered]
            for task_id in pruned:
                subject = subjects.kv_subject(TASKS_BUCKET, self._key(task_id))
                with self.bus._permission_guard(subject, "prune tasks"):
                    await self.kv.purge(self._key(task_id))
        except nats.js.errors.APIError as exc:
            raise _translate(exc, f"cannot prune the tasks of {self.session}") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise ConnectionError(f"cannot prune the tasks of {self.session}: {exc}") from exc
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
                raise InvalidTransitionError("task", task_id, _state(task), "approved")
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
                raise InvalidTransitionError("task", task_id, _state(task), "rejected")
            rejected = msgspec.structs.replace(
                task,
                approval="rejected",
                approved_by=by,
                status="failed",
                error=f"rejected by {by}: {reason}",
                completed_at=_now(),
            )
            if await self._cas(rejected, revision) is None:
                continue
            await self._events(
                [(TaskFailed(task_id=task.id, error=rejected.error or ""), by, None)]
            )
            return rejected

    async def _redispatch(self, task: Task, revision: int) -> None:
        (result,) = await self._acks.publish([self._offer(task, revision)])
        _stored(result, self.session)

    # --- claim ----------------------------------------------------------------------

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
        self.bus.act_as(agent)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidTaskError("limit", f"must be an integer >= 1, got {limit!r}")
        if isinstance(types, str | bytes) or not types:
            raise InvalidTaskError("types", f"must be a non-empty list of types, got {types!r}")
        for type in types:
            subjects.validate_name("task type", type)
        deadline = time.monotonic() + (timeout or 0.0)
        wake = asyncio.Event()
        armed: list[NatsSubscription] = []
        try:
            while True:
                async with self._scan_lock:
                    claims = await self._scan(agent, types, limit)
                if claims:
                    return claims
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                if not armed:
                    # Idle: arm one-shot wake-ups, then scan again (a dispatch may have
                    # come in between). A busy claimer never subscribes, so it does not
                    # receive every dispatch twice.
                    wake.clear()
                    armed = await self._arm(types, wake)
                    continue
                # Redeliveries and delayed naks do not wake us, hence the bounded wait.
                with anyio.move_on_after(min(remaining, self.ack_wait / 2, 0.5)):
                    await wake.wait()
                if wake.is_set():
                    await unsubscribe_all(armed)
                    armed = []
        finally:
            with anyio.CancelScope(shield=True):
                await unsubscribe_all(armed)

    async def _arm(self, types: Sequence[str], wake: asyncio.Event) -> list[NatsSubscription]:
        """One-shot core subscriptions to the dispatch subjects of ``types``."""

        async def on_dispatch(msg: Msg) -> None:
            wake.set()

        armed: list[NatsSubscription] = []
        try:
            for type in types:
                subject = f"{subjects.task_subject(self.session, type, '*')}.*"
                armed.append(await self.bus.nc.subscribe(subject, cb=on_dispatch, max_msgs=1))
        except nats.errors.Error as exc:
            await unsubscribe_all(armed)
            raise ConnectionError(f"cannot wait for tasks: {exc}") from exc
        return armed

    async def _scan(self, agent: str, types: Sequence[str], limit: int) -> list[Claim]:
        claims: list[Claim] = []
        try:
            if self.starvation_after and time.monotonic() - self._last_aging >= 1.0:
                self._last_aging = time.monotonic()
                claims = await self._claim_starved(agent, types)
            for priority in range(MAX_PRIORITY, MIN_PRIORITY - 1, -1):
                for type in types:
                    if len(claims) >= limit:
                        return claims
                    msgs = await (await self._puller(type, priority)).pull(limit - len(claims))
                    claims.extend(await self._settle_all(msgs, agent))
                if claims:
                    return claims
        except ConnectionError as exc:
            if not claims:
                raise
            # Claims already won are returned: their records name this agent, so
            # dropping them would leave those tasks waiting out their leases.
            log.warning("claiming stopped early, %d claimed: %s", len(claims), exc)
        except BaseException:
            # Cancelled: nobody will run the claims won so far. Give them back now,
            # or each would wait out its lease and use up one of its attempts.
            with anyio.CancelScope(shield=True):
                await self._release(claims)
            raise
        return claims

    async def _release(self, claims: Sequence[Claim]) -> None:
        """Undo claims that were never handed out: pending again, at the attempt count
        they had, and their dispatch messages offered again at once."""

        def released(task: Task) -> Task:
            return msgspec.structs.replace(
                task,
                status="pending",
                assigned_to=None,
                attempts=task.attempts - 1,
                claimed_at=None,
                lease_until=None,
            )

        async def release(claim: Claim) -> None:
            try:
                await self._transition(claim, released, "pending")
            except SwarmbusError as exc:  # its lease runs out instead
                log.warning("could not give back task %s: %s", claim.task.id, exc)
                return
            await quietly(claim._msg.nak())

        await asyncio.gather(*(release(c) for c in claims))

    async def _claim_starved(self, agent: str, types: Sequence[str]) -> list[Claim]:
        """Peek at each lower priority's head; claim it if it waited too long."""
        for priority in range(MIN_PRIORITY, MAX_PRIORITY):
            for type in types:
                msgs = await (await self._puller(type, priority)).pull(1)
                for msg in msgs:
                    waited = _age(msg)
                    if waited >= self.starvation_after:
                        claims = await self._settle_all([msg], agent)
                        if claims:
                            return claims
                    else:
                        with contextlib.suppress(nats.errors.Error):
                            await msg.nak()
        return []

    async def _settle_all(self, msgs: list[Msg], agent: str) -> list[Claim]:
        """``_settle_batch``, finished even if the caller is cancelled meanwhile: its
        writes may have landed, and a claim must not be lost on its way to the caller
        (``_scan`` gives the claims back if it was cancelled)."""
        claims: list[Claim] = []
        with anyio.CancelScope(shield=True):
            claims = await self._settle_batch(msgs, agent)
        return claims

    async def _settle_batch(self, msgs: list[Msg], agent: str) -> list[Claim]:
        """Claim what the dispatch messages offer, with one round trip for the batch.

        A first delivery carries the task and its revision: if that task is
        claimable its claim CAS is pipelined with the others (one timeout for all).
        Everything else (redeliveries, a lost CAS race, approvals, dead letter) goes
        through ``_settle`` one message at a time.
        """
        fast: list[tuple[Msg, Task, int]] = []
        slow: list[tuple[Msg, bool]] = []
        for msg in msgs:
            hint = _hint(msg)
            headers = msg.headers or {}
            if (
                hint is not None
                and deliveries(msg) == 1
                and hint.status == "pending"
                and hint.approval in ("none", "approved")
                and hint.attempts < hint.max_attempts
            ):
                fast.append((msg, _claimed(hint, agent), int(headers.get(REVISION_HEADER, 0))))
            else:
                slow.append((msg, True))
        claims: list[Claim] = []
        error: ConnectionError | None = None
        revisions = await self._cas_many([(task, revision) for _, task, revision in fast])
        for (msg, task, _), revision in zip(fast, revisions, strict=True):
            if isinstance(revision, ConnectionError):
                error = revision  # unacked: the redelivery sees the lease, if it was taken
            elif revision is None:
                slow.append((msg, False))  # someone else moved the record: read it
            else:
                claims.append(Claim(self, task, revision, msg))
        if slow:
            results: list[Claim | None] = [None] * len(slow)

            async def one(i: int, msg: Msg, trust_hint: bool) -> None:
                nonlocal error
                try:
                    results[i] = await self._settle(msg, agent, trust_hint=trust_hint)
                except ConnectionError as exc:  # not the others' claims: keep going
                    error = exc
                    await quietly(msg.nak(delay=0.5))

            async with anyio.create_task_group() as tg:
                for i, (msg, trust_hint) in enumerate(slow):
                    tg.start_soon(one, i, msg, trust_hint)
            claims.extend(c for c in results if c is not None)
        if error is not None and not claims:
            raise error
        for c in claims:  # each in its task's trace
            with continued(c._msg.headers):
                await self._events([(TaskAssigned(task_id=c.task.id, agent_id=agent), agent, None)])
        return claims

    async def _settle(self, msg: Msg, agent: str, *, trust_hint: bool = True) -> Claim | None:
        """Decide what one dispatch message means now; claim its task if possible."""
        hint = _hint(msg)
        if hint is None:
            log.error("dropping a malformed dispatch message on %s", msg.subject)
            await quietly(msg.term())
            return None
        task_id = hint.id
        headers = msg.headers or {}
        first = trust_hint and deliveries(msg) == 1
        for _ in range(5):
            if first:
                # First delivery: trust the task it carries; the CAS checks it.
                task, revision, first = hint, int(headers.get(REVISION_HEADER, 0)), False
            else:
                # No record yet: nobody claimed it, this message is the task.
                task, revision = await self._record_of(task_id) or (hint, 0)
            if task.status in TERMINAL:
                await quietly(msg.ack())
                return None
            if task.approval in ("required", "rejected"):
                await quietly(msg.ack())  # approve() offers it again
                return None
            lease = task.lease_until
            if task.status != "pending" and lease is not None:
                remaining = (lease - _now()).total_seconds()
                if remaining > 0:
                    await quietly(msg.nak(delay=remaining + 0.05))
                    return None
            if task.attempts >= task.max_attempts:
                reason = "claim timed out" if task.status != "pending" else (task.error or "")
                dead = msgspec.structs.replace(
                    task,
                    status="failed",
                    dead=True,
                    error=f"gave up after {task.attempts} attempts: {reason}",
                    completed_at=_now(),
                    lease_until=None,
                )
                if await self._cas(dead, revision) is None:
                    continue
                await quietly(msg.ack())
                await self._events(
                    [
                        (
                            TaskFailed(
                                task_id=task.id,
                                error=dead.error or "",
                                attempts=dead.attempts,
                                dead=True,
                            ),
                            agent,
                            f"task:{task.id}:dead",
                        )
                    ]
                )
                return None
            claimed = _claimed(task, agent)
            new_revision = await self._cas(claimed, revision)
            if new_revision is None:
                continue
            return Claim(self, claimed, new_revision, msg)
        await quietly(msg.nak(delay=0.1))
        return None

    async def _puller(self, type: str, priority: int) -> _Puller:
        key = (type, priority)
        puller = self._pullers.get(key)
        if puller is None:
            subject = f"{subjects.task_subject(self.session, type, priority)}.*"
            durable = f"{subjects.safe_token(f'{self.session}.{type}')}-q{priority}"
            config = ConsumerConfig(
                durable_name=durable,
                filter_subject=subject,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_deliver=-1,
                max_ack_pending=-1,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=24 * 3600.0,
            )
            try:
                await self.bus.js.add_consumer(TASKS_STREAM, config)
            except nats.js.errors.APIError as exc:
                # A claimer with other options (ack_wait) created it first: share it.
                try:
                    await self.bus.js.consumer_info(TASKS_STREAM, durable)
                except nats.js.errors.APIError:
                    raise PublishError(f"cannot create consumer {durable}: {exc}") from exc
            puller = self._pullers[key] = _Puller(self.bus, durable, self._inbox)
        return puller

    # --- claim transitions ------------------------------------------------------------

    async def _cas(self, task: Task, revision: int) -> int | None:
        """Write ``task`` if the record is still at ``revision``; None if it moved on.

        The writes of one event-loop turn (e.g. the completions of a worker's batch)
        go out together through ``_cas_many``: one pipelined batch, one timeout. The
        first writer of the turn sends the batch for everyone (no background task).
        """
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._writes.append((task, revision, future))
        if len(self._writes) == 1:
            try:
                await asyncio.sleep(0)  # let the other writers of this turn join
            finally:
                # Even if cancelled: the batch holds other writers' writes too.
                with anyio.CancelScope(shield=True):
                    await self._flush_writes(future)
        return await future

    async def _flush_writes(self, own: asyncio.Future[int | None]) -> None:
        batch, self._writes = self._writes, []
        results: list[int | BaseException | None]
        try:
            results = [*await self._cas_many([(task, rev) for task, rev, _ in batch])]
        except Exception as exc:  # noqa: BLE001 - every waiter gets it, the flusher too
            results = [exc] * len(batch)
        except BaseException:
            # The flusher was cancelled: the others' writes have unknown outcomes.
            for _, _, future in batch:
                if future is not own and not future.done():
                    future.set_exception(ConnectionError("write abandoned by its batch"))
            raise
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _cas_many(
        self, writes_in: Sequence[tuple[Task, int]]
    ) -> list[int | ConnectionError | None]:
        """``_cas`` for many records, pipelined, with one timeout for the whole batch.

        Per write: the new revision, None if the record moved on, or the error if the
        outcome is unknown (no answer in time, connection lost).
        """
        writes = [
            (
                subjects.kv_subject(TASKS_BUCKET, self._key(task.id)),
                _encoder.encode(task),
                {EXPECTED_LAST_HEADER: str(revision)},
            )
            for task, revision in writes_in
        ]
        results: list[int | ConnectionError | None] = []
        acks = await self._acks.publish(writes)
        for (task, revision), (subject, data, headers), ack in zip(
            writes_in, writes, acks, strict=True
        ):
            if isinstance(ack, int):
                results.append(ack)
            elif isinstance(ack, Refused) and ack.err_code in _WRONG_LAST:
                results.append(None)
            elif isinstance(ack, Refused):
                results.append(ConnectionError(f"cannot update task {task.id}: {ack}"))
            else:  # no answer (a node died, a leader election): find out what happened
                results.append(await self._settle_unknown(task, revision, subject, data, headers))
        return results

    async def _settle_unknown(
        self, task: Task, revision: int, subject: str, data: bytes, headers: dict[str, str]
    ) -> int | ConnectionError | None:
        """Settle a CAS write whose ack never came: it landed, lost, or never happened.

        Reads the record (retried through failover by ``bus.js``): our bytes there mean
        our write won; a newer revision means someone else's did; otherwise it did not
        happen and is sent again, alone, through the retrying JetStream. Without this a
        completion whose ack was lost would stay unreported: its event is published only
        after a confirmed transition, and a completed task is never offered again.
        """
        try:
            try:
                entry = await self.kv.get(self._key(task.id))
            except nats.js.errors.KeyNotFoundError:
                current = 0  # a first claim that did not land
            else:
                if entry.value == data and entry.revision is not None:
                    return entry.revision
                current = entry.revision or 0
            if current != revision:
                return None
            try:
                ack = await self.bus.js.publish(subject, data, headers=dict(headers))
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _WRONG_LAST:
                    raise
                # The first send may have landed meanwhile (it was still in flight).
                entry = await self.kv.get(self._key(task.id))
                return entry.revision if entry.value == data else None
            return int(ack.seq)
        except nats.js.errors.APIError as exc:
            return ConnectionError(f"cannot update task {task.id}: {exc}")
        except (TimeoutError, nats.errors.Error) as exc:
            return ConnectionError(f"cannot update task {task.id}: {exc}")

    async def _transition(
        self, claim: Claim, change: Callable[[Task], Task], requested: str
    ) -> Task:
        """CAS ``change(task)`` at the claim's revision; one transition at a time."""
        async with claim._lock:
            self.bus.act_as(claim.task.assigned_to or subjects.UNKNOWN)
            if claim.finished:
                raise InvalidTransitionError("task", claim.task.id, claim.task.status, requested)
            new = change(claim.task)
            revision = await self._cas(new, claim.revision)
            if revision is None:
                try:
                    current, _ = await self._read(claim.task.id)
                except NotFoundError:  # finished by another claim, then pruned
                    raise TaskClaimLostError(claim.task.id, claim.attempt, 0, "pruned") from None
                raise TaskClaimLostError(
                    claim.task.id, claim.attempt, current.attempts, current.status
                )
            claim.task, claim.revision = new, revision
            claim.finished = new.status != "running"
            return new

    async def _heartbeat(self, claim: Claim) -> None:
        def running(task: Task) -> Task:
            lease = _after(task.constraints.timeout)
            return msgspec.structs.replace(task, status="running", lease_until=lease)

        with anyio.CancelScope(shield=True):  # see _complete
            await self._transition(claim, running, "running")
            await quietly(claim._msg.in_progress())

    async def _complete(self, claim: Claim, result: Mapping[str, Any] | None) -> Task:
        try:
            result_dict = msgspec.convert(dict(result or {}), dict[str, Any])
            _encoder.encode(result_dict)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise InvalidTaskError("result", str(exc)) from None

        def completed(task: Task) -> Task:
            return msgspec.structs.replace(
                task,
                status="completed",
                result=result_dict,
                error=None,
                completed_at=_now(),
                lease_until=None,
            )

        # Shielded: a write cancelled in flight may still land; the claim must then
        # follow it (or its next call is refused as lost) and its event go out.
        with anyio.CancelScope(shield=True):
            new = await self._transition(claim, completed, "completed")
            await quietly(claim._msg.ack())
            agent = new.assigned_to or subjects.UNKNOWN
            event = TaskCompleted(task_id=new.id, result=result_dict)
            with continued(claim._msg.headers):  # outside work()'s span: the task's trace
                await self._events([(event, agent, f"task:{new.id}:completed")])
        return new

    async def _fail(self, claim: Claim, error: str, *, retry: bool) -> Task:
        def failed(task: Task) -> Task:
            if retry and task.attempts < task.max_attempts:
                return msgspec.structs.replace(
                    task, status="pending", error=error, lease_until=None
                )
            return msgspec.structs.replace(
                task,
                status="failed",
                error=error,
                dead=retry,
                completed_at=_now(),
                lease_until=None,
            )

        with anyio.CancelScope(shield=True):  # see _complete
            new = await self._transition(claim, failed, "failed")
            if new.status == "pending":
                await quietly(claim._msg.nak(delay=min(2.0**new.attempts * 0.1, 30.0)))
            else:
                await quietly(claim._msg.ack())
            agent = new.assigned_to or subjects.UNKNOWN
            event = TaskFailed(task_id=new.id, error=error, attempts=new.attempts, dead=new.dead)
            with continued(claim._msg.headers):  # outside work()'s span: the task's trace
                await self._events([(event, agent, f"task:{new.id}:failed:{new.attempts}")])
        return new

    # --- worker loop -------------------------------------------------------------------

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
        object), the task is failed with ``retry=True``. Every claim is heartbeated each
        third of min(timeout, ack_wait). Claims are made in batches (up to half the free
        slots at once) so a busy worker does not fall back to one round trip per task.
        """
        active: dict[Claim, float] = {}
        freed = anyio.Event()

        async def run(claim: Claim) -> None:
            nonlocal freed
            attrs = {**self._trace(claim.task), "swarmbus.agent": agent}
            try:
                queue = claim._msg.subject.rsplit(".", 1)[0]  # span names without the id
                headers = claim._msg.headers or {}
                with process_span(queue, headers.get(MSG_ID_HEADER, ""), attrs, headers):
                    try:
                        result = await handler(claim.task)
                    except Exception as exc:  # noqa: BLE001 - any handler error fails the task
                        log.warning("task %s failed: %s", claim.task.id, exc)
                        await claim.fail(f"{type(exc).__name__}: {exc}", retry=True)
                    else:
                        try:
                            await claim.complete(result)
                        except InvalidTaskError as exc:  # not a JSON object: a handler error
                            log.warning("task %s failed: %s", claim.task.id, exc)
                            await claim.fail(str(exc), retry=True)
            except (TaskClaimLostError, InvalidTransitionError, ConnectionError) as exc:
                # ConnectionError: the claim expires and the task is offered again
                log.warning("%s", exc)
            finally:
                del active[claim]
                freed.set()

        async def run_batch(claims: list[Claim]) -> None:
            # One task-group task per batch; gather's tasks are much cheaper to start.
            results = await asyncio.gather(*(run(c) for c in claims), return_exceptions=True)
            for error in results:
                if isinstance(error, BaseException):
                    raise error

        async def beat(claim: Claim) -> None:
            with contextlib.suppress(SwarmbusError):
                await claim.heartbeat()

        async def heartbeats(tg: anyio.abc.TaskGroup) -> None:
            while True:
                await anyio.sleep(self.ack_wait / 6)
                now = time.monotonic()
                for claim, last in list(active.items()):
                    if now - last >= min(claim.task.constraints.timeout, self.ack_wait) / 3:
                        active[claim] = now
                        tg.start_soon(beat, claim)

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeats, tg)
            while not stop.is_set():
                deadline = time.monotonic() + 0.02
                while concurrency - len(active) < max(concurrency // 2, 1):
                    freed = anyio.Event()
                    wait = deadline - time.monotonic() if len(active) < concurrency else 1.0
                    with anyio.move_on_after(wait):
                        await freed.wait()
                    if time.monotonic() >= deadline and len(active) < concurrency:
                        break
                try:
                    claims = await self.claim_many(
                        agent=agent, types=types, limit=concurrency - len(active), timeout=0.5
                    )
                except ConnectionError as exc:
                    log.warning("claim failed: %s; retrying", exc)
                    await anyio.sleep(0.5)
                    continue
                for claim in claims:
                    active[claim] = time.monotonic()
                if claims:
                    tg.start_soon(run_batch, claims)
            while active:
                freed = anyio.Event()
                await freed.wait()
            tg.cancel_scope.cancel()

    # --- events ------------------------------------------------------------------------

    async def _events(self, items: Iterable[tuple[Any, str, str | None]]) -> None:
        """Publish lifecycle events without waiting for their acks; failures are logged.

        The events are notifications, the record is the source of truth: each is
        published after its transition was stored, and handed to the connection in
        order (the event stream stores and de-duplicates them by id, but a store the
        server refuses goes unnoticed). Readers that must not miss a transition
        watch the ``swarmbus-tasks`` bucket or list ``tasks()``.
        """
        for body, agent, id in items:
            try:
                # Bodies built here from validated records: no need for publish()'s
                # encode/decode round trip.
                message = envelope_for(body, agent=agent, session=self.session, id=id)
                await self.bus.publish_message(message, wait=False)
            except SwarmbusError as exc:
                log.error("could not publish %s: %s", type(body).__name__, exc)


def _hint(msg: Msg) -> Task | None:
    """The task a dispatch message carries (None if it is malformed)."""
    return _hint_of(msg.data)


def _hint_of(data: bytes) -> Task | None:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        return None


def _claimed(task: Task, agent: str) -> Task:
    """``task`` claimed by ``agent``: the next attempt, leased for its timeout."""
    return msgspec.structs.replace(
        task,
        status="assigned",
        assigned_to=agent,
        attempts=task.attempts + 1,
        claimed_at=_now(),
        lease_until=_after(task.constraints.timeout),
        error=task.error if task.status == "pending" else "previous claim timed out",
    )


def _age(msg: Msg) -> float:
    """Seconds since the dispatch message was stored."""
    stored: datetime = msg.metadata.timestamp
    return time.time() - stored.timestamp()


def _state(task: Task) -> str:
    return task.status if task.approval == "none" else f"{task.status}/{task.approval}"


class _Puller:
    """Non-blocking pulls from one durable consumer (``no_wait``, no lingering request).

    nats-py's ``fetch`` turns an empty consumer into a wait of its full timeout; the
    claimer instead checks ten priorities in turn and must not block on each.
    """

    def __init__(self, bus: Bus, durable: str, inbox: PullInbox) -> None:
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{durable}"
        self._inbox = inbox

    async def pull(self, batch: int) -> list[Msg]:
        return await self._inbox.pull(self._next, batch)


def _stored(ack: int | Refused | ConnectionError, session: str) -> int:
    """The sequence of a publish that must have been stored, else PublishError."""
    if not isinstance(ack, int):
        raise PublishError(f"cannot store tasks of session {session}: {ack}")
    return ack
