"""Reading a session's board: one-pass snapshots and a live tail of its changes.

A snapshot is one counted read of the last entry of every key of the session (no
per-key get); its revision is the last entry read, so a watcher that resumes after
it misses nothing and repeats nothing. The tail is an ordered consumer from the next
revision on, feeding a memory stream that the watcher drains.
"""

from __future__ import annotations

import contextlib
import math
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


async def read_snapshot(kv: NatsStore, session: str) -> Snapshot:
    """The whole board of ``session``, read in one pass over the KV stream."""
    entries, revision = await scan(kv, f"{session}.>")
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


async def read_sessions(kv: NatsStore) -> list[SessionRecord]:
    """Every session record in the bucket, oldest first."""
    found: list[SessionRecord] = []
    entries, _ = await scan(kv, "*.session")
    for _, data in entries:
        with contextlib.suppress(InvalidMessageError):  # not a session record: skip it
            found.append(decode_json(DECODERS["session"], data, max_bytes=MAX_STORED_BYTES))
    return sorted(found, key=lambda s: s.started)


class Tail:
    """The changes of one session's board from revision ``start`` on, in order."""

    def __init__(self, kv: NatsStore, session: str, start: int) -> None:
        self.session = session
        self.send, self.receive = anyio.create_memory_object_stream[BoardChange](math.inf)
        self._watch = KvWatch.on_store(kv, self._on_change, keys=f"{session}.>", start=start)

    async def open(self) -> None:
        await self._watch.start()

    async def close(self) -> None:
        await self._watch.stop()
        self.send.close()

    def _on_change(self, change: KvChange) -> None:
        parsed = parse_key(self.session, change.key)
        if parsed is None:
            return
        kind, token = parsed
        value = None
        if change.operation == "put":
            try:
                value = decode_json(DECODERS[kind], change.value, max_bytes=MAX_STORED_BYTES)
            except InvalidMessageError:
                return  # not a board value (written by something else): skip it
        self.send.send_nowait(
            BoardChange(
                revision=change.revision,
                kind=kind,
                item_id=token,
                operation=change.operation,
                value=value,
            )
        )
