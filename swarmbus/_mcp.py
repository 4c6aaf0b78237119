"""The MCP server ``mcp-agent-swarm``: LLM agents join a swarm through tools.

One server process is one agent, ``AGENT_ID``: every tool posts, claims, proposes and
votes as that id, and no tool takes an agent id, so a tool call cannot act as another
agent (bind the id to a NATS user with ``agent.*.*.*.<id>`` publish permissions to
make that hold against other clients too). Configuration is the seed's block::

    SWARM_BACKEND=nats  NATS_URL=nats://127.0.0.1:4222  AGENT_ID=ops/claude

Tools are thin: the blackboard, task queue and consensus modules do the work; this
module validates input (the SDK checks each call against the tool's JSON schema),
turns swarmbus errors into tool errors an LLM can act on, and holds task claims
(heartbeating them) between ``swarm.claim_task`` and ``swarm.complete_task``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, ParamSpec, TypeVar

import anyio
import anyio.abc
import msgspec
import pydantic
from pydantic import BaseModel, Field

try:
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "mcp-agent-swarm needs the MCP Python SDK 2.x: pip install 'swarmbus[mcp]'"
    ) from exc

from swarmbus import __version__
from swarmbus import _subjects as subjects
from swarmbus._blackboard import Blackboard
from swarmbus._bus import Bus
from swarmbus._config import Settings
from swarmbus._consensus import Consensus, ConsensusService, ProposalRecord
from swarmbus._errors import (
    AlreadyVotedError,
    ConflictError,
    DecisionTimeoutError,
    InvalidMessageError,
    InvalidTransitionError,
    NotEligibleError,
    NotFoundError,
    ProposalClosedError,
    SwarmbusError,
    TaskClaimLostError,
)
from swarmbus._messages import Evidence, Finding, Proposal, Vote, new_id
from swarmbus._tasks import Claim, TaskQueue
from swarmbus._telemetry import configure_tracing

log = logging.getLogger("swarmbus.mcp")

SERVER_NAME: Final = "agent-swarm"
SUPPORTED_BACKENDS: Final = ("nats",)
#: Longest a tool call may block waiting (claim_task, get_proposal): MCP clients
#: time calls out, and an LLM should rather poll than hang.
MAX_WAIT: Final = 30.0

P = ParamSpec("P")
R = TypeVar("R")


# --- configuration --------------------------------------------------------------------


class ConfigError(Exception):
    """The environment does not configure a usable server (reported at startup)."""


@dataclass(frozen=True)
class ServerConfig:
    """What ``mcp-agent-swarm`` reads from its environment."""

    agent_id: str
    settings: Settings

    @classmethod
    def from_env(cls) -> ServerConfig:
        """Read ``SWARM_BACKEND``, ``AGENT_ID``, ``NATS_URL`` (and ``SWARMBUS_*``).

        Raises:
            ConfigError: with a message that says what to set.
        """
        backend = os.environ.get("SWARM_BACKEND") or "nats"
        if backend.strip().lower() not in SUPPORTED_BACKENDS:
            raise ConfigError(
                f"SWARM_BACKEND={backend!r} is not supported: mcp-agent-swarm supports only "
                "SWARM_BACKEND=nats (set NATS_URL to your server)"
            )
        agent_id = os.environ.get("AGENT_ID", "")
        if not agent_id:
            raise ConfigError(
                "AGENT_ID is not set: set it to the id this agent acts as, e.g. AGENT_ID=ops/claude"
            )
        try:
            subjects.validate_agent_id(agent_id)
        except SwarmbusError as exc:
            raise ConfigError(f"AGENT_ID: {exc}") from None
        if not os.environ.get("NATS_URL", "").strip():
            raise ConfigError("NATS_URL is not set: e.g. NATS_URL=nats://127.0.0.1:4222")
        try:
            settings = Settings.from_env(name=f"mcp-agent-swarm {agent_id}")
        except pydantic.ValidationError as exc:
            raise ConfigError(f"bad SWARMBUS_* setting: {exc}") from None
        return cls(agent_id=agent_id, settings=settings)


# --- tool results ------------------------------------------------------------------------


class SessionView(BaseModel):
    """A session as the calling agent sees it."""

    session_id: str
    status: str = Field(description="active or completed")
    initiator: str
    you: str = Field(description="the agent id this server acts as")
    members: list[str] = Field(description="agents that joined (they vote on proposals)")
    context: dict[str, Any]
    findings: int
    hypotheses: int
    actions_taken: int


class Posted(BaseModel):
    """A record this agent just wrote (finding, hypothesis, ...)."""

    session_id: str
    id: str
    record: dict[str, Any]


class TaskPosted(Posted):
    """A task this agent created."""

    approval_proposal_id: str | None = Field(
        description="The vote that approves it (requires_approval), else null"
    )


class Records(BaseModel):
    """A list of board records or tasks."""

    session_id: str
    count: int
    items: list[dict[str, Any]]


class Board(BaseModel):
    """The whole blackboard of a session (the seed's shape)."""

    session_id: str
    status: str
    revision: int
    context: dict[str, Any]
    findings: list[dict[str, Any]]
    hypotheses: list[dict[str, Any]]
    actions_taken: list[dict[str, Any]]


class Claimed(BaseModel):
    """The outcome of a claim attempt."""

    claimed: bool
    task: dict[str, Any] | None = None
    message: str


class ProposalView(BaseModel):
    """A proposal with its votes so far and, once closed, the decision."""

    proposal_id: str
    session_id: str
    proposer: str
    status: Literal["open", "decided"]
    action: str
    target: str
    parameters: dict[str, Any]
    quorum: str
    threshold: float | None
    deadline: str
    electorate: list[str]
    votes: list[dict[str, Any]]
    your_vote: str | None = Field(description="yes/no/abstain if you voted, else null")
    decision: dict[str, Any] | None


class SessionList(BaseModel):
    """Every session on the board."""

    sessions: list[dict[str, Any]]


# --- tool arguments ----------------------------------------------------------------------

SessionId = Annotated[
    str,
    Field(
        description="Session (incident) id, e.g. INC-1234: one token of letters, digits, '_', '-'.",
        pattern=subjects.SESSION_ID_PATTERN,
        max_length=subjects.MAX_ID_LENGTH,
    ),
]
Confidence = Annotated[float, Field(ge=0.0, le=1.0, description="How sure you are, 0.0 to 1.0.")]
TaskType = Annotated[
    str,
    Field(
        description="Task type, e.g. investigate, analyze, remediate, report.",
        pattern=subjects.SESSION_ID_PATTERN,
        max_length=subjects.MAX_ID_LENGTH,
    ),
]
ItemId = Annotated[str, Field(min_length=1, max_length=subjects.MAX_ID_LENGTH)]
WaitSeconds = Annotated[
    float, Field(ge=0.0, le=MAX_WAIT, description=f"Seconds to wait (0 to {MAX_WAIT:g}).")
]
JsonObject = dict[str, Any]


class EvidenceItem(BaseModel):
    """One piece of evidence behind a finding."""

    model_config = pydantic.ConfigDict(extra="forbid")

    source: str = Field(description="Where it comes from, e.g. prometheus, kubectl, logs.")
    query: str = Field("", description="What was asked, e.g. rate(errors[5m]).")
    result: str = Field("", description="What came back, e.g. 0.05.")


# --- error translation ---------------------------------------------------------------------

_HINTS: Final[dict[str, str]] = {
    "session": "Call swarm.list_sessions to see the sessions, or swarm.start_session to start one.",
    "task": "Call swarm.list_tasks to see the session's tasks and their ids.",
    "proposal": "Use the proposal_id returned by swarm.propose_action.",
    "hypothesis": "Call swarm.get_blackboard to see the hypotheses and their ids.",
}


def _explain(exc: SwarmbusError) -> str:
    """A message that says what went wrong and what to do about it."""
    match exc:
        case NotFoundError(kind=kind):
            return f"{exc}. {_HINTS.get(kind, '')}".strip()
        case AlreadyVotedError() | ProposalClosedError():
            return f"{exc}. Call swarm.get_proposal to see the votes and the decision."
        case NotEligibleError():
            return (
                f"{exc}: only its electorate votes (the voters it names, else the agents that "
                "had joined the session when it was proposed)."
            )
        case TaskClaimLostError():
            return f"{exc}. Your result was not recorded; claim another task."
        case InvalidMessageError():
            return f"invalid input: {exc.reason}"
        case _:
            return str(exc)


#: Swarm method -> read only; each is served as the tool ``swarm.<method>``.
_TOOL_METHODS: dict[str, bool] = {}


def _tool(
    *, read_only: bool = False
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Serve a Swarm method as ``swarm.<name>`` (its docstring is the description).

    Swarmbus errors it raises become tool errors (``isError`` results the LLM reads).
    """

    def register(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        _TOOL_METHODS[fn.__name__] = read_only

        @functools.wraps(fn)
        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except SwarmbusError as exc:
                raise ToolError(_explain(exc)) from exc

        return call

    return register


def _plain(value: Any) -> Any:
    """A record as JSON-ready builtins (timestamps as RFC 3339 strings)."""
    return msgspec.to_builtins(value)


# --- the agent's state ---------------------------------------------------------------------


@dataclass
class _Held:
    """A task claim this agent holds, heartbeated under ``lock`` until ``scope`` ends."""

    claim: Claim
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class Swarm:
    """What the server does, as ``agent_id``: one method per tool.

    Holds the open boards and task queues per session and the task claims this agent
    holds; each claim is heartbeated in ``task_group`` until it is completed, failed
    or lost.
    """

    def __init__(
        self, bus: Bus, agent_id: str, consensus: Consensus, task_group: anyio.abc.TaskGroup
    ) -> None:
        self.bus = bus
        self.agent_id = agent_id
        self.consensus = consensus
        self._tg = task_group
        self._boards: dict[str, Blackboard] = {}
        self._queues: dict[str, TaskQueue] = {}
        self._claims: dict[str, _Held] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, bus: Bus, agent_id: str) -> AsyncIterator[Swarm]:
        """The swarm state for one server run; closes queues and stops heartbeats on exit.

        An error of the block is raised as it is, not in an exception group, so
        ``main`` reports it in one line (e.g. uvicorn's exit when its port is in use).
        """
        consensus = await Consensus.open(bus)
        try:
            async with anyio.create_task_group() as tg:
                swarm = cls(bus, agent_id, consensus, tg)
                try:
                    yield swarm
                finally:
                    tg.cancel_scope.cancel()
                    for queue in swarm._queues.values():
                        with anyio.CancelScope(shield=True):
                            await queue.close()
        except BaseExceptionGroup as group:
            error: BaseException = group
            while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
                error = error.exceptions[0]
            raise error from None

    # --- sessions ---

    async def _board(self, session_id: str) -> Blackboard:
        board = self._boards.get(session_id)
        if board is None:
            board = self._boards[session_id] = await Blackboard.open(self.bus, session_id)
        return board

    async def _active(self, session_id: str) -> Blackboard:
        """The board of a started, still active session (else a tool error)."""
        board = await self._board(session_id)
        try:
            record = await board.info()
        except NotFoundError:
            raise ToolError(
                f"unknown session {session_id!r}: nobody started it. {_HINTS['session']}"
            ) from None
        if record.status != "active":
            raise ToolError(
                f"session {session_id!r} is {record.status}: it takes no more work. "
                "Read it with swarm.get_blackboard."
            )
        return board

    async def _view(self, board: Blackboard) -> SessionView:
        record = await board.info()
        snapshot = await board.snapshot()
        return SessionView(
            session_id=board.session,
            status=record.status,
            initiator=record.initiator,
            you=self.agent_id,
            members=await self.consensus.members(board.session),
            context=snapshot.context.data if snapshot.context else {},
            findings=len(snapshot.findings),
            hypotheses=len(snapshot.hypotheses),
            actions_taken=len(snapshot.actions_taken),
        )

    @_tool()
    async def start_session(
        self,
        session_id: SessionId,
        context: Annotated[
            JsonObject | None,
            Field(description='What the session is about, e.g. {"task": "investigate INC-1234"}.'),
        ] = None,
    ) -> SessionView:
        """Start a new coordination session with its shared context, and join it.

        Fails if the session exists: then call swarm.join_session.
        """
        board = await self._board(session_id)
        try:
            await board.start(self.agent_id, context or {})
        except ConflictError:
            raise ToolError(
                f"session {session_id!r} already exists: call swarm.join_session to join it."
            ) from None
        await self.consensus.join(session_id, self.agent_id)
        return await self._view(board)

    @_tool()
    async def join_session(self, session_id: SessionId) -> SessionView:
        """Join an active coordination session.

        Members vote on proposals made after they joined. Returns the session's context, members
        and what is on its blackboard.
        """
        board = await self._active(session_id)
        await self.consensus.join(session_id, self.agent_id)
        return await self._view(board)

    @_tool(read_only=True)
    async def list_sessions(self) -> SessionList:
        """List every coordination session (incident) with its status and initiator."""
        records = await Blackboard.sessions(self.bus)
        return SessionList(sessions=[_plain(r) for r in records])

    # --- blackboard ---

    @_tool()
    async def post_finding(
        self,
        session_id: SessionId,
        category: Annotated[
            Literal["observation", "hypothesis", "conclusion"],
            Field(description="observation (seen), hypothesis (suspected) or conclusion."),
        ],
        content: Annotated[
            str, Field(min_length=1, description="The finding, in one or two sentences.")
        ],
        confidence: Confidence,
        evidence: Annotated[
            list[EvidenceItem] | None, Field(description="What the finding rests on.")
        ] = None,
    ) -> Posted:
        """Share a finding with every agent in the session.

        An observation, hypothesis or conclusion, with your confidence (0.0-1.0) and the
        evidence behind it.
        """
        board = await self._active(session_id)
        finding = Finding(
            category=category,
            content=content,
            confidence=confidence,
            evidence=[Evidence(**e.model_dump()) for e in evidence or ()],
        )
        record = await board.append_finding(finding, agent=self.agent_id)
        return Posted(session_id=session_id, id=record.id, record=_plain(record))

    @_tool(read_only=True)
    async def get_findings(
        self,
        session_id: SessionId,
        category: Literal["observation", "hypothesis", "conclusion"] | None = None,
        posted_by: Annotated[
            str | None, Field(description="Only findings posted by this agent id.")
        ] = None,
    ) -> Records:
        """Read the findings posted in a session, oldest first.

        Optionally only one category, or only the findings one agent posted.
        """
        board = await self._board(session_id)
        await self._known(board)
        found = await board.findings(agent=posted_by, category=category)
        return Records(session_id=session_id, count=len(found), items=[_plain(f) for f in found])

    async def _known(self, board: Blackboard) -> None:
        try:
            await board.info()
        except NotFoundError:
            raise ToolError(
                f"unknown session {board.session!r}: nobody started it. {_HINTS['session']}"
            ) from None

    @_tool(read_only=True)
    async def get_blackboard(self, session_id: SessionId) -> Board:
        """Read the session's whole blackboard.

        Its context, findings, hypotheses and actions taken (proposals and their status),
        with who posted what. Read it before posting to avoid duplicate work.
        """
        board = await self._board(session_id)
        await self._known(board)
        snapshot = await board.snapshot()
        data = snapshot.to_dict()
        return Board(
            session_id=session_id,
            status=snapshot.session.status if snapshot.session else "unknown",
            revision=snapshot.revision,
            context=data["context"],
            findings=data["findings"],
            hypotheses=data["hypotheses"],
            actions_taken=data["actions_taken"],
        )

    @_tool()
    async def report_hypothesis(
        self,
        session_id: SessionId,
        description: Annotated[str, Field(min_length=1, description="What you suspect.")],
        confidence: Confidence,
    ) -> Posted:
        """Put a hypothesis on the session's blackboard with your confidence.

        E.g. 'database connection pool exhaustion', 0.7. Others can assess it with
        swarm.assess_hypothesis.
        """
        board = await self._active(session_id)
        record = await board.propose_hypothesis(description, confidence, agent=self.agent_id)
        return Posted(session_id=session_id, id=record.id, record=_plain(record))

    @_tool()
    async def assess_hypothesis(
        self,
        session_id: SessionId,
        hypothesis_id: ItemId,
        confidence: Annotated[
            float | None, Field(ge=0.0, le=1.0, description="Your confidence in it now.")
        ] = None,
        verdict: Annotated[
            Literal["validated", "refuted"] | None,
            Field(description="Settle it: validated (true) or refuted (false). Final."),
        ] = None,
        reason: Annotated[str, Field(description="Why, in a sentence.")] = "",
    ) -> Posted:
        """Assess a hypothesis: record your confidence in it, and/or settle it.

        A verdict (validated or refuted) is final. The hypothesis's confidence pools every
        agent's latest assessment.
        """
        if confidence is None and verdict is None:
            raise ToolError("give a confidence, a verdict, or both")
        board = await self._active(session_id)
        record = None
        if confidence is not None:
            record = await board.update_confidence(
                hypothesis_id, confidence, agent=self.agent_id, reason=reason
            )
        if verdict is not None:
            record = await board.validate_hypothesis(
                hypothesis_id,
                verdict == "validated",
                agent=self.agent_id,
                evidence={"reason": reason} if reason else None,
            )
        assert record is not None
        return Posted(session_id=session_id, id=record.id, record=_plain(record))

    # --- tasks ---

    async def _queue(self, session_id: str) -> TaskQueue:
        queue = self._queues.get(session_id)
        if queue is None:
            queue = TaskQueue(self.bus, session_id)
            await queue.open()
            if self._queues.setdefault(session_id, queue) is not queue:  # a concurrent call won
                await queue.close()
        return self._queues[session_id]

    @_tool()
    async def create_task(
        self,
        session_id: SessionId,
        type: TaskType,
        target: Annotated[str, Field(description="What to work on, e.g. a service or host.")] = "",
        context: Annotated[
            JsonObject | None, Field(description="Anything the worker needs.")
        ] = None,
        priority: Annotated[int, Field(ge=1, le=10, description="1 (low) to 10 (urgent).")] = 5,
        timeout_seconds: Annotated[
            float, Field(gt=0, le=86400, description="A claim expires this long without progress.")
        ] = 300.0,
        requires_approval: Annotated[
            bool,
            Field(description="Put it to the session's vote first; claimable once approved."),
        ] = False,
    ) -> TaskPosted:
        """Create a task for some agent of the session to claim.

        E.g. type 'investigate', target 'api-gateway'. Higher priority tasks are claimed
        first. With requires_approval, it waits for the session's vote on the returned
        approval proposal (swarm.vote, swarm.get_proposal).
        """
        await self._active(session_id)
        if requires_approval and not await self.consensus.members(session_id):
            # Checked before the task exists: it would wait forever for a vote nobody casts.
            raise ToolError(
                f"nobody in {session_id} can vote to approve a task: call swarm.join_session "
                "first (members vote), or create it without requires_approval."
            )
        queue = await self._queue(session_id)
        task = await queue.create(
            type,
            agent=self.agent_id,
            priority=priority,
            target=target,
            context=context or {},
            timeout=timeout_seconds,
            requires_approval=requires_approval,
        )
        proposal_id = None
        if requires_approval:
            record = await self.consensus.propose_task_approval(
                task.id, agent=self.agent_id, session=session_id
            )
            proposal_id = record.proposal_id
        return TaskPosted(
            session_id=session_id,
            id=task.id,
            record=_plain(task),
            approval_proposal_id=proposal_id,
        )

    @_tool(read_only=True)
    async def list_tasks(
        self,
        session_id: SessionId,
        status: Literal["pending", "assigned", "running", "completed", "failed"] | None = None,
    ) -> Records:
        """List the session's tasks with status, assignee and result, optionally one status."""
        await self._known(await self._board(session_id))
        tasks = await (await self._queue(session_id)).tasks(status)
        return Records(session_id=session_id, count=len(tasks), items=[_plain(t) for t in tasks])

    @_tool()
    async def claim_task(
        self,
        session_id: SessionId,
        types: Annotated[list[TaskType], Field(min_length=1, description="Task types you can do.")],
        wait_seconds: WaitSeconds = 0.0,
    ) -> Claimed:
        """Claim the next waiting task of the given types (highest priority first).

        You then hold it until you call swarm.complete_task or swarm.fail_task; returns
        claimed=false if none is waiting.
        """
        await self._active(session_id)
        queue = await self._queue(session_id)
        claim = await queue.claim(agent=self.agent_id, types=types, timeout=wait_seconds or None)
        if claim is None:
            return Claimed(
                claimed=False,
                message=f"no {'/'.join(types)} task is waiting in {session_id}; try again later.",
            )
        self._hold(claim, queue)
        return Claimed(
            claimed=True,
            task=_plain(claim.task),
            message=(
                f"You hold task {claim.task.id} (kept alive while this server runs). Do it, then "
                "call swarm.complete_task with the result, or swarm.fail_task."
            ),
        )

    def _hold(self, claim: Claim, queue: TaskQueue) -> None:
        held = self._claims[claim.task.id] = _Held(claim)
        # Often enough for the task's lease and for the dispatch message's ack wait.
        interval = min(claim.task.constraints.timeout, queue.ack_wait) / 3

        async def heartbeat() -> None:
            with held.scope:
                while True:
                    await anyio.sleep(interval)
                    async with held.lock:
                        try:
                            await claim.heartbeat()
                        except (TaskClaimLostError, InvalidTransitionError) as exc:
                            log.warning("%s", exc)
                            self._forget(held)
                            return
                        except SwarmbusError as exc:  # e.g. reconnecting: try again
                            log.warning("heartbeat of task %s failed: %s", claim.task.id, exc)

        self._tg.start_soon(heartbeat)

    @contextlib.asynccontextmanager
    async def _finishing(self, session_id: str, task_id: str) -> AsyncIterator[Claim]:
        """The held claim on ``task_id``, its heartbeat paused; released unless it stays ours."""
        held = self._claims.get(task_id)
        if held is None or held.claim.task.session != session_id:
            raise ToolError(
                f"you do not hold task {task_id!r} of {session_id}: call swarm.claim_task first "
                "(or swarm.list_tasks to see who holds it)."
            )
        async with held.lock:
            try:
                yield held.claim
            except TaskClaimLostError:
                self._release(held)
                raise
            self._release(held)

    def _release(self, held: _Held) -> None:
        held.scope.cancel()
        self._forget(held)

    def _forget(self, held: _Held) -> None:
        # Only this claim: the task may have been claimed again since, by a newer one.
        if self._claims.get(held.claim.task.id) is held:
            del self._claims[held.claim.task.id]

    @_tool()
    async def complete_task(
        self,
        session_id: SessionId,
        task_id: ItemId,
        result: Annotated[JsonObject, Field(description="What you found or did.")],
    ) -> Posted:
        """Mark a task you claimed as completed, with its result.

        Only the current holder can complete a task, and only once.
        """
        async with self._finishing(session_id, task_id) as claim:
            task = await claim.complete(result)
        return Posted(session_id=session_id, id=task.id, record=_plain(task))

    @_tool()
    async def fail_task(
        self,
        session_id: SessionId,
        task_id: ItemId,
        error: Annotated[str, Field(min_length=1, description="Why it failed.")],
        retry: Annotated[
            bool, Field(description="Offer it to another agent again (up to its max attempts).")
        ] = False,
    ) -> Posted:
        """Give up a task you claimed, saying why.

        With retry=true it is offered to another agent again (up to its max attempts).
        """
        async with self._finishing(session_id, task_id) as claim:
            task = await claim.fail(error, retry=retry)
        return Posted(session_id=session_id, id=task.id, record=_plain(task))

    # --- consensus ---

    def _proposal_view(self, record: ProposalRecord) -> ProposalView:
        proposal = record.proposal
        mine = record.ballot_of(self.agent_id)
        return ProposalView(
            proposal_id=proposal.proposal_id,
            session_id=record.session,
            proposer=record.proposer,
            status="open" if record.decision is None else "decided",
            action=proposal.action,
            target=proposal.target,
            parameters=dict(proposal.parameters),
            quorum=proposal.quorum,
            threshold=proposal.threshold,
            deadline=record.deadline.isoformat(),
            electorate=list(record.electorate),
            votes=[_plain(b) for b in record.votes],
            your_vote=mine.vote if mine else None,
            decision=_plain(record.decision) if record.decision else None,
        )

    @_tool()
    async def propose_action(
        self,
        session_id: SessionId,
        action: Annotated[str, Field(min_length=1, description="What to do, e.g. rollback.")],
        target: Annotated[str, Field(description="What it acts on, e.g. api@v1.2.3.")] = "",
        parameters: Annotated[
            JsonObject | None, Field(description="Details of the action.")
        ] = None,
        quorum: Annotated[
            Literal["majority", "unanimous", "threshold"],
            Field(description="majority: yes > no; unanimous: nobody says no; threshold: see it."),
        ] = "majority",
        threshold: Annotated[
            float | None,
            Field(ge=0.0, le=1.0, description="For quorum=threshold: share of yes among yes+no."),
        ] = None,
        timeout_seconds: Annotated[
            float, Field(gt=0, le=86400, description="Voting closes after this long.")
        ] = 300.0,
        voters: Annotated[
            list[str] | None,
            Field(description="Agent ids that vote; default: every agent that joined the session."),
        ] = None,
    ) -> ProposalView:
        """Propose an action for the session's agents to vote on.

        E.g. action 'rollback', target 'api@v1.2.3'. Returns the proposal_id; call swarm.vote
        to vote on it yourself and swarm.get_proposal to follow it until it is decided. Act
        only once it is approved.
        """
        await self._active(session_id)
        proposal = Proposal(
            proposal_id=new_id(),
            action=action,
            target=target,
            parameters=parameters or {},
            quorum=quorum,
            threshold=threshold,
            timeout=timeout_seconds,
            voters=list(voters or ()),
        )
        record = await self.consensus.propose(proposal, agent=self.agent_id, session=session_id)
        return self._proposal_view(record)

    @_tool()
    async def vote(
        self,
        proposal_id: ItemId,
        vote: Literal["yes", "no", "abstain"],
        reason: Annotated[str, Field(description="Why, in a sentence.")] = "",
        confidence: Annotated[
            float | None, Field(ge=0.0, le=1.0, description="How sure you are.")
        ] = None,
    ) -> ProposalView:
        """Vote yes, no or abstain on a proposal, with your reason.

        Votes are final; the proposal is decided as soon as the outcome cannot change.
        """
        body = Vote(proposal_id=proposal_id, vote=vote, confidence=confidence, reason=reason)
        record = await self.consensus.vote(body, agent=self.agent_id)
        return self._proposal_view(record)

    @_tool(read_only=True)
    async def get_proposal(
        self,
        proposal_id: ItemId,
        wait_seconds: Annotated[
            float,
            Field(ge=0.0, le=MAX_WAIT, description="Wait up to this long for the decision."),
        ] = 0.0,
    ) -> ProposalView:
        """Read a proposal: its votes so far and, once decided, the decision.

        The outcome is approved, rejected or no_quorum. With wait_seconds, waits up to 30 s
        for the decision.
        """
        if wait_seconds:
            with contextlib.suppress(DecisionTimeoutError):
                await self.consensus.wait_for_decision(proposal_id, wait_seconds)
        return self._proposal_view(await self.consensus.get(proposal_id))


# --- the server ------------------------------------------------------------------------------

_READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
#: Every tool the server serves.
TOOL_NAMES: Final = tuple(f"swarm.{method}" for method in _TOOL_METHODS)

#: tool name -> (Swarm method, annotations, description)


def _instructions(agent_id: str) -> str:
    return (
        f"You are agent {agent_id} in a swarm of agents coordinating on incidents through "
        "swarmbus. Start with swarm.list_sessions, then swarm.join_session (or "
        "swarm.start_session). Read swarm.get_blackboard before you act, share what you "
        "learn with swarm.post_finding, take work with swarm.claim_task and finish it with "
        "swarm.complete_task. Put risky actions to a vote with swarm.propose_action and "
        "only act once swarm.get_proposal says approved."
    )


def build_server(swarm: Swarm) -> MCPServer[Any]:
    """An MCPServer whose ``swarm.*`` tools act as ``swarm.agent_id``."""
    server: MCPServer[Any] = MCPServer(
        SERVER_NAME,
        instructions=_instructions(swarm.agent_id),
        version=__version__,
        log_level="WARNING",
    )
    for method, read_only in _TOOL_METHODS.items():
        fn = getattr(swarm, method)
        server.add_tool(
            fn,
            name=f"swarm.{method}",
            description=inspect.getdoc(fn),
            annotations=_READ if read_only else _WRITE,
            structured_output=True,
        )
    return server


async def serve(
    config: ServerConfig,
    *,
    transport: Literal["stdio", "streamable-http"] = "stdio",
    host: str = "127.0.0.1",
    port: int = 8000,
    decide: bool = False,
) -> None:
    """Connect to NATS as ``config.agent_id`` and serve MCP until the client leaves.

    With ``decide``, also run a ConsensusService replica, so a swarm of LLM agents
    needs nothing else to get its proposals decided (replicas decide each proposal once).
    """
    async with contextlib.AsyncExitStack() as stack:
        bus = await stack.enter_async_context(Bus.open(config.settings))
        if decide:
            await stack.enter_async_context(ConsensusService(bus))
        swarm = await stack.enter_async_context(Swarm.running(bus, config.agent_id))
        server = build_server(swarm)
        if transport == "stdio":
            await server.run_stdio_async()
        else:
            await server.run_streamable_http_async(host=host, port=port)


def build_parser() -> argparse.ArgumentParser:
    """The ``mcp-agent-swarm`` argument parser (the rest is configured by env)."""
    parser = argparse.ArgumentParser(
        prog="mcp-agent-swarm",
        description=(
            "MCP server that lets an LLM agent join a swarmbus swarm. Configure with "
            "SWARM_BACKEND=nats, NATS_URL and AGENT_ID."
        ),
    )
    parser.add_argument(
        "--transport", choices=("stdio", "streamable-http"), default="stdio", help="default: stdio"
    )
    parser.add_argument("--host", default="127.0.0.1", help="streamable-http bind address")
    parser.add_argument("--port", type=int, default=8000, help="streamable-http port")
    parser.add_argument(
        "--decide",
        action="store_true",
        help="also run a consensus service replica that decides proposals",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mcp-agent-swarm`` console script."""
    args = build_parser().parse_args(argv)
    # stdout is the MCP channel on stdio: every log line goes to stderr.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = ServerConfig.from_env()
    except ConfigError as exc:
        print(f"mcp-agent-swarm: error: {exc}", file=sys.stderr)
        return 2
    try:
        configure_tracing()  # off unless the OTEL_* variables ask for it
        anyio.run(
            functools.partial(
                serve,
                config,
                transport=args.transport,
                host=args.host,
                port=args.port,
                decide=args.decide,
            )
        )
    except SwarmbusError as exc:
        print(f"mcp-agent-swarm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
