"""Core NATS request/reply for services whose payloads are not envelopes.

The runtime's API (``swarmbus.api.>``) and its inbound-event checks read raw bytes:
requests are plain JSON objects, and a malformed event must be seen as it arrived
(``Bus.subscribe`` would decode it first). ``RawSubscription`` hands each message to an
async handler in the caller's task group (nats-py runs one subscription's callbacks one
after another: a slow request must not hold the others) and publishes the handler's
answer to the message's reply subject, if it has one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import nats.errors
from anyio.abc import TaskGroup
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from swarmbus._jetstream.errors import transport_error


@dataclass(frozen=True)
class RawMessage:
    """A message as received: its subject, bytes and reply subject ("" if none)."""

    subject: str
    data: bytes
    reply: str


RawHandler = Callable[[RawMessage], Awaitable[bytes | None]]


class RawSubscription:
    """A subscription whose handler answers with bytes (None: no answer).

    Args:
        nc: the connection.
        subject: subject filter (wildcards allowed).
        handler: called once per message, concurrently, up to ``limit`` at a time.
        tg: the task group the handlers run in.
        queue: a queue group (one member answers each request).
    """

    def __init__(
        self,
        nc: NatsClient,
        subject: str,
        handler: RawHandler,
        tg: TaskGroup,
        *,
        queue: str = "",
        limit: int = 256,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.handler = handler
        self.tg = tg
        self.queue = queue
        self._limiter = anyio.CapacityLimiter(limit)
        self._sub: NatsSubscription | None = None

    async def start(self, request_timeout: float) -> None:
        """Subscribe and wait until the server has the subscription."""
        try:
            self._sub = await self.nc.subscribe(self.subject, queue=self.queue, cb=self._on_msg)
            await self.nc.flush(math.ceil(request_timeout))
        except (TimeoutError, nats.errors.Error) as exc:
            raise transport_error(exc, f"subscribe to {self.subject}") from exc

    async def stop(self) -> None:
        """Unsubscribe; handlers already running finish in the task group."""
        if self._sub is not None:
            # A closed connection has no subscription left to remove.
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        raw = RawMessage(subject=msg.subject, data=msg.data, reply=msg.reply or "")
        self.tg.start_soon(self._handle, raw)

    async def _handle(self, raw: RawMessage) -> None:
        async with self._limiter:
            answer = await self.handler(raw)
        if answer is not None and raw.reply:
            # A lost reply: the requester times out and retries; nothing to undo here.
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(raw.reply, answer)


async def publish_raw(nc: NatsClient, subject: str, data: bytes) -> None:
    """A core NATS publish of ``data`` (no envelope, no ack)."""
    try:
        await nc.publish(subject, data)
    except nats.errors.Error as exc:
        raise transport_error(exc, f"publish to {subject}") from exc
