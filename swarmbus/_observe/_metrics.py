"""Metrics through the OpenTelemetry SDK: an outside observer plus in-process ``record_*``.

Like Celery Flower, most numbers come from outside the agents: ``Observer`` consumes
the event and dead-letter streams (events by type, tasks created / completed / failed,
claim latency and task duration, decisions by outcome, dead letters by code) and
polls stream, consumer and bucket state (task queue depth and oldest age, open
proposals, consumer lag; with ``SWARM_BACKEND=redis|postgres`` the task and proposal
gauges read that store instead: ``StoreGauges``). What only a process knows (its
handlers' latency, its lock waits, the events it published) is recorded in-process by
``_instruments``.

``configure_metrics`` installs a meter provider from the standard variables:
``OTEL_METRICS_EXPORTER`` = ``prometheus`` (an HTTP endpoint on
``OTEL_EXPORTER_PROMETHEUS_HOST``:``OTEL_EXPORTER_PROMETHEUS_PORT``, default
localhost:9464), ``otlp`` (``OTEL_EXPORTER_OTLP_*``, every
``OTEL_METRIC_EXPORT_INTERVAL`` ms), ``console``, or ``none``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from swarmbus._backends import open_store
from swarmbus._bus import DEAD_LETTER_STREAM, EVENTS_STREAM, Bus
from swarmbus._consensus import CONSENSUS_BUCKET, PROPOSAL_PREFIX, ProposalRecord
from swarmbus._errors import MissingDependencyError, SwarmbusError
from swarmbus._jetstream.follow import (
    consumer_lags,
    key_value_or_none,
    stored_message,
    stream_state,
)
from swarmbus._jetstream.headers import CODE as CODE_HEADER
from swarmbus._jetstream.reads import kv_latest
from swarmbus._observe import _instruments as instruments
from swarmbus._observe._events import Follower, Step
from swarmbus._observe._instruments import METER_NAME
from swarmbus._observe._timeline import forget_oldest
from swarmbus._state import StateStore
from swarmbus._subjects import DEAD_LETTER_WILDCARD, EVENTS_WILDCARD
from swarmbus._tasks import TASKS_STREAM
from swarmbus._tasks.model import TASKS_BUCKET
from swarmbus._tasks.store_queue import OPEN_BUCKET
from swarmbus._tasks.store_reads import backlog, lists_open

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader

log = logging.getLogger("swarmbus.metrics")

DEFAULT_PROMETHEUS_HOST: Final = "localhost"
DEFAULT_PROMETHEUS_PORT: Final = 9464


# --- configuration -----------------------------------------------------------------------


@dataclass
class MetricsSetup:
    """What ``configure_metrics`` installed; ``close`` flushes and stops it."""

    provider: MeterProvider
    prometheus_url: str | None = None
    _server: Any = None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.provider.shutdown()
        instruments.state["on"] = False


def configure_metrics(
    service_name: str = "swarmbus",
    *,
    default_exporter: str = "none",
    prometheus_port: int | None = None,
) -> MetricsSetup | None:
    """Install an SDK meter provider as the ``OTEL_*`` variables say; None if metrics are off.

    ``default_exporter`` applies when ``OTEL_METRICS_EXPORTER`` is unset (``swarmbus
    metrics`` defaults to ``prometheus``); ``prometheus_port`` overrides
    ``OTEL_EXPORTER_PROMETHEUS_PORT`` (0: any free port, see ``prometheus_url``).

    Raises:
        MissingDependencyError: an exporter whose extra is not installed.
        SwarmbusError: an unknown exporter name.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = os.environ.get("OTEL_METRICS_EXPORTER", default_exporter)
    wanted = [n.strip() for n in names.split(",") if n.strip() not in ("", "none")]
    if not wanted:
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    readers: list[MetricReader] = []
    server = url = None
    for name in wanted:
        if name == "prometheus":
            reader, server, url = _prometheus(prometheus_port)
            readers.append(reader)
        else:
            readers.append(_periodic(name))
    named = "OTEL_SERVICE_NAME" in os.environ
    resource = Resource.create({} if named else {SERVICE_NAME: service_name})
    provider = MeterProvider(metric_readers=readers, resource=resource)
    metrics.set_meter_provider(provider)
    instruments.state["on"] = True
    return MetricsSetup(provider, url, server)


