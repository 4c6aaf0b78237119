"""The request server: the receive loop behind ``Bus.serve_requests``.

One agent answers one capability on two queue subscriptions: requests to ``any``
(queue group per capability, so one agent of the capability answers) and requests
addressed to the agent itself (queue group per agent, so one instance answers).

A task per request costs more than a small handler; instead a few tasks drain a FIFO.
One drain at a time is "ready" (started or woken, not yet running): when it takes a
request and more are waiting, with a limiter slot free, it readies the next one, so a
blocked handler never holds up the others while a burst of quick handlers is served by
one task. A drain that finds the FIFO empty parks (``MAX_PARKED`` at most) until the
next request or ``unsubscribe``: a request wakes one instead of spawning a task.

Requests are taken in the connection's read loop (``InlineDelivery``: decoded, checked
against their subject, queued, a drain woken), not handed to the subscription's task
first; bad input is refused from that task.

A handler's failure (or a result that cannot be sent) becomes a ``failure`` response, a
dead letter and an error event; the caller is always answered. The answer goes to the
request's reply subject with the responder's id appended when that subject is a
verified one (``swarmbus._requester``), else to the reply subject itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import anyio.abc

from swarmbus import _subjects as subjects
from swarmbus._errors import InvalidIdentifierError, InvalidMessageError
from swarmbus._jetstream.delivery import Connection, Msg, Subscription, TransportError
from swarmbus._jetstream.hotpath import InlineDelivery, Later, publish_nowait
from swarmbus._messages import (
    Gate,
    Message,
    RequestMessage,
    Response,
    ResponseMessage,
    encode,
    envelope_for,
    new_id,
    now,
    source_of,
)
from swarmbus._requester import answer_subject
from swarmbus._telemetry import record_failure

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("swarmbus")
_NO_HEADERS: Final[Mapping[str, str]] = {}

#: Drains kept parked between requests: the one a request wakes, and the one that drain
#: readies while it serves a burst (else a task would be started for every burst).
MAX_PARKED: Final = 2
MAX_QUEUED: Final = 10_000
"""Requests a capability's server holds waiting for a handler slot; past it a request
is answered at once with status ``failure`` and ``{"error": "overloaded"}``."""

RequestHandler = Callable[[RequestMessage], Awaitable[Mapping[str, Any]]]


class Host(Gate, Protocol):
    """What a request server uses of its bus (``swarmbus.Bus``)."""

    nc: Connection

    def _check_max_payload(self, data: bytes, headers: Mapping[str, str]) -> None: ...

    def _consumer_span(
        self, msg: Msg, message_id: str, session: str, agent: str
    ) -> contextlib.AbstractContextManager[Span | None]: ...


class RequestServer:
    """Answers ``capability`` requests for ``agent`` with ``handler``."""

    def __init__(
        self,
        host: Host,
        capability: str,
        handler: RequestHandler,
        *,
        agent: str,
        limiter: anyio.Semaphore,
        task_group: anyio.abc.TaskGroup,
    ) -> None:
        # Its answers go to <reply subject>.<agent> unchecked (publish_nowait).
        subjects.validate_agent_id(agent)
        self._host = host
        self._capability = capability
        self._handler = handler
        self._agent = agent
        self._limiter = limiter
        self._task_group = task_group
        self._pending: collections.deque[tuple[Msg, RequestMessage, str | None]] = (
            collections.deque()
        )
        self.max_queued = MAX_QUEUED
        self._overloads = 0
        # Drain tasks alive; those readied but not yet running; those parked (each
        # waits on its future: True = work, False = leave).
        self._alive = 0
        self._ready = 0
        self._parked: list[asyncio.Future[bool]] = []
        self._closed = False
        self._subs: list[Subscription] = []
        self._loop = asyncio.get_running_loop()

    async def start(self) -> RequestServer:
        """Subscribe; returns once the server knows the subscriptions."""
        nc, capability = self._host.nc, self._capability
        for target, queue in (
            (subjects.ANY, f"swarmbus.cap.{capability}"),
            (self._agent, f"swarmbus.agent.{subjects.safe_token(self._agent)}"),
        ):
            delivery = InlineDelivery(self._take)
            self._subs.append(
                await delivery.subscribe(nc, subjects.request_filter(capability, target), queue)
            )
        # The server must know the subscriptions before callers are told we are serving.
        # nats-py writes a flush's PING straight to the socket, ahead of the queued SUBs:
        # only the second round trip follows them (else an early request now and then
        # found "no responders").
        for _ in range(2):
            await nc.flush()
        return self

    async def unsubscribe(self) -> None:
        """Stop taking requests; the parked drain leaves (those taken are answered)."""
        self._closed = True
        for waiter in self._parked:
            waiter.set_result(False)
        self._parked.clear()
        for sub in self._subs:
            with contextlib.suppress(TransportError):
                await sub.unsubscribe()

    def _take(self, msg: Msg) -> Later | None:
        """Queue a request for the drains, in the connection's read loop
        (``InlineDelivery``); returns the refusal of bad input, to await."""
        reply = msg.reply
        try:
            to = answer_subject(reply, self._agent, msg.subject) if reply else None
        except InvalidMessageError as exc:
            # Nobody who asked can read an answer.
            return functools.partial(self._refuse, msg, exc, None)
        try:
            message = self._host.accept(msg.subject, msg.data)
            assert isinstance(message, RequestMessage)
        except InvalidMessageError as exc:
            return functools.partial(self._refuse, msg, exc, to)
        if len(self._pending) >= self.max_queued:
            return functools.partial(self._overloaded, message, to)
        self._pending.append((msg, message, to))
        if not self._ready and (self._parked or not self._alive or self._limiter.value):
            self._more()
        return None

    async def _overloaded(self, message: RequestMessage, to: str | None) -> None:
        """Answer a request that found the queue full: the requester hears it now."""
        self._overloads += 1
        if self._overloads % 1000 == 1:  # the first, then one line per 1,000
            log.warning(
                "%s: %d requests waiting, %d refused as overloaded",
                self._agent,
                self.max_queued,
                self._overloads,
            )
        if to:
            reason = f"{self.max_queued} requests already waiting for {self._agent}"
            answer = failure(
                message.id, message.source.session, "overloaded", reason, agent=self._agent
            )
            await self._answer(to, answer)

    async def _answer(self, to: str, answer: Message) -> None:
        """Publish an answer made without a handler (a lost one: the requester times out)."""
        with contextlib.suppress(TransportError):
            await self._host.nc.publish(to, encode(answer))

    async def _refuse(self, msg: Msg, exc: InvalidMessageError, to: str | None) -> None:
        """Report bad input; answer it on ``to``: the requester is waiting, tell it now,
        not by its timeout."""
        await self._host.reject(
            subject=msg.subject,
            data=msg.data,
            code=exc.code,
            reason=exc.reason,
            receiver=self._agent,
        )
        if to:
            await self._answer(to, refusal(msg.subject, msg.data, exc, agent=self._agent))

    def _more(self) -> None:
        """Ready one more drain: wake the parked one, else start one."""
        self._ready += 1
        if self._parked:
            self._parked.pop().set_result(True)
            return
        self._alive += 1
        self._task_group.start_soon(self._drain)

    async def _drain(self) -> None:
        pending = self._pending
        try:
            while True:
                self._ready -= 1
                while pending:
                    item = pending.popleft()
                    if pending and not self._ready and self._limiter.value > 1:
                        self._more()
                    await self._respond(*item)
                if self._closed or len(self._parked) >= MAX_PARKED or not await self._park():
                    return
        finally:
            self._alive -= 1

    async def _park(self) -> bool:
        """Wait for the next request (True) or ``unsubscribe`` (False)."""
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._parked.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter in self._parked:
                self._parked.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.result():
                self._ready -= 1  # woken for work it will not do
            raise

    async def _respond(self, msg: Msg, request: RequestMessage, to: str | None) -> None:
        """Run the handler on ``request``; publish its answer to ``to`` (if any)."""
        host, agent = self._host, self._agent
        session = request.source.session
        limiter = self._limiter
        try:
            limiter.acquire_nowait()  # no checkpoint when a slot is free (the hot path)
        except anyio.WouldBlock:
            await limiter.acquire()
        try:
            span = host._consumer_span(msg, request.id, session, agent)
            # Report inside the span: the error event joins the request's trace.
            with span as current:
                try:
                    result = await self._handler(request)
                    response = Response(
                        request_id=request.id, status="success", result=dict(result)
                    )
                    # Encode here: a result that is not JSON, or too large to send, is
                    # the handler's error.
                    reply = ResponseMessage(
                        id=new_id(),
                        timestamp=now(),
                        source=source_of(agent, session),
                        response=response,
                    )
                    data = encode(reply)
                    if len(data) > host.nc.max_payload:
                        host._check_max_payload(data, _NO_HEADERS)
                except Exception as exc:  # noqa: BLE001 - answered, dead-lettered, logged
                    record_failure(current, exc)
                    data = await self._failed(msg, request, exc)
            if to and not publish_nowait(host.nc, to, data):
                with contextlib.suppress(TransportError):
                    await host.nc.publish(to, data)
        finally:
            limiter.release()

    async def _failed(self, msg: Msg, request: RequestMessage, exc: Exception) -> bytes:
        """Dead-letter a request whose handler failed; returns the failure response."""
        log.exception("request handler %s failed", self._capability)
        response = Response(
            request_id=request.id,
            status="failure",
            result={"error": f"{type(exc).__name__}: {exc}"},
        )
        await self._host.reject(
            subject=msg.subject,
            data=msg.data,
            code="handler_error",
            reason=str(response.result["error"]),
            receiver=self._agent,
            dedupe_key=request.id,
            message_id=request.id,
        )
        reply = envelope_for(response, agent=self._agent, session=request.source.session)
        return encode(reply)


def refusal(subject: str, data: bytes, exc: InvalidMessageError, *, agent: str) -> Message:
    """The failure ``response`` to a request that was refused before any handler ran.

    ``request_id`` is the request's id if it has a usable one, else ``unknown``; the
    result carries the refusal's ``code`` and ``reason`` (CONTRACT "Bad input").
    """
    try:
        raw = json.loads(data)
        request_id = raw["id"] if isinstance(raw, dict) else None
    except (ValueError, UnicodeDecodeError):
        request_id = None
    if not isinstance(request_id, str) or not 0 < len(request_id) <= subjects.MAX_ID_LENGTH:
        request_id = subjects.UNKNOWN
    parsed = subjects.parse_request_subject(subject)
    session = parsed[2] if parsed else subjects.UNKNOWN
    try:
        subjects.validate_session_id(session)
    except InvalidIdentifierError:
        session = subjects.UNKNOWN
    return failure(request_id, session, exc.code, exc.reason, agent=agent)


def failure(request_id: str, session: str, code: str, reason: str, *, agent: str) -> Message:
    """A ``response`` of status ``failure``: ``{"error": code, "reason": reason}``."""
    body = Response(
        request_id=request_id, status="failure", result={"error": code, "reason": reason}
    )
    return envelope_for(body, agent=agent, session=session)
