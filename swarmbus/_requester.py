"""The requester: ``Bus.request``'s replies, each checked for who sent it.

NATS stamps no verified sender on a message, and any agent that may read a capability's
requests may also answer one (``allow_responses``): a plain reply inbox cannot tell the
real responder from an agent that answered first in its name. So a swarmbus request
names a reply subject only its requester may subscribe to, and the responder publishes
its answer to that subject with its own agent id appended, a token the deploy
permissions bind to the responder (CONTRACT.md, "Verified replies")::

    request reply subject   swarmbus.reply.<requester>.<inbox>.<request id>
    the answer goes to      swarmbus.reply.<requester>.<inbox>.<request id>.<responder>

``<inbox>`` is random per bus (one subscription per requester agent and bus,
``swarmbus.reply.<requester>.<inbox>.>``). An answer is accepted only if its responder
token is its envelope's ``source.agent``, is the request's ``to`` when the request
targeted one agent, and its ``request_id`` and session are the request's; anything
else is dropped and reported (``Bus.reject``: dead letter and ``agent.error.occurred``),
and the request keeps waiting for a valid answer. On the reply subject itself (no
responder token) only the server's "no responders" status is read.

One bus-wide map of pending requests and their deadlines (a loop timer per 10 ms of
deadlines, cheaper than ``asyncio.wait_for``): no task, header or copy per request
beyond what the answer needs. The request is queued on the connection with
``publish_nowait`` and answers are checked where nats-py reads them
(``swarmbus._jetstream.hotpath``): a valid one settles its request from the read loop,
a refused one is counted there and reported from the reply subscription's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio

from swarmbus import _subjects as subjects
from swarmbus._errors import (
    InvalidMessageError,
    NoResponderError,
    PermissionDeniedError,
    RequestTimeoutError,
)
from swarmbus._jetstream.delivery import (
    NO_RESPONDERS_STATUS,
    Connection,
    Msg,
    Subscription,
    TransportError,
)
from swarmbus._jetstream.errors import denied, transport_error
from swarmbus._jetstream.headers import STATUS
from swarmbus._jetstream.hotpath import InlineDelivery, Later, publish_nowait
from swarmbus._messages import (
    Gate,
    Request,
    RequestMessage,
    ResponseMessage,
    decode,
    encode,
    new_id,
    now,
    source_of,
    validate_body,
)
from swarmbus._refusals import Refusals
from swarmbus._telemetry import producer_span, tracing_enabled

if TYPE_CHECKING:
    from opentelemetry.trace import Span

REPLY_ROOT: Final = "swarmbus.reply"
"""First tokens of every verified reply subject."""
_REPLY_PREFIX: Final = f"{REPLY_ROOT}."
_REPLY_TOKENS: Final = 5
#: A plain reply subject is an inbox: every NATS client's default ``_INBOX.``, the deploy
#: configs' ``_INBOX_<agent>.``. NATS lets a responder publish once to the reply subject
#: of any message it received (``allow_responses``), whatever its own grants: answering
#: anywhere else would let a requester write through the responder (a KV key, a
#: JetStream API call) where the requester may not.
INBOX_PREFIXES: Final = ("_INBOX.", "_INBOX_")
"""Tokens of a request's reply subject (the answer has one more: the responder)."""
_NO_SPAN: Final = contextlib.nullcontext()
_GRAIN: Final = 0.01
"""Seconds of request deadlines that share one loop timer."""
MAX_REPORTS: Final = 8
"""Refused answers reported per request (the rest are only counted)."""

WRONG_RESPONDER: Final = "wrong_responder"
WRONG_REQUEST: Final = "wrong_request"


class Host(Gate, Protocol):
    """What a requester uses of its bus (``swarmbus.Bus``)."""

    nc: Connection
    max_message_bytes: int
    _refusals: Refusals

    def _check_max_payload(self, data: bytes, headers: Mapping[str, str]) -> None: ...

    async def _live_subscribe(
        self, subject: str, cb: Callable[[Msg], Awaitable[None]]
    ) -> Subscription: ...


class _Refused(Exception):
    """The server refused a pending request's subject."""


class _Pending:
    """One request waiting for its answer."""

    __slots__ = ("agent", "future", "refused", "session", "to")

    def __init__(
        self, future: asyncio.Future[ResponseMessage], agent: str, to: str, session: str
    ) -> None:
        self.future = future
        self.agent = agent
        self.to = to
        self.session = session
        self.refused: list[str] = []

    def cancel(self) -> None:
        """The server refused the request's subject (``Refusals.watch``)."""
        if not self.future.done():
            self.future.set_exception(_Refused())


# Subjects of a long-lived agent repeat: validate and build each once.
_request_subject = functools.lru_cache(maxsize=4096)(subjects.request_subject)
_lower = functools.lru_cache(maxsize=4096)(str.lower)


@functools.lru_cache(maxsize=4096)
def _check_route(capability: str, to: str) -> None:
    """Validate a request's ``to`` and ``capability`` against the body schema, once each.

    They are the only constrained fields of a ``Request`` (``parameters`` is any JSON
    object, checked by encoding it), so the body's encode/decode round trip is done once
    per route; a failure raises and is not cached.
    """
    validate_body(Request(to=to, capability=capability))


