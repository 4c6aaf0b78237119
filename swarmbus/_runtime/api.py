"""The runtime API on the wire: one request and one result Struct per operation.

Every operation is a NATS request on ``swarmbus.api.<domain>.<verb>.<session>.<agent>``
(``<agent>`` is the requester, as for events) whose payload is a JSON object, answered
with a ``Reply``: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": {"code",
"reason", "use"}}``. ``OPERATIONS`` is the table the server dispatches on and the
generated schemas and AsyncAPI document describe; add an operation there, and only with
new fields that have defaults (the msgspec evolution rule of ``_messages``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec

from swarmbus._consensus import ProposalRecord
from swarmbus._durations import wire_seconds
from swarmbus._messages import (
    AgentId,
    Confidence,
    Evidence,
    MessageId,
    Proposal,
    Seconds,
    Vote,
)
from swarmbus._tasks import Task

Json = dict[str, Any]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+\Z", max_length=128)]


class _Api(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Base of requests: unknown fields are refused (a typo is an error, not a no-op)."""


class _Result(msgspec.Struct, kw_only=True, frozen=True):
    """Base of results."""


def _seconds(struct: msgspec.Struct, *names: str) -> None:
    for name in names:
        value = getattr(struct, name)
        if value is not None and not isinstance(value, float):
            msgspec.structs.force_setattr(struct, name, wire_seconds(value))


# --- incidents and sessions -----------------------------------------------------------


class IncidentOpen(_Api, frozen=True):
    """Open the incident named by the subject's session token (``INC-1234``).

    The runtime starts the swarm its intake configuration maps ``kind`` (or a label) to.
    """

    kind: str = ""
    title: str = ""
    labels: dict[str, str] = {}
    context: Json = {}


class IncidentOpened(_Result, frozen=True):
    session: str
    swarm: str | None = None
    spec: str | None = None
    already_open: bool = False


class IncidentClose(_Api, frozen=True):
    outcome: Json = {}


class SessionRef(_Result, frozen=True):
    session: str
    status: str = ""


class SessionJoin(_Api, frozen=True):
    """Join the session: become a voter and a live agent (send presence heartbeats)."""


class SessionJoined(_Result, frozen=True):
    session: str
    members: list[str]
    heartbeat_interval: float
    dead_after: float


class SessionLeave(_Api, frozen=True):
    """Leave: the runtime releases the agent's task claims and locks held through it."""


class Released(_Result, frozen=True):
    agent: str
    tasks: list[str] = []
    locks: list[str] = []


class Heartbeat(_Api, frozen=True):
    """Presence: publish (no reply needed) every ``heartbeat_interval`` seconds."""


class Alive(_Result, frozen=True):
    agent: str
    dead_after: float


# --- knowledge ---------------------------------------------------------------------------


class FindingPost(_Api, frozen=True):
    category: Literal["observation", "hypothesis", "conclusion"]
    content: str
    confidence: Confidence
    evidence: list[Evidence] = []
    id: MessageId | None = None


class FindingPosted(_Result, frozen=True):
    finding_id: str


class HypothesisPost(_Api, frozen=True):
    description: str
    confidence: Confidence
    id: MessageId | None = None


class HypothesisPosted(_Result, frozen=True):
    hypothesis_id: str
    confidence: float


class BoardGet(_Api, frozen=True):
    """Read the session's blackboard."""


class Board(_Result, frozen=True):
    board: Json


# --- tasks ---------------------------------------------------------------------------------


class TaskCreate(_Api, frozen=True):
    type: Name
    priority: Annotated[int, msgspec.Meta(ge=1, le=10)] = 5
    target: str = ""
    context: Json = {}
    timeout: Seconds = 60.0
    requires_approval: bool = False
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] | None = None

    def __post_init__(self) -> None:
        _seconds(self, "timeout")


class TaskClaim(_Api, frozen=True):
    """Claim the next task of ``types``, or of ``capability`` (for any agent, or routed
    to the requester by a swarm); wait up to ``wait`` for one."""

    types: list[Name] = []
    capability: Name | None = None
    wait: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.0


