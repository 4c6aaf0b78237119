"""``Swarm``: what the server does as its agent, one method per tool."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import anyio.abc

from swarmbus._bus import Bus
from swarmbus._consensus import Consensus
from swarmbus._locks import Lock
from swarmbus._mcp.board_tools import BoardTools
from swarmbus._mcp.coordination_tools import CoordinationTools, new_epoch
from swarmbus._mcp.task_tools import Held, TaskTools

__all__ = ["Swarm"]


class Swarm(BoardTools, TaskTools, CoordinationTools):
    """What the server does, as ``agent_id``: one method per tool.

    Holds the open boards and task queues per session, the task claims this agent
    holds (each heartbeated in ``task_group`` until it is completed, failed or lost),
    its locks, and the feed of its sessions' events. Its ``Consensus`` settles the
    proposals it touches, so no separate consensus service is needed.
    """

    def __init__(
        self,
        bus: Bus,
        agent_id: str,
        consensus: Consensus,
        task_group: anyio.abc.TaskGroup,
        *,
        dotted: bool = False,
    ) -> None:
        super().__init__(bus, agent_id, consensus, task_group, dotted=dotted)
        self._claims: dict[str, Held] = {}
        self._locks: dict[str, Lock] = {}
        self._epoch = new_epoch()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, bus: Bus, agent_id: str, *, dotted: bool = False
    ) -> AsyncIterator[Swarm]:
        """The swarm state for one server run; closes queues and stops heartbeats on exit.

        An error of the block is raised as it is, not in an exception group, so
        ``main`` reports it in one line (e.g. uvicorn's exit when its port is in use).
        """
        consensus = await Consensus.open(bus, agent=agent_id)
        try:
            async with consensus.settling(), anyio.create_task_group() as tg:
                swarm = cls(bus, agent_id, consensus, tg, dotted=dotted)
                try:
                    yield swarm
                finally:
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        # Shielded: a cancelled server still gives back what it holds.
                        await swarm._close()
        except BaseExceptionGroup as group:
            error: BaseException = group
            while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
                error = error.exceptions[0]
            raise error from None

    async def _close(self) -> None:
        await self.feed.close()
        for queue in self._queues.values():
            await queue.close()
        for lock in self._locks.values():
            if lock.lease is not None:
                with contextlib.suppress(Exception):  # it expires by its TTL anyway
                    await lock.release()
