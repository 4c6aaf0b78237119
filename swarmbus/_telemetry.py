"""OpenTelemetry glue: W3C trace context in NATS headers, messaging-convention spans.

Tracing is off unless an OpenTelemetry SDK tracer provider is installed (by the
application or by ``configure_tracing`` from the standard ``OTEL_*`` variables); when
off, every helper here returns before building attributes or spans, and no
``traceparent`` header is sent.

Trace shape: ``session_span`` (or ``Blackboard.start``) is the root of a session's
trace; every write (event publish, request, task dispatch, and a KV write made inside
a trace) is a PRODUCER span that carries its context in the message headers; a
handler runs in a CONSUMER
span whose parent is that context, so what it publishes joins the same trace. A step
that consumes many messages at once (a decision over many votes) links to them
instead of having them as parents.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from swarmbus._errors import MissingDependencyError, SwarmbusError
from swarmbus._jetstream.headers import MSG_ID as MSG_ID_HEADER

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

TRACER_NAME: Final = "swarmbus"
MESSAGING_SYSTEM: Final = "nats"
_NO_SPAN: Final = contextlib.nullcontext()


def tracing_enabled() -> bool:
    """True when a real (SDK) tracer provider is installed.

    Reads the API's global directly: while no provider is set,
    ``trace.get_tracer_provider()`` looks up ``os.environ`` on every call, which costs
    microseconds on each publish and dispatch (``configure_tracing`` calls it once, so
    a provider named by ``OTEL_PYTHON_TRACER_PROVIDER`` is still honoured).
    """
    provider = trace._TRACER_PROVIDER
    return provider is not None and not isinstance(provider, trace.NoOpTracerProvider)


_tracer_of: list[tuple[trace.TracerProvider, trace.Tracer]] = []


def _tracer() -> trace.Tracer:
    """swarmbus's tracer from the current provider (the SDK builds a new one per call)."""
    provider = trace.get_tracer_provider()
    if not _tracer_of or _tracer_of[0][0] is not provider:  # tests swap providers
        _tracer_of[:] = [(provider, provider.get_tracer(TRACER_NAME))]
    return _tracer_of[0][1]


# --- configuration ---------------------------------------------------------------


def configure_tracing(service_name: str = "swarmbus") -> bool:
    """Install an SDK tracer provider if the standard ``OTEL_*`` variables ask for one.

    Tracing is on when ``OTEL_TRACES_EXPORTER`` names exporters (``otlp``, ``console``;
    ``none`` turns it off) or, without it, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; ``OTEL_SDK_DISABLED=true`` wins over
    both. The OTLP exporter reads its own variables (endpoint, headers, protocol
    ``grpc`` or ``http/protobuf``); ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` name the service (``service_name`` is the fallback).
    A provider the application (or ``opentelemetry-instrument``) installed is kept.

    Returns:
        Whether tracing is on afterwards.

    Raises:
        MissingDependencyError: (an ImportError) OTLP export was asked for without
            ``swarmbus[otlp]`` installed.
        SwarmbusError: an unknown exporter name.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    trace.get_tracer_provider()  # loads a provider named by OTEL_PYTHON_TRACER_PROVIDER
    if tracing_enabled():
        return True
    names = os.environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = "otlp" if endpoint else "none"
    exporters = [_exporter(n.strip()) for n in names.split(",") if n.strip() not in ("", "none")]
    if not exporters:
        return False

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; explicit
    # attributes would override them, so pass the fallback name only when unset.
    named = "OTEL_SERVICE_NAME" in os.environ or SERVICE_NAME in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    provider = TracerProvider(
        resource=Resource.create({} if named else {SERVICE_NAME: service_name})
    )
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise SwarmbusError(f"OTEL_TRACES_EXPORTER={name}: swarmbus supports otlp, console, none")
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    transport = "grpc" if protocol == "grpc" else "http"
    try:
        module = importlib.import_module(
            f"opentelemetry.exporter.otlp.proto.{transport}.trace_exporter"
        )
    except ImportError as exc:
        raise MissingDependencyError("OTLP trace export", "otlp") from exc
    exporter: SpanExporter = module.OTLPSpanExporter()
    return exporter


# --- sessions ----------------------------------------------------------------------


@contextmanager
def session_span(session: str, *, agent: str | None = None) -> Iterator[Span | None]:
    """The root span of ``session``'s trace; work done inside it joins that trace.

    Starts a new trace unless a span is already current (then the session joins the
    caller's trace). ``current_trace_id()`` inside the block is the session's trace id.
    Yields None when tracing is off.
    """
    if not tracing_enabled():
        yield None
        return
    attributes = {"swarmbus.session": session}
    if agent:
        attributes["swarmbus.agent"] = agent
    with _tracer().start_as_current_span(f"session {session}", attributes=attributes) as span:
        yield span


def current_trace_id() -> str | None:
    """The active trace id as 32 hex digits, if a span is recording."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


# --- producers ---------------------------------------------------------------------


def _messaging(
    subject: str, message_id: str, operation: str, name: str, attributes: Mapping[str, str]
) -> dict[str, str]:
    attrs = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
        "messaging.operation.name": name,
        **attributes,
    }
    if message_id:
        attrs["messaging.message.id"] = message_id
    return attrs


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
        attributes=_messaging(subject, message_id, "send", "publish", attributes),
    ) as span:
        propagate.inject(headers)
        yield span


