"""The runtime API server: every operation a service needs, over NATS request/reply.

One subscription on ``swarmbus.api.>`` (a queue group, so replicas share the load).
A request is decoded against its operation's Struct (``api.OPERATIONS``) and run on
the public APIs of the blackboard, task queue, consensus and locks, acting as the
agent named by the subject's last token. Every request with a reply subject gets a
``Reply``: a malformed one (not JSON, unknown field, bad value, unknown operation,
subject of the wrong shape) an error with a ``code`` and a ``reason`` saying what to
send instead. A malformed message without a reply subject is reported as an
``agent.error.occurred`` event instead (nobody would read a reply).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec

from swarmbus import _subjects as subjects
from swarmbus._blackboard import Blackboard
from swarmbus._bus import Bus
from swarmbus._consensus import Consensus
from swarmbus._coordinator import route_type
from swarmbus._errors import (
    AlreadyVotedError,
    ConflictError,
    ConnectionError,
    InvalidIdentifierError,
    InvalidMessageError,
    InvalidTaskError,
    InvalidTransitionError,
    InvalidTTLError,
    LockLostError,
    NotEligibleError,
    NotFoundError,
    PermissionDeniedError,
    ProposalClosedError,
    PublishError,
    SwarmbusError,
    TaskClaimLostError,
)
from swarmbus._jetstream.replies import RawMessage
from swarmbus._locks import Lock, lock_holder
from swarmbus._messages import Finding
from swarmbus._requester import check_inbox
from swarmbus._runtime import api
from swarmbus._runtime.holdings import Departures, Holdings
from swarmbus._runtime.intake import Intake
from swarmbus._runtime.presence import Presence
from swarmbus._tasks import TaskQueue

log = logging.getLogger("swarmbus.runtime")

RUNTIME_AGENT: Final = "swarmbus/runtime"
API_SHAPE: Final = "swarmbus.api.<domain>.<verb>.<session>.<agent>"

_encoder = msgspec.json.Encoder()
_OPERATIONS: Final = {(op.domain, op.verb): op for op in api.OPERATIONS}
#: Most specific first: subclasses before their bases.
_CODES: Final[tuple[tuple[type[Exception], str], ...]] = (
    (TaskClaimLostError, "claim_lost"),
    (AlreadyVotedError, "already_voted"),
    (ConflictError, "conflict"),
    (NotEligibleError, "not_eligible"),
    (PermissionDeniedError, "permission_denied"),
    (NotFoundError, "not_found"),
    (InvalidTransitionError, "invalid_transition"),
    (ProposalClosedError, "proposal_closed"),
    (LockLostError, "not_held"),
    (InvalidMessageError, "invalid_request"),
    (InvalidIdentifierError, "invalid_request"),
    (InvalidTaskError, "invalid_request"),
    (InvalidTTLError, "invalid_request"),
    (ConnectionError, "unavailable"),
    (PublishError, "unavailable"),
)


class RequestError(SwarmbusError):
    """A request the API refuses, with the reply's code, reason and what to use."""

    def __init__(self, code: str, reason: str, use: str = "") -> None:
        self.code = code
        self.reason = reason
        self.use = use
        super().__init__(f"{code}: {reason}")


def error_reply(code: str, reason: str, use: str = "") -> bytes:
    error = api.ApiError(code=code, reason=reason, use=use)  # type: ignore[arg-type]
    return _encoder.encode(api.Reply(ok=False, error=error))


def _code_of(exc: SwarmbusError) -> str:
    return next((code for cls, code in _CODES if isinstance(exc, cls)), "internal")


