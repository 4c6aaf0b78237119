"""Reading JetStream: stored messages, the last message per subject, KV state, pulls.

nats-py 2.16 has no batch direct get, no counted LAST_PER_SUBJECT read and no pull
without a lingering request; these are those, written once for every component.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Iterable
from functools import partial
from typing import Final

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from swarmbus._errors import ConnectionError, PublishError
from swarmbus._jetstream.errors import translate, transport_error
from swarmbus._jetstream.headers import (
    DESCRIPTION,
    KV_OPERATION,
    KV_REMOVED,
    MARKER_REASON,
    NUM_PENDING,
    SEQUENCE,
    STATUS,
)
from swarmbus._jetstream.hotpath import InlineDelivery, Later, settled

_NO_MESSAGES: Final = frozenset({"404", "408", "409"})
"""Pull statuses that end a pull: no messages, request timeout, consumer changed."""
NO_RESPONDERS: Final = "503"
"""The status of a pull from a consumer that does not exist (deleted as inactive)."""

__all__ = [
    "PullInbox",
    "deliveries",
    "kv_latest",
    "last_per_subject",
    "num_pending",
    "quietly",
    "stored_messages",
    "unsubscribe_all",
]


def num_pending(msg: Msg) -> int:
    """Messages the consumer still has for us after ``msg`` (0 if unknown)."""
    try:
        return int(msg.metadata.num_pending or 0)
    except (nats.errors.Error, ValueError, IndexError):
        return 0


def deliveries(msg: Msg) -> int:
    """How often JetStream delivered ``msg`` (1 for a message that is not JetStream's).

    Read off its ack subject: ``msg.metadata.num_delivered`` builds the whole metadata
    (a datetime and five ints), ~5% of a task worker's time.
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return 1
    try:
        # $JS.ACK.<stream>.<consumer>.<delivered>... (9 tokens), or the form with
        # domain and account hash, where nats-py knows the index.
        return int(tokens[4] if len(tokens) == 9 else tokens[Msg.Ack.NumDelivered])
    except (IndexError, ValueError):
        return 1


async def stored_messages(
    js: JetStreamContext, stream: str, subject: str, *, batch: int = 1000, timeout: float = 5.0
) -> list[Msg]:
    """Every message stored on subjects matching ``subject``, in stream order.

    Batch direct gets (``allow_direct`` streams, nats-server >= 2.11), ``batch`` messages
    per round trip. No consumer, so it also reads a work-queue stream, where a consumer
    would overlap the filters of the consumers that work the queue.
    """
    nc: NatsClient = js._nc
    page: list[Msg] = []
    end: dict[str, str] = {}
    done = anyio.Event()

    async def on_msg(msg: Msg) -> None:
        headers = msg.headers or {}
        if STATUS in headers and not msg.data:
            end.update(headers)  # 204 end of batch (with what is left), 404 nothing
            done.set()
        else:
            page.append(msg)

    msgs: list[Msg] = []
    inbox = nc.new_inbox()
    try:
        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        try:
            seq = 1
            while True:
                page, done = [], anyio.Event()
                end.clear()
                request = {"seq": seq, "next_by_subj": subject, "batch": batch}
                await nc.publish(
                    f"{js._prefix}.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
                )
                with anyio.fail_after(timeout):
                    await done.wait()
                msgs += page
                status = end.get(STATUS)
                if status not in ("204", "404"):
                    raise ConnectionError(
                        f"cannot read {stream} with direct gets (status {status}: "
                        f"{end.get(DESCRIPTION, '')}); it needs allow_direct, which "
                        "swarmbus sets when it provisions the stream"
                    )
                if status == "404" or not page:
                    return msgs
                if int(end.get(NUM_PENDING, "0")) == 0:
                    return msgs
                seq = int((page[-1].headers or {})[SEQUENCE]) + 1
        finally:
            await sub.unsubscribe()
    except (TimeoutError, nats.errors.Error) as exc:
        raise transport_error(exc, f"read {subject}") from exc


async def has_messages(js: JetStreamContext, stream: str, subject: str) -> bool:
    """Whether ``stream`` stores a message on a subject matching ``subject`` (one request)."""
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot read {stream}") from exc
    except (TimeoutError, nats.errors.Error) as exc:
        raise transport_error(exc, f"read {subject}") from exc
    return bool(info.state.subjects)


async def last_per_subject(
    js: JetStreamContext, stream: str, subject: str, *, timeout: float = 5.0
) -> list[Msg]:
    """The last message of every subject matching ``subject``, in stream order.

    One ephemeral pull consumer (LAST_PER_SUBJECT) and one pull request for all of
    them: no per-key get, no push flow control (10,000 keys: ~0.2-0.5 s). The messages
    are the state as of the consumer's creation. Unlike nats-py's KV watch, whose
    end-of-initial-values marker can arrive before the values under load, it knows how
    many messages to expect from the consumer's creation.

    A key rewritten past its history between the consumer's creation and the pull
    loses the message the consumer was to deliver: the server then ends the pull
    early ("no messages") and every later key would be missing, so a short read is
    read again with a new consumer (until ``timeout``).
    """
    deadline = anyio.current_time() + timeout
    while True:
        msgs, complete = await _read_last_per_subject(js, stream, subject, timeout)
        if complete:
            return msgs
        if anyio.current_time() > deadline:
            raise PublishError(f"read {subject}: timed out (its keys kept changing)")


async def _read_last_per_subject(
    js: JetStreamContext, stream: str, subject: str, timeout: float
) -> tuple[list[Msg], bool]:
    """One counted pull of last_per_subject: (messages, whether all of them came)."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        filter_subject=subject,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    try:
        info = await js.add_consumer(stream, config)
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot read {subject}") from exc
    except (TimeoutError, nats.errors.Error) as exc:
        raise transport_error(exc, f"read {subject}") from exc
    wanted = int(info.num_pending or 0)
    msgs: list[Msg] = []
    done = anyio.Event()
    nc: NatsClient = js._nc

    async def on_msg(msg: Msg) -> None:
        if msg.headers and STATUS in msg.headers and not msg.data:
            done.set()  # 404/408: nothing more (e.g. a purge raced with us)
            return
        msgs.append(msg)
        if len(msgs) >= wanted:
            done.set()

    try:
        if wanted:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(
                inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
            )
            try:
                request = json.dumps({"batch": wanted, "no_wait": True}).encode()
                await nc.publish(
                    f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{info.name}", request, reply=inbox
                )
                with anyio.fail_after(timeout + wanted / 1000):
                    await done.wait()
            finally:
                await sub.unsubscribe()
    except (TimeoutError, nats.errors.Error) as exc:
        raise transport_error(exc, f"read {subject}") from exc
    finally:
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await js.delete_consumer(stream, info.name)
    return msgs, len(msgs) >= wanted


async def kv_latest(kv: KeyValue, keys: str = ">") -> list[tuple[str, Msg]]:
    """``(key, message)`` of every live key of ``kv`` matching ``keys`` (deletes skipped)."""
    prefix: str = kv._pre
    out = []
    for msg in await last_per_subject(kv._js, kv._stream, prefix + keys):
        headers = msg.headers or {}
        if headers.get(KV_OPERATION) in KV_REMOVED or MARKER_REASON in headers:
            continue
        out.append((msg.subject[len(prefix) :], msg))
    return out


async def quietly(op: Awaitable[None]) -> None:
    """Ack/nak/in_progress: losing one only delays a redelivery that _settle handles."""
    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
        await op


async def _put_back(msg: Msg) -> None:
    await quietly(msg.nak())


async def unsubscribe_all(subs: Iterable[NatsSubscription]) -> None:
    for sub in subs:
        with contextlib.suppress(nats.errors.Error):  # fired already, or connection gone
            await sub.unsubscribe()


class PullInbox:
    """The reply inbox of one claimer's pulls (one pull at a time: ``_scan_lock``).

    A callback collects a pull's messages: waiting on the subscription message by
    message (``next_msg``) would cost an event-loop turn and a timer per message. A pull
    given up on (its caller cancelled, or timed out) stays open on the server until it
    expires, and what it gets then must not end or fill a later pull, maybe of another
    queue. So each pull has its own reply subject (``<inbox>.<n>``, which status
    answers arrive on: those of another pull are ignored), and a message is taken only
    by a pull of its own consumer (named in its ack subject); any other is put back at
    once (``nak``).
    """

    def __init__(self, nc: NatsClient, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        self._sub: NatsSubscription | None = None
        self._prefix = ""
        self._current = ""  # the reply subject of the pull in flight ("": none)
        self._acks = ""  # the ack subjects' prefix of its consumer's messages
        self._count = 0
        self._msgs: list[Msg] = []
        self._want = 0
        self._done: asyncio.Future[None] | None = None
        self._missing = False

    async def pull(self, next_subject: str, batch: int, wait: float = 0.0) -> list[Msg] | None:
        """Up to ``batch`` messages (none waiting: at once, or after ``wait`` seconds
        if ``wait``); None if the consumer is gone.

        A pull from a consumer that does not exist gets "no responders" (503) at once;
        it is reported, not waited out until the request timeout.
        """
        nc = self._nc
        self._missing = False
        self._msgs = []
        try:
            if self._sub is None:
                self._prefix = nc.new_inbox()
                # Taken in the read loop: no task hop between a dispatch and its pull.
                self._sub = await InlineDelivery(self._take).subscribe(nc, f"{self._prefix}.*")
            self._count += 1
            self._current = f"{self._prefix}.{self._count}"
            stream, consumer = next_subject.rsplit(".", 2)[1:]
            self._acks = f"$JS.ACK.{stream}.{consumer}."
            self._want = batch
            self._done = asyncio.get_running_loop().create_future()
            ask: dict[str, int | bool] = {"batch": batch}
            if wait:
                ask["expires"] = int(wait * 1e9)
            else:
                ask["no_wait"] = True
            request = json.dumps(ask).encode()
            await nc.publish(next_subject, request, reply=self._current)
            await settled([self._done], self._timeout)  # asyncio.wait_for, a turn sooner
            if self._done.cancelled():
                raise TimeoutError
        except (TimeoutError, nats.errors.Error) as exc:
            await self._give_back()
            raise ConnectionError(f"cannot pull tasks: {exc}") from exc
        except BaseException:  # cancelled: what it got so far goes back
            await self._give_back()
            raise
        finally:
            self._done = None
            self._current = ""
        if self._missing and not self._msgs:
            return None
        msgs, self._msgs = self._msgs, []
        return msgs

    async def _give_back(self) -> None:
        msgs, self._msgs = self._msgs, []
        for msg in msgs:
            await quietly(msg.nak())

    def _take(self, msg: Msg) -> Later | None:
        """Collect a message of the pull in flight (in the read loop: ``InlineDelivery``);
        one it cannot take is put back, in the subscription's task."""
        status = (msg.headers or {}).get(STATUS)
        done = self._done
        if status:
            if msg.subject != self._current or done is None or done.done():
                return None  # the end of a pull given up on
        elif done is None or done.done() or not msg.reply.startswith(self._acks):
            return partial(_put_back, msg)  # got by a pull given up on: back to its queue
        if not status:
            self._msgs.append(msg)
        elif status == NO_RESPONDERS:
            self._missing = True
        finished = status in _NO_MESSAGES or self._missing or len(self._msgs) >= self._want
        if finished:
            done.set_result(None)
        return None

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
