"""The receive side of the bus: the durable consumer behind ``Bus.consume``.

One pull loop fetches from a durable JetStream consumer and hands messages to a few
worker tasks; each message is acked after its handlers return (at-least-once).

- One consumer serves many handlers (``Routes``): an agent has one durable whose
  ``filter_subjects`` cover all its handlers, updated in place when handlers are added
  or removed at run time, and each message goes in process to the handlers whose
  filters match its subject. The consumer count follows agent ids, not handlers x
  sessions. A ``RouteTable`` does the same for the handlers of many agents (a consumer
  group: one durable per process), with an index so that a message costs the same
  whatever the number of agents' filters.
- The filters sent to the server are deduplicated (none covered by another) and kept
  under ``MAX_FILTER_BYTES``: past it they are widened (``consumer_filters``); the
  in-process dispatch still matches each handler's own filters, so a wider filter
  only costs deliveries that no handler takes (acked at once).
- Per-handler failure isolation: a message is acked once every matching handler is
  done with it (succeeded, or failed and dead-lettered: a dead letter per handler). A
  handler that failed because NATS was unreachable has the message nak'ed for a
  redelivery; the handlers that already succeeded are recorded (in process, per stream
  sequence, bounded) and not run again on it. A redelivery to another process of the
  same agent id runs them again (at-least-once, as before).
- No polling: when caught up the loop waits on a long pull with idle heartbeats; the
  stop (and a reconnect) interrupts it at once.

- When caught up, the loop opens a long pull for as many messages as it has slots for;
  the pull returns at its first message (lowest latency) and stays open on the server,
  so the next messages need no request of their own (a request per message cost as
  much as the message's handling). When behind, it takes what the server said is
  waiting, up to the free slots, at once (``no_wait``).
- A slot of the limiter is held before fetching, and an open pull never asks for more
  than the slots free: never take messages we cannot start.
- Workers take fetched messages from a hand-off queue (``_Handoff``): starting a task
  per message costs more than a small handler. A worker is added only when none is
  idle, so there are never more than the slots held.
- Acks of handled messages go out in batches, at most ``ACK_DELAY`` later (one write
  for many); a draining consumer confirms each ack instead.
- A handler slower than ``ack_wait`` must not have its message redelivered (and run
  again) while it runs: a heartbeat sends progress acks for the messages in flight.
- Bad input is rejected (dead letter + error event) and acked; a handler that failed
  because NATS was unreachable is nak'ed for a redelivery while attempts are left.

``dispatch`` (a handler inside its CONSUMER span, failures reported) serves the live
subscriptions of ``Bus.subscribe`` (``LiveHandler``) too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import anyio
import anyio.abc
import anyio.lowlevel

from swarmbus._errors import ConnectionError, InvalidMessageError, PublishError, SwarmbusError
from swarmbus._jetstream.delivery import Connection, Msg, PullConsumer, TransportError
from swarmbus._jetstream.reads import deliveries, num_pending
from swarmbus._messages import Gate, Message
from swarmbus._observe._instruments import observed
from swarmbus._telemetry import record_failure

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("swarmbus")


class Host(Gate, Protocol):
    """What a durable consumer uses of its bus (``swarmbus.Bus``)."""

    nc: Connection
    reconnected: asyncio.Event
    reconnect_signal: anyio.Event  # set at the next reconnect (then replaced)

    def _consumer_span(
        self, msg: Msg, message_id: str, session: str, agent: str
    ) -> contextlib.AbstractContextManager[Span | None]: ...


Handler = Callable[[Message], Awaitable[None]]
#: The filter of a consumer left with no handler: no contract event has this subject.
NO_EVENTS: Final = "agent._none_._none_._none_._none_"
#: Redelivered messages whose succeeded handlers are remembered (oldest forgotten).
MAX_PARTIAL: Final = 10_000
#: Seconds a draining consumer waits for the server to confirm one ack.
DRAIN_ACK_TIMEOUT: Final = 5.0
#: Seconds a handled message's ack may wait to go out with others (one write for many).
ACK_DELAY: Final = 0.002
#: Acks waiting that are sent at once, without waiting for ``ACK_DELAY``.
MAX_ACK_BATCH: Final = 128
#: Bytes of ``filter_subjects`` a consumer config carries at most: far under any
#: max_payload (1 MB by default; the config, JSON, goes in one request). Past it the
#: filters are widened (``consumer_filters``).
MAX_FILTER_BYTES: Final = 64 * 1024


@dataclass(frozen=True, eq=False)
class Route:
    """A handler and the subject filters it receives (``name`` keys its dead letters).

    ``receiver`` (default: the consumer's) is the agent the handler runs as; a
    ``limiter`` (that agent's ``max_concurrency``) is held while the handler runs, when
    several agents share one consumer.
    """

    name: str
    filters: tuple[str, ...]
    handler: Handler
    receiver: str = ""
    limiter: anyio.Semaphore | None = None


class RouteSet(Protocol):
    """What a durable consumer asks of the handlers it serves (``Routes``, ``RouteTable``)."""

    def filter_subjects(self) -> list[str]: ...

    def match(self, subject: str) -> Sequence[Route]: ...

    def serves(self, route: Route) -> bool: ...


def _covers(pattern: tuple[str, ...], other: tuple[str, ...]) -> bool:
    """Every subject ``other`` matches, ``pattern`` matches too (NATS wildcards)."""
    for i, token in enumerate(pattern):
        if token == ">":
            return len(other) > i
        if i >= len(other) or other[i] == ">":
            return False
        if token != "*" and token != other[i]:
            return False
    return len(other) == len(pattern)


def _generalisations(tokens: tuple[str, ...]) -> Iterable[tuple[str, ...]]:
    """Every pattern that covers the pattern ``tokens`` (``tokens`` itself included)."""
    full = tokens[-1] == ">"
    for cut in range(len(tokens)):  # a prefix followed by ``>``
        yield from _wild_prefixes(tokens[:cut], (">",))
    if not full:  # the same length
        yield from _wild_prefixes(tokens, ())


def _wild_prefixes(prefix: tuple[str, ...], tail: tuple[str, ...]) -> Iterable[tuple[str, ...]]:
    """``prefix + tail`` with any of the prefix's literal tokens turned into ``*``."""
    if not prefix:
        yield tail
        return
    for rest in _wild_prefixes(prefix[1:], tail):
        yield (prefix[0], *rest)
        if prefix[0] != "*":
            yield ("*", *rest)


def _pruned(filters: Iterable[str]) -> list[str]:
    """Distinct filters, none covered by another (sorted)."""
    unique = set(filters)
    split = {tuple(f.split(".")) for f in unique}
    if len(split) < 64 or max(len(t) for t in split) > 6:  # small: compare pairs
        return sorted(
            ".".join(p) for p in split if not any(q != p and _covers(q, p) for q in split)
        )
    return sorted(
        ".".join(p) for p in split if not any(g != p and g in split for g in _generalisations(p))
    )


def consumer_filters(filters: Iterable[str], max_bytes: int = MAX_FILTER_BYTES) -> list[str]:
    """The ``filter_subjects`` of a consumer serving ``filters``: deduplicated, bounded.

    Past ``max_bytes`` the filters are widened to their first 3 tokens (then 2, then 1)
    followed by ``>``: ``agent.finding.reported.S1.*`` becomes ``agent.finding.reported.>``
    (any session). Handlers still get only what their own filters match.
    """
    kept = _pruned(filters)
    for depth in (3, 2, 1):
        if sum(len(f) + 3 for f in kept) <= max_bytes:
            break
        kept = _pruned(
            ".".join([*f.split(".")[:depth], ">"]) if f.count(".") >= depth else f for f in kept
        )
    return kept or [NO_EVENTS]


class Routes:
    """The handlers of one consumer: the union of their filters, dispatch by subject."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self._patterns = [
            (route, [tuple(f.split(".")) for f in route.filters]) for route in self.routes
        ]
        self.match = functools.lru_cache(maxsize=4096)(self._match)

    def filter_subjects(self) -> list[str]:
        """The consumer's filters: distinct, none covered by another (sorted), bounded."""
        return consumer_filters(f for route in self.routes for f in route.filters)

    def serves(self, route: Route) -> bool:
        """Whether ``route`` is one of these (it was not removed meanwhile)."""
        return route.limiter is None or route in self.routes

    def _match(self, subject: str) -> tuple[Route, ...]:
        tokens = tuple(subject.split("."))
        return tuple(
            route for route, patterns in self._patterns if any(_covers(p, tokens) for p in patterns)
        )


class _Node:
    """A level of the subject index: children by token, routes ending here or at ``>``."""

    __slots__ = ("children", "here", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.here: dict[Route, int] = {}  # route -> its order of registration
        self.rest: dict[Route, int] = {}  # routes whose filter ends here with ``>``


class RouteTable:
    """The handlers of many agents on one consumer, added and removed at run time.

    An index by subject token (``*`` and ``>`` included) makes a match cost the same
    whatever the number of filters; the filters are counted, so that the consumer's
    ``filter_subjects`` are recomputed only when a distinct one comes or goes.
    """

    def __init__(self) -> None:
        self._root = _Node()
        self._routes: dict[Route, int] = {}
        self._counts: Counter[str] = Counter()
        self._order = 0
        self._filters: list[str] | None = None
        self.match = functools.lru_cache(maxsize=4096)(self._match)

    def __len__(self) -> int:
        return len(self._routes)

    def add(self, routes: Iterable[Route]) -> None:
        """Serve ``routes`` too."""
        for route in routes:
            self._order += 1
            self._routes[route] = self._order
            for f in route.filters:
                self._node(f)[route] = self._order
                self._counts[f] += 1
                if self._counts[f] == 1:
                    self._filters = None
        self.match.cache_clear()

    def remove(self, routes: Iterable[Route]) -> None:
        """Serve ``routes`` no more (those not served are ignored)."""
        for route in routes:
            if self._routes.pop(route, None) is None:
                continue
            for f in route.filters:
                self._node(f).pop(route, None)
                self._counts[f] -= 1
                if not self._counts[f]:
                    del self._counts[f]
                    self._filters = None
        self.match.cache_clear()

    def serves(self, route: Route) -> bool:
        """Whether ``route`` is served (it was not removed meanwhile)."""
        return route in self._routes

    def filter_subjects(self) -> list[str]:
        """The consumer's filters: distinct, none covered by another (sorted), bounded."""
        if self._filters is None:
            self._filters = consumer_filters(self._counts)
        return self._filters

    def _node(self, pattern: str) -> dict[Route, int]:
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            node = node.children.setdefault(token, _Node())
        if tokens[-1] == ">":
            return node.rest
        return node.children.setdefault(tokens[-1], _Node()).here

    def _match(self, subject: str) -> tuple[Route, ...]:
        found: dict[Route, int] = {}
        nodes = [self._root]
        for token in subject.split("."):
            step = []
            for node in nodes:
                found.update(node.rest)
                for key in (token, "*"):
                    child = node.children.get(key)
                    if child is not None:
                        step.append(child)
            nodes = step
        for node in nodes:
            found.update(node.here)
        return tuple(sorted(found, key=found.__getitem__))


class _Handoff:
    """Fetched messages on their way to the worker tasks: a queue, the idle workers.

    An anyio memory stream costs a loop turn (a checkpoint) and an Event per receive,
    as much as a small handler; here a message goes to an idle worker's future, or
    waits in the queue for the next worker free. ``close`` ends the idle workers.
    """

    __slots__ = ("_closed", "_idle", "_queue")

    def __init__(self) -> None:
        self._queue: deque[Msg] = deque()
        self._idle: deque[asyncio.Future[Msg | None]] = deque()
        self._closed = False

    @property
    def idle(self) -> bool:
        """Whether a worker is waiting for a message."""
        return bool(self._idle)

    def put(self, msg: Msg) -> None:
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():  # not cancelled meanwhile
                waiter.set_result(msg)
                return
        self._queue.append(msg)

    async def get(self) -> Msg | None:
        """The next message; None once closed and empty."""
        if self._queue:
            return self._queue.popleft()
        if self._closed:
            return None
        waiter: asyncio.Future[Msg | None] = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            return await waiter
        except BaseException:  # cancelled: no longer idle; a message handed over stays
            if waiter in self._idle:
                self._idle.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and (msg := waiter.result()):
                self._queue.appendleft(msg)
            raise

    def close(self) -> None:
        self._closed = True
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)
        self._idle.clear()


class DurableConsumer:
    """Runs its routes' handlers on the messages of one durable pull consumer until a stop."""

    def __init__(
        self,
        host: Host,
        consumer: PullConsumer,
        routes: RouteSet,
        *,
        receiver: str,
        limiter: anyio.Semaphore,
        stop: anyio.Event,
    ) -> None:
        self._host = host
        self._consumer = consumer
        self._routes = routes
        self._filters = routes.filter_subjects()  # what the server has (create() sent it)
        self._durable = consumer.durable
        self._receiver = receiver
        self._limiter = limiter
        self._stop = stop
        self._ack_wait = consumer.options.ack_wait
        self._max_deliver = consumer.options.max_deliver
        # Messages the server said are waiting (1 when caught up): the next fetch's size.
        self._waiting = 1
        self._handoff = _Handoff()
        # Messages being handled, for the heartbeat.
        self._in_flight: dict[int, Msg] = {}
        # Stream sequence -> (receiver, route) done with a message to be redelivered.
        self._partial: OrderedDict[int, set[tuple[str, str]]] = OrderedDict()
        # Set while messages are in flight: the heartbeat sleeps only then.
        self._busy = anyio.Event()
        self._closed: Exception | None = None
        # Handled messages whose ack goes out with the next batch (``_send_acks``).
        self._acks: list[Msg] = []
        self._acks_waiting = asyncio.Event()
        #: Delete the consumer when the loop ends (set by a group's last member leaving).
        self.delete_at_end = False

    @property
    def routes(self) -> RouteSet:
        """The handlers served."""
        return self._routes

    @property
    def stop(self) -> anyio.Event:
        """Set to stop pulling (then the fetched messages finish)."""
        return self._stop

    async def set_routes(self, routes: RouteSet) -> None:
        """Serve ``routes`` from now on; the consumer's filters are updated in place.

        A handler added gets the messages the consumer has not delivered yet; a handler
        removed gets none once this returns. ``routes`` may be the same (changed)
        ``RouteTable``: the filters are compared with those last sent.
        """
        new = routes.filter_subjects()
        if new != self._filters:
            await self._consumer.create(new)
            self._filters = new
        self._routes = routes

    async def run(self, *, delete: bool = False) -> None:
        """Pull until the stop, then let the fetched messages finish.

        With ``delete`` (the owner leaves for good) the consumer is deleted at the end.

        Raises:
            ConnectionError: the connection closed for good (a reconnect is waited for).
        """
        try:
            async with anyio.create_task_group() as beats:
                beats.start_soon(self._keep_alive)
                beats.start_soon(self._interrupt_on, self._stop)
                beats.start_soon(self._interrupt_on_reconnects)
                beats.start_soon(self._send_acks)
                async with anyio.create_task_group() as tg:
                    try:
                        await self._pull(tg)
                    finally:
                        self._handoff.close()  # the workers finish what is queued
                beats.cancel_scope.cancel()
            if self._closed is not None:
                raise ConnectionError(f"consumer {self._durable}: {self._closed}") from self._closed
        finally:
            with anyio.CancelScope(shield=True):
                await self._flush_acks()
            await self._consumer.close()
            if delete or self.delete_at_end:
                with anyio.CancelScope(shield=True), contextlib.suppress(SwarmbusError):
                    # Shielded: the owner is leaving for good; a consumer left behind
                    # would keep every matching event until its inactive threshold.
                    await self._consumer.delete()

    async def _interrupt_on(self, event: anyio.Event) -> None:
        await event.wait()
        self._consumer.interrupt()

    async def _interrupt_on_reconnects(self) -> None:
        """A pull open at a reconnect is lost with the old connection: re-issue it."""
        while True:
            await self._interrupt_on(self._host.reconnect_signal)

    async def _pull(self, tg: anyio.abc.TaskGroup) -> None:
        stop, limiter, handoff = self._stop, self._limiter, self._handoff
        while not stop.is_set():
            # Let the handlers just given out run first: they may free slots.
            await anyio.lowlevel.checkpoint()
            # Hold a slot before fetching: never take messages we cannot start.
            await limiter.acquire()
            if stop.is_set():  # told to stop while waiting for the slot
                limiter.release()
                break
            batch = await self._fetch()
            if batch is None:
                break
            if not batch:
                continue
            if stop.is_set():  # a message came with the stop: give it back
                limiter.release()
                for msg in batch:
                    with contextlib.suppress(TransportError):
                        await msg.nak()
                break
            self._waiting = 1 + num_pending(batch[-1])
            for i, msg in enumerate(batch):
                if i:
                    await limiter.acquire()
                if not handoff.idle:
                    tg.start_soon(self._work)
                handoff.put(msg)

    async def _fetch(self) -> list[Msg] | None:
        """The next batch for the slot held: [] (slot released) if none, None to end."""
        limiter = self._limiter
        batch: list[Msg] = []
        try:
            if not self._stop.is_set():  # a stop or a reconnect interrupts the pull
                # Room: the slot held and the free ones (a long pull returns at its
                # first message and keeps the rest of its room open on the server).
                room = min(1 + limiter.value, 256)
                backlog = self._waiting > 1
                batch = await self._consumer.pull(
                    min(room, self._waiting) if backlog else room, backlog=backlog
                )
        except TransportError as exc:
            limiter.release()
            if self._stop.is_set():
                return None
            if self._host.nc.is_closed:  # for good: no reconnect will come
                self._closed = exc
                return None
            log.warning("consumer %s: %s; retrying", self._durable, exc)
            await self._wait_reconnect()
            return []
        except SwarmbusError as exc:  # re-creating a deleted consumer failed
            limiter.release()
            log.warning("consumer %s: %s; retrying", self._durable, exc)
            await self._wait_reconnect()
            return []
        if not batch:
            self._waiting = 1
            limiter.release()
        return batch

    async def _wait_reconnect(self) -> None:
        """Back off until the connection is back (or we are told to stop)."""
        host = self._host
        host.reconnected.clear()
        with anyio.move_on_after(2.0):
            while not self._stop.is_set() and not host.nc.is_connected:
                await host.reconnected.wait()
            if not self._stop.is_set():
                await anyio.sleep(0.25)

    async def _work(self) -> None:
        in_flight, handoff = self._in_flight, self._handoff
        while (msg := await handoff.get()) is not None:
            in_flight[id(msg)] = msg
            self._busy.set()
            try:
                await self._handle(msg)
            finally:
                del in_flight[id(msg)]

    async def _send_acks(self) -> None:
        """Send the acks of handled messages in batches: many acks, one write.

        An ack sent alone costs a socket write (and a wake of the connection's flusher)
        per message; held for at most ``ACK_DELAY`` they go out together. A message
        whose ack is lost (a crash meanwhile) is redelivered, as with any lost ack.
        """
        while True:
            await self._acks_waiting.wait()
            if len(self._acks) < MAX_ACK_BATCH and not self._stop.is_set():
                await anyio.sleep(ACK_DELAY)
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        self._acks_waiting.clear()
        sent = 0
        try:
            for msg in acks:
                with contextlib.suppress(TransportError):
                    await msg.ack()
                sent += 1
        finally:
            if sent < len(acks):  # cancelled meanwhile: the rest go with the final flush
                self._acks[:0] = acks[sent:]

    async def _keep_alive(self) -> None:
        while True:
            await self._busy.wait()  # idle: no timer at all
            await anyio.sleep(self._ack_wait / 3)
            if not self._in_flight:
                self._busy = anyio.Event()
            for msg in list(self._in_flight.values()):
                with contextlib.suppress(TransportError):
                    await msg.in_progress()

    async def _handle(self, msg: Msg) -> None:
        host, receiver = self._host, self._receiver
        try:
            try:
                message = host.accept(msg.subject, msg.data)
            except InvalidMessageError as exc:
                seq = msg.metadata.sequence.stream if msg.reply else None
                # One dead letter per bad message, whatever the number of receivers:
                # keyed by stream sequence, the dead-letter stream de-duplicates them.
                await host.reject(
                    subject=msg.subject,
                    data=msg.data,
                    code=exc.code,
                    reason=exc.reason,
                    receiver=receiver,
                    dedupe_key=f"seq{seq}" if seq else None,
                )
            else:
                if not await self._run_routes(message, msg):
                    return  # nak'ed: redelivered later
            if self._stop.is_set():
                # Draining: leaving serve() promises the in-flight work is acked, so
                # wait for the server to confirm it (a plain ack is fire-and-forget).
                with contextlib.suppress(TransportError, TimeoutError):
                    await msg.ack_sync(timeout=DRAIN_ACK_TIMEOUT)
            else:
                self._acks.append(msg)  # sent with the next batch (``_send_acks``)
                self._acks_waiting.set()
        finally:
            self._limiter.release()

    async def _run_routes(self, message: Message, msg: Msg) -> bool:
        """Run every matching handler not yet done with ``msg``; False if nak'ed."""
        routes = self._routes.match(msg.subject)
        attempts = deliveries(msg)
        seq = msg.metadata.sequence.stream if attempts > 1 or len(routes) > 1 else 0
        done = self._partial.pop(seq, None) if attempts > 1 else None
        retry = attempts < self._max_deliver
        failed = False
        for route in routes:
            receiver = route.receiver or self._receiver
            key = (receiver, route.name)
            if (done and key in done) or not _wants(route.handler, message, receiver):
                continue
            if not await self._dispatch(route, message, msg, receiver, retry):
                failed = True
            elif len(routes) > 1:
                done = done or set()
                done.add(key)
        if not failed:
            return True
        if done:
            self._partial[seq] = done
            while len(self._partial) > MAX_PARTIAL:
                self._partial.popitem(last=False)
        with contextlib.suppress(TransportError):
            await msg.nak(delay=min(0.25 * 2**attempts, 10.0))
        return False

    async def _dispatch(
        self, route: Route, message: Message, msg: Msg, receiver: str, retry: bool
    ) -> bool:
        """``dispatch``, holding the route's agent's limiter if it has one."""
        if route.limiter is None:
            return await dispatch(self._host, route, message, msg, receiver, retry=retry)
        async with route.limiter:
            if not self._routes.serves(route):  # its agent left meanwhile
                return True
            return await dispatch(self._host, route, message, msg, receiver, retry=retry)


class LiveHandler:
    """The callback of a live (core NATS) subscription: typed dispatch, bad input rejected."""

    def __init__(self, host: Host, handler: Handler, receiver: str) -> None:
        self._host = host
        self._handler = handler
        self._receiver = receiver

    async def on_msg(self, msg: Msg) -> None:
        host = self._host
        try:
            message = host.accept(msg.subject, msg.data)
        except InvalidMessageError as exc:
            await host.reject(
                subject=msg.subject,
                data=msg.data,
                code=exc.code,
                reason=exc.reason,
                receiver=self._receiver,
            )
            return
        await dispatch(host, Route("", (), self._handler), message, msg, self._receiver)


async def dispatch(
    host: Host, route: Route, message: Message, msg: Msg, receiver: str, *, retry: bool = False
) -> bool:
    """Run a handler inside a CONSUMER span; a raising handler is reported, not fatal.

    With ``retry`` (a durable delivery that has attempts left), a handler that failed
    because NATS was unreachable (``ConnectionError``, ``PublishError``: a failover, a
    short outage) is to be retried: it returns False (the caller naks the message for
    a redelivery after a delay) instead of dead-lettering it.
    """
    span = host._consumer_span(msg, message.id, message.source.session, receiver)
    # Report inside the span: the error event joins the failed message's trace.
    with span as current:
        try:
            await observed(route.handler, message, receiver)  # metrics: handler latency
        except (ConnectionError, PublishError) as exc:  # swarmbus's: NATS unreachable
            record_failure(current, exc)
            if not retry:
                await _handler_failed(host, exc, route, message, msg, receiver)
                return True
            log.warning("handler for %s failed (%s): retrying", msg.subject, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - reported: dead letter + error event
            record_failure(current, exc)
            await _handler_failed(host, exc, route, message, msg, receiver)
    return True


async def _handler_failed(
    host: Host, exc: Exception, route: Route, message: Message, msg: Msg, receiver: str
) -> None:
    """Dead-letter the message a handler failed on, with an error event saying why.

    One dead letter per failed handler (keyed by message id, handler and receiver):
    each is that handler's to replay; the other handlers were not affected.
    """
    log.error("handler for %s failed", msg.subject, exc_info=exc)
    key = f"{message.id}:{route.name}" if route.name else message.id  # reject adds receiver
    await host.reject(
        subject=msg.subject,
        data=msg.data,
        code="handler_error",
        reason=f"{type(exc).__name__}: {exc}",
        receiver=receiver,
        dedupe_key=key,
        message_id=message.id,
    )


def _wants(handler: Handler, message: Message, receiver: str) -> bool:
    accepts: tuple[type, ...] | None = getattr(handler, "__swarmbus_types__", None)
    if accepts is not None and not isinstance(message, accepts):
        return False
    return not (
        getattr(handler, "__swarmbus_ignore_own__", False) and message.source.agent == receiver
    )
