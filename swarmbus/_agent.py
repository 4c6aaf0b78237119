"""The agent runtime: an ``Agent`` with decorated handlers, served on a bus.

Event handlers run on one durable JetStream consumer per agent id, named exactly
``safe_token(agent id)`` (so NATS permissions can bind it to the agent), whose
``filter_subjects`` cover every handler; each message is dispatched in process to the
handlers whose filters match its subject. Events that arrive while an agent is down or
reconnecting are handled when it is back (within ``consumer_inactive_threshold``), and
several processes running the same agent id share the work (they should run the same
handlers: the filters are the last starter's). Handlers added or removed while the
agent is served (``update_handlers``: a session joined or left) update the consumer's
filters in place; no new durable. ``serve(bus, leave=True)`` deletes the consumer at
exit. With ``Settings.consumer_group`` set, every agent served on a bus shares one
durable of that name instead (one per process: ``swarmbus._consumer_group``).
Request handlers answer capability requests on core NATS queue groups.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc

from swarmbus import _subjects as subjects
from swarmbus._bus import Bus, consume_routes
from swarmbus._consumer import Route, Routes
from swarmbus._consumer_group import ConsumerGroup, Member
from swarmbus._errors import InvalidIdentifierError, SwarmbusError
from swarmbus._messages import (
    ActionCompletedMessage,
    ActionMessage,
    Body,
    DecisionMessage,
    Envelope,
    FindingMessage,
    FindingReportedMessage,
    Message,
    ProposalMessage,
    RequestMessage,
    ResponseMessage,
    TaskAssignedMessage,
    TaskCompletedMessage,
    TaskCreatedMessage,
    TaskFailedMessage,
    VoteMessage,
)

log = logging.getLogger("swarmbus.agent")

M = TypeVar("M", bound=Envelope)
EventHandler = Callable[[M], Awaitable[None]]
RequestHandler = Callable[[RequestMessage], Awaitable[Mapping[str, Any]]]

TASK_EVENTS = (TaskCreatedMessage, TaskAssignedMessage, TaskCompletedMessage, TaskFailedMessage)
ACTION_EVENTS = (
    ActionMessage,
    ProposalMessage,
    VoteMessage,
    DecisionMessage,
    ActionCompletedMessage,
)


#: Agents of one ``serving`` block started at once (with a consumer group: their joins
#: are applied to the consumer's filters together).
CONCURRENT_STARTS = 64


class _Consumer(Protocol):
    """The consumer an agent is served on: its own, or its group's membership."""

    async def set_routes(self, routes: Routes) -> None: ...


@dataclass(frozen=True)
class _EventRoute:
    name: str
    filters: tuple[str, ...]
    handler: Callable[[Any], Awaitable[None]]


