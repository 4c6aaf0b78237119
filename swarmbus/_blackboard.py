"""The blackboard: one session's shared workspace on a JetStream KV bucket.

Key layout (one bucket, ``SWARMBUS_BOARD`` by default; every key starts with the
session id, so ``$KV.<bucket>.<session>.>`` is one session)::

    <session>.session             SessionRecord    start / complete (CAS)
    <session>.context             ContextRecord    set / update (CAS)
    <session>.finding.<id>        FindingRecord    create-once: append-only, idempotent
    <session>.hypothesis.<id>     HypothesisRecord create, then CAS read-modify-write
    <session>.action.<id>         ActionRecord     create, then CAS status transitions

``<id>`` is the item id when it is one ``[A-Za-z0-9_-]`` token, else
``safe_token(id)``; the record keeps the original id. A finding's id is the id of the
envelope that reported it, so a retried or redelivered finding is stored once.

Every write goes to KV first and then publishes its lifecycle event. The board is
the source of truth: an event implies its board write happened, never the reverse
(a process that dies in between leaves the write without its event; appending the
same finding again re-publishes it, de-duplicated by the event id).

Values are msgspec Structs encoded as JSON under the wire-evolution rule: fields are
only added, with defaults, at the end; unknown fields are ignored on decode.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal, Self, TypeAlias, TypeVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
import yaml
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from swarmbus import _subjects as subjects
from swarmbus._bus import Bus
from swarmbus._confidence import DEFAULT_EXPERTISE, Opinion, Pooling, aggregate_confidence
from swarmbus._errors import (
    ConflictError,
    InvalidMessageError,
    InvalidTransitionError,
    NotFoundError,
    SwarmbusError,
    ValueTooLargeError,
)
from swarmbus._jetstream.errors import translate as _translate
from swarmbus._jetstream.errors import transport_error as _transport_error
from swarmbus._jetstream.headers import KV_DELETE as KV_DEL
from swarmbus._jetstream.headers import KV_OPERATION as KV_OP
from swarmbus._jetstream.headers import KV_PURGE
from swarmbus._jetstream.headers import MARKER_REASON as MARKER_REASON_HEADER
from swarmbus._jetstream.kv import kv_write
from swarmbus._jetstream.reads import last_per_subject
from swarmbus._messages import (
    Action,
    ActionCompleted,
    Evidence,
    Finding,
    FindingMessage,
    HypothesisProposed,
    HypothesisValidated,
    Message,
    SessionCompleted,
    SessionStarted,
    envelope_for,
    new_id,
    now,
    validate_body,
)
from swarmbus._telemetry import session_span

log = logging.getLogger("swarmbus.blackboard")

DEFAULT_BUCKET: Final = "SWARMBUS_BOARD"
DEFAULT_HISTORY: Final = 10
DEFAULT_MAX_VALUE_BYTES: Final = 256 * 1024
RECORDER_AGENT: Final = "swarmbus/blackboard"
CAS_ATTEMPTS: Final = 200
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_KV_STREAM_PREFIX: Final = "KV_"
_KV_SUBJECT_PREFIX: Final = "$KV"

Json: TypeAlias = dict[str, Any]
Confidence = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]

#: action status -> the statuses it may move to (terminal statuses map to nothing)
ACTION_TRANSITIONS: Final[Mapping[str, frozenset[str]]] = {
    "proposed": frozenset({"awaiting_approval", "approved", "rejected", "running", "completed"}),
    "awaiting_approval": frozenset({"approved", "rejected"}),
    "approved": frozenset({"running", "completed", "failed"}),
    "running": frozenset({"completed", "failed"}),
    "rejected": frozenset(),
    "completed": frozenset(),
    "failed": frozenset(),
}
#: statuses an action may be recorded with
ACTION_INITIAL: Final = frozenset(
    {"proposed", "awaiting_approval", "approved", "running", "completed"}
)


# --- stored values (msgspec, wire-evolution rule) -----------------------------------


class _Record(msgspec.Struct, kw_only=True, frozen=True):
    """Base of every stored value; kw_only so fields can be added with defaults."""


class SessionRecord(_Record, frozen=True):
    """A session's lifecycle: ``status`` is ``active`` or ``completed``."""

    session_id: str
    initiator: str
    started: datetime
    status: str = "active"
    outcome: Json = {}
    completed: datetime | None = None
    completed_by: str | None = None


class ContextRecord(_Record, frozen=True):
    """The session's shared context (the seed's ``context``)."""

    data: Json = {}
    updated_by: str = ""
    updated: datetime | None = None


class FindingRecord(_Record, frozen=True):
    """One finding with its provenance; ``id`` is the reporting envelope's id."""

    id: str
    agent: str
    timestamp: datetime
    category: str
    content: str
    confidence: Confidence
    evidence: list[Evidence] = []


