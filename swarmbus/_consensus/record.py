"""The proposal record: one KV value holding a proposal, its votes and its decision."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

import msgspec

from swarmbus import _subjects as subjects
from swarmbus._consensus.tally import Tally, tally_outcome
from swarmbus._decode import MAX_STORED_BYTES, decode_json
from swarmbus._errors import InvalidMessageError, SwarmbusError
from swarmbus._messages import (
    AgentId,
    Ballot,
    Decision,
    MessageId,
    Proposal,
    SessionId,
    Timestamp,
)

__all__ = [
    "CONSENSUS_BUCKET",
    "MEMBER_PREFIX",
    "PROPOSAL_PREFIX",
    "ProposalRecord",
    "decision_message_id",
    "decision_of",
    "decode_record",
    "encode_record",
    "member_key",
    "proposal_key",
]

CONSENSUS_BUCKET: Final = "SWARMBUS_CONSENSUS"
PROPOSAL_PREFIX: Final = "p."
MEMBER_PREFIX: Final = "m."


class ProposalRecord(msgspec.Struct, kw_only=True, frozen=True):
    """A proposal as stored: the source of truth for its votes and decision.

    ``publisher`` is the agent that won the compare-and-set which recorded the
    decision (or, if that one never marked it ``published``, the one that took the
    publishing over by another compare-and-set at ``publish_claimed_at``): only it
    publishes the ``decided`` event. ``effects_pending``: the decision is not yet
    applied to the blackboard and the task it approves (idempotent steps, done before
    the event; cleared with ``published``). ``electorate_from_members``: the proposal
    named no voters, so its electorate is the session's members when it was recorded.
    """

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
    publisher: str = ""
    publish_claimed_at: Timestamp | None = None
    effects_pending: bool = False
    #: The electorate is the session's members (the proposal named no voters).
    electorate_from_members: bool = False

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


def encode_record(record: ProposalRecord) -> bytes:
    """The record as stored."""
    return _encoder.encode(record)


def decode_record(key: str, data: bytes) -> ProposalRecord:
    """A stored record (``SwarmbusError`` naming ``key`` if it is not one)."""
    try:
        record = decode_json(_decoder, data, what=f"KV entry {key}", max_bytes=MAX_STORED_BYTES)
    except InvalidMessageError as exc:  # written by something else
        raise SwarmbusError(f"KV entry {key} is not a proposal record: {exc}") from None
    if record.proposal.quorum == "threshold" and record.proposal.threshold is None:
        raise SwarmbusError(f"KV entry {key} is a threshold proposal without a threshold")
    return record


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


def deadline_of(proposal: Proposal, at: datetime) -> datetime:
    """When voting on ``proposal`` recorded ``at`` closes."""
    try:
        return at + timedelta(seconds=proposal.timeout)
    except OverflowError:
        raise InvalidMessageError(
            "schema", f"timeout {proposal.timeout:g}s ends past the calendar"
        ) from None


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


def attributes_of(record: ProposalRecord) -> dict[str, str]:
    """Span attributes of writes about ``record``."""
    return {"swarmbus.session": record.session, "swarmbus.proposal_id": record.proposal_id}