@dataclass
class Agent:
    """An async worker with an identity, capabilities and expertise.

    Args:
        id: the agent id (``ops/deploy-validator``); it is the publisher token in
            every subject this agent sends on.
        capabilities: request capabilities it answers (also added by ``on_request``).
        expertise: category -> weight in [0, 1], used by confidence aggregation.
        max_concurrency: handlers of this agent running at once.
    """

    id: str
    capabilities: set[str] = field(default_factory=set)
    expertise: dict[str, float] = field(default_factory=dict)
    max_concurrency: int = 16
    _events: list[_EventRoute] = field(default_factory=list, init=False, repr=False)
    _requests: dict[str, RequestHandler] = field(default_factory=dict, init=False, repr=False)
    _bus: Bus | None = field(default=None, init=False, repr=False)
    _consumer: _Consumer | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        subjects.validate_agent_id(self.id)
        self.capabilities = set(self.capabilities)
        for capability in self.capabilities:
            subjects.validate_name("capability", capability)
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        for category, weight in self.expertise.items():
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"expertise in {category!r} must be within [0, 1], got {weight!r}")

    # --- handler registration ------------------------------------------------------

    def on_event(
        self,
        domain: str,
        event: str = "*",
        *,
        types: Iterable[type[Envelope]] | None = None,
        session: str = "*",
        ignore_own: bool = True,
        name: str | None = None,
    ) -> Callable[[EventHandler[M]], EventHandler[M]]:
        """Handle events on ``agent.<domain>.<event>.<session>.*``.

        Args:
            types: only these message types reach the handler (others are acked).
            session: one session id, or ``*`` for all.
            ignore_own: skip events this agent published itself.
            name: the handler's name (default: the function name), unique in the
                agent; it keys the handler's dead letters. While the agent is served,
                call ``update_handlers`` after registering.
        """
        if session != "*":
            subjects.validate_session_id(session)

        def register(fn: EventHandler[M]) -> EventHandler[M]:
            route_name = subjects.validate_name("handler name", name or fn.__name__)
            if any(r.name == route_name for r in self._events):
                raise ValueError(f"{self.id} already has a handler named {route_name!r}")
            # The route's filters go on a handle of its own: one function may serve
            # several routes (or agents), each with its own types and ignore_own.
            handler = functools.partial(fn)
            handler.__swarmbus_types__ = tuple(types) if types else None  # type: ignore[attr-defined]
            handler.__swarmbus_ignore_own__ = ignore_own  # type: ignore[attr-defined]
            self._events.append(
                _EventRoute(route_name, (subjects.event_filter(domain, event, session),), handler)
            )
            return fn

        return register

    def on_finding(
        self, *, session: str = "*", ignore_own: bool = True
    ) -> Callable[[EventHandler[FindingMessage]], EventHandler[FindingMessage]]:
        """Handle findings (``agent.finding.reported``) of one or every session."""
        return self.on_event(
            "finding", "reported", types=(FindingMessage,), session=session, ignore_own=ignore_own
        )

    def on_finding_reported(
        self, *, session: str = "*", ignore_own: bool = True
    ) -> Callable[[EventHandler[FindingReportedMessage]], EventHandler[FindingReportedMessage]]:
        """Handle the blackboard's ``finding.reported`` lifecycle events."""
        return self.on_event(
            "finding",
            "reported",
            types=(FindingReportedMessage,),
            session=session,
            ignore_own=ignore_own,
        )

    def on_task(
        self, event: str = "*", *, session: str = "*", ignore_own: bool = True
    ) -> Callable[[EventHandler[Message]], EventHandler[Message]]:
        """Handle task lifecycle events (``agent.task.<event>``)."""
        return self.on_event(
            "task", event, types=TASK_EVENTS, session=session, ignore_own=ignore_own
        )

    def on_action(
        self, event: str = "*", *, session: str = "*", ignore_own: bool = True
    ) -> Callable[[EventHandler[Message]], EventHandler[Message]]:
        """Handle actions, proposals, votes and decisions (``agent.action.<event>``)."""
        return self.on_event(
            "action", event, types=ACTION_EVENTS, session=session, ignore_own=ignore_own
        )

    def on_request(self, capability: str) -> Callable[[RequestHandler], RequestHandler]:
        """Answer requests for ``capability``; the handler returns the result object.

        A raising handler yields a ``failure`` response carrying the error.

        Raises:
            InvalidIdentifierError: this agent's id is ``any`` (the target that means
                "any agent with the capability"), so it cannot be addressed.
        """
        subjects.validate_name("capability", capability)
        if self.id == subjects.ANY:
            raise InvalidIdentifierError(
                "agent id", self.id, f"'{subjects.ANY}' is a request target, not an agent"
            )

        def register(fn: RequestHandler) -> RequestHandler:
            self._requests[capability] = fn
            self.capabilities.add(capability)
            return fn

        return register

    def remove_handler(self, name: str) -> None:
        """Remove the event handler ``name`` (call ``update_handlers`` if served).

        Raises:
            KeyError: no handler has that name.
        """
        kept = [r for r in self._events if r.name != name]
        if len(kept) == len(self._events):
            raise KeyError(name)
        self._events[:] = kept

    async def update_handlers(self) -> None:
        """Apply handlers registered or removed while served (a session joined or left).

        The agent's one consumer gets the new filters in place (no new durable): a
        handler added receives the events not yet delivered to the agent; a handler
        removed receives none once this returns. An agent served without event handlers
        has no consumer: restart it to add some.
        """
        if self._consumer is not None:
            await self._consumer.set_routes(self._routes())

    def _routes(self) -> Routes:
        return Routes(Route(r.name, r.filters, r.handler) for r in self._events)

    def request_handler(self, capability: str) -> RequestHandler | None:
        """The handler that answers ``capability`` (``on_request``), or None."""
        return self._requests.get(capability)

    # --- acting --------------------------------------------------------------------

    @property
    def bus(self) -> Bus:
        """The bus this agent is served on."""
        if self._bus is None:
            raise SwarmbusError(
                f"agent {self.id} is not running: use `async with agent.serve(bus)`"
            )
        return self._bus

    async def publish(self, body: Body, *, session: str, id: str | None = None) -> Message:
        """Publish ``body`` as this agent in ``session``."""
        return await self.bus.publish(body, agent=self.id, session=session, id=id)

    async def request(
        self,
        capability: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        session: str,
        to: str = subjects.ANY,
        timeout: float | None = None,
    ) -> ResponseMessage:
        """Ask an agent with ``capability`` (``to`` one agent id, or ``any``)."""
        return await self.bus.request(
            capability, parameters, agent=self.id, session=session, to=to, timeout=timeout
        )

    # --- serving -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(
        self, bus: Bus, *, drain_timeout: float = 30.0, leave: bool = False
    ) -> AsyncIterator[Agent]:
        """Run this agent's handlers on ``bus`` until the block exits, then drain.

        Handlers are subscribed before the block starts. On exit no new message is
        taken, in-flight handlers finish (up to ``drain_timeout``) and are acked;
        anything not acked is redelivered to the next instance. The agent's consumer
        stays for ``Settings.consumer_inactive_threshold`` (a restart resumes there);
        with ``leave`` (the agent leaves for good) it is deleted at exit. With
        ``Settings.consumer_group`` the agent joins its bus's shared consumer instead;
        ``leave`` drops its interest from it (and deletes it if it was the last agent).
        """
        if self._bus is not None:
            raise SwarmbusError(f"agent {self.id} is already running")
        self._bus = bus
        # fast_acquire: taking a free slot does not yield to the event loop (hot path).
        limiter = anyio.Semaphore(self.max_concurrency, fast_acquire=True)
        stop = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                if self._events and bus.settings.consumer_group:
                    group = ConsumerGroup.of(bus, bus.settings.consumer_group)
                    member = Member(self.id, limiter, self.max_concurrency, tg)
                    self._consumer = await tg.start(
                        functools.partial(group.serve, member, self._routes(), stop, leave=leave)
                    )
                elif self._events:
                    self._consumer = await tg.start(
                        functools.partial(
                            consume_routes,
                            bus,
                            subjects.safe_token(self.id),
                            self._routes(),
                            receiver=self.id,
                            limiter=limiter,
                            stop=stop,
                            delete=leave,
                        )
                    )
                subs = []
                for capability, handler in self._requests.items():
                    subs += await bus.serve_requests(
                        capability, handler, agent=self.id, limiter=limiter, task_group=tg
                    )
                try:
                    yield self
                finally:
                    for sub in subs:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                    stop.set()
                    tg.cancel_scope.deadline = anyio.current_time() + drain_timeout
        finally:
            self._bus = None
            self._consumer = None


