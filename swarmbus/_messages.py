"""Wire messages: msgspec Structs for the envelope and every body the seed names.

An envelope is one JSON object whose ``type`` names the key holding its body
(CONTRACT.md). Each message type is its own Struct, tagged on ``type``, and all of
them form the ``Message`` union that one module-level decoder dispatches on.

Evolution rule (msgspec schema evolution): new fields get defaults, fields are never
reordered, renamed or retyped, and unknown fields are ignored on decode, so older
and newer swarmbus versions read each other's messages.
"""

from __future__ import annotations

import functools
import os
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, Protocol, TypeAlias

import msgspec
import msgspec.structs

from swarmbus._decode import decode_json
from swarmbus._durations import DURATION_PATTERN, wire_seconds
from swarmbus._errors import InvalidMessageError
from swarmbus._subjects import (
    AGENT_ID_PATTERN,
    MAX_ID_LENGTH,
    SESSION_ID_PATTERN,
    validate_agent_id,
    validate_session_id,
)

CONTRACT_VERSION: Final = 1
DEFAULT_MAX_MESSAGE_BYTES: Final = 1024 * 1024


def _python_pattern(pattern: str) -> str:
    r"""``pattern`` as msgspec must check it: its ``re.search`` lets ``$`` match before a
    final newline, ``\Z`` does not (``_schemas`` writes ``$`` back for JSON Schema)."""
    return pattern.removesuffix("$") + r"\Z"


_AGENT_ID: Final = _python_pattern(AGENT_ID_PATTERN)
_SESSION_ID: Final = _python_pattern(SESSION_ID_PATTERN)
AgentId = Annotated[str, msgspec.Meta(pattern=_AGENT_ID, max_length=MAX_ID_LENGTH)]
SessionId = Annotated[str, msgspec.Meta(pattern=_SESSION_ID, max_length=MAX_ID_LENGTH)]
Target = Annotated[
    str,
    msgspec.Meta(
        pattern=_AGENT_ID,
        max_length=MAX_ID_LENGTH,
        description='An agent id, or "any" for whichever agent has the capability.',
    ),
]
Name = Annotated[str, msgspec.Meta(pattern=_SESSION_ID, max_length=MAX_ID_LENGTH)]
Confidence = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
#: RFC 3339 date-time as the decoder reads it: real calendar dates (Feb 29 in leap
#: years only), hours 00-23, seconds 00-59 (no leap second), any number of fraction
#: digits, ``T``/``t`` or a space between date and time, and a zone of ``Z``/``z`` or
#: ``+hh:mm`` (the colon optional). No zone means UTC (see ``Envelope``).
TIMESTAMP_PATTERN: Final = (
    r"^(([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
    r"-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    r"|02-(0[1-9]|1[0-9]|2[0-8]))"
    r"|([0-9]{2}(0[48]|[2468][048]|[13579][26])|([02468][48]|[13579][26]|[2468]0)00)-02-29)"
    r"[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?"
    r"([Zz]|[+-]([01][0-9]|2[0-3]):?[0-5][0-9])?$"
)
Timestamp = Annotated[
    datetime,
    msgspec.Meta(
        description=(
            "RFC 3339, UTC (Z) when swarmbus writes it; a timestamp without a zone is read as UTC"
        ),
        extra_json_schema={"pattern": TIMESTAMP_PATTERN},
    ),
]
MessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
Json = dict[str, Any]
if TYPE_CHECKING:
    # After decoding (``Proposal.__post_init__``) a duration is always seconds.
    Seconds: TypeAlias = float
else:
    Seconds = (
        Annotated[float, msgspec.Meta(gt=0)]
        | Annotated[
            str,
            msgspec.Meta(pattern=DURATION_PATTERN, description="a duration: 30s, 5m, 1h30m, 500ms"),
        ]
    )


def _utc(struct: msgspec.Struct, name: str) -> None:
    """The contract's rule for a timestamp without a zone: it is UTC."""
    value = getattr(struct, name)
    if value is not None and value.tzinfo is None:
        msgspec.structs.force_setattr(struct, name, value.replace(tzinfo=UTC))


class _Body(msgspec.Struct, kw_only=True, frozen=True):
    """Base of every body; kw_only so fields can be added with defaults."""


# --- the seed's four message kinds -------------------------------------------


class Evidence(_Body, frozen=True):
    """One piece of evidence behind a finding (the seed's shape)."""

    source: str
    query: str = ""
    result: str = ""


class Finding(_Body, frozen=True):
    """Something an agent observed, suspects or concluded."""

    category: Literal["observation", "hypothesis", "conclusion"]
    content: str
    confidence: Confidence
    evidence: list[Evidence] = []


