"""Tools for proposals and votes, waiting for events, and locks (leases)."""

from __future__ import annotations

import contextlib
import secrets
from typing import Annotated, Literal

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from swarmbus._consensus import ProposalRecord
from swarmbus._errors import DecisionTimeoutError
from swarmbus._locks import Lock, lock_holder
from swarmbus._mcp.base import SwarmBase
from swarmbus._mcp.models import (
    MAX_WAIT,
    Events,
    JsonObject,
    LockView,
    ProposalId,
    ProposalView,
    SessionId,
)
from swarmbus._mcp.tooling import plain, tool
from swarmbus._messages import Proposal, Vote, new_id

__all__ = ["CoordinationTools"]

LockResource = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        description="What to reserve, e.g. file:/src/main.py or host:db-1 (any string).",
    ),
]


class CoordinationTools(SwarmBase):
    """Proposals and votes, the wait for events, and locks."""

    _locks: dict[str, Lock]
    _epoch: str

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
            votes=[plain(b) for b in record.votes],
            your_vote=mine.vote if mine else None,
            decision=plain(record.decision) if record.decision else None,
        )

    @tool()
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

        E.g. action 'rollback', target 'api@v1.2.3'. Returns the proposal_id; call swarm_vote
        to vote on it yourself, then swarm_wait or swarm_get_proposal to learn the decision.
        Act only once it is approved. No separate service is needed: it is decided as soon as
        the votes make the outcome certain, else at its deadline.
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

    @tool()
    async def vote(
        self,
        proposal_id: ProposalId,
        vote: Annotated[
            Literal["yes", "no", "abstain"],
            Field(description="yes (do it), no (don't) or abstain (count me as taking part)."),
        ],
        reason: Annotated[str, Field(description="Why, in a sentence.")] = "",
        confidence: Annotated[
            float | None, Field(ge=0.0, le=1.0, description="How sure you are.")
        ] = None,
    ) -> ProposalView:
        """Vote yes, no or abstain on a proposal, with your reason.

        Votes are final; the proposal is decided as soon as the outcome cannot change (and
        otherwise at its deadline). The result says whether it is decided yet.
        """
        body = Vote(proposal_id=proposal_id, vote=vote, confidence=confidence, reason=reason)
        record = await self.consensus.vote(body, agent=self.agent_id)
        return self._proposal_view(record)

    @tool(read_only=True)
    async def get_proposal(
        self,
        proposal_id: ProposalId,
        wait_seconds: Annotated[
            float,
            Field(ge=0.0, le=MAX_WAIT, description="Wait up to this long for the decision."),
        ] = 0.0,
    ) -> ProposalView:
        """Read a proposal: its votes so far and, once decided, the decision.

        The outcome is approved, rejected or no_quorum. A proposal past its deadline is
        decided now. With wait_seconds, waits up to 30 s for the decision.
        """
        if wait_seconds:
            with contextlib.suppress(DecisionTimeoutError):
                await self.consensus.wait_for_decision(proposal_id, wait_seconds)
        return self._proposal_view(await self.consensus.settle(proposal_id))

    # --- waiting ---

    @tool(read_only=True)
    async def wait(
        self,
        cursor: Annotated[
            str | None,
            Field(
                description="The cursor the previous swarm_wait returned; omit it the first "
                "time (you then get what happened since you joined)."
            ),
        ] = None,
        timeout_seconds: Annotated[
            float,
            Field(ge=0.0, le=MAX_WAIT, description=f"Wait at most this long (0 to {MAX_WAIT:g})."),
        ] = MAX_WAIT,
        session_id: Annotated[
            str | None, Field(description="Only events of this session (default: all yours).")
        ] = None,
    ) -> Events:
        """Wait until something happens in your sessions, then return what happened.

        Wakes on new findings, hypotheses, tasks, proposals and decisions posted by other
        agents in the sessions you started or joined. Pass back the returned cursor on
        the next call: you then miss nothing and see nothing twice. Returns timed_out=true
        with no events if nothing happened within timeout_seconds; call it again.
        """
        if not self.feed.sessions:
            raise ToolError(
                "you are in no session yet: call swarm_join_session (or swarm_start_session) "
                "first; swarm_wait then reports what happens in it."
            )
        start = self._cursor(cursor)
        events, missed = await self.feed.wait(start, timeout_seconds, session_id)
        last = max([start, *(e.seq for e in events)])
        return Events(
            events=events,
            cursor=f"{self._epoch}-{last}",
            timed_out=not events,
            missed=missed,
            sessions=self.feed.sessions,
        )

    def _cursor(self, cursor: str | None) -> int:
        if not cursor:
            return 0
        epoch, _, number = cursor.rpartition("-")
        if epoch != self._epoch:
            return 0  # from an earlier run of this server: everything held counts as new
        try:
            return int(number)
        except ValueError:
            raise ToolError(
                f"invalid cursor {cursor!r}: pass the cursor the previous swarm_wait returned, "
                "or omit it"
            ) from None

    # --- locks ---

    @tool()
    async def acquire_lock(
        self,
        resource: LockResource,
        ttl_seconds: Annotated[
            int,
            Field(
                ge=1,
                le=3600,
                description="The lease expires this long after you took (or renewed) it.",
            ),
        ] = 60,
        wait_seconds: Annotated[
            float,
            Field(ge=0.0, le=MAX_WAIT, description="Wait up to this long if someone holds it."),
        ] = 0.0,
    ) -> LockView:
        """Reserve a resource (a file, a host, ...) for yourself, for ttl_seconds.

        Returns a fencing token: pass it along with your writes so the resource can refuse
        a holder whose lease expired. Calling it again while you hold the lock renews the
        lease. Release it with swarm_release_lock when done.
        """
        lock = self._locks.get(resource)
        if lock is not None and lock.lease is not None:
            lease = await lock.refresh(ttl=ttl_seconds)
            return LockView(
                resource=resource,
                acquired=True,
                token=lease.token,
                ttl_seconds=lease.ttl,
                message=f"renewed: you hold {resource!r} for {lease.ttl} s more.",
            )
        lock = Lock(self.bus, resource, self.agent_id, ttl=ttl_seconds)
        taken = await lock.acquire(timeout=wait_seconds)
        if taken is None:
            holder = await lock_holder(self.bus, resource)
            who = holder.owner if holder else None
            return LockView(
                resource=resource,
                acquired=False,
                holder=who,
                message=f"{resource!r} is held by {who or 'someone'}: try again later, or call "
                "with wait_seconds.",
            )
        self._locks[resource] = lock
        return LockView(
            resource=resource,
            acquired=True,
            token=taken.token,
            ttl_seconds=taken.ttl,
            message=f"you hold {resource!r} for {taken.ttl} s (fencing token {taken.token}); "
            "release it with swarm_release_lock.",
        )

    @tool()
    async def release_lock(self, resource: LockResource) -> LockView:
        """Release a lock you hold (taken with swarm_acquire_lock)."""
        lock = self._locks.pop(resource, None)
        if lock is None or lock.lease is None:
            raise ToolError(
                f"you do not hold a lock on {resource!r}: nothing to release (it may have "
                "expired; swarm_acquire_lock takes it again)."
            )
        await lock.release()
        return LockView(resource=resource, acquired=False, message=f"released {resource!r}.")


def new_epoch() -> str:
    """A cursor prefix unique to one run of the server."""
    return secrets.token_hex(4)
