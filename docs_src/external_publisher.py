"""A service outside swarmbus takes part with nothing but NATS and JSON (CONTRACT.md).

The publisher below uses plain nats-py; the swarmbus side (an agent and the board's
recorder) only checks that the finding arrived.
"""

import json
import os
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import anyio
import nats

import swarmbus
from swarmbus import Agent, Blackboard, FindingMessage

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
SESSION = f"INC-1234-{secrets.token_hex(3)}"
PUBLISHER = "ext/prometheus-bridge"


async def publish_finding() -> str:
    """The external publisher: one envelope on the contract's subject, by plain nats-py."""
    nc = await nats.connect(NATS_URL)
    message_id = str(uuid.uuid4())
    envelope = {
        "id": message_id,
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"agent": PUBLISHER, "session": SESSION},
        "type": "finding",
        "finding": {
            "category": "observation",
            "content": "error rate 5x baseline",
            "confidence": 0.9,
            "evidence": [{"source": "prometheus", "query": "rate(errors[5m])", "result": "0.05"}],
        },
    }
    await nc.jetstream().publish(
        f"agent.finding.reported.{SESSION}.{PUBLISHER}",  # <session>.<publishing agent>
        json.dumps(envelope).encode(),
        headers={"Nats-Msg-Id": message_id},  # JetStream de-duplication
    )
    await nc.close()
    return message_id


lead = Agent("security/incident-response-lead")
received = anyio.Event()


@lead.on_finding(session=SESSION)
async def on_finding(message: FindingMessage) -> None:
    print("agent got:", message.source.agent, message.finding.content)
    received.set()


async def main() -> None:
    async with (
        swarmbus.connect(url=NATS_URL) as bus,  # provisions the event stream
        lead.serve(bus),
        Blackboard.recording(bus, retention=timedelta(days=7)),  # findings -> the board
    ):
        message_id = await publish_finding()
        with anyio.fail_after(10):
            await received.wait()
            board = await Blackboard.open(bus, SESSION)
            async for item in board.watch():  # the snapshot, then each change
                findings = item.findings if isinstance(item, swarmbus.Snapshot) else ()
                if any(f.id == message_id for f in findings):
                    break
                if isinstance(item, swarmbus.BoardChange) and item.item_id == message_id:
                    break
        print("on the board:", message_id)


anyio.run(main)
