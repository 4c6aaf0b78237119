"""Two LLM-agent clients through a whole incident, with no consensus service running.

The official Python SDK and the TypeScript SDK (from npm, run with Node) each drive
their own ``mcp-agent-swarm`` over stdio: join, post, wait (woken by the other's
finding), claim, complete, propose, vote, decision. Also: tool names every client
accepts, refusals a model can act on, waiting, locks, board resources.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.types import CallToolResult, TextContent

from swarmbus import Blackboard, Bus, Consensus, Finding
from swarmbus._mcp import TOOL_NAME_PATTERN, TOOL_NAMES, Swarm, build_parser, build_server

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = BIN / "mcp-agent-swarm"
NODE_CLIENT = ROOT / "tests" / "mcp_node" / "client.mjs"
LEAKS = ("expected revision", "errors.pydantic.dev", "For further information", "Traceback")


def server_env(nats_url: str, agent_id: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "SWARM_BACKEND": "nats",
        "NATS_URL": nats_url,
        "AGENT_ID": agent_id,
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def text_of(result: CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


class PythonAgent:
    """An agent behind the official Python SDK's client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        result = await self.client.call_tool(tool, arguments)
        assert not result.is_error, text_of(result)
        assert result.structured_content is not None
        return result.structured_content

    async def error(self, tool: str, **arguments: Any) -> str:
        result = await self.client.call_tool(tool, arguments)
        assert result.is_error, result.structured_content
        return text_of(result)