class Action(_Body, frozen=True):
    """An action an agent wants to take (or took)."""

    type: Literal["query", "modify", "notify", "escalate"]
    target: str
    parameters: Json = {}
    requires_approval: bool = False


class Request(_Body, frozen=True):
    """A request routed by capability to one agent or to ``any``."""

    to: Target
    capability: Name
    parameters: Json = {}


class Response(_Body, frozen=True):
    """The answer to a request; ``request_id`` is the request envelope's id."""

    request_id: MessageId
    status: Literal["success", "failure"]
    result: Json = {}


# --- lifecycle events ----------------------------------------------------------


class SessionStarted(_Body, frozen=True):
    session_id: SessionId
    initiator: AgentId
    context: Json = {}


class SessionCompleted(_Body, frozen=True):
    session_id: SessionId
    outcome: Json = {}


class TaskCreated(_Body, frozen=True):
    task_id: MessageId
    type: str
    parameters: Json = {}
    priority: Annotated[int, msgspec.Meta(ge=1, le=10)] = 5
    requires_approval: bool = False


class TaskAssigned(_Body, frozen=True):
    task_id: MessageId
    agent_id: AgentId


class TaskCompleted(_Body, frozen=True):
    task_id: MessageId
    result: Json = {}


class TaskFailed(_Body, frozen=True):
    task_id: MessageId
    error: str
    attempts: int = 0
    dead: bool = False


class FindingReported(_Body, frozen=True):
    finding_id: MessageId
    agent_id: AgentId
    category: str
    content: Any


class HypothesisProposed(_Body, frozen=True):
    hypothesis_id: MessageId
    agent_id: AgentId
    description: str
    confidence: Confidence


class HypothesisValidated(_Body, frozen=True):
    hypothesis_id: MessageId
    validated_by: AgentId
    result: bool
    evidence: Any = None


class ActionCompleted(_Body, frozen=True):
    action_id: MessageId
    status: str = "completed"
    result: Json = {}


# --- consensus -------------------------------------------------------------------


class Proposal(_Body, frozen=True):
    """A proposed action put to a vote (the seed's consensus block).

    ``timeout`` is seconds or a duration (``5m``, ``1h30m``: the seed's form), read as
    seconds; an empty ``voters`` means the session's members.
    """

    proposal_id: MessageId
    action: str
    target: str = ""
    parameters: Json = {}
    quorum: Literal["majority", "unanimous", "threshold"] = "majority"
    threshold: Confidence | None = None
    timeout: Seconds = 300.0
    voters: list[AgentId] = []

    def __post_init__(self) -> None:
        if not isinstance(self.timeout, float):
            msgspec.structs.force_setattr(self, "timeout", wire_seconds(self.timeout))


class Vote(_Body, frozen=True):
    """One agent's vote; the voter is the envelope's source agent."""

    proposal_id: MessageId
    vote: Literal["yes", "no", "abstain"]
    confidence: Confidence | None = None
    reason: str = ""


class Ballot(_Body, frozen=True):
    """A recorded vote inside a decision: who voted what, when, in which envelope."""

    voter: AgentId
    vote: Literal["yes", "no", "abstain"]
    confidence: Confidence | None = None
    reason: str = ""
    cast_at: Timestamp | None = None
    message_id: MessageId | None = None

    def __post_init__(self) -> None:
        _utc(self, "cast_at")


class Decision(_Body, frozen=True):
    """The outcome of a proposal (the seed's ``result``).

    ``decision`` is the proposal's action when approved, else the outcome. The
    fields after ``abstentions`` make the tally reproducible: the electorate size
    and every vote counted.
    """

    proposal_id: MessageId
    decision: str
    outcome: Literal["approved", "rejected", "no_quorum"]
    votes_for: int
    votes_against: int
    abstentions: int
    eligible: int = 0
    closed_by: Literal["early", "timeout"] = "early"
    decided_at: Timestamp | None = None
    votes: list[Ballot] = []

    def __post_init__(self) -> None:
        _utc(self, "decided_at")


class ErrorOccurred(_Body, frozen=True):
    """Something went wrong, e.g. a message was rejected (CONTRACT "Bad input")."""

    code: str
    reason: str
    subject: str = ""
    message_id: str | None = None
    dead_letter: bool = False


class PresenceLost(_Body, frozen=True):
    """An agent died (silent past its presence deadline) or left; the runtime released
    the task claims (offered again) and locks it held through the runtime API."""

    agent_id: AgentId
    reason: Literal["dead", "left"]
    released_tasks: list[MessageId] = []
    released_locks: list[str] = []


