"""Consensus: proposals put to a vote, tallied against a quorum, decided exactly once.

Everything about a proposal lives in ONE record in a ``StateStore`` (bucket
``SWARMBUS_CONSENSUS``, key ``p.<safe_token(proposal_id)>``): the proposal, its
electorate, every vote and, once closed, the decision. Every change is a
compare-and-set on that record, so:

- a vote and the decision cannot interleave: a vote that loses against the decision
  re-reads the record and fails with ``ProposalClosedError``;
- any participant may settle a proposal (the client whose vote makes the outcome
  certain, a client or MCP server at the deadline, ``ConsensusService`` replicas);
  exactly one compare-and-set records the decision, and only its winner publishes
  ``agent.action.decided`` (under a ``Nats-Msg-Id`` fixed per proposal). A winner
  that dies before marking the record published is replaced, after
  ``republish_after``, by whoever wins another compare-and-set (``decider``);
- the decision is reproducible: ``tally()`` of the recorded ``votes`` gives it again;
- a proposal is recorded whole or refused up front: its size is capped at half the
  smaller value limit of the record and the board entry
  (``ProposalBook.max_proposal_bytes``), and a vote is refused if the record it makes
  could no longer hold its decision.

Voting rules (pure functions in ``tally``: ``final_outcome``, ``early_outcome``,
``tally_outcome``):

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

What goes where: ``tally`` (the rules), ``record`` (the stored record and its keys),
``book`` (reading and compare-and-set writing records), ``decider`` (settling,
publishing once, applying to the board and tasks), ``client`` (``Consensus``),
``service`` (``ConsensusService``).
"""

from swarmbus._consensus.book import ProposalBook
from swarmbus._consensus.client import (
    DEFAULT_RETENTION,
    SERVICE_AGENT,
    Consensus,
    open_store,
)
from swarmbus._consensus.decider import (
    APPROVE_TASK,
    Deadlines,
    Decider,
    apply_to_task,
    record_on_board,
)
from swarmbus._consensus.record import (
    CONSENSUS_BUCKET,
    MEMBER_PREFIX,
    PROPOSAL_PREFIX,
    ProposalRecord,
    decision_message_id,
    decision_of,
    member_key,
    proposal_key,
)
from swarmbus._consensus.service import MAX_RETENTION, MIN_RETENTION, ConsensusService
from swarmbus._consensus.tally import (
    Outcome,
    Quorum,
    Tally,
    early_outcome,
    final_outcome,
    tally_outcome,
)

__all__ = [
    "APPROVE_TASK",
    "CONSENSUS_BUCKET",
    "DEFAULT_RETENTION",
    "MAX_RETENTION",
    "MEMBER_PREFIX",
    "MIN_RETENTION",
    "PROPOSAL_PREFIX",
    "SERVICE_AGENT",
    "Consensus",
    "ConsensusService",
    "Deadlines",
    "Decider",
    "Outcome",
    "ProposalBook",
    "ProposalRecord",
    "Quorum",
    "Tally",
    "apply_to_task",
    "decision_message_id",
    "decision_of",
    "early_outcome",
    "final_outcome",
    "member_key",
    "open_store",
    "proposal_key",
    "record_on_board",
    "tally_outcome",
]