class ApiServer:
    """Answers ``swarmbus.api.>`` requests (see the module docstring).

    Args:
        bus: the runtime's connection (a service account: it acts for any agent).
        consensus: where proposals and votes are recorded.
        presence: who is alive; joining starts tracking an agent.
        holdings: claims and locks the runtime holds for agents.
        intake: opens incidents and starts their swarms.
        departures: releases what an agent holds when it leaves.
    """

    def __init__(
        self,
        bus: Bus,
        consensus: Consensus,
        presence: Presence,
        holdings: Holdings,
        intake: Intake,
        departures: Departures,
    ) -> None:
        self.bus = bus
        # Each request's subject ends in the requester's id, which only that agent may
        # publish (deploy permissions): the runtime acts in its name.
        bus.acts_for_agents = True
        self.consensus = consensus
        self.presence = presence
        self.holdings = holdings
        self.intake = intake
        self.departures = departures
        self._queues: dict[tuple[str, str], TaskQueue] = {}

    async def close(self) -> None:
        """Close the task queues opened for requests."""
        for queue in self._queues.values():
            await queue.close()
        self._queues.clear()

    async def handle(self, raw: RawMessage) -> bytes | None:
        """One request -> its reply bytes (None: no reply subject, reported as an event).

        A reply subject that is no inbox is not answered (nor the request run): this
        service may write where agents may not, and NATS lets it publish to any reply
        subject it is sent (``allow_responses``)."""
        if raw.reply:
            try:
                check_inbox(raw.reply)
            except InvalidMessageError as exc:
                await self.bus.reject(
                    subject=raw.subject,
                    data=raw.data,
                    code=exc.code,
                    reason=exc.reason,
                    receiver=RUNTIME_AGENT,
                )
                return None
        try:
            op, session, agent, request = self._parse(raw)
            self.presence.seen(agent)
            result = await self._run(op, session, agent, request)
            return _encoder.encode(api.Reply(ok=True, result=result))
        except RequestError as exc:
            return await self._refuse(raw, exc.code, exc.reason, exc.use)
        except SwarmbusError as exc:
            return await self._refuse(raw, _code_of(exc), str(exc))
        except Exception as exc:
            log.exception("API request on %s failed", raw.subject)
            return await self._refuse(raw, "internal", f"{type(exc).__name__}: {exc}")

    async def _refuse(self, raw: RawMessage, code: str, reason: str, use: str = "") -> bytes | None:
        if raw.reply:
            return error_reply(code, reason, use)
        if code in ("invalid_request", "unknown_operation", "wrong_subject"):
            await self.bus.reject(
                subject=raw.subject, data=raw.data, code=code, reason=reason, receiver=RUNTIME_AGENT
            )
        return None

    def _parse(self, raw: RawMessage) -> tuple[api.Operation, str, str, Any]:
        parts = subjects.parse_api_subject(raw.subject)
        if parts is None:
            raise RequestError("wrong_subject", f"{raw.subject} is not {API_SHAPE}", API_SHAPE)
        domain, verb, session, agent = parts
        try:
            subjects.validate_session_id(session)
            subjects.validate_agent_id(agent)
        except InvalidIdentifierError as exc:
            raise RequestError("wrong_subject", str(exc), API_SHAPE) from None
        op = _OPERATIONS.get((domain, verb))
        if op is None:
            known = ", ".join(o.name for o in api.OPERATIONS)
            raise RequestError("unknown_operation", f"no operation {domain}.{verb}; use {known}")
        try:
            request = msgspec.json.decode(raw.data or b"{}", type=op.request)
        except msgspec.ValidationError as exc:
            raise RequestError("invalid_request", f"{op.name}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise RequestError("invalid_request", f"{op.name}: not a JSON object: {exc}") from None
        return op, session, agent, request

    async def _run(self, op: api.Operation, session: str, agent: str, request: Any) -> Any:
        method: Callable[[str, str, Any], Awaitable[Any]] = getattr(self, f"_{op.domain}_{op.verb}")
        return await method(session, agent, request)

    async def _queue(self, session: str, agent: str = "") -> TaskQueue:
        """The session's queue; with ``agent``, that agent's own claimer (a TaskQueue
        object claims one batch at a time, and its claims live as long as it does)."""
        queue = self._queues.get((session, agent))
        if queue is None:
            queue = TaskQueue(self.bus, session)
            await queue.open()
            self._queues[(session, agent)] = queue
        return queue

    async def _claimer(self, session: str, agent: str) -> TaskQueue:
        return await self._queue(session, agent)

    # --- incidents and sessions -----------------------------------------------------

    async def _incident_open(
        self, session: str, agent: str, request: api.IncidentOpen
    ) -> api.IncidentOpened:
        return await self.intake.open(session, agent, request)

    async def _incident_close(
        self, session: str, agent: str, request: api.IncidentClose
    ) -> api.SessionRef:
        record = await self.intake.close(session, agent, request.outcome)
        return api.SessionRef(session=session, status=record.status)

    async def _session_join(
        self, session: str, agent: str, request: api.SessionJoin
    ) -> api.SessionJoined:
        await self.consensus.join(session, agent)
        self.presence.join(agent)
        return api.SessionJoined(
            session=session,
            members=await self.consensus.members(session),
            heartbeat_interval=self.presence.interval,
            dead_after=self.presence.dead_after,
        )

    async def _session_leave(
        self, session: str, agent: str, request: api.SessionLeave
    ) -> api.Released:
        self.presence.leave(agent)
        released = await self.departures.depart(agent, "left")
        return api.Released(agent=agent, tasks=released.tasks, locks=released.locks)

    async def _presence_heartbeat(
        self, session: str, agent: str, request: api.Heartbeat
    ) -> api.Alive:
        if not self.presence.seen(agent):
            raise RequestError(
                "not_found",
                f"{agent} has not joined: heartbeats count after a session join",
                "swarmbus.api.session.join.<session>.<agent>",
            )
        return api.Alive(agent=agent, dead_after=self.presence.dead_after)

    # --- knowledge -----------------------------------------------------------------------

    async def _finding_post(
        self, session: str, agent: str, request: api.FindingPost
    ) -> api.FindingPosted:
        board = await Blackboard.open(self.bus, session)
        finding = Finding(
            category=request.category,
            content=request.content,
            confidence=request.confidence,
            evidence=request.evidence,
        )
        record = await board.append_finding(finding, agent=agent, id=request.id)
        return api.FindingPosted(finding_id=record.id)

    async def _hypothesis_post(
        self, session: str, agent: str, request: api.HypothesisPost
    ) -> api.HypothesisPosted:
        board = await Blackboard.open(self.bus, session)
        record = await board.propose_hypothesis(
            request.description, request.confidence, agent=agent, id=request.id
        )
        return api.HypothesisPosted(hypothesis_id=record.id, confidence=record.confidence)

    async def _board_get(self, session: str, agent: str, request: api.BoardGet) -> api.Board:
        board = await Blackboard.open(self.bus, session)
        return api.Board(board=(await board.snapshot()).to_dict())

    # --- tasks -----------------------------------------------------------------------------

    async def _task_create(
        self, session: str, agent: str, request: api.TaskCreate
    ) -> api.TaskState:
        queue = await self._queue(session)
        task = await queue.create(
            request.type,
            agent=agent,
            priority=request.priority,
            target=request.target,
            context=request.context,
            timeout=request.timeout,
            requires_approval=request.requires_approval,
            max_attempts=request.max_attempts,
        )
        return api.TaskState(task=task)

    async def _task_claim(self, session: str, agent: str, request: api.TaskClaim) -> api.TaskState:
        types = list(request.types)
        if request.capability is not None:
            types += [route_type(request.capability), route_type(request.capability, agent)]
        if not types:
            raise RequestError("invalid_request", "task.claim needs types or a capability")
        claim = await (await self._claimer(session, agent)).claim(
            agent=agent, types=types, timeout=request.wait
        )
        if claim is None:
            return api.TaskState(task=None)
        self.holdings.add_claim(agent, session, claim)
        return api.TaskState(task=claim.task, attempt=claim.attempt)

    async def _task_heartbeat(
        self, session: str, agent: str, request: api.TaskRef
    ) -> api.TaskState:
        claim = self._claim(agent, request.task_id)
        await claim.heartbeat()
        return api.TaskState(task=claim.task, attempt=claim.attempt)

    async def _task_complete(
        self, session: str, agent: str, request: api.TaskComplete
    ) -> api.TaskState:
        claim = self._claim(agent, request.task_id)
        try:
            task = await claim.complete(request.result)
        finally:
            self.holdings.drop_claim(agent, request.task_id)
        return api.TaskState(task=task, attempt=task.attempts)

    async def _task_fail(self, session: str, agent: str, request: api.TaskFail) -> api.TaskState:
        claim = self._claim(agent, request.task_id)
        try:
            task = await claim.fail(request.error, retry=request.retry)
        finally:
            self.holdings.drop_claim(agent, request.task_id)
        return api.TaskState(task=task, attempt=task.attempts)

    async def _task_get(self, session: str, agent: str, request: api.TaskRef) -> api.TaskState:
        task = await (await self._queue(session)).get(request.task_id)
        return api.TaskState(task=task, attempt=task.attempts)

    def _claim(self, agent: str, task_id: str) -> Any:
        try:
            return self.holdings.claim(agent, task_id)
        except NotFoundError:
            raise RequestError(
                "not_found",
                f"{agent} holds no claim on task {task_id} through the runtime",
                "swarmbus.api.task.claim.<session>.<agent>",
            ) from None

    # --- consensus ---------------------------------------------------------------------------

    async def _proposal_create(
        self, session: str, agent: str, request: api.ProposalCreate
    ) -> api.ProposalState:
        record = await self.consensus.propose(request.proposal, agent=agent, session=session)
        return api.ProposalState(record=record)

    async def _vote_cast(
        self, session: str, agent: str, request: api.VoteCast
    ) -> api.ProposalState:
        return api.ProposalState(record=await self.consensus.vote(request.vote, agent=agent))

    async def _proposal_get(
        self, session: str, agent: str, request: api.ProposalRef
    ) -> api.ProposalState:
        return api.ProposalState(record=await self.consensus.get(request.proposal_id))

    # --- locks ----------------------------------------------------------------------------------

    async def _lock_acquire(
        self, session: str, agent: str, request: api.LockAcquire
    ) -> api.LockState:
        held = self.holdings.lock(agent, request.resource)
        if held is not None and held.lease is not None:
            renewed = await held.refresh(ttl=request.ttl)
            return api.LockState(
                resource=request.resource, held=True, token=renewed.token, owner=agent
            )
        lock = Lock(self.bus, request.resource, agent, ttl=request.ttl)
        lease = await lock.acquire(timeout=request.wait)
        if lease is None:
            holder = await lock_holder(self.bus, request.resource)
            owner = holder.owner if holder is not None else None
            return api.LockState(resource=request.resource, held=False, owner=owner)
        self.holdings.add_lock(agent, session, lock)
        return api.LockState(resource=request.resource, held=True, token=lease.token, owner=agent)

    async def _lock_release(
        self, session: str, agent: str, request: api.LockRelease
    ) -> api.LockState:
        lock = self.holdings.lock(agent, request.resource)
        if lock is None:
            raise RequestError(
                "not_held",
                f"{agent} holds no lock on {request.resource!r} through the runtime",
                "swarmbus.api.lock.acquire.<session>.<agent>",
            )
        try:
            await lock.release()
        finally:
            self.holdings.drop_lock(agent, request.resource)
        return api.LockState(resource=request.resource, held=False)
