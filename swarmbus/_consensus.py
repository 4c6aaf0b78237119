"""Consensus: proposals put to a vote, tallied against a quorum, decided exactly once.

Everything about a proposal lives in ONE KV record (bucket ``SWARMBUS_CONSENSUS``,
key ``p.<safe_token(proposal_id)>``): the proposal, its electorate, every vote and,
once closed, the decision. Every change is a compare-and-set on that record, so:

- a vote and the decision cannot interleave: a vote that loses against the decision
  re-reads the record and fails with ``ProposalClosedError``;
- two service replicas may both try to decide; exactly one CAS wins and only the
  winner publishes ``agent.action.decided`` (a replica that dies between its CAS and
  the publish is covered by the other one re-publishing under the same
  ``Nats-Msg-Id``, which the event stream de-duplicates);
- the decision is reproducible: ``tally()`` of the recorded ``votes`` gives it again.

Voting rules (pure functions: ``final_outcome``, ``early_outcome``, ``tally_outcome``):

- The electorate is fixed when the proposal is recorded: the named ``voters``, or
  else the session's members (agents that called ``Consensus.join``).
- Votes are final: one per agent; a second one raises ``AlreadyVotedError``.
- Quorum is participation. ``majority`` and ``threshold`` need more than half of the
  electorate to have cast a ballot (abstentions count as taking part);
  ``unanimous`` needs every member. Without it, the timeout yields ``no_quorum``.
- ``majority``: approved iff yes > no (a tie is rejected). ``threshold`` t:
  approved iff yes >= t * (yes + no) and yes > 0 (abstentions do not count
  against). ``unanimous``: rejected by any no; approved when everyone voted, nobody
  said no and at least one said yes (all abstaining is rejected).
- Early decision: as soon as every way the missing votes could go gives the same
  outcome. Otherwise the proposal closes at its deadline (recording time + timeout).

Session membership keys: ``m.<session>.<agent id>``.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from types import TracebackType
from typing import Final, Literal, Self, TypeAlias

import anyio
import anyio.abc
import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from swarmbus import _subjects as subjects
from swarmbus._blackboard import DEFAULT_BUCKET, Blackboard
from swarmbus._bus import Bus
from swarmbus._errors import (
    AlreadyVotedError,
    ConflictError,
    DecisionTimeoutError,
    InvalidMessageError,
    InvalidTransitionError,
    InvalidTTLError,
    MessageTooLargeError,
    NotEligibleError,
    NotFoundError,
    ProposalClosedError,
    PublishError,
    SwarmbusError,
)
from swarmbus._jetstream.headers import KV_OPERATION, KV_REMOVED
from swarmbus._jetstream.kv import kv_write
from swarmbus._jetstream.reads import kv_latest
from swarmbus._messages import (
    AgentId,
    Ballot,
    Decision,
    Message,
    MessageId,
    Proposal,
    ProposalMessage,
    SessionId,
    Timestamp,
    Vote,
    VoteMessage,
    new_id,
    now,
    validate_body,
)
from swarmbus._tasks import TaskQueue
from swarmbus._telemetry import continued, process_span, trace_headers

log = logging.getLogger("swarmbus.consensus")

CONSENSUS_BUCKET: Final = "SWARMBUS_CONSENSUS"
DEFAULT_RETENTION: Final = 7 * 24 * 3600.0
#: Well past any redelivery of a proposal's events (a record re-created after expiry
#: would be decided again); the server's expiry overflows at ~240 years.
MIN_RETENTION: Final = 3600.0
_TTL_DISABLED: Final = 10166  # JetStream: "per-message TTL is disabled" on the stream
MAX_RETENTION: Final = 10 * 365 * 24 * 3600.0
SERVICE_AGENT: Final = "swarmbus/consensus"
APPROVE_TASK: Final = "approve_task"
PROPOSAL_PREFIX: Final = "p."
MEMBER_PREFIX: Final = "m."

Outcome: TypeAlias = Literal["approved", "rejected", "no_quorum"]
Quorum: TypeAlias = Literal["majority", "unanimous", "threshold"]


# --- tallying (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """Vote counts against the size of the electorate."""

    eligible: int
    votes_for: int = 0
    votes_against: int = 0
    abstentions: int = 0

    @property
    def cast(self) -> int:
        """Ballots cast, abstentions included."""
        return self.votes_for + self.votes_against + self.abstentions

    @property
    def missing(self) -> int:
        """Members who have not voted yet."""
        return self.eligible - self.cast

    @classmethod
    def of(cls, votes: Iterable[str], eligible: int) -> Tally:
        """Count ``yes`` / ``no`` / ``abstain`` values."""
        values = list(votes)
        return cls(eligible, values.count("yes"), values.count("no"), values.count("abstain"))


def final_outcome(quorum: Quorum, threshold: float | None, tally: Tally) -> Outcome:
    """The outcome if the proposal closed now with these votes."""
    yes, no = tally.votes_for, tally.votes_against
    if quorum == "unanimous":
        if no:
            return "rejected"
        if tally.missing > 0:
            return "no_quorum"
        return "approved" if yes else "rejected"
    if 2 * tally.cast <= tally.eligible:
        return "no_quorum"
    if quorum == "majority":
        approved = yes > no
    else:
        if threshold is None:
            raise ValueError("a threshold quorum needs a threshold")
        approved = yes > 0 and yes >= Fraction(str(threshold)) * (yes + no)
    return "approved" if approved else "rejected"


def early_outcome(quorum: Quorum, threshold: float | None, tally: Tally) -> Outcome | None:
    """The outcome if no way the missing votes could go can change it, else None.

    Every rule is monotone (more yes only helps approval, more no only helps
    rejection, more ballots only help the quorum), so it is enough to look at the
    three extremes: all missing vote yes, all vote no, nobody votes any more.
    """
    m = tally.missing
    extremes = {
        final_outcome(quorum, threshold, tally),
        final_outcome(
            quorum,
            threshold,
            Tally(tally.eligible, tally.votes_for + m, tally.votes_against, tally.abstentions),
        ),
        final_outcome(
            quorum,
            threshold,
            Tally(tally.eligible, tally.votes_for, tally.votes_against + m, tally.abstentions),
        ),
    }
    return extremes.pop() if len(extremes) == 1 else None


def tally_outcome(
    quorum: Quorum, threshold: float | None, tally: Tally, *, closed: bool
) -> Outcome | None:
    """The outcome now: final if ``closed`` (deadline passed), else only if certain."""
    if closed:
        return final_outcome(quorum, threshold, tally)
    return early_outcome(quorum, threshold, tally)


# --- the record ------------------------------------------------------------------------


class ProposalRecord(msgspec.Struct, kw_only=True, frozen=True):
    """A proposal as stored: the source of truth for its votes and decision."""

    proposal: Proposal
    session: SessionId
    proposer: AgentId
    message_id: MessageId
    created_at: Timestamp
    deadline: Timestamp
    electorate: list[AgentId]
    votes: list[Ballot] = []
    decision: Decision | None = None
    published: bool = False
    # W3C trace context of the proposer and of each vote: the decision continues the
    # proposal's trace and links to the votes (fan-in).
    trace: dict[str, str] = {}
    vote_traces: list[dict[str, str]] = []

    @property
    def proposal_id(self) -> str:
        return self.proposal.proposal_id

    def tally(self) -> Tally:
        """Counts of the recorded votes (reproduces the decision's counts)."""
        return Tally.of((b.vote for b in self.votes), len(self.electorate))

    def ballot_of(self, agent: str) -> Ballot | None:
        """The vote ``agent`` cast, if any."""
        return next((b for b in self.votes if b.voter == agent), None)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ProposalRecord)


