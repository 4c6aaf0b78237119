"""Distributed locks on a JetStream KV bucket: per-key TTL, owner-only release, fencing.

A lock on a resource is one key of the ``SWARMBUS_LOCKS`` bucket (``lock_key``). Every
write is a compare-and-set on the key's last revision, so only one acquisition can win
and a holder can only release or refresh the revision it wrote itself. The key carries a
server-side TTL (nats-server >= 2.11): a crashed holder's lock expires on its own. The
server removes it without a marker (the bucket has no limit markers: a stream with them
must allow rollup headers, and a rollup through any lock key would empty the bucket), so
a waiter that sees a holder's record arms a timer for its expiry (the write's server
time plus its TTL) and reads the key when it fires; a key whose TTL passed reads as
missing. Releases stay purge markers that waiters see through their watch.

The fencing token of an acquisition is the revision of the write that created the lock.
It increases across releases and expiries (it is the bucket stream's sequence, never
reset because the bucket is never deleted), so a protected resource can refuse writes
from a holder whose lease has already passed to someone else.

With ``SWARM_BACKEND=redis|postgres`` a ``Lock`` keeps its key on that store instead
(``swarmbus._store_lock``; on Redis the store's own lock scripts and waiter queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Annotated, Final

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from swarmbus import _subjects as subjects
from swarmbus._backends import open_store
from swarmbus._bus import Bus
from swarmbus._decode import decode_json as _decode_json
from swarmbus._errors import (
    InvalidIdentifierError,
    InvalidMessageError,
    InvalidTransitionError,
    InvalidTTLError,
    LockLostError,
    LockTimeoutError,
    SwarmbusError,
)
from swarmbus._jetstream.acks import CasConflict as _Conflict
from swarmbus._jetstream.acks import CasWriter
from swarmbus._jetstream.headers import (
    EXPECTED_LAST_SUBJECT_SEQUENCE,
    KV_OPERATION,
    KV_PURGE,
    MSG_ID,
)
from swarmbus._jetstream.headers import MARKER_REASON as MARKER_REASON  # the expiry marker
from swarmbus._jetstream.headers import TTL as TTL_HEADER
from swarmbus._jetstream.latest import bucket_entries, kv_last
from swarmbus._jetstream.watch import KvChange, KvWatch
from swarmbus._observe._instruments import lock_wait
from swarmbus._store_lock import LockKey, lock_key_on, stored_locks
from swarmbus._telemetry import send_span

log = logging.getLogger("swarmbus.locks")

LOCKS_BUCKET: Final = "SWARMBUS_LOCKS"
DEFAULT_TTL: Final = 30
DEFAULT_TIMEOUT: Final = 30.0
MARKER_TTL: Final = 60
"""Seconds that release markers stay in the bucket (then the key is empty)."""
EXPIRY_MARGIN: Final = 0.005
"""Seconds after a holder's expiry that a waiter reads the key (the server's timer)."""
RECHECK: Final = 0.02
MAX_RECHECK: Final = 1.0
"""First and longest delay between reads of a key whose holder outlived its expiry
(client and server clocks differ, or the server removes the key late)."""
PROVISIONAL: Final = 0.05
"""Seconds after a lost compare-and-set that a waiter reads the key if its watch has not
shown the winner's record (written before the watch saw this key): to time its expiry."""
WATCH_INACTIVE_THRESHOLD: Final = 5.0
RECENT_HOLDERS: Final = 32
"""Holders per key that waiters rank themselves against (the oldest are forgotten)."""
RECENT_WINDOW: Final = 30.0
"""Seconds a key's holder history is kept after its last local waiter left."""
HAND_OVERS: Final = 7
"""Hand-overs to a waiter on the same connection in a row before a release marker."""
MIN_STEP: Final = 0.0005
MAX_STEP: Final = 0.02
"""Bounds of the delay between one rank of waiters and the next (seconds)."""


class _Record(msgspec.Struct, omit_defaults=True):
    """The value of a lock key. ``token`` is set by refreshes (0: the entry's revision)."""

    owner: str
    ttl: Annotated[int, msgspec.Meta(ge=1)]
    token: Annotated[int, msgspec.Meta(ge=0)] = 0


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(_Record)
MAX_RECORD_BYTES: Final = 4096
"""A lock record is a few dozen bytes; anything much larger is not one."""