class NodeAgent:
    """An agent behind the TypeScript SDK's client (tests/mcp_node/client.mjs)."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process = process
        self._out = BufferedByteReceiveStream(process.stdout)
        self._ids = 0

    async def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self._ids += 1
        await self.process.stdin.send(json.dumps({"id": self._ids, **request}).encode() + b"\n")
        with anyio.fail_after(60):
            line = await self._out.receive_until(b"\n", 16 * 1024 * 1024)
        reply: dict[str, Any] = json.loads(line)
        assert reply["id"] == self._ids
        assert "failure" not in reply, reply["failure"]
        return reply

    async def list_tools(self) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = (await self._request({"op": "list_tools"}))["tools"]
        return tools

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        reply = await self._request({"tool": tool, "arguments": arguments})
        assert not reply["is_error"], reply["text"]
        structured: dict[str, Any] = reply["structured"]
        return structured

    async def error(self, tool: str, **arguments: Any) -> str:
        reply = await self._request({"tool": tool, "arguments": arguments})
        assert reply["is_error"], reply["structured"]
        text: str = reply["text"]
        return text


@contextlib.asynccontextmanager
async def python_agent(nats_url: str, agent_id: str, **env: str) -> AsyncIterator[PythonAgent]:
    params = StdioServerParameters(command=str(SCRIPT), env=server_env(nats_url, agent_id, **env))
    async with Client(params, read_timeout_seconds=60) as client:
        yield PythonAgent(client)


def node_ready() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (NODE_CLIENT.parent / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir():
        pytest.skip("run: npm ci --prefix tests/mcp_node")


@contextlib.asynccontextmanager
async def node_agent(nats_url: str, agent_id: str) -> AsyncIterator[NodeAgent]:
    node_ready()
    args = ["node", str(NODE_CLIENT), str(SCRIPT)]
    env = server_env(nats_url, agent_id)
    async with await anyio.open_process(args, env=env, stderr=None) as process:
        try:
            yield NodeAgent(process)
        finally:
            assert process.stdin is not None
            await process.stdin.aclose()  # the client closes its server and exits
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()


@pytest.fixture
def lead(unique: str) -> str:
    return f"ops/lead-{unique}"


@pytest.fixture
def helper(unique: str) -> str:
    return f"ops/helper-{unique}"


def test_every_tool_name_is_valid_in_every_client() -> None:
    assert len(TOOL_NAMES) >= 19
    for name in TOOL_NAMES:
        assert TOOL_NAME_PATTERN.match(name), name
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name)
    for seed in ("join_session", "post_finding", "get_findings", "claim_task", "complete_task"):
        assert f"swarm_{seed}" in TOOL_NAMES
    assert {"swarm_wait", "swarm_acquire_lock", "swarm_release_lock"} <= set(TOOL_NAMES)


async def test_dotted_names_behind_an_option(nats_url: str, helper: str) -> None:
    async with python_agent(nats_url, helper, SWARM_TOOL_NAMES="dotted") as agent:
        tools = {t.name: t for t in (await agent.client.list_tools()).tools}
        error = await agent.error("swarm.join_session", session_id="nope-dotted")
    assert set(tools) == {name.replace("swarm_", "swarm.") for name in TOOL_NAMES}
    assert "swarm.start_session" in error  # hints name the tools as served
    assert "swarm_" not in (tools["swarm.propose_action"].description or "")


async def _incident(
    first: PythonAgent | NodeAgent,
    second: PythonAgent | NodeAgent,
    *,
    lead: str,
    helper: str,
    session_id: str,
) -> dict[str, Any]:
    """The whole flow; ``first`` leads, ``second`` helps. Returns the decision."""
    await first.call("swarm_start_session", session_id=session_id, context={"incident": "5xx"})
    joined = await second.call("swarm_join_session", session_id=session_id)
    assert set(joined["members"]) == {lead, helper}
    start = await second.call("swarm_wait", timeout_seconds=0)
    assert start["timed_out"] is True

    async with anyio.create_task_group() as tg:
        woken: dict[str, Any] = {}

        async def wait() -> None:
            woken.update(await second.call("swarm_wait", cursor=start["cursor"]))

        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        posted = await first.call(
            "swarm_post_finding",
            session_id=session_id,
            category="observation",
            content="error rate spike at 10:15 after deploy v1.2.3",
            confidence=0.9,
        )
    (event,) = woken["events"]
    assert (event["kind"], event["agent"], event["id"]) == ("finding.reported", lead, posted["id"])
    assert woken["timed_out"] is False

    task = await first.call("swarm_create_task", session_id=session_id, type="investigate")
    claimed = await second.call("swarm_claim_task", session_id=session_id, types=["investigate"])
    assert claimed["task"]["id"] == task["id"]
    done = await second.call(
        "swarm_complete_task",
        session_id=session_id,
        task_id=task["id"],
        result={"root_cause": "pool exhaustion"},
    )
    assert done["record"]["status"] == "completed"

    proposal = await first.call(
        "swarm_propose_action", session_id=session_id, action="rollback", target="api@v1.2.3"
    )
    pid = proposal["proposal_id"]
    assert set(proposal["electorate"]) == {lead, helper}
    voted = await first.call("swarm_vote", proposal_id=pid, vote="yes", reason="errors x5")
    assert voted["status"] == "open"
    voted = await second.call("swarm_vote", proposal_id=pid, vote="yes", reason="same pattern")
    assert voted["status"] == "decided"  # no consensus service: the last vote decided it
    # The lead learns of it by waiting: task events, then the helper's vote made a decision.
    cursor = woken["cursor"]
    seen: list[str] = []
    for _ in range(10):
        news = await second.call("swarm_wait", cursor=cursor, timeout_seconds=5)
        cursor = news["cursor"]
        seen += [e["kind"] for e in news["events"]]
        if "action.decided" in seen:
            break
    assert "action.proposed" in seen
    assert seen.count("action.decided") == 1
    final = await first.call("swarm_get_proposal", proposal_id=pid)
    assert final["decision"]["outcome"] == "approved"
    board = await first.call("swarm_get_blackboard", session_id=session_id)
    assert [(a["id"], a["status"]) for a in board["actions_taken"]] == [(pid, "approved")]
    decision: dict[str, Any] = final["decision"]
    return decision


async def _decided_events(bus: Bus, session_id: str) -> int:
    info = await bus.js.stream_info(
        "SWARMBUS_EVENTS", subjects_filter=f"agent.action.decided.{session_id}.>"
    )
    return sum((info.state.subjects or {}).values())


async def test_two_python_sdk_agents_work_an_incident_without_a_consensus_service(
    bus: Bus, nats_url: str, session_id: str, lead: str, helper: str
) -> None:
    async with python_agent(nats_url, lead) as first, python_agent(nats_url, helper) as second:
        decision = await _incident(first, second, lead=lead, helper=helper, session_id=session_id)
    assert (decision["votes_for"], decision["closed_by"]) == (2, "early")
    assert await _decided_events(bus, session_id) == 1


async def test_a_typescript_sdk_agent_and_a_python_sdk_agent_work_an_incident(
    bus: Bus, nats_url: str, session_id: str, lead: str, helper: str
) -> None:
    node_ready()
    async with python_agent(nats_url, lead) as first, node_agent(nats_url, helper) as second:
        tools = await second.list_tools()
        assert {t["name"] for t in tools} == set(TOOL_NAMES)
        for tool in tools:  # every field described, for every client
            for name, field in tool["inputSchema"].get("properties", {}).items():
                assert field.get("description"), (tool["name"], name)
        decision = await _incident(first, second, lead=lead, helper=helper, session_id=session_id)
    assert decision["outcome"] == "approved"
    assert await _decided_events(bus, session_id) == 1


async def test_a_proposal_past_its_deadline_is_decided_by_a_participant(
    bus: Bus, session_id: str, lead: str, helper: str
) -> None:
    async with (
        Swarm.running(bus, lead) as swarm,
        Client(build_server(swarm)) as client,
    ):
        agent = PythonAgent(client)
        await agent.call("swarm_start_session", session_id=session_id)
        other = await Consensus.open(bus, settle=False)
        await other.join(session_id, helper)
        proposal = await agent.call(
            "swarm_propose_action", session_id=session_id, action="restart", timeout_seconds=1
        )
        await agent.call("swarm_vote", proposal_id=proposal["proposal_id"], vote="yes")
        # Nobody else votes: the proposer's server closes it at its deadline by itself.
        with anyio.fail_after(10):
            decision = await other.wait_for_decision(proposal["proposal_id"], timeout=10)
    assert (decision.outcome, decision.closed_by) == ("no_quorum", "timeout")  # 1 of 2 voted
    assert await _decided_events(bus, session_id) == 1


async def test_an_oversized_proposal_is_refused_whole(bus: Bus, session_id: str, lead: str) -> None:
    async with Swarm.running(bus, lead) as swarm, Client(build_server(swarm)) as client:
        agent = PythonAgent(client)
        await agent.call("swarm_start_session", session_id=session_id)
        big = {"diff": "x" * 300_000}  # under the server's 1 MiB, over the proposal limit
        error = await agent.error(
            "swarm_propose_action", session_id=session_id, action="patch", parameters=big
        )
        assert "limit is" in error
        assert str(swarm.consensus.book.max_proposal_bytes) in error
        assert not any(leak in error for leak in LEAKS)
        board = await agent.call("swarm_get_blackboard", session_id=session_id)
    assert board["actions_taken"] == []
    records = [
        msgspec.json.decode(e.value or b"{}") for e in await swarm.consensus.store.list("p.")
    ]
    assert [r for r in records if isinstance(r, dict) and r.get("session") == session_id] == []
    assert await _decided_events(bus, session_id) == 0


async def test_every_bad_input_gets_an_actionable_message(
    bus: Bus, session_id: str, lead: str, unique: str
) -> None:
    async with Swarm.running(bus, lead) as swarm, Client(build_server(swarm)) as client:
        agent = PythonAgent(client)
        await agent.call("swarm_start_session", session_id=session_id)
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("swarm_join_session", {"session_id": f"nope-{unique}"}, "swarm_start_session"),
            ("swarm_join_session", {"session_id": "two words"}, "session_id"),
            (
                "swarm_post_finding",
                {
                    "session_id": session_id,
                    "category": "observation",
                    "content": "x",
                    "confidence": 1.7,
                },
                "confidence",
            ),
            ("swarm_post_finding", {"session_id": session_id}, "missing"),
            (
                "swarm_get_findings",
                {"session_id": session_id, "posted_by": "not an id"},
                "posted_by",
            ),
            ("swarm_get_findings", {"session_id": session_id, "cursor": "x"}, "next_cursor"),
            (
                "swarm_complete_task",
                {"session_id": session_id, "task_id": "t-1", "result": {}},
                "unknown task",
            ),
            ("swarm_vote", {"proposal_id": f"p-{unique}", "vote": "yes"}, "not found"),
            ("swarm_vote", {"proposal_id": "p", "vote": "maybe"}, "vote"),
            ("swarm_start_session", {"session_id": session_id}, "swarm_join_session"),
            ("swarm_release_lock", {"resource": "file:/x"}, "swarm_acquire_lock"),
            ("swarm_wait", {"timeout_seconds": 99}, "timeout_seconds"),
        ]
        for tool, arguments, expected in cases:
            error = await agent.error(tool, **arguments)
            assert expected in error, (tool, error)
            assert not any(leak in error for leak in LEAKS), (tool, error)
        # A second vote is refused with what to do, not with a revision number.
        proposal = await agent.call(
            "swarm_propose_action", session_id=session_id, action="restart", voters=[lead, "a/b"]
        )
        await agent.call("swarm_vote", proposal_id=proposal["proposal_id"], vote="yes")
        error = await agent.error("swarm_vote", proposal_id=proposal["proposal_id"], vote="no")
        assert "swarm_get_proposal" in error
        assert not any(leak in error for leak in LEAKS)


async def test_lists_are_paged(bus: Bus, session_id: str, lead: str) -> None:
    async with Swarm.running(bus, lead) as swarm, Client(build_server(swarm)) as client:
        agent = PythonAgent(client)
        await agent.call("swarm_start_session", session_id=session_id)
        for i in range(5):
            await agent.call(
                "swarm_post_finding",
                session_id=session_id,
                category="observation",
                content=f"finding {i}",
                confidence=0.5,
            )
        seen: list[str] = []
        cursor = None
        while True:
            page = await agent.call(
                "swarm_get_findings", session_id=session_id, limit=2, cursor=cursor
            )
            assert page["count"] <= 2
            seen += [f["content"] for f in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        sessions = await agent.call("swarm_list_sessions", limit=1)
    assert seen == [f"finding {i}" for i in range(5)]
    assert len(sessions["sessions"]) == 1


async def test_wait_never_misses_or_repeats_and_times_out(
    bus: Bus, session_id: str, lead: str, helper: str
) -> None:
    async with Swarm.running(bus, lead) as swarm, Client(build_server(swarm)) as client:
        agent = PythonAgent(client)
        error = await agent.error("swarm_wait", timeout_seconds=0)
        assert "swarm_join_session" in error
        await agent.call("swarm_start_session", session_id=session_id)
        board = await Blackboard.open(bus, session_id)
        ids = []
        for i in range(3):  # posted while nobody waits: held for the next wait
            finding = Finding(category="observation", content=f"seen {i}", confidence=0.5)
            record = await board.append_finding(finding, agent=helper)
            ids.append(record.id)
        got: list[str] = []
        cursor = None
        with anyio.fail_after(20):
            while len(got) < 3:
                news = await agent.call("swarm_wait", cursor=cursor, timeout_seconds=5)
                got += [e["id"] for e in news["events"]]
                cursor = news["cursor"]
        empty = await agent.call("swarm_wait", cursor=cursor, timeout_seconds=0.2)
    assert got == ids
    assert (empty["events"], empty["timed_out"]) == ([], True)


async def test_locks_are_leases_with_fencing_tokens(
    bus: Bus, session_id: str, lead: str, helper: str, unique: str
) -> None:
    resource = f"file:/src/{unique}.py"
    async with (
        Swarm.running(bus, lead) as one,
        Swarm.running(bus, helper) as two,
        Client(build_server(one)) as c1,
        Client(build_server(two)) as c2,
    ):
        first, second = PythonAgent(c1), PythonAgent(c2)
        taken = await first.call("swarm_acquire_lock", resource=resource, ttl_seconds=30)
        assert taken["acquired"] is True
        refused = await second.call("swarm_acquire_lock", resource=resource)
        assert (refused["acquired"], refused["holder"]) == (False, lead)
        renewed = await first.call("swarm_acquire_lock", resource=resource, ttl_seconds=30)
        assert renewed["token"] == taken["token"]
        await first.call("swarm_release_lock", resource=resource)
        again = await second.call("swarm_acquire_lock", resource=resource, wait_seconds=5)
        assert again["acquired"] is True
        assert again["token"] > taken["token"]


async def test_board_resource_and_update_notifications(
    bus: Bus, nats_url: str, session_id: str, lead: str, helper: str
) -> None:
    updated = anyio.Event()
    uris: list[str] = []

    async def on_message(message: Any) -> None:
        root = getattr(message, "root", message)
        if getattr(root, "method", "") == "notifications/resources/updated":
            uris.append(root.params.uri)
            updated.set()

    params = StdioServerParameters(command=str(SCRIPT), env=server_env(nats_url, lead))
    async with (
        Client(params, read_timeout_seconds=60, mode="legacy", message_handler=on_message) as c,
    ):
        agent = PythonAgent(c)
        await agent.call("swarm_start_session", session_id=session_id)
        uri = f"swarm://sessions/{session_id}/board"
        templates = await c.list_resource_templates()
        assert [t.uri_template for t in templates.resource_templates] == [
            "swarm://sessions/{session_id}/board"
        ]
        with pytest.warns(MCPDeprecationWarning, match="resources/subscribe"):
            await c.subscribe_resource(uri)
        board = await Blackboard.open(bus, session_id)
        finding = Finding(category="observation", content="disk full on db-1", confidence=0.8)
        await board.append_finding(finding, agent=helper)
        with anyio.fail_after(10):
            await updated.wait()
        read = await c.read_resource(uri)
    assert uris[0] == uri
    content = json.loads(read.contents[0].text)  # type: ignore[union-attr]
    assert [f["content"] for f in content["findings"]] == ["disk full on db-1"]


def _documented_blocks() -> list[dict[str, Any]]:
    """The client config blocks of the MCP docs (docs/use/mcp.md, else the README)."""
    for path in (ROOT / "docs" / "use" / "mcp.md", ROOT / "README.md"):
        if path.exists():
            blocks = re.findall(r"```json\n(.*?)```", path.read_text(), flags=re.S)
            found = [json.loads(b) for b in blocks if "mcpServers" in b]
            if found:
                return found
    raise AssertionError("no MCP config block in the docs")


def _readme_mcp_block() -> dict[str, Any]:
    return _documented_blocks()[0]


def test_the_documented_http_block_names_what_the_server_serves() -> None:
    (http,) = [b for b in _documented_blocks() if "url" in next(iter(b["mcpServers"].values()))]
    (server,) = http["mcpServers"].values()
    defaults = build_parser().parse_args(["--transport", "streamable-http"])
    assert server["url"] == f"http://{defaults.host}:{defaults.port}/mcp"
    assert build_parser().parse_args(["--dotted-names"]).dotted_names is True


async def test_the_documented_config_block_works_over_stdio(nats_url: str, session_id: str) -> None:
    (server,) = _readme_mcp_block()["mcpServers"].values()
    # Verbatim but for the NATS URL: the test server listens on a port of its own.
    env = {**server["env"], "NATS_URL": nats_url, "PATH": f"{BIN}:{os.environ['PATH']}"}
    params = StdioServerParameters(command=server["command"], args=server.get("args", []), env=env)
    async with Client(params, read_timeout_seconds=60) as client:
        agent = PythonAgent(client)
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == set(TOOL_NAMES)
        started = await agent.call("swarm_start_session", session_id=session_id)
    assert started["you"] == server["env"]["AGENT_ID"]


def test_the_node_client_lockfile_is_pinned() -> None:
    lock = json.loads((NODE_CLIENT.parent / "package-lock.json").read_text())
    assert lock["packages"][""]["dependencies"]["@modelcontextprotocol/sdk"]
    assert "npm ci --prefix tests/mcp_node" in (ROOT / ".ci" / "run").read_text()


async def test_board_updates_reach_listen_streams(
    bus: Bus, session_id: str, lead: str, helper: str
) -> None:
    """2026-07-28 clients subscribe with ``subscriptions/listen`` instead."""
    uri = f"swarm://sessions/{session_id}/board"
    async with Swarm.running(bus, lead) as swarm, Client(build_server(swarm)) as client:
        await PythonAgent(client).call("swarm_start_session", session_id=session_id)
        async with client.listen(resource_subscriptions=[uri]) as subscription:
            board = await Blackboard.open(bus, session_id)
            finding = Finding(category="observation", content="queue backlog", confidence=0.6)
            await board.append_finding(finding, agent=helper)
            with anyio.fail_after(10):
                event = await subscription.__anext__()
    assert getattr(event, "uri", None) == uri
