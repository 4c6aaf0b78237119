"""A local 3-node JetStream cluster (the fault-test fixture) runs swarmbus with R3."""

from __future__ import annotations

import anyio
import pytest

from swarmbus import Agent, Bus, Finding, FindingMessage, NatsCluster


@pytest.mark.fault
async def test_swarmbus_runs_replicated_on_a_cluster_and_survives_a_node_kill(
    nats_cluster: NatsCluster, session_id: str
) -> None:
    got: list[str] = []
    events = {"one": anyio.Event(), "two": anyio.Event()}
    agent = Agent("test/clustered")

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        got.append(message.finding.content)
        events[message.finding.content].set()

    url = ",".join(nats_cluster.urls)
    async with Bus.open(url=url, replicas=3) as bus, agent.serve(bus):
        info = await bus.js.stream_info("SWARMBUS_EVENTS")
        assert info.config.num_replicas == 3
        await bus.publish(
            Finding(category="observation", content="one", confidence=0.5),
            agent="test/publisher",
            session=session_id,
        )
        with anyio.fail_after(10):
            await events["one"].wait()
        # Kill a node this client is not connected to: the R3 stream keeps quorum.
        connected = bus.nc.connected_url.port if bus.nc.connected_url else None
        victim = next(n for n in nats_cluster.nodes if n.port != connected)
        victim.kill()
        with anyio.fail_after(30):
            while True:
                try:
                    await bus.publish(
                        Finding(category="observation", content="two", confidence=0.5),
                        agent="test/publisher",
                        session=session_id,
                        id=f"two-{session_id}",
                    )
                    break
                except Exception:  # noqa: BLE001 - leader election in progress; retry same id
                    await anyio.sleep(0.2)
            await events["two"].wait()
    assert got == ["one", "two"]