def send_span(
    subject: str, headers: dict[str, str], attributes: Mapping[str, str]
) -> contextlib.AbstractContextManager[Span | None]:
    """``producer_span`` around a direct KV write (like ``kv_write``, joins a trace only)."""
    if not (tracing_enabled() and trace.get_current_span().get_span_context().is_valid):
        return _NO_SPAN
    return producer_span(subject, headers.get(MSG_ID_HEADER, ""), attributes, headers)


def traced(
    headers: dict[str, str],
    subject: str,
    attributes: Mapping[str, str],
    *,
    new_trace: bool = True,
) -> dict[str, str]:
    """``headers`` plus the W3C context of a new PRODUCER ("create") span for one message.

    For pipelined publishes, whose send has no single await to wrap: the span marks
    where the message was created and is its parent context. With ``new_trace=False``
    (a KV record nobody continues from) it only joins a current trace. Returns
    ``headers`` unchanged (and starts nothing) when tracing is off.
    """
    if not tracing_enabled():
        return headers
    if not (new_trace or trace.get_current_span().get_span_context().is_valid):
        return headers
    with _tracer().start_as_current_span(
        f"{subject} create",
        kind=SpanKind.PRODUCER,
        attributes=_messaging(
            subject, headers.get(MSG_ID_HEADER, ""), "create", "create", attributes
        ),
    ):
        propagate.inject(headers)
    return headers


# --- consumers ---------------------------------------------------------------------


@contextmanager
def consumer_span(
    subject: str,
    message_id: str,
    attributes: Mapping[str, str],
    headers: Mapping[str, str] | None,
    *,
    links: Iterable[Mapping[str, str] | None] = (),
) -> Iterator[Span | None]:
    """A CONSUMER span, child of the publisher's context carried in ``headers``.

    ``links``: headers of further messages this step consumes (fan-in), linked
    rather than parented.
    """
    if not tracing_enabled():
        yield None
        return
    parent = propagate.extract(dict(headers or {}))
    token = otel_context.attach(parent)
    try:
        with _tracer().start_as_current_span(
            f"{subject} process",
            kind=SpanKind.CONSUMER,
            attributes=_messaging(subject, message_id, "process", "process", attributes),
            links=span_links(links),
        ) as span:
            yield span
    finally:
        otel_context.detach(token)


def record_failure(span: Span | None, exc: BaseException) -> None:
    """Mark ``span`` failed by ``exc`` that its block handles (reports) instead of raising."""
    if span is not None:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def process_span(
    subject: str,
    message_id: str,
    attributes: Mapping[str, str],
    headers: Mapping[str, str] | None,
    *,
    links: Iterable[Mapping[str, str] | None] = (),
) -> contextlib.AbstractContextManager[Span | None]:
    """``consumer_span``, or a shared no-op context manager when tracing is off."""
    if not tracing_enabled():
        return _NO_SPAN
    return consumer_span(subject, message_id, attributes, headers, links=links)


def span_links(headers: Iterable[Mapping[str, str] | None]) -> list[Link]:
    """Links to the span contexts carried in each message's ``headers`` (fan-in)."""
    links = []
    for carrier in headers:
        ctx = trace.get_current_span(propagate.extract(dict(carrier or {}))).get_span_context()
        if ctx.is_valid:
            links.append(Link(ctx))
    return links


@contextmanager
def _attached(headers: Mapping[str, str]) -> Iterator[None]:
    token = otel_context.attach(propagate.extract(dict(headers)))
    try:
        yield
    finally:
        otel_context.detach(token)


def continued(headers: Mapping[str, str] | None) -> contextlib.AbstractContextManager[None]:
    """Make the context carried in ``headers`` current, without a span, if none is.

    For a step that acts on a message or record outside any span (a claim's event, a
    vote), so what it publishes joins that trace instead of starting one of its own.
    """
    if not tracing_enabled() or trace.get_current_span().get_span_context().is_valid:
        return _NO_SPAN
    return _attached(headers or {})


def trace_headers() -> dict[str, str]:
    """The current span's W3C context as headers (empty when tracing is off)."""
    if not tracing_enabled():
        return {}
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers
