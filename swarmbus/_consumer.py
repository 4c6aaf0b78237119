"""The receive side of the bus: the durable consumer behind ``Bus.consume``.

One pull loop fetches from a durable JetStream consumer and hands messages to a few
worker tasks; each message is acked after its handler returns (at-least-once).

- A fetch of n > 1 waits until n messages arrive (or it expires), so the loop asks only
  for what the server said is waiting: 1 when caught up (lowest latency), up to the
  free slots when behind (fewest round trips).
- A slot of the limiter is held before fetching: never take messages we cannot start.
- Workers take fetched messages from a memory stream: starting a task per message costs
  more than a small handler. A worker is added only when none is idle, so there are
  never more than the slots held.
- A handler slower than ``ack_wait`` must not have its message redelivered (and run
  again) while it runs: a heartbeat sends progress acks for the messages in flight.
- Bad input is rejected (dead letter + error event) and acked; a handler that failed
  because NATS was unreachable is nak'ed for a redelivery while attempts are left.

``dispatch`` (a handler inside its CONSUMER span, failures reported) serves the live
subscriptions of ``Bus.subscribe`` (``LiveHandler``) too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.abc
import anyio.lowlevel

from swarmbus._errors import ConnectionError, InvalidMessageError, PublishError
from swarmbus._jetstream.delivery import (
    FETCH_TIMEOUT,
    Connection,
    Msg,
    PullSubscription,
    TransportError,
)
from swarmbus._jetstream.reads import deliveries, num_pending
from swarmbus._messages import Message
from swarmbus._observe._instruments import observed
from swarmbus._telemetry import record_failure

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("swarmbus")

Handler = Callable[[Message], Awaitable[None]]


class Host(Protocol):
    """What a durable consumer uses of its bus (``swarmbus.Bus``)."""

    nc: Connection
    reconnected: asyncio.Event

    def accept(self, subject: str, data: bytes) -> Message: ...

    async def reject(
        self,
        *,
        subject: str,
        data: bytes,
        code: str,
        reason: str,
        receiver: str,
        dedupe_key: str | None = None,
        message_id: str | None = None,
    ) -> None: ...

    def _consumer_span(
        self, msg: Msg, message_id: str, session: str, agent: str
    ) -> contextlib.AbstractContextManager[Span | None]: ...


class DurableConsumer:
    """Runs ``handler`` on the messages of one bound durable pull consumer until a stop."""

    def __init__(
        self,
        host: Host,
        psub: PullSubscription,
        handler: Handler,
        *,
        durable: str,
        receiver: str,
        limiter: anyio.Semaphore,
        stop: anyio.Event,
        ack_wait: float,
        max_deliver: int,
    ) -> None:
        self._host = host
        self._psub = psub
        self._handler = handler
        self._durable = durable
        self._receiver = receiver
        self._limiter = limiter
        self._stop = stop
        self._ack_wait = ack_wait
        self._max_deliver = max_deliver
        # Messages the server said are waiting (1 when caught up): the next fetch's size.
        self._waiting = 1
        self._send, self._receive = anyio.create_memory_object_stream[Msg](math.inf)
        # Messages being handled, for the heartbeat.
        self._in_flight: dict[int, Msg] = {}
        self._closed: Exception | None = None

    async def run(self) -> None:
        """Pull until the stop, then let the fetched messages finish.

        Raises:
            ConnectionError: the connection closed for good (a reconnect is waited for).
        """
        try:
            with self._receive:
                async with anyio.create_task_group() as beats:
                    beats.start_soon(self._keep_alive)
                    async with anyio.create_task_group() as tg, self._send:
                        await self._pull(tg)
                    beats.cancel_scope.cancel()
            if self._closed is not None:
                raise ConnectionError(f"consumer {self._durable}: {self._closed}") from self._closed
        finally:
            with contextlib.suppress(TransportError):
                await self._psub.unsubscribe()

    async def _pull(self, tg: anyio.abc.TaskGroup) -> None:
        stop, limiter = self._stop, self._limiter
        send, receive = self._send, self._receive
        while not stop.is_set():
            # Let the handlers just given out run first: they may free slots.
            await anyio.lowlevel.checkpoint()
            # Hold a slot before fetching: never take messages we cannot start.
            await limiter.acquire()
            if stop.is_set():  # told to stop while waiting for the slot
                limiter.release()
                break
            batch = await self._fetch()
            if batch is None:
                break
            if not batch:
                continue
            if stop.is_set():  # the pull was open at the stop: give it back
                limiter.release()
                for msg in batch:
                    with contextlib.suppress(TransportError):
                        await msg.nak()
                break
            self._waiting = 1 + num_pending(batch[-1])
            for i, msg in enumerate(batch):
                if i:
                    await limiter.acquire()
                if not receive.statistics().tasks_waiting_receive:
                    tg.start_soon(self._work)
                send.send_nowait(msg)

    async def _fetch(self) -> list[Msg] | None:
        """The next batch for the slot held: [] (slot released) if none, None to end."""
        limiter = self._limiter
        try:
            batch = await self._psub.fetch(min(1 + limiter.value, self._waiting, 256), timeout=0.5)
        except FETCH_TIMEOUT:
            limiter.release()
            return []
        except TransportError as exc:
            limiter.release()
            if self._stop.is_set():
                return None
            if self._host.nc.is_closed:  # for good: no reconnect will come
                self._closed = exc
                return None
            log.warning("consumer %s: %s; retrying", self._durable, exc)
            await self._wait_reconnect()
            return []
        if not batch:
            limiter.release()
        return batch

    async def _wait_reconnect(self) -> None:
        """Back off until the connection is back (or we are told to stop)."""
        host = self._host
        host.reconnected.clear()
        with anyio.move_on_after(2.0):
            while not self._stop.is_set() and not host.nc.is_connected:
                await host.reconnected.wait()

    async def _work(self) -> None:
        in_flight = self._in_flight
        async for msg in self._receive:
            in_flight[id(msg)] = msg
            try:
                await self._handle(msg)
            finally:
                del in_flight[id(msg)]

    async def _keep_alive(self) -> None:
        while True:
            await anyio.sleep(self._ack_wait / 3)
            for msg in list(self._in_flight.values()):
                with contextlib.suppress(TransportError):
                    await msg.in_progress()

    async def _handle(self, msg: Msg) -> None:
        host, receiver = self._host, self._receiver
        try:
            try:
                message = host.accept(msg.subject, msg.data)
            except InvalidMessageError as exc:
                seq = msg.metadata.sequence.stream if msg.reply else None
                await host.reject(
                    subject=msg.subject,
                    data=msg.data,
                    code=exc.code,
                    reason=exc.reason,
                    receiver=receiver,
                    dedupe_key=f"seq{seq}" if seq else None,
                )
            else:
                handler = self._handler
                if _wants(handler, message, receiver):
                    retry = deliveries(msg) < self._max_deliver
                    if not await dispatch(host, handler, message, msg, receiver, retry=retry):
                        return  # nak'ed: redelivered later
            with contextlib.suppress(TransportError):
                await msg.ack()
        finally:
            self._limiter.release()


class LiveHandler:
    """The callback of a live (core NATS) subscription: typed dispatch, bad input rejected."""

    def __init__(self, host: Host, handler: Handler, receiver: str) -> None:
        self._host = host
        self._handler = handler
        self._receiver = receiver

    async def on_msg(self, msg: Msg) -> None:
        host = self._host
        try:
            message = host.accept(msg.subject, msg.data)
        except InvalidMessageError as exc:
            await host.reject(
                subject=msg.subject,
                data=msg.data,
                code=exc.code,
                reason=exc.reason,
                receiver=self._receiver,
            )
            return
        await dispatch(host, self._handler, message, msg, self._receiver)


async def dispatch(
    host: Host, handler: Handler, message: Message, msg: Msg, receiver: str, *, retry: bool = False
) -> bool:
    """Run a handler inside a CONSUMER span; a raising handler is reported, not fatal.

    With ``retry`` (a durable delivery that has attempts left), a handler that failed
    because NATS was unreachable (``ConnectionError``, ``PublishError``: a failover, a
    short outage) is retried: the message is redelivered after a delay instead of
    dead-lettered. Returns False if the message must not be acked.
    """
    span = host._consumer_span(msg, message.id, message.source.session, receiver)
    # Report inside the span: the error event joins the failed message's trace.
    with span as current:
        try:
            await observed(handler, message, receiver)  # metrics: handler latency
        except (ConnectionError, PublishError) as exc:  # swarmbus's: NATS unreachable
            record_failure(current, exc)
            if not retry:
                await _handler_failed(host, exc, message, msg, receiver)
                return True
            log.warning("handler for %s failed (%s): retrying", msg.subject, exc)
            with contextlib.suppress(TransportError):
                await msg.nak(delay=min(0.25 * 2 ** deliveries(msg), 10.0))
            return False
        except Exception as exc:  # noqa: BLE001 - reported: dead letter + error event
            record_failure(current, exc)
            await _handler_failed(host, exc, message, msg, receiver)
    return True


async def _handler_failed(
    host: Host, exc: Exception, message: Message, msg: Msg, receiver: str
) -> None:
    """Dead-letter the message a handler failed on, with an error event saying why."""
    log.error("handler for %s failed", msg.subject, exc_info=exc)
    await host.reject(
        subject=msg.subject,
        data=msg.data,
        code="handler_error",
        reason=f"{type(exc).__name__}: {exc}",
        receiver=receiver,
        dedupe_key=message.id,
        message_id=message.id,
    )


def _wants(handler: Handler, message: Message, receiver: str) -> bool:
    accepts: tuple[type, ...] | None = getattr(handler, "__swarmbus_types__", None)
    if accepts is not None and not isinstance(message, accepts):
        return False
    return not (
        getattr(handler, "__swarmbus_ignore_own__", False) and message.source.agent == receiver
    )