class ConfidenceUpdate(_Record, frozen=True):
    """One agent's assessment of a hypothesis, kept so no update is ever lost.

    ``expertise`` (the assessor's declared expertise in the hypothesis's domain,
    None = the default) and ``evidence`` (how many pieces back it) weigh the
    assessment in the pooled confidence.
    """

    agent: str
    confidence: Confidence
    at: datetime
    reason: str = ""
    expertise: float | None = None
    evidence: int = 0


class HypothesisRecord(_Record, frozen=True):
    """A hypothesis: ``status`` is ``proposed``, ``validated`` or ``refuted``.

    ``confidence`` pools the latest assessment of every agent (the proposer's
    ``initial`` one and each agent's last entry in ``updates``) with the board's
    pooling rule (swarmbus._confidence); ``updates`` holds every assessment in the
    order it was applied.
    """

    id: str
    agent: str
    description: str
    confidence: Confidence
    created: datetime
    status: str = "proposed"
    updates: list[ConfidenceUpdate] = []
    validated_by: str | None = None
    evidence: Any = None
    initial: ConfidenceUpdate | None = None

    def assessments(self) -> list[ConfidenceUpdate]:
        """The latest assessment of each agent, in first-assessed order."""
        latest: dict[str, ConfidenceUpdate] = {}
        for update in [*([self.initial] if self.initial else []), *self.updates]:
            latest[update.agent] = update
        return list(latest.values())


def pooled_confidence(assessments: list[ConfidenceUpdate], pooling: Pooling) -> float:
    """Pool agents' assessments, weighted by expertise and evidence (the seed's rule)."""
    opinions = [Opinion(u.agent, u.confidence, u.evidence) for u in assessments]
    expertise = {
        u.agent: {"": u.expertise if u.expertise is not None else DEFAULT_EXPERTISE}
        for u in assessments
    }
    return aggregate_confidence(opinions, expertise, method=pooling, category="")


class StatusChange(_Record, frozen=True):
    """One step of an action's status history."""

    status: str
    agent: str
    at: datetime
    reason: str = ""


class ActionRecord(_Record, frozen=True):
    """An action taken or proposed (the seed's ``actions_taken``); see ACTION_TRANSITIONS."""

    id: str
    agent: str
    action: str
    status: str
    created: datetime
    type: str = "modify"
    target: str = ""
    parameters: Json = {}
    history: list[StatusChange] = []
    result: Json = {}


Record: TypeAlias = SessionRecord | ContextRecord | FindingRecord | HypothesisRecord | ActionRecord
_R = TypeVar("_R", SessionRecord, ContextRecord, FindingRecord, HypothesisRecord, ActionRecord)

_RECORD_TYPES: Final[dict[str, type[Record]]] = {
    "session": SessionRecord,
    "context": ContextRecord,
    "finding": FindingRecord,
    "hypothesis": HypothesisRecord,
    "action": ActionRecord,
}
_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    kind: msgspec.json.Decoder(cls) for kind, cls in _RECORD_TYPES.items()
}
_encoder = msgspec.json.Encoder()


# --- in-process values ----------------------------------------------------------------


@dataclass(frozen=True)
class BoardChange:
    """One change of a session's board, as a watcher sees it.

    ``value`` is None when the key was deleted or purged (``operation`` says which).
    """

    revision: int
    kind: str
    item_id: str | None
    operation: Literal["put", "delete", "purge"]
    value: Record | None

    def to_dict(self) -> Json:
        """The change as plain data (for JSON/YAML output)."""
        return {
            "revision": self.revision,
            "kind": self.kind,
            "id": getattr(self.value, "id", self.item_id),
            "operation": self.operation,
            "value": msgspec.to_builtins(self.value),
        }


