"""Core NATS on the request and task hot paths: messages taken where nats-py reads
them, publishes queued without nats-py's per-call overhead, and written at once.

nats-py hands every message of a callback subscription to that subscription's own task
through an ``asyncio.Queue``: a put, a get, a task switch and a loop turn per message.
A request crosses two subscriptions (the responder's, then the requester's reply
subscription), so on the request hot path that hop is a large share of what the bus
adds to a round trip. ``InlineDelivery`` gives each message to a synchronous ``take``
in the connection's read loop instead (nats-py 2.16, pinned: the subscription's queue
is the seam, its ``put_nowait`` is what the read loop calls).

``take`` returns None when it is done with the message, or the work that must be
awaited (a report of bad input): the message then goes the usual way, through the
subscription's queue and task, which awaits that work, in arrival order and bounded
by the subscription's pending limits as before. ``take`` runs inside the read loop:
it must not block, and whatever it raises is logged and the message dropped (an
exception there would end nats-py's read loop, the connection's only reader).

``publish_nowait`` appends a PUB (HPUB with headers) to the connection's pending buffer
as ``Client.publish`` does, and wakes the flusher the same way (only when no flush is
queued), without the four coroutine frames, the subject checks and a future per call.
Header names are checked as nats-py checks them; a header that nats-py would have to
rewrite (a value with a line break, a name that is no token) is declined (False).
It applies only while the connection is up with room in its buffer; otherwise it
returns False and the caller uses ``Client.publish`` (which buffers during a
reconnect, forces a flush or raises). Its subjects are checked as nats-py checks a
publish's (not empty, no whitespace: a line break would inject protocol commands); a
subject that fails is declined too, and ``Client.publish`` then raises.

``settled`` waits for futures settled in the read loop (acks) as ``asyncio.wait`` with
a timeout does, one loop turn sooner: ``asyncio.wait`` wakes its caller through a done
callback and a waiter future (two turns after the last result is set), ``settled``
awaits each future itself (the next turn).

``SafeHeaders`` guards the read loop against headers nats-py cannot parse: nats-py
2.16 decodes an inline status line (``NATS/1.0 <status> <description>``) outside its
``try``, so bytes there that are no UTF-8 raise out of its read loop, which then stops
reading while the connection still says it is connected. Anyone who may publish to one
subject an agent subscribes to could send them. Such headers are dropped (logged).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import anyio
from nats.aio.client import Client as Connection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = [
    "InlineDelivery",
    "Later",
    "SafeHeaders",
    "Take",
    "flush_now",
    "publish_nowait",
    "settled",
]

log = logging.getLogger("swarmbus")

#: Work left to await for a message (run in the subscription's task).
Later = Callable[[], Awaitable[object]]
#: Handles a message in the read loop; returns the work left, if any.
Take = Callable[[Msg], Later | None]


class InlineDelivery:
    """Deliver a subscription's messages to ``take`` in the connection's read loop."""

    __slots__ = ("_later", "_put", "_sub", "_take")

    def __init__(self, take: Take) -> None:
        self._take = take
        self._sub: Subscription | None = None
        self._put: Callable[[Msg], None] | None = None
        # id(msg) -> the work ``take`` left for it (the message is queued until it ran)
        self._later: dict[int, Later] = {}

    async def subscribe(self, nc: Connection, subject: str, queue: str = "") -> Subscription:
        """``nc.subscribe`` with this delivery (the caller flushes and handles errors)."""
        sub = await nc.subscribe(subject, queue=queue, cb=self.run_later)
        self.attach(sub)
        return sub

    def attach(self, sub: Subscription) -> None:
        """Take ``sub``'s messages from now on (``sub``'s callback must be ``run_later``)."""
        pending = sub._pending_queue
        self._sub, self._put = sub, pending.put_nowait
        pending.put_nowait = self._deliver  # type: ignore[method-assign,assignment]

    def _deliver(self, msg: Msg) -> None:
        """What nats-py's read loop calls for each message (the queue's ``put_nowait``)."""
        try:
            later = self._take(msg)
        except Exception:  # never end the read loop: log and drop, as its error_cb does
            log.exception("dropped a message on %s", msg.subject)
            later = None
        if later is None:
            assert self._sub is not None
            self._sub._pending_size -= len(msg.data)  # nats-py counted it as queued
            return
        assert self._put is not None
        self._put(msg)  # QueueFull: nats-py reports a slow consumer and drops it
        self._later[id(msg)] = later

    async def run_later(self, msg: Msg) -> None:
        """The subscription's callback: await what ``take`` left for ``msg``."""
        later = self._later.pop(id(msg), None)
        if later is None:  # queued before ``attach``
            later = self._take(msg)
        if later is not None:
            await later()


