"""Work-queue plumbing: the stream, durable pull consumers, non-blocking pulls, wake-ups.

What the task queue (``swarmbus._tasks``) needs of NATS beyond acked publishes, in one
place: the work-queue stream's configuration, one durable pull consumer per queue
shared by every claimer, pulls that return at once when a queue is empty (nats-py's
``fetch`` waits out its whole timeout instead), one-shot core subscriptions that wake
an idle claimer, and the reads and writes of the record bucket that must map nats-py's
errors the task queue's way (every failure a ``ConnectionError``: the claimer treats it
as "try again later", never as a bug).

A dispatch message is handed to callers as the ``Msg`` nats-py delivered (``Dispatch``):
wrapping each one would cost the hot path an object per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime

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

from swarmbus._errors import ConnectionError, PublishError
from swarmbus._jetstream.errors import translate
from swarmbus._jetstream.headers import KV_OPERATION, KV_PURGE, WRONG_LAST_SEQUENCE
from swarmbus._jetstream.reads import PullInbox, unsubscribe_all

__all__ = [
    "Dispatch",
    "KeyValue",
    "Puller",
    "Wakeup",
    "durable_puller",
    "purge_key",
    "read_entry",
    "read_last",
    "settle_unacked",
    "stored_age",
    "stream_sequence",
    "work_queue_stream",
]

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


class Puller:
    """Non-blocking pulls from one durable consumer (``no_wait``, no lingering request).

    nats-py's ``fetch`` turns an empty consumer into a wait of its full timeout; the
    claimer instead checks ten priorities in turn and must not block on each.
    """

    def __init__(self, stream: str, durable: str, inbox: PullInbox) -> None:
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = inbox

    async def pull(self, batch: int) -> list[Msg]:
        return await self._inbox.pull(self._next, batch)


async def durable_puller(
    js: JetStreamContext,
    inbox: PullInbox,
    stream: str,
    *,
    durable: str,
    subject: str,
    ack_wait: float,
) -> Puller:
    """Create (or join) the durable pull consumer ``durable`` and pull from it."""
    config = ConsumerConfig(
        durable_name=durable,
        filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=-1,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=24 * 3600.0,
    )
    try:
        await js.add_consumer(stream, config)
    except nats.js.errors.APIError as exc:
        # A claimer with other options (ack_wait) created it first: share it.
        try:
            await js.consumer_info(stream, durable)
        except nats.js.errors.APIError:
            raise PublishError(f"cannot create consumer {durable}: {exc}") from exc
    return Puller(stream, durable, inbox)


class Wakeup:
    """One-shot core subscriptions that set ``event`` when a message is published.

    A claimer arms them only when idle, so a busy one does not receive every dispatch
    twice (once from its pull, once here).
    """

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self.event = asyncio.Event()
        self._subs: list[NatsSubscription] = []

    @property
    def armed(self) -> bool:
        return bool(self._subs)

    async def arm(self, subjects: Sequence[str]) -> None:
        """Clear the event and subscribe once to each of ``subjects``."""
        self.event.clear()
        try:
            for subject in subjects:
                self._subs.append(await self._nc.subscribe(subject, cb=self._fire, max_msgs=1))
        except nats.errors.Error as exc:
            await self.disarm()
            raise ConnectionError(f"cannot wait for tasks: {exc}") from exc

    async def disarm(self) -> None:
        subs, self._subs = self._subs, []
        await unsubscribe_all(subs)

    async def _fire(self, msg: Msg) -> None:
        self.event.set()


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
