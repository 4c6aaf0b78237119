"""What ``mcp-agent-swarm`` reads from its environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

import pydantic

from swarmbus import _subjects as subjects
from swarmbus._config import Settings
from swarmbus._errors import SwarmbusError

__all__ = ["SUPPORTED_BACKENDS", "ConfigError", "ServerConfig"]

SUPPORTED_BACKENDS: Final = ("nats",)


class ConfigError(Exception):
    """The environment does not configure a usable server (reported at startup)."""


@dataclass(frozen=True)
class ServerConfig:
    """What ``mcp-agent-swarm`` reads from its environment.

    ``dotted_names``: serve the seed's tool names (``swarm.vote``) instead of
    ``swarm_vote``, for clients that accept dots (``SWARM_TOOL_NAMES=dotted``).
    """

    agent_id: str
    settings: Settings
    dotted_names: bool = False

    @classmethod
    def from_env(cls) -> ServerConfig:
        """Read ``SWARM_BACKEND``, ``AGENT_ID``, ``NATS_URL``, ``SWARM_TOOL_NAMES`` (and
        ``SWARMBUS_*``).

        Raises:
            ConfigError: with a message that says what to set.
        """
        backend = os.environ.get("SWARM_BACKEND") or "nats"
        if backend.strip().lower() not in SUPPORTED_BACKENDS:
            raise ConfigError(
                f"SWARM_BACKEND={backend!r} is not supported: mcp-agent-swarm supports only "
                "SWARM_BACKEND=nats (set NATS_URL to your server)"
            )
        agent_id = os.environ.get("AGENT_ID", "")
        if not agent_id:
            raise ConfigError(
                "AGENT_ID is not set: set it to the id this agent acts as, e.g. AGENT_ID=ops/claude"
            )
        try:
            subjects.validate_agent_id(agent_id)
        except SwarmbusError as exc:
            raise ConfigError(f"AGENT_ID: {exc}") from None
        if not os.environ.get("NATS_URL", "").strip():
            raise ConfigError("NATS_URL is not set: e.g. NATS_URL=nats://127.0.0.1:4222")
        names = (os.environ.get("SWARM_TOOL_NAMES") or "underscore").strip().lower()
        if names not in ("underscore", "dotted"):
            raise ConfigError(
                f"SWARM_TOOL_NAMES={names!r}: use underscore (swarm_vote, the default, valid "
                "in every client) or dotted (swarm.vote, the seed's names)"
            )
        try:
            settings = Settings.from_env(name=f"mcp-agent-swarm {agent_id}")
        except pydantic.ValidationError as exc:
            raise ConfigError(f"bad SWARMBUS_* setting: {exc}") from None
        return cls(agent_id=agent_id, settings=settings, dotted_names=names == "dotted")