class TaskRef(_Api, frozen=True):
    task_id: MessageId


class TaskComplete(_Api, frozen=True):
    task_id: MessageId
    result: Json = {}


class TaskFail(_Api, frozen=True):
    task_id: MessageId
    error: str
    retry: bool = False


class TaskState(_Result, frozen=True):
    """A task record; ``task`` is None when a claim found nothing."""

    task: Task | None
    attempt: int = 0


# --- consensus -------------------------------------------------------------------------------


class ProposalCreate(_Api, frozen=True):
    proposal: Proposal


class VoteCast(_Api, frozen=True):
    vote: Vote


class ProposalRef(_Api, frozen=True):
    proposal_id: MessageId


class ProposalState(_Result, frozen=True):
    record: ProposalRecord


# --- locks ------------------------------------------------------------------------------------


class LockAcquire(_Api, frozen=True):
    resource: str
    ttl: Seconds = 30.0
    wait: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.0

    def __post_init__(self) -> None:
        _seconds(self, "ttl")


class LockRelease(_Api, frozen=True):
    resource: str


class LockState(_Result, frozen=True):
    resource: str
    held: bool
    token: int | None = None
    owner: AgentId | None = None


# --- replies ------------------------------------------------------------------------------------

ErrorCode = Literal[
    "invalid_request",
    "unknown_operation",
    "wrong_subject",
    "not_found",
    "conflict",
    "invalid_transition",
    "claim_lost",
    "not_held",
    "permission_denied",
    "not_eligible",
    "proposal_closed",
    "already_voted",
    "unavailable",
    "internal",
]


class ApiError(msgspec.Struct, kw_only=True, frozen=True):
    """Why a request failed; ``use`` names the subject or API to use instead, if any."""

    code: ErrorCode
    reason: str
    use: str = ""


class Reply(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Every API answer: ``ok`` with ``result``, or not ``ok`` with ``error``."""

    ok: bool
    result: Any = None
    error: ApiError | None = None


@dataclass(frozen=True)
class Operation:
    """One API operation: ``<domain>.<verb>``, its request and result types."""

    domain: str
    verb: str
    request: type[msgspec.Struct]
    result: type[msgspec.Struct]
    summary: str

    @property
    def name(self) -> str:
        return f"{self.domain}.{self.verb}"


OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "incident", "open", IncidentOpen, IncidentOpened, "Open an incident; start its swarm"
    ),
    Operation("incident", "close", IncidentClose, SessionRef, "Close an incident with an outcome"),
    Operation("session", "join", SessionJoin, SessionJoined, "Join a session (voter, presence)"),
    Operation("session", "leave", SessionLeave, Released, "Leave; release claims and locks"),
    Operation("presence", "heartbeat", Heartbeat, Alive, "I am alive (publish, reply optional)"),
    Operation("finding", "post", FindingPost, FindingPosted, "Post a finding on the board"),
    Operation("hypothesis", "post", HypothesisPost, HypothesisPosted, "Propose a hypothesis"),
    Operation("board", "get", BoardGet, Board, "Read the session's blackboard"),
    Operation("task", "create", TaskCreate, TaskState, "Create a task"),
    Operation("task", "claim", TaskClaim, TaskState, "Claim the next task of some types"),
    Operation("task", "heartbeat", TaskRef, TaskState, "Extend a claim; mark the task running"),
    Operation("task", "complete", TaskComplete, TaskState, "Complete a claimed task"),
    Operation("task", "fail", TaskFail, TaskState, "Fail a claimed task (optionally retry)"),
    Operation("task", "get", TaskRef, TaskState, "Read a task's state"),
    Operation("proposal", "create", ProposalCreate, ProposalState, "Propose an action for a vote"),
    Operation("vote", "cast", VoteCast, ProposalState, "Vote on a proposal"),
    Operation("proposal", "get", ProposalRef, ProposalState, "Read a proposal and its votes"),
    Operation("lock", "acquire", LockAcquire, LockState, "Take a lock (fencing token)"),
    Operation("lock", "release", LockRelease, LockState, "Release a lock"),
)
