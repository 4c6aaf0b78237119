"""Provisioning: create a stream or a KV bucket, or use it as it exists.

Several processes may race to create the same stream or bucket, and an agent under the
deploy auth config may not create any (the service account provisioned them): both
must end with the stream or bucket open, or with a swarmbus error saying why not.

KV buckets refuse rollup headers. NATS permissions cannot filter headers, so with
rollups allowed any user who may write one key of a bucket could publish
``Nats-Rollup: all`` there and empty the whole bucket (every agent may write its own
keys of the task, lock, board and consensus buckets). swarmbus needs no rollup: its
buckets keep one revision per key (a delete or purge marker replaces the value) or
are purged by subject by the service account (blackboard retention). So nats-py's
``kv.purge`` (a rollup) fails on them: delete instead.

Except on a bucket with limit markers (``limit_marker_ttl``): nats-server 2.15 turns
rollups on for any stream with subject delete markers and refuses ``deny_purge`` with
rollups ("roll-ups require the purge permission"). No swarmbus bucket has them: the lock
bucket had them (waiters saw a lock's TTL expiry by its marker) until waiters timed
expiries themselves; a bucket opened without ``limit_marker_ttl`` that has them (made by
an older swarmbus) is updated in place to have neither markers nor rollups.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Final

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StreamConfig, StreamInfo
from nats.js.kv import KeyValue

from swarmbus._errors import PermissionDeniedError, SwarmbusError
from swarmbus._jetstream.errors import translate
from swarmbus._jetstream.headers import JS_API, ErrorCode
from swarmbus._jetstream.retry import Guard

__all__ = ["bucket_stream_config", "ensure_stream", "open_key_value"]

log = logging.getLogger("swarmbus.streams")

KV_STREAM: Final = "KV_{bucket}"
KV_PREFIX: Final = "$KV.{bucket}."


async def ensure_stream(js: JetStreamContext, config: StreamConfig, guard: Guard) -> None:
    """Create a stream, or update it to ``config`` if it exists (idempotent).

    A user without stream-create permission (an agent under the deploy auth config)
    uses the stream as provisioned by the service account, if it exists.
    """
    try:
        with guard(f"{JS_API}.STREAM.CREATE.{config.name}", f"create stream {config.name}"):
            await js.add_stream(config)
    except PermissionDeniedError as denied:
        try:
            await js.stream_info(str(config.name))
        except nats.js.errors.NotFoundError:
            raise denied from None
        except nats.js.errors.APIError as exc:
            raise translate(exc, f"cannot read stream {config.name}") from exc
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != ErrorCode.STREAM_IN_USE:
            raise SwarmbusError(f"cannot create stream {config.name}: {exc}") from exc
        try:
            await js.update_stream(config)
        except nats.js.errors.APIError as upd:
            raise SwarmbusError(
                f"stream {config.name} exists with an incompatible config: {upd.description}"
            ) from upd
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot create stream {config.name}") from exc


async def open_key_value(js: JetStreamContext, config: KeyValueConfig, guard: Guard) -> KeyValue:
    """Open the bucket ``config.bucket``, creating it with ``config`` if missing.

    The bucket refuses rollup headers (see the module docstring); one that allows them
    (made by an older swarmbus or by nats-py) is updated in place, if this user may.
    """
    bucket = config.bucket
    stream = KV_STREAM.format(bucket=bucket)
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        info = await _create_bucket(js, config, guard)
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot open bucket {bucket}") from exc
    markers = bool(info.config.subject_delete_marker_ttl)
    if markers and not config.limit_marker_ttl:
        info = await _forbid_rollups(js, info, guard)  # and the markers that force them
    elif info.config.allow_rollup_hdrs and not markers:
        info = await _forbid_rollups(js, info, guard)
    return KeyValue(
        name=bucket,
        stream=stream,
        pre=KV_PREFIX.format(bucket=bucket),
        js=js,
        direct=bool(info.config.allow_direct),
    )


def bucket_stream_config(config: KeyValueConfig) -> StreamConfig:
    """The stream of a KV bucket as nats-py's ``create_key_value`` makes it, but
    refusing rollup headers unless it has limit markers (see the module docstring)."""
    duplicate_window = 120.0
    if config.ttl and config.ttl < duplicate_window:
        duplicate_window = config.ttl
    return StreamConfig(
        name=KV_STREAM.format(bucket=config.bucket),
        description=config.description,
        subjects=[f"{KV_PREFIX.format(bucket=config.bucket)}>"],
        allow_direct=config.direct,
        allow_rollup_hdrs=bool(config.limit_marker_ttl),
        allow_msg_ttl=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=duplicate_window,
        max_age=config.ttl,
        max_bytes=config.max_bytes,
        max_consumers=-1,
        max_msg_size=config.max_value_size,
        max_msgs=-1,
        max_msgs_per_subject=config.history,
        num_replicas=config.replicas,
        storage=config.storage,
        republish=config.republish,
        subject_delete_marker_ttl=config.limit_marker_ttl or None,
    )


async def _create_bucket(js: JetStreamContext, config: KeyValueConfig, guard: Guard) -> StreamInfo:
    bucket = config.bucket
    stream = bucket_stream_config(config)
    try:
        with guard(f"{JS_API}.STREAM.CREATE.{stream.name}", f"create bucket {bucket}"):
            return await js.add_stream(stream)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != ErrorCode.STREAM_IN_USE:
            raise translate(exc, f"cannot create bucket {bucket}") from exc
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot create bucket {bucket}") from exc
    try:  # another process created it meanwhile
        return await js.stream_info(str(stream.name))
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot open bucket {bucket}") from exc


async def _forbid_rollups(js: JetStreamContext, info: StreamInfo, guard: Guard) -> StreamInfo:
    """Update a bucket made with rollups allowed (and limit markers, which need them);
    as it is if this user may not."""
    config = replace(info.config, allow_rollup_hdrs=False, subject_delete_marker_ttl=None)
    try:
        with guard(f"{JS_API}.STREAM.UPDATE.{config.name}", f"update bucket {config.name}"):
            return await js.update_stream(config)
    except PermissionDeniedError:
        log.warning(
            "%s allows rollup headers (any key writer can empty it): run the service "
            "account's `swarmbus consensus` or `swarmbus up` once to update it",
            config.name,
        )
    except nats.js.errors.APIError as exc:
        log.warning("cannot forbid rollup headers on %s: %s", config.name, exc.description)
    return info