@dataclass(frozen=True)
class Snapshot:
    """A session's board as of ``revision`` (the KV stream sequence last applied)."""

    session_id: str
    revision: int = 0
    session: SessionRecord | None = None
    context: ContextRecord | None = None
    findings: tuple[FindingRecord, ...] = ()
    hypotheses: tuple[HypothesisRecord, ...] = ()
    actions_taken: tuple[ActionRecord, ...] = ()

    def to_dict(self) -> Json:
        """The seed's shape: ``{context, findings, hypotheses, actions_taken}``."""
        builtins: Json = msgspec.to_builtins(
            {
                "context": self.context.data if self.context else {},
                "findings": self.findings,
                "hypotheses": self.hypotheses,
                "actions_taken": self.actions_taken,
            }
        )
        return builtins

    def to_json(self) -> str:
        """The snapshot as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_yaml(self) -> str:
        """The snapshot as YAML."""
        return str(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    def apply(self, change: BoardChange) -> Snapshot:
        """The snapshot after ``change`` (changes must be applied in revision order)."""
        items: dict[str, dict[str, Any]] = {
            "finding": {item_token(f.id): f for f in self.findings},
            "hypothesis": {item_token(h.id): h for h in self.hypotheses},
            "action": {item_token(a.id): a for a in self.actions_taken},
        }
        session, context = self.session, self.context
        value = change.value
        if change.kind == "session":
            session = value if isinstance(value, SessionRecord) else None
        elif change.kind == "context":
            context = value if isinstance(value, ContextRecord) else None
        elif change.kind in items:
            table = items[change.kind]
            if value is None:
                table.pop(change.item_id or "", None)
            else:
                table[change.item_id or ""] = value
        return Snapshot(
            session_id=self.session_id,
            revision=max(self.revision, change.revision),
            session=session,
            context=context,
            findings=tuple(items["finding"].values()),
            hypotheses=tuple(items["hypothesis"].values()),
            actions_taken=tuple(items["action"].values()),
        )


# --- helpers ---------------------------------------------------------------------------


def item_token(item_id: str) -> str:
    """The key token of an item id: itself if it is one safe token, else a safe hash."""
    if not isinstance(item_id, str) or not item_id:
        raise InvalidMessageError("schema", f"an item id must be a non-empty string: {item_id!r}")
    return item_id if _TOKEN.fullmatch(item_id) else subjects.safe_token(item_id)


def _check_id(item_id: str | None) -> str:
    """A caller's item id, or a new one; it is also a wire id, so at most 128 characters."""
    if item_id is not None and len(item_id) > subjects.MAX_ID_LENGTH:
        raise InvalidMessageError(
            "schema", f"an id is at most {subjects.MAX_ID_LENGTH} characters: {item_id!r}"
        )
    return item_id or new_id()


