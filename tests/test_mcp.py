"""The MCP server: the installed ``mcp-agent-swarm`` script driven by the SDK's own client."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import CallToolResult, TextContent

from swarmbus import Agent, Blackboard, Bus, Consensus, ConsensusService, FindingMessage, TaskQueue
from swarmbus._mcp import TOOL_NAMES, ConfigError, ServerConfig, Swarm, build_server

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "mcp-agent-swarm"
SEED_TOOLS = {
    "swarm_join_session",
    "swarm_post_finding",
    "swarm_get_findings",
    "swarm_claim_task",
    "swarm_complete_task",
    "swarm_propose_action",
    "swarm_vote",
}


def server_env(nats_url: str, agent_id: str) -> dict[str, str]:
    return {
        "SWARM_BACKEND": "nats",
        "NATS_URL": nats_url,
        "AGENT_ID": agent_id,
        "PYTHONPATH": str(ROOT),
    }


@contextlib.asynccontextmanager
async def mcp_agent(nats_url: str, agent_id: str) -> AsyncIterator[Client]:
    """The installed console script over stdio, as ``agent_id``."""
    params = StdioServerParameters(command=str(SCRIPT), env=server_env(nats_url, agent_id))
    async with Client(params, read_timeout_seconds=30) as client:
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; returns its structured result."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return result.structured_content


async def call_error(client: Client, tool: str, **arguments: Any) -> str:
    """Call a tool that must fail with a tool error; returns the error text."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return text_of(result)


