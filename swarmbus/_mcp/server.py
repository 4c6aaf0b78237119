"""The MCP server around a ``Swarm``: tools, board resources with subscriptions, transports."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import tempfile
from typing import Any, Final, Literal

import pydantic
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated
from mcp.types import EmptyResult, SubscribeRequestParams, ToolAnnotations, UnsubscribeRequestParams

from swarmbus import __version__
from swarmbus._bus import connect
from swarmbus._consensus import ConsensusService
from swarmbus._mcp.config import ServerConfig
from swarmbus._mcp.swarm import Swarm
from swarmbus._mcp.tooling import TOOL_METHODS, explain_validation, rename, tool_name

__all__ = [
    "BOARD_URI",
    "SERVER_NAME",
    "TOOL_NAMES",
    "SwarmServer",
    "build_parser",
    "build_server",
    "serve",
]

log = logging.getLogger("swarmbus.mcp")

SERVER_NAME: Final = "agent-swarm"
BOARD_URI: Final = "swarm://sessions/{session_id}/board"
_READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
#: Every tool the server serves (by default; ``dotted`` spells them ``swarm.<method>``).
TOOL_NAMES: Final = tuple(tool_name(method) for method in TOOL_METHODS)


def _instructions(agent_id: str) -> str:
    return (
        f"You are agent {agent_id} in a swarm of agents coordinating on incidents through "
        "swarmbus. Start with swarm_list_sessions, then swarm_join_session (or "
        "swarm_start_session). Read swarm_get_blackboard before you act, share what you "
        "learn with swarm_post_finding, take work with swarm_claim_task and finish it with "
        "swarm_complete_task. Instead of polling, call swarm_wait: it returns when other "
        "agents post findings, tasks, proposals or decisions. Reserve a shared resource with "
        "swarm_acquire_lock. Put risky actions to a vote with swarm_propose_action and only "
        "act once the decision (swarm_wait or swarm_get_proposal) says approved."
    )


class SwarmServer(MCPServer[Any]):
    """An MCPServer whose ``swarm_*`` tools act as ``swarm.agent_id``.

    Bad arguments come back as one line per field (no pydantic internals), and the
    board of every session is a resource (``swarm://sessions/<id>/board``) that
    clients may subscribe to: ``notifications/resources/updated`` follows each event
    of the session.
    """

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.board_bus = InMemorySubscriptionBus()
        super().__init__(
            SERVER_NAME,
            instructions=rename(_instructions(swarm.agent_id), dotted=swarm.dotted),
            version=__version__,
            log_level="WARNING",
            subscriptions=self.board_bus,
        )
        self._subscribers: dict[str, set[Any]] = {}  # board URI -> subscribed sessions
        for method, read_only in TOOL_METHODS.items():
            fn = getattr(swarm, method)
            self.add_tool(
                fn,
                name=tool_name(method, dotted=swarm.dotted),
                description=rename(inspect.getdoc(fn) or "", dotted=swarm.dotted),
                annotations=_READ if read_only else _WRITE,
                structured_output=True,
            )
        self.resource(
            BOARD_URI,
            name="session-board",
            description="A session's blackboard: context, findings, hypotheses and actions "
            "(subscribe to be told when it changes).",
            mime_type="application/json",
        )(self.read_board)
        lowlevel = self._lowlevel_server
        lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, self._subscribe)
        lowlevel.add_request_handler(
            "resources/unsubscribe", UnsubscribeRequestParams, self._unsubscribe
        )
        swarm.feed.on_session_event.append(self._board_changed)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError:
            raise
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, pydantic.ValidationError):
                raise ToolError(explain_validation(name, cause)) from None
            if isinstance(cause, ToolError):  # ours: without the SDK's "Error executing"
                raise ToolError(str(cause)) from None
            raise

    async def read_board(self, session_id: str) -> str:
        """The board of ``session_id`` as JSON (the swarm_get_blackboard result)."""
        board = await self.swarm.get_blackboard(session_id)
        return json.dumps(board.model_dump(), default=str)

    async def _subscribe(self, ctx: Any, params: SubscribeRequestParams) -> EmptyResult:
        session = _session_of(params.uri)
        await self.swarm.feed.follow(session)
        self._subscribers.setdefault(params.uri, set()).add(ctx.session)
        return EmptyResult()

    async def _unsubscribe(self, ctx: Any, params: UnsubscribeRequestParams) -> EmptyResult:
        self._subscribers.get(params.uri, set()).discard(ctx.session)
        return EmptyResult()

    async def _board_changed(self, session: str) -> None:
        uri = BOARD_URI.format(session_id=session)
        await self.board_bus.publish(ResourceUpdated(uri=uri))
        for client in list(self._subscribers.get(uri, ())):
            try:
                await client.send_resource_updated(uri)
            except Exception as exc:  # noqa: BLE001 - a client that left: forget it
                log.debug("notifying %s: %s", uri, exc)
                self._subscribers[uri].discard(client)


def _session_of(uri: str) -> str:
    prefix, suffix = BOARD_URI.split("{session_id}")
    if not (uri.startswith(prefix) and uri.endswith(suffix)):
        raise ToolError(f"unknown resource {uri!r}: boards are {BOARD_URI}")
    return uri[len(prefix) : -len(suffix)]


def build_server(swarm: Swarm) -> SwarmServer:
    """The MCP server for ``swarm``."""
    return SwarmServer(swarm)


async def serve(
    config: ServerConfig,
    *,
    transport: Literal["stdio", "streamable-http"] = "stdio",
    host: str = "127.0.0.1",
    port: int = 8000,
    decide: bool = False,
    dotted: bool = False,
) -> None:
    """Connect to NATS as ``config.agent_id`` and serve MCP until the client leaves.

    Without a NATS URL (``SWARM_BACKEND=redis|postgres`` and no ``NATS_URL``) the
    server starts its own nats-server in a temp dir for its events, and stops it on
    exit: what agents share is then all in the store.

    Proposals are decided without any other process (the server settles those it
    touches); ``decide`` also runs a ConsensusService replica, which settles every
    proposal (replicas and servers still decide each proposal once).
    """
    async with contextlib.AsyncExitStack() as stack:
        data_dir = None
        if not config.settings.servers:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mcp-agent-swarm-"))
        bus = await stack.enter_async_context(connect(config.settings, data_dir=data_dir))
        if decide:
            await stack.enter_async_context(ConsensusService(bus))
        swarm = await stack.enter_async_context(
            Swarm.running(bus, config.agent_id, dotted=dotted or config.dotted_names)
        )
        server = build_server(swarm)
        if transport == "stdio":
            await server.run_stdio_async()
        else:
            await server.run_streamable_http_async(host=host, port=port)


def build_parser() -> argparse.ArgumentParser:
    """The ``mcp-agent-swarm`` argument parser (the rest is configured by env)."""
    parser = argparse.ArgumentParser(
        prog="mcp-agent-swarm",
        description=(
            "MCP server that lets an LLM agent join a swarmbus swarm. Configure with "
            "SWARM_BACKEND=nats, NATS_URL and AGENT_ID, or the seed's SWARM_BACKEND=redis, "
            "REDIS_URL and AGENT_ID (postgres: DATABASE_URL)."
        ),
    )
    parser.add_argument(
        "--transport", choices=("stdio", "streamable-http"), default="stdio", help="default: stdio"
    )
    parser.add_argument("--host", default="127.0.0.1", help="streamable-http bind address")
    parser.add_argument("--port", type=int, default=8000, help="streamable-http port")
    parser.add_argument(
        "--decide",
        action="store_true",
        help="also run a consensus service replica that decides every proposal",
    )
    parser.add_argument(
        "--dotted-names",
        action="store_true",
        help="serve the seed's tool names (swarm.vote) for clients that accept dots "
        "(also SWARM_TOOL_NAMES=dotted); default: swarm_vote",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    return parser
