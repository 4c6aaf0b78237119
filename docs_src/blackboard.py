"""The blackboard: a session's shared context, findings, hypotheses and actions."""

import secrets

import anyio

import swarmbus
from swarmbus import Blackboard, BoardChange, Finding, Snapshot

SESSION = f"INC-1234-{secrets.token_hex(3)}"  # a fresh session each run


async def main() -> None:
    async with swarmbus.connect() as bus:
        board = await Blackboard.open(bus, SESSION)
        await board.start("security/incident-response-lead", {"task": "investigate the incident"})
        await board.append_finding(
            Finding(
                category="observation", content="deployment v1.2.3 at 10:15 UTC", confidence=0.9
            ),
            agent="ops/deploy-validator",
        )
        h = await board.propose_hypothesis(
            "database connection pool exhaustion", 0.7, agent="ops/dba"
        )
        await board.update_confidence(h.id, 0.8, agent="ops/sre", reason="pool at 100%")
        a = await board.record_action("recommended rollback", agent="ops/rollback-advisor")
        await board.set_action_status(a.id, "approved", agent="consensus")
        await board.update_context(lambda ctx: {**ctx, "phase": "mitigate"}, agent="ops/sre")

        snapshot = await board.snapshot()  # {context, findings, hypotheses, actions_taken}
        print(snapshot.to_yaml())

        with anyio.fail_after(10):
            async for item in board.watch():  # the Snapshot, then every BoardChange
                if isinstance(item, Snapshot):
                    print("watching from revision", item.revision)
                    await board.complete(
                        {"decision": "rollback"}, agent="security/incident-response-lead"
                    )
                elif isinstance(item, BoardChange):
                    print("change:", item.kind, item.operation)
                    break


anyio.run(main)
