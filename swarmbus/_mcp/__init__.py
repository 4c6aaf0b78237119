"""The MCP server ``mcp-agent-swarm``: LLM agents join a swarm through tools.

One server process is one agent, ``AGENT_ID``: every tool posts, claims, proposes and
votes as that id, and no tool takes an agent id, so a tool call cannot act as another
agent (bind the id to a NATS user with ``agent.*.*.*.<id>`` publish permissions to
make that hold against other clients too). Configuration is the seed's block::

    SWARM_BACKEND=nats  NATS_URL=nats://127.0.0.1:4222  AGENT_ID=ops/claude

Tool names are ``swarm_<verb>`` (``^[a-zA-Z0-9_-]{1,64}$``, which Claude Desktop, the
OpenAI API, Copilot and Windsurf require); ``SWARM_TOOL_NAMES=dotted`` (or
``--dotted-names``) serves the seed's ``swarm.<verb>`` instead.

Tools are thin: the blackboard, task queue, consensus and lock modules do the work;
this package validates input (the SDK checks each call against the tool's JSON
schema; ``SwarmServer`` rewrites its complaints field by field), turns swarmbus errors
into tool errors an LLM can act on, holds task claims (heartbeating them) and locks,
and keeps the feed of the agent's sessions that ``swarm_wait`` and the board
resources' ``notifications/resources/updated`` come from. Proposals need no separate
process: this server's ``Consensus`` settles those it touches (``swarmbus._consensus``).

What goes where: ``config`` (the environment), ``models`` (results and described
arguments), ``tooling`` (names, error messages, pages), ``feed`` (events for
``swarm_wait``), ``base`` / ``board_tools`` / ``task_tools`` / ``coordination_tools``
/ ``swarm`` (the tools), ``server`` (MCP server, resources, transports).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence

import anyio

try:
    import mcp.server.mcpserver  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "mcp-agent-swarm needs the MCP Python SDK 2.x: pip install 'swarmbus[mcp]'"
    ) from exc

from swarmbus._errors import SwarmbusError
from swarmbus._mcp.config import ConfigError, ServerConfig
from swarmbus._mcp.models import MAX_WAIT
from swarmbus._mcp.server import (
    BOARD_URI,
    SERVER_NAME,
    TOOL_NAMES,
    SwarmServer,
    build_parser,
    build_server,
    serve,
)
from swarmbus._mcp.swarm import Swarm
from swarmbus._mcp.tooling import TOOL_NAME_PATTERN
from swarmbus._telemetry import configure_tracing

__all__ = [
    "BOARD_URI",
    "MAX_WAIT",
    "SERVER_NAME",
    "TOOL_NAMES",
    "TOOL_NAME_PATTERN",
    "ConfigError",
    "ServerConfig",
    "Swarm",
    "SwarmServer",
    "build_parser",
    "build_server",
    "main",
    "serve",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mcp-agent-swarm`` console script."""
    args = build_parser().parse_args(argv)
    # stdout is the MCP channel on stdio: every log line goes to stderr.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = ServerConfig.from_env()
    except ConfigError as exc:
        print(f"mcp-agent-swarm: error: {exc}", file=sys.stderr)
        return 2
    try:
        configure_tracing()  # off unless the OTEL_* variables ask for it
        anyio.run(
            functools.partial(
                serve,
                config,
                transport=args.transport,
                host=args.host,
                port=args.port,
                decide=args.decide,
                dotted=args.dotted_names,
            )
        )
    except SwarmbusError as exc:
        print(f"mcp-agent-swarm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
