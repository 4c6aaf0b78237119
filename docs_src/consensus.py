"""Consensus: propose an action, vote, and wait for the service's decision."""

import secrets

import anyio

import swarmbus
from swarmbus import AlreadyVotedError, Consensus, ConsensusService, Proposal, Vote

SESSION = f"INC-1234-{secrets.token_hex(3)}"
PROPOSAL = f"rollback-v1.2.3-{secrets.token_hex(3)}"
VOTERS = ["ops/deploy-validator", "ops/rollback-advisor", "security/incident-response-lead"]


async def main() -> None:
    async with swarmbus.connect() as bus, ConsensusService(bus):  # or: swarmbus consensus
        consensus = await Consensus.open(bus)
        await consensus.propose(
            Proposal(
                proposal_id=PROPOSAL,
                action="rollback",
                parameters={"version": "v1.2.3"},
                quorum="majority",
                timeout=300,
                voters=VOTERS,
            ),
            agent="ops/rollback-advisor",
            session=SESSION,
        )
        await consensus.vote(
            Vote(proposal_id=PROPOSAL, vote="yes", confidence=0.9, reason="Error rate 5x baseline"),
            agent="ops/deploy-validator",
        )
        try:
            await consensus.vote(
                Vote(proposal_id=PROPOSAL, vote="no"), agent="ops/deploy-validator"
            )
        except AlreadyVotedError:
            print("votes are final")
        await consensus.vote(
            Vote(proposal_id=PROPOSAL, vote="yes", confidence=0.8, reason="rollback is cheap"),
            agent="ops/rollback-advisor",
        )
        # 2 of 3 voted yes: no third vote can change a majority, so it closes early.
        decision = await consensus.wait_for_decision(PROPOSAL, timeout=300)
        print(decision.outcome, decision.decision, decision.closed_by)
        print("for", decision.votes_for, "against", decision.votes_against)


anyio.run(main)
