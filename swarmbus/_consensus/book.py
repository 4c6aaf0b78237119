"""Proposal records and session membership on a ``StateStore`` (the consensus bucket).

Every change to a record is a compare-and-set on its revision; this module knows the
record's rules (who may vote, what fits) and nothing about publishing.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Final

import msgspec

from swarmbus import _subjects as subjects
from swarmbus._consensus.record import (
    MEMBER_PREFIX,
    ProposalRecord,
    deadline_of,
    decode_record,
    encode_record,
    member_key,
    proposal_key,
)
from swarmbus._errors import (
    AlreadyVotedError,
    ConflictError,
    InvalidMessageError,
    MessageTooLargeError,
    NotEligibleError,
    NotFoundError,
    ProposalClosedError,
    PublishError,
)
from swarmbus._messages import Ballot, Decision, Proposal, Vote, validate_body
from swarmbus._state import StateStore
from swarmbus._telemetry import trace_headers

__all__ = ["DECISION_SLACK", "ProposalBook", "ballot_of_vote", "decided", "vote_recorded"]

log = logging.getLogger("swarmbus.consensus")

#: Bytes a decision adds to a record besides the copy of its votes.
DECISION_SLACK: Final = 1024
#: JetStream: "per-message TTL is disabled" on the stream (a bucket made by another tool).
_TTL_DISABLED: Final = 10166


class ProposalBook:
    """The proposal records and memberships of one consensus bucket.

    ``max_proposal_bytes``: the largest proposal (its JSON, voters aside) recorded: half
    of the smaller value limit of the record and of the blackboard entry it also
    becomes (``board_limit``), so that the entry, the event and the record with its
    votes and decision still fit. A proposal is either recorded whole (record, board
    entry, decision) or refused up front.
    """

    def __init__(self, store: StateStore, *, board_limit: int | None = None) -> None:
        self.store = store
        limit = min(store.max_value_bytes, board_limit or store.max_value_bytes)
        self.max_proposal_bytes = limit // 2

    # --- reading ---

    async def read(self, proposal_id: str) -> tuple[ProposalRecord, int]:
        """The record of ``proposal_id`` and its revision (``NotFoundError`` if none)."""
        loaded = await self.load(proposal_key(proposal_id))
        if loaded is None:
            raise NotFoundError("proposal", proposal_id)
        return loaded

    async def load(self, key: str) -> tuple[ProposalRecord, int] | None:
        """The record under ``key``, or None; a miss is checked on the leader (a
        replica may not have caught up with a proposal recorded a moment ago)."""
        entry = await self.store.get(key) or await self.store.get(key, fresh=True)
        if entry is None or not entry.value:
            return None
        return decode_record(key, entry.value), entry.revision

    async def members(self, session: str) -> list[str]:
        """Agents that joined ``session``, sorted."""
        prefix = f"{MEMBER_PREFIX}{subjects.validate_session_id(session)}."
        return sorted(e.key[len(prefix) :] for e in await self.store.list(prefix))

    async def join(self, session: str, agent: str) -> None:
        """Make ``agent`` a member of ``session``."""
        await self.store.put(member_key(session, agent), agent.encode())

    # --- writing ---

    async def write(self, record: ProposalRecord, revision: int, *, ttl: int | None = None) -> int:
        """Compare-and-set ``record`` on ``revision`` (``ConflictError`` if it moved)."""
        key = proposal_key(record.proposal_id)
        data = encode_record(record)
        self._check_size(len(data))
        try:
            return await self.store.update(key, data, revision=revision, ttl=ttl)
        except PublishError as exc:
            if ttl is None or getattr(exc.__cause__, "err_code", None) != _TTL_DISABLED:
                raise
        # A bucket made by another tool, without per-message TTLs: keep the record.
        log.warning("bucket %s refuses TTLs: decisions are kept", self.store.name)
        return await self.store.update(key, data, revision=revision)

    def _check_size(self, size: int) -> None:
        if size > self.store.max_value_bytes:
            raise MessageTooLargeError(size, self.store.max_value_bytes)

    def check_fits(self, record: ProposalRecord) -> None:
        """Refuse a record whose decided form (votes copied into the decision) would
        not fit: it must be decidable once recorded."""
        votes = msgspec.json.encode(record.votes)
        self._check_size(len(encode_record(record)) + len(votes) + DECISION_SLACK)

    async def new_record(
        self, proposal: Proposal, *, agent: str, session: str, message_id: str, at: datetime
    ) -> ProposalRecord:
        """The record a valid ``proposal`` opens (its electorate: the voters, or the members)."""
        validate_body(proposal)
        if proposal.quorum == "threshold" and proposal.threshold is None:
            raise InvalidMessageError("schema", "a threshold quorum needs a threshold")
        size = len(msgspec.json.encode(msgspec.structs.replace(proposal, voters=[])))
        if size > self.max_proposal_bytes:
            raise _too_large(size, self.max_proposal_bytes)
        electorate = sorted(set(proposal.voters)) or await self.members(session)
        if not electorate:
            raise InvalidMessageError(
                "no_voters",
                f"proposal {proposal.proposal_id!r} names no voters and {session} has none",
            )
        record = ProposalRecord(
            proposal=msgspec.structs.replace(proposal, voters=electorate),
            session=session,
            proposer=agent,
            message_id=message_id,
            created_at=at,
            deadline=deadline_of(proposal, at),
            electorate=electorate,
            trace=trace_headers(),
            electorate_from_members=not proposal.voters,
        )
        self.check_fits(record)
        return record

    async def record_proposal(
        self, proposal: Proposal, *, agent: str, session: str, message_id: str, at: datetime
    ) -> ProposalRecord:
        """Record a new proposal (idempotent for the same ``message_id``)."""
        record = await self.new_record(
            proposal, agent=agent, session=session, message_id=message_id, at=at
        )
        key = proposal_key(proposal.proposal_id)
        try:
            await self.store.create(key, encode_record(record))
        except ConflictError:
            existing, _ = await self.read(proposal.proposal_id)
            if existing.message_id == message_id:
                return existing
            raise ConflictError(key, 0, f"proposal {proposal.proposal_id!r} exists") from None
        return record

    async def record_vote(
        self, vote: Vote, *, agent: str, message_id: str, at: datetime
    ) -> tuple[ProposalRecord, int]:
        """Add ``agent``'s vote to its proposal's record; the record and its revision."""
        validate_body(vote)
        subjects.validate_agent_id(agent)
        while True:
            record, revision = await self.read(vote.proposal_id)
            if vote_recorded(record, agent, message_id, at=at):
                return record, revision  # this very vote is recorded (a re-delivered event)
            updated = msgspec.structs.replace(
                record,
                votes=[*record.votes, ballot_of_vote(vote, agent, message_id, at)],
                vote_traces=[*record.vote_traces, trace_headers()],
            )
            self.check_fits(updated)
            try:
                revision = await self.write(updated, revision)
            except ConflictError:
                continue  # another vote or the decision got in first: re-read
            return updated, revision


def ballot_of_vote(vote: Vote, agent: str, message_id: str, at: datetime) -> Ballot:
    """``agent``'s ``vote`` as the proposal record stores it."""
    return Ballot(
        voter=agent,
        vote=vote.vote,
        confidence=vote.confidence,
        reason=vote.reason,
        cast_at=at,
        message_id=message_id,
    )


def vote_recorded(record: ProposalRecord, agent: str, message_id: str, *, at: datetime) -> bool:
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


def _too_large(size: int, limit: int) -> MessageTooLargeError:
    error = MessageTooLargeError(size, limit)
    error.reason = (
        f"the proposal is {size} bytes, the limit is {limit} bytes (action, target and "
        "parameters together): shorten it, e.g. refer to a blackboard finding instead of "
        "copying data into the parameters"
    )
    error.args = (f"too_large: {error.reason}",)
    return error


def decided(record: ProposalRecord, decision: Decision, publisher: str) -> ProposalRecord:
    """``record`` closed with ``decision``, to be published by ``publisher``."""
    return msgspec.structs.replace(
        record, decision=decision, publisher=publisher, effects_pending=True
    )
