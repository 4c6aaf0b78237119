"""A lock key on any ``StateStore``: the seed's lock shape on the seam.

Used by ``Lock`` when ``SWARM_BACKEND`` is not NATS. Acquire is a create-once write
with a TTL (the seed's ``SET NX EX``), refresh a compare-and-set that re-arms the TTL,
release a delete at the holder's revision (the seed's owner-only release). The fencing
token is the revision of the acquiring create; it increases across releases and
expiries because the store's revisions do. A waiter watches the key and tries again
each time it is deleted or expires. No local hand-over queue: waiters race on each
release, and the store decides.

A store may bring lock operations of its own (``lock_key(key)``, same methods): the
Redis store does (one script call per acquire and release, a waiter queue with
hand-over instead of a watch; ``swarmbus._redis_store.RedisLockKey``).

``stored_locks`` reads lock keys back with their expiry on the store's clock, for
``lock_holder`` / ``held_locks`` (``swarmbus locks``, the MCP lock tools): on Redis by
``SCAN`` of the bucket's lock hashes and ``PTTL`` (the lock scripts keep them out of the
bucket's index), on PostgreSQL from ``swarm_state.expires_at``; on any other store from
``get``/``list`` without an expiry.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import anyio

from swarmbus._errors import ConflictError
from swarmbus._state import StateStore

__all__ = ["LockKey", "StoreLockKey", "StoredLock", "lock_key_on", "stored_locks"]


@dataclass(frozen=True)
class StoredLock:
    """A lock key as stored: ``expires_at`` is None where the store cannot tell."""

    key: str
    value: bytes
    revision: int
    expires_at: datetime | None


async def stored_locks(store: StateStore, key: str | None = None) -> list[StoredLock]:
    """The lock keys of ``store``'s bucket that hold a value (only ``key`` if given)."""
    own = getattr(store, "stored_locks", None)
    if own is not None:  # RedisStore, PostgresStore: with each key's expiry
        found: list[StoredLock] = await own(key)
        return found
    if key is not None:
        entry = await store.get(key, fresh=True)
        entries = [] if entry is None else [entry]
    else:
        entries = await store.list()
    return [StoredLock(e.key, e.value, e.revision, None) for e in entries if e.value]


class LockKey(Protocol):
    """One lock key: what ``Lock`` needs of a store (``StoreLockKey`` or the store's own)."""

    async def try_create(self, value: bytes, ttl: int) -> int | None: ...

    async def wait_create(self, value: bytes, ttl: int) -> int: ...

    async def refresh(self, value: bytes, revision: int, ttl: int) -> int | None: ...

    async def release(self, revision: int) -> bool: ...


def lock_key_on(store: StateStore, key: str) -> LockKey:
    """The store's own lock operations on ``key`` if it has them, else ``StoreLockKey``."""
    own = getattr(store, "lock_key", None)
    if own is not None:
        made: LockKey = own(key)
        return made
    return StoreLockKey(store, key)


class StoreLockKey:
    """One lock key on a state store."""

    def __init__(self, store: StateStore, key: str) -> None:
        self.store = store
        self.key = key

    async def try_create(self, value: bytes, ttl: int) -> int | None:
        """The new lock's revision, or None if the key is held."""
        revision = None
        # Shielded: a caller's timeout must not abandon a write that may be stored,
        # which would leave a lock nobody holds until its TTL.
        with anyio.CancelScope(shield=True), contextlib.suppress(ConflictError):
            revision = await self.store.create(self.key, value, ttl=ttl)
        return revision

    async def wait_create(self, value: bytes, ttl: int) -> int:
        """Acquire, waiting for releases and expiries (bound it with a timeout)."""
        revision = await self.try_create(value, ttl)
        if revision is not None:
            return revision
        async with self.store.watch(self.key) as changes:
            held = False
            async for entry in changes:
                if entry is not None and entry.value is not None:
                    held = True  # a holder (the current or a new one)
                    continue
                if entry is None and held:
                    continue  # the end of the initial values: the key is held
                revision = await self.try_create(value, ttl)  # freed (or free at the start)
                if revision is not None:
                    return revision
                held = True
        raise AssertionError("a watch does not end")  # pragma: no cover

    async def refresh(self, value: bytes, revision: int, ttl: int) -> int | None:
        """Re-arm the TTL; the new revision, or None if the lock was lost."""
        try:
            return await self.store.update(self.key, value, revision=revision, ttl=ttl)
        except ConflictError:
            return None

    async def release(self, revision: int) -> bool:
        """Delete the lock if still at ``revision``; False if it was lost."""
        try:
            await self.store.delete(self.key, revision=revision)
        except ConflictError:
            return False
        return True
