"""Deciding a proposal exactly once, and publishing its decision once.

Any participant may settle a proposal (a ``ConsensusService`` replica, a ``Consensus``
client that just voted or waits, an MCP server): it reads the record and, if the votes
or the deadline settle it, writes the decision by compare-and-set. Exactly one writer
wins; only the winner applies the decision to the blackboard and the task it approves
(idempotent steps), publishes ``agent.action.decided`` (under a message id fixed per
proposal) and marks the record ``published``.

A winner that dies (or stalls) for ``republish_after`` seconds before marking it
published is replaced: another participant takes the publishing over, again by
compare-and-set, so one publisher at a time. Only a winner that stalls that long after
its publish makes a second ``decided`` event (the event stream keeps one: same id).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._blackboard import Blackboard
from swarmbus._bus import Bus
from swarmbus._consensus.book import ProposalBook, decided
from swarmbus._consensus.record import (
    ProposalRecord,
    attributes_of,
    decision_message_id,
    decision_of,
    proposal_key,
)
from swarmbus._errors import (
    ConflictError,
    InvalidTransitionError,
    NotFoundError,
    SwarmbusError,
)
from swarmbus._messages import now
from swarmbus._tasks import Task, TaskQueue
from swarmbus._telemetry import process_span

__all__ = [
    "APPROVE_TASK",
    "REPUBLISH_AFTER",
    "Deadlines",
    "Decider",
    "approval_refusal",
    "apply_to_task",
    "record_on_board",
]

log = logging.getLogger("swarmbus.consensus")

APPROVE_TASK = "approve_task"
#: Seconds an unpublished decision is left to its decider before another takes over.
REPUBLISH_AFTER = 10.0


class Decider:
    """Settles proposals as ``agent``: decides by compare-and-set, publishes if it won.

    Args:
        bus: a connected bus.
        book: the consensus bucket's records.
        agent: the agent id decisions are published as.
        board_bucket: the blackboard bucket decisions are recorded in (None: don't).
        retention: seconds a finished record is kept (None: forever).
        republish_after: seconds before taking over a decision nobody published (long
            enough for a loaded winner to finish: a takeover of a live winner publishes
            a second event).
    """

    def __init__(
        self,
        bus: Bus,
        book: ProposalBook,
        *,
        agent: str,
        board_bucket: str | None,
        retention: int | None,
        republish_after: float = REPUBLISH_AFTER,
    ) -> None:
        self.bus = bus
        self.book = book
        self.agent = subjects.validate_agent_id(agent)
        self.board_bucket = board_bucket
        self.retention = retention
        self.republish_after = republish_after
        self.decided = 0  # decisions this participant committed (won the CAS for)

    async def settle(
        self, key: str, record: ProposalRecord | None = None, revision: int = 0
    ) -> float | None:
        """Decide ``key`` if its votes or deadline allow; publish or apply what is due.

        Returns when (epoch seconds) to look at it again, or None when it is finished.
        """
        while True:
            if record is None:
                loaded = await self.book.load(key)
                if loaded is None:
                    return None
                record, revision = loaded
            try:
                return await self._step(record, revision)
            except ConflictError:
                record = None  # a vote or another participant got in first: re-read

    async def _step(self, record: ProposalRecord, revision: int) -> float | None:
        decision = record.decision
        if decision is None:
            at = now()
            decision = decision_of(record, closed=at >= record.deadline, at=at)
            if decision is None:
                return record.deadline.timestamp()
            record = decided(record, decision, self.agent)
            revision = await self.book.write(record, revision)
            self.decided += 1
            await self._finish(record, revision)
            return None
        if not record.published or record.effects_pending:
            since = record.publish_claimed_at or decision.decided_at or record.created_at
            due = since.timestamp() + self.republish_after
            if time.time() < due:
                return due
            if not record.published:  # its publisher died (or is stuck): take over
                claimed = msgspec.structs.replace(
                    record, publisher=self.agent, publish_claimed_at=now()
                )
                revision = await self.book.write(claimed, revision)
                record = claimed
            await self._finish(record, revision)
        return None

    async def _finish(self, record: ProposalRecord, revision: int) -> None:
        """Publish (if not yet), mark it published, apply the effects, mark them done.

        Shielded: this participant won the compare-and-set, so it alone publishes; a
        cancel (a service or client shutting down) in between would leave the others
        to take over after ``republish_after`` and finish it, late and in their name.
        Each step is bounded by the bus's timeouts.
        """
        with anyio.CancelScope(shield=True):
            await self._finish_steps(record, revision)

    async def _finish_steps(self, record: ProposalRecord, revision: int) -> None:
        assert record.decision is not None
        attrs = {**attributes_of(record), "swarmbus.agent": self.agent}
        subject = subjects.kv_subject(self.book.store.name, proposal_key(record.proposal_id))
        with process_span(
            subject, record.message_id, attrs, record.trace, links=record.vote_traces
        ):
            # Effects first: whoever reacts to the event finds the board and task updated.
            await self._apply(record)
            if not record.published:
                await self.bus.publish(
                    record.decision,
                    agent=self.agent,
                    session=record.session,
                    id=decision_message_id(record.proposal_id),
                )
            done = msgspec.structs.replace(record, published=True, effects_pending=False)
            # The event is out. A conflict: another participant took over (this one was
            # slower than ``republish_after``) and marks it.
            with contextlib.suppress(ConflictError):
                await self.book.write(done, revision, ttl=self.retention)

    async def _apply(self, record: ProposalRecord) -> None:
        if self.board_bucket is not None:
            board = await Blackboard.open(self.bus, record.session, bucket=self.board_bucket)
            await record_on_board(board, record, agent=self.agent)
        if record.proposal.action == APPROVE_TASK:
            await apply_to_task(self.bus, record, agent=self.agent)


class Deadlines:
    """Keys to settle at given times; ``run`` settles each when it is due.

    ``settle(key, record, revision)`` (``record`` None: read it) returns when to look at
    the key again (or None); a failed settle is retried after ``retry_after`` seconds.
    """

    def __init__(
        self,
        settle: Callable[[str, ProposalRecord | None, int], Awaitable[float | None]],
        *,
        retry_after: float = 2.0,
        max_concurrency: int = 64,
    ) -> None:
        self._settle = settle
        self._retry_after = retry_after
        self._limiter = anyio.Semaphore(max_concurrency)
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    def settle_now(self, key: str, record: ProposalRecord, revision: int) -> None:
        """Settle ``key`` now with the ``record`` just seen at ``revision`` (no read)."""
        if self._tg is None:
            self.schedule(key, time.time())
        else:
            self._tg.start_soon(self._one, key, record, revision)

    def schedule(self, key: str, when: float) -> None:
        """Settle ``key`` at ``when`` (epoch seconds), unless it is due earlier already."""
        if self._due.get(key, math.inf) <= when:
            return
        self._due[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        self._wake.set()

    def forget(self, key: str) -> None:
        """Stop settling ``key`` (a timer already in the heap is skipped)."""
        self._due.pop(key, None)

    async def run(self) -> None:
        """Settle keys as they fall due, until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            while True:
                current = time.time()
                while self._heap and self._heap[0][0] <= current:
                    when, _, key = heapq.heappop(self._heap)
                    if self._due.get(key) == when:
                        del self._due[key]
                        tg.start_soon(self._one, key)
                delay = self._heap[0][0] - current if self._heap else math.inf
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def _one(self, key: str, record: ProposalRecord | None = None, revision: int = 0) -> None:
        async with self._limiter:
            try:
                again = await self._settle(key, record, revision)
            except SwarmbusError as exc:
                log.warning("consensus: settling %s failed (%s); will retry", key, exc)
                again = time.time() + self._retry_after
        if again is not None:
            self.schedule(key, again)


async def record_on_board(board: Blackboard, record: ProposalRecord, *, agent: str) -> None:
    """Record a proposal's action and its decision in the session's actions taken.

    The action is named by the proposal id: awaiting_approval while open, then
    approved or rejected (no quorum counts as rejected). Idempotent.
    """
    proposal = record.proposal
    with contextlib.suppress(ConflictError):
        await board.record_action(
            proposal.action,
            agent=record.proposer,
            status="awaiting_approval",
            target=proposal.target,
            parameters=proposal.parameters,
            id=proposal.proposal_id,
        )
    decision = record.decision
    if decision is None:
        return
    status = "approved" if decision.outcome == "approved" else "rejected"
    reason = (
        f"{decision.outcome}: {decision.votes_for} for, {decision.votes_against} against, "
        f"{decision.abstentions} abstaining"
    )
    with contextlib.suppress(InvalidTransitionError):
        await board.set_action_status(proposal.proposal_id, status, agent=agent, reason=reason)


def approval_refusal(
    task: Task, *, proposer: str, voters: list[str], from_members: bool
) -> str | None:
    """Why a proposal to approve ``task`` does not count (None: it does).

    Only the task's creator may put it to a vote, and the electorate is the rule's, not
    the proposer's pick: the task's ``approvers`` if it names them, else the session's
    members (a proposal that names no voters).
    """
    if proposer != task.created_by:
        return f"only its creator {task.created_by!r} may propose approving task {task.id}"
    if task.approvers:
        if sorted(set(voters)) != task.approvers:
            return f"task {task.id} is approved by its approvers {task.approvers}, not {voters}"
    elif not from_members:
        return (
            f"task {task.id} is approved by the members of {task.session}: "
            "its approval proposal must name no voters"
        )
    return None


async def apply_to_task(bus: Bus, record: ProposalRecord, *, agent: str) -> None:
    """Approve or reject the task an ``approve_task`` proposal is about. Idempotent.

    A proposal the task's rule refuses (``approval_refusal``) changes nothing.
    """
    decision = record.decision
    if decision is None:
        return
    task_id = record.proposal.target
    async with TaskQueue(bus, record.session) as queue:
        try:
            refusal = approval_refusal(
                await queue.get(task_id),
                proposer=record.proposer,
                voters=record.electorate,
                from_members=record.electorate_from_members,
            )
            if refusal is not None:
                log.warning("consensus: %s ignored: %s", record.proposal_id, refusal)
            elif decision.outcome == "approved":
                await queue.approve(task_id, by=agent)
            else:
                await queue.reject(task_id, by=agent, reason=f"consensus: {decision.outcome}")
        except InvalidTransitionError:
            pass  # applied before (a redelivery or another participant)
        except NotFoundError:
            log.warning("consensus: %s approves unknown task %s", record.proposal_id, task_id)