def proposal_key(proposal_id: str) -> str:
    """The KV key of a proposal's record."""
    return PROPOSAL_PREFIX + subjects.safe_token(proposal_id)


def member_key(session: str, agent: str) -> str:
    """The KV key that makes ``agent`` a member of ``session``."""
    subjects.validate_agent_id(agent)
    return f"{MEMBER_PREFIX}{subjects.validate_session_id(session)}.{agent}"


def decision_message_id(proposal_id: str) -> str:
    """The decision event's envelope id: fixed per proposal, so re-publishing dedupes."""
    return "decision-" + subjects.safe_token(proposal_id)


def decision_of(record: ProposalRecord, *, closed: bool, at: datetime) -> Decision | None:
    """The decision the record's votes give now, or None while it can still change."""
    proposal = record.proposal
    tally = record.tally()
    outcome = tally_outcome(proposal.quorum, proposal.threshold, tally, closed=closed)
    if outcome is None:
        return None
    return Decision(
        proposal_id=proposal.proposal_id,
        decision=proposal.action if outcome == "approved" else outcome,
        outcome=outcome,
        votes_for=tally.votes_for,
        votes_against=tally.votes_against,
        abstentions=tally.abstentions,
        eligible=tally.eligible,
        closed_by="timeout" if closed else "early",
        decided_at=at,
        votes=list(record.votes),
    )


