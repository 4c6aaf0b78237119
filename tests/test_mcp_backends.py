"""The seed's MCP block verbatim: two ``mcp-agent-swarm`` processes that share only a store.

Each server gets ``SWARM_BACKEND=redis``, ``REDIS_URL`` and its own ``AGENT_ID`` (or
``postgres`` and ``DATABASE_URL``) and no ``NATS_URL``: each embeds its own nats-server,
so everything the two agents share (sessions, findings, tasks and claims, proposals and
votes, the events ``swarm_wait`` wakes on) goes through the store. Driven by the
official MCP Python SDK client over stdio.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests._stores import store_env
from tests.test_mcp_agents import BIN, ROOT, PythonAgent, _incident

pytestmark = pytest.mark.parametrize("backend", ["redis", "postgres"])


#: The seed's MCP block (tests/fixtures/seed/mcp_servers.json), as an MCP client reads it.
SEED_BLOCK = json.loads((ROOT / "tests" / "fixtures" / "seed" / "mcp_servers.json").read_text())[
    "mcpServers"
]["agent-swarm"]


def seed_env(store: dict[str, str], agent_id: str) -> dict[str, str]:
    """The seed's block with its ``${...}`` expanded, as an MCP client does (for postgres:
    the same block with ``SWARM_BACKEND=postgres`` and ``DATABASE_URL``), and nothing
    else of swarmbus's."""
    env = dict(SEED_BLOCK["env"])
    if store["SWARM_BACKEND"] == "postgres":
        del env["REDIS_URL"]
        env |= {"SWARM_BACKEND": "postgres", "DATABASE_URL": "${DATABASE_URL}"}
    values = {f"${{{name}}}": value for name, value in {**store, "AGENT_ID": agent_id}.items()}
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SWARMBUS_", "NATS_", "SWARM_", "REDIS_", "DATABASE_", "AGENT_"))
    }
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    expanded = {k: values.get(v, v) for k, v in env.items()}
    return {**keep, **expanded, "PATH": path, "PYTHONPATH": str(ROOT)}


@contextlib.asynccontextmanager
async def seed_agent(store: dict[str, str], agent_id: str) -> AsyncIterator[PythonAgent]:
    env = seed_env(store, agent_id)
    assert {k for k in env if k.startswith(("SWARM", "REDIS", "DATABASE", "NATS"))} == (
        {"SWARM_BACKEND", "REDIS_URL" if store["SWARM_BACKEND"] == "redis" else "DATABASE_URL"}
    )
    params = StdioServerParameters(command=SEED_BLOCK["command"], env=env)
    async with Client(params, read_timeout_seconds=60) as client:
        yield PythonAgent(client)


async def test_two_agents_sharing_only_the_store_work_an_incident(
    request: pytest.FixtureRequest, backend: str, session_id: str, unique: str
) -> None:
    store = store_env(request, backend)
    lead, helper = f"ops/lead-{unique}", f"ops/helper-{unique}"
    async with seed_agent(store, lead) as first, seed_agent(store, helper) as second:
        # sessions, findings (and the wait they wake), a claim, votes and the decision
        decision = await _incident(first, second, lead=lead, helper=helper, session_id=session_id)
        assert (decision["outcome"], decision["votes_for"], decision["closed_by"]) == (
            "approved",
            2,
            "early",
        )
        found = await second.call("swarm_get_findings", session_id=session_id)
        assert [f["agent"] for f in found["items"]] == [lead]
        cursor = (await second.call("swarm_wait", timeout_seconds=0))["cursor"]
        await first.call(
            "swarm_report_hypothesis", session_id=session_id, description="pool", confidence=0.7
        )
        gated = await first.call(
            "swarm_create_task", session_id=session_id, type="rollback", requires_approval=True
        )
        kinds: list[str] = []
        with anyio.fail_after(30):
            while not {"hypothesis.proposed", "task.created"} <= set(kinds):
                news = await second.call("swarm_wait", cursor=cursor, timeout_seconds=10)
                cursor, kinds = news["cursor"], kinds + [e["kind"] for e in news["events"]]
        # The approval vote of the gated task, decided by both: then it is claimable.
        approval = gated["approval_proposal_id"]
        await first.call("swarm_vote", proposal_id=approval, vote="yes")
        await second.call("swarm_vote", proposal_id=approval, vote="yes")
        got = await second.call("swarm_claim_task", session_id=session_id, types=["rollback"])
        assert got["claimed"] is True
        assert got["task"]["approval"] == "approved"

        # A lock taken by one is refused to the other until released.
        held = await first.call("swarm_acquire_lock", resource="host:db-1")
        assert held["acquired"] is True
        refused = await second.call("swarm_acquire_lock", resource="host:db-1")
        assert (refused["acquired"], refused["holder"]) == (False, lead)  # read from the store
        await first.call("swarm_release_lock", resource="host:db-1")
        taken = await second.call("swarm_acquire_lock", resource="host:db-1", wait_seconds=5)
        assert taken["acquired"] is True
        assert taken["token"] > held["token"]

        # Both claim at once from the same backlog: every task once, never both.
        for _ in range(6):
            await first.call("swarm_create_task", session_id=session_id, type="analyze")
        claimed: dict[str, list[str]] = {lead: [], helper: []}

        async def claim_all(agent: PythonAgent, agent_id: str) -> None:
            while True:
                got = await agent.call("swarm_claim_task", session_id=session_id, types=["analyze"])
                if not got["claimed"]:
                    return
                claimed[agent_id].append(got["task"]["id"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(claim_all, first, lead)
            tg.start_soon(claim_all, second, helper)
        assert not set(claimed[lead]) & set(claimed[helper])
        assert len(claimed[lead]) + len(claimed[helper]) == 6
        listed = await first.call("swarm_list_tasks", session_id=session_id, status="assigned")
        holders = {t["id"]: t["assigned_to"] for t in listed["items"] if t["type"] == "analyze"}
        assert holders == {t: a for a, ids in claimed.items() for t in ids}

        # A claim with a wait is woken by the other's new task.
        async with anyio.create_task_group() as tg:
            got: dict[str, object] = {}

            async def wait_for_work() -> None:
                got.update(
                    await second.call(
                        "swarm_claim_task", session_id=session_id, types=["fix"], wait_seconds=20
                    )
                )

            tg.start_soon(wait_for_work)
            await anyio.wait_all_tasks_blocked()
            task = await first.call("swarm_create_task", session_id=session_id, type="fix")
        assert got["claimed"] is True
        assert got["task"]["id"] == task["id"]  # type: ignore[index]
