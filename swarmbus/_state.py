"""The coordination-state seam: a small versioned key-value store.

The blackboard, task records, locks, consensus records and session membership keep
their state in a store with these operations and nothing more: create-once, get with
its revision, compare-and-set, put, delete, per-key TTL, list by prefix and watch by
prefix. NATS JetStream KV (``swarmbus._jetstream.store.NatsStore``) is the default;
other backends implement the same ``StateStore`` protocol and pass the same
conformance tests (``tests/test_state_store.py``).

Like Dapr's state components and A2A's ``VersionedTaskStore``, the seam is drawn at
"a value with a revision": every guarantee above it (exactly-once completion, fencing
tokens, one vote per agent) is a compare-and-set on a revision, so it holds on any
store that implements ``update`` atomically.

Keys are dot-separated tokens (``<session>.<kind>.<id>``); a prefix ends with a dot,
is empty, or is one whole key. Revisions are positive and increase on every write to
a key, also across deletes and expiries (they serve as fencing tokens).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Entry", "StateStore"]


@dataclass(frozen=True)
class Entry:
    """One key's value at one revision. ``value`` is None for a delete (in watches)."""

    key: str
    value: bytes | None
    revision: int
    headers: dict[str, str] | None = None


@runtime_checkable
class StateStore(Protocol):
    """A versioned key-value store for one bucket of coordination state.

    Errors: ``ConflictError`` when a create finds the key or a compare-and-set finds
    another revision; ``PermissionDeniedError``, ``ConnectionError`` and
    ``PublishError`` for refusals and transport failures.
    """

    name: str
    max_value_bytes: int
    """The largest value the store accepts (``MessageTooLargeError`` beyond it)."""

    async def get(self, key: str, *, fresh: bool = False) -> Entry | None:
        """The key's current entry, or None if it has none (never set, deleted, expired).

        A store may answer from a replica that lags a moment behind; ``fresh`` asks the
        authoritative copy (use it before reporting "not found" for something that was
        written a moment ago).
        """
        ...

    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        """Store ``value`` only if the key has no value; the new revision."""
        ...

    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        """Store ``value`` only if the key is still at ``revision``; the new revision."""
        ...

    async def put(self, key: str, value: bytes) -> int:
        """Store ``value`` unconditionally; the new revision."""
        ...

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Delete the key (only if still at ``revision`` when given)."""
        ...

    async def list(self, prefix: str = "") -> list[Entry]:
        """Every live key under ``prefix`` with its entry, in write order."""
        ...

    def watch(
        self, prefix: str = "", *, initial: bool = True
    ) -> AbstractAsyncContextManager[AsyncIterator[Entry | None]]:
        """Changes under ``prefix``: with ``initial``, the current entries first, then
        one ``None`` marking their end; then every later write and delete as it happens.

        ``prefix`` is a key prefix ending in ``.``, ``""`` for every key, or one exact key.
        """
        ...
