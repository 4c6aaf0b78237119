"""What a task is: the record (``Task``) and its wire structs, a spec, and a claim.

``Task`` is stored as JSON both in a dispatch message (until its first claim) and in
the record bucket; the wire-evolution rule applies (new fields with defaults, at the
end). The helpers here are pure: they build records and derive one record from
another, and never speak to NATS.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Protocol

import msgspec

from swarmbus import _subjects as subjects
from swarmbus._decode import decode_json, header_count, valid_id
from swarmbus._errors import InvalidMessageError, InvalidTaskError, SwarmbusError
from swarmbus._jetstream.headers import TASK_REVISION
from swarmbus._messages import new_id

if TYPE_CHECKING:
    from swarmbus._jetstream.workqueue import Dispatch

TASKS_STREAM: Final = "SWARMBUS_TASKS"
TASKS_BUCKET: Final = "swarmbus-tasks"
MIN_PRIORITY: Final = 1
MAX_PRIORITY: Final = 10
STATUSES: Final = ("pending", "assigned", "running", "completed", "failed")
TERMINAL: Final = frozenset({"completed", "failed"})

CREATED_TOKEN: Final = "=created"
"""First token of the creation copies' keys (``created_key``): no session id has ``=``."""

Status = Literal["pending", "assigned", "running", "completed", "failed"]
MAX_ERROR = 4000
"""Characters of a failure's reason kept (a handler's exception text is unbounded)."""

RECORD_SLACK = 4096
"""Bytes of max_payload a task leaves for what its record adds (claim, lease, error,
headers): a task is at most max_payload - RECORD_SLACK encoded, and so is its record
with a result."""

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
    #: Who may vote to approve it (set by its creator); empty: the session's members.
    approvers: list[str] = []


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
    approvers: tuple[str, ...] = ()


Handler = Callable[[Task], Awaitable[Mapping[str, Any] | None]]

encoder: Final = msgspec.json.Encoder()
decoder: Final = msgspec.json.Decoder(Task)


class ClaimOwner(Protocol):
    """What a claim asks of its queue: its transitions."""

    async def _heartbeat(self, claim: Claim) -> None: ...

    async def _complete(self, claim: Claim, result: Mapping[str, Any] | None) -> Task: ...

    async def _fail(self, claim: Claim, error: str, *, retry: bool) -> Task: ...

    async def _announce(self, claim: Claim, agent: str) -> None: ...


class Claim:
    """One agent's hold on a task, fenced by its attempt number.

    Use ``heartbeat`` while working (it extends the claim by the task's timeout) and
    finish with ``complete`` or ``fail``. Once the claim expired and someone else
    claimed the task, every call raises ``TaskClaimLostError`` and changes nothing.
    """

    def __init__(self, queue: ClaimOwner, task: Task, revision: int, msg: Dispatch) -> None:
        self._queue = queue
        self.task = task
        self.revision = revision
        self._msg = msg
        self._lock = asyncio.Lock()  # no checkpoint when free, unlike anyio.Lock
        self.finished = False
        #: The agent whose task.assigned event for this claim is still to be published.
        self._announce_as: str | None = None

    @property
    def attempt(self) -> int:
        """The fencing token of this claim (the task's attempt number)."""
        return self.task.attempts

    async def _announced(self) -> None:
        """Publish this claim's task.assigned event unless it was."""
        agent, self._announce_as = self._announce_as, None
        if agent is not None:
            await self._queue._announce(self, agent)

    async def heartbeat(self) -> None:
        """Mark the task running and extend the claim by its timeout."""
        await self._queue._heartbeat(self)

    async def complete(self, result: Mapping[str, Any] | None = None) -> Task:
        """Record the result; only one completion of a task ever succeeds."""
        return await self._queue._complete(self, result)

    async def fail(self, error: str, *, retry: bool = False) -> Task:
        """Record a failure; with ``retry`` the task is offered again (until max attempts).
        The reason is kept to its first ``MAX_ERROR`` characters, in the record and event."""
        return await self._queue._fail(self, error[:MAX_ERROR], retry=retry)


def count(value: object) -> bool:
    """Whether ``value`` is an int (a bool is not): what a record's counters decode as."""
    return isinstance(value, int) and not isinstance(value, bool)


def now() -> datetime:
    return datetime.now(UTC)


def after(seconds: float) -> datetime:
    return datetime.fromtimestamp(time.time() + seconds, UTC)


