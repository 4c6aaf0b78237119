"""The consensus client: propose, vote, wait for decisions, and settle them."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Final

import anyio
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._backends import open_store as open_state_store
from swarmbus._blackboard import DEFAULT_BUCKET, DEFAULT_MAX_VALUE_BYTES, Blackboard
from swarmbus._bus import Bus
from swarmbus._consensus.book import ProposalBook, ballot_of_vote, vote_recorded
from swarmbus._consensus.decider import (
    APPROVE_TASK,
    Deadlines,
    Decider,
    approval_refusal,
    record_on_board,
)
from swarmbus._consensus.record import (
    CONSENSUS_BUCKET,
    ProposalRecord,
    decode_record,
    proposal_key,
)
from swarmbus._consensus.tally import Quorum
from swarmbus._errors import (
    ConflictError,
    DecisionTimeoutError,
    InvalidMessageError,
    NotFoundError,
    PublishError,
    SwarmbusError,
)
from swarmbus._messages import Decision, Proposal, Vote, new_id, now, validate_body
from swarmbus._state import StateStore
from swarmbus._tasks import Task, TaskQueue
from swarmbus._telemetry import continued

__all__ = ["DEFAULT_RETENTION", "SERVICE_AGENT", "Consensus", "open_store"]

log = logging.getLogger("swarmbus.consensus")

SERVICE_AGENT: Final = "swarmbus/consensus"
DEFAULT_RETENTION: Final = 7 * 24 * 3600.0


async def open_store(bus: Bus, bucket: str) -> StateStore:
    """The consensus bucket ``bucket`` on ``bus`` (created if missing), on the backend
    ``SWARM_BACKEND`` configures."""
    return await open_state_store(
        bus, bucket, history=1, description="swarmbus proposals and votes"
    )


class Consensus:
    """Propose actions, vote on them, wait for decisions, and settle them.

    ``propose`` and ``vote`` record in KV first (so errors are raised to the caller)
    and then publish the ``proposal`` / ``vote`` event. No service is needed to decide:
    the vote that makes the outcome certain decides it (compare-and-set on the record,
    so exactly once among all participants), ``wait_for_decision`` and ``settle``
    close a proposal whose deadline passed, and inside ``settling()`` every proposal
    this client proposed or voted on is closed at its deadline. Decisions are
    published as ``agent`` (the decider's id). ``settle=False`` leaves deciding to a
    ``ConsensusService``.

    With ``via_service`` they only publish the event, and the service records it:
    the identity of a vote is then the agent token of its subject, which the NATS
    publish permissions bind to the user, and agents need no write access to the
    consensus bucket (deploy/nats/auth.conf). The same checks run first on the
    current record, so the same errors are raised; the call returns once the service
    has recorded the event.
    """

    def __init__(
        self,
        bus: Bus,
        store: StateStore,
        board_bucket: str | None = DEFAULT_BUCKET,
        *,
        via_service: bool = False,
        settle: bool = True,
        agent: str = SERVICE_AGENT,
        retention: float | None = DEFAULT_RETENTION,
    ) -> None:
        self.bus = bus
        self.store = store
        board_limit = None if board_bucket is None else DEFAULT_MAX_VALUE_BYTES
        self.book = ProposalBook(store, board_limit=board_limit)
        self.board_bucket = board_bucket
        self.via_service = via_service
        self.settles = settle and not via_service
        self.decider = Decider(
            bus,
            self.book,
            agent=agent,
            board_bucket=board_bucket,
            retention=None if retention is None else int(retention),
        )
        self._deadlines: Deadlines | None = None

    @classmethod
    async def open(
        cls,
        bus: Bus,
        *,
        bucket: str = CONSENSUS_BUCKET,
        board_bucket: str | None = DEFAULT_BUCKET,
        via_service: bool = False,
        settle: bool = True,
        agent: str = SERVICE_AGENT,
    ) -> Consensus:
        """Open (or create) the consensus bucket on ``bus``.

        Proposals are also recorded as actions awaiting approval on the session's
        blackboard in ``board_bucket`` (None: don't). See the class for the rest.
        """
        store = await open_store(bus, bucket)
        return cls(bus, store, board_bucket, via_service=via_service, settle=settle, agent=agent)

    @property
    def decided(self) -> int:
        """Decisions this client committed (won the compare-and-set for)."""
        return self.decider.decided

    @contextlib.asynccontextmanager
    async def settling(self) -> AsyncIterator[None]:
        """Inside the block, close the proposals this client touches at their deadline."""
        deadlines = Deadlines(self.decider.settle)
        async with anyio.create_task_group() as tg:
            tg.start_soon(deadlines.run)
            self._deadlines = deadlines
            try:
                yield
            finally:
                self._deadlines = None
                tg.cancel_scope.cancel()

    def _follow(self, record: ProposalRecord) -> None:
        if self._deadlines is not None and self.settles and record.decision is None:
            self._deadlines.schedule(proposal_key(record.proposal_id), record.deadline.timestamp())

    async def join(self, session: str, agent: str) -> None:
        """Make ``agent`` a member of ``session``: it votes on proposals without named voters.

        Membership counts for proposals recorded after the join.
        """
        await self.book.join(session, agent)

    async def members(self, session: str) -> list[str]:
        """Agents that joined ``session``, sorted."""
        return await self.book.members(session)

    async def propose(self, proposal: Proposal, *, agent: str, session: str) -> ProposalRecord:
        """Record ``proposal`` by ``agent`` in ``session`` and publish it.

        Raises:
            ConflictError: a different proposal with this id exists.
            InvalidMessageError: invalid fields, no voters (``code == "no_voters"``), or
                an ``approve_task`` proposal its task's rule refuses (``code ==
                "not_approver"``: see ``approval_refusal``).
            MessageTooLargeError: the proposal is over ``book.max_proposal_bytes``.
            NotFoundError: an ``approve_task`` proposal about an unknown task.
        """
        subjects.validate_agent_id(agent)
        subjects.validate_session_id(session)
        if proposal.action == APPROVE_TASK:
            task = await self._task(session, proposal.target)
            refusal = approval_refusal(
                task, proposer=agent, voters=proposal.voters, from_members=not proposal.voters
            )
            if refusal is not None:
                raise InvalidMessageError("not_approver", refusal)
        message_id = new_id()
        board = None
        if self.board_bucket is not None:  # opened first: a failure records nothing
            board = await Blackboard.open(self.bus, session, bucket=self.board_bucket)
        if self.via_service:
            record = await self._propose_via_service(proposal, agent, session, message_id)
        else:
            record = await self.book.record_proposal(
                proposal, agent=agent, session=session, message_id=message_id, at=now()
            )
            await self.bus.publish(record.proposal, agent=agent, session=session, id=message_id)
        if board is not None:
            await record_on_board(board, record, agent=agent)
        self._follow(record)
        return record

    async def propose_task_approval(
        self,
        task_id: str,
        *,
        agent: str,
        session: str,
        quorum: Quorum = "majority",
        threshold: float | None = None,
        voters: Iterable[str] = (),
        timeout: float = 300.0,
    ) -> ProposalRecord:
        """Put a ``requires_approval`` task to a vote; the decision approves or rejects it.

        The proposal's id is ``approve-<task id>``, its action ``approve_task`` and its
        target the task id; the decider calls ``TaskQueue.approve`` or
        ``TaskQueue.reject`` (no quorum rejects). Its voters are the task's
        ``approvers`` (or, if it names none, the session's members); ``voters`` other
        than those raise ``InvalidMessageError``. Only the task's creator may propose
        it. If that id is taken by a proposal that does not count for the task (see
        ``approval_refusal``), a fresh id ``approve-<task id>-<random>`` is used; an
        existing one that counts is returned as it is.
        """
        task = await self._task(session, task_id)
        proposal = Proposal(
            proposal_id=f"approve-{task_id}",
            action=APPROVE_TASK,
            target=task_id,
            quorum=quorum,
            threshold=threshold,
            timeout=timeout,
            voters=list(voters) or list(task.approvers),
        )
        try:
            return await self.propose(proposal, agent=agent, session=session)
        except ConflictError:
            existing = await self.get(proposal.proposal_id)
            if self._approves(existing, task):
                return existing
        fresh = msgspec.structs.replace(proposal, proposal_id=f"approve-{task_id}-{new_id()}")
        return await self.propose(fresh, agent=agent, session=session)

    async def _task(self, session: str, task_id: str) -> Task:
        async with TaskQueue(self.bus, session) as queue:
            return await queue.get(task_id)

    @staticmethod
    def _approves(record: ProposalRecord, task: Task) -> bool:
        """Whether ``record`` is a proposal that counts for approving ``task``."""
        refusal = approval_refusal(
            task,
            proposer=record.proposer,
            voters=record.electorate,
            from_members=record.electorate_from_members,
        )
        proposal = record.proposal
        return (
            refusal is None
            and (proposal.action, proposal.target) == (APPROVE_TASK, task.id)
            and record.session == task.session
        )

    async def vote(self, vote: Vote, *, agent: str) -> ProposalRecord:
        """Cast ``agent``'s vote (in the proposal's session) and publish it.

        The vote counts once its compare-and-set on the record succeeds; a
        ``PublishError`` from the vote event after that does not undo it. If the vote
        makes the outcome certain, the proposal is decided before this returns.

        Raises:
            NotFoundError: no such proposal.
            ProposalClosedError: decided already, or past its deadline.
            NotEligibleError: ``agent`` is not in the proposal's electorate.
            AlreadyVotedError: ``agent`` voted before (votes are final).
        """
        message_id = new_id()
        if self.via_service:
            return await self._vote_via_service(vote, agent, message_id)
        record, revision = await self.book.record_vote(
            vote, agent=agent, message_id=message_id, at=now()
        )
        with continued(record.trace):  # outside a trace of its own: the proposal's
            await self.bus.publish(vote, agent=agent, session=record.session, id=message_id)
        if self.settles:
            await self._settle_quietly(record, revision)
            with contextlib.suppress(NotFoundError):
                record, _ = await self.book.read(vote.proposal_id)
        self._follow(record)
        return record

    async def _settle_quietly(self, record: ProposalRecord, revision: int) -> None:
        """Settle after a vote; the vote counts even if this fails (it is tried again
        inside ``settling()``, and any other participant may settle it)."""
        key = proposal_key(record.proposal_id)
        try:
            again = await self.decider.settle(key, record, revision)
        except SwarmbusError as exc:
            log.warning("consensus: settling %s failed: %s", record.proposal_id, exc)
            again = time.time() + self.decider.republish_after
        if again is not None and self._deadlines is not None and self.settles:
            self._deadlines.schedule(key, again)

    async def settle(self, proposal_id: str) -> ProposalRecord:
        """Decide the proposal now if its votes or its deadline allow; its current record."""
        record, revision = await self.book.read(proposal_id)
        finished = record.decision is not None and record.published
        if self.settles and not (finished and not record.effects_pending):
            await self._settle_quietly(record, revision)
            record, _ = await self.book.read(proposal_id)
        return record

    async def _propose_via_service(
        self, proposal: Proposal, agent: str, session: str, message_id: str
    ) -> ProposalRecord:
        pid = proposal.proposal_id
        # What the service would record: refuse up front what it could only refuse.
        await self.book.new_record(
            proposal, agent=agent, session=session, message_id=message_id, at=now()
        )
        with contextlib.suppress(NotFoundError):
            await self.book.read(pid)
            raise ConflictError(proposal_key(pid), 0, f"proposal {pid!r} exists")
        await self.bus.publish(proposal, agent=agent, session=session, id=message_id)

        def mine(record: ProposalRecord) -> bool:
            if record.message_id != message_id:
                raise ConflictError(proposal_key(pid), 0, f"proposal {pid!r} exists")
            return True

        return await self._recorded(pid, mine)

    async def _vote_via_service(self, vote: Vote, agent: str, message_id: str) -> ProposalRecord:
        validate_body(vote)
        subjects.validate_agent_id(agent)
        record, _ = await self.book.read(vote.proposal_id)
        at = now()
        vote_recorded(record, agent, message_id, at=at)
        ballot = ballot_of_vote(vote, agent, message_id, at)
        self.book.check_fits(msgspec.structs.replace(record, votes=[*record.votes, ballot]))
        with continued(record.trace):  # outside a trace of its own: the proposal's
            await self.bus.publish(vote, agent=agent, session=record.session, id=message_id)

        def counted(record: ProposalRecord) -> bool:
            # raises if the service refused it: a vote of ours got in first, or it closed
            return vote_recorded(record, agent, message_id, at=record.created_at)

        return await self._recorded(vote.proposal_id, counted)

    async def _recorded(
        self, proposal_id: str, done: Callable[[ProposalRecord], bool]
    ) -> ProposalRecord:
        """Wait until the record of ``proposal_id`` satisfies ``done`` (the service
        recorded our event)."""
        timeout = self.bus.settings.request_timeout + 2 * self.bus.settings.retry_for
        try:
            with anyio.fail_after(timeout):
                while True:  # a watch broken by a failover is made again
                    try:
                        return await self._watch_until(proposal_id, done)
                    except (ConnectionError, PublishError) as exc:
                        log.info("consensus: watching %s: %s; again", proposal_id, exc)
                        await anyio.sleep(0.1)
        except TimeoutError as exc:
            raise PublishError(
                f"the consensus service did not record it on {proposal_id!r} within "
                f"{timeout:g}s: is a ConsensusService running?"
            ) from exc

    async def _watch_until(
        self, proposal_id: str, done: Callable[[ProposalRecord], bool]
    ) -> ProposalRecord:
        key = proposal_key(proposal_id)
        async with self.store.watch(key) as entries:
            async for entry in entries:
                if entry is not None and entry.value:
                    record = decode_record(key, entry.value)
                    if done(record):
                        return record
        raise PublishError(f"the watch of {proposal_id!r} ended")

    async def get(self, proposal_id: str) -> ProposalRecord:
        """The current record of a proposal (``NotFoundError`` if unknown)."""
        record, _ = await self.book.read(proposal_id)
        return record

    async def wait_for_decision(self, proposal_id: str, timeout: float) -> Decision:
        """Wait until the proposal is decided; returns the decision.

        A proposal whose deadline passes during the wait is closed by this client
        (unless ``settle=False``).

        Raises:
            NotFoundError: no such proposal.
            DecisionTimeoutError: not decided within ``timeout`` seconds.
        """
        record = await self.settle(proposal_id)
        if record.decision is not None:
            return record.decision
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    if self.settles:
                        tg.start_soon(self._settle_at_deadline, record)
                    decision = await self._decided(proposal_id)
                    tg.cancel_scope.cancel()
                    return decision
        except TimeoutError as exc:
            raise DecisionTimeoutError(proposal_id, timeout) from exc
        raise AssertionError("unreachable")

    async def _settle_at_deadline(self, record: ProposalRecord) -> None:
        await anyio.sleep(max(0.0, record.deadline.timestamp() - time.time()))
        await self.settle(record.proposal_id)

    async def _decided(self, proposal_id: str) -> Decision:
        def has_decision(record: ProposalRecord) -> bool:
            return record.decision is not None

        record = await self._watch_until(proposal_id, has_decision)
        assert record.decision is not None
        return record.decision
