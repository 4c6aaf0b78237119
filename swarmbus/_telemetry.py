"""OpenTelemetry glue: W3C trace context in NATS headers, messaging-convention spans.

Tracing is off unless an OpenTelemetry SDK tracer provider is installed (by the
application or by ``configure_tracing`` from the standard ``OTEL_*`` variables); when
off, publish and dispatch skip all tracing work.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

TRACER_NAME: Final = "swarmbus"
MESSAGING_SYSTEM: Final = "nats"


def tracing_enabled() -> bool:
    """True when a real (SDK) tracer provider is installed."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def _tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


@contextmanager
def producer_span(
    subject: str, message_id: str, attributes: Mapping[str, str], headers: dict[str, str]
) -> Iterator[Span | None]:
    """A PRODUCER span around a publish; injects its context into ``headers``."""
    if not tracing_enabled():
        yield None
        return
    with _tracer().start_as_current_span(
        f"{subject} publish",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.destination.name": subject,
            "messaging.message.id": message_id,
            "messaging.operation.type": "publish",
            **attributes,
        },
    ) as span:
        propagate.inject(headers)
        yield span


@contextmanager
def consumer_span(
    subject: str,
    message_id: str,
    attributes: Mapping[str, str],
    headers: Mapping[str, str] | None,
) -> Iterator[Span | None]:
    """A CONSUMER span, child of the publisher's context carried in ``headers``."""
    if not tracing_enabled():
        yield None
        return
    parent = propagate.extract(dict(headers or {}))
    token = otel_context.attach(parent)
    try:
        with _tracer().start_as_current_span(
            f"{subject} process",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.destination.name": subject,
                "messaging.message.id": message_id,
                "messaging.operation.type": "process",
                **attributes,
            },
        ) as span:
            yield span
    finally:
        otel_context.detach(token)


def current_trace_id() -> str | None:
    """The active trace id as 32 hex digits, if a span is recording."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