def created_key(session: str, task_id: str) -> str:
    """The key of a task's creation copy in the record bucket (``TaskQueue.create_many``)."""
    return f"{CREATED_TOKEN}.{session}.{task_id}"


def build(spec: TaskSpec, *, agent: str, session: str, max_attempts: int) -> Task:
    """A new pending task from ``spec``; ``max_attempts``: the queue's default.

    Raises:
        InvalidTaskError: bad priority, type, parameters or constraints.
    """
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
    attempts = max_attempts if spec.max_attempts is None else spec.max_attempts
    if not count(attempts) or attempts < 1:
        raise InvalidTaskError("max_attempts", f"must be an integer >= 1, got {attempts!r}")
    try:
        parameters = msgspec.convert(
            {"target": spec.target, "context": spec.context}, TaskParameters
        )
        constraints = msgspec.convert(
            {"timeout": spec.timeout, "requires_approval": spec.requires_approval},
            TaskConstraints,
        )
        encoder.encode(parameters)
    except (msgspec.ValidationError, TypeError) as exc:
        raise InvalidTaskError("parameters", str(exc)) from None
    try:
        approvers = sorted({subjects.validate_agent_id(a) for a in spec.approvers})
    except SwarmbusError as exc:
        raise InvalidTaskError("approvers", str(exc)) from None
    return Task(
        id=new_id(),
        type=spec.type,
        priority=spec.priority,
        parameters=parameters,
        constraints=constraints,
        session=session,
        created_by=agent,
        max_attempts=attempts,
        approval="required" if spec.requires_approval else "none",
        created_at=now(),
        approvers=approvers,
    )


def decode_task(data: bytes | None, *, what: str) -> Task:
    """A task read from NATS (a record or a dispatch message), validated.

    Raises:
        InvalidMessageError: not a task (``not_json``, ``schema``, ``too_large``), or its
            id cannot be a key (``bad_id``).
    """
    task = decode_json(decoder, data, what=what)
    valid_id("task id", task.id)
    return task


def record_of(data: bytes | None, session: str, task_id: str) -> Task:
    """The task record stored under ``<session>.<task_id>``, validated.

    Raises:
        InvalidMessageError: a broken record (see ``decode_task``), or one that names
            another task or session (``wrong_subject``).
    """
    task = decode_task(data, what=f"task record {session}.{task_id}")
    if (task.id, task.session) != (task_id, session):
        raise InvalidMessageError(
            "wrong_subject",
            f"task record {session}.{task_id} holds task {task.id} of session {task.session}",
        )
    return task


def offer_of(subject: str, data: bytes, headers: Mapping[str, str] | None, session: str) -> Offer:
    """The task a dispatch message offers and the revision its claim compares against.

    Anyone with a publish grant on ``swarmbus.task.>`` can send one, so it is checked
    against its subject: the task's session, type, priority and id must be the ones the
    subject names, and the revision header a count (absent: 0, no record yet).

    Raises:
        InvalidMessageError: why the message is not a dispatch of this queue.
    """
    task = decode_task(data, what=f"dispatch {subject}")
    revision = header_count(headers, TASK_REVISION)
    try:
        expected = f"{subjects.task_subject(session, task.type, task.priority)}.{task.id}"
    except SwarmbusError as exc:
        raise InvalidMessageError("schema", f"dispatch {subject}: {exc}") from None
    if subject != expected or task.session != session:
        raise InvalidMessageError(
            "wrong_subject",
            f"task {task.id} of session {task.session} does not belong on {subject}",
        )
    return Offer(task, revision)


@dataclass(frozen=True, slots=True)
class Offer:
    """A validated dispatch message: its task, and the revision a claim compares against."""

    task: Task
    revision: int


def hint_of(data: bytes) -> Task | None:
    """The task a dispatch message's data carries (None if it is malformed)."""
    try:
        return decode_task(data, what="dispatch")
    except InvalidMessageError:
        return None


def claimed(task: Task, agent: str) -> Task:
    """``task`` claimed by ``agent``: the next attempt, leased for its timeout."""
    return msgspec.structs.replace(
        task,
        status="assigned",
        assigned_to=agent,
        attempts=task.attempts + 1,
        claimed_at=now(),
        lease_until=after(task.constraints.timeout),
        error=task.error if task.status == "pending" else "previous claim timed out",
    )


def state(task: Task) -> str:
    return task.status if task.approval == "none" else f"{task.status}/{task.approval}"
