"""MCP server benchmark: tool-call latency through the installed ``mcp-agent-swarm``.

Starts its own nats-server (temp dir, 127.0.0.1), starts a session, then spawns the
console script over stdio with the SDK's client (as an MCP host would) and times:

1. startup: spawn to the first tool result (process start, SDK import, NATS connect,
   MCP handshake);
2. ``swarm_post_finding`` calls, one at a time (board write + event publish + MCP
   round trip), and ``swarm_get_blackboard`` on the resulting board.

Usage: python bench/bench_mcp.py [--calls 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from swarmbus import Blackboard, Bus, NatsServer

SCRIPT = Path(sys.executable).parent / "mcp-agent-swarm"
SESSION = "BENCH-MCP"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report(name: str, seconds: list[float]) -> None:
    ms = [s * 1000 for s in seconds]
    print(
        f"{name}: {len(ms)} calls, {len(ms) / sum(seconds):.0f}/s, "
        f"p50 {statistics.median(ms):.2f} ms, p99 {_pct(ms, 0.99):.2f} ms"
    )


async def bench(url: str, calls: int) -> None:
    async with Bus.open(url=url) as bus:
        await (await Blackboard.open(bus, SESSION)).start("bench/lead")
    env = {"SWARM_BACKEND": "nats", "NATS_URL": url, "AGENT_ID": "bench/claude"}
    started = time.perf_counter()
    async with Client(StdioServerParameters(command=str(SCRIPT), env=env)) as client:
        result = await client.call_tool("swarm_join_session", {"session_id": SESSION})
        assert not result.is_error, result.content
        print(f"startup to first tool result: {time.perf_counter() - started:.2f} s")
        posts = []
        for i in range(calls):
            t0 = time.perf_counter()
            result = await client.call_tool(
                "swarm_post_finding",
                {
                    "session_id": SESSION,
                    "category": "observation",
                    "content": f"observation {i}",
                    "confidence": 0.8,
                    "evidence": [{"source": "bench", "query": "q", "result": "r"}],
                },
            )
            posts.append(time.perf_counter() - t0)
            assert not result.is_error, result.content
        _report("swarm_post_finding", posts)
        reads = []
        for _ in range(20):
            t0 = time.perf_counter()
            result = await client.call_tool("swarm_get_blackboard", {"session_id": SESSION})
            reads.append(time.perf_counter() - t0)
            assert not result.is_error, result.content
        _report(f"swarm_get_blackboard ({calls} findings)", reads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
        anyio.run(bench, server.url, args.calls)


if __name__ == "__main__":
    main()
