"""What agents hold through the runtime: task claims and locks, released on death.

A service without swarmbus claims a task or takes a lock through the API; the runtime
keeps the ``Claim`` or ``Lock`` object and acts on it for the agent. So when presence
says the agent died (or it leaves), the runtime releases everything at once: the task
is failed with retry (offered again, its attempt number the fencing token a late
completion is refused by) and the lock is released (a new holder gets a higher
token). Nothing here survives a runtime restart: claims then expire by their
timeout and locks by their TTL, as for any crashed holder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final, Literal

from swarmbus._bus import Bus
from swarmbus._errors import NotFoundError, SwarmbusError
from swarmbus._locks import Lock
from swarmbus._messages import PresenceLost
from swarmbus._tasks import Claim

log = logging.getLogger("swarmbus.runtime")

#: Where ``presence.lost`` goes for an agent that held nothing in any session.
RUNTIME_SESSION: Final = "runtime"
_WHY: Final = {"dead": "died (no heartbeat)", "left": "left"}


@dataclass
class _Agent:
    claims: dict[str, Claim] = field(default_factory=dict)  # task id -> claim
    locks: dict[str, Lock] = field(default_factory=dict)  # resource -> lock
    sessions: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Release:
    """What was released for one agent, per session it held things in."""

    agent: str
    tasks: list[str]
    locks: list[str]
    sessions: list[str]


class Holdings:
    """Claims and locks per agent, held by the runtime on the agents' behalf."""

    def __init__(self) -> None:
        self._agents: dict[str, _Agent] = {}

    def _of(self, agent: str) -> _Agent:
        return self._agents.setdefault(agent, _Agent())

    def add_claim(self, agent: str, session: str, claim: Claim) -> None:
        held = self._of(agent)
        held.claims[claim.task.id] = claim
        held.sessions.add(session)

    def claim(self, agent: str, task_id: str) -> Claim:
        """The claim ``agent`` holds on ``task_id`` through the runtime.

        Raises:
            NotFoundError: it holds none (never claimed through the API, or finished).
        """
        claim = self._agents.get(agent, _Agent()).claims.get(task_id)
        if claim is None:
            raise NotFoundError("claim", f"{task_id} by {agent}")
        return claim

    def drop_claim(self, agent: str, task_id: str) -> None:
        self._agents.get(agent, _Agent()).claims.pop(task_id, None)

    def add_lock(self, agent: str, session: str, lock: Lock) -> None:
        held = self._of(agent)
        held.locks[lock.resource] = lock
        held.sessions.add(session)

    def lock(self, agent: str, resource: str) -> Lock | None:
        return self._agents.get(agent, _Agent()).locks.get(resource)

    def drop_lock(self, agent: str, resource: str) -> None:
        self._agents.get(agent, _Agent()).locks.pop(resource, None)

    def agents(self) -> list[str]:
        return sorted(self._agents)

    async def release(self, agent: str, reason: str) -> Release:
        """Fail (with retry) every task claim and release every lock of ``agent``."""
        held = self._agents.pop(agent, _Agent())
        tasks, locks = [], []
        for task_id, claim in held.claims.items():
            try:
                await claim.fail(reason, retry=True)
                tasks.append(task_id)
            except SwarmbusError as exc:  # finished or taken over meanwhile: nothing held
                log.info("claim on %s of %s not released: %s", task_id, agent, exc)
        for resource, lock in held.locks.items():
            try:
                await lock.release()
                locks.append(resource)
            except SwarmbusError as exc:  # expired or lost meanwhile: nothing held
                log.info("lock on %s of %s not released: %s", resource, agent, exc)
        return Release(agent, tasks, locks, sorted(held.sessions))


class Departures:
    """Release what a dead or departed agent held and say so on the wire.

    Publishes ``presence.lost`` in every session the agent held something in (or the
    ``runtime`` session if none), as ``agent`` (the runtime's id).
    """

    def __init__(self, bus: Bus, holdings: Holdings, *, agent: str) -> None:
        self.bus = bus
        self.holdings = holdings
        self.agent = agent

    async def depart(self, agent: str, reason: Literal["dead", "left"]) -> Release:
        """Release ``agent``'s claims and locks, then publish ``presence.lost``."""
        released = await self.holdings.release(agent, f"agent {agent} {_WHY[reason]}")
        body = PresenceLost(
            agent_id=agent,
            reason=reason,
            released_tasks=released.tasks,
            released_locks=released.locks,
        )
        for session in released.sessions or [RUNTIME_SESSION]:
            try:
                await self.bus.publish(body, agent=self.agent, session=session)
            except SwarmbusError as exc:  # the release stands; only the notice is lost
                log.warning("cannot announce that %s %s: %s", agent, _WHY[reason], exc)
        log.info(
            "%s %s: released tasks %s, locks %s",
            agent,
            _WHY[reason],
            released.tasks,
            released.locks,
        )
        return released

    async def on_death(self, agent: str) -> None:
        """The presence callback."""
        await self.depart(agent, "dead")