@contextlib.asynccontextmanager
async def serving(bus: Bus, agents: Iterable[Agent]) -> AsyncIterator[None]:
    """Serve ``agents`` on ``bus`` for the block; on exit they drain concurrently.

    Every agent stops taking messages when the block exits and they drain together,
    not one after the other (the others would keep taking messages meanwhile). An
    error of the block (or of one agent) is raised as it is, not in an exception
    group, so callers (and ``swarmbus run``) can catch a ``SwarmbusError``.

    With a consumer group (``Settings.consumer_group``) the agents start concurrently
    (their joins update the shared consumer together), and at exit the group stops
    pulling first if all its agents are leaving.
    """
    stop = anyio.Event()
    agents = list(agents)
    try:
        async with anyio.create_task_group() as tg:
            if bus.settings.consumer_group:
                async with anyio.create_task_group() as starting:
                    starts = anyio.CapacityLimiter(CONCURRENT_STARTS)
                    for agent in agents:
                        starting.start_soon(_start, tg, starts, agent, bus, stop)
            else:
                for agent in agents:
                    await tg.start(_serve_until, agent, bus, stop)
            try:
                yield
            finally:
                if bus.settings.consumer_group:
                    ConsumerGroup.close_for(bus, {agent.id for agent in agents})
                stop.set()
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        raise error from None


async def _start(
    tg: anyio.abc.TaskGroup,
    starts: anyio.CapacityLimiter,
    agent: Agent,
    bus: Bus,
    stop: anyio.Event,
) -> None:
    async with starts:
        await tg.start(_serve_until, agent, bus, stop)


async def _serve_until(
    agent: Agent,
    bus: Bus,
    stop: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with agent.serve(bus):
        task_status.started()
        await stop.wait()


async def run(*agents: Agent, bus: Bus, until: anyio.Event | None = None) -> None:
    """Serve ``agents`` on ``bus`` until SIGINT/SIGTERM (or ``until``), then drain."""
    stop = until or anyio.Event()
    async with serving(bus, agents), anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, stop)
        await stop.wait()
        tg.cancel_scope.cancel()


async def _stop_on_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: draining", signal.Signals(signum).name)
            stop.set()
            return
