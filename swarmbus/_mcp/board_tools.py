"""Tools for sessions and the blackboard: start, join, list, post, read, hypotheses."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from swarmbus._blackboard import Blackboard
from swarmbus._errors import ConflictError
from swarmbus._mcp.base import SwarmBase
from swarmbus._mcp.models import (
    PAGE,
    Board,
    Category,
    Confidence,
    Cursor,
    EvidenceItem,
    HypothesisId,
    JsonObject,
    Limit,
    Posted,
    Records,
    SessionId,
    SessionList,
    SessionView,
)
from swarmbus._mcp.tooling import page, plain, tool
from swarmbus._messages import Evidence, Finding

__all__ = ["BoardTools"]


class BoardTools(SwarmBase):
    """Sessions and their blackboards."""

    @tool()
    async def start_session(
        self,
        session_id: SessionId,
        context: Annotated[
            JsonObject | None,
            Field(description='What the session is about, e.g. {"task": "investigate INC-1234"}.'),
        ] = None,
    ) -> SessionView:
        """Start a new coordination session with its shared context, and join it.

        Fails if the session exists: then call swarm_join_session.
        """
        board = await self._board(session_id)
        try:
            await board.start(self.agent_id, context or {})
        except ConflictError:
            raise ToolError(
                f"session {session_id!r} already exists: call swarm_join_session to join it."
            ) from None
        await self.consensus.join(session_id, self.agent_id)
        await self.feed.follow(session_id)
        await self.feed.follow(session_id)
        return await self._view(board)

    @tool()
    async def join_session(self, session_id: SessionId) -> SessionView:
        """Join an active coordination session.

        Members vote on proposals made after they joined. Returns the session's context, members
        and what is on its blackboard.
        """
        board = await self._active(session_id)
        await self.consensus.join(session_id, self.agent_id)
        await self.feed.follow(session_id)
        return await self._view(board)

    @tool(read_only=True)
    async def list_sessions(self, cursor: Cursor = None, limit: Limit = PAGE) -> SessionList:
        """List the coordination sessions (incidents) with status and initiator, a page at
        a time (pass next_cursor back as cursor for the next page)."""
        records = await Blackboard.sessions(self.bus)
        items, next_cursor = page(records, cursor, limit)
        return SessionList(sessions=[plain(r) for r in items], next_cursor=next_cursor)

    # --- blackboard ---

    @tool()
    async def post_finding(
        self,
        session_id: SessionId,
        category: Annotated[
            Category,
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
        return Posted(session_id=session_id, id=record.id, record=plain(record))

    @tool(read_only=True)
    async def get_findings(
        self,
        session_id: SessionId,
        category: Annotated[
            Category | None, Field(description="Only findings of this category.")
        ] = None,
        posted_by: Annotated[
            str | None, Field(description="Only findings posted by this agent id, e.g. ops/claude.")
        ] = None,
        cursor: Cursor = None,
        limit: Limit = PAGE,
    ) -> Records:
        """Read the findings posted in a session, oldest first, a page at a time.

        Optionally only one category, or only the findings one agent posted. To be told of
        new findings instead of reading again, call swarm_wait.
        """
        if posted_by is not None:
            self._agent_id(posted_by, "posted_by")
        board = await self._board(session_id)
        await self._known(board)
        found = await board.findings(agent=posted_by, category=category)
        items, next_cursor = page(found, cursor, limit)
        return Records(
            session_id=session_id,
            count=len(items),
            items=[plain(f) for f in items],
            next_cursor=next_cursor,
        )

    @tool(read_only=True)
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

    @tool()
    async def report_hypothesis(
        self,
        session_id: SessionId,
        description: Annotated[str, Field(min_length=1, description="What you suspect.")],
        confidence: Confidence,
    ) -> Posted:
        """Put a hypothesis on the session's blackboard with your confidence.

        E.g. 'database connection pool exhaustion', 0.7. Others can assess it with
        swarm_assess_hypothesis.
        """
        board = await self._active(session_id)
        record = await board.propose_hypothesis(description, confidence, agent=self.agent_id)
        return Posted(session_id=session_id, id=record.id, record=plain(record))

    @tool()
    async def assess_hypothesis(
        self,
        session_id: SessionId,
        hypothesis_id: HypothesisId,
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
        return Posted(session_id=session_id, id=record.id, record=plain(record))
