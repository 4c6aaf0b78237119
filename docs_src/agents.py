"""Agents: event handlers, request handlers, errors, and serving until a stop."""

import secrets

import anyio

import swarmbus
from swarmbus import Agent, Finding, FindingMessage, NoResponderError, RequestMessage

SESSION = f"INC-{secrets.token_hex(3)}"  # a fresh session each run
seen = anyio.Event()

analyst = Agent("ops/log-analyst", expertise={"logs": 0.8}, max_concurrency=4)


@analyst.on_event("finding", "reported", types=[FindingMessage], session=SESSION)
async def on_finding(message: FindingMessage) -> None:
    # At-least-once, and a durable consumer resumes where the agent stopped: make
    # handlers idempotent, e.g. by envelope id (message.id).
    if message.source.session == SESSION:
        print("finding from", message.source.agent, ":", message.finding.content)
        seen.set()


@analyst.on_request("grep_logs")
async def grep_logs(request: RequestMessage) -> dict[str, int]:
    if "service" not in request.request.parameters:
        raise ValueError("which service?")  # the requester gets a failure response
    return {"matches": 42}


async def main() -> None:
    # serve() until the block ends; or: await swarmbus.run(analyst, bus=bus) (until a signal)
    async with swarmbus.connect() as bus, analyst.serve(bus):
        reporter = "ops/prometheus-bridge"
        answer = await bus.request(
            "grep_logs", {"service": "checkout"}, agent=reporter, session=SESSION
        )
        print("grep_logs:", answer.response.status, answer.response.result)
        failed = await bus.request("grep_logs", {}, agent=reporter, session=SESSION)
        print("grep_logs without a service:", failed.response.status)
        try:
            await bus.request("no_such_capability", agent=reporter, session=SESSION)
        except NoResponderError as exc:
            print("no responder:", exc)
        finding = Finding(category="observation", content="error rate 5x", confidence=0.9)
        await bus.publish(finding, agent=reporter, session=SESSION)
        with anyio.fail_after(10):
            await seen.wait()
    # Leaving serve() stopped taking messages and let in-flight handlers finish.


anyio.run(main)
