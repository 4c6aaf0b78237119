"""Confirmed background publishing: JetStream publishes nobody waits for, never lost.

``Bus.publish(..., wait=False)`` hands an event to the outbox instead of waiting for
its JetStream ack. The outbox sends it with a reply subject of its own, matches the
acks as they come back, and re-sends (same ``Nats-Msg-Id``, so the stream stores it
once) whatever is not acknowledged within ``resend_after`` — through a reconnect or a
stream leader election — until ``give_up_after``, when it logs an error. Closing the
bus waits for the outbox to empty (for up to the bus's ``retry_for``). Callers get
throughput (no round trip per event) without silent loss while the process lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Final

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from swarmbus._jetstream.hotpath import InlineDelivery, Later, publish_nowait

log = logging.getLogger("swarmbus.outbox")

RESEND_AFTER: Final = 2.0
GIVE_UP_AFTER: Final = 110.0  # inside JetStream's 2-minute duplicate window
MAX_PENDING: Final = 10_000


class _Refusal(msgspec.Struct):
    code: int = 0
    description: str = ""


class _Ack(msgspec.Struct):
    """The part of a JetStream publish ack the outbox reads."""

    error: _Refusal | None = None


_ack_decoder: Final = msgspec.json.Decoder(_Ack)


@dataclass
class _Pending:
    subject: str
    data: bytes
    headers: dict[str, str]
    first_sent: float
    last_sent: float = field(default=0.0)


class Outbox:
    """Unacknowledged JetStream publishes of one connection, re-sent until stored."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        resend_after: float = RESEND_AFTER,
        give_up_after: float = GIVE_UP_AFTER,
    ) -> None:
        self._nc = nc
        self.resend_after = resend_after
        self.give_up_after = give_up_after
        self._pending: dict[str, _Pending] = {}
        self._tokens = itertools.count()
        self._prefix = ""
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._empty = asyncio.Event()
        self._empty.set()
        self._room = asyncio.Event()
        self._room.set()

    @property
    def pending(self) -> int:
        """Publishes sent but not yet acknowledged."""
        return len(self._pending)

    async def start(self) -> None:
        """Subscribe to the ack inbox and start the re-send loop (owned by the bus)."""
        self._prefix = self._nc.new_inbox()
        # Acks taken in the read loop (``InlineDelivery``): no task hop per event.
        self._sub = await InlineDelivery(self._take).subscribe(self._nc, f"{self._prefix}.*")
        self._task = asyncio.get_running_loop().create_task(self._resend_loop())

    async def send(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        """Publish with a tracked reply; returns once handed to the connection."""
        if self._sub is None:
            await self.start()
        while len(self._pending) >= MAX_PENDING:  # back-pressure, not unbounded memory
            self._room.clear()
            await self._room.wait()
            if self._sub is None:  # closed while waiting: nothing would ever make room
                raise nats.errors.ConnectionClosedError
        token = str(next(self._tokens))
        now = time.monotonic()
        self._pending[token] = _Pending(subject, data, headers, now, now)
        self._empty.clear()
        try:
            reply = f"{self._prefix}.{token}"
            if not publish_nowait(self._nc, subject, data, reply, headers):
                await self._nc.publish(subject, data, reply=reply, headers=headers)
        except BaseException:
            self._done(token)  # the caller is told; re-sending it later would be a ghost
            raise

    def _take(self, msg: Msg) -> Later | None:
        """Settle the publish ``msg`` acknowledges (in the read loop: never blocks)."""
        token = msg.subject[len(self._prefix) + 1 :]
        entry = self._pending.get(token)
        if entry is None:
            return None
        if msg.headers and msg.headers.get("Status") == "503":
            return None  # no stream responder yet (election): the re-send loop retries
        try:
            error = _ack_decoder.decode(msg.data).error
        except msgspec.DecodeError:
            error = None
        if error is not None and error.code == 503:
            return None  # "temporarily unavailable" (an election): the re-send loop retries
        if error is not None:
            log.error("the stream refused %s: %s", entry.subject, error.description)
        self._done(token)
        return None

    def refused(self, subject: str, reason: str) -> bool:
        """Drop the publishes to ``subject`` that the server refused (permissions).

        ``subject`` is lower-cased, as nats-py hands over the server's error. A re-send
        would be refused again until ``give_up_after``, holding room meanwhile.
        """
        tokens = [t for t, entry in self._pending.items() if entry.subject.lower() == subject]
        if tokens:
            log.error("the server refused %d publishes to %s: %s", len(tokens), subject, reason)
        for token in tokens:
            self._done(token)
        return bool(tokens)

    def _done(self, token: str) -> None:
        self._pending.pop(token, None)
        self._room.set()
        if not self._pending:
            self._empty.set()

    async def _resend_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resend_after / 2)
            now = time.monotonic()
            for token, entry in list(self._pending.items()):
                if now - entry.first_sent > self.give_up_after:
                    log.error(
                        "giving up on %s after %.0fs unacknowledged",
                        entry.subject,
                        self.give_up_after,
                    )
                    self._done(token)
                elif now - entry.last_sent >= self.resend_after and self._nc.is_connected:
                    entry.last_sent = now
                    with contextlib.suppress(nats.errors.Error):
                        await self._nc.publish(
                            entry.subject,
                            entry.data,
                            reply=f"{self._prefix}.{token}",
                            headers=entry.headers,
                        )

    async def flush(self, timeout: float) -> bool:
        """Wait until everything sent is acknowledged (True) or ``timeout`` passes."""
        if self._empty.is_set():
            return True
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            log.error("closing with %d events unacknowledged", len(self._pending))
            return False
        return True

    async def close(self, timeout: float) -> None:
        """Flush, then stop the re-send loop and the ack subscription."""
        if self._sub is None:
            return
        await self.flush(timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()
        self._sub = None
        self._room.set()