def _prometheus(port: int | None) -> tuple[MetricReader, Any, str]:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise MissingDependencyError("the Prometheus endpoint", "ui") from exc
    host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", DEFAULT_PROMETHEUS_HOST)
    if port is None:
        value = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", str(DEFAULT_PROMETHEUS_PORT))
        if not (value.isascii() and value.isdigit()):
            raise SwarmbusError(f"OTEL_EXPORTER_PROMETHEUS_PORT={value}: not a port number")
        port = int(value)
    reader = PrometheusMetricReader()
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:  # the port is taken, or the host is not an address of this machine
        raise SwarmbusError(
            f"the Prometheus endpoint cannot listen on {host}:{port}: {exc}"
        ) from exc
    return reader, server, f"http://{host}:{server.server_port}/metrics"


def _periodic(name: str) -> MetricReader:
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        PeriodicExportingMetricReader,
    )

    exporter: MetricExporter
    if name == "console":
        exporter = ConsoleMetricExporter()
    elif name == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
        )
        transport = "grpc" if protocol == "grpc" else "http"
        try:
            module = importlib.import_module(
                f"opentelemetry.exporter.otlp.proto.{transport}.metric_exporter"
            )
        except ImportError as exc:
            raise MissingDependencyError("OTLP metric export", "otlp") from exc
        exporter = module.OTLPMetricExporter()
    else:
        raise SwarmbusError(
            f"OTEL_METRICS_EXPORTER={name}: swarmbus supports prometheus, otlp, console, none"
        )
    return PeriodicExportingMetricReader(exporter)


# --- the outside observer ---------------------------------------------------------------


@dataclass
class _Gauges:
    """The last polled state, read by the observable gauges' callbacks."""

    queue_depth: int = 0
    queue_age: float = 0.0
    open_proposals: int = 0
    dead_letters: int = 0
    lag: dict[tuple[str, str], int] = field(default_factory=dict)


