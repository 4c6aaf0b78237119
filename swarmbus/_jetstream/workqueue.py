"""Work-queue plumbing: the stream, durable pull consumers, non-blocking pulls, wake-ups.

What the task queue (``swarmbus._tasks``) needs of NATS beyond acked publishes, in one
place: the work-queue stream's configuration, one durable pull consumer per queue
shared by every claimer, pulls that return at once when a queue is empty (nats-py's
``fetch`` waits out its whole timeout instead), one-shot core subscriptions that wake
an idle claimer, and the reads and writes of the record bucket that must map nats-py's
errors the task queue's way (every failure a ``ConnectionError``: the claimer treats it
as "try again later", never as a bug). Under the deploy auth configs the service
account creates the queue consumers (``QueueProvisioner``), not the claimers.

A dispatch message is handed to callers as the ``Msg`` nats-py delivered (``Dispatch``):
wrapping each one would cost the hot path an object per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Final

import anyio
import anyio.abc
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from swarmbus import _subjects as subjects
from swarmbus._errors import ConnectionError, PermissionDeniedError, PublishError, SwarmbusError
from swarmbus._jetstream.errors import translate
from swarmbus._jetstream.headers import JS_API, KV_OPERATION, KV_PURGE, WRONG_LAST_SEQUENCE
from swarmbus._jetstream.hotpath import InlineDelivery
from swarmbus._jetstream.reads import PullInbox, unsubscribe_all
from swarmbus._jetstream.retry import Guard

__all__ = [
    "DEFAULT_ACK_WAIT",
    "Dispatch",
    "KeyValue",
    "Puller",
    "QueueConsumers",
    "QueueProvisioner",
    "Signals",
    "queue_consumer",
    "purge_key",
    "read_entry",
    "read_last",
    "settle_unacked",
    "stored_age",
    "stream_sequence",
    "work_queue_stream",
]

log = logging.getLogger("swarmbus.tasks")

Queue = tuple[str, str, int]
"""A task queue: session, task type, priority."""

Dispatch = Msg
"""A message as a durable pull consumer delivered it (ack, nak, term, in_progress)."""


def work_queue_stream(
    name: str, subject: str, *, storage: StorageType, replicas: int, max_consumers: int = -1
) -> StreamConfig:
    """A work-queue stream on ``subject`` whose pending messages can be listed."""
    return StreamConfig(
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.WORK_QUEUE,
        allow_direct=True,  # listing pending messages uses batch direct gets
        storage=storage,
        num_replicas=replicas,
        duplicate_window=120.0,
        # One durable per queue: the server's default (1,000 a stream) would cap sessions.
        max_consumers=max_consumers,
    )


DEFAULT_ACK_WAIT: Final = 5.0
"""The ack wait of a queue consumer the service creates (``TaskQueue``'s default)."""
DEFAULT_INACTIVE_THRESHOLD: Final = 900.0
"""Seconds a queue consumer outlives its last pull (``task_consumer_inactive_threshold``)."""
RECHECK_AFTER: Final = 600.0
"""Seconds after which the service checks again that a queue's consumer exists (an idle
one is deleted by its inactive threshold): at most half that threshold."""
SWEEP_EVERY: Final = 60.0
"""Seconds between the service's sweeps of the queues with pending dispatches (at most
half the inactive threshold): a consumer that expired just after the service saw it
exist is made again, so no pending task waits for its queue's next dispatch."""
MAX_CHECKED: Final = 10_000
"""Queues the service remembers before it forgets those checked over RECHECK_AFTER ago."""


def queue_consumer(
    session: str,
    type: str,
    priority: int,
    ack_wait: float,
    inactive_threshold: float = DEFAULT_INACTIVE_THRESHOLD,
) -> ConsumerConfig:
    """The durable pull consumer of the queue of ``type`` tasks at ``priority``.

    It is deleted by the server ``inactive_threshold`` seconds after its last pull, so
    the consumers of a stream follow the queues claimed from recently (and those with
    pending dispatches, which the claimer or the service makes again), not every queue
    that ever had a task.
    """
    return ConsumerConfig(
        durable_name=f"{subjects.safe_token(f'{session}.{type}')}-q{priority}",
        filter_subject=f"{subjects.task_subject(session, type, priority)}.*",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=-1,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=inactive_threshold,
    )


class QueueConsumers:
    """The queue consumers of one work-queue stream, found or created, for one claimer.

    One durable per queue, shared by every claimer; whoever comes first creates it.
    Under the deploy auth configs agents may not create consumers on the task stream:
    the create is also an update, with which one agent could change another queue's
    ``ack_wait`` or filter. There the service account creates each queue's consumer
    when the queue's first dispatch is published (``QueueProvisioner``) and claimers
    only find it; a claimer asks to create once, and after a refusal only looks.
    """

    def __init__(self, js: JetStreamContext, inbox: PullInbox, stream: str, guard: Guard) -> None:
        self.js = js
        self.inbox = inbox
        self.stream = stream
        self._guard = guard
        self._may_create = True

    def puller(self, config: ConsumerConfig) -> Puller:
        return Puller(self, config)

    async def find_or_create(self, config: ConsumerConfig) -> bool:
        """Whether the consumer ``config`` names exists now (created if this user may)."""
        durable = str(config.durable_name)
        if await consumer_exists(self.js, self.stream, durable):
            return True
        if not self._may_create:
            return False
        try:
            subject = f"{JS_API}.CONSUMER.DURABLE.CREATE.{self.stream}.{durable}"
            with self._guard(subject, f"create consumer {durable}"):
                await self.js.add_consumer(self.stream, config)
        except PermissionDeniedError:
            self._may_create = False
            log.info(
                "%s: the service account creates task-queue consumers (swarmbus consensus "
                "or swarmbus up); tasks of a queue wait until it has",
                durable,
            )
            return False
        except nats.js.errors.APIError as exc:
            # Another claimer created it meanwhile (with other options): share it.
            if not await consumer_exists(self.js, self.stream, durable):
                raise PublishError(f"cannot create consumer {durable}: {exc}") from exc
        return True


async def consumer_exists(js: JetStreamContext, stream: str, durable: str) -> bool:
    try:
        await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        return False
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot read consumer {durable}") from exc
    except (TimeoutError, nats.errors.Error) as exc:
        raise ConnectionError(f"cannot read consumer {durable}: {exc}") from exc
    return True


class Puller:
    """Non-blocking pulls from one durable consumer (``no_wait``, no lingering request).

    nats-py's ``fetch`` turns an empty consumer into a wait of its full timeout; the
    claimer instead checks ten priorities in turn and must not block on each. Until
    the consumer exists (the service creates it, see ``QueueConsumers``) a pull
    returns nothing.
    """

    def __init__(self, consumers: QueueConsumers, config: ConsumerConfig) -> None:
        self._consumers = consumers
        self._config = config
        self._next = f"{JS_API}.CONSUMER.MSG.NEXT.{consumers.stream}.{config.durable_name}"
        self._ready = False

    async def pull(self, batch: int, wait: float = 0.0) -> list[Msg]:
        """Up to ``batch`` dispatches, [] if none (or no consumer yet); with ``wait``,
        waits up to that many seconds for the first.

        A consumer the server deleted (idle over its inactive threshold) is found or
        made again at once: the pull that saw it gone is answered "no responders".
        """
        for _ in range(2):
            if not self._ready:
                self._ready = await self._consumers.find_or_create(self._config)
                if not self._ready:
                    return []
            msgs = await self._consumers.inbox.pull(self._next, batch, wait)
            if msgs is not None:
                return msgs
            self._ready = False
            log.info(
                "task consumer %s expired: finding or making it again", self._config.durable_name
            )
        return []


class QueueProvisioner:
    """Creates each queue's consumer when a dispatch of the queue is published.

    Run by the service account (``swarmbus consensus``, ``swarmbus up``): agents under
    the deploy auth configs may only pull from and ack queue consumers. The consumers
    get the default ack wait, whatever a claimer's ``TaskQueue(ack_wait=...)`` says.
    Queues with dispatches pending when it starts get theirs at once. ``priorities``
    bounds the priority token (anyone may publish a dispatch, well-formed or not).
    """

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        stream: str,
        wildcard: str,
        priorities: range,
        *,
        inactive_threshold: float = DEFAULT_INACTIVE_THRESHOLD,
    ) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._wildcard = wildcard
        self._priorities = priorities
        self._inactive_threshold = inactive_threshold
        self._recheck_after = min(RECHECK_AFTER, inactive_threshold / 2)
        self._sweep_every = min(SWEEP_EVERY, inactive_threshold / 2)
        self._checked: dict[Queue, float] = {}
        self._send, self._receive = anyio.create_memory_object_stream[Queue](1000)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe and make the consumers of the queues with dispatches stored now
        (then it has started), then of each new queue, and every ``SWEEP_EVERY`` of the
        queues with dispatches pending, until cancelled."""
        try:
            sub = await self._nc.subscribe(self._wildcard, cb=self._on_dispatch)
        except (TimeoutError, nats.errors.Error) as exc:
            raise ConnectionError(f"cannot watch the task queues: {exc}") from exc
        try:
            await self._sweep(strict=True)
            task_status.started()
            while True:
                with anyio.move_on_after(self._sweep_every):
                    while True:
                        await self._create(await self._receive.receive())
                await self._sweep()
        finally:
            with anyio.CancelScope(shield=True):
                await unsubscribe_all([sub])

    async def _sweep(self, *, strict: bool = False) -> None:
        """Make the consumers of the queues with pending dispatches that have none.

        ``strict``: a failed read raises (at start); later sweeps log it and go on.
        """
        try:
            info = await self._js.stream_info(self._stream, subjects_filter=self._wildcard)
        except (TimeoutError, nats.errors.Error) as exc:
            if strict:
                raise ConnectionError(f"cannot watch the task queues: {exc}") from exc
            log.warning("cannot list the task queues with pending tasks: %s", exc)
            return
        now = time.monotonic()
        queues = {q for s in info.state.subjects or {} if (q := _queue(s, self._priorities))}
        for queue in queues:
            checked = self._checked.get(queue)
            if checked is None or now - checked >= self._sweep_every:
                self._checked[queue] = now
                await self._create(queue)

    async def _on_dispatch(self, msg: Msg) -> None:
        queue = self._queue_of(msg.subject)
        if queue is None:
            return
        try:
            self._send.send_nowait(queue)
        except anyio.WouldBlock:
            self._checked.pop(queue, None)  # busy: the queue's next dispatch asks again

    def _queue_of(self, subject: str) -> Queue | None:
        """The queue of a dispatch subject, unless invalid or checked recently."""
        queue = _queue(subject, self._priorities)
        if queue is None:
            return None
        now = time.monotonic()
        checked = self._checked.get(queue)
        recheck = self._recheck_after
        if checked is not None and now - checked < recheck:
            return None
        if len(self._checked) >= MAX_CHECKED:  # forget the queues checked long ago
            self._checked = {q: t for q, t in self._checked.items() if now - t < recheck}
            if len(self._checked) >= MAX_CHECKED:  # a flood of queues: check again
                self._checked.clear()
        self._checked[queue] = now
        return queue

    async def _create(self, queue: Queue) -> None:
        config = queue_consumer(*queue, DEFAULT_ACK_WAIT, self._inactive_threshold)
        durable = str(config.durable_name)
        try:
            if not await consumer_exists(self._js, self._stream, durable):
                await self._js.add_consumer(self._stream, config)
        except (SwarmbusError, TimeoutError, nats.errors.Error) as exc:
            log.warning("cannot create the task consumer %s: %s", durable, exc)
            self._checked.pop(queue, None)  # the queue's next dispatch tries again


def _digits(token: str) -> bool:
    """Whether ``token`` is a priority ``int`` reads: ASCII digits only (``str.isdigit``
    is true of ``²`` too, which ``int`` refuses)."""
    return token.isascii() and token.isdigit()


def _queue(subject: str, priorities: range) -> Queue | None:
    """The queue of a dispatch subject; None if it is not a valid one."""
    parts = subject.split(".")
    if len(parts) != 6 or not _digits(parts[4]) or int(parts[4]) not in priorities:
        return None
    queue = (parts[2], parts[3], int(parts[4]))
    try:
        subjects.task_subject(*queue)
    except SwarmbusError:
        return None  # not a queue (an invalid session id or task type)
    return queue


class Signals:
    """Which queues of a claimer's task types may hold dispatches: core subscriptions
    on their dispatch subjects, kept while the claimer is not busy.

    A queue is *clean* once a pull found it empty after its type was subscribed; every
    dispatch published on it since makes it *owed* a pull again (and sets ``changed``).
    So an idle or lightly loaded claimer pulls only the queues that got a dispatch,
    instead of every priority of every type (a round trip each). What no publish
    announces (a redelivery after ``ack_wait``, a delayed nak, a consumer made again) is
    found by ``refresh``, which makes every queue owed; the claimer calls it every
    ``refresh_every`` seconds. A type not subscribed has every queue owed. A busy
    claimer unsubscribes (``disarm``), so it does not receive every dispatch twice.

    A dispatch's publish reaches subscribers a moment before the stream has stored it,
    so a pull that finds a just-signalled queue empty is followed by one that waits for
    it up to ``LAG_WAIT`` (another claimer may have taken it instead).
    """

    LAG: Final = 0.05
    """A signal younger than this may announce a dispatch not stored yet."""
    LAG_WAIT: Final = 0.005
    """Seconds a pull waits for such a dispatch (``pulled`` said the queue may lag)."""

    def __init__(
        self, nc: NatsClient, session: str, refresh_every: float, priorities: range
    ) -> None:
        self._nc = nc
        self._session = session
        self._priorities = priorities  # anyone may publish: other tokens are ignored
        self.refresh_every = refresh_every
        #: Set (and replaced) when a subscribed queue gets a dispatch.
        self.changed = asyncio.Event()
        self._subs: dict[str, NatsSubscription] = {}
        self._clean: set[tuple[str, int]] = set()
        self._signals: dict[tuple[str, int], int] = {}
        self._unseen: dict[tuple[str, int], int] = {}
        self._signalled_at: dict[tuple[str, int], float] = {}
        self.refreshed_at = time.monotonic()
        self._parked: tuple[anyio.CancelScope, frozenset[tuple[str, int]]] | None = None

    def park(self, scope: anyio.CancelScope | None, queues: Sequence[tuple[str, int]]) -> None:
        """Cancel ``scope`` (an idle wait on another queue) as soon as one of ``queues``
        gets a dispatch; None: no longer."""
        self._parked = None if scope is None else (scope, frozenset(queues))

    def armed(self, types: Sequence[str]) -> bool:
        return all(type in self._subs for type in types)

    async def arm(self, types: Sequence[str]) -> None:
        """Subscribe to the dispatches of ``types`` (their queues stay owed until pulled)."""
        try:
            for type in types:
                if type not in self._subs:
                    subject = f"{subjects.task_subject(self._session, type, '*')}.*"
                    # Taken in the read loop: no task hop per dispatch announced.
                    delivery = InlineDelivery(self._take)
                    self._subs[type] = await delivery.subscribe(self._nc, subject)
        except nats.errors.Error as exc:
            await self.disarm()
            raise ConnectionError(f"cannot wait for tasks: {exc}") from exc

    async def disarm(self) -> None:
        """Unsubscribe: every queue is owed again."""
        subs, self._subs = list(self._subs.values()), {}
        self._clean.clear()
        self._unseen.clear()
        await unsubscribe_all(subs)

    def refresh(self) -> None:
        """Make every queue owed (what no publish announces is found by its pull)."""
        self._clean.clear()
        self.refreshed_at = time.monotonic()

    def owed(self, type: str, priority: int) -> bool:
        """Whether the queue must be pulled (it may hold dispatches)."""
        return type not in self._subs or (type, priority) not in self._clean

    def mark(self, type: str, priority: int) -> tuple[int, int, bool]:
        """Before a pull of the queue: what ``pulled`` compares against."""
        queue = (type, priority)
        clean = type in self._subs and queue in self._clean
        return self._signals.get(queue, 0), self._unseen.pop(queue, 0), clean

    def pulled(
        self, type: str, priority: int, mark: tuple[int, int, bool], got: int, asked: int
    ) -> bool:
        """After a pull that returned ``got`` of ``asked`` dispatches.

        A queue clean before the pull is clean after it if it got as many dispatches as
        were announced meanwhile. Otherwise a pull that drained the queue makes it
        clean, unless a dispatch was announced during the pull (it may have missed
        it). True if dispatches announced a moment before it were not all there: not
        stored yet, or taken by another claimer (pull once more, waiting).
        """
        queue = (type, priority)
        signals, announced, clean = mark
        if type not in self._subs:
            return False
        during = self._signals.get(queue, 0) - signals
        if clean:
            self._unseen.pop(queue, None)
            if during > got:
                self._unseen[queue] = during - got
            else:
                self._clean.add(queue)
            return False
        if got >= asked or during:
            return False
        signalled = self._signalled_at.get(queue, 0.0)
        if got < announced and time.monotonic() - signalled < self.LAG:
            return True
        self._clean.add(queue)
        return False

    def _take(self, msg: Msg) -> None:
        """A dispatch announced (``InlineDelivery``: in the read loop, must not block)."""
        parts = msg.subject.split(".")
        if len(parts) != 6 or not _digits(parts[4]) or int(parts[4]) not in self._priorities:
            return  # not a queue: its state would grow with every token a sender makes up
        queue = (parts[3], int(parts[4]))
        parked = self._parked
        if parked is not None and queue in parked[1]:
            parked[0].cancel()
        self._clean.discard(queue)
        self._signals[queue] = self._signals.get(queue, 0) + 1
        self._unseen[queue] = self._unseen.get(queue, 0) + 1
        self._signalled_at[queue] = time.monotonic()
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


def stream_sequence(msg: Msg) -> int | None:
    """The stream sequence of the JetStream message ``msg`` (None if it has none)."""
    try:
        return int(msg.metadata.sequence.stream)
    except (nats.errors.Error, ValueError, IndexError, TypeError):
        return None


def stored_age(msg: Msg) -> float:
    """Seconds since the JetStream message ``msg`` was stored."""
    stored: datetime = msg.metadata.timestamp
    return time.time() - stored.timestamp()


async def read_entry(kv: KeyValue, key: str, what: str) -> tuple[bytes, int] | None:
    """The value and revision of ``key`` (None if it has none), else ConnectionError."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    except (TimeoutError, nats.errors.Error) as exc:
        raise ConnectionError(f"{what}: {exc}") from exc
    assert entry.value is not None
    assert entry.revision is not None
    return entry.value, entry.revision


