"""Bad input: a message that breaks the contract is dead-lettered and reported, never handled."""

import os
import secrets

import anyio
import nats

import swarmbus
from swarmbus import Agent, ErrorOccurredMessage, FindingMessage

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
SESSION = f"INC-1234-{secrets.token_hex(3)}"

lead = Agent("security/incident-response-lead")
auditor = Agent("ops/auditor")
reported = anyio.Event()


@lead.on_finding(session=SESSION)
async def on_finding(message: FindingMessage) -> None:
    raise AssertionError("a bad message never reaches a handler")


@auditor.on_event("error", "occurred", types=[ErrorOccurredMessage], session=SESSION)
async def on_error(message: ErrorOccurredMessage) -> None:
    error = message.error_occurred
    print("error.occurred from", message.source.agent, ":", error.code, "-", error.reason)
    print("dead-lettered:", error.dead_letter, "original subject:", error.subject)
    reported.set()


async def main() -> None:
    async with swarmbus.connect(url=NATS_URL) as bus, lead.serve(bus), auditor.serve(bus):
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        await js.publish(f"agent.finding.reported.{SESSION}.ext/broken", b"{not json")
        with anyio.fail_after(10):
            await reported.wait()
        # The original bytes, kept in SWARMBUS_DEAD on swarmbus.dead.<session>.<receiver>.
        dead = await js.get_last_msg("SWARMBUS_DEAD", f"swarmbus.dead.{SESSION}.{lead.id}")
        print("kept:", dead.data, dead.headers["Swarmbus-Code"])
        await nc.close()


anyio.run(main)
