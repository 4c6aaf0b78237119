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

SUPPORTED_BACKENDS: Final = ("nats", "redis", "postgres")
#: What each backend needs besides ``AGENT_ID`` (NATS_URL is optional on the stores).
_NEEDS: Final = {"nats": "NATS_URL", "redis": "REDIS_URL", "postgres": "DATABASE_URL"}
_EXAMPLES: Final = {
    "NATS_URL": "nats://127.0.0.1:4222",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "DATABASE_URL": "postgresql://user@127.0.0.1:5432/swarm",
}


class ConfigError(Exception):
    """The environment does not configure a usable server (reported at startup)."""


@dataclass(frozen=True)
class ServerConfig:
    """What ``mcp-agent-swarm`` reads from its environment.

    The seed's block: ``SWARM_BACKEND=redis`` with ``REDIS_URL`` (or ``postgres`` with
    ``DATABASE_URL``) and ``AGENT_ID``; then ``NATS_URL`` is optional and, without it,
    the server embeds its own nats-server for its events (everything agents share is
    in the store). ``SWARM_BACKEND=nats`` (the default) needs ``NATS_URL``.

    ``dotted_names``: serve the seed's tool names (``swarm.vote``) instead of
    ``swarm_vote``, for clients that accept dots (``SWARM_TOOL_NAMES=dotted``).
    """

    agent_id: str
    settings: Settings
    dotted_names: bool = False

    @classmethod
    def from_env(cls) -> ServerConfig:
        """Read ``SWARM_BACKEND``, ``AGENT_ID``, ``NATS_URL``, ``REDIS_URL``,
        ``DATABASE_URL``, ``SWARM_TOOL_NAMES`` (and ``SWARMBUS_*``).

        Raises:
            ConfigError: with a message that says what to set.
        """
        backend = (os.environ.get("SWARM_BACKEND") or "nats").strip().lower()
        if backend not in SUPPORTED_BACKENDS:
            raise ConfigError(
                f"SWARM_BACKEND={backend!r} is not supported: use nats (with NATS_URL), "
                "redis (with REDIS_URL) or postgres (with DATABASE_URL)"
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
        needs = _NEEDS[backend]
        if not os.environ.get(needs, "").strip():
            raise ConfigError(
                f"{needs} is not set: SWARM_BACKEND={backend} needs it, "
                f"e.g. {needs}={_EXAMPLES[needs]}"
            )
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
