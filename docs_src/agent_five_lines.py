import anyio

import swarmbus
from swarmbus import Agent, Finding, FindingMessage, RequestMessage

validator = Agent("ops/deploy-validator", expertise={"deployment": 0.9})


@validator.on_request("check_deployment")
async def check(request: RequestMessage) -> dict:
    return {"version": "v1.2.3", "healthy": False}


lead = Agent("security/incident-response-lead")
answered = anyio.Event()


@lead.on_finding(session="INC-1234")
async def on_finding(message: FindingMessage) -> None:
    answer = await lead.request("check_deployment", {"service": "checkout"}, session="INC-1234")
    print(message.finding.content, answer.response.result)
    answered.set()


async def main() -> None:
    # NATS_URL, or an embedded server
    async with swarmbus.connect() as bus, validator.serve(bus), lead.serve(bus):
        await validator.publish(
            Finding(category="observation", content="error rate 5x", confidence=0.9),
            session="INC-1234",
        )
        await answered.wait()


anyio.run(main)
