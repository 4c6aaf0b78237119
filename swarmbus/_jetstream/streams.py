"""Provisioning: create a stream or a KV bucket, or use it as it exists.

Several processes may race to create the same stream or bucket, and an agent under the
deploy auth config may not create any (the service account provisioned them): both
must end with the stream or bucket open, or with a swarmbus error saying why not.
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.kv import KeyValue

from swarmbus._errors import PermissionDeniedError, SwarmbusError
from swarmbus._jetstream.errors import translate
from swarmbus._jetstream.headers import JS_API, ErrorCode
from swarmbus._jetstream.retry import Guard

__all__ = ["ensure_stream", "open_key_value"]


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
    """Open the bucket ``config.bucket``, creating it with ``config`` if missing."""
    bucket = config.bucket
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot open bucket {bucket}") from exc
    try:
        with guard(f"{JS_API}.STREAM.CREATE.KV_{bucket}", f"create bucket {bucket}"):
            return await js.create_key_value(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != ErrorCode.STREAM_IN_USE:
            raise translate(exc, f"cannot create bucket {bucket}") from exc
        return await js.key_value(bucket)
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot create bucket {bucket}") from exc