_CONNECTED: Final = Connection.CONNECTED
_CRLF: Final = b"\r\n"


_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # nats-py's check
_BAD_SUBJECT: Final = re.compile(r"\s")  # nats-py's check of a publish's subjects


def publish_nowait(
    nc: Connection,
    subject: str,
    data: bytes,
    reply: str = "",
    headers: Mapping[str, str] | None = None,
    *,
    wake: bool = True,
) -> bool:
    """Queue a PUB of ``data`` on ``nc`` as ``Client.publish`` would; False if it cannot
    be done here (not connected, buffer full, too large, a header nats-py would
    rewrite): then use ``Client.publish``. ``wake=False``: the caller calls
    ``flush_now`` next (nats-py's flusher is not woken for a write done already).

    ``subject`` and ``reply`` are checked as nats-py checks them (module docstring).
    """
    flusher = nc._flusher_task
    if nc._status != _CONNECTED or flusher is None or flusher.done():
        return False
    if not subject or _BAD_SUBJECT.search(subject) or (reply and _BAD_SUBJECT.search(reply)):
        return False
    size = len(data)
    if headers is not None:  # as nats-py: an empty dict is an HPUB too
        lines = ["NATS/1.0\r\n"]
        for name, value in headers.items():
            value = value.strip()
            if not _HEADER_NAME.fullmatch(name) or "\r" in value or "\n" in value:
                return False
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode()
        start = f"HPUB {subject} {reply} {len(head)} {len(head) + size}\r\n".encode()
        cmd = b"".join((start, head, data, _CRLF))
    else:
        cmd = b"".join((f"PUB {subject} {reply} {size}\r\n".encode(), data, _CRLF))
    pending_size = nc._pending_data_size + len(cmd)
    if size > nc._max_payload or 0 < nc._max_pending_size < pending_size:
        return False
    nc._pending.append(cmd)
    nc._pending_data_size = pending_size
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += size
    if wake:
        _wake_flusher(nc)
    return True


def _wake_flusher(nc: Connection) -> None:
    """Wake nats-py's flusher as ``Client.publish`` does (only when no flush is queued)."""
    flusher, queue = nc._flusher_task, nc._flush_queue
    if queue is not None and queue.empty() and flusher is not None and not flusher.done():
        # With the future it resolves once written (nobody waits on it).
        queue.put_nowait(flusher.get_loop().create_future())


def flush_now(nc: Connection) -> None:
    """Write ``nc``'s pending buffer to the socket now, as nats-py's flusher task does on
    its next turn, which comes only after every task ready before it ran: for writes
    whose round trip a caller waits on (``AckPublisher``). Unless connected with a live
    flusher, it wakes the flusher instead (that then writes, or nats-py's reconnect
    does)."""
    flusher, transport = nc._flusher_task, nc._transport
    if nc._status != _CONNECTED or flusher is None or flusher.done() or transport is None:
        _wake_flusher(nc)
        return
    if not nc._pending:
        return
    transport.writelines(nc._pending)
    nc._pending = []
    nc._pending_data_size = 0


async def settled(futures: Sequence[asyncio.Future[Any]], timeout: float) -> None:
    """Wait until every future of ``futures`` is done, for at most ``timeout`` seconds.

    A future still pending at the timeout is cancelled (the caller counts it as not
    answered); so is one pending when the caller is cancelled. The futures must be the
    caller's own: one cancelled by anybody else ends the wait with CancelledError.
    """
    for future in futures:
        if not future.done():
            break
    else:
        return  # all answered already (no timer, no cancel scope)
    with anyio.move_on_after(timeout):
        for future in futures:
            if not future.done():
                await future


class SafeHeaders:
    """The connection's header parser (``Client._process_headers``, nats-py 2.16, pinned),
    with what it cannot parse dropped instead of raised into its read loop."""

    __slots__ = ("_parse",)

    def __init__(self, parse: Callable[[bytes], Awaitable[dict[str, str] | None]]) -> None:
        self._parse = parse

    @classmethod
    def install(cls, nc: Connection) -> None:
        nc._process_headers = cls(nc._process_headers)  # type: ignore[method-assign]

    async def __call__(self, headers: bytes) -> dict[str, str] | None:
        try:
            return await self._parse(headers)
        except Exception as exc:  # noqa: BLE001 - it would end the read loop
            log.warning("dropped message headers nats-py cannot parse: %r", exc)
            return None
