"""Findings from any NATS client onto the board, and the retention of old sessions.

A recorder is a durable consumer of ``agent.finding.reported.>`` that creates each
finding key by envelope id, so redeliveries and findings the board already holds are
no-ops; this is how findings from plain NATS clients (any language) reach the board.
Retention purges every key of sessions completed long enough ago; active sessions are
never removed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Final

import anyio
import anyio.abc

from swarmbus import _subjects as subjects
from swarmbus._blackboard.records import FindingRecord, SessionRecord
from swarmbus._blackboard.store import (
    DEFAULT_BUCKET,
    DEFAULT_HISTORY,
    DEFAULT_MAX_VALUE_BYTES,
    BoardStore,
    open_store,
)
from swarmbus._blackboard.watch import read_sessions
from swarmbus._bus import Bus
from swarmbus._errors import SwarmbusError
from swarmbus._jetstream.purge import purge_keys
from swarmbus._jetstream.store import NatsStore
from swarmbus._messages import FindingMessage, Message, now
from swarmbus._state import StateStore

log = logging.getLogger("swarmbus.blackboard")

RECORDER_AGENT: Final = "swarmbus/blackboard"


async def sessions(bus: Bus, bucket: str) -> list[SessionRecord]:
    """Every session on the board (active and completed), oldest first."""
    kv = await open_store(bus, bucket, DEFAULT_HISTORY)  # the stream must exist to read it
    return await read_sessions(kv)


async def purge_completed(
    bus: Bus, older_than: timedelta, bucket: str, at: datetime | None
) -> list[str]:
    """Remove every key of sessions completed more than ``older_than`` ago (their ids)."""
    cutoff = (at or now()) - older_than
    kv = await open_store(bus, bucket, DEFAULT_HISTORY)
    purged = []
    for record in await read_sessions(kv):
        if record.status == "completed" and record.completed and record.completed < cutoff:
            if isinstance(kv, NatsStore):
                await purge_keys(kv, f"{record.session_id}.>")
            else:  # another backend: a delete per key
                for entry in await kv.list(f"{record.session_id}."):
                    await kv.delete(entry.key)
            purged.append(record.session_id)
    return purged


class Recorder:
    """Records reported findings on the board of their session; runs retention."""

    def __init__(
        self,
        bus: Bus,
        kv: StateStore,
        bucket: str,
        retention: timedelta | None,
        retention_interval: float,
    ) -> None:
        self.bus = bus
        self.kv = kv
        self.bucket = bucket
        self.retention = retention
        self.retention_interval = retention_interval
        self.stop = anyio.Event()

    async def consume(
        self, durable: str, deliver_new: bool, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """Run the durable consumer until ``stop``."""
        await self.bus.consume(
            durable,
            [subjects.event_filter("finding", "reported")],
            self.handle,
            receiver=RECORDER_AGENT,
            limiter=anyio.Semaphore(64),
            stop=self.stop,
            deliver_new=deliver_new,
            task_status=task_status,
        )

    async def handle(self, message: Message) -> None:
        if not isinstance(message, FindingMessage):
            return
        session = message.source.session
        kv = self.kv
        if isinstance(kv, NatsStore):
            kv = NatsStore(kv.kv, attributes={"swarmbus.session": session})
        board = BoardStore(self.bus, session, kv, self.bucket, DEFAULT_MAX_VALUE_BYTES)
        f = message.finding
        await board._record_finding(
            FindingRecord(
                id=message.id,
                agent=message.source.agent,
                timestamp=message.timestamp,
                category=f.category,
                content=f.content,
                confidence=f.confidence,
                evidence=list(f.evidence),
            )
        )

    async def retain(self) -> None:
        """``purge_completed`` every ``retention_interval`` seconds until ``stop``."""
        assert self.retention is not None
        while not self.stop.is_set():
            try:
                await purge_completed(self.bus, self.retention, self.bucket, None)
            except SwarmbusError as exc:  # retry next interval; keep recording
                log.warning("blackboard retention on %s failed: %s", self.bucket, exc)
            with anyio.move_on_after(self.retention_interval):
                await self.stop.wait()


@contextlib.asynccontextmanager
async def recording(
    bus: Bus,
    *,
    bucket: str = DEFAULT_BUCKET,
    durable: str | None = None,
    deliver_new: bool = False,
    retention: timedelta | None = None,
    retention_interval: float = 3600.0,
) -> AsyncIterator[None]:
    """Record every finding published on ``agent.finding.reported.>`` on the board.

    This is how findings from plain NATS clients (any language) reach the board:
    a durable consumer creates each finding key by envelope id, so redeliveries
    and findings the board already holds are no-ops. Run one (or more: they share
    the durable) per deployment. With ``retention``, it also runs
    ``purge_completed`` every ``retention_interval`` seconds.
    """
    kv = await open_store(bus, bucket, DEFAULT_HISTORY)
    recorder = Recorder(bus, kv, bucket, retention, retention_interval)
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.consume, durable or f"swarmbus-board-{bucket}", deliver_new)
        if retention is not None:
            tg.start_soon(recorder.retain)
        try:
            yield
        finally:
            recorder.stop.set()
