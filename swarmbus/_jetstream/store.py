"""``StateStore`` on a NATS JetStream KV bucket (the default coordination store).

Every nats-py KV quirk the components used to work around one by one is handled here
once: a create on a key whose last entry is a TTL or limit marker (nats-py 2.16
refuses it: "wrong last sequence"; a compare-and-set on the marker re-creates it),
TTLs on compare-and-set writes (``kv.update`` cannot carry one), both "wrong last
sequence" error codes, and watch consumers that
outlive their watch (nats-py's default inactive threshold is five minutes; a watch
here deletes its consumer when it ends, and the threshold is a few seconds in case
the process dies first).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from swarmbus._errors import ConflictError, MessageTooLargeError
from swarmbus._jetstream.errors import NatsError, is_wrong_last_sequence, nats_errors
from swarmbus._jetstream.headers import KV_OPERATION, KV_REMOVED, MARKER_REASON
from swarmbus._jetstream.kv import kv_write
from swarmbus._jetstream.reads import kv_latest
from swarmbus._state import Entry

__all__ = ["WATCH_INACTIVE_THRESHOLD", "NatsStore"]

WATCH_INACTIVE_THRESHOLD = 5.0
"""Seconds a watch's consumer outlives a process that died without ending the watch."""


class NatsStore:
    """A ``StateStore`` backed by one JetStream KV bucket.

    ``attributes``: OpenTelemetry attributes for the PRODUCER spans of writes (a write
    joins the current trace, never starts one).
    """

    def __init__(self, kv: KeyValue, *, attributes: Mapping[str, str] | None = None) -> None:
        self.kv = kv
        self.name: str = kv._name
        self.max_value_bytes: int = kv._js._nc.max_payload
        self._attributes: Mapping[str, str] = attributes or {"swarmbus.bucket": self.name}

    async def get(self, key: str, *, fresh: bool = False) -> Entry | None:
        kv = self.kv
        try:
            msg = await kv._js.get_msg(
                kv._stream, subject=kv._pre + key, direct=kv._direct and not fresh
            )
        except nats.js.errors.NotFoundError:
            return None
        except NatsError as exc:
            with nats_errors(f"get {key} from {self.name}"):
                raise
            raise AssertionError("unreachable") from exc
        headers = msg.headers or {}
        if headers.get(KV_OPERATION) in KV_REMOVED or MARKER_REASON in headers:
            return None  # deleted, purged, or expired by its TTL
        return Entry(key=key, value=msg.data or b"", revision=int(msg.seq or 0))

    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        self._check_size(value)
        last = 0
        while True:
            try:
                return await kv_write(
                    self.kv, key, value, last=last, ttl=ttl, attributes=self._attributes
                )
            except NatsError as exc:
                if not is_wrong_last_sequence(exc):
                    with nats_errors(f"create {key} in {self.name}"):
                        raise
                    raise AssertionError("unreachable") from exc
                # nats-py re-creates over a delete or purge, not over the marker a TTL
                # expiry leaves: a compare-and-set on that marker re-creates the key
                marker = await self._marker(key)
                if marker is None or marker == last:
                    raise ConflictError(key, 0, "already exists") from exc
                last = marker

    async def _marker(self, key: str) -> int | None:
        """The revision of ``key``'s last entry if it is a removal marker, else None."""
        kv = self.kv
        with nats_errors(f"create {key} in {self.name}"):
            try:
                msg = await kv._js.get_msg(kv._stream, subject=kv._pre + key, direct=False)
            except nats.js.errors.NotFoundError:
                return None
        headers = msg.headers or {}
        if headers.get(KV_OPERATION) in KV_REMOVED or MARKER_REASON in headers:
            return int(msg.seq or 0) or None
        return None

    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        self._check_size(value)
        try:
            return await kv_write(
                self.kv, key, value, last=revision, ttl=ttl, attributes=self._attributes
            )
        except NatsError as exc:
            if is_wrong_last_sequence(exc):
                raise ConflictError(key, revision, "changed since it was read") from exc
            with nats_errors(f"update {key} in {self.name}"):
                raise
            raise AssertionError("unreachable") from exc

    async def put(self, key: str, value: bytes) -> int:
        self._check_size(value)
        with nats_errors(f"put {key} in {self.name}"):
            return await kv_write(self.kv, key, value, attributes=self._attributes)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        try:
            await self.kv.delete(key, last=revision)
        except NatsError as exc:
            if revision is not None and is_wrong_last_sequence(exc):
                raise ConflictError(key, revision, "changed since it was read") from exc
            with nats_errors(f"delete {key} from {self.name}"):
                raise
            raise AssertionError("unreachable") from exc

    async def list(self, prefix: str = "") -> list[Entry]:
        return [
            Entry(key=key, value=msg.data, revision=int(msg.metadata.sequence.stream))
            for key, msg in await kv_latest(self.kv, _pattern(prefix))
        ]

    def _check_size(self, value: bytes) -> None:
        # nats-py would raise MaxPayloadError; headers (trace context, TTL) need room too
        if len(value) > self.max_value_bytes:
            raise MessageTooLargeError(len(value), self.max_value_bytes)

    @contextlib.asynccontextmanager
    async def watch(
        self, prefix: str = "", *, initial: bool = True
    ) -> AsyncIterator[AsyncIterator[Entry | None]]:
        with nats_errors(f"watch {self.name}"):
            watcher = await self.kv.watch(
                _pattern(prefix), inactive_threshold=WATCH_INACTIVE_THRESHOLD
            )
        try:
            yield _entries(watcher, initial=initial)
        finally:
            await _stop(self.kv, watcher)


def _pattern(prefix: str) -> str:
    """The NATS subject pattern (after the bucket's prefix) of a key prefix or key."""
    return prefix + ">" if not prefix or prefix.endswith(".") else prefix


async def _entries(watcher: KeyValue.KeyWatcher, *, initial: bool) -> AsyncIterator[Entry | None]:
    seen_marker = False
    async for item in watcher:
        if item is None:
            seen_marker = True
            if initial:
                yield None
            continue
        if not initial and not seen_marker:
            continue
        # nats-py reports a TTL or limit marker as a PURGE operation
        removed = item.operation in KV_REMOVED
        yield Entry(
            key=item.key,
            value=None if removed else (item.value or b""),
            revision=int(item.revision or 0),
        )


async def _stop(kv: KeyValue, watcher: KeyValue.KeyWatcher) -> None:
    """End the watch and delete its consumer now (not at its inactive threshold)."""
    sub = watcher._sub
    with contextlib.suppress(*NatsError):
        await watcher.stop()  # type: ignore[no-untyped-call]
    if sub is None:
        return
    with contextlib.suppress(*NatsError, AttributeError):
        await kv._js.delete_consumer(sub._stream, sub._consumer)
