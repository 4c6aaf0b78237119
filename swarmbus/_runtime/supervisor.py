"""``swarmbus up``: one supervised process running the coordination services.

==============  ==========================================================  =========
service         what it does                                                module
==============  ==========================================================  =========
``consensus``   decides proposals (``ConsensusService``); provisions        _consensus,
                streams, buckets and task consumers for agents              provision
``board``       records wire findings on the board (``Blackboard.recording``) _blackboard
``intake``      starts the swarm configured for each incident               intake
``api``         ``swarmbus.api.>`` request/reply for every operation        api_server
``events``      acts on inbound lifecycle events, reports malformed ones    events
``presence``    heartbeats; releases a dead agent's claims and locks         presence
``timeouts``    fails tasks whose last claim expired, with a dead letter     timeouts
==============  ==========================================================  =========

All run by default, on an embedded nats-server (or ``NATS_URL``), with health and
readiness on HTTP. Each can run alone for scale-out (``--only api``): replicas share
the API and event subscriptions through queue groups and the consensus and board
consumers through their durables. Presence and what agents hold through the API live
in the process that served their requests: run ``api`` and ``presence`` together.

SIGTERM (or SIGINT) drains: readiness turns 503, no new request or event is taken,
requests in flight get ``drain_timeout`` seconds, then swarms still running are
cancelled and the services stop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import anyio
from anyio.abc import TaskGroup

from swarmbus import _subjects as subjects
from swarmbus._blackboard import Blackboard
from swarmbus._bus import Bus
from swarmbus._config import Settings
from swarmbus._consensus import Consensus, ConsensusService
from swarmbus._jetstream.replies import RawHandler, RawSubscription
from swarmbus._runtime.api_server import RUNTIME_AGENT, ApiServer
from swarmbus._runtime.events import InboundEvents
from swarmbus._runtime.health import Health
from swarmbus._runtime.holdings import Departures, Holdings
from swarmbus._runtime.intake import Intake, Routes
from swarmbus._runtime.presence import Presence
from swarmbus._runtime.provision import provisioning
from swarmbus._runtime.timeouts import TaskTimeouts
from swarmbus._server import NatsServer

log = logging.getLogger("swarmbus.runtime")

SERVICES: Final = ("consensus", "board", "intake", "api", "events", "presence", "timeouts")


@dataclass(frozen=True)
class RuntimeConfig:
    """What ``swarmbus up`` runs, and where.

    Args:
        settings: connection settings; without a URL an embedded server starts.
        data_dir: the embedded server's store (default: the user data dir).
        port: the embedded server's client port (None: any free port).
        intake: the intake file (incident kind/label -> swarm spec).
        http: host and port of the health endpoints (None: off; port 0: any).
        services: which services to run.
        heartbeat_interval: seconds between an agent's presence heartbeats.
        dead_after: seconds of silence after which an agent is dead.
        drain_timeout: seconds requests in flight get on SIGTERM.
        task_sweep_interval: seconds between task-timeout sweeps.
    """

    settings: Settings = field(default_factory=Settings.from_env)
    data_dir: str | None = None
    port: int | None = None
    intake: str | None = None
    http: tuple[str, int] | None = ("127.0.0.1", 8090)
    services: frozenset[str] = frozenset(SERVICES)
    heartbeat_interval: float = 0.5
    dead_after: float = 1.5
    drain_timeout: float = 10.0
    task_sweep_interval: float = 5.0


class Runtime:
    """The supervised services of ``swarmbus up`` (see the module docstring)."""

    def __init__(self, config: RuntimeConfig) -> None:
        unknown = set(config.services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services {sorted(unknown)}: choose from {SERVICES}")
        self.config = config
        self.routes = Routes.load(config.intake) if config.intake else Routes()
        self.url = ""
        self.http_port: int | None = None
        self.health = Health(self._connected)
        self._bus: Bus | None = None
        self._subscriptions: list[RawSubscription] = []

    def _connected(self) -> bool:
        return self._bus is not None and self._bus.nc.is_connected

    def runs(self, service: str) -> bool:
        return service in self.config.services

    async def run(
        self, stop: anyio.Event, *, on_ready: Callable[[Runtime], None] | None = None
    ) -> None:
        """Run until ``stop`` is set, then drain (see the module docstring)."""
        async with contextlib.AsyncExitStack() as stack:
            bus = await self._connect(stack)
            for service in sorted(self.config.services):
                self.health.expect(service)
            # Services with task groups of their own are entered here, outside the
            # runtime's task groups, so their scopes nest inside-out on exit.
            if self.runs("consensus"):
                # what agents need and may not create under the deploy auth configs
                await stack.enter_async_context(provisioning(bus))
                await stack.enter_async_context(ConsensusService(bus))
                self.health.started("consensus")
            if self.runs("board"):
                await stack.enter_async_context(Blackboard.recording(bus))
                self.health.started("board")
            closers: list[Callable[[], Awaitable[None]]] = []
            try:
                async with anyio.create_task_group() as background:
                    if self.config.http is not None:
                        host, port = self.config.http
                        self.http_port = await background.start(self.health.serve, host, port)
                    async with anyio.create_task_group() as work:
                        closers = await self._start(bus, work, background)
                        if on_ready is not None:
                            on_ready(self)
                        await stop.wait()
                        await self._drain(work)
                    background.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    for close in closers:
                        await close()

    async def _connect(self, stack: contextlib.AsyncExitStack) -> Bus:
        settings = self.config.settings
        if not settings.servers:
            server = NatsServer(self.config.data_dir, port=self.config.port)
            await anyio.to_thread.run_sync(server.start)
            stack.callback(server.stop)
            settings = settings.model_copy(update={"url": server.url})
        self.url = str(settings.url)
        named = settings.model_copy(update={"name": settings.name or "swarmbus up"})
        self._bus = await stack.enter_async_context(Bus.open(named))
        return self._bus

    async def _drain(self, work: TaskGroup) -> None:
        self.health.draining = True
        with anyio.CancelScope(shield=True):
            for subscription in self._subscriptions:
                await subscription.stop()
        work.cancel_scope.deadline = anyio.current_time() + self.config.drain_timeout

    async def _start(
        self, bus: Bus, work: TaskGroup, background: TaskGroup
    ) -> list[Callable[[], Awaitable[None]]]:
        """Start intake, presence, the API and the event watcher; their closers."""
        closers: list[Callable[[], Awaitable[None]]] = []
        holdings = Holdings()
        departures = Departures(bus, holdings, agent=RUNTIME_AGENT)
        presence = Presence(
            departures.on_death,
            interval=self.config.heartbeat_interval,
            dead_after=self.config.dead_after,
        )
        if self.runs("presence"):
            background.start_soon(presence.run)
            self.health.started("presence")
        intake = Intake(bus, self.routes, work)
        self.health.started("intake")
        if self.runs("api"):
            consensus = await Consensus.open(bus)
            server = ApiServer(bus, consensus, presence, holdings, intake, departures)
            closers.append(server.close)
            await self._subscribe(bus, subjects.API_WILDCARD, server.handle, work, "swarmbus-api")
            self.health.started("api")
        timeouts = None
        if self.runs("timeouts"):
            timeouts = TaskTimeouts(
                bus, agent=RUNTIME_AGENT, interval=self.config.task_sweep_interval
            )
            closers.append(timeouts.close)
            background.start_soon(timeouts.run)
            self.health.started("timeouts")
        if self.runs("events"):
            events = InboundEvents(bus, intake, agent=RUNTIME_AGENT, timeouts=timeouts)
            closers.append(events.close)
            await self._subscribe(
                bus, subjects.EVENTS_WILDCARD, events.handle, work, "swarmbus-events"
            )
            self.health.started("events")
        return closers

    async def _subscribe(
        self, bus: Bus, subject: str, handler: RawHandler, tg: TaskGroup, queue: str
    ) -> None:
        subscription = RawSubscription(bus.nc, subject, handler, tg, queue=queue)
        await subscription.start(bus.settings.request_timeout)
        self._subscriptions.append(subscription)


@contextlib.asynccontextmanager
async def running(config: RuntimeConfig) -> AsyncIterator[Runtime]:
    """Run a runtime in the background of the block (tests, embedding); drains on exit."""
    runtime = Runtime(config)
    stop = anyio.Event()
    ready = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: runtime.run(stop, on_ready=lambda _: ready.set()))
        await ready.wait()
        try:
            yield runtime
        finally:
            stop.set()
