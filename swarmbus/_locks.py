"""Distributed locks on a JetStream KV bucket: per-key TTL, owner-only release, fencing.

A lock on a resource is one key of the ``SWARMBUS_LOCKS`` bucket (``lock_key``). Every
write is a compare-and-set on the key's last revision, so only one acquisition can win
and a holder can only release or refresh the revision it wrote itself. The key carries a
server-side TTL (nats-server >= 2.11): a crashed holder's lock expires on its own. The
server removes it without a marker (the bucket has no limit markers: a stream with them
must allow rollup headers, and a rollup through any lock key would empty the bucket), so
a waiter that finds a holder's record reads the key again at its expiry (the write's
server time plus its TTL); a key whose TTL passed reads as missing. A release is a purge
marker, followed by one core NATS message on the key's wake subject
(``swarmbus.lock.<bucket>.<key>``, CONTRACT.md "Lock wakes") that NATS delivers to one
connection with waiters for the key (a queue group): one wake per release, no herd.
Wakes carry no authority; waiters also re-read the key now and then (``_Bucket``).

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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Annotated, Final, NamedTuple, Protocol

import anyio
import msgspec

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
from swarmbus._jetstream.errors import NatsError
from swarmbus._jetstream.headers import (
    EXPECTED_LAST_SUBJECT_SEQUENCE,
    KV_OPERATION,
    KV_PURGE,
    MSG_ID,
    STATUS,
)
from swarmbus._jetstream.headers import MARKER_REASON as MARKER_REASON  # the expiry marker
from swarmbus._jetstream.headers import TTL as TTL_HEADER
from swarmbus._jetstream.latest import bucket_entries, kv_last
from swarmbus._jetstream.reads import NO_RESPONDERS
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
"""First and longest delay between a waiter's reads of a key it found held: a wake can
be lost (see ``_Bucket``), and the holder can outlive its expiry as the waiter's clock
computes it (client and server clocks differ, or the server removes the key late)."""
POLITE_WINDOW: Final = 1.0
"""Seconds after publishing a wake for a key, while the one before reached a waiter,
that this connection's next waiter for it waits for its turn instead of taking the key
back at once."""
MAX_SENT: Final = 1024
"""Wakes remembered per connection before those older than POLITE_WINDOW are dropped."""
HAND_OVERS: Final = 7
"""Hand-overs to a waiter on the same connection in a row before a release marker."""


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


_Update = int | _Handed | None
"""What a head waiter is told: the revision of its own release marker (compare-and-set
on it), None (read the key first), or the lock its holder handed over."""


@dataclass
class _Waiter:
    """A local waiter: what to try next (an asyncio queue: a get that finds an update
    does not yield to the event loop, as an anyio stream's receive does), who it is,
    the lease length it asked for (used when the holder hands the lock over), and the
    wake it was given and has not acted on (passed on if it leaves without the lock)."""

    updates: asyncio.Queue[_Update]
    owner: str
    ttl: int
    woken: bool = False


class _Subscription(Protocol):
    async def unsubscribe(self, limit: int = 0) -> None: ...


class _Message(Protocol):
    @property
    def subject(self) -> str: ...
    @property
    def headers(self) -> dict[str, str] | None: ...


@dataclass
class _Queue:
    """The local waiters of one key (FIFO) and what makes its head try again.

    ``sub``: the connection's queue-group subscription to the key's wake subject, held
    while the queue is not empty. ``timer``: the head's next read of the key (the
    holder's expiry, or the re-check of a lost wake). ``retries``: the head's failed
    tries (its re-check backs off); ``expires``: the holder's expiry (loop time), read
    from its record; ``unseen``: the head lost a race to a record it has not read.
    ``polite``: the head waits for its turn (this connection's wakes for the key reached
    waiters); ``withheld``: its own release marker, tried if the server says nobody got
    the last wake.
    """

    waiters: list[_Waiter] = field(default_factory=list)
    sub: _Subscription | None = None
    timer: asyncio.TimerHandle | None = None
    retries: int = 0
    expires: float | None = None
    unseen: bool = False
    polite: bool = False
    withheld: int | None = None


class _Sent(NamedTuple):
    """A wake this connection published for a key, awaiting "no responders"."""

    number: int
    at: float
    contended: bool
    """The wake before it got no "no responders": another connection was waiting."""


class _Bucket:
    """A locks bucket as one connection sees it: opened once, the wakes of its waiters.

    Local waiters for a key queue in FIFO order and only the head tries, so a release
    costs one compare-and-set per connection, not one per waiter. Across connections a
    release wakes ONE connection: every connection with local waiters for a key holds a
    queue-group subscription to the key's wake subject (``lock_wake_subject``), and a
    release that frees the key publishes one message there, which NATS delivers to one
    member of the group. It is empty: the woken head reads the key and compare-and-sets
    on the release marker it finds. It must not trust a revision in a wake: a
    compare-and-set on the revision of a live holder's record would replace that lock.

    Wakes are hints: a forged or duplicate one costs a failed compare-and-set, and a lost
    one (the releaser died before publishing, the woken connection died, a subscriber
    swallowed it) only delays: every head that tried and failed reads the key again at
    the holder's expiry (its server time plus its TTL) and, meanwhile, re-checks after
    RECHECK, doubling up to MAX_RECHECK. A head that leaves with a wake it did not act on
    passes it to the next local waiter or, if none, publishes it again after the
    connection unsubscribed (so the server cannot hand it back to this connection); a
    wake in flight as the subscription ends is lost (the re-check covers it).

    A connection that just released a key does not take it straight back while waiters
    elsewhere are being woken for it: each wake carries a reply subject, on which the
    server answers "no responders" if nobody was waiting (it arrives before the ack of
    the connection's next write). When the previous wake got no such answer (another
    connection took it), the next waiter of this connection for the key waits for a
    wake, a re-check, or that answer to its own last wake. A lone contender never
    waits: each of its wakes is answered before it releases again.
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
        self._nc = bus.nc
        self._wakes = subjects.lock_wake_subject(name, "")
        self._replies = ""  # inbox prefix of the answers to this connection's wakes
        self._queues: dict[str, _Queue] = {}
        self._sent: dict[str, _Sent] = {}  # key -> our last wake, until "no responders"
        self._count = 0
        # Hand-overs of a key since its last release marker. After HAND_OVERS in a row
        # a release writes a marker (and a wake), so waiters on other connections get
        # their chance.
        self._handed_over: dict[str, int] = {}

    def queued(self, key: str) -> bool:
        """Whether local waiters are queued for ``key`` (a newcomer goes behind them)."""
        return key in self._queues

    def successor(self, key: str) -> _Waiter | None:
        """The local head waiter of ``key`` if a holder may hand the lock to it."""
        queue = self._queues.get(key)
        if queue is None or self._handed_over.get(key, 0) >= HAND_OVERS:
            return None
        return queue.waiters[0]

    def handed(self, key: str, waiter: _Waiter, revision: int) -> bool:
        """Give ``waiter`` the lock stored for it at ``revision``; False if it left."""
        self._handed_over[key] = self._handed_over.get(key, 0) + 1
        queue = self._queues.get(key)
        if queue is None or waiter not in queue.waiters:
            return False
        waiter.updates.put_nowait(_Handed(revision))
        return True

    def holding(self, key: str, revision: int, seconds: float | None) -> None:
        """The record stored at ``revision`` holds ``key`` (for ``seconds`` more, if known)."""
        queue = self._queues.get(key)
        if queue is None:
            return
        queue.unseen = seconds is None
        if seconds is not None:
            queue.expires = asyncio.get_running_loop().time() + max(0.0, seconds)

    def retry_later(self, key: str, waiter: _Waiter) -> None:
        """The head tried and did not get the lock: arm its next read of the key.

        At the holder's expiry if known, else (and at the latest) after the re-check
        delay, which doubles with every try of this head (not reset when the holder
        changes: in a busy queue every read finds another holder, and reads every
        RECHECK would cost more than the wakes save); soon after a lost race, to read
        the winner's expiry.
        """
        waiter.woken = False
        queue = self._queues.get(key)
        if queue is None:
            return
        loop = asyncio.get_running_loop()
        delay = RECHECK if queue.unseen else min(MAX_RECHECK, RECHECK * 2**queue.retries)
        queue.retries = min(queue.retries + 1, 16)
        if queue.expires is not None and queue.expires > loop.time():
            delay = min(delay, queue.expires - loop.time() + EXPIRY_MARGIN)
        queue.expires = None
        self._arm(key, queue, delay)

    def _arm(self, key: str, queue: _Queue, delay: float) -> None:
        if queue.timer is not None:
            queue.timer.cancel()
        queue.timer = asyncio.get_running_loop().call_later(delay, self._recheck, key)

    def _recheck(self, key: str) -> None:
        """The head's timer fired: it reads the key (and takes it if it is free)."""
        queue = self._queues.get(key)
        if queue is not None:
            queue.timer = None
            queue.polite = False
            queue.waiters[0].updates.put_nowait(None)

    @contextlib.asynccontextmanager
    async def waiting(
        self, key: str, owner: str, hint: int | None, ttl: int
    ) -> AsyncIterator[_Waiter]:
        """Queue for ``key``; at the head, receive what to try next.

        A waiter that finds the queue empty subscribes the connection to the key's wakes
        (before its first attempt, so no release can slip between), then starts with
        ``hint`` (a revision it knows freed the key, or None: read it), unless this
        connection just woke another waiter for the key (then it waits its turn).
        Leaving without the lock tells the next one to try (or passes its wake on).
        """
        waiter = _Waiter(asyncio.Queue(), owner, ttl)
        queue = self._queues.get(key)
        first = queue is None
        if queue is None:
            queue = self._queues[key] = _Queue()
        queue.waiters.append(waiter)
        acquired = False
        try:
            if first:
                with anyio.CancelScope(shield=True):  # a SUB sent must be kept to be undone
                    queue.sub = await self._subscribe(key)
                self._start(key, queue, hint)
            yield waiter
            acquired = True
        finally:
            head = queue.waiters[0] is waiter
            queue.waiters.remove(waiter)
            if not queue.waiters:
                await self._leave(key, queue, waiter.woken and not acquired)
            elif head and not acquired:
                queue.waiters[0].updates.put_nowait(None)
            elif head:  # the new head waits for the hand-over, a wake or its re-check
                queue.retries = 0
                self._arm(key, queue, RECHECK)

    def _contended(self, key: str) -> bool:
        """Whether another connection waited for ``key`` as this one last released it."""
        sent = self._sent.get(key)
        if sent is None:  # none sent, or the server said nobody was waiting
            return False
        return sent.contended and asyncio.get_running_loop().time() - sent.at < POLITE_WINDOW

    def _start(self, key: str, queue: _Queue, hint: int | None) -> None:
        if self._contended(key):
            queue.polite, queue.withheld = True, hint
            self._arm(key, queue, RECHECK)
        else:
            queue.waiters[0].updates.put_nowait(hint)

    async def _leave(self, key: str, queue: _Queue, wake: bool) -> None:
        """The last local waiter left: unsubscribe, then pass on a wake it did not use."""
        del self._queues[key]
        self._handed_over.pop(key, None)
        if queue.timer is not None:
            queue.timer.cancel()
        # Neither call waits for the server (nats-py queues the UNSUB and the PUB, in
        # this order), so a caller's cancellation cannot come between them.
        if queue.sub is not None:
            try:
                await queue.sub.unsubscribe()
            except NatsError as exc:
                log.debug("cannot unsubscribe from the wakes of %s: %s", key, exc)
        if wake:
            await self._publish(key)

    async def _subscribe(self, key: str) -> _Subscription | None:
        """Join the queue group of ``key``'s wakes (None: refused or unreachable; the
        waiters then rely on their re-checks)."""
        try:
            return await self._nc.subscribe(self._wakes + key, queue=key, cb=self._on_wake)
        except NatsError as exc:
            log.warning("cannot subscribe to lock wakes (waiters poll): %s", exc)
            return None

    async def _on_wake(self, msg: _Message) -> None:
        """A release woke this connection for a key: its head tries."""
        key = msg.subject[len(self._wakes) :]
        queue = self._queues.get(key)
        if queue is None:  # every waiter left (the subscription is ending): pass it on
            await self._publish(key)
            return
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        queue.polite = False
        head = queue.waiters[0]
        head.woken = True
        if head.updates.empty():  # wakes merge: a flood of them costs one read
            head.updates.put_nowait(None)

    async def wake(self, key: str) -> None:
        """``key`` was freed: wake one waiting connection.

        The reply subject gets the server's "no responders" answer if none is waiting.
        """
        self._handed_over.pop(key, None)
        loop = asyncio.get_running_loop()
        if not self._replies:
            self._replies = self._nc.new_inbox()
            try:
                await self._nc.subscribe(self._replies + ".>", cb=self._on_reply)
            except NatsError as exc:
                log.warning("cannot subscribe to lock wake answers: %s", exc)
        if len(self._sent) > MAX_SENT:
            now = loop.time()
            for old in [k for k, sent in self._sent.items() if now - sent.at > POLITE_WINDOW]:
                del self._sent[old]
        self._count += 1
        # our last wake got no "no responders" (a waiter got it): contended
        last = self._sent.get(key)
        contended = last is not None and loop.time() - last.at < POLITE_WINDOW
        self._sent[key] = _Sent(self._count, loop.time(), contended)
        await self._publish(key, f"{self._replies}.{self._count}.{key}")

    async def _publish(self, key: str, reply: str = "") -> None:
        try:
            await self._nc.publish(self._wakes + key, b"", reply=reply)
        except NatsError as exc:  # the waiters' re-checks find the key free
            log.warning("cannot wake the waiters for lock key %s: %s", key, exc)

    async def _on_reply(self, msg: _Message) -> None:
        """The server's "no responders" to a wake: nobody was waiting for the key then."""
        if (msg.headers or {}).get(STATUS) != NO_RESPONDERS:
            return
        _, count, key = msg.subject[len(self._replies) :].split(".", 2)
        sent = self._sent.get(key)
        if sent is None or str(sent.number) != count:
            return
        del self._sent[key]
        queue = self._queues.get(key)
        if queue is not None and queue.polite:  # our release was not taken: try it
            queue.polite = False
            if queue.timer is not None:
                queue.timer.cancel()
                queue.timer = None
            queue.waiters[0].updates.put_nowait(queue.withheld)


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
    if ttl is not None and ttl.isascii() and ttl.isdigit():
        return int(ttl)
    return fallback


def _handed_in(updates: asyncio.Queue[_Update]) -> _Handed | None:
    """A hand-over still queued for a waiter (its get was cancelled)."""
    while True:
        try:
            update = updates.get_nowait()
        except asyncio.QueueEmpty:
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
                woken by a release's wake (or a re-check); waiters on one connection
                are served in order, connections in the order NATS picks them.
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
                # Shielded: a hand-over written but not told to the successor would
                # leave it waiting for the lock it holds until its TTL.
                with anyio.CancelScope(shield=True):
                    await self._hand_over(bucket, successor, lease)
                return
            # a purge marker without a rollup (swarmbus's buckets refuse rollups,
            # _jetstream/streams): with one revision per key it replaces the lock
            headers = {KV_OPERATION: KV_PURGE, TTL_HEADER: str(MARKER_TTL)}
            try:
                self._released_at = await self._write(b"", self._revision, headers)
            except _Conflict:
                raise LockLostError(self.resource, self.owner, lease.token) from None
            await (bucket or await self._provision()).wake(self._key)
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

        ``expected`` is a revision believed to free the key: our own release marker
        (else the key is read; also after a failed compare-and-set on it).
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
                    if self._state is not None:  # someone else was faster: re-check it
                        self._state.holding(self._key, conflict.actual, None)
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
        """Queue behind this connection's waiters for the key; try when woken."""
        waiting = bucket.waiting(self._key, self.owner, self._released_at, ttl)
        handed: _Handed | None = None
        try:
            async with waiting as waiter:
                try:
                    while True:
                        update = await waiter.updates.get()
                        if isinstance(update, _Handed):  # the holder wrote our lock
                            self._revision = update.revision
                            self._lease = Lease(self.resource, self.owner, update.revision, ttl)
                            return self._lease
                        lease = await self._attempt(ttl, update)
                        if lease is not None:
                            return lease
                        bucket.retry_later(self._key, waiter)
                except BaseException:
                    handed = _handed_in(waiter.updates)
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
