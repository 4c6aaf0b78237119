"""The feed's events from the state store, for ``SWARM_BACKEND=redis|postgres``.

With a Redis or PostgreSQL backend, two ``mcp-agent-swarm`` processes need not share a
NATS server (each embeds its own when ``NATS_URL`` is unset), so the events one
publishes may never reach the other. What they do share is the store, and every event
``swarm_wait`` reports is the echo of a change there: a finding, hypothesis or action
on the session's board, a task record. ``StoreEvents`` watches the session's board and
task records and turns each change into the event NATS would have carried:

=================================  ===================================================
change                             event (agent)
=================================  ===================================================
new ``finding``                    ``finding.reported`` (its agent)
new ``hypothesis``                 ``hypothesis.proposed`` (its agent)
hypothesis validated / refuted     ``hypothesis.validated`` (``validated_by``)
new ``action``                     ``action.proposed`` (its agent)
action approved / rejected         ``action.decided`` (who recorded the status)
action completed                   ``action.completed`` (who recorded the status)
session completed                  ``session.completed`` (``completed_by``)
new task record                    ``task.created`` (``created_by``)
task completed / failed            ``task.completed`` / ``task.failed`` (``assigned_to``)
=================================  ===================================================

The watch starts with the current entries: they are the state the changes are compared
with, not events (the feed reports what happens after the agent joined).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio.abc
import msgspec

from swarmbus._backends import open_store
from swarmbus._blackboard import DEFAULT_BUCKET
from swarmbus._blackboard.records import (
    DECODERS,
    ActionRecord,
    HypothesisRecord,
    SessionRecord,
    parse_key,
)
from swarmbus._bus import Bus
from swarmbus._errors import SwarmbusError
from swarmbus._state import Entry, StateStore
from swarmbus._tasks.model import TASKS_BUCKET
from swarmbus._tasks.model import decoder as task_decoder

__all__ = ["StoreEvents"]

log = logging.getLogger("swarmbus.mcp")

Sink = Callable[[str, str, str, str, dict[str, Any]], Awaitable[None]]
"""Where an event goes: (session, kind, agent, id, body)."""

_DECIDED: Final = frozenset({"approved", "rejected"})


class StoreEvents:
    """Watches one session's board and task records; hands each change's event to ``sink``."""

    def __init__(self, bus: Bus, session: str, sink: Sink) -> None:
        self.bus = bus
        self.session = session
        self.sink = sink
        self.scope = anyio.CancelScope()
        self._seen: dict[str, str] = {}  # key -> state its last change left it in

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Watch until ``scope`` is cancelled; started once both watches are live."""
        board = await open_store(self.bus, DEFAULT_BUCKET)
        tasks = await open_store(self.bus, TASKS_BUCKET)
        with self.scope:
            async with anyio.create_task_group() as tg:
                await tg.start(self._watch, board, self._board_event)
                await tg.start(self._watch, tasks, self._task_event)
                task_status.started()

    async def _watch(
        self,
        store: StateStore,
        event_of: Callable[[Entry, bool], tuple[str, str, dict[str, Any]] | None],
        *,
        task_status: anyio.abc.TaskStatus[None],
    ) -> None:
        live = False
        while True:  # a watch broken by a connection error is made again
            try:
                async with store.watch(f"{self.session}.") as entries:
                    async for entry in entries:
                        if entry is None:
                            if not live:
                                live = True
                                task_status.started()
                            continue
                        found = event_of(entry, live)
                        if found is not None and live:
                            kind, agent, body = found
                            # the record's id is the id of the event NATS would carry
                            event_id = str(body.get("id") or f"{entry.key}@{entry.revision}")
                            await self.sink(self.session, kind, agent, event_id, body)
            except SwarmbusError as exc:
                log.warning("watching %s of %s: %s; again", store.name, self.session, exc)
                await anyio.sleep(0.5)

    def _board_event(self, entry: Entry, live: bool) -> tuple[str, str, dict[str, Any]] | None:
        parsed = parse_key(self.session, entry.key)
        if parsed is None or entry.value is None:
            return None
        kind, _ = parsed
        try:
            record = DECODERS[kind].decode(entry.value)
        except (msgspec.DecodeError, RecursionError):
            return None  # not a board value
        before = self._seen.get(entry.key)
        status = str(getattr(record, "status", "put"))
        self._seen[entry.key] = status
        body = msgspec.to_builtins(record)
        if kind in ("finding", "hypothesis", "action") and before is None:
            return f"{kind}.{'reported' if kind == 'finding' else 'proposed'}", record.agent, body
        if before == status:
            return None
        if isinstance(record, HypothesisRecord) and status in ("validated", "refuted"):
            return "hypothesis.validated", record.validated_by or record.agent, body
        if isinstance(record, ActionRecord) and status in _DECIDED | {"completed"}:
            agent = record.history[-1].agent if record.history else record.agent
            return f"action.{'completed' if status == 'completed' else 'decided'}", agent, body
        if isinstance(record, SessionRecord) and status == "completed":
            return "session.completed", record.completed_by or record.initiator, body
        return None

    def _task_event(self, entry: Entry, live: bool) -> tuple[str, str, dict[str, Any]] | None:
        if entry.value is None or entry.key.count(".") != 1:
            return None
        try:
            task = task_decoder.decode(entry.value)
        except (msgspec.DecodeError, RecursionError):
            return None
        before = self._seen.get(entry.key)
        self._seen[entry.key] = task.status
        body = msgspec.to_builtins(task)
        if before is None:
            return "task.created", task.created_by, body
        if before != task.status and task.status in ("completed", "failed"):
            return f"task.{task.status}", task.assigned_to or task.created_by, body
        return None
