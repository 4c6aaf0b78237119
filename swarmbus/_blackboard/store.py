"""A session's board keys on the state store: encode, create-once, compare-and-set.

Every blackboard write is one of three: create-once (findings, new hypotheses and
actions, the session record), put (the context), or a read-modify-write under
compare-and-set retried with jitter (everything that changes). ``BoardStore`` is
those on a ``NatsStore`` (the ``StateStore`` seam), with the key layout and the
deterministic event ids; ``Blackboard`` adds the operations and their events.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

import anyio
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._backends import open_store as open_state_store
from swarmbus._blackboard.records import (
    DECODERS,
    FindingRecord,
    Record,
    RecordT,
    encoder,
    item_token,
)
from swarmbus._bus import Bus
from swarmbus._decode import MAX_STORED_BYTES, decode_json
from swarmbus._errors import (
    ConflictError,
    InvalidMessageError,
    NotFoundError,
    ValueTooLargeError,
)
from swarmbus._jetstream.store import NatsStore
from swarmbus._state import StateStore

DEFAULT_BUCKET: Final = "SWARMBUS_BOARD"
DEFAULT_HISTORY: Final = 10
DEFAULT_MAX_VALUE_BYTES: Final = 256 * 1024
CAS_ATTEMPTS: Final = 200


class BoardStore:
    """One session's keys in a board bucket: ``<session>.<kind>[.<item token>]``."""

    def __init__(self, bus: Bus, session: str, kv: StateStore, bucket: str, max_value_bytes: int):
        self.bus = bus
        self.session = session
        self.bucket = bucket
        self.max_value_bytes = max_value_bytes
        self._kv = kv

    def _key(self, kind: str, item_id: str | None = None) -> str:
        base = f"{self.session}.{kind}"
        return base if item_id is None else f"{base}.{item_token(item_id)}"

    def _event_id(self, what: str, item_id: str = "") -> str:
        """A deterministic event id, so a retried call's event is de-duplicated."""
        return subjects.safe_token(f"board:{self.session}:{what}:{item_id}")

    def _encode(self, key: str, record: Record) -> bytes:
        """Encode a value; inputs were validated where the record was built."""
        try:
            data = encoder.encode(record)
        except (TypeError, msgspec.EncodeError) as exc:
            raise InvalidMessageError("schema", f"{key}: {exc}") from None
        if len(data) > self.max_value_bytes:
            raise ValueTooLargeError(key, len(data), self.max_value_bytes)
        return data

    async def _create(self, key: str, record: Record) -> int:
        """Create-once; ConflictError if the key exists."""
        return await self._kv.create(key, self._encode(key, record))

    async def _put(self, key: str, data: bytes) -> int:
        return await self._kv.put(key, data)

    async def _update(self, key: str, data: bytes, revision: int) -> int:
        """Compare-and-set on ``revision``; ConflictError if the key changed since."""
        return await self._kv.update(key, data, revision=revision)

    async def _get(self, kind: str, item_id: str | None, cls: type[RecordT]) -> tuple[RecordT, int]:
        key = self._key(kind, item_id)
        entry = await self._kv.get(key)
        if entry is None:
            raise NotFoundError(kind, item_id or self.session)
        try:
            value: RecordT = decode_json(
                DECODERS[kind], entry.value or b"", max_bytes=MAX_STORED_BYTES
            )
        except InvalidMessageError as exc:  # written by something else than a board
            raise InvalidMessageError(exc.code, f"{key} is not a board value: {exc}") from exc
        return value, entry.revision

    async def _modify(
        self,
        kind: str,
        item_id: str | None,
        cls: type[RecordT],
        change: Callable[[RecordT], RecordT],
        *,
        missing: RecordT | None = None,
    ) -> RecordT:
        """Read-modify-write under compare-and-set, retrying (with jitter) on conflict."""
        key = self._key(kind, item_id)
        for attempt in range(CAS_ATTEMPTS):
            try:
                current, revision = await self._get(kind, item_id, cls)
            except NotFoundError:
                if missing is None:
                    raise
                current, revision = missing, 0
            new = change(current)
            try:
                await self._update(key, self._encode(key, new), revision)
            except ConflictError:
                await anyio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))
                continue
            return new
        raise ConflictError(key, None, f"still contended after {CAS_ATTEMPTS} attempts")

    async def _record_finding(self, record: FindingRecord) -> FindingRecord:
        """Create the finding once; what the board holds if it was there already."""
        key = self._key("finding", record.id)
        try:
            await self._create(key, record)
        except ConflictError:
            return (await self._get("finding", record.id, FindingRecord))[0]
        return record


async def open_store(bus: Bus, bucket: str, history: int, session: str = "") -> StateStore:
    """The board bucket (created with the bus's replicas/storage) as a state store.

    Writes carry ``swarmbus.session`` on their PRODUCER spans. On another backend than
    NATS (``SWARM_BACKEND``), the store ``swarmbus._backends.open_store`` gives.
    """
    if bus.settings.backend != "nats":
        return await open_state_store(bus, bucket)
    kv = await bus.key_value(
        bucket,
        history=history,
        max_value_size=bus.settings.max_message_bytes,
        description="swarmbus blackboard: one workspace per session",
    )
    return NatsStore(kv, attributes={"swarmbus.session": session})