# --- KV operations shared by the client and the service -----------------------------------


async def _read(kv: KeyValue, proposal_id: str) -> tuple[ProposalRecord, int]:
    key = proposal_key(proposal_id)
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError as exc:
        # A direct get may be answered by a replica that has not caught up (a
        # proposal recorded a moment ago, a failover): ask the stream leader.
        found = await _read_from_leader(kv, key)
        if found is None:
            raise NotFoundError("proposal", proposal_id) from exc
        return found
    except nats.js.errors.Error as exc:
        raise SwarmbusError(f"cannot read proposal {proposal_id!r}: {exc}") from exc
    return _loaded(entry)


async def _read_from_leader(kv: KeyValue, key: str) -> tuple[ProposalRecord, int] | None:
    try:
        msg = await kv._js.get_msg(kv._stream, subject=f"{kv._pre}{key}", direct=False)
    except nats.js.errors.NotFoundError:
        return None
    except nats.js.errors.Error as exc:
        raise SwarmbusError(f"cannot read {key}: {exc}") from exc
    if not msg.data or (msg.headers or {}).get(KV_OPERATION) in KV_REMOVED:
        return None
    return _decode(key, msg.data), int(msg.seq or 0)


def _loaded(entry: KeyValue.Entry) -> tuple[ProposalRecord, int]:
    if entry.value is None or entry.revision is None:
        raise SwarmbusError(f"KV entry {entry.key} has no value")
    return _decode(entry.key, entry.value), entry.revision


def _decode(key: str, data: bytes) -> ProposalRecord:
    try:
        record = _decoder.decode(data)
    except msgspec.DecodeError as exc:  # written by something else
        raise SwarmbusError(f"KV entry {key} is not a proposal record: {exc}") from None
    if record.proposal.quorum == "threshold" and record.proposal.threshold is None:
        raise SwarmbusError(f"KV entry {key} is a threshold proposal without a threshold")
    return record


async def _stop(watcher: KeyValue.KeyWatcher) -> None:
    with contextlib.suppress(nats.errors.Error):
        await watcher.stop()  # type: ignore[no-untyped-call]


async def _members(kv: KeyValue, session: str) -> list[str]:
    prefix = f"{MEMBER_PREFIX}{subjects.validate_session_id(session)}."
    return sorted(key[len(prefix) :] for key, _ in await kv_latest(kv, prefix + ">"))


def _attrs(record: ProposalRecord) -> dict[str, str]:
    """Span attributes of writes about ``record``."""
    return {"swarmbus.session": record.session, "swarmbus.proposal_id": record.proposal_id}


def _deadline(proposal: Proposal, at: datetime) -> datetime:
    try:
        return at + timedelta(seconds=proposal.timeout)
    except OverflowError:
        raise InvalidMessageError(
            "schema", f"timeout {proposal.timeout:g}s ends past the calendar"
        ) from None


async def _new_record(
    kv: KeyValue, proposal: Proposal, *, agent: str, session: str, message_id: str, at: datetime
) -> ProposalRecord:
    """The record a valid ``proposal`` opens (its electorate: the voters, or the members)."""
    validate_body(proposal)
    if proposal.quorum == "threshold" and proposal.threshold is None:
        raise InvalidMessageError("schema", "a threshold quorum needs a threshold")
    electorate = sorted(set(proposal.voters)) or await _members(kv, session)
    if not electorate:
        raise InvalidMessageError(
            "no_voters", f"proposal {proposal.proposal_id!r} names no voters and {session} has none"
        )
    return ProposalRecord(
        proposal=msgspec.structs.replace(proposal, voters=electorate),
        session=session,
        proposer=agent,
        message_id=message_id,
        created_at=at,
        deadline=_deadline(proposal, at),
        electorate=electorate,
        trace=trace_headers(),
    )


