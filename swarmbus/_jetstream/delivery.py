"""What a receive loop touches of nats-py: messages, subscriptions, durable pull consumers.

The bus's receive loops (``swarmbus._consumer``, ``swarmbus._request_server``) handle
nats-py messages on the hot path: an ack, a nak, a reply is one call each, so they get
the nats-py types and the one exception class those calls raise from here, by name,
instead of a wrapper that would cost an await per message. ``PullConsumer`` creates,
updates in place, long-pulls from and deletes a durable pull consumer, with its
JetStream refusals translated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client as Connection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from swarmbus._jetstream.errors import translate
from swarmbus._jetstream.headers import JS_API, STATUS
from swarmbus._jetstream.retry import Guard

__all__ = [
    "FETCH_TIMEOUT",
    "Connection",
    "Msg",
    "PullConsumer",
    "PullOptions",
    "PullSubscription",
    "Subscription",
    "TransportError",
]

#: What a message operation (ack, nak, in_progress, a reply, a fetch) raises when the
#: connection fails it.
TransportError: Final = nats.errors.Error
#: What an expired fetch raises (nothing was waiting).
FETCH_TIMEOUT: Final = (TimeoutError, nats.errors.TimeoutError)

PullSubscription = JetStreamContext.PullSubscription
HEARTBEAT_STATUS: Final = "100"
NO_RESPONDERS_STATUS: Final = "503"


@dataclass(frozen=True)
class PullOptions:
    """How a durable pull consumer is configured and pulled from."""

    ack_wait: float
    max_deliver: int
    deliver_new: bool
    #: Seconds the consumer outlives its last pull (None: forever).
    inactive_threshold: float | None = None
    #: Seconds a long pull waits on the server; idle heartbeats come at half of it.
    expires: float = 120.0


class PullConsumer:
    """A durable pull consumer: created or updated in place, long-pulled, deleted.

    nats-py's ``fetch`` neither notices a lost pull (its heartbeats are only skipped) nor
    stops at once, and waits message by message (a timer and a loop turn each); this
    pulls on its own inbox, collecting in a callback: a long pull (``expires``, idle
    heartbeats) when caught up, a ``no_wait`` pull for a known backlog. A long pull
    asks for as many messages as the caller has room for but returns at the first one
    (no added latency); it stays open on the server, and the next calls take its
    further messages without a new request until it is used up or ends (a request
    per message would cost the client as much as the message's own handling). A
    heartbeat only stamps the time; a pull silent for two heartbeats (a reconnect, a
    leader change) ends empty and is re-issued. Messages that arrive for a pull given
    up (or cancelled) are handed out by the next one.
    """

    def __init__(
        self,
        js: JetStreamContext,
        nc: Connection,
        stream: str,
        durable: str,
        options: PullOptions,
        guard: Guard,
    ) -> None:
        self._js, self._nc, self._guard = js, nc, guard
        self.stream, self.durable, self.options = stream, durable, options
        self._next = f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._filters: list[str] = []
        self._sub: Subscription | None = None
        self._inbox = ""
        self._msgs: list[Msg] = []
        self._want = 0
        #: Messages the open long pull may still deliver (0: no pull open).
        self._open = 0
        self._ended: asyncio.Future[None] | None = None
        self._silence = 0.0
        self._interrupted = False
        self._timer: asyncio.TimerHandle | None = None
        self._heard = 0.0
        self._gone = False

    async def create(self, filter_subjects: list[str]) -> None:
        """Create the consumer, or update it in place (same durable) to these filters.

        Raises:
            PermissionDeniedError, PublishError: the server refused the consumer.
        """
        opts = self.options
        config = ConsumerConfig(
            durable_name=self.durable,
            filter_subjects=filter_subjects,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=opts.ack_wait,
            max_deliver=opts.max_deliver,
            max_ack_pending=1000,
            deliver_policy=DeliverPolicy.NEW if opts.deliver_new else DeliverPolicy.ALL,
            inactive_threshold=opts.inactive_threshold,
        )
        action = f"{JS_API}.CONSUMER.DURABLE.CREATE.{self.stream}.{self.durable}"
        try:
            with self._guard(action, f"create consumer {self.durable}"):
                await self._js.add_consumer(self.stream, config)
        except nats.js.errors.APIError as exc:
            raise translate(exc, f"cannot create consumer {self.durable}") from exc
        self._filters = filter_subjects
        if self._sub is None:
            self._inbox = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def delete(self) -> None:
        """Delete the consumer (its owner left for good); a missing one is no error."""
        try:
            await self._js.delete_consumer(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            pass
        except nats.js.errors.APIError as exc:
            raise translate(exc, f"cannot delete consumer {self.durable}") from exc

    async def close(self) -> None:
        """Stop receiving (the consumer stays until deleted or inactive).

        Messages that came for a pull given up are handed back for redelivery now.
        """
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(TransportError):
                await sub.unsubscribe()
        left, self._msgs = self._msgs, []
        for msg in left:
            with contextlib.suppress(TransportError):
                await msg.nak()

    async def pull(self, batch: int, *, backlog: bool = False) -> list[Msg]:
        """Up to ``batch`` messages: at least one unless the pull ended empty.

        ``batch`` is the room the caller has: the messages the open long pull may still
        deliver count against it, so never ask for more than the caller can start.
        ``backlog``: the server said messages are waiting: take what is there at once
        (``no_wait``) instead of opening a long pull (unless one is still open).

        Returns [] when a long pull expired or went silent (re-issue it).

        Raises:
            TransportError: the connection failed the pull.
        """
        assert self._sub is not None, "create() first"
        if not self._msgs:
            expires = self.options.expires
            no_wait = backlog and batch > 1 and not self._open
            silence = 5.0 if no_wait else expires + 1.0  # two heartbeats missed: lost
            self._want = batch if no_wait else 1
            if not self._open:
                request: dict[str, object] = {"batch": batch}
                if no_wait:
                    request["no_wait"] = True
                else:
                    request["expires"] = int(expires * 1e9)
                    request["idle_heartbeat"] = int(expires / 2 * 1e9)  # the most it may be
                    self._open = batch
                self._heard = time.monotonic()
                await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
            await self._wait(silence)
            if self._gone:  # the consumer was deleted under us: create it again
                self._gone = False
                await self.create(self._filters)
        got, self._msgs = self._msgs[:batch], self._msgs[batch:]
        return got

    async def _wait(self, silence: float) -> None:
        """Until the pull ended, or nothing (not even a heartbeat) came for ``silence``.

        A future and a timer (re-armed while heartbeats come): an anyio Event and a
        cancel scope per wait cost more than the rest of a message's receipt.
        """
        if self._interrupted:
            self._interrupted = False
            return
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self._silence = silence
        self._timer = loop.call_later(silence, self._check_silence)
        try:
            await self._ended
        except BaseException:  # cancelled (a stop, a reconnect): the next call opens one
            self._open = 0
            raise
        finally:
            self._ended = None
            if self._timer is not None:
                self._timer.cancel()

    def interrupt(self) -> None:
        """End the wait of the pull under way now (it returns what came, perhaps
        nothing), or else of the next one; the next pull is a new request (a stop, or
        a reconnect: the open pull was lost with the old connection).
        """
        self._open = 0
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result(None)
        else:
            self._interrupted = True

    def _check_silence(self) -> None:
        ended = self._ended
        if ended is None or ended.done():
            return
        left = self._heard + self._silence - time.monotonic()
        if left > 0:
            self._timer = asyncio.get_running_loop().call_later(left, self._check_silence)
            return
        self._open = 0  # lost: the next call opens a new pull
        ended.set_result(None)

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        status = (msg.headers or {}).get(STATUS) if not msg.data else None
        if status == HEARTBEAT_STATUS:
            return
        if not status:
            self._msgs.append(msg)
            if self._open:
                self._open -= 1
        else:  # the pull ended (expired, or refused): the next call opens a new one
            self._open = 0
            if status == NO_RESPONDERS_STATUS:
                self._gone = True
        ended = self._ended
        if ended is not None and not ended.done() and (status or len(self._msgs) >= self._want):
            ended.set_result(None)
