"""The event feed behind ``swarm_wait`` and the board resources' update notifications.

One live subscription per session the agent is in (joined, started, or whose board
resource a client subscribed to), made when it enters the session: from then on
every finding, hypothesis, task, proposal and decision of the session lands in a
bounded in-memory feed, numbered. ``swarm_wait`` returns the events after a cursor
(a feed number), blocking until there is one or its timeout passes, so an agent
that passes back the cursor it was given misses nothing and sees nothing twice for
as long as this server runs. The agent's own events are left out (it knows them),
except decisions, which it may have settled itself.

With ``SWARM_BACKEND=redis|postgres`` the events come from the state store instead
(``store_feed.StoreEvents``): servers that share the store but not a NATS server
(each embeds its own) still wake each other.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.abc

from swarmbus import _subjects as subjects
from swarmbus._bus import Bus
from swarmbus._errors import SwarmbusError
from swarmbus._mcp.models import SwarmEvent
from swarmbus._mcp.store_feed import StoreEvents
from swarmbus._mcp.tooling import plain
from swarmbus._messages import Message, event_of

__all__ = ["WAKE_KINDS", "EventFeed"]

log = logging.getLogger("swarmbus.mcp")

#: The events that wake a waiting agent.
WAKE_KINDS: Final = frozenset(
    {
        "finding.reported",
        "hypothesis.proposed",
        "hypothesis.validated",
        "task.created",
        "task.completed",
        "task.failed",
        "action.proposed",
        "action.decided",
        "action.completed",
        "session.completed",
    }
)
_ENVELOPE_FIELDS: Final = frozenset({"id", "type", "source", "timestamp", "correlation_id"})


class EventFeed:
    """The numbered events of the agent's sessions, and who to tell about them.

    ``on_session_event`` callbacks run for each event (the server sends
    ``notifications/resources/updated`` for the session's board from one).
    ``task_group`` runs the store watches of a Redis or PostgreSQL backend.
    """

    def __init__(
        self,
        bus: Bus,
        agent_id: str,
        *,
        capacity: int = 1000,
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        self.bus = bus
        self.agent_id = agent_id
        self.capacity = capacity
        self.on_session_event: list[Callable[[str], Awaitable[None]]] = []
        self._events: deque[SwarmEvent] = deque(maxlen=capacity)
        self._last = 0  # number of the newest event
        self._changed = anyio.Event()
        self._sessions: dict[str, Any] = {}
        self._tg = task_group

    @property
    def sessions(self) -> list[str]:
        """The sessions whose events this feed receives."""
        return sorted(self._sessions)

    @property
    def cursor(self) -> int:
        """The number of the newest event (a cursor that returns only later ones)."""
        return self._last

    async def follow(self, session: str) -> None:
        """Receive ``session``'s events from now on (idempotent)."""
        if session in self._sessions:
            return
        self._sessions[session] = None  # claimed before the await: no second subscription
        try:
            if self.bus.settings.backend != "nats" and self._tg is not None:
                watch = StoreEvents(self.bus, session, self._add)
                await self._tg.start(watch.run)
                self._sessions[session] = watch
                return
            self._sessions[session] = await self.bus.subscribe(
                subjects.session_filter(session), self._on_message, receiver=self.agent_id
            )
        except BaseException:
            del self._sessions[session]
            raise

    async def close(self) -> None:
        """Stop every subscription."""
        for sub in self._sessions.values():
            if isinstance(sub, StoreEvents):
                sub.scope.cancel()
            elif sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception as exc:  # noqa: BLE001 - closing: the connection may be gone
                    log.debug("unsubscribe: %s", exc)
        self._sessions.clear()

    async def _on_message(self, message: Message) -> None:
        route = event_of(message)
        if route is None:
            return
        kind = ".".join(route)
        if kind not in WAKE_KINDS:
            return
        source = message.source
        if source.agent == self.agent_id and kind != "action.decided":
            return
        data = plain(message)
        body = data.get(message.type)
        if not isinstance(body, dict):
            body = {k: v for k, v in data.items() if k not in _ENVELOPE_FIELDS}
        await self._add(source.session, kind, source.agent, message.id, body)

    async def _add(
        self, session: str, kind: str, agent: str, event_id: str, body: dict[str, Any]
    ) -> None:
        """Number and keep one event (unless it is the agent's own), then tell the callbacks."""
        if agent == self.agent_id and kind != "action.decided":
            return
        self._last += 1
        self._events.append(
            SwarmEvent(
                seq=self._last, session_id=session, kind=kind, agent=agent, id=event_id, body=body
            )
        )
        self._changed.set()
        self._changed = anyio.Event()
        for callback in self.on_session_event:
            try:
                await callback(session)
            except SwarmbusError as exc:
                log.warning("notifying about %s: %s", session, exc)

    def after(self, cursor: int, session: str | None = None) -> tuple[list[SwarmEvent], int]:
        """Events numbered after ``cursor`` (of ``session`` if given), and how many of
        them were dropped (the feed holds the last ``capacity``)."""
        oldest = self._events[0].seq if self._events else self._last + 1
        missed = max(0, oldest - cursor - 1)
        events = [e for e in self._events if e.seq > cursor and session in (None, e.session_id)]
        return events, missed

    async def wait(
        self, cursor: int, timeout: float, session: str | None = None
    ) -> tuple[list[SwarmEvent], int]:
        """Like ``after``, but waits up to ``timeout`` seconds for the first event."""
        with anyio.move_on_after(timeout):
            while True:
                events, missed = self.after(cursor, session)
                if events or missed:
                    return events, missed
                await self._changed.wait()
        return self.after(cursor, session)