class Observer:
    """Derives swarm metrics from the streams, as an outside process (``swarmbus metrics``).

    Counts every event from the moment it starts; polls state every ``interval`` s.
    """

    def __init__(self, bus: Bus, *, interval: float = 5.0) -> None:
        self.bus = bus
        self.interval = interval
        self.gauges = _Gauges()
        self.stores = None if bus.settings.backend == "nats" else StoreGauges(bus)
        self.seen = 0
        self._created: dict[str, datetime] = {}
        m = metrics.get_meter(METER_NAME)
        self._events = m.create_counter("swarmbus.events", description="Events, by type")
        self._tasks_created = m.create_counter("swarmbus.tasks.created", description="Tasks")
        self._tasks_completed = m.create_counter("swarmbus.tasks.completed")
        self._tasks_failed = m.create_counter("swarmbus.tasks.failed")
        self._decisions = m.create_counter("swarmbus.decisions", description="By outcome")
        self._proposals = m.create_counter("swarmbus.proposals", description="Proposals made")
        self._errors = m.create_counter("swarmbus.errors", description="error.occurred, by code")
        self._dead = m.create_counter("swarmbus.dead_letters", description="By code")
        self._claim = m.create_histogram(
            "swarmbus.task.claim.latency", unit="s", description="Task created to claimed"
        )
        self._duration = m.create_histogram(
            "swarmbus.task.duration", unit="s", description="Task created to finished"
        )
        g = self.gauges
        m.create_observable_gauge(
            "swarmbus.tasks.queue.depth", [self._one(lambda: g.queue_depth)], description="Tasks"
        )
        m.create_observable_gauge(
            "swarmbus.tasks.queue.age", [self._one(lambda: g.queue_age)], unit="s"
        )
        m.create_observable_gauge("swarmbus.proposals.open", [self._one(lambda: g.open_proposals)])
        m.create_observable_gauge(
            "swarmbus.dead_letters.stored", [self._one(lambda: g.dead_letters)]
        )
        m.create_observable_gauge("swarmbus.consumer.lag", [self._lag], description="Pending")

    @staticmethod
    def _one(read: Any) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read())]

        return callback

    def _lag(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"stream": stream, "consumer": consumer})
            for (stream, consumer), n in self.gauges.lag.items()
        ]

    def count(self, step: Step) -> None:
        """Count one event."""
        self.seen += 1
        self._events.add(1, {"type": step.type})
        message = step.message
        if message is None:
            return
        body: Any = message.body
        match message.type:
            case "task.created":
                self._tasks_created.add(1)
                self._created[body.task_id] = message.timestamp
                forget_oldest(self._created)
            case "task.assigned" if body.task_id in self._created:
                wait = message.timestamp - self._created[body.task_id]
                self._claim.record(max(0.0, wait.total_seconds()))
            case "task.completed" | "task.failed":
                (
                    self._tasks_completed
                    if message.type == "task.completed"
                    else self._tasks_failed
                ).add(1)
                created = self._created.pop(body.task_id, None)
                if created is not None:
                    took = (message.timestamp - created).total_seconds()
                    self._duration.record(max(0.0, took), {"status": message.type[5:]})
            case "proposal":
                self._proposals.add(1)
            case "decision":
                self._decisions.add(1, {"outcome": body.outcome})
            case "error.occurred":
                self._errors.add(1, {"code": body.code})

    async def run(self, ready: anyio.Event | None = None) -> None:
        """Observe until cancelled."""
        async with (
            Follower(self.bus, EVENTS_WILDCARD) as events,
            Follower(self.bus, DEAD_LETTER_WILDCARD, stream=DEAD_LETTER_STREAM) as dead,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(self._count_events, events)
            tg.start_soon(self._count_dead, dead)
            tg.start_soon(self._poll)
            if ready is not None:
                ready.set()

    async def _count_events(self, events: Follower) -> None:
        async for step in events.steps():
            self.count(step)

    async def _count_dead(self, dead: Follower) -> None:
        async for msg in dead.messages():
            self._dead.add(1, {"code": (msg.headers or {}).get(CODE_HEADER, "")})

    async def _poll(self) -> None:
        while True:
            try:
                await self.poll()
            except SwarmbusError as exc:
                log.warning("metrics poll failed: %s", exc)
            await anyio.sleep(self.interval)

    async def poll(self) -> None:
        """Refresh the gauges from stream, consumer and bucket state."""
        js, g = self.bus.js, self.gauges
        if self.stores is not None:
            await self.stores.poll(g)
        else:
            tasks = await stream_state(js, TASKS_STREAM)
            g.queue_depth = int(tasks.messages) if tasks else 0
            g.queue_age = (
                await self._oldest_age(int(tasks.first_seq)) if tasks and tasks.messages else 0.0
            )
            g.open_proposals = await self._open_proposals()
        dead = await stream_state(js, DEAD_LETTER_STREAM)
        g.dead_letters = int(dead.messages) if dead else 0
        g.lag = {
            (stream, consumer): lag
            for stream in (EVENTS_STREAM, TASKS_STREAM)
            for consumer, lag in (await consumer_lags(js, stream)).items()
        }

    async def _oldest_age(self, first_seq: int) -> float:
        first = await stored_message(self.bus.js, TASKS_STREAM, first_seq)
        if first is None or first.time is None:
            return 0.0
        return max(0.0, (datetime.now(UTC) - first.time).total_seconds())

    async def _open_proposals(self) -> int:
        kv = await key_value_or_none(self.bus.js, CONSENSUS_BUCKET)
        if kv is None:
            return 0
        open_ = 0
        for _, msg in await kv_latest(kv, PROPOSAL_PREFIX + "*"):
            with contextlib.suppress(msgspec.DecodeError):
                if msgspec.json.decode(msg.data, type=ProposalRecord).decision is None:
                    open_ += 1
        return open_


class StoreGauges:
    """The task and proposal gauges on a Redis / PostgreSQL backend (``SWARM_BACKEND``).

    Tasks: the claimable unfinished ones of every session and the oldest's age, read
    like a claimer reads them (``store_reads.backlog``: the open rows on PostgreSQL,
    the open-task index on Redis), so finished tasks are never read. Proposals: the
    undecided records of the consensus bucket (decided ones expire after the
    consensus retention, as on NATS).
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._stores: tuple[StateStore, StateStore | None, StateStore] | None = None

    async def _open(self) -> tuple[StateStore, StateStore | None, StateStore]:
        if self._stores is None:
            records = await open_store(self.bus, TASKS_BUCKET)
            index = None if lists_open(records) else await open_store(self.bus, OPEN_BUCKET)
            self._stores = (records, index, await open_store(self.bus, CONSENSUS_BUCKET))
        return self._stores

    async def poll(self, g: _Gauges) -> None:
        """Refresh the task and proposal gauges of ``g``."""
        records, index, consensus = await self._open()
        found = await backlog(records, index)
        g.queue_depth = found.tasks
        g.queue_age = (
            0.0
            if found.oldest is None
            else max(0.0, (datetime.now(UTC) - found.oldest).total_seconds())
        )
        open_ = 0
        for entry in await consensus.list(PROPOSAL_PREFIX):
            with contextlib.suppress(msgspec.DecodeError):
                record = msgspec.json.decode(entry.value or b"", type=ProposalRecord)
                open_ += record.decision is None
        g.open_proposals = open_
