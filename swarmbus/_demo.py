"""A small end-to-end example: two agents exchange typed messages on an embedded server.

Replaced by the full INC-1234 incident demo once the swarm behaviours land.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import anyio

from swarmbus._agent import Agent
from swarmbus._bus import connect
from swarmbus._messages import Evidence, Finding, FindingMessage, RequestMessage

SESSION = "INC-1234"


def _say(start: float, who: str, what: str) -> None:
    print(f"  +{time.monotonic() - start:6.3f}s  {who:<34} {what}", flush=True)


async def run_demo(data_dir: str | None = None) -> int:
    """Run the example; returns the process exit code."""
    start = time.monotonic()
    validator = Agent("ops/deploy-validator", expertise={"deployment": 0.9})
    responder = Agent("security/incident-response-lead", expertise={"security": 0.8})
    done = anyio.Event()
    outcome: dict[str, Any] = {}

    @validator.on_request("check_deployment")
    async def check_deployment(request: RequestMessage) -> dict[str, Any]:
        _say(start, validator.id, f"answers check_deployment({request.request.parameters})")
        return {"version": "v1.2.3", "deployed_at": "10:15 UTC", "healthy": False}

    @responder.on_finding(session=SESSION)
    async def on_finding(message: FindingMessage) -> None:
        finding = message.finding
        _say(start, responder.id, f"got finding from {message.source.agent}: {finding.content!r}")
        response = await responder.request(
            "check_deployment", {"service": "checkout"}, session=SESSION
        )
        _say(start, responder.id, f"deployment check says {response.response.result}")
        outcome.update(response.response.result)
        done.set()

    with tempfile.TemporaryDirectory(prefix="swarmbus-demo-") as tmp:
        async with connect(data_dir=data_dir or tmp) as bus:
            _say(start, "swarmbus", f"NATS {bus.server_version} ready")
            async with validator.serve(bus), responder.serve(bus):
                await validator.publish(
                    Finding(
                        category="observation",
                        content="error rate 5x baseline since 10:15 UTC",
                        confidence=0.9,
                        evidence=[
                            Evidence(source="prometheus", query="rate(errors[5m])", result="0.05")
                        ],
                    ),
                    session=SESSION,
                )
                _say(start, validator.id, "posted a finding")
                with anyio.fail_after(10):
                    await done.wait()
    ok = outcome.get("version") == "v1.2.3"
    print(f"result: {'deployment v1.2.3 is unhealthy' if ok else 'no answer'}")
    return 0 if ok else 1