def text_of(result: CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


@pytest.fixture
def agent_id(unique: str) -> str:
    return f"ops/claude-{unique}"


@pytest.fixture
async def board(bus: Bus, session_id: str, unique: str) -> Blackboard:
    """A started session, as a Python lead agent would start it."""
    board = await Blackboard.open(bus, session_id)
    await board.start(f"ops/lead-{unique}", {"task": "investigate incident"})
    return board


async def test_join_post_claim_complete_propose_vote_until_decided(
    bus: Bus, board: Blackboard, session_id: str, agent_id: str, unique: str, nats_url: str
) -> None:
    received: list[FindingMessage] = []
    got_finding = anyio.Event()
    listener = Agent(f"ops/py-{unique}")

    @listener.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        received.append(message)
        got_finding.set()

    consensus = await Consensus.open(bus)
    await consensus.join(session_id, listener.id)
    async with (
        TaskQueue(bus, session_id) as queue,
        ConsensusService(bus, session=session_id),
        listener.serve(bus),
        mcp_agent(nats_url, agent_id) as client,
    ):
        joined = await call(client, "swarm_join_session", session_id=session_id)
        assert joined["you"] == agent_id
        assert joined["context"] == {"task": "investigate incident"}
        assert agent_id in joined["members"]

        posted = await call(
            client,
            "swarm_post_finding",
            session_id=session_id,
            category="observation",
            content="error rate spike at 10:15 correlates with deploy v1.2.3",
            confidence=0.9,
            evidence=[{"source": "prometheus", "query": "rate(errors[5m])", "result": "0.05"}],
        )
        with anyio.fail_after(10):
            await got_finding.wait()
        (message,) = received
        assert message.id == posted["id"]
        assert message.source.agent == agent_id
        assert message.finding.confidence == 0.9
        assert message.finding.evidence[0].source == "prometheus"
        findings = await call(client, "swarm_get_findings", session_id=session_id)
        assert [f["id"] for f in findings["items"]] == [posted["id"]]

        task = await queue.create("investigate", agent=f"ops/lead-{unique}", target="api")
        claimed = await call(
            client, "swarm_claim_task", session_id=session_id, types=["investigate"]
        )
        assert claimed["claimed"] is True
        assert claimed["task"]["id"] == task.id
        done = await call(
            client,
            "swarm_complete_task",
            session_id=session_id,
            task_id=task.id,
            result={"root_cause": "connection pool exhaustion"},
        )
        assert done["record"]["status"] == "completed"
        stored = await queue.get(task.id)
        assert (stored.status, stored.assigned_to) == ("completed", agent_id)
        assert stored.result == {"root_cause": "connection pool exhaustion"}

        proposal = await call(
            client,
            "swarm_propose_action",
            session_id=session_id,
            action="rollback",
            target="api@v1.2.3",
            timeout_seconds=60,
        )
        assert set(proposal["electorate"]) == {agent_id, listener.id}
        pid = proposal["proposal_id"]
        board_view = await call(client, "swarm_get_blackboard", session_id=session_id)
        assert [a["id"] for a in board_view["actions_taken"]] == [pid]
        voted = await call(client, "swarm_vote", proposal_id=pid, vote="yes", reason="5x errors")
        assert (voted["status"], voted["your_vote"]) == ("open", "yes")
        await consensus.vote(
            _vote(pid, "yes", "matches previous incident pattern"), agent=listener.id
        )
        decided = await call(client, "swarm_get_proposal", proposal_id=pid, wait_seconds=10)
    assert decided["status"] == "decided"
    assert decided["decision"]["outcome"] == "approved"
    assert decided["decision"]["decision"] == "rollback"
    assert decided["decision"]["votes_for"] == 2


def _vote(proposal_id: str, vote: str, reason: str) -> Any:
    from swarmbus import Vote

    return Vote(proposal_id=proposal_id, vote=vote, reason=reason)  # type: ignore[arg-type]


async def test_tools_are_described_and_bad_input_is_a_tool_error_that_keeps_serving(
    board: Blackboard, session_id: str, agent_id: str, nats_url: str, unique: str
) -> None:
    async with mcp_agent(nats_url, agent_id) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == set(TOOL_NAMES)
        assert set(tools) >= SEED_TOOLS
        for tool in tools.values():
            assert tool.description
            assert tool.input_schema["type"] == "object"
            assert tool.output_schema is not None
            # Identity: the server acts as AGENT_ID; no tool takes an agent to act as.
            assert not [p for p in tool.input_schema.get("properties", {}) if "agent" in p]
        post = tools["swarm_post_finding"].input_schema
        assert set(post["required"]) == {"session_id", "category", "content", "confidence"}
        assert post["properties"]["confidence"]["maximum"] == 1.0

        error = await call_error(client, "swarm_join_session", session_id=f"nope-{unique}")
        assert "unknown session" in error
        assert "swarm_start_session" in error
        error = await call_error(
            client,
            "swarm_post_finding",
            session_id=session_id,
            category="observation",
            content="x",
            confidence=1.7,
        )
        assert "confidence" in error
        error = await call_error(
            client, "swarm_post_finding", session_id=session_id, category="observation"
        )
        assert "content" in error
        assert "missing" in error.lower()
        error = await call_error(client, "swarm_join_session", session_id="two words")
        assert "session_id" in error
        error = await call_error(client, "swarm_vote", proposal_id=f"p-{unique}", vote="yes")
        assert "not found" in error
        error = await call_error(
            client, "swarm_complete_task", session_id=session_id, task_id="t-1", result={}
        )
        assert "unknown task" in error
        assert "swarm_list_tasks" in error
        error = await call_error(
            client, "swarm_start_session", session_id=session_id, context={"x": 1}
        )
        assert "swarm_join_session" in error
        # ...and the same server still serves good calls.
        joined = await call(client, "swarm_join_session", session_id=session_id)
        assert joined["session_id"] == session_id
        posted = await call(
            client,
            "swarm_post_finding",
            session_id=session_id,
            category="conclusion",
            content="rollback fixed it",
            confidence=1.0,
        )
    findings = await board.findings()
    assert [f.id for f in findings] == [posted["id"]]
    assert findings[0].agent == agent_id


async def test_blackboard_hypotheses_and_task_lifecycle_tools(
    bus: Bus, session_id: str, agent_id: str, nats_url: str
) -> None:
    async with mcp_agent(nats_url, agent_id) as client:
        started = await call(
            client, "swarm_start_session", session_id=session_id, context={"incident": "INC-1"}
        )
        assert (started["initiator"], started["members"]) == (agent_id, [agent_id])
        sessions = await call(client, "swarm_list_sessions")
        assert session_id in [s["session_id"] for s in sessions["sessions"]]
        hypothesis = await call(
            client,
            "swarm_report_hypothesis",
            session_id=session_id,
            description="database connection pool exhaustion",
            confidence=0.7,
        )
        assessed = await call(
            client,
            "swarm_assess_hypothesis",
            session_id=session_id,
            hypothesis_id=hypothesis["id"],
            confidence=0.9,
            verdict="validated",
            reason="pool at 100%",
        )
        assert assessed["record"]["status"] == "validated"
        created = await call(
            client,
            "swarm_create_task",
            session_id=session_id,
            type="analyze",
            priority=8,
            timeout_seconds=1,
        )
        empty = await call(client, "swarm_claim_task", session_id=session_id, types=["report"])
        assert empty["claimed"] is False
        claimed = await call(client, "swarm_claim_task", session_id=session_id, types=["analyze"])
        assert claimed["task"]["id"] == created["id"]
        # The server heartbeats the claim: its lease moves on past the task's 1 s timeout.
        first_lease = datetime.fromisoformat(claimed["task"]["lease_until"])
        async with TaskQueue(bus, session_id) as queue:
            with anyio.fail_after(10):
                while True:
                    task = await queue.get(created["id"])
                    assert task.lease_until is not None
                    if task.lease_until > first_lease + timedelta(seconds=1.5):
                        break
                    await anyio.sleep(0.1)
            assert (task.status, task.assigned_to, task.attempts) == ("running", agent_id, 1)
        failed = await call(
            client,
            "swarm_fail_task",
            session_id=session_id,
            task_id=created["id"],
            error="no access to the database",
        )
        assert failed["record"]["status"] == "failed"
        tasks = await call(client, "swarm_list_tasks", session_id=session_id, status="failed")
        assert [t["id"] for t in tasks["items"]] == [created["id"]]
        snapshot = await call(client, "swarm_get_blackboard", session_id=session_id)
    assert snapshot["context"] == {"incident": "INC-1"}
    assert snapshot["hypotheses"][0]["confidence"] == 0.9
    assert snapshot["hypotheses"][0]["validated_by"] == agent_id


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT)],
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"SWARM_BACKEND": "etcd"}, "SWARM_BACKEND='etcd' is not supported"),
        ({"SWARM_BACKEND": "redis"}, "REDIS_URL is not set"),
        ({"AGENT_ID": ""}, "AGENT_ID is not set"),
        ({"AGENT_ID": "ops/bad id"}, "invalid agent id"),
        ({"NATS_URL": ""}, "NATS_URL is not set"),
        ({"SWARMBUS_REPLICAS": "seven"}, "SWARMBUS_"),
    ],
)
def test_bad_configuration_says_what_to_set(
    change: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {**server_env("nats://127.0.0.1:4222", "ops/claude"), **change}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=expected):
        ServerConfig.from_env()


