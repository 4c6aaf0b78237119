"""Tools for the task queue: create, list, claim (held and heartbeated), complete, fail."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import anyio
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from swarmbus._errors import (
    InvalidTransitionError,
    NotFoundError,
    SwarmbusError,
    TaskClaimLostError,
)
from swarmbus._mcp.base import SwarmBase
from swarmbus._mcp.models import (
    PAGE,
    Claimed,
    Cursor,
    JsonObject,
    Limit,
    Posted,
    Records,
    SessionId,
    TaskId,
    TaskPosted,
    TaskType,
    WaitSeconds,
)
from swarmbus._mcp.tooling import hint, page, plain, tool
from swarmbus._tasks import Claim, TaskQueue

__all__ = ["Held", "TaskTools"]

log = logging.getLogger("swarmbus.mcp")


class Held:
    """A task claim this agent holds, heartbeated under ``lock`` until ``scope`` ends."""

    def __init__(self, claim: Claim, interval: float, tools: TaskTools) -> None:
        self.claim = claim
        self.interval = interval
        self.scope = anyio.CancelScope()
        self.lock = anyio.Lock()
        self._tools = tools

    async def heartbeat(self) -> None:
        """Keep the claim alive until released or lost."""
        claim = self.claim
        with self.scope:
            while True:
                await anyio.sleep(self.interval)
                async with self.lock:
                    try:
                        await claim.heartbeat()
                    except (TaskClaimLostError, InvalidTransitionError) as exc:
                        log.warning("%s", exc)
                        self._tools._forget(self)
                        return
                    except SwarmbusError as exc:  # e.g. reconnecting: try again
                        log.warning("heartbeat of task %s failed: %s", claim.task.id, exc)


class TaskTools(SwarmBase):
    """The task queue of each session, and the claims this agent holds."""

    _claims: dict[str, Held]

    @tool()
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
        approval proposal (swarm_vote, swarm_get_proposal).
        """
        await self._active(session_id)
        if requires_approval and not await self.consensus.members(session_id):
            # Checked before the task exists: it would wait forever for a vote nobody casts.
            raise ToolError(
                f"nobody in {session_id} can vote to approve a task: call swarm_join_session "
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
            record=plain(task),
            approval_proposal_id=proposal_id,
        )

    @tool(read_only=True)
    async def list_tasks(
        self,
        session_id: SessionId,
        status: Annotated[
            Literal["pending", "assigned", "running", "completed", "failed"] | None,
            Field(description="Only tasks in this status."),
        ] = None,
        cursor: Cursor = None,
        limit: Limit = PAGE,
    ) -> Records:
        """List the session's tasks with status, assignee and result, a page at a time.

        Optionally only one status.
        """
        await self._known(await self._board(session_id))
        tasks = await (await self._queue(session_id)).tasks(status)
        items, next_cursor = page(tasks, cursor, limit)
        return Records(
            session_id=session_id,
            count=len(items),
            items=[plain(t) for t in items],
            next_cursor=next_cursor,
        )

    @tool()
    async def claim_task(
        self,
        session_id: SessionId,
        types: Annotated[list[TaskType], Field(min_length=1, description="Task types you can do.")],
        wait_seconds: WaitSeconds = 0.0,
    ) -> Claimed:
        """Claim the next waiting task of the given types (highest priority first).

        You then hold it until you call swarm_complete_task or swarm_fail_task; returns
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
            task=plain(claim.task),
            message=(
                f"You hold task {claim.task.id} (kept alive while this server runs). Do it, then "
                "call swarm_complete_task with the result, or swarm_fail_task."
            ),
        )

    def _hold(self, claim: Claim, queue: TaskQueue) -> None:
        # Often enough for the task's lease and for the dispatch message's ack wait.
        interval = min(claim.task.constraints.timeout, queue.ack_wait) / 3
        held = self._claims[claim.task.id] = Held(claim, interval, self)
        self._tg.start_soon(held.heartbeat)

    @contextlib.asynccontextmanager
    async def _finishing(self, session_id: str, task_id: str) -> AsyncIterator[Claim]:
        """The held claim on ``task_id``, its heartbeat paused; released unless it stays ours."""
        held = self._claims.get(task_id)
        if held is None or held.claim.task.session != session_id:
            await self._not_held(session_id, task_id)
        assert held is not None
        async with held.lock:
            try:
                yield held.claim
            except TaskClaimLostError:
                self._release(held)
                raise
            self._release(held)

    async def _not_held(self, session_id: str, task_id: str) -> None:
        queue = await self._queue(session_id)
        try:
            task = await queue.get(task_id)
        except NotFoundError:
            raise ToolError(
                f"unknown task {task_id!r} in session {session_id}. {hint('task')}"
            ) from None
        holder = f", held by {task.assigned_to}" if task.assigned_to else ""
        raise ToolError(
            f"you do not hold task {task_id!r} of {session_id} (it is {task.status}{holder}): "
            "call swarm_claim_task first to claim a waiting task."
        )

    def _release(self, held: Held) -> None:
        held.scope.cancel()
        self._forget(held)

    def _forget(self, held: Held) -> None:
        # Only this claim: the task may have been claimed again since, by a newer one.
        if self._claims.get(held.claim.task.id) is held:
            del self._claims[held.claim.task.id]

    @tool()
    async def complete_task(
        self,
        session_id: SessionId,
        task_id: TaskId,
        result: Annotated[JsonObject, Field(description="What you found or did.")],
    ) -> Posted:
        """Mark a task you claimed as completed, with its result.

        Only the current holder can complete a task, and only once.
        """
        async with self._finishing(session_id, task_id) as claim:
            task = await claim.complete(result)
        return Posted(session_id=session_id, id=task.id, record=plain(task))

    @tool()
    async def fail_task(
        self,
        session_id: SessionId,
        task_id: TaskId,
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
        return Posted(session_id=session_id, id=task.id, record=plain(task))
