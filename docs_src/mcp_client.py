"""An MCP host's view: spawn `mcp-agent-swarm` over stdio and call its tools."""

import os
import secrets
import shutil
import sys
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

SESSION = f"INC-1234-{secrets.token_hex(3)}"
# The console script installed with swarmbus[mcp], as in an MCP host's config.
COMMAND = shutil.which("mcp-agent-swarm") or str(Path(sys.executable).parent / "mcp-agent-swarm")


async def main() -> None:
    env = {
        "SWARM_BACKEND": "nats",
        "NATS_URL": os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
        "AGENT_ID": "ops/claude",
    }
    async with Client(StdioServerParameters(command=COMMAND, env=env)) as client:
        tools = await client.list_tools()
        print("tools:", len(tools.tools))
        started = await client.call_tool(
            "swarm_start_session", {"session_id": SESSION, "context": {"task": "investigate"}}
        )
        assert not started.is_error, started.content
        posted = await client.call_tool(
            "swarm_post_finding",
            {
                "session_id": SESSION,
                "category": "observation",
                "content": "error rate 5x since 10:15",
                "confidence": 0.8,
                "evidence": [
                    {"source": "prometheus", "query": "rate(errors[5m])", "result": "0.05"}
                ],
            },
        )
        assert not posted.is_error, posted.content
        board = await client.call_tool("swarm_get_blackboard", {"session_id": SESSION})
        findings = board.structured_content["findings"]
        print("findings:", [(f["agent"], f["content"]) for f in findings])
        bad = await client.call_tool(
            "swarm_post_finding",
            {"session_id": SESSION, "category": "observation", "content": "x", "confidence": 1.7},
        )
        print("confidence 1.7 is a tool error:", bad.is_error)


anyio.run(main)