async def read_last(js: JetStreamContext, stream: str, subject: str, what: str) -> bytes | None:
    """The data of the last message on ``subject`` (None if none), else ConnectionError."""
    try:
        stored = await js.get_msg(stream, subject=subject)
    except nats.js.errors.NotFoundError:
        return None
    except (TimeoutError, nats.errors.Error) as exc:
        raise ConnectionError(f"{what}: {exc}") from exc
    return stored.data or b""


async def purge_key(
    kv: KeyValue, key: str, what: str, guard: AbstractContextManager[None] | None = None
) -> None:
    """Purge ``key``, leaving a purge marker (no value) as its last entry.

    Not nats-py's ``kv.purge``, a rollup that swarmbus's buckets refuse
    (``streams``): a marker without one, which on a bucket with one revision per key
    (the task bucket) replaces the value all the same. ``guard`` wraps the write
    itself (e.g. the bus's permission guard, which must see nats-py's own errors); its
    errors pass through.
    """
    try:
        with guard or contextlib.nullcontext():
            await kv._js.publish(f"{kv._pre}{key}", b"", headers={KV_OPERATION: KV_PURGE})
    except nats.js.errors.APIError as exc:
        raise translate(exc, what) from exc
    except (TimeoutError, nats.errors.Error) as exc:
        raise ConnectionError(f"{what}: {exc}") from exc


async def settle_unacked(
    js: JetStreamContext,
    kv: KeyValue,
    key: str,
    revision: int,
    write: tuple[str, bytes, dict[str, str]],
    what: str,
) -> int | ConnectionError | None:
    """Settle a compare-and-set ``write`` of ``key`` whose ack never came.

    Reads the key (retried through failover by ``js``): our bytes there mean our write
    won (its revision); a newer revision means someone else's did (None); otherwise it
    did not happen and is sent again, alone. A ConnectionError if the outcome stays
    unknown.
    """
    subject, data, headers = write
    try:
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            current = 0  # a create-once write that did not land
        else:
            if entry.value == data and entry.revision is not None:
                return entry.revision
            current = entry.revision or 0
        if current != revision:
            return None
        try:
            ack = await js.publish(subject, data, headers=dict(headers))
        except nats.js.errors.APIError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE:
                raise
            # The first send may have landed meanwhile (it was still in flight).
            entry = await kv.get(key)
            return entry.revision if entry.value == data else None
        return int(ack.seq)
    except nats.js.errors.APIError as exc:
        return ConnectionError(f"{what}: {exc}")
    except (TimeoutError, nats.errors.Error) as exc:
        return ConnectionError(f"{what}: {exc}")