async def _record_proposal(
    kv: KeyValue, proposal: Proposal, *, agent: str, session: str, message_id: str, at: datetime
) -> ProposalRecord:
    record = await _new_record(
        kv, proposal, agent=agent, session=session, message_id=message_id, at=at
    )
    key = proposal_key(proposal.proposal_id)
    data = _encoder.encode(record)
    try:
        await kv_write(kv, key, data, last=0, attributes=_attrs(record))
    except nats.js.errors.KeyWrongLastSequenceError as exc:
        existing, _ = await _read(kv, proposal.proposal_id)
        if existing.message_id == message_id:
            return existing
        raise ConflictError(key, 0, f"proposal {proposal.proposal_id!r} exists") from exc
    except nats.errors.MaxPayloadError as exc:
        raise MessageTooLargeError(len(data), kv._js._nc.max_payload) from exc
    except nats.js.errors.Error as exc:
        raise PublishError(f"cannot record proposal {proposal.proposal_id!r}: {exc}") from exc
    return record


async def _record_vote(
    kv: KeyValue, vote: Vote, *, agent: str, message_id: str, at: datetime
) -> ProposalRecord:
    validate_body(vote)
    subjects.validate_agent_id(agent)
    pid = vote.proposal_id
    while True:
        record, revision = await _read(kv, pid)
        if _vote_recorded(record, agent, message_id, at=at):
            return record  # this very vote is recorded already (a re-delivered event)
        ballot = _ballot(vote, agent, message_id, at)
        updated = msgspec.structs.replace(
            record,
            votes=[*record.votes, ballot],
            vote_traces=[*record.vote_traces, trace_headers()],
        )
        data = _encoder.encode(updated)
        try:
            await kv_write(
                kv,
                proposal_key(pid),
                data,
                last=revision,
                attributes={**_attrs(record), "swarmbus.agent": agent},
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # another vote or the decision got in first: re-read
        except nats.errors.MaxPayloadError as exc:
            raise MessageTooLargeError(len(data), kv._js._nc.max_payload) from exc
        except nats.js.errors.Error as exc:
            raise PublishError(f"cannot record vote on {pid!r}: {exc}") from exc
        return updated


def _check_fits(kv: KeyValue, record: ProposalRecord) -> None:
    """Refuse an event whose record the service could not write (it fits, the record not)."""
    size, limit = len(_encoder.encode(record)), kv._js._nc.max_payload
    if size > limit:
        raise MessageTooLargeError(size, limit)


def _ballot(vote: Vote, agent: str, message_id: str, at: datetime) -> Ballot:
    """``agent``'s ``vote`` as the proposal record stores it."""
    return Ballot(
        voter=agent,
        vote=vote.vote,
        confidence=vote.confidence,
        reason=vote.reason,
        cast_at=at,
        message_id=message_id,
    )


def _vote_recorded(record: ProposalRecord, agent: str, message_id: str, *, at: datetime) -> bool:
    """True if this very vote is in ``record``; raise if ``agent`` may not cast it."""
    pid = record.proposal_id
    mine = record.ballot_of(agent)
    if mine is not None and mine.message_id == message_id:
        return True
    if record.decision is not None:
        raise ProposalClosedError(pid, record.decision.outcome)
    if agent not in record.electorate:
        raise NotEligibleError(pid, agent)
    if mine is not None:
        raise AlreadyVotedError(pid, agent)
    if at >= record.deadline:
        raise ProposalClosedError(pid, None)
    return False


# --- the client ----------------------------------------------------------------------------


class Consensus:
    """Propose actions, vote on them and wait for decisions.

    ``propose`` and ``vote`` record in KV first (so errors are raised to the caller)
    and then publish the ``proposal`` / ``vote`` event. A ``ConsensusService`` must
    run somewhere to decide.

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
        kv: KeyValue,
        board_bucket: str | None = DEFAULT_BUCKET,
        *,
        via_service: bool = False,
    ) -> None:
        self.bus = bus
        self.kv = kv
        self.board_bucket = board_bucket
        self.via_service = via_service

    @classmethod
    async def open(
        cls,
        bus: Bus,
        *,
        bucket: str = CONSENSUS_BUCKET,
        board_bucket: str | None = DEFAULT_BUCKET,
        via_service: bool = False,
    ) -> Consensus:
        """Open (or create) the consensus bucket on ``bus``.

        Proposals are also recorded as actions awaiting approval on the session's
        blackboard in ``board_bucket`` (None: don't). ``via_service``: see the class.
        """
        return cls(bus, await _bucket(bus, bucket), board_bucket, via_service=via_service)

    async def join(self, session: str, agent: str) -> None:
        """Make ``agent`` a member of ``session``: it votes on proposals without named voters.

        Membership counts for proposals recorded after the join.
        """
        try:
            await kv_write(
                self.kv,
                member_key(session, agent),
                agent.encode(),
                attributes={"swarmbus.session": session, "swarmbus.agent": agent},
            )
        except nats.js.errors.Error as exc:
            raise PublishError(f"cannot join {agent} to {session}: {exc}") from exc

    async def members(self, session: str) -> list[str]:
        """Agents that joined ``session``, sorted."""
        return await _members(self.kv, session)

    async def propose(self, proposal: Proposal, *, agent: str, session: str) -> ProposalRecord:
        """Record ``proposal`` by ``agent`` in ``session`` and publish it.

        Raises:
            ConflictError: a different proposal with this id exists.
            InvalidMessageError: invalid fields, or no voters (``code == "no_voters"``).
        """
        subjects.validate_agent_id(agent)
        subjects.validate_session_id(session)
        message_id = new_id()
        if self.via_service:
            record = await self._propose_via_service(proposal, agent, session, message_id)
        else:
            record = await _record_proposal(
                self.kv, proposal, agent=agent, session=session, message_id=message_id, at=now()
            )
            await self.bus.publish(record.proposal, agent=agent, session=session, id=message_id)
        if self.board_bucket is not None:
            board = await Blackboard.open(self.bus, session, bucket=self.board_bucket)
            await record_on_board(board, record, agent=agent)
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
        target the task id; the deciding service calls ``TaskQueue.approve`` or
        ``TaskQueue.reject`` (no quorum rejects).
        """
        proposal = Proposal(
            proposal_id=f"approve-{task_id}",
            action=APPROVE_TASK,
            target=task_id,
            quorum=quorum,
            threshold=threshold,
            timeout=timeout,
            voters=list(voters),
        )
        return await self.propose(proposal, agent=agent, session=session)

    async def vote(self, vote: Vote, *, agent: str) -> ProposalRecord:
        """Cast ``agent``'s vote (in the proposal's session) and publish it.

        The vote counts once its compare-and-set on the record succeeds; a
        ``PublishError`` from the vote event after that does not undo it.

        Raises:
            NotFoundError: no such proposal.
            ProposalClosedError: decided already, or past its deadline.
            NotEligibleError: ``agent`` is not in the proposal's electorate.
            AlreadyVotedError: ``agent`` voted before (votes are final).
        """
        message_id = new_id()
        if self.via_service:
            return await self._vote_via_service(vote, agent, message_id)
        record = await _record_vote(self.kv, vote, agent=agent, message_id=message_id, at=now())
        with continued(record.trace):  # outside a trace of its own: the proposal's
            await self.bus.publish(vote, agent=agent, session=record.session, id=message_id)
        return record

    async def _propose_via_service(
        self, proposal: Proposal, agent: str, session: str, message_id: str
    ) -> ProposalRecord:
        pid = proposal.proposal_id
        # What the service would record: refuse up front what it could only refuse.
        record = await _new_record(
            self.kv, proposal, agent=agent, session=session, message_id=message_id, at=now()
        )
        _check_fits(self.kv, record)
        with contextlib.suppress(NotFoundError):
            await _read(self.kv, pid)
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
        record, _ = await _read(self.kv, vote.proposal_id)
        at = now()
        _vote_recorded(record, agent, message_id, at=at)
        ballot = _ballot(vote, agent, message_id, at)
        _check_fits(self.kv, msgspec.structs.replace(record, votes=[*record.votes, ballot]))
        with continued(record.trace):  # outside a trace of its own: the proposal's
            await self.bus.publish(vote, agent=agent, session=record.session, id=message_id)

        def counted(record: ProposalRecord) -> bool:
            # raises if the service refused it: a vote of ours got in first, or it closed
            return _vote_recorded(record, agent, message_id, at=record.created_at)

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
                        watcher = await self.kv.watch(proposal_key(proposal_id))
                        try:
                            async for entry in watcher:
                                if entry is not None and entry.value:
                                    record = _decoder.decode(entry.value)
                                    if done(record):
                                        return record
                        finally:
                            await _stop(watcher)
                    except nats.errors.Error as exc:
                        log.info("consensus: watching %s: %s; again", proposal_id, exc)
                        await anyio.sleep(0.1)
        except TimeoutError as exc:
            raise PublishError(
                f"the consensus service did not record it on {proposal_id!r} within "
                f"{timeout:g}s: is a ConsensusService running?"
            ) from exc

    async def get(self, proposal_id: str) -> ProposalRecord:
        """The current record of a proposal (``NotFoundError`` if unknown)."""
        record, _ = await _read(self.kv, proposal_id)
        return record

    async def wait_for_decision(self, proposal_id: str, timeout: float) -> Decision:
        """Wait until the proposal is decided; returns the decision.

        Raises:
            NotFoundError: no such proposal.
            DecisionTimeoutError: not decided within ``timeout`` seconds.
        """
        record, _ = await _read(self.kv, proposal_id)
        if record.decision is not None:
            return record.decision
        try:
            with anyio.fail_after(timeout):
                watcher = await self.kv.watch(proposal_key(proposal_id))
                try:
                    async for entry in watcher:
                        if entry is None or not entry.value:
                            continue
                        decision = _decoder.decode(entry.value).decision
                        if decision is not None:
                            return decision
                finally:
                    await _stop(watcher)
        except TimeoutError as exc:
            raise DecisionTimeoutError(proposal_id, timeout) from exc
        raise DecisionTimeoutError(proposal_id, timeout)


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


async def apply_to_task(bus: Bus, record: ProposalRecord, *, agent: str) -> None:
    """Approve or reject the task an ``approve_task`` proposal is about. Idempotent."""
    decision = record.decision
    if decision is None:
        return
    task_id = record.proposal.target
    async with TaskQueue(bus, record.session) as queue:
        try:
            if decision.outcome == "approved":
                await queue.approve(task_id, by=agent)
            else:
                await queue.reject(task_id, by=agent, reason=f"consensus: {decision.outcome}")
        except InvalidTransitionError:
            pass  # applied before (a redelivery or the other replica)
        except NotFoundError:
            log.warning("consensus: %s approves unknown task %s", record.proposal_id, task_id)


async def _bucket(bus: Bus, bucket: str) -> KeyValue:
    return await bus.key_value(bucket, history=1, description="swarmbus proposals and votes")


# --- the service --------------------------------------------------------------------------------


class ConsensusService:
    """Decides proposals: tallies on every recorded vote, closes them at their deadline.

    Use ``async with ConsensusService(bus): ...``; run several replicas for HA (each
    proposal is still decided once). It watches the proposal records (the watch's
    initial snapshot recovers open proposals and their timers after a restart), and
    ingests ``proposal`` / ``vote`` events published by wire-only clients through a
    durable consumer shared by the replicas; an illegal one is answered with an
    ``agent.error.occurred`` event and changes nothing.

    Args:
        bus: a connected bus.
        bucket: the consensus bucket (tests use their own).
        session: ingest events of this session only (``*``: all sessions).
        agent: the agent id decisions are published as.
        ingest: consume proposal/vote events (off: only KV-recorded proposals).
        republish_after: seconds before a replica publishes a decision that another
            replica recorded but has not marked published (it may have died).
        board_bucket: the blackboard bucket decisions are recorded in (None: don't).
        retention: seconds a decided (and published) proposal's record is kept before
            the server deletes it (None: forever; 1 hour to 10 years); its events stay
            in the event stream, and its id can be proposed again after it.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        bucket: str = CONSENSUS_BUCKET,
        session: str = "*",
        agent: str = SERVICE_AGENT,
        ingest: bool = True,
        republish_after: float = 2.0,
        max_concurrency: int = 64,
        board_bucket: str | None = DEFAULT_BUCKET,
        retention: float | None = DEFAULT_RETENTION,
    ) -> None:
        if session != "*":
            subjects.validate_session_id(session)
        if retention is not None and not MIN_RETENTION <= retention <= MAX_RETENTION:
            raise InvalidTTLError(retention)
        self.retention = None if retention is None else math.ceil(retention)
        self.bus = bus
        self.bucket = bucket
        self.session = session
        self.agent = subjects.validate_agent_id(agent)
        self.ingest = ingest
        self.republish_after = republish_after
        self.board_bucket = board_bucket
        self.decided = 0  # decisions this replica committed (won the CAS for)
        self._limiter = anyio.Semaphore(max_concurrency)
        self._timers: list[tuple[float, int, str]] = []  # (when, seq, key): settle key then
        self._open: set[str] = set()  # undecided proposals (per the watch)
        self._unpublished: set[str] = set()  # decided, not yet marked published
        self._mine: set[str] = set()  # decided by this replica, being published
        # Envelope ids of proposals/votes already in a record (seen by the watch), so
        # ingesting a Python client's own event costs no KV read.
        self._recorded: dict[str, set[str]] = {}
        self._recorded_ids: set[str] = set()
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self._kv: KeyValue | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self._running())
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        await stack.__aexit__(exc_type, exc, tb)

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        self._kv = await _bucket(self.bus, self.bucket)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._watch)
            tg.start_soon(self._timer_loop)
            if self.ingest:
                durable = f"consensus-{subjects.safe_token(self.bucket + '.' + self.session)}"
                await tg.start(self._consume, durable)
            try:
                yield
            finally:
                self._stop.set()
                tg.cancel_scope.cancel()

    # --- triggers ---------------------------------------------------------------------

    async def _watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        kv = self._kv
        assert kv is not None
        watcher = await kv.watch(PROPOSAL_PREFIX + ">")
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial snapshot (open proposals recovered)
                    task_status.started()
                elif entry.value:
                    try:
                        loaded = _loaded(entry)
                    except SwarmbusError as exc:  # bad input must not stop the service
                        log.warning("consensus: skipping %s", exc)
                        self._open.discard(entry.key)
                        self._unpublished.discard(entry.key)
                        continue
                    self._on_record(entry.key, *loaded)
        finally:
            await _stop(watcher)

    def _on_record(self, key: str, record: ProposalRecord, revision: int) -> None:
        assert self._tg is not None
        self._remember(key, record)
        if record.decision is None:
            deadline = record.deadline.timestamp()
            if key not in self._open:
                self._open.add(key)
                self._schedule(deadline, key)
            if decision_of(record, closed=time.time() >= deadline, at=now()) is not None:
                self._tg.start_soon(self._settle, key, record, revision)
        else:
            self._open.discard(key)
            if record.published:
                self._unpublished.discard(key)
                self._mine.discard(key)
            elif key not in self._unpublished:
                self._unpublished.add(key)
                if key not in self._mine:  # its decider may have died before publishing
                    self._schedule(time.time() + self.republish_after, key)

    def _remember(self, key: str, record: ProposalRecord) -> None:
        ids = self._recorded.setdefault(key, set())
        if record.published:
            self._recorded_ids -= ids
            del self._recorded[key]
            return
        ids.add(record.message_id)
        ids.update(b.message_id for b in record.votes if b.message_id)
        self._recorded_ids |= ids

    def _schedule(self, when: float, key: str) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), key))
        self._wake.set()

    async def _timer_loop(self) -> None:
        assert self._tg is not None
        while True:
            current = time.time()
            while self._timers and self._timers[0][0] <= current:
                _, _, key = heapq.heappop(self._timers)
                if key in self._open or key in self._unpublished:
                    self._tg.start_soon(self._settle, key, None, None)
            delay = self._timers[0][0] - current if self._timers else math.inf
            with anyio.move_on_after(delay):
                await self._wake.wait()
            self._wake = anyio.Event()

    # --- deciding -----------------------------------------------------------------------

    async def _settle(self, key: str, record: ProposalRecord | None, revision: int | None) -> None:
        """Decide ``key`` if its votes (or its deadline) allow; publish a pending decision."""
        kv = self._kv
        assert kv is not None
        async with self._limiter:
            try:
                await self._settle_once(kv, key, record, revision)
            except (SwarmbusError, nats.errors.Error) as exc:
                log.warning("consensus: settling %s failed (%s); will retry", key, exc)
                self._schedule(time.time() + self.republish_after, key)

    async def _settle_once(
        self, kv: KeyValue, key: str, record: ProposalRecord | None, revision: int | None
    ) -> None:
        while True:
            if record is None or revision is None:
                try:
                    entry = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    return
                record, revision = _loaded(entry)
            if record.decision is not None:
                if not record.published:
                    await self._publish(kv, key, record, revision)
                return
            at = now()
            decision = decision_of(record, closed=at >= record.deadline, at=at)
            if decision is None:
                return
            decided = msgspec.structs.replace(record, decision=decision)
            try:
                revision = await kv_write(
                    kv, key, _encoder.encode(decided), last=revision, attributes=_attrs(record)
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                record = revision = None  # a vote or another replica got in first
                continue
            self.decided += 1
            self._mine.add(key)
            await self._publish(kv, key, decided, revision)
            return

    async def _publish(self, kv: KeyValue, key: str, record: ProposalRecord, revision: int) -> None:
        assert record.decision is not None
        attrs = {**_attrs(record), "swarmbus.agent": self.agent}
        subject = subjects.kv_subject(self.bucket, key)
        with process_span(
            subject, record.message_id, attrs, record.trace, links=record.vote_traces
        ):
            await self.bus.publish(
                record.decision,
                agent=self.agent,
                session=record.session,
                id=decision_message_id(record.proposal_id),
            )
            if self.board_bucket is not None:
                board = await Blackboard.open(self.bus, record.session, bucket=self.board_bucket)
                await record_on_board(board, record, agent=self.agent)
            if record.proposal.action == APPROVE_TASK:
                await apply_to_task(self.bus, record, agent=self.agent)
            done = msgspec.structs.replace(record, published=True)
            data = _encoder.encode(done)
            try:
                await kv_write(kv, key, data, last=revision, attributes=attrs, ttl=self.retention)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # another replica marked it first
            except nats.js.errors.APIError as exc:
                if getattr(exc, "err_code", None) != _TTL_DISABLED:
                    raise
                # A bucket made by another tool, without per-message TTLs: keep it.
                log.warning("bucket %s refuses TTLs: decisions are kept", self.bucket)
                with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                    await kv_write(kv, key, data, last=revision, attributes=attrs)

    # --- ingesting wire events ------------------------------------------------------------

    async def _consume(self, durable: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        await self.bus.consume(
            durable,
            [
                subjects.event_filter("action", "proposed", self.session),
                subjects.event_filter("action", "voted", self.session),
            ],
            self._ingest,
            receiver=self.agent,
            limiter=anyio.Semaphore(32),
            stop=self._stop,
            task_status=task_status,
        )

    async def _ingest(self, message: Message) -> None:
        kv = self._kv
        assert kv is not None
        source = message.source
        if message.id in self._recorded_ids:
            return
        if isinstance(message, ProposalMessage):
            await _record_proposal(
                kv,
                message.proposal,
                agent=source.agent,
                session=source.session,
                message_id=message.id,
                at=message.timestamp,
            )
        elif isinstance(message, VoteMessage):
            for attempt in range(3):
                try:
                    await _record_vote(
                        kv, message.vote, agent=source.agent, message_id=message.id, at=now()
                    )
                    return
                except NotFoundError:
                    if attempt == 2:
                        raise
                    await anyio.sleep(0.2)  # its proposal event may be in a parallel handler