def _check_confidence(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidMessageError("schema", f"confidence must be a number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise InvalidMessageError("schema", f"confidence must be within [0, 1], got {value!r}")
    return float(value)


def _check_expertise(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise InvalidMessageError("schema", f"expertise must be within [0, 1], got {value!r}")
    return value


def _check_evidence(value: int) -> int:
    """A count of evidence; a negative one would give a negative weight in the pool."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidMessageError("schema", f"evidence must be a count >= 0, got {value!r}")
    return value


def _parse_key(session: str, key: str) -> tuple[str, str | None] | None:
    """(kind, item token) of a key in ``session``, or None if it is not a board key."""
    parts = key.split(".", 2)
    if len(parts) < 2 or parts[0] != session or parts[1] not in _RECORD_TYPES:
        return None
    return parts[1], parts[2] if len(parts) == 3 else None


def _operation(msg: Msg) -> Literal["put", "delete", "purge"]:
    op = (msg.headers or {}).get(KV_OP)
    if op == KV_DEL:
        return "delete"
    if op == KV_PURGE or (msg.headers or {}).get(MARKER_REASON_HEADER):
        return "purge"
    return "put"


class _Tail:
    """An ordered push consumer over board keys from a stream sequence on: live changes."""

    def __init__(self, kv_stream: str, subject: str, start: int) -> None:
        self.kv_stream = kv_stream
        self.subject = subject
        self.start = start
        self.send, self.receive = anyio.create_memory_object_stream[Msg](math.inf)
        self.sub: Any = None

    async def open(self, bus: Bus) -> None:
        async def on_msg(msg: Msg) -> None:
            self.send.send_nowait(msg)

        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.start
        )
        try:
            self.sub = await bus.js.subscribe(
                self.subject,
                stream=self.kv_stream,
                cb=on_msg,
                ordered_consumer=True,
                config=config,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
                inactive_threshold=300.0,
            )
        except nats.js.errors.APIError as exc:
            raise _translate(exc, f"cannot watch {self.subject}") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise _transport_error(exc, f"watch {self.subject}") from exc

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self.sub.unsubscribe()
        self.send.close()


# --- the blackboard ----------------------------------------------------------------------


class Blackboard:
    """One session's shared workspace: context, findings, hypotheses, actions taken.

    Open with ``board = await Blackboard.open(bus, "INC-1234")``. Any number of
    processes may open the same session's board; writes never lose each other's
    updates (findings are create-once, everything else is compare-and-set).
    """

    def __init__(
        self, bus: Bus, session: str, kv: KeyValue, bucket: str, max_value_bytes: int
    ) -> None:
        self.bus = bus
        self.session = session
        self.bucket = bucket
        self.max_value_bytes = max_value_bytes
        self.pooling: Pooling = "weighted_average"
        self._kv = kv
        self._trace_attrs = {"swarmbus.session": session}

    @classmethod
    async def open(
        cls,
        bus: Bus,
        session: str,
        *,
        bucket: str = DEFAULT_BUCKET,
        history: int = DEFAULT_HISTORY,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        pooling: Pooling = "weighted_average",
    ) -> Self:
        """Open ``session``'s board, creating the bucket with the bus's replicas/storage.

        ``pooling`` is how hypothesis confidence combines agents' assessments.

        Raises:
            InvalidIdentifierError: ``session`` is not a contract session id.
        """
        subjects.validate_session_id(session)
        kv = await _open_bucket(bus, bucket, history)
        board = cls(bus, session, kv, bucket, max_value_bytes)
        board.pooling = pooling
        return board

    # --- sessions ---

    async def start(
        self, initiator: str, context: Mapping[str, Any] | None = None
    ) -> SessionRecord:
        """Start the session (once) with its initial context; publishes session.started.

        Raises:
            ConflictError: the session was already started. A retry by its initiator
                after a crash before the context was written first writes the context
                and the event.
        """
        subjects.validate_agent_id(initiator)
        data = dict(context or {})
        body = SessionStarted(session_id=self.session, initiator=initiator, context=data)
        validate_body(body)
        at = now()
        record = SessionRecord(session_id=self.session, initiator=initiator, started=at)
        ctx = ContextRecord(data=data, updated_by=initiator, updated=at)
        ctx_bytes = self._encode(self._key("context"), ctx)
        with session_span(self.session, agent=initiator):
            try:
                await self._create(self._key("session"), record)
            except ConflictError as started:
                if (await self.info()).initiator != initiator:
                    raise
                # the initiator retrying after a crash before the context was written:
                # write it and the event, then report the start as done
                try:
                    await self._create(self._key("context"), ctx)
                except ConflictError:
                    raise started from None  # a context is there: nothing to complete
                await self.bus.publish(
                    body, agent=initiator, session=self.session, id=self._event_id("start")
                )
                raise
            await self._put(self._key("context"), ctx_bytes)
            await self.bus.publish(
                body, agent=initiator, session=self.session, id=self._event_id("start")
            )
        return record

    async def complete(
        self, outcome: Mapping[str, Any] | None = None, *, agent: str
    ) -> SessionRecord:
        """Mark the session completed with ``outcome``; publishes session.completed.

        Raises:
            NotFoundError: the session was never started.
            InvalidTransitionError: it is already completed.
        """
        subjects.validate_agent_id(agent)
        data = dict(outcome or {})
        body = SessionCompleted(session_id=self.session, outcome=data)
        validate_body(body)

        def finish(record: SessionRecord) -> SessionRecord:
            if record.status != "active":
                raise InvalidTransitionError("session", self.session, record.status, "completed")
            return msgspec.structs.replace(
                record, status="completed", outcome=data, completed=now(), completed_by=agent
            )

        record = await self._modify("session", None, SessionRecord, finish)
        await self.bus.publish(
            body, agent=agent, session=self.session, id=self._event_id("complete")
        )
        return record

    async def info(self) -> SessionRecord:
        """The session record. Raises NotFoundError if it was never started."""
        return (await self._get("session", None, SessionRecord))[0]

    # --- context ---

    async def get_context(self) -> tuple[ContextRecord, int]:
        """The context and its revision (0 and an empty context if never set)."""
        try:
            return await self._get("context", None, ContextRecord)
        except NotFoundError:
            return ContextRecord(), 0

    async def set_context(
        self, data: Mapping[str, Any], *, agent: str, revision: int | None = None
    ) -> int:
        """Replace the context; with ``revision``, only if it is still that revision.

        Returns the new revision. Raises ConflictError if ``revision`` is stale.
        """
        subjects.validate_agent_id(agent)
        key = self._key("context")
        value = self._encode(key, ContextRecord(data=dict(data), updated_by=agent, updated=now()))
        if revision is None:
            return await self._put(key, value)
        return await self._update(key, value, revision)

    async def update_context(
        self, change: Callable[[Json], Mapping[str, Any]], *, agent: str
    ) -> ContextRecord:
        """Read-modify-write the context under compare-and-set, retrying on conflict.

        ``change`` gets a copy of the current data and returns the new data; it may run
        several times, so it must not have side effects.
        """
        subjects.validate_agent_id(agent)

        def apply(record: ContextRecord) -> ContextRecord:
            return ContextRecord(
                data=dict(change(dict(record.data))), updated_by=agent, updated=now()
            )

        return await self._modify("context", None, ContextRecord, apply, missing=ContextRecord())

    # --- findings ---

    async def append_finding(
        self, finding: Finding, *, agent: str, id: str | None = None
    ) -> FindingRecord:
        """Append a finding (create-once by ``id``) and publish it on finding.reported.

        ``id`` is the finding's and its envelope's id (default: a new UUID). Appending
        the same id again changes nothing on the board and re-publishes the event
        (de-duplicated by the server), so a retry after a crash is safe.
        """
        validate_body(finding)
        subjects.validate_agent_id(agent)
        record = FindingRecord(
            id=_check_id(id),
            agent=agent,
            timestamp=now(),
            category=finding.category,
            content=finding.content,
            confidence=finding.confidence,
            evidence=list(finding.evidence),
        )
        stored = await self._record_finding(record)
        if stored is not record:  # already on the board: re-announce what the board holds
            finding = Finding(
                category=stored.category,  # type: ignore[arg-type]
                content=stored.content,
                confidence=stored.confidence,
                evidence=stored.evidence,
            )
        event = envelope_for(
            finding,
            agent=stored.agent,
            session=self.session,
            id=stored.id,
            timestamp=stored.timestamp,
        )
        await self.bus.publish_message(event, wait=False)
        return stored

    async def _record_finding(self, record: FindingRecord) -> FindingRecord:
        key = self._key("finding", record.id)
        try:
            await self._create(key, record)
        except ConflictError:
            return (await self._get("finding", record.id, FindingRecord))[0]
        return record

    async def findings(
        self, *, agent: str | None = None, category: str | None = None
    ) -> list[FindingRecord]:
        """The session's findings in append order, optionally filtered."""
        found = (await self.snapshot()).findings
        return [
            f
            for f in found
            if (agent is None or f.agent == agent) and (category is None or f.category == category)
        ]

    # --- hypotheses ---

    async def propose_hypothesis(
        self,
        description: str,
        confidence: float,
        *,
        agent: str,
        id: str | None = None,
        expertise: float | None = None,
        evidence: int = 0,
    ) -> HypothesisRecord:
        """Propose a hypothesis; publishes hypothesis.proposed.

        ``expertise`` and ``evidence`` weigh the proposer's assessment (see
        ``update_confidence``).

        Raises:
            ConflictError: a hypothesis with ``id`` exists.
        """
        subjects.validate_agent_id(agent)
        at = now()
        initial = ConfidenceUpdate(
            agent=agent,
            confidence=_check_confidence(confidence),
            at=at,
            expertise=_check_expertise(expertise),
            evidence=_check_evidence(evidence),
        )
        record = HypothesisRecord(
            id=id or new_id(),
            agent=agent,
            description=description,
            confidence=initial.confidence,
            created=at,
            initial=initial,
        )
        body = HypothesisProposed(
            hypothesis_id=record.id,
            agent_id=agent,
            description=description,
            confidence=record.confidence,
        )
        validate_body(body)
        await self._create(self._key("hypothesis", record.id), record)
        await self.bus.publish(
            body, agent=agent, session=self.session, id=self._event_id("hypothesis", record.id)
        )
        return record

    async def update_confidence(
        self,
        hypothesis_id: str,
        confidence: float,
        *,
        agent: str,
        reason: str = "",
        expertise: float | None = None,
        evidence: int = 0,
    ) -> HypothesisRecord:
        """Record ``agent``'s confidence in a hypothesis (appended, never lost).

        The hypothesis's ``confidence`` becomes the pool of every agent's latest
        assessment, each weighted by ``expertise`` (the agent's declared expertise in
        the hypothesis's domain, e.g. ``agent.expertise["deployment"]``; None = 0.5)
        times ``0.5 + 0.1 * evidence``. The seed has no event for this; watchers of the
        board see it.
        """
        subjects.validate_agent_id(agent)
        value = _check_confidence(confidence)
        weight = _check_expertise(expertise)
        _check_evidence(evidence)

        def apply(record: HypothesisRecord) -> HypothesisRecord:
            update = ConfidenceUpdate(
                agent=agent,
                confidence=value,
                at=now(),
                reason=reason,
                expertise=weight,
                evidence=evidence,
            )
            updated = msgspec.structs.replace(record, updates=[*record.updates, update])
            pooled = pooled_confidence(updated.assessments(), self.pooling)
            return msgspec.structs.replace(updated, confidence=pooled)

        return await self._modify("hypothesis", hypothesis_id, HypothesisRecord, apply)

    async def validate_hypothesis(
        self, hypothesis_id: str, result: bool, *, agent: str, evidence: Any = None
    ) -> HypothesisRecord:
        """Validate (``result=True``) or refute a hypothesis; publishes hypothesis.validated.

        Raises:
            InvalidTransitionError: it was already validated or refuted.
        """
        subjects.validate_agent_id(agent)
        status = "validated" if result else "refuted"
        body = HypothesisValidated(
            hypothesis_id=hypothesis_id, validated_by=agent, result=result, evidence=evidence
        )
        validate_body(body)

        def apply(record: HypothesisRecord) -> HypothesisRecord:
            if record.status != "proposed":
                raise InvalidTransitionError("hypothesis", record.id, record.status, status)
            return msgspec.structs.replace(
                record, status=status, validated_by=agent, evidence=evidence
            )

        record = await self._modify("hypothesis", hypothesis_id, HypothesisRecord, apply)
        await self.bus.publish(
            body, agent=agent, session=self.session, id=self._event_id("validated", record.id)
        )
        return record

    async def get_hypothesis(self, hypothesis_id: str) -> HypothesisRecord:
        """One hypothesis. Raises NotFoundError."""
        return (await self._get("hypothesis", hypothesis_id, HypothesisRecord))[0]

    # --- actions taken ---

    async def record_action(
        self,
        action: str,
        *,
        agent: str,
        status: str = "awaiting_approval",
        type: Literal["query", "modify", "notify", "escalate"] = "modify",
        target: str = "",
        parameters: Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> ActionRecord:
        """Record an action (e.g. "recommended rollback") with its initial status.

        Publishes the contract's ``action`` message on action.proposed, and an action
        recorded as ``completed`` also action.completed. ``id`` lets a caller (e.g.
        consensus, with its proposal id) name the action.

        Raises:
            InvalidTransitionError: ``status`` is not a valid initial status.
            ConflictError: an action with ``id`` exists.
        """
        subjects.validate_agent_id(agent)
        if status not in ACTION_INITIAL:
            raise InvalidTransitionError("action", id or "(new)", "(none)", status)
        body = Action(
            type=type,
            target=target,
            parameters=dict(parameters or {}),
            requires_approval=status == "awaiting_approval",
        )
        validate_body(body)
        at = now()
        record = ActionRecord(
            id=_check_id(id),
            agent=agent,
            action=action,
            status=status,
            created=at,
            type=type,
            target=target,
            parameters=body.parameters,
            history=[StatusChange(status=status, agent=agent, at=at)],
        )
        await self._create(self._key("action", record.id), record)
        await self.bus.publish(
            body, agent=agent, session=self.session, id=self._event_id("action", record.id)
        )
        if status == "completed":  # recorded after the fact: it completed too
            await self.bus.publish(
                ActionCompleted(action_id=record.id, status=status, result=record.result),
                agent=agent,
                session=self.session,
                id=self._event_id(status, record.id),
            )
        return record

    async def set_action_status(
        self,
        action_id: str,
        status: str,
        *,
        agent: str,
        reason: str = "",
        result: Mapping[str, Any] | None = None,
    ) -> ActionRecord:
        """Move an action to ``status`` if ACTION_TRANSITIONS allows it.

        Completed and failed actions publish action.completed (with ``status``).

        Raises:
            NotFoundError: no such action.
            InvalidTransitionError: the current status does not allow ``status``.
        """
        subjects.validate_agent_id(agent)
        if status not in ACTION_TRANSITIONS:
            raise InvalidTransitionError("action", action_id, "(any)", status)

        def apply(record: ActionRecord) -> ActionRecord:
            if status not in ACTION_TRANSITIONS.get(record.status, frozenset()):
                raise InvalidTransitionError("action", record.id, record.status, status)
            change = StatusChange(status=status, agent=agent, at=now(), reason=reason)
            return msgspec.structs.replace(
                record,
                status=status,
                history=[*record.history, change],
                result=dict(result) if result is not None else record.result,
            )

        record = await self._modify("action", action_id, ActionRecord, apply)
        if status in ("completed", "failed"):
            await self.bus.publish(
                ActionCompleted(action_id=record.id, status=status, result=record.result),
                agent=agent,
                session=self.session,
                id=self._event_id(status, record.id),
            )
        return record

    async def get_action(self, action_id: str) -> ActionRecord:
        """One action. Raises NotFoundError."""
        return (await self._get("action", action_id, ActionRecord))[0]

    # --- reading ---

    async def snapshot(self) -> Snapshot:
        """The whole board of this session, read in one pass over the KV stream."""
        msgs = await last_per_subject(self.bus.js, self._stream, self._subject)
        items: dict[str, dict[str, Any]] = {"finding": {}, "hypothesis": {}, "action": {}}
        single: dict[str, Any] = {}
        start = len(self._subject) - 1
        for msg in msgs:  # tight loop: a snapshot may hold tens of thousands of keys
            if msg.headers and _operation(msg) != "put":
                continue  # the key's last entry is a delete/purge marker: it is gone
            kind, _, token = msg.subject[start:].partition(".")
            decoder = _DECODERS.get(kind)
            if decoder is None:
                continue
            try:
                value = decoder.decode(msg.data)
            except msgspec.DecodeError:
                continue  # not a board value (written by something else): skip it
            table = items.get(kind)
            if table is None:
                single[kind] = value
            else:
                table[token] = value
        return Snapshot(
            session_id=self.session,
            revision=msgs[-1].metadata.sequence.stream if msgs else 0,
            session=single.get("session"),
            context=single.get("context"),
            findings=tuple(items["finding"].values()),
            hypotheses=tuple(items["hypothesis"].values()),
            actions_taken=tuple(items["action"].values()),
        )

    async def watch(self, *, after: int | None = None) -> AsyncIterator[Snapshot | BoardChange]:
        """Yield the current Snapshot, then every later BoardChange, in revision order.

        With ``after`` (the revision of a snapshot or change a previous watcher saw),
        yield no snapshot but every change after it, so a watcher resumes where it
        stopped. Of a key changed more than ``history`` times since, the older
        values may be gone; its latest value is always delivered.
        """
        if after is None:
            snapshot = await self.snapshot()
            after = snapshot.revision
            yield snapshot
        tail = _Tail(self._stream, self._subject, after + 1)
        try:
            await tail.open(self.bus)
            async for msg in tail.receive:
                change = self._change(msg)
                if change is not None:
                    yield change
        finally:
            await tail.close()

    @property
    def _stream(self) -> str:
        return f"{_KV_STREAM_PREFIX}{self.bucket}"

    @property
    def _subject(self) -> str:
        return f"{_KV_SUBJECT_PREFIX}.{self.bucket}.{self.session}.>"

    def _change(self, msg: Msg) -> BoardChange | None:
        key = msg.subject[len(_KV_SUBJECT_PREFIX) + len(self.bucket) + 2 :]
        parsed = _parse_key(self.session, key)
        if parsed is None:
            return None
        kind, token = parsed
        op = _operation(msg)
        value = None
        if op == "put":
            try:
                value = _DECODERS[kind].decode(msg.data)
            except msgspec.DecodeError:
                return None  # not a board value (written by something else): skip it
        return BoardChange(
            revision=msg.metadata.sequence.stream,
            kind=kind,
            item_id=token,
            operation=op,
            value=value,
        )

    # --- bucket-wide ---

    @staticmethod
    async def sessions(bus: Bus, *, bucket: str = DEFAULT_BUCKET) -> list[SessionRecord]:
        """Every session on the board (active and completed), oldest first."""
        await _open_bucket(bus, bucket, DEFAULT_HISTORY)  # the stream must exist to read it
        found: list[SessionRecord] = []
        stream, subject = f"{_KV_STREAM_PREFIX}{bucket}", f"{_KV_SUBJECT_PREFIX}.{bucket}.*.session"
        for msg in await last_per_subject(bus.js, stream, subject):
            if _operation(msg) == "put":
                with contextlib.suppress(msgspec.DecodeError):
                    found.append(_DECODERS["session"].decode(msg.data))
        return sorted(found, key=lambda s: s.started)

    @staticmethod
    async def purge_completed(
        bus: Bus,
        older_than: timedelta,
        *,
        bucket: str = DEFAULT_BUCKET,
        at: datetime | None = None,
    ) -> list[str]:
        """Remove every key of sessions completed more than ``older_than`` ago.

        The retention policy: active sessions are never removed. Returns the purged
        session ids. Run it periodically (``recording(..., retention=...)`` does).
        """
        cutoff = (at or now()) - older_than
        purged = []
        for record in await Blackboard.sessions(bus, bucket=bucket):
            if record.status == "completed" and record.completed and record.completed < cutoff:
                subject = f"{_KV_SUBJECT_PREFIX}.{bucket}.{record.session_id}.>"
                try:
                    await bus.js.purge_stream(f"{_KV_STREAM_PREFIX}{bucket}", subject=subject)
                except nats.js.errors.APIError as exc:
                    raise _translate(exc, f"cannot purge {subject}") from exc
                except (TimeoutError, nats.errors.Error) as exc:
                    raise _transport_error(exc, f"purge {subject}") from exc
                purged.append(record.session_id)
        return purged

    @staticmethod
    @contextlib.asynccontextmanager
    async def recording(
        bus: Bus,
        *,
        bucket: str = DEFAULT_BUCKET,
        durable: str | None = None,
        deliver_new: bool = False,
        retention: timedelta | None = None,
        retention_interval: float = 3600.0,
    ) -> AsyncIterator[None]:
        """Record every finding published on ``agent.finding.reported.>`` on the board.

        This is how findings from plain NATS clients (any language) reach the board:
        a durable consumer creates each finding key by envelope id, so redeliveries
        and findings the board already holds are no-ops. Run one (or more: they share
        the durable) per deployment. With ``retention``, it also runs
        ``purge_completed`` every ``retention_interval`` seconds.
        """
        kv = await _open_bucket(bus, bucket, DEFAULT_HISTORY)

        async def handle(message: Message) -> None:
            if not isinstance(message, FindingMessage):
                return
            board = Blackboard(bus, message.source.session, kv, bucket, DEFAULT_MAX_VALUE_BYTES)
            f = message.finding
            await board._record_finding(
                FindingRecord(
                    id=message.id,
                    agent=message.source.agent,
                    timestamp=message.timestamp,
                    category=f.category,
                    content=f.content,
                    confidence=f.confidence,
                    evidence=list(f.evidence),
                )
            )

        async def retain(stop: anyio.Event) -> None:
            assert retention is not None
            while not stop.is_set():
                try:
                    await Blackboard.purge_completed(bus, retention, bucket=bucket)
                except SwarmbusError as exc:  # retry next interval; keep recording
                    log.warning("blackboard retention on %s failed: %s", bucket, exc)
                with anyio.move_on_after(retention_interval):
                    await stop.wait()

        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: bus.consume(
                    durable or f"swarmbus-board-{bucket}",
                    [subjects.event_filter("finding", "reported")],
                    handle,
                    receiver=RECORDER_AGENT,
                    limiter=anyio.Semaphore(64),
                    stop=stop,
                    deliver_new=deliver_new,
                    task_status=task_status,
                )
            )
            if retention is not None:
                tg.start_soon(retain, stop)
            try:
                yield
            finally:
                stop.set()

    # --- KV plumbing ---

    def _key(self, kind: str, item_id: str | None = None) -> str:
        base = f"{self.session}.{kind}"
        return base if item_id is None else f"{base}.{item_token(item_id)}"

    def _event_id(self, what: str, item_id: str = "") -> str:
        """A deterministic event id, so a retried call's event is de-duplicated."""
        return subjects.safe_token(f"board:{self.session}:{what}:{item_id}")

    def _encode(self, key: str, record: Record) -> bytes:
        """Encode a value; inputs were validated where the record was built."""
        try:
            data = _encoder.encode(record)
        except (TypeError, msgspec.EncodeError) as exc:
            raise InvalidMessageError("schema", f"{key}: {exc}") from None
        if len(data) > self.max_value_bytes:
            raise ValueTooLargeError(key, len(data), self.max_value_bytes)
        return data

    async def _create(self, key: str, record: Record) -> int:
        data = self._encode(key, record)
        try:
            return await kv_write(self._kv, key, data, last=0, attributes=self._trace_attrs)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise ConflictError(key, 0, "already exists") from exc
        except Exception as exc:
            raise _kv_error(exc, f"create {key}") from exc

    async def _put(self, key: str, data: bytes) -> int:
        try:
            return await kv_write(self._kv, key, data, attributes=self._trace_attrs)
        except Exception as exc:
            raise _kv_error(exc, f"put {key}") from exc

    async def _update(self, key: str, data: bytes, revision: int) -> int:
        try:
            return await kv_write(self._kv, key, data, last=revision, attributes=self._trace_attrs)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise ConflictError(key, revision, "changed since it was read") from exc
        except Exception as exc:
            raise _kv_error(exc, f"update {key}") from exc

    async def _get(self, kind: str, item_id: str | None, cls: type[_R]) -> tuple[_R, int]:
        key = self._key(kind, item_id)
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError as exc:
            raise NotFoundError(kind, item_id or self.session) from exc
        except Exception as exc:
            raise _kv_error(exc, f"get {key}") from exc
        try:
            value: _R = _DECODERS[kind].decode(entry.value or b"")
        except msgspec.DecodeError as exc:  # written by something else than a board
            raise InvalidMessageError("schema", f"{key} is not a board value: {exc}") from exc
        return value, int(entry.revision or 0)

    async def _modify(
        self,
        kind: str,
        item_id: str | None,
        cls: type[_R],
        change: Callable[[_R], _R],
        *,
        missing: _R | None = None,
    ) -> _R:
        """Read-modify-write under compare-and-set, retrying (with jitter) on conflict."""
        key = self._key(kind, item_id)
        for attempt in range(CAS_ATTEMPTS):
            try:
                current, revision = await self._get(kind, item_id, cls)
            except NotFoundError:
                if missing is None:
                    raise
                current, revision = missing, 0
            new = change(current)
            try:
                await self._update(key, self._encode(key, new), revision)
            except ConflictError:
                await anyio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))
                continue
            return new
        raise ConflictError(key, None, f"still contended after {CAS_ATTEMPTS} attempts")


def _kv_error(exc: BaseException, what: str) -> SwarmbusError:
    if isinstance(exc, SwarmbusError):
        return exc
    if isinstance(exc, nats.js.errors.APIError):
        return _translate(exc, what)
    return _transport_error(exc, what)


async def _open_bucket(bus: Bus, bucket: str, history: int) -> KeyValue:
    return await bus.key_value(
        bucket,
        history=history,
        max_value_size=bus.settings.max_message_bytes,
        description="swarmbus blackboard: one workspace per session",
    )