def _producer_span(
    subject: str,
    message_id: str,
    session: str,
    agent: str,
    headers: dict[str, str],
    capability: str,
) -> contextlib.AbstractContextManager[Span | None]:
    """The PRODUCER span of a request (a no-op when tracing is off)."""
    if not tracing_enabled():
        return _NO_SPAN
    attributes = {
        "swarmbus.session": session,
        "swarmbus.agent": agent,
        "swarmbus.capability": capability,
    }
    return producer_span(subject, message_id, attributes, headers)


class _Deadlines:
    """The timeouts of pending requests: one loop timer per ``_GRAIN`` seconds of
    deadlines, not one per request (a timer is a heap push, and a cancelled one a
    heap entry until it would have fired). A deadline is rounded up to the grain."""

    def __init__(self) -> None:
        self._slots: dict[int, set[asyncio.Future[ResponseMessage]]] = {}

    def add(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[ResponseMessage], after: float
    ) -> int:
        """Fail ``future`` with ``TimeoutError`` ``after`` seconds from now; returns its slot."""
        slot = math.ceil((loop.time() + after) / _GRAIN)
        futures = self._slots.get(slot)
        if futures is None:
            futures = self._slots[slot] = set()
            loop.call_at(slot * _GRAIN, self._expire, slot)
        futures.add(future)
        return slot

    def remove(self, slot: int, future: asyncio.Future[ResponseMessage]) -> None:
        futures = self._slots.get(slot)
        if futures is not None:
            futures.discard(future)

    def _expire(self, slot: int) -> None:
        for future in self._slots.pop(slot, ()):
            if not future.done():
                future.set_exception(TimeoutError())


def check_inbox(reply: str) -> None:
    """Refuse a plain reply subject that is no inbox (``INBOX_PREFIXES``).

    Raises:
        InvalidMessageError: ``wrong_subject``.
    """
    if not reply.startswith(INBOX_PREFIXES) or "*" in reply or ">" in reply:
        raise InvalidMessageError(
            "wrong_subject",
            f"reply subject {reply!r} is no inbox (_INBOX.<...> or _INBOX_<agent>.<...>) "
            f"and no verified reply subject ({REPLY_ROOT}.<requester>...): not answered",
        )


def answer_subject(reply: str, agent: str, subject: str) -> str:
    """Where responder ``agent`` publishes its answer to the request on ``subject``.

    ``reply`` with ``.<agent>`` appended for a verified reply subject, ``reply`` itself
    for any other (a plain inbox: a client that does not verify).

    Raises:
        InvalidMessageError: ``wrong_subject``, a ``swarmbus.reply.`` subject of the
            wrong shape, or naming another requester than the request subject's last
            token (bound by permissions): answers go only to who asked; or a reply
            subject that is no inbox (``INBOX_PREFIXES``).
    """
    if not reply.startswith(_REPLY_PREFIX):
        check_inbox(reply)
        return reply
    tokens = reply.split(".")
    if len(tokens) != _REPLY_TOKENS or "*" in reply or ">" in reply:
        raise InvalidMessageError("wrong_subject", f"malformed reply subject {reply!r}")
    if subject.rpartition(".")[2] != tokens[2]:
        raise InvalidMessageError(
            "wrong_subject", f"a request on {subject} asks for replies to {tokens[2]}"
        )
    return f"{reply}.{agent}"