Body: TypeAlias = (
    Finding
    | Action
    | Request
    | Response
    | SessionStarted
    | SessionCompleted
    | TaskCreated
    | TaskAssigned
    | TaskCompleted
    | TaskFailed
    | FindingReported
    | HypothesisProposed
    | HypothesisValidated
    | ActionCompleted
    | Proposal
    | Vote
    | Decision
    | ErrorOccurred
    | PresenceLost
)


# --- the envelope ------------------------------------------------------------------


class _Checked:
    """Strings already matched against one id pattern (at most ``_CHECKED_MAX``).

    Every envelope carries a source, and a busy agent's ids repeat: a set lookup instead
    of msgspec's regex search (~0.3 us each, two per envelope decoded). The rule and the
    schema are the pattern's, as with ``msgspec.Meta(pattern=...)``.
    """

    __slots__ = ("_pattern", "_search", "_seen")

    def __init__(self, pattern: str) -> None:
        self._pattern = pattern
        self._search = re.compile(pattern).search
        self._seen: set[str] = set()

    def check(self, value: str, name: str) -> None:
        """Raise ValueError (msgspec's ValidationError on decode) unless ``value`` matches."""
        if value in self._seen:
            return
        if self._search(value) is None:
            raise ValueError(f"Expected `str` matching regex {self._pattern!r} at `{name}`")
        if len(self._seen) >= _CHECKED_MAX:
            self._seen.clear()
        self._seen.add(value)


_CHECKED_MAX: Final = 4096
_AGENTS: Final = _Checked(_AGENT_ID)
_SESSIONS: Final = _Checked(_SESSION_ID)
# Source's ids: the same rule as AgentId / SessionId, checked in Source.__post_init__.
_SourceAgent = Annotated[
    str, msgspec.Meta(max_length=MAX_ID_LENGTH, extra_json_schema={"pattern": _AGENT_ID})
]
_SourceSession = Annotated[
    str, msgspec.Meta(max_length=MAX_ID_LENGTH, extra_json_schema={"pattern": _SESSION_ID})
]


