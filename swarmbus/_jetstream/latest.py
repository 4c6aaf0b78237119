"""The latest entries of KV keys, markers included where the caller decides on them.

``NatsStore.get`` and ``list`` hide deletes and expiry markers; a lock needs the
revision of the marker that freed its key (a compare-and-set on it re-creates the
lock) and the server time of the holder's write (its expiry), and a blackboard
snapshot needs the revision of the last entry it read, marker or not (a watcher
resumes after it).
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext

from swarmbus._jetstream.errors import nats_errors
from swarmbus._jetstream.headers import TTL
from swarmbus._jetstream.reads import kv_latest, last_per_subject
from swarmbus._jetstream.store import NatsStore
from swarmbus._jetstream.watch import KvChange, kv_stream, operation

__all__ = ["bucket_entries", "kv_last", "scan"]


async def kv_last(
    js: JetStreamContext, bucket: str, key: str, what: str | None = None
) -> KvChange | None:
    """The last entry of ``key`` (a marker too), read from the stream leader; None if none.

    Raises the swarmbus error of a failed read (``what`` names it).
    """
    with nats_errors(what or f"cannot read {key} in {bucket}"):
        try:
            msg = await js.get_msg(kv_stream(bucket), subject=f"$KV.{bucket}.{key}", direct=False)
        except nats.js.errors.NotFoundError:
            return None
    return KvChange(
        key=key,
        revision=msg.seq or 0,
        operation=operation(msg.headers),
        value=msg.data or b"",
        time=msg.time,
        ttl=msg.headers.get(TTL) if msg.headers else None,
    )


async def bucket_entries(js: JetStreamContext, bucket: str) -> list[KvChange]:
    """Every live key of ``bucket`` with its write's server time; [] if no such bucket."""
    with nats_errors(f"cannot list {bucket}"):
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            return []
        return [
            KvChange(
                key=key,
                revision=msg.metadata.sequence.stream,
                operation="put",
                value=msg.data,
                time=msg.metadata.timestamp,
                ttl=msg.headers.get(TTL) if msg.headers else None,
            )
            for key, msg in await kv_latest(kv)
        ]


async def scan(store: NatsStore, keys: str) -> tuple[list[tuple[str, bytes]], int]:
    """``(key, value)`` of every live key matching ``keys``, in write order, and the
    revision of the last entry read (a delete or marker included; 0 if none).

    One counted read of the last entry per key (``last_per_subject``): a snapshot of
    tens of thousands of keys, so no per-key object beyond the pair.
    """
    kv = store.kv
    prefix: str = kv._pre
    start = len(prefix)
    msgs = await last_per_subject(kv._js, kv._stream, prefix + keys)
    live = [
        (msg.subject[start:], msg.data)
        for msg in msgs
        if not msg.headers or operation(msg.headers) == "put"
    ]
    return live, msgs[-1].metadata.sequence.stream if msgs else 0
