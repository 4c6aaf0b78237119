"""The agent's state that every group of tools shares."""

from __future__ import annotations

import anyio.abc
from mcp.server.mcpserver.exceptions import ToolError

from swarmbus import _subjects as subjects
from swarmbus._blackboard import Blackboard
from swarmbus._bus import Bus
from swarmbus._consensus import Consensus
from swarmbus._errors import NotFoundError, SwarmbusError
from swarmbus._mcp.feed import EventFeed
from swarmbus._mcp.models import SessionView
from swarmbus._mcp.tooling import hint
from swarmbus._tasks import TaskQueue

__all__ = ["SwarmBase"]


class SwarmBase:
    """What the server holds as ``agent_id``: boards and task queues per session, the
    event feed, and (in subclasses) claims and locks."""

    def __init__(
        self,
        bus: Bus,
        agent_id: str,
        consensus: Consensus,
        task_group: anyio.abc.TaskGroup,
        *,
        dotted: bool = False,
    ) -> None:
        self.bus = bus
        self.agent_id = agent_id
        self.consensus = consensus
        self.dotted = dotted
        self.feed = EventFeed(bus, agent_id, task_group=task_group)
        self._tg = task_group
        self._boards: dict[str, Blackboard] = {}
        self._queues: dict[str, TaskQueue] = {}

    async def _board(self, session_id: str) -> Blackboard:
        board = self._boards.get(session_id)
        if board is None:
            board = self._boards[session_id] = await Blackboard.open(self.bus, session_id)
        return board

    async def _known(self, board: Blackboard) -> None:
        try:
            await board.info()
        except NotFoundError:
            raise ToolError(
                f"unknown session {board.session!r}: nobody started it. {hint('session')}"
            ) from None

    async def _active(self, session_id: str) -> Blackboard:
        """The board of a started, still active session (else a tool error)."""
        board = await self._board(session_id)
        try:
            record = await board.info()
        except NotFoundError:
            raise ToolError(
                f"unknown session {session_id!r}: nobody started it. {hint('session')}"
            ) from None
        if record.status != "active":
            raise ToolError(
                f"session {session_id!r} is {record.status}: it takes no more work. "
                "Read it with swarm_get_blackboard."
            )
        return board

    async def _queue(self, session_id: str) -> TaskQueue:
        queue = self._queues.get(session_id)
        if queue is None:
            queue = TaskQueue(self.bus, session_id)
            await queue.open()
            if self._queues.setdefault(session_id, queue) is not queue:  # a concurrent call won
                await queue.close()
        return self._queues[session_id]

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

    @staticmethod
    def _agent_id(value: str, field: str) -> str:
        try:
            return subjects.validate_agent_id(value)
        except SwarmbusError:
            raise ToolError(
                f"{field}: {value!r} is not an agent id (e.g. ops/claude: tokens of letters, "
                "digits, '_', '-' joined by '/'). Agent ids appear as 'agent' in records."
            ) from None
