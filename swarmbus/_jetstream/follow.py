"""Reading streams as an outside observer: an ordered consumer, and state look-ups.

``OrderedReader`` follows the messages on a filter through an ordered push consumer
(ephemeral, flow-controlled by the server, re-created by nats-py on a gap): from now
on, from the first stored message, or after a stream sequence. ``stored`` reads what
a filter holds now with one. They work on any stream (the event and dead-letter
streams have no direct gets, so ``reads.stored_messages`` cannot read them).

The look-ups return None for what does not exist (a stream, a bucket, a message), so
an observer started before anything was provisioned keeps running.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Self

import anyio
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, RawStreamMsg, StreamState
from nats.js.kv import KeyValue

from swarmbus._errors import SwarmbusError
from swarmbus._jetstream.errors import nats_errors

__all__ = [
    "OrderedReader",
    "consumer_lags",
    "delete_message",
    "key_value_or_none",
    "stored",
    "stored_message",
    "stream_state",
]

#: Idle heartbeat of a reader's consumer: a lost consumer is noticed and re-created.
HEARTBEAT = 5.0


class OrderedReader:
    """The messages on ``filter`` in ``stream``, in order, through an ordered consumer.

    ``start``: ``"new"`` (published from now on), ``"all"`` (the stored ones first) or
    a stream sequence to resume after. ``async with OrderedReader(...) as r: async for
    msg in r.messages()``; leaving the block deletes the consumer.
    """

    def __init__(
        self, js: JetStreamContext, stream: str, filter: str, *, start: str | int = "new"
    ) -> None:
        self.js = js
        self.stream = stream
        self.filter = filter
        self.start = start
        self._sub: JetStreamContext.PushSubscription | None = None

    async def __aenter__(self) -> Self:
        config = ConsumerConfig()
        if isinstance(self.start, int):
            policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.start + 1
        else:
            policy = DeliverPolicy.ALL if self.start == "all" else DeliverPolicy.NEW
        with nats_errors(f"follow {self.filter} in {self.stream}"):
            self._sub = await self.js.subscribe(
                self.filter,
                stream=self.stream,
                ordered_consumer=True,
                deliver_policy=policy,
                config=config,
                idle_heartbeat=HEARTBEAT,
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._sub.unsubscribe()

    async def pending(self) -> int:
        """How many stored messages the consumer had to deliver when it was created."""
        assert self._sub is not None, "use OrderedReader as an async context manager"
        with nats_errors(f"read {self.filter} in {self.stream}"):
            info = await self._sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered else 0
        return int(info.num_pending or 0) + int(delivered or 0)

    async def messages(self) -> AsyncGenerator[Msg, None]:
        """The messages, as they arrive (stored ones first, by ``start``)."""
        assert self._sub is not None, "use OrderedReader as an async context manager"
        async for msg in self._sub.messages:
            yield msg


async def stored(
    js: JetStreamContext, stream: str, filter: str, *, timeout: float = 10.0
) -> list[Msg]:
    """Every message stored on ``filter`` in ``stream`` now, in stream order.

    ``timeout`` bounds the wait for each next message, not the whole read: a session
    of a hundred thousand events takes longer than that to read, and that is fine.

    Raises:
        SwarmbusError: no next message arrived within ``timeout``.
    """
    out: list[Msg] = []
    async with OrderedReader(js, stream, filter, start="all") as reader:
        wanted = await reader.pending()
        async with contextlib.aclosing(reader.messages()) as messages:
            while len(out) < wanted:
                with anyio.move_on_after(timeout) as idle:
                    msg = await anext(messages, None)
                if idle.cancelled_caught:
                    raise SwarmbusError(
                        f"read {filter} in {stream}: no message for {timeout:g}s "
                        f"after {len(out)} of {wanted}"
                    )
                if msg is None:
                    break
                out.append(msg)
                if msg.metadata.num_pending == 0:
                    break
    return out


async def stored_message(js: JetStreamContext, stream: str, seq: int) -> RawStreamMsg | None:
    """The message at ``seq`` in ``stream``, or None (no such message or stream)."""
    with nats_errors(f"read message {seq} of {stream}"):
        try:
            return await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            return None


async def delete_message(js: JetStreamContext, stream: str, seq: int) -> None:
    """Delete the message at ``seq`` from ``stream`` (gone already: nothing to do)."""
    with (
        nats_errors(f"delete message {seq} of {stream}"),
        contextlib.suppress(nats.js.errors.NotFoundError),
    ):
        await js.delete_msg(stream, seq)


async def stream_state(js: JetStreamContext, stream: str) -> StreamState | None:
    """The state (message count, first sequence...) of ``stream``, or None if it is missing."""
    with nats_errors(f"read stream {stream}"):
        try:
            return (await js.stream_info(stream)).state
        except nats.js.errors.NotFoundError:
            return None


async def consumer_lags(js: JetStreamContext, stream: str) -> dict[str, int]:
    """Pending plus unacknowledged messages of every consumer of ``stream``."""
    with nats_errors(f"read the consumers of {stream}"):
        try:
            consumers = await js.consumers_info(stream)
        except nats.js.errors.NotFoundError:
            return {}
    return {str(c.name): int(c.num_pending or 0) + int(c.num_ack_pending or 0) for c in consumers}


async def key_value_or_none(js: JetStreamContext, bucket: str) -> KeyValue | None:
    """The KV bucket ``bucket``, or None if it does not exist (nothing is created)."""
    with nats_errors(f"open bucket {bucket}"):
        try:
            return await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            return None