class Requester:
    """The pending requests of one bus and their reply subscriptions."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._inbox = secrets.token_hex(8)
        # requester agent id -> its reply subject prefix (subscribed)
        self._prefixes: dict[str, str] = {}
        self._subscribing = anyio.Lock()
        # request id -> the request waiting for its answer
        self._pending: dict[str, _Pending] = {}
        self._deadlines = _Deadlines()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(
        self,
        capability: str,
        parameters: Mapping[str, Any] | None,
        *,
        agent: str,
        session: str,
        to: str,
        timeout: float,
    ) -> ResponseMessage:
        """Send one request and wait for its verified answer (``Bus.request``).

        Raises:
            InvalidIdentifierError, InvalidMessageError: before anything is sent.
            NoResponderError, RequestTimeoutError, PermissionDeniedError, ConnectionError.
        """
        _check_route(capability, to)
        body = Request(to=to, capability=capability, parameters=dict(parameters or {}))
        # The envelope built directly (envelope_for's lookups cost a few us a request).
        message = RequestMessage(
            id=new_id(), timestamp=now(), source=source_of(agent, session), request=body
        )
        subject = _request_subject(capability, to, session, agent)
        # No Nats-Msg-Id: nothing de-duplicates a core request (CONTRACT "Verified
        # replies"); headers only carry a trace context, when tracing is on.
        headers: dict[str, str] = {}
        span = (
            _producer_span(subject, message.id, session, agent, headers, capability)
            if tracing_enabled()
            else _NO_SPAN
        )
        with span:
            data = encode(message)
            host = self._host
            if headers or len(data) > host.nc.max_payload:
                host._check_max_payload(data, headers)
            prefix = self._prefixes.get(agent) or await self._subscribe(agent, capability)
            # The bus's loop, once: asyncio.get_running_loop() checks the process id
            # (a system call) on every call in Python 3.11.
            loop = self._loop or self._bind_loop()
            future: asyncio.Future[ResponseMessage] = loop.create_future()
            pending = self._pending[message.id] = _Pending(future, agent, to, session)
            slot = self._deadlines.add(loop, future, timeout)
            # A refusal of the subject (an asynchronous -ERR) fails the future.
            key = _lower(subject)
            refusal = host._refusals.watch(key, pending)
            try:
                reply = prefix + message.id
                if headers or not publish_nowait(host.nc, subject, data, reply):
                    await host.nc.publish(subject, data, reply=reply, headers=headers or None)
                return await future
            except _Refused:
                raise denied(f"request {capability}", subject) from None
            except NoResponderError:
                raise NoResponderError(capability, to) from None
            except TimeoutError:
                raise RequestTimeoutError(capability, to, timeout, pending.refused) from None
            except TransportError as exc:
                raise transport_error(exc, f"request {capability}") from exc
            finally:
                host._refusals.unwatch(key, refusal)
                self._deadlines.remove(slot, future)
                del self._pending[message.id]

    async def _subscribe(self, agent: str, capability: str) -> str:
        """Subscribe to ``agent``'s replies on this bus; returns its reply prefix.

        Raises:
            PermissionDeniedError: this user may not read ``agent``'s replies (it is
                another agent, or the deploy config predates verified replies).
        """
        async with self._subscribing:
            prefix = self._prefixes.get(agent)
            if prefix is not None:
                return prefix
            prefix = f"{REPLY_ROOT}.{agent}.{self._inbox}."
            delivery = InlineDelivery(self._take_reply)
            try:
                sub = await self._host._live_subscribe(f"{prefix}>", delivery.run_later)
                delivery.attach(sub)
            except PermissionDeniedError as exc:
                raise PermissionDeniedError(
                    f"request {capability} as {agent}: cannot read its replies ({exc})"
                ) from exc
            self._prefixes[agent] = prefix
            return prefix

    def _take_reply(self, msg: Msg) -> Later | None:
        """Settle the request ``msg`` answers, in the connection's read loop
        (``InlineDelivery``); returns the report of an answer refused, to await."""
        tokens = msg.subject.split(".")
        pending = self._pending.get(tokens[4]) if len(tokens) > _REPLY_TOKENS - 1 else None
        if pending is None or pending.future.done() or tokens[2] != pending.agent:
            return None  # late (the request timed out) or for no request of ours
        if len(tokens) == _REPLY_TOKENS:
            if msg.headers and msg.headers.get(STATUS) == NO_RESPONDERS_STATUS and not msg.data:
                pending.future.set_exception(NoResponderError("", ""))
                return None
            return self._refuse(
                pending, msg, WRONG_RESPONDER, "no responder id after the reply subject"
            )
        try:
            response = decode(msg.data, max_bytes=self._host.max_message_bytes)
        except InvalidMessageError as exc:
            return self._refuse(pending, msg, exc.code, exc.reason)
        problem = _problem(response, tokens, pending)
        if problem is not None:
            return self._refuse(pending, msg, *problem)
        assert isinstance(response, ResponseMessage)
        pending.future.set_result(response)
        return None

    def _refuse(self, pending: _Pending, msg: Msg, code: str, reason: str) -> Later | None:
        """Drop an answer that is not the request's; the report of one of the first few.

        The refusal is counted at once (the request may time out listing it); the
        report is awaited after, in the reply subscription's task.
        """
        pending.refused.append(f"{code}: {reason}")
        if len(pending.refused) > MAX_REPORTS:
            return None
        return functools.partial(
            self._host.reject,
            subject=msg.subject,
            data=msg.data,
            code=code,
            reason=reason,
            receiver=pending.agent,
            session=pending.session,
        )


def _problem(response: object, tokens: list[str], pending: _Pending) -> tuple[str, str] | None:
    """Why ``response`` on a subject of ``tokens`` is not the answer ``pending`` waits
    for (a refusal code and reason), or None if it is."""
    if not isinstance(response, ResponseMessage):
        return "wrong_subject", f"expected a response, got {type(response).__name__}"
    responder = ".".join(tokens[_REPLY_TOKENS:])
    source = response.source
    if source.agent != responder:
        return (
            "source_mismatch",
            f"a response from {source.agent} published by {responder}",
        )
    if pending.to != subjects.ANY and responder != pending.to:
        return WRONG_RESPONDER, f"answered by {responder}, the request was to {pending.to}"
    if response.response.request_id != tokens[4]:
        return (
            WRONG_REQUEST,
            f"answers request {response.response.request_id}, not {tokens[4]}",
        )
    if source.session != pending.session:
        return "source_mismatch", f"a response in session {source.session}, not {pending.session}"
    return None
