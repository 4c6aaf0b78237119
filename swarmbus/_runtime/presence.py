"""Which agents are alive: heartbeats on the API, and a reaper for the silent.

An agent that joins a session (``swarmbus.api.session.join``) promises a heartbeat
(``swarmbus.api.presence.heartbeat``, or any API request) every ``interval`` seconds;
one silent for ``dead_after`` seconds is dead. Heartbeats rather than the server's
connect/disconnect advisories: those need a system account on the server, and a
heartbeat also catches a process that is connected but hung. Only joined agents are
tracked, so an agent that never promised heartbeats is never declared dead.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

OnDeath = Callable[[str], Awaitable[None]]


class Presence:
    """Last-seen times of joined agents; ``run`` calls ``on_death`` for the silent.

    Args:
        interval: seconds between an agent's heartbeats.
        dead_after: seconds of silence after which an agent is dead.
        on_death: called once per death (with the agent id).
    """

    def __init__(
        self, on_death: OnDeath, *, interval: float = 0.5, dead_after: float = 1.5
    ) -> None:
        if not 0 < interval < dead_after:
            raise ValueError("presence needs 0 < interval < dead_after")
        self.interval = interval
        self.dead_after = dead_after
        self.on_death = on_death
        self._seen: dict[str, float] = {}

    def join(self, agent: str) -> None:
        """Track ``agent`` from now on."""
        self._seen[agent] = time.monotonic()

    def leave(self, agent: str) -> None:
        """Stop tracking ``agent`` (it left on purpose)."""
        self._seen.pop(agent, None)

    def seen(self, agent: str) -> bool:
        """Record a sign of life; False if ``agent`` is not tracked (never joined)."""
        if agent not in self._seen:
            return False
        self._seen[agent] = time.monotonic()
        return True

    def alive(self) -> list[str]:
        """Tracked agents, sorted."""
        return sorted(self._seen)

    async def run(self) -> None:
        """Reap silent agents until cancelled (checks every ``interval / 2``)."""
        while True:
            await anyio.sleep(self.interval / 2)
            now = time.monotonic()
            dead = [a for a, t in self._seen.items() if now - t > self.dead_after]
            for agent in dead:
                self._seen.pop(agent, None)
                await self.on_death(agent)
