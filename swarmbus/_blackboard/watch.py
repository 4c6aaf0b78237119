"""Reading a session's board: one-pass snapshots and a live tail of its changes.

A snapshot is one counted read of the last entry of every key of the session (no
per-key get); its revision is the last entry read, so a watcher that resumes after
it misses nothing and repeats nothing. The tail is an ordered consumer from the next
revision on, feeding a memory stream that the watcher drains.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import msgspec

from swarmbus._blackboard.records import (
    DECODERS,
    BoardChange,
    SessionRecord,
    Snapshot,
    parse_key,
)
from swarmbus._decode import MAX_STORED_BYTES, decode_json
from swarmbus._errors import InvalidMessageError
from swarmbus._jetstream.latest import scan
from swarmbus._jetstream.store import NatsStore
from swarmbus._jetstream.watch import KvChange, KvWatch
from swarmbus._state import Entry, StateStore


async def _scan(kv: StateStore, session: str) -> tuple[list[tuple[str, bytes]], int]:
    if isinstance(kv, NatsStore):
        return await scan(kv, f"{session}.>")
    # another backend (SWARM_BACKEND): its list, and the newest revision in it
    listed = await kv.list(f"{session}.")
    return [(e.key, e.value or b"") for e in listed], max((e.revision for e in listed), default=0)


async def read_snapshot(kv: StateStore, session: str) -> Snapshot:
    """The whole board of ``session``, read in one pass over the KV stream."""
    entries, revision = await _scan(kv, session)
    items: dict[str, dict[str, Any]] = {"finding": {}, "hypothesis": {}, "action": {}}
    single: dict[str, Any] = {}
    start = len(session) + 1
    for key, data in entries:  # tight loop: a snapshot may hold tens of thousands of keys
        kind, _, token = key[start:].partition(".")
        decoder = DECODERS.get(kind)
        if decoder is None:
            continue
        try:
            value = decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deeply
            continue  # not a board value (written by something else): skip it
        table = items.get(kind)
        if table is None:
            single[kind] = value
        else:
            table[token] = value
    return Snapshot(
        session_id=session,
        revision=revision,
        session=single.get("session"),
        context=single.get("context"),
        findings=tuple(items["finding"].values()),
        hypotheses=tuple(items["hypothesis"].values()),
        actions_taken=tuple(items["action"].values()),
    )


async def read_sessions(kv: StateStore) -> list[SessionRecord]:
    """Every session record in the bucket, oldest first."""
    found: list[SessionRecord] = []
    if isinstance(kv, NatsStore):
        entries, _ = await scan(kv, "*.session")
    else:
        entries = [(e.key, e.value or b"") for e in await kv.list() if e.key.endswith(".session")]
    for _, data in entries:
        with contextlib.suppress(InvalidMessageError):  # not a session record: skip it
            found.append(decode_json(DECODERS["session"], data, max_bytes=MAX_STORED_BYTES))
    return sorted(found, key=lambda s: s.started)


class Tail:
    """The changes of one session's board from revision ``start`` on, in order."""

    def __init__(self, kv: StateStore, session: str, start: int) -> None:
        assert isinstance(kv, NatsStore)  # other stores: StoreTail (open_tail)
        self.session = session
        self.send, self.receive = anyio.create_memory_object_stream[BoardChange](math.inf)
        self._watch = KvWatch.on_store(kv, self._on_change, keys=f"{session}.>", start=start)

    async def open(self) -> None:
        await self._watch.start()

    async def close(self) -> None:
        await self._watch.stop()
        self.send.close()

    def _on_change(self, change: KvChange) -> None:
        board_change = _board_change(self.session, change)
        if board_change is not None:
            self.send.send_nowait(board_change)


def _board_change(session: str, change: KvChange) -> BoardChange | None:
    """The board's view of one change of a session key (None: not a board value)."""
    parsed = parse_key(session, change.key)
    if parsed is None:
        return None
    kind, token = parsed
    value = None
    if change.operation == "put":
        try:
            value = decode_json(DECODERS[kind], change.value, max_bytes=MAX_STORED_BYTES)
        except InvalidMessageError:
            return None  # not a board value (written by something else): skip it
    return BoardChange(
        revision=change.revision,
        kind=kind,
        item_id=token,
        operation=change.operation,
        value=value,
    )


def open_tail(kv: StateStore, session: str, start: int) -> Tail | StoreTail:
    """The tail of ``session``'s board from revision ``start`` on, on any backend."""
    return Tail(kv, session, start) if isinstance(kv, NatsStore) else StoreTail(kv, session, start)


class StoreTail:
    """``Tail`` on a store that is not NATS KV: a ``StateStore.watch`` of the session.

    The watch starts with the current entries; those older than ``start`` are in the
    snapshot already and are skipped. A key deleted between the snapshot and the
    watch's start is not reported (the seam has no "watch from revision").
    """

    def __init__(self, kv: StateStore, session: str, start: int) -> None:
        self.session = session
        self.start = start
        self._watch: AbstractAsyncContextManager[AsyncIterator[Entry | None]] = kv.watch(
            f"{session}."
        )
        self._entries: AsyncIterator[Entry | None] | None = None

    async def open(self) -> None:
        self._entries = await self._watch.__aenter__()

    async def close(self) -> None:
        await self._watch.__aexit__(None, None, None)

    @property
    def receive(self) -> AsyncIterator[BoardChange]:
        return self._changes()

    async def _changes(self) -> AsyncIterator[BoardChange]:
        assert self._entries is not None
        async for entry in self._entries:
            if entry is None or entry.revision < self.start:
                continue
            if entry.value is None:
                change = KvChange(entry.key, entry.revision, "delete", b"")
            else:
                change = KvChange(entry.key, entry.revision, "put", entry.value)
            board_change = _board_change(self.session, change)
            if board_change is not None:
                yield board_change