class Source(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """Who sent a message, in which session."""

    agent: _SourceAgent
    session: _SourceSession

    def __post_init__(self) -> None:
        _AGENTS.check(self.agent, "agent")
        _SESSIONS.check(self.session, "session")


class Envelope(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    """Fields every message shares; ``type`` (the tag) names the body key."""

    body_field: ClassVar[str]
    id: MessageId
    timestamp: Timestamp
    source: Source

    def __post_init__(self) -> None:
        # _utc inlined: every envelope built or decoded passes here.
        if self.timestamp.tzinfo is None:
            msgspec.structs.force_setattr(self, "timestamp", self.timestamp.replace(tzinfo=UTC))

    @property
    def body(self) -> Body:
        """The message's body, whatever its type."""
        value: Body = getattr(self, self.body_field)
        return value

    @property
    def type(self) -> str:
        """The ``type`` tag on the wire."""
        tag = self.__struct_config__.tag
        assert isinstance(tag, str)
        return tag


class FindingMessage(Envelope, tag="finding", frozen=True):
    body_field = "finding"
    finding: Finding


class ActionMessage(Envelope, tag="action", frozen=True):
    body_field = "action"
    action: Action


class RequestMessage(Envelope, tag="request", frozen=True):
    body_field = "request"
    request: Request


class ResponseMessage(Envelope, tag="response", frozen=True):
    body_field = "response"
    response: Response


class SessionStartedMessage(Envelope, tag="session.started", frozen=True):
    body_field = "session_started"
    session_started: SessionStarted = msgspec.field(name="session.started")


class SessionCompletedMessage(Envelope, tag="session.completed", frozen=True):
    body_field = "session_completed"
    session_completed: SessionCompleted = msgspec.field(name="session.completed")


class TaskCreatedMessage(Envelope, tag="task.created", frozen=True):
    body_field = "task_created"
    task_created: TaskCreated = msgspec.field(name="task.created")


class TaskAssignedMessage(Envelope, tag="task.assigned", frozen=True):
    body_field = "task_assigned"
    task_assigned: TaskAssigned = msgspec.field(name="task.assigned")


class TaskCompletedMessage(Envelope, tag="task.completed", frozen=True):
    body_field = "task_completed"
    task_completed: TaskCompleted = msgspec.field(name="task.completed")


class TaskFailedMessage(Envelope, tag="task.failed", frozen=True):
    body_field = "task_failed"
    task_failed: TaskFailed = msgspec.field(name="task.failed")


class FindingReportedMessage(Envelope, tag="finding.reported", frozen=True):
    body_field = "finding_reported"
    finding_reported: FindingReported = msgspec.field(name="finding.reported")


class HypothesisProposedMessage(Envelope, tag="hypothesis.proposed", frozen=True):
    body_field = "hypothesis_proposed"
    hypothesis_proposed: HypothesisProposed = msgspec.field(name="hypothesis.proposed")


class HypothesisValidatedMessage(Envelope, tag="hypothesis.validated", frozen=True):
    body_field = "hypothesis_validated"
    hypothesis_validated: HypothesisValidated = msgspec.field(name="hypothesis.validated")


class ActionCompletedMessage(Envelope, tag="action.completed", frozen=True):
    body_field = "action_completed"
    action_completed: ActionCompleted = msgspec.field(name="action.completed")


class ProposalMessage(Envelope, tag="proposal", frozen=True):
    body_field = "proposal"
    proposal: Proposal


class VoteMessage(Envelope, tag="vote", frozen=True):
    body_field = "vote"
    vote: Vote


class DecisionMessage(Envelope, tag="decision", frozen=True):
    body_field = "decision"
    decision: Decision


class ErrorOccurredMessage(Envelope, tag="error.occurred", frozen=True):
    body_field = "error_occurred"
    error_occurred: ErrorOccurred = msgspec.field(name="error.occurred")


class PresenceLostMessage(Envelope, tag="presence.lost", frozen=True):
    body_field = "presence_lost"
    presence_lost: PresenceLost = msgspec.field(name="presence.lost")


Message: TypeAlias = (
    FindingMessage
    | ActionMessage
    | RequestMessage
    | ResponseMessage
    | SessionStartedMessage
    | SessionCompletedMessage
    | TaskCreatedMessage
    | TaskAssignedMessage
    | TaskCompletedMessage
    | TaskFailedMessage
    | FindingReportedMessage
    | HypothesisProposedMessage
    | HypothesisValidatedMessage
    | ActionCompletedMessage
    | ProposalMessage
    | VoteMessage
    | DecisionMessage
    | ErrorOccurredMessage
    | PresenceLostMessage
)

MESSAGE_TYPES: Final[tuple[type[Envelope], ...]] = Message.__args__

#: body class -> (envelope class, event (domain, event) or None for request/response)
_ROUTES: Final[dict[type[_Body], tuple[type[Envelope], tuple[str, str] | None]]] = {
    Finding: (FindingMessage, ("finding", "reported")),
    Action: (ActionMessage, ("action", "proposed")),
    Request: (RequestMessage, None),
    Response: (ResponseMessage, None),
    SessionStarted: (SessionStartedMessage, ("session", "started")),
    SessionCompleted: (SessionCompletedMessage, ("session", "completed")),
    TaskCreated: (TaskCreatedMessage, ("task", "created")),
    TaskAssigned: (TaskAssignedMessage, ("task", "assigned")),
    TaskCompleted: (TaskCompletedMessage, ("task", "completed")),
    TaskFailed: (TaskFailedMessage, ("task", "failed")),
    FindingReported: (FindingReportedMessage, ("finding", "reported")),
    HypothesisProposed: (HypothesisProposedMessage, ("hypothesis", "proposed")),
    HypothesisValidated: (HypothesisValidatedMessage, ("hypothesis", "validated")),
    ActionCompleted: (ActionCompletedMessage, ("action", "completed")),
    Proposal: (ProposalMessage, ("action", "proposed")),
    Vote: (VoteMessage, ("action", "voted")),
    Decision: (DecisionMessage, ("action", "decided")),
    ErrorOccurred: (ErrorOccurredMessage, ("error", "occurred")),
    PresenceLost: (PresenceLostMessage, ("presence", "lost")),
}

#: envelope class -> the (domain, event) it travels on
EVENT_OF: Final[dict[type[Envelope], tuple[str, str] | None]] = {
    env: event for env, event in _ROUTES.values()
}


def new_id() -> str:
    """A fresh message id: a random (version 4) UUID string.

    Formatted from ``os.urandom`` directly: ``str(uuid.uuid4())`` costs several times
    more, and every message needs one. The random bytes are read 256 ids at a time
    (one system call each, not one per id); a forked child drops its parent's.
    """
    if not _RANDOM_HEX:
        block = os.urandom(16 * _IDS_PER_READ).hex()
        _RANDOM_HEX.extend(block[i : i + 32] for i in range(0, len(block), 32))
    h = _RANDOM_HEX.pop()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_UUID_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


_UUID_VARIANT: Final = "89ab"
_IDS_PER_READ: Final = 256
_RANDOM_HEX: Final[list[str]] = []
os.register_at_fork(after_in_child=_RANDOM_HEX.clear)


def now() -> datetime:
    """The current time, UTC, as swarmbus timestamps it."""
    return datetime.now(UTC)


def envelope_for(
    body: Body,
    *,
    agent: str,
    session: str,
    id: str | None = None,
    timestamp: datetime | None = None,
) -> Message:
    """Wrap ``body`` in the envelope of its type, validating the identifiers."""
    try:
        cls = _ROUTES[type(body)][0]
    except KeyError:
        raise TypeError(f"{type(body).__name__} is not a swarmbus message body") from None
    if id is not None and len(id) > MAX_ID_LENGTH:
        raise InvalidMessageError("schema", f"message id longer than {MAX_ID_LENGTH} characters")
    fields = {
        "id": id or new_id(),
        "timestamp": timestamp or now(),
        "source": source_of(agent, session),
        cls.body_field: body,
    }
    envelope: Message = cls(**fields)  # type: ignore[arg-type,assignment]
    return envelope


def source_of(agent: str, session: str) -> Source:
    """The validated ``Source`` of ``agent`` in ``session``.

    Raises:
        InvalidIdentifierError: either id breaks the contract's rules.
    """
    if type(agent) is str and type(session) is str:
        return _source(agent, session)
    return Source(agent=validate_agent_id(agent), session=validate_session_id(session))


@functools.lru_cache(maxsize=4096)
def _source(agent: str, session: str) -> Source:
    """A validated (immutable, shareable) Source: a busy agent reuses one per session."""
    return Source(agent=validate_agent_id(agent), session=validate_session_id(session))


def event_of(message: Envelope) -> tuple[str, str] | None:
    """The (domain, event) subject tokens a message is published on."""
    return EVENT_OF[type(message)]


_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message)
_json_decoder = msgspec.json.Decoder()


def encode(message: Envelope) -> bytes:
    """Encode a message as the contract's JSON."""
    return _encoder.encode(message)


def validate_body(body: Body) -> None:
    """Check a body built in Python against its wire constraints.

    msgspec checks constraints only on decode, so a round trip catches e.g. a
    confidence of 1.7 before it is sent.
    """
    try:
        msgspec.json.decode(_encoder.encode(body), type=type(body))
    except msgspec.ValidationError as exc:
        raise InvalidMessageError("schema", f"{type(body).__name__}: {exc}") from None


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Decode and validate bytes as a message, or raise InvalidMessageError with a code."""
    try:
        return decode_json(_decoder, data, max_bytes=max_bytes)
    except InvalidMessageError as exc:
        if exc.code != "schema":
            raise
        raise _classify(data, exc) from None


def _too_deep() -> InvalidMessageError:
    # msgspec's depth limit: a few KB of brackets would otherwise escape as a crash.
    return InvalidMessageError("too_large", "JSON nested too deeply to decode")


_ENVELOPE_KEYS: Final = frozenset({"id", "timestamp", "source", "type"})


def _classify(data: bytes, exc: InvalidMessageError) -> InvalidMessageError:
    try:
        raw = _json_decoder.decode(data)
    except msgspec.DecodeError:
        return InvalidMessageError("not_json", exc.reason)
    except RecursionError:
        return _too_deep()
    if isinstance(raw, dict) and raw.keys() == {"message"} and isinstance(raw["message"], dict):
        return InvalidMessageError(
            "not_envelope",
            "the envelope is wrapped in a 'message' key (the seed's YAML example); send the "
            'object inside it as the message: {"id": ..., "timestamp": ..., "source": '
            '..., "type": ..., <type>: {...}}',
        )
    if not isinstance(raw, dict) or not raw.keys() >= _ENVELOPE_KEYS:
        missing = sorted(_ENVELOPE_KEYS - raw.keys()) if isinstance(raw, dict) else []
        detail = f" (missing: {', '.join(missing)})" if missing else ""
        return InvalidMessageError(
            "not_envelope", f"expected an object with id, timestamp, source and type{detail}"
        )
    return InvalidMessageError("schema", exc.reason)


class Gate(Protocol):
    """How readers of the bus check what they receive (``swarmbus.Bus``)."""

    def accept(self, subject: str, data: bytes) -> Message:
        """Decode ``data`` and check it against ``subject`` (InvalidMessageError)."""
        ...

    async def reject(
        self,
        *,
        subject: str,
        data: bytes,
        code: str,
        reason: str,
        receiver: str,
        dedupe_key: str | None = None,
        message_id: str | None = None,
        session: str | None = None,
    ) -> None:
        """Dead-letter ``data`` and publish ``agent.error.occurred`` saying why."""
        ...
