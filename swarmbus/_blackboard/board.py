"""The Blackboard: a session's operations (sessions, context, findings, hypotheses,
actions taken) and the lifecycle events they publish.

Every write goes to KV first and then publishes its lifecycle event (see the package
docstring); the key plumbing is ``BoardStore``'s, reading and watching
``swarmbus._blackboard.watch``'s, recording and retention
``swarmbus._blackboard.recording``'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal, Self

import msgspec

from swarmbus import _subjects as subjects
from swarmbus._blackboard.recording import purge_completed, sessions
from swarmbus._blackboard.recording import recording as _recording
from swarmbus._blackboard.records import (
    ACTION_INITIAL,
    ACTION_TRANSITIONS,
    ActionRecord,
    BoardChange,
    ConfidenceUpdate,
    ContextRecord,
    FindingRecord,
    HypothesisRecord,
    Json,
    SessionRecord,
    Snapshot,
    StatusChange,
    check_confidence,
    check_evidence,
    check_expertise,
    check_id,
    pooled_confidence,
)
from swarmbus._blackboard.store import (
    DEFAULT_BUCKET,
    DEFAULT_HISTORY,
    DEFAULT_MAX_VALUE_BYTES,
    BoardStore,
    open_store,
)
from swarmbus._blackboard.watch import open_tail, read_snapshot
from swarmbus._bus import Bus
from swarmbus._confidence import Pooling
from swarmbus._errors import (
    ConflictError,
    InvalidTransitionError,
    NotFoundError,
)
from swarmbus._messages import (
    Action,
    ActionCompleted,
    Finding,
    HypothesisProposed,
    HypothesisValidated,
    SessionCompleted,
    SessionStarted,
    envelope_for,
    new_id,
    now,
    validate_body,
)
from swarmbus._state import StateStore
from swarmbus._telemetry import session_span


class Blackboard(BoardStore):
    """One session's shared workspace: context, findings, hypotheses, actions taken.

    Open with ``board = await Blackboard.open(bus, "INC-1234")``. Any number of
    processes may open the same session's board; writes never lose each other's
    updates (findings are create-once, everything else is compare-and-set).
    """

    def __init__(
        self, bus: Bus, session: str, kv: StateStore, bucket: str, max_value_bytes: int
    ) -> None:
        super().__init__(bus, session, kv, bucket, max_value_bytes)
        self.pooling: Pooling = "weighted_average"

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
        kv = await open_store(bus, bucket, history, session)
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
            id=check_id(id),
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
            confidence=check_confidence(confidence),
            at=at,
            expertise=check_expertise(expertise),
            evidence=check_evidence(evidence),
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
        value = check_confidence(confidence)
        weight = check_expertise(expertise)
        check_evidence(evidence)

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
            id=check_id(id),
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
        return await read_snapshot(self._kv, self.session)

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
        tail = open_tail(self._kv, self.session, after + 1)
        try:
            await tail.open()
            async for change in tail.receive:
                yield change
        finally:
            await tail.close()

    # --- bucket-wide ---

    @staticmethod
    async def sessions(bus: Bus, *, bucket: str = DEFAULT_BUCKET) -> list[SessionRecord]:
        """Every session on the board (active and completed), oldest first."""
        return await sessions(bus, bucket)

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
        return await purge_completed(bus, older_than, bucket, at)

    recording = staticmethod(_recording)
    """Record every finding published on ``agent.finding.reported.>`` on the board
    (``swarmbus._blackboard.recording.recording``)."""
