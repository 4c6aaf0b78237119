"""Watching KV keys: an ordered push consumer from a revision on, or from now on.

nats-py's ``kv.watch`` always starts with the current values (or only new ones) and
cannot resume after a known revision; a blackboard watcher resumes "after revision
N" and the locks' one watch per bucket wants only new writes, on a memory-backed
consumer (a file-backed one costs ~10 ms to create). Both are an ordered consumer on
the bucket's stream with a callback; this is that, written once. The callback runs
on the client's reader task: it must not block (hand the change to a memory stream
or update in-process state). With ``inline`` it runs in the connection's read loop
itself (``hotpath.InlineDelivery``: one loop turn less per change, for a waiter on the
hot path); whatever it raises there is logged and that change dropped.

``watch_until`` is the common "wait until this key says so" on top of a
``NatsStore`` watch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, TypeVar

import anyio
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from swarmbus._jetstream.errors import NatsError, nats_errors
from swarmbus._jetstream.headers import KV_DELETE, KV_OPERATION, KV_PURGE, MARKER_REASON, TTL
from swarmbus._jetstream.hotpath import InlineDelivery, Later
from swarmbus._jetstream.store import NatsStore
from swarmbus._state import Entry

__all__ = ["KvChange", "KvWatch", "Operation", "kv_stream", "operation", "watch_until"]

Operation = Literal["put", "delete", "purge"]

KV_STREAM_PREFIX: Final = "KV_"
KV_SUBJECTS: Final = "$KV"
_STOP_TIMEOUT: Final = 5.0

_T = TypeVar("_T")


@dataclass(slots=True)
class KvChange:
    """One stored entry of a KV key: a write, a delete or a purge/expiry marker.

    ``time`` (server time) is set by reads that need it, None in watches. Read-only by
    convention: not frozen, because a watch makes one per stored message and a frozen
    dataclass costs four times as much to build (~2 us against ~0.5 us).
    """

    key: str
    revision: int
    operation: Operation
    value: bytes
    time: datetime | None = None
    #: The write's ``Nats-TTL`` header as stored (None: written without a TTL).
    ttl: str | None = None

    @property
    def removed(self) -> bool:
        """A delete or purge marker, or a server marker (``MaxAge`` after a TTL expiry)."""
        return self.operation != "put"


def kv_stream(bucket: str) -> str:
    """The stream that holds KV bucket ``bucket``."""
    return f"{KV_STREAM_PREFIX}{bucket}"


def operation(headers: dict[str, str] | None) -> Operation:
    """What a stored KV message is, from its headers (nats-py counts markers as purges)."""
    if not headers:
        return "put"
    op = headers.get(KV_OPERATION)
    if op == KV_DELETE:
        return "delete"
    if op == KV_PURGE or MARKER_REASON in headers:
        return "purge"
    return "put"


class KvWatch:
    """An ordered push consumer over keys of bucket ``bucket`` matching ``keys``.

    ``start`` is the first revision (stream sequence) to deliver; None delivers only
    writes made after the watch starts. ``memory`` puts the consumer's state in
    memory. ``on_change`` gets every entry in revision order; ``inline`` calls it in
    the connection's read loop (see the module docstring).
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        on_change: Callable[[KvChange], None],
        *,
        keys: str = ">",
        start: int | None = None,
        memory: bool = False,
        inactive_threshold: float = 300.0,
        inline: bool = False,
    ) -> None:
        self.js = js
        self.bucket = bucket
        self.subject = f"{KV_SUBJECTS}.{bucket}.{keys}"
        self._prefix = len(KV_SUBJECTS) + len(bucket) + 2
        self._on_change = on_change
        self._start = start
        self._memory = memory
        self._inactive_threshold = inactive_threshold
        self._delivery = InlineDelivery(self._take) if inline else None
        self._sub: Subscription | None = None

    @classmethod
    def on_store(
        cls,
        store: NatsStore,
        on_change: Callable[[KvChange], None],
        *,
        keys: str = ">",
        start: int | None = None,
    ) -> KvWatch:
        """A watch of the bucket behind ``store``."""
        return cls(store.kv._js, store.name, on_change, keys=keys, start=start)

    async def start(self) -> None:
        """Create the consumer; changes flow to ``on_change`` from now on."""
        if self._start is None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW, mem_storage=self._memory)
        else:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._start,
                mem_storage=self._memory,
            )
        delivery = self._delivery
        with nats_errors(f"cannot watch {self.subject}"):
            self._sub = await self.js.subscribe(
                self.subject,
                stream=kv_stream(self.bucket),
                cb=self._on_msg if delivery is None else delivery.run_later,
                ordered_consumer=True,
                config=config,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
                inactive_threshold=self._inactive_threshold,
            )
            if delivery is not None:
                # nats-py's ordered consumer checks each message's sequence before it
                # queues it: that check and its resets stay as they are.
                delivery.attach(self._sub)

    async def stop(self) -> None:
        """End the watch and delete its consumer now (not at its inactive threshold).

        Runs to the end in a cancelled scope too: a watch ended by cancellation would
        otherwise leave its consumer behind (a stream takes at most 1,000).
        """
        sub, self._sub = self._sub, None
        if sub is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_TIMEOUT):
            with contextlib.suppress(*NatsError):  # the connection is gone: so is the sub
                await sub.unsubscribe()
            # the current consumer: an ordered consumer is re-created after a gap
            consumer: str | None = getattr(sub, "_consumer", None)
            if consumer and self.js._nc.is_connected:  # no wait on an outage: it expires
                with contextlib.suppress(*NatsError):  # gone already, or no connection
                    await self.js.delete_consumer(kv_stream(self.bucket), consumer)

    async def _on_msg(self, msg: Msg) -> None:
        self._take(msg)

    def _take(self, msg: Msg) -> Later | None:
        # positional: this runs for every stored message the watch sees
        self._on_change(
            KvChange(
                msg.subject[self._prefix :],
                msg.metadata.sequence.stream,
                operation(msg.headers) if msg.headers else "put",
                msg.data,
                None,
                msg.headers.get(TTL) if msg.headers else None,
            )
        )
        return None


async def watch_until(
    store: NatsStore, key: str, decide: Callable[[Entry | None], _T | None]
) -> _T:
    """Watch ``key`` until ``decide`` returns something other than None; return that.

    ``decide`` sees the key's current entry first (None if it has none), then every
    later write and delete (a delete as an Entry whose value is None). Bound the wait
    with a cancel scope (``anyio.fail_after``).
    """
    seen = False
    async with store.watch(key) as entries:
        async for entry in entries:
            if entry is None:  # the end of the current entries
                if seen:
                    continue
            else:
                seen = True
            if (found := decide(entry)) is not None:
                return found
    raise anyio.EndOfStream  # the watch ended without a decision
