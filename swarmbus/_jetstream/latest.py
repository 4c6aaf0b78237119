"""The latest entries of KV keys, markers included where the caller decides on them.

``NatsStore.get`` and ``list`` hide deletes and expiry markers; a lock needs the
revision of the marker that freed its key (a compare-and-set on it re-creates the
lock) and the server time of the holder's write (its expiry), and a blackboard
snapshot needs the revision of the last entry it read, marker or not (a watcher
resumes after it).
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Final

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from swarmbus._jetstream.errors import nats_errors
from swarmbus._jetstream.headers import TTL
from swarmbus._jetstream.reads import kv_latest, last_per_subject
from swarmbus._jetstream.store import NatsStore
from swarmbus._jetstream.watch import KvChange, kv_stream, operation

__all__ = ["bucket_entries", "entry_keys", "kv_last", "scan"]


class _Stored(msgspec.Struct):
    seq: int = 0
    time: str | None = None  # RFC 3339 in ns: fromisoformat truncates to us, as nats-py
    hdrs: str | None = None
    data: str | None = None


class _Refusal(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Got(msgspec.Struct):
    message: _Stored | None = None
    error: _Refusal | None = None


_got_decoder: Final = msgspec.json.Decoder(_Got)
_HEADER_LINE: Final = len(b"NATS/1.0\r\n")


async def kv_last(
    js: JetStreamContext, bucket: str, key: str, what: str | None = None
) -> KvChange | None:
    """The last entry of ``key`` (a marker too), read from the stream leader; None if none.

    Raises the swarmbus error of a failed read (``what`` names it). The request is
    nats-py's ``get_msg(direct=False)`` (``STREAM.MSG.GET``, answered by the leader),
    with the answer decoded by msgspec and the headers split by hand: nats-py's
    decoding (``json``, dataclasses, the ``email`` header parser) cost ~60 of its ~150 us
    of client CPU per read, and a lock hand-off reads the key about twice.
    """
    request = msgspec.json.encode({"last_by_subj": f"$KV.{bucket}.{key}"})
    with nats_errors(what or f"cannot read {key} in {bucket}"):
        reply = await js._nc.request(
            f"{js._prefix}.STREAM.MSG.GET.{kv_stream(bucket)}", request, timeout=js._timeout
        )
        try:
            got = _got_decoder.decode(reply.data)
        except msgspec.DecodeError as exc:
            raise nats.js.errors.APIError(description=f"bad answer: {exc}") from exc
        if got.error is not None:
            try:
                nats.js.errors.APIError.from_error(msgspec.structs.asdict(got.error))
            except nats.js.errors.NotFoundError:
                return None
    msg = got.message
    if msg is None:
        return None
    headers = _headers(msg.hdrs) if msg.hdrs else None
    return KvChange(
        key=key,
        revision=msg.seq,
        operation=operation(headers),
        value=base64.b64decode(msg.data) if msg.data else b"",
        time=datetime.fromisoformat(msg.time) if msg.time else None,
        ttl=headers.get(TTL) if headers else None,
    )


def _headers(encoded: str) -> dict[str, str] | None:
    """The headers of a stored message (base64 of ``NATS/1.0`` + lines); None if none."""
    headers: dict[str, str] = {}
    for line in base64.b64decode(encoded)[_HEADER_LINE:].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon:
            headers[name.decode()] = value.strip().decode()
    return headers or None


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


async def entry_keys(store: NatsStore, keys: str) -> set[str]:
    """Every key matching ``keys`` that has a last entry: a value (readable or not), a
    delete or a purge marker. One read of the last entry per key (``last_per_subject``)."""
    kv = store.kv
    prefix: str = kv._pre
    msgs = await last_per_subject(kv._js, kv._stream, prefix + keys)
    return {msg.subject[len(prefix) :] for msg in msgs}