def _record_of(key: str, value: bytes | None, ttl: str | None) -> _Record:
    """The lock record stored under ``key``, or InvalidMessageError if it is broken.

    Anyone who may write one key of the bucket can store anything there. A broken
    value (not a record, or a record written without a TTL, which would never expire)
    names no holder, so it is treated as a free key that an acquisition takes over
    with a compare-and-set on its revision: the new revision is still a valid fencing
    token (higher than any earlier holder's), so a holder the bad write overwrote is
    refused by the protected resource and loses its next refresh.
    """
    record = _decode_json(_decoder, value, what=f"lock key {key!r}", max_bytes=MAX_RECORD_BYTES)
    if ttl is None:
        raise InvalidMessageError("bad_header", f"lock key {key!r} was written without a TTL")
    return record


@dataclass(frozen=True)
class Lease:
    """A lock held by this process: pass ``token`` to the protected resource."""

    resource: str
    owner: str
    token: int
    ttl: int


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as stored on the server. ``expires_at`` is server time (UTC)."""

    resource: str
    owner: str
    token: int
    expires_at: datetime


def whole_seconds(ttl: float) -> int:
    """Round a TTL up to whole seconds (the server's unit), refusing values <= 0.

    Rounding up keeps the lease at least as long as the caller asked for.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidTTLError(ttl)
    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidTTLError(ttl)
    return max(1, math.ceil(ttl))


@dataclass(frozen=True)
class _Handed:
    """The lock was handed to a waiter by its releasing holder: stored at ``revision``."""

    revision: int


@dataclass
class _Waiter:
    """A local waiter: where to tell it, who it is, the revision it started after, and
    the lease length it asked for (used when the holder hands the lock over)."""

    send: MemoryObjectSendStream[int | _Handed | None]
    owner: str
    since: int
    ttl: int


@dataclass
class _Expiry:
    """The armed expiry of a key's holder record: the head reads the key ``at`` then.

    ``at`` is event-loop time. ``timer`` fires at or before ``at`` (one timer per key,
    re-armed when it fires early: every acquisition moves ``at``, and a timer per write
    would cost more than the write's own handling); None once fired (the head is reading
    the key). ``retries`` counts the reads that found the record still there;
    ``provisional``: armed after a lost race, before the winner's record was seen.
    """

    revision: int
    at: float
    timer: asyncio.TimerHandle | None = None
    retries: int = 0
    provisional: bool = False


class _Bucket:
    """A locks bucket as one bus sees it: opened once, one watch for all local waiters.

    The watch is an ordered consumer on the whole bucket with in-memory state that
    delivers only new writes. It is created on the first wait and kept for the life of
    the connection (a consumer per wait would cost a round trip, ~10 ms when
    file-backed). Local waiters for a key queue in FIFO order and only the head is told
    when the key is freed, so a release costs one compare-and-set per process instead
    of one per waiter, and waiters in one process are served in arrival order.

    Across connections, every connection's head would race for each release (all but
    one compare-and-set lose). So heads take turns, least recently served first: every
    watch sees the same acquisitions, so every connection keeps the same list of a
    key's recent holders, oldest acquisition first. A head ranks itself by the holders
    whose last acquisition is older than its own (or, if it never held the key, than
    the moment it started waiting) and defers its attempt by ``rank`` steps of about
    two observed hand-off times; it cancels the attempt when the watch shows the key
    taken. Holders that let their turn pass (gone, or slow) are dropped from the list
    when a later-ranked one acquires. Only the attempts' timing depends on this: every
    acquisition is still a compare-and-set, and a head that is not told in time (or
    whose list differs) merely races as before; a dead waiter delays the others by at
    most one step per rank, once.
    """

    def __init__(self, bus: Bus, name: str) -> None:
        self.name = name
        self.provisioned = False
        self.writer = CasWriter(
            bus.nc,
            bus.js,
            guard=bus._permission_guard,
            timeout=bus.settings.request_timeout,
            retry_for=bus.settings.retry_for,
        )
        self._guard = anyio.Lock()
        self._watch = KvWatch(
            bus.js,
            name,
            self._on_change,
            memory=True,
            inactive_threshold=WATCH_INACTIVE_THRESHOLD,
        )
        self._watching = False
        self._last_seq = 0
        self._queues: dict[str, list[_Waiter]] = {}
        # key -> {owner: revision of its last acquisition}, oldest first
        self._recent: dict[str, dict[str, int]] = {}
        self._idle: dict[str, float] = {}  # key -> when its last local waiter left
        self._freed_at: dict[str, float] = {}  # key -> when the watch saw it freed
        self._turns: dict[str, asyncio.TimerHandle] = {}  # key -> its head's deferred try
        self._expiries: dict[str, _Expiry] = {}  # key -> its holder's expiry (local waiters)
        self._gap = MIN_STEP  # smoothed time from "freed" to "acquired" on the watch
        # Hand-overs of a key since its last release marker. After HAND_OVERS in a row
        # a release writes a marker, so waiters on other connections (invisible here
        # until they have held the key) get their chance.
        # key -> (hand-overs since the last marker, revision of the first of them)
        self._handed_over: dict[str, tuple[int, int]] = {}

    def queued(self, key: str) -> bool:
        """Whether local waiters are queued for ``key`` (a newcomer goes behind them)."""
        return bool(self._queues.get(key))

    def delay(self, key: str, waiter: _Waiter) -> float:
        """Seconds the head ``waiter`` defers its try on a freed key (its rank in steps)."""
        recent = self._recent.get(key)
        if not recent:
            return 0.0
        mine = recent.get(waiter.owner, waiter.since)
        rank = sum(1 for seq in recent.values() if seq < mine)
        return rank * min(MAX_STEP, max(MIN_STEP, 2 * self._gap))

    def successor(self, key: str) -> _Waiter | None:
        """The local head waiter of ``key`` if it is its turn (a holder may hand over)."""
        queue = self._queues.get(key)
        chain = self._handed_over.get(key)
        if not queue or key in self._turns or (chain and chain[0] >= HAND_OVERS):
            return None
        head = queue[0]
        return head if self.delay(key, head) == 0 else None

    def handed(self, key: str, waiter: _Waiter, revision: int) -> bool:
        """Give ``waiter`` the lock stored for it at ``revision``; False if it left."""
        count, first = self._handed_over.get(key, (0, revision))
        self._handed_over[key] = (count + 1, first)
        queue = self._queues.get(key)
        if not queue or waiter not in queue:
            return False
        waiter.send.send_nowait(_Handed(revision))
        return True

    def holding(self, key: str, revision: int, seconds: float) -> None:
        """The record stored at ``revision`` holds ``key`` for ``seconds`` more.

        Arms (for local waiters only) the head's read of the key at its expiry: the
        server removes an expired lock without a marker. A later revision replaces an
        earlier one; an expiry already armed for ``revision`` is kept, and one that fired
        and found the record still there re-arms with a growing delay.
        """
        if key not in self._queues:
            return
        armed = self._expiries.get(key)
        retries = 0
        if armed is not None:
            if armed.revision > revision:
                return
            if armed.revision == revision:
                if armed.timer is not None and not armed.provisional:
                    return
                if armed.timer is None:  # fired: still there
                    retries = armed.retries + 1
                    seconds = max(seconds, min(MAX_RECHECK, RECHECK * 2**armed.retries))
        at = asyncio.get_running_loop().time() + max(0.0, seconds) + EXPIRY_MARGIN
        self._arm(key, _Expiry(revision, at, retries=retries))

    def lost_to(self, key: str, revision: int) -> None:
        """A compare-and-set of a local waiter lost to the write at ``revision``.

        Its record normally reaches the watch (which arms its expiry); if it was written
        before this connection watched the key, the head reads it soon to arm it.
        """
        armed = self._expiries.get(key)
        if key not in self._queues or (armed is not None and armed.revision >= revision):
            return
        at = asyncio.get_running_loop().time() + PROVISIONAL
        self._arm(key, _Expiry(revision, at, provisional=True))

    def _arm(self, key: str, expiry: _Expiry) -> None:
        """Make ``expiry`` the key's, keeping its running timer if it fires in time."""
        previous = self._expiries.get(key)
        timer = previous.timer if previous is not None else None
        if timer is not None and timer.when() > expiry.at:
            timer.cancel()
            timer = None
        if timer is None:
            loop = asyncio.get_running_loop()
            timer = loop.call_at(expiry.at, self._expired, key)
        expiry.timer = timer
        self._expiries[key] = expiry

    def _disarm(self, key: str) -> None:
        if (armed := self._expiries.pop(key, None)) and armed.timer is not None:
            armed.timer.cancel()

    def _expired(self, key: str) -> None:
        """The key's timer fired: at its holder's expiry, the head reads the key."""
        armed = self._expiries.get(key)
        if armed is None:
            return
        loop = asyncio.get_running_loop()
        if armed.at > loop.time():  # a later write moved the expiry: wait for it
            armed.timer = loop.call_at(armed.at, self._expired, key)
            return
        armed.timer = None
        if not armed.provisional:
            chain = self._handed_over.get(key)
            if chain and armed.revision >= chain[1]:
                del self._handed_over[key]
            if key in self._recent:
                self._freed_at[key] = time.monotonic()
        self._freed(key, None)

    @contextlib.asynccontextmanager
    async def waiting(
        self, key: str, owner: str, hint: int | None, ttl: int
    ) -> AsyncIterator[MemoryObjectReceiveStream[int | _Handed | None]]:
        """Queue for ``key``; at the head, receive what to try next.

        An int is the revision of a write that freed the key (compare-and-set on it),
        given at this waiter's turn; None means "read the key": the state before this
        waiter became head is unknown. A waiter that finds the queue empty starts with
        ``hint`` (a revision it knows freed the key, or None). Leaving without the lock
        passes a None to the next one.
        """
        async with self._guard:
            if not self._watching:
                await self._watch.start()
                self._watching = True
        send, receive = anyio.create_memory_object_stream[int | _Handed | None](math.inf)
        self._recent.setdefault(key, {})
        self._idle.pop(key, None)
        waiter = _Waiter(send, owner, self._last_seq, ttl)
        queue = self._queues.setdefault(key, [])
        queue.append(waiter)
        if len(queue) == 1:
            if hint is None:
                send.send_nowait(None)
            else:
                self._freed(key, hint)
        acquired = False
        try:
            with receive:
                yield receive
            acquired = True
        finally:
            head = queue[0] is waiter
            queue.remove(waiter)
            send.close()
            if head and (turn := self._turns.pop(key, None)):
                turn.cancel()
            if not queue:
                del self._queues[key]
                self._disarm(key)
                self._forget_idle(key)
            elif head and not acquired:
                queue[0].send.send_nowait(None)

    def _freed(self, key: str, revision: int | None) -> None:
        """Tell the head waiter of ``key`` (now, or at its turn) that ``revision`` freed it.

        None: something freed it that the head must read (a broken record).
        """
        queue = self._queues.get(key)
        if not queue:
            return
        if turn := self._turns.pop(key, None):
            turn.cancel()
        head = queue[0]
        delay = self.delay(key, head)
        if delay:
            loop = asyncio.get_running_loop()
            self._turns[key] = loop.call_later(delay, self._turn, key, head, revision)
        else:
            head.send.send_nowait(revision)

    def _turn(self, key: str, head: _Waiter, revision: int | None) -> None:
        del self._turns[key]
        head.send.send_nowait(revision)  # still the head: leaving cancels the turn

    def _forget_idle(self, key: str) -> None:
        now = time.monotonic()
        self._idle[key] = now
        for idle in [k for k, t in self._idle.items() if now - t > RECENT_WINDOW]:
            del self._idle[idle]
            self._recent.pop(idle, None)
            self._freed_at.pop(idle, None)
            self._handed_over.pop(idle, None)

    def _on_change(self, change: KvChange) -> None:
        """One write of the bucket, as the watch sees it (on the client's reader task)."""
        key = change.key
        self._last_seq = seq = change.revision
        if change.removed:
            self._disarm(key)
            chain = self._handed_over.get(key)
            if chain and seq > chain[1]:  # a marker after the chain began (not a late one)
                del self._handed_over[key]
            if key in self._recent:
                self._freed_at[key] = time.monotonic()
            self._freed(key, seq)
            return
        recent = self._recent.get(key)
        if recent is None:
            return
        if turn := self._turns.pop(key, None):  # taken before the head's turn came
            turn.cancel()
        try:
            record = _record_of(key, change.value, change.ttl)
        except InvalidMessageError:  # a broken record: free, the head reads and reports it
            self._freed(key, None)
            return
        # written just now (the watch delivers as the server stores): expires in its TTL
        self.holding(key, seq, _seconds(change.ttl, record.ttl))
        if record.token:  # a refresh: the holder keeps its place
            return
        previous = recent.pop(record.owner, None)
        if previous is not None:
            older = [owner for owner, last in recent.items() if last < previous]
            freed = self._freed_at.pop(key, None)
            if freed is not None and not older:  # a turn taken without deferral
                self._gap = 0.8 * self._gap + 0.2 * (time.monotonic() - freed)
            for owner in older:  # they let their turn pass
                del recent[owner]
        recent[record.owner] = seq
        if len(recent) > RECENT_HOLDERS:
            del recent[next(iter(recent))]


# Per connection; entries of closed connections are dropped when a new one comes.
_buckets: dict[Bus, dict[str, _Bucket]] = {}


async def _bucket(bus: Bus, name: str) -> _Bucket:
    """The locks bucket, opened once per bus (no limit markers: see the module docstring)."""
    buckets = _buckets.get(bus)
    if buckets is None:
        for closed in [b for b in _buckets if b.nc.is_closed]:
            del _buckets[closed]
        buckets = _buckets[bus] = {}
    bucket = buckets.get(name)
    if bucket is None:
        bucket = buckets[name] = _Bucket(bus, name)
    if not bucket.provisioned:
        await bus.key_value(name, history=1, description="swarmbus locks")
        bucket.provisioned = True
    return bucket


def _seconds(ttl: str | None, fallback: int) -> int:
    """A stored ``Nats-TTL`` header in seconds (``fallback``: the record's, if unreadable;
    a waiter that reads the key too early re-reads it later)."""
    if ttl is not None and ttl.isdigit():
        return int(ttl)
    return fallback


def _handed_in(updates: MemoryObjectReceiveStream[int | _Handed | None]) -> _Handed | None:
    """A hand-over still buffered in a waiter's stream (its receive was cancelled)."""
    while True:
        try:
            update = updates.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return None
        if isinstance(update, _Handed):
            return update


def _holder(
    key: str, value: bytes | None, revision: int, stored: datetime, ttl: str | None
) -> Holder:
    """Who holds the lock stored under ``key`` (InvalidMessageError: a broken record)."""
    record = _record_of(key, value, ttl)
    return Holder(
        resource=subjects.resource_of_lock_key(key),
        owner=record.owner,
        token=record.token or revision,
        expires_at=stored + timedelta(seconds=record.ttl),
    )


async def lock_holder(bus: Bus, resource: str, *, bucket: str = LOCKS_BUCKET) -> Holder | None:
    """Who holds the lock on ``resource`` (read from the stream leader), or None.

    None also if its record is broken (not written by a lock): nobody holds it, and the
    next acquisition takes it over.
    """
    key = subjects.lock_key(resource)
    if bus.settings.backend != "nats":
        found = await _store_holders(bus, bucket, key)
        return found[0] if found else None
    last = await kv_last(bus.js, bucket, key, f"cannot read lock on {resource!r}")
    if last is None or last.removed or not last.revision or last.time is None:
        return None
    try:
        return _holder(key, last.value, last.revision, last.time, last.ttl)
    except InvalidMessageError as exc:
        log.warning("lock on %r: %s; it is free to take over", resource, exc.reason)
        return None


async def held_locks(bus: Bus, *, bucket: str = LOCKS_BUCKET) -> list[Holder]:
    """Every lock currently held in ``bucket``, sorted by resource."""
    if bus.settings.backend != "nats":
        return await _store_holders(bus, bucket)
    holders = []
    for entry in await bucket_entries(bus.js, bucket):
        assert entry.time is not None  # bucket_entries reads it
        try:
            holders.append(_holder(entry.key, entry.value, entry.revision, entry.time, entry.ttl))
        except (InvalidIdentifierError, InvalidMessageError) as exc:
            log.warning("skipping %s in %s: %s", entry.key, bucket, exc)
    return sorted(holders, key=lambda h: h.resource)


async def _store_holders(bus: Bus, bucket: str, key: str | None = None) -> list[Holder]:
    """``held_locks`` (or ``lock_holder`` of ``key``) on the configured state store.

    ``expires_at`` is the store's (Redis ``PTTL``, PostgreSQL ``expires_at``); on a
    store that cannot tell, it is now plus the record's TTL (at most that).
    """
    store = await open_store(bus, bucket, history=1, limit_marker_ttl=MARKER_TTL)
    holders = []
    for lock in await stored_locks(store, key):
        try:
            record = _decode_json(
                _decoder, lock.value, what=f"lock key {lock.key!r}", max_bytes=MAX_RECORD_BYTES
            )
            resource = subjects.resource_of_lock_key(lock.key)
        except (InvalidIdentifierError, InvalidMessageError) as exc:
            log.warning("skipping %s in %s: %s", lock.key, bucket, exc)
            continue
        expires_at = lock.expires_at or datetime.now(UTC) + timedelta(seconds=record.ttl)
        holders.append(Holder(resource, record.owner, record.token or lock.revision, expires_at))
    return sorted(holders, key=lambda h: h.resource)


class Lock:
    """A lock on ``resource`` for ``owner`` (an agent id); one object per holder.

    ``acquire`` returns a ``Lease`` whose ``token`` the protected resource must check.
    Not re-entrant, and not meant to be shared by concurrent tasks.

    Example::

        async with Lock(bus, "file:/src/main.py", "ops/release-manager", ttl=30) as lease:
            await write_file(..., fencing_token=lease.token)
    """

    def __init__(
        self,
        bus: Bus,
        resource: str,
        owner: str,
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = DEFAULT_TIMEOUT,
        bucket: str = LOCKS_BUCKET,
    ) -> None:
        self.bus = bus
        self.resource = resource
        self.owner = subjects.validate_agent_id(owner)
        self.ttl = whole_seconds(ttl)
        self.timeout = timeout
        self.bucket = bucket
        self._key = subjects.lock_key(resource)
        self._subject = subjects.kv_subject(bucket, self._key)
        self._what = f"lock on {resource!r}"
        self._read = f"cannot read lock on {resource!r}"
        self._attributes = {"swarmbus.agent": self.owner, "swarmbus.lock": resource}
        self._state: _Bucket | None = None
        self._lease: Lease | None = None
        self._revision = 0
        # Revision of our own last release marker: a CAS on it succeeds only if the
        # key is still free, which saves a read on the next acquisition.
        self._released_at: int | None = None
        self._store_key: LockKey | None = None  # SWARM_BACKEND other than nats
        self._value: tuple[int, bytes] = (0, b"")  # (ttl, this owner's record for it)

    @property
    def lease(self) -> Lease | None:
        """The lease this object holds (None after a release or a detected loss)."""
        return self._lease

    async def acquire(
        self, *, timeout: float | None = 0.0, ttl: float | None = None
    ) -> Lease | None:
        """Take the lock; returns the lease, or None if it was not acquired.

        Args:
            timeout: 0 tries once: None if the lock is held, another writer just won
                it, or waiters on this connection are queued for it. Otherwise waits
                up to ``timeout`` seconds (None: forever) for a release or expiry,
                woken by a KV watch; waiters on one connection are served in order.
            ttl: lease length in seconds (rounded up to whole seconds); default ``self.ttl``.
        """
        if self._lease is not None:
            raise InvalidTransitionError("lock", self.resource, "held", "acquired")
        seconds = self.ttl if ttl is None else whole_seconds(ttl)
        if self.bus.settings.backend != "nats":
            return await self._acquire_on_store(timeout, seconds)
        bucket = self._state or await self._provision()
        try:
            if timeout == 0:
                if bucket.queued(self._key):  # local waiters are first in line
                    return None
                return await self._attempt(seconds, self._released_at)
            with anyio.move_on_after(timeout):
                return await lock_wait(self._wait(bucket, seconds))  # metrics: lock waits
            return self._lease  # None, or a write that landed as the deadline passed
        except BaseException:
            if self._lease is not None:  # acquired as the caller was cancelled: give it back
                with anyio.CancelScope(shield=True):
                    try:
                        await self.release()
                    except SwarmbusError as exc:  # it expires by its TTL
                        log.warning("cannot release %s after a cancel: %s", self._what, exc)
            raise

    async def refresh(self, *, ttl: float | None = None) -> Lease:
        """Extend the lease to ``ttl`` seconds from now (same fencing token).

        Raises:
            LockLostError: the lease expired or passed to someone else.
        """
        lease = self._lease
        if lease is None:
            raise LockLostError(self.resource, self.owner, None)
        seconds = self.ttl if ttl is None else whole_seconds(ttl)
        record = _Record(owner=self.owner, ttl=seconds, token=lease.token)
        if self._store_key is not None:
            revision = await self._store_key.refresh(
                _encoder.encode(record), self._revision, seconds
            )
            if revision is None:
                self._lease = None
                raise LockLostError(self.resource, self.owner, lease.token)
            self._revision = revision
            self._lease = replace(lease, ttl=seconds)
            return self._lease
        try:
            self._revision = await self._write(
                _encoder.encode(record), self._revision, {TTL_HEADER: str(seconds)}
            )
        except _Conflict:
            self._lease = None
            raise LockLostError(self.resource, self.owner, lease.token) from None
        self._lease = replace(lease, ttl=seconds)
        return self._lease

    async def release(self) -> None:
        """Release the lock, only if this lease still holds it.

        Raises:
            LockLostError: the lease expired or passed to someone else (whose lock is
                left untouched), or it was never acquired.
        """
        lease, self._lease = self._lease, None
        if lease is None:
            raise LockLostError(self.resource, self.owner, None)
        if self._store_key is not None:
            try:
                released = await self._store_key.release(self._revision)
            except ConnectionError:
                self._lease = lease  # not known to be released: release() may be retried
                raise
            if not released:
                raise LockLostError(self.resource, self.owner, lease.token)
            return
        try:
            bucket = self._state
            successor = bucket.successor(self._key) if bucket is not None else None
            if bucket is not None and successor is not None:
                await self._hand_over(bucket, successor, lease)
                return
            # a purge marker without a rollup (swarmbus's buckets refuse rollups,
            # _jetstream/streams): with one revision per key it replaces the lock
            headers = {KV_OPERATION: KV_PURGE, TTL_HEADER: str(MARKER_TTL)}
            try:
                self._released_at = await self._write(b"", self._revision, headers)
            except _Conflict:
                raise LockLostError(self.resource, self.owner, lease.token) from None
        except ConnectionError:
            # Not known to be released (NATS unreachable through retry_for): keep the
            # lease so release() can be called again (it fails with LockLostError if
            # this write landed after all).
            self._lease = lease
            raise

    async def _hand_over(self, bucket: _Bucket, successor: _Waiter, lease: Lease) -> None:
        """Release by writing the lock of the next local waiter (one write, not two).

        The write is a compare-and-set on this lease's revision, so it happens only if
        we still hold the lock; the successor's token is its revision, as for any
        acquisition. If the successor gave up meanwhile, the lock written for it is
        released at once.
        """
        record = _Record(owner=successor.owner, ttl=successor.ttl)
        self._released_at = None
        try:
            revision = await self._write(
                _encoder.encode(record), self._revision, {TTL_HEADER: str(successor.ttl)}
            )
        except _Conflict:
            raise LockLostError(self.resource, self.owner, lease.token) from None
        if not bucket.handed(self._key, successor, revision):
            orphan = Lock(self.bus, self.resource, successor.owner, bucket=self.bucket)
            orphan._state, orphan._revision = bucket, revision
            orphan._lease = Lease(self.resource, successor.owner, revision, successor.ttl)
            try:
                await orphan.release()
            except SwarmbusError as exc:  # it expires by its TTL
                log.warning("cannot release the lock handed to %s: %s", successor.owner, exc)

    async def __aenter__(self) -> Lease:
        lease = await self.acquire(timeout=self.timeout)
        if lease is None:
            raise LockTimeoutError(self.resource, self.owner, self.timeout)
        return lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.release()
            except LockLostError:
                if exc is None:
                    raise

    # --- internals ----------------------------------------------------------------

    async def _acquire_on_store(self, timeout: float | None, ttl: int) -> Lease | None:
        """``acquire`` on the configured state store (``swarmbus._store_lock``)."""
        if self._store_key is None:
            store = await open_store(self.bus, self.bucket, history=1)
            self._store_key = lock_key_on(store, self._key)
        if self._value[0] != ttl:
            self._value = (ttl, _encoder.encode(_Record(owner=self.owner, ttl=ttl)))
        value = self._value[1]
        revision = None
        if timeout == 0:
            revision = await self._store_key.try_create(value, ttl)
        else:
            with anyio.move_on_after(timeout):
                revision = await self._store_key.wait_create(value, ttl)
        if revision is None:
            return None
        self._revision = revision
        self._lease = Lease(self.resource, self.owner, revision, ttl)
        return self._lease

    async def _provision(self) -> _Bucket:
        self._state = await _bucket(self.bus, self.bucket)
        return self._state

    async def _write(self, payload: bytes, expected: int, headers: dict[str, str]) -> int:
        """Compare-and-set publish on the lock key; returns the new revision."""
        writer = (self._state or await self._provision()).writer
        headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(expected)
        headers[MSG_ID] = writer.new_id()
        with send_span(self._subject, headers, self._attributes):
            return await writer.write(self._subject, payload, headers, self._what)

    async def _create(self, ttl: int, expected: int) -> Lease:
        """Write a new lock over a free key whose last revision is ``expected``."""
        record = _Record(owner=self.owner, ttl=ttl)
        # Shielded (bounded by retry_for): a caller's timeout must not abandon a write
        # that may be stored, which would leave a lock nobody holds until its TTL.
        with anyio.CancelScope(shield=True):
            self._revision = await self._write(
                _encoder.encode(record), expected, {TTL_HEADER: str(ttl)}
            )
            self._lease = lease = Lease(self.resource, self.owner, self._revision, ttl)
        return lease

    async def _attempt(self, ttl: int, expected: int | None = None) -> Lease | None:
        """One try without waiting; None if the key is held or another writer won.

        ``expected`` is a revision believed to free the key (else the key is read). A
        waiter does not need more: every later write reaches it through the watch.
        """
        read = expected is None
        while True:
            if expected is None:
                last = await self._last()
                if last is not None and not last[1]:
                    return None
                expected = last[0] if last else 0
            try:
                return await self._create(ttl, expected)
            except _Conflict as conflict:
                if conflict.actual == 0:  # the key emptied: no watch event says so
                    expected = 0
                elif read and conflict.actual is not None:
                    if self._state is not None:  # someone else was faster: time its expiry
                        self._state.lost_to(self._key, conflict.actual)
                    return None
                else:
                    expected, read = None, True

    async def _last(self) -> tuple[int, bool] | None:
        """(revision, is free) of the key's last entry, from the stream leader.

        Free: a tombstone, or a broken record (reported: dead-lettered once per revision,
        with an ``agent.error.occurred`` event, then taken over like a free key).
        """
        last = await kv_last(self.bus.js, self.bucket, self._key, self._read)
        if last is None:
            return None
        if last.removed:
            return last.revision, True
        try:
            _record_of(self._key, last.value, last.ttl)
        except InvalidMessageError as exc:
            log.warning("%s: %s; taking it over", self._what, exc.reason)
            await self.bus.reject(
                subject=self._subject,
                data=last.value or b"",
                code=exc.code,
                reason=f"{exc.reason} (taken over at revision {last.revision})",
                receiver=self.owner,
                dedupe_key=f"{self.bucket}:{last.revision}",
            )
            return last.revision, True
        if self._state is not None and last.time is not None:
            left = last.time - datetime.now(UTC) + timedelta(seconds=_seconds(last.ttl, 1))
            self._state.holding(self._key, last.revision, left.total_seconds())
        return last.revision, False

    async def _wait(self, bucket: _Bucket, ttl: int) -> Lease:
        """Queue behind this connection's waiters for the key; try each time it is freed."""
        waiting = bucket.waiting(self._key, self.owner, self._released_at, ttl)
        handed: _Handed | None = None
        try:
            async with waiting as updates:
                try:
                    while True:
                        update = await updates.receive()
                        if isinstance(update, _Handed):  # the holder wrote our lock
                            self._revision = update.revision
                            self._lease = Lease(self.resource, self.owner, update.revision, ttl)
                            return self._lease
                        lease = await self._try(ttl, update)
                        if lease is not None:
                            return lease
                except BaseException:
                    handed = _handed_in(updates)
                    raise
        finally:
            if handed is not None and self._lease is None:
                # Cancelled as the holder handed us the lock: give it back (the queue
                # was left above, so this goes to the next waiter or frees the key).
                self._revision = handed.revision
                self._lease = Lease(self.resource, self.owner, handed.revision, ttl)
                with anyio.CancelScope(shield=True):
                    try:
                        await self.release()
                    except SwarmbusError as exc:  # it expires by its TTL
                        log.warning("cannot release a lock handed over too late: %s", exc)

    async def _try(self, ttl: int, revision: int | None) -> Lease | None:
        """One attempt of a waiter: on a freed revision, or after reading the key."""
        if revision is None:
            return await self._attempt(ttl)
        try:
            return await self._create(ttl, revision)
        except _Conflict as conflict:
            if conflict.actual:  # someone else won: wait for their release or expiry
                if self._state is not None:
                    self._state.lost_to(self._key, conflict.actual)
                return None
            return await self._attempt(ttl, conflict.actual)
