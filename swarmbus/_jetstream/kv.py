"""KV writes: put, create-once and compare-and-set, with an optional per-key TTL.

The tracing hooks (``swarmbus._telemetry``) only add a PRODUCER span and the trace
context headers; the write itself is this module's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from opentelemetry import trace

from swarmbus._jetstream.headers import EXPECTED_LAST_SUBJECT_SEQUENCE, TTL, WRONG_LAST_SEQUENCE
from swarmbus._telemetry import producer_span, tracing_enabled

__all__ = ["kv_context", "kv_write"]


async def kv_write(
    kv: KeyValue,
    key: str,
    value: bytes,
    *,
    last: int | None = None,
    attributes: Mapping[str, str],
    ttl: int | None = None,
) -> int:
    """Write a KV entry inside a PRODUCER span with the trace context in its headers.

    ``last=None`` is ``kv.put``, ``last=0`` ``kv.create``, otherwise
    ``kv.update(last=last)``; returns the new revision and raises what nats-py raises
    (``KeyWrongLastSequenceError`` when the compare-and-set lost). A write joins the
    current trace but never starts one (nobody continues a trace from a KV entry, so
    it would be a trace of one span); with tracing off or outside a trace it is exactly
    the nats-py call. ``ttl`` (whole seconds) makes the server delete the entry then
    (nats-py's ``update`` cannot carry one, so such a write is a publish).
    """
    traced = tracing_enabled() and trace.get_current_span().get_span_context().is_valid
    if not traced and ttl is None:
        if last is None:
            return await kv.put(key, value)
        if last == 0:
            return await kv.create(key, value)
        return await kv.update(key, value, last=last)
    subject = f"{kv._pre}{key}"
    headers: dict[str, str] = {}
    span = producer_span(subject, "", attributes, headers) if traced else contextlib.nullcontext()
    with span:
        if last is not None:
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last)
        if ttl is not None:
            headers[TTL] = str(ttl)
        try:
            ack = await kv._js.publish(subject, value, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE:
                raise
            if last == 0:  # perhaps a deleted key: nats-py's create re-creates those
                return await (kv.create(key, value, msg_ttl=ttl) if ttl else kv.create(key, value))
            raise nats.js.errors.KeyWrongLastSequenceError(description=exc.description) from exc
        return int(ack.seq)


async def kv_context(kv: KeyValue, key: str) -> dict[str, str]:
    """The trace context stored with ``key``'s entry, for a step outside any span.

    Empty, and nothing read, when tracing is off or a span is current (``continued``
    keeps that one); empty too if the entry cannot be read.
    """
    if not tracing_enabled() or trace.get_current_span().get_span_context().is_valid:
        return {}
    try:
        msg = await kv._js.get_last_msg(kv._stream, f"{kv._pre}{key}")
    except (TimeoutError, nats.errors.Error):
        return {}
    return dict(msg.headers or {})