def test_configuration_from_the_seed_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://10.0.0.1:4222")
    monkeypatch.setenv("AGENT_ID", "ops/claude")
    monkeypatch.delenv("SWARM_BACKEND", raising=False)  # nats is the default
    config = ServerConfig.from_env()
    assert config.agent_id == "ops/claude"
    assert config.settings.servers == ["nats://10.0.0.1:4222"]


def test_bad_configuration_is_a_startup_error_of_the_script(nats_url: str) -> None:
    result = run_script({**server_env(nats_url, "ops/claude"), "SWARM_BACKEND": "etcd"})
    assert result.returncode == 2
    assert "use nats (with NATS_URL), redis (with REDIS_URL)" in result.stderr
    assert result.stdout == ""


def test_unreachable_nats_is_a_startup_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = run_script(server_env(f"nats://127.0.0.1:{port}", "ops/claude"))
    assert result.returncode == 1
    assert "cannot connect" in result.stderr


def test_missing_sdk_gives_an_install_hint() -> None:
    code = "import sys; sys.modules['mcp'] = None; import swarmbus._mcp"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "pip install 'swarmbus[mcp]'" in result.stderr


@pytest.mark.parametrize("decide", [False, True])
async def test_streamable_http_decides_proposals_and_approves_tasks(
    nats_url: str, agent_id: str, session_id: str, decide: bool
) -> None:
    """Without --decide the server settles proposals itself; with it, a replica runs too."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **server_env(nats_url, agent_id)}
    args = [str(SCRIPT), "--transport", "streamable-http", "--port", str(port)]
    args += ["--decide"] if decide else []
    async with await anyio.open_process(args, env=env, stdin=subprocess.DEVNULL) as process:
        try:
            with anyio.fail_after(20):
                while True:  # until the port accepts connections
                    try:
                        await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        assert process.returncode is None, "the server exited"
                        await anyio.sleep(0.05)
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                await call(client, "swarm_start_session", session_id=session_id)
                proposal = await call(
                    client, "swarm_propose_action", session_id=session_id, action="restart"
                )
                pid = proposal["proposal_id"]
                await call(client, "swarm_vote", proposal_id=pid, vote="yes")
                decided = await call(client, "swarm_get_proposal", proposal_id=pid, wait_seconds=15)
                assert decided["decision"]["outcome"] == "approved"

                created = await call(
                    client,
                    "swarm_create_task",
                    session_id=session_id,
                    type="remediate",
                    requires_approval=True,
                )
                empty = await call(
                    client, "swarm_claim_task", session_id=session_id, types=["remediate"]
                )
                assert empty["claimed"] is False  # not approved yet
                approval = created["approval_proposal_id"]
                await call(client, "swarm_vote", proposal_id=approval, vote="yes")
                claimed = await call(
                    client,
                    "swarm_claim_task",
                    session_id=session_id,
                    types=["remediate"],
                    wait_seconds=15,
                )
        finally:
            process.kill()
    assert claimed["task"]["id"] == created["id"]
    assert claimed["task"]["approval"] == "approved"


async def test_task_needing_approval_in_a_session_without_voters_is_refused_not_orphaned(
    bus: Bus, board: Blackboard, session_id: str, agent_id: str
) -> None:
    # Nobody joined the session (the lead started it from Python), so nobody can vote.
    async with Swarm.running(bus, agent_id) as swarm, Client(build_server(swarm)) as client:
        error = await call_error(
            client,
            "swarm_create_task",
            session_id=session_id,
            type="remediate",
            requires_approval=True,
        )
        assert "swarm_join_session" in error
        tasks = await call(client, "swarm_list_tasks", session_id=session_id)
    assert tasks["items"] == []  # no task left waiting for a vote that never comes


async def test_reclaiming_a_task_whose_claim_lapsed_keeps_the_new_claim(
    bus: Bus, board: Blackboard, session_id: str, agent_id: str
) -> None:
    async with Swarm.running(bus, agent_id) as swarm, Client(build_server(swarm)) as client:
        await call(client, "swarm_join_session", session_id=session_id)
        created = await call(
            client, "swarm_create_task", session_id=session_id, type="probe", timeout_seconds=1
        )
        await call(client, "swarm_claim_task", session_id=session_id, types=["probe"])
        stale = swarm._claims[created["id"]]
        async with stale.lock:  # the heartbeat stalls (e.g. a network outage): the claim lapses
            again = await call(
                client, "swarm_claim_task", session_id=session_id, types=["probe"], wait_seconds=20
            )
            assert (again["task"]["id"], again["task"]["attempts"]) == (created["id"], 2)
        async with stale.lock:  # the stalled heartbeat ran (it was queued first) and saw it lost
            pass
        done = await call(
            client,
            "swarm_complete_task",
            session_id=session_id,
            task_id=created["id"],
            result={"ok": True},
        )
    assert done["record"]["status"] == "completed"


def test_busy_http_port_is_a_one_line_startup_error(nats_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [str(SCRIPT), "--transport", "streamable-http", "--port", str(port)],
            env={"PATH": os.environ.get("PATH", ""), **server_env(nats_url, "ops/claude")},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
