"""The bus: one NATS connection, typed publish/subscribe, requests, durable consumers.

This is the transport boundary: nats-py types and exceptions stay in here and in the
JetStream layer (``swarmbus._jetstream``); callers see swarmbus types.

The bus's pieces:

- ``Bus`` (here): connection lifecycle, publish (acked, or through the outbox),
  request, live subscriptions, the contract check of what arrives (``accept``) and the
  dead letter of what does not pass it (``reject``), streams and KV buckets;
- ``swarmbus._consumer``: the durable consumer (the receive loop of ``consume``) and the
  dispatch of one message to its handler inside a CONSUMER span;
- ``swarmbus._request_server``: answering one capability's requests;
- ``swarmbus._refusals``: the server's asynchronous permission refusals;
- ``swarmbus._jetstream``: ``outbox`` (confirmed background publishes), ``streams``
  (provisioning), ``delivery`` (durable pulls and what a receive loop touches).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import anyio
import anyio.lowlevel
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from swarmbus import _subjects as subjects
from swarmbus._backends import close_stores
from swarmbus._config import Settings
from swarmbus._consumer import DurableConsumer, Handler, LiveHandler, Route, Routes, RouteSet
from swarmbus._errors import (
    ConnectionError,
    InvalidIdentifierError,
    InvalidMessageError,
    MessageTooLargeError,
    PermissionDeniedError,
    PublishError,
    SwarmbusError,
)
from swarmbus._jetstream.acks import StoredPublisher
from swarmbus._jetstream.delivery import PullConsumer, PullOptions
from swarmbus._jetstream.errors import check_payload
from swarmbus._jetstream.errors import translate as _translate
from swarmbus._jetstream.errors import transport_error as _transport_error
from swarmbus._jetstream.headers import CODE as CODE_HEADER
from swarmbus._jetstream.headers import EMPTY_HEADERS as _EMPTY_HEADERS
from swarmbus._jetstream.headers import MSG_ID as MSG_ID_HEADER
from swarmbus._jetstream.headers import ORIGINAL_SUBJECT as ORIGINAL_SUBJECT_HEADER
from swarmbus._jetstream.headers import REASON as REASON_HEADER
from swarmbus._jetstream.hotpath import SafeHeaders
from swarmbus._jetstream.outbox import Outbox
from swarmbus._jetstream.retry import RetryingJetStream
from swarmbus._jetstream.streams import ensure_stream, open_key_value
from swarmbus._messages import (
    Body,
    ErrorOccurred,
    Message,
    RequestMessage,
    ResponseMessage,
    Source,
    decode,
    encode,
    envelope_for,
    event_of,
    validate_body,
)
from swarmbus._observe._instruments import record_published
from swarmbus._refusals import Refusals
from swarmbus._request_server import RequestHandler, RequestServer
from swarmbus._requester import Requester
from swarmbus._server import check_version
from swarmbus._telemetry import consumer_span, producer_span, tracing_enabled

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("swarmbus")

EVENTS_STREAM: Final = "SWARMBUS_EVENTS"
DEAD_LETTER_STREAM: Final = "SWARMBUS_DEAD"
HANDLER_ERROR: Final = "handler_error"
_ERROR_EVENTS: Final = f"{subjects.EVENT_ROOT}.error.occurred."
"""Subject prefix of ``agent.error.occurred`` events (no report is made about them)."""
"""The refusal code of a message a receiver's handler failed on (not bad input)."""
# Hot-path helpers: subjects of a long-lived agent repeat, so validate and build each once;
# with tracing off, skip building span attributes and entering a generator context.
# (Requests: swarmbus._requester.)
_event_subject = functools.lru_cache(maxsize=4096)(subjects.event_subject)
_NO_SPAN: Final = contextlib.nullcontext()
#: The header block of a publish carrying only its Nats-Msg-Id, but the id (at most 4
#: bytes a character in UTF-8).
_ID_HEADER_ROOM: Final = len(_EMPTY_HEADERS) + len(f"{MSG_ID_HEADER}: \r\n")


@dataclass(frozen=True)
class Delivery:
    """A received message with its transport facts."""

    message: Message
    subject: str
    headers: Mapping[str, str]


def _consumer_span(
    msg: Msg, message_id: str, session: str, agent: str
) -> contextlib.AbstractContextManager[Span | None]:
    """The CONSUMER span of ``agent`` handling ``msg`` (a no-op when tracing is off)."""
    if not tracing_enabled():
        return _NO_SPAN
    attributes = {"swarmbus.session": session, "swarmbus.agent": agent}
    return consumer_span(msg.subject, message_id, attributes, msg.headers)


def _on_its_subject(subject: str, message: Message) -> Message:
    """``message`` if it belongs on ``subject`` (CONTRACT "Bad input"), else raise.

    Raises:
        InvalidMessageError: with ``code`` saying why.
    """
    source = message.source
    # Requests first: they are the hot path of a request server (a few us a request).
    request = subjects.parse_request_subject(subject)
    if request is not None:
        capability, target, session, agent = request
        _check_source(source, session, agent, subject)
        if not isinstance(message, RequestMessage):
            raise InvalidMessageError("wrong_subject", f"expected a request on {subject}")
        body = message.request
        if (body.capability, body.to) != (capability, target):
            raise InvalidMessageError(
                "wrong_subject",
                f"a request for {body.capability} to {body.to} does not belong on {subject}",
            )
        return message
    event = subjects.parse_event_subject(subject)
    if event is not None:
        domain, name, session, agent = event
        _check_source(source, session, agent, subject)
        if event_of(message) != (domain, name):
            raise InvalidMessageError(
                "wrong_subject", f"a {message.type} message does not belong on {subject}"
            )
        return message
    if subject.startswith((f"{subjects.EVENT_ROOT}.", f"{subjects.REQUEST_ROOT}.")):
        raise InvalidMessageError("wrong_subject", f"{subject} is not a contract subject")
    return message


def _check_source(source: Source, session: str, agent: str, subject: str) -> None:
    """Refuse a message whose source is not the session and agent its subject names."""
    if (session, agent) != (source.session, source.agent):
        raise InvalidMessageError(
            "source_mismatch",
            f"source {source.agent}@{source.session} does not match subject {subject}",
        )


def _producer_span(
    subject: str, message_id: str, session: str, agent: str, headers: dict[str, str]
) -> contextlib.AbstractContextManager[Span | None]:
    """The PRODUCER span of a publish (a no-op when tracing is off)."""
    if not tracing_enabled():
        return _NO_SPAN
    attributes = {"swarmbus.session": session, "swarmbus.agent": agent}
    return producer_span(subject, message_id, attributes, headers)


class _ConnectionEvents:
    """The connection's callbacks; they reach the bus once it exists."""

    def __init__(self) -> None:
        self.bus: Bus | None = None

    async def on_reconnect(self) -> None:
        if self.bus is not None:
            self.bus.reconnected.set()
            # Wake every receive loop: its open pull went with the old connection.
            signal, self.bus.reconnect_signal = self.bus.reconnect_signal, anyio.Event()
            signal.set()

    async def on_error(self, exc: Exception) -> None:
        if not (self.bus is not None and self.bus._refused(str(exc))):
            log.log(logging.DEBUG if isinstance(exc, OSError) else logging.WARNING, "nats: %s", exc)


def _connect_options(settings: Settings, events: _ConnectionEvents) -> dict[str, Any]:
    """nats-py's connect options for ``settings`` (those left None are not given).

    Raises:
        ConnectionError: a TLS file cannot be loaded.
    """
    options: dict[str, Any] = {
        "servers": settings.servers,
        "name": settings.name,
        "connect_timeout": settings.connect_timeout,
        # Fail fast on the first connect; reconnect forever once connected.
        "max_reconnect_attempts": 2,
        "reconnect_time_wait": 0.5,
        "reconnected_cb": events.on_reconnect,
        "error_cb": events.on_error,
        "user": settings.user,
        "password": settings.password,
        "token": settings.token,
        "user_credentials": settings.creds_file,
        "nkeys_seed": settings.nkey_seed_file,
    }
    if settings.inbox_prefix:
        options["inbox_prefix"] = settings.inbox_prefix
    if settings.tls_ca_file or settings.tls_cert_file:
        import ssl

        try:
            ctx = ssl.create_default_context(cafile=settings.tls_ca_file)
            if settings.tls_cert_file:
                ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        except OSError as exc:  # ssl.SSLError is one; neither names the file
            files = (settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
            named = ", ".join(f for f in files if f)
            raise ConnectionError(f"cannot load TLS files {named}: {exc}") from exc
        options["tls"] = ctx
    return {k: v for k, v in options.items() if v is not None}


class Bus:
    """A connection to NATS speaking the swarmbus wire contract.

    Use ``async with await Bus.connect(...) as bus`` or ``async with Bus.open(...)``.
    """

    # The CONSUMER span of a handler (request server, durable consumer, subscription).
    _consumer_span = staticmethod(_consumer_span)

    def __init__(self, nc: NatsClient, settings: Settings) -> None:
        self.nc = nc
        self._refusals = Refusals()
        # Raises PermissionDeniedError if the server refuses a subject during the block
        # (NATS answers with an asynchronous -ERR, not on the operation itself).
        self._permission_guard = self._refusals.guard
        self.js: JetStreamContext = RetryingJetStream(
            nc,
            timeout=settings.request_timeout,
            retry_for=settings.retry_for,
            guard=self._permission_guard,
        )
        self.settings = settings
        self.max_message_bytes = settings.max_message_bytes
        self.acts_for_agents = False  # set by a broker: the runtime API (see act_as)
        self.reconnected = asyncio.Event()
        # Set at the next reconnect (then replaced): receive loops re-issue their pulls.
        self.reconnect_signal = anyio.Event()
        self.outbox = Outbox(nc)
        self._stored = StoredPublisher(nc, self._refusals.interrupting, settings)
        self._buckets: dict[str, KeyValue] = {}
        self._requester = Requester(self)

    # --- lifecycle --------------------------------------------------------------

    @classmethod
    async def connect(
        cls, settings: Settings | None = None, *, provision: bool = True, **overrides: Any
    ) -> Bus:
        """Connect to ``settings.url`` (default: ``NATS_URL``) and provision streams.

        Raises:
            ConnectionError: no server answered.
            ServerVersionError: the server is older than 2.11.
        """
        settings = _with_overrides(settings, overrides)
        if not settings.servers:
            raise ConnectionError(
                "no NATS URL: set NATS_URL or pass url=... "
                "(swarmbus.connect() starts an embedded server)"
            )
        events = _ConnectionEvents()
        options = _connect_options(settings, events)
        try:
            nc = await nats.connect(**options)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise ConnectionError(f"cannot connect to {settings.url}: {exc}") from exc
        _prepare(nc)
        bus = events.bus = cls(nc, settings)
        try:
            check_version(nc._server_info.get("version", "0.0.0"))
            if not nc._server_info.get("jetstream"):
                raise ConnectionError(f"{settings.url} has JetStream disabled; swarmbus needs it")
            if provision:
                await bus.ensure_streams()
        except BaseException:
            await nc.close()
            raise
        return bus

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings | None = None, **overrides: Any) -> AsyncIterator[Bus]:
        """``async with Bus.open() as bus``: connect, then drain and close on exit."""
        bus = await cls.connect(settings, **overrides)
        try:
            yield bus
        finally:
            await bus.close()

    async def close(self) -> None:
        """Flush and close the connection (pending publishes are sent first)."""
        await close_stores(self)  # a Redis client / PostgreSQL pool of SWARM_BACKEND
        if self.nc.is_closed:  # closed underneath (a fatal server error): no ack can come
            await self.outbox.close(timeout=0)
            return
        # Ride through what a waited-for publish rides through (a leader election).
        await self.outbox.close(timeout=max(self.settings.request_timeout, self.settings.retry_for))
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await self.nc.drain()
        await self.nc.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def server_version(self) -> str:
        """Version of the server this bus is connected to."""
        return str(self.nc._server_info.get("version", ""))

    # --- permissions ----------------------------------------------------------------

    def act_as(self, agent: str) -> str:
        """Return ``agent`` if this connection may act as it, else raise.

        Under the deploy auth config each agent connects as a NATS user named by its
        agent id (``ops/deploy-validator``); such a connection acts only as that agent.
        NATS enforces this for events and requests (subject permissions) but not for
        the content of KV records (a task's ``assigned_to``): swarmbus checks it here
        before writing one.

        A broker (``acts_for_agents``, set by the runtime API server) acts for any agent:
        the API subject, which only that agent may publish on, names the requester.

        Raises:
            PermissionDeniedError: the user is another agent; nothing was written.
        """
        subjects.validate_agent_id(agent)
        user = self.settings.user
        if user and "/" in user and user != agent and not self.acts_for_agents:
            raise PermissionDeniedError(f"connected as agent {user}, cannot act as {agent}")
        return agent

    def _refused(self, error: str) -> bool:
        """Wake the operations waiting on a subject the server just refused."""
        subject, waited = self._refusals.wake(error)
        dropped = subject is not None and self.outbox.refused(subject, error)
        return waited or dropped

    # --- streams ----------------------------------------------------------------

    def _storage(self) -> StorageType:
        return StorageType.FILE if self.settings.storage == "file" else StorageType.MEMORY

    async def ensure_stream(self, config: StreamConfig) -> None:
        """Create a stream, or update it to ``config`` if it exists (idempotent).

        A user without stream-create permission (an agent under the deploy auth config)
        uses the stream as provisioned by the service account, if it exists.
        """
        await ensure_stream(self.js, config, self._permission_guard)

    async def ensure_streams(self) -> None:
        """Provision the event stream (every ``agent.>`` event) and the dead-letter stream."""
        await self.ensure_stream(
            StreamConfig(
                name=EVENTS_STREAM,
                subjects=[subjects.EVENTS_WILDCARD],
                storage=self._storage(),
                num_replicas=self.settings.replicas,
                max_age=self.settings.event_max_age,
                max_bytes=self.settings.event_max_bytes,
                # The server's default (1,000 consumers a stream) would cap the agent ids.
                max_consumers=self.settings.event_max_consumers,
                duplicate_window=120.0,
                discard=DiscardPolicy.OLD,
            )
        )
        await self.ensure_stream(
            StreamConfig(
                name=DEAD_LETTER_STREAM,
                subjects=[subjects.DEAD_LETTER_WILDCARD],
                storage=self._storage(),
                num_replicas=self.settings.replicas,
                # Bounded whatever arrives: bad input is dead-lettered, and anyone can
                # send bad input. Each dead letter is at most max_payload bytes.
                max_age=self.settings.dead_letter_max_age,
                max_bytes=self.settings.dead_letter_max_bytes,
                discard=DiscardPolicy.OLD,
                duplicate_window=120.0,
            )
        )

    async def key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        ttl: float | None = None,
        max_value_size: int | None = None,
        limit_marker_ttl: float | None = None,
        description: str = "",
    ) -> KeyValue:
        """Open a KV bucket, creating it with swarmbus's replicas/storage if missing.

        Idempotent and safe when several processes race to create the same bucket.
        Per-key TTLs are always allowed (nats-server >= 2.11). Opened buckets are kept
        per bus, so callers on hot paths (a decision, a proposal) pay no round trip.
        """
        kv = self._buckets.get(bucket)
        if kv is None:
            config = KeyValueConfig(
                bucket=bucket,
                description=description or None,
                history=history,
                ttl=ttl,
                max_value_size=max_value_size,
                storage=self._storage(),
                replicas=self.settings.replicas,
                limit_marker_ttl=limit_marker_ttl,
            )
            kv = await open_key_value(self.js, config, self._permission_guard)
            self._buckets[bucket] = kv
        return kv

    # --- publish ------------------------------------------------------------------

    async def publish(
        self,
        body: Body,
        *,
        agent: str,
        session: str,
        id: str | None = None,
        headers: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> Message:
        """Publish ``body`` as ``agent`` in ``session``; returns the sent envelope.

        The event is stored in the event stream before this returns (JetStream ack),
        and de-duplicated by envelope id within the stream's duplicate window.
        With ``wait=False`` it returns once handed to the connection; the bus's outbox
        matches the ack in the background and re-sends (same id) until the stream has
        it, and ``close()`` waits for that: no round trip per event, no silent loss
        while the process lives (see ``swarmbus._outbox``).

        Raises:
            InvalidIdentifierError, InvalidMessageError: before anything is sent.
            PublishError / PermissionDeniedError: the server did not store it.
        """
        validate_body(body)
        message = envelope_for(body, agent=agent, session=session, id=id)
        await self.publish_message(message, headers=headers, wait=wait)
        return message

    async def publish_message(
        self, message: Message, *, headers: Mapping[str, str] | None = None, wait: bool = True
    ) -> None:
        """Publish an already-built event envelope on its contract subject."""
        event = event_of(message)
        if event is None:
            raise InvalidMessageError(
                "wrong_subject", f"{message.type} messages are sent with request(), not published"
            )
        subject = _event_subject(*event, message.source.session, message.source.agent)
        data = encode(message)
        # The server's max_payload (1 MiB by default) may be below max_message_bytes.
        limit = min(self.max_message_bytes, self.nc.max_payload)
        if len(data) > limit:
            raise MessageTooLargeError(len(data), limit)
        hdrs = {MSG_ID_HEADER: message.id, **headers} if headers else {MSG_ID_HEADER: message.id}
        span = _producer_span(
            subject, message.id, message.source.session, message.source.agent, hdrs
        )
        with span:
            if headers or len(data) + _ID_HEADER_ROOM + 4 * len(message.id) > self.nc.max_payload:
                self._check_max_payload(data, hdrs)  # else: the id header fits for sure
            try:
                if not wait:
                    await self.outbox.send(subject, data, hdrs)
                else:
                    await self._stored.publish(subject, data, hdrs)
            except nats.js.errors.APIError as exc:
                raise _translate(exc, f"publish to {subject} failed") from exc
            except nats.errors.NoRespondersError as exc:
                raise PublishError(f"no stream stores {subject}") from exc
            except nats.errors.MaxPayloadError as exc:  # the server's limit changed meanwhile
                raise MessageTooLargeError(len(data), self.nc.max_payload) from exc
            except (TimeoutError, nats.errors.Error) as exc:
                raise _transport_error(exc, f"publish to {subject}") from exc
        record_published(message)

    def _check_max_payload(self, data: bytes, headers: Mapping[str, str]) -> None:
        """Refuse a message whose payload and headers exceed the server's max_payload.

        The server counts the headers too, and answers a message over it by closing the
        connection (every subscription of this bus with it).
        """
        check_payload(data, headers, self.nc.max_payload)

    # --- receive ------------------------------------------------------------------

    def accept(self, subject: str, data: bytes) -> Message:
        """Decode ``data`` received on ``subject`` and check it against the subject.

        Raises:
            InvalidMessageError: with ``code`` saying why (CONTRACT "Bad input").
        """
        return _on_its_subject(subject, decode(data, max_bytes=self.max_message_bytes))

    async def reject(
        self,
        *,
        subject: str,
        data: bytes,
        code: str,
        reason: str,
        receiver: str,
        dedupe_key: str | None = None,
        message_id: str | None = None,
        session: str | None = None,
    ) -> None:
        """Dead-letter ``data`` and publish ``agent.error.occurred`` saying why.

        Bad input (any ``code`` but ``handler_error``) is the same for every receiver,
        so it is reported once per message, not once per receiver: its de-duplication
        key (``dedupe_key``, else a digest of the subject and bytes) leaves the receiver
        out, and the first receiver's report wins within the duplicate window. A
        handler's failure is its receiver's own and reported by each.

        Neither write is waited for (the bus's outbox re-sends each until stored): a
        flood of bad input must not stall the receive loop it arrives on behind one
        round trip per item, nor the good messages queued behind it.

        ``session``: where to report (default: the session token of ``subject``, or
        ``unknown``), for a subject that names none (a reply subject).

        Never raises: a failure to report is logged, so a worker keeps running.
        """
        session = session or _session_of(subject)
        reason = " ".join(reason.split())[:1000]
        headers = {
            REASON_HEADER: reason,
            CODE_HEADER: code,
            ORIGINAL_SUBJECT_HEADER: subject,
        }
        if code != HANDLER_ERROR:
            dedupe_key = dedupe_key or _digest(subject, data)
        elif dedupe_key:
            dedupe_key = f"{dedupe_key}:{receiver}"
        # Always an id: the outbox may send a dead letter twice.
        headers[MSG_ID_HEADER] = f"dead:{dedupe_key or uuid.uuid4()}"
        stored = False
        try:
            self._check_max_payload(data, headers)  # the server would close the connection
            await self.outbox.send(subjects.dead_letter_subject(session, receiver), data, headers)
            stored = True
        except (TimeoutError, nats.errors.Error, InvalidMessageError) as exc:
            log.error("could not dead-letter a message from %s: %s", subject, exc)
        if subject.startswith(_ERROR_EVENTS):
            # A report about a report: an error event that a handler failed on (or that
            # is malformed) is dead-lettered, but announcing it with another error event
            # would feed that same handler again, a loop that floods both streams.
            return
        try:
            await self.publish(
                ErrorOccurred(
                    code=code,
                    reason=reason,
                    subject=subject,
                    message_id=message_id,
                    dead_letter=stored,
                ),
                agent=receiver,
                session=session,
                # Deterministic (a redelivery's report is de-duplicated) and always a
                # valid envelope id, however long the rejected message's id was.
                id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"error:{dedupe_key}"))
                if dedupe_key
                else None,
                wait=False,
            )
        except SwarmbusError as exc:
            log.error("could not report a rejected message from %s: %s", subject, exc)

    async def subscribe(
        self,
        subject: str,
        handler: Handler,
        *,
        receiver: str,
        queue: str | None = None,
    ) -> NatsSubscription:
        """Live (core NATS) subscription with typed dispatch; bad input is rejected.

        Nothing published while not subscribed is seen; use ``consume`` for that.
        """
        return await self._live_subscribe(
            subject, LiveHandler(self, handler, receiver).on_msg, queue
        )

    async def _live_subscribe(
        self, subject: str, cb: Callable[[Msg], Awaitable[None]], queue: str | None = None
    ) -> NatsSubscription:
        """Subscribe ``cb``; returns once the server accepted (or refused) the subscription.

        Raises:
            PermissionDeniedError: the server refused it.
        """
        try:
            with self._permission_guard(subject, f"subscribe to {subject}", cancel=False):
                sub = await self.nc.subscribe(subject, queue=queue or "", cb=cb)
                # nats-py writes a flush's PING straight to the socket, ahead of the
                # queued SUB: only the second round trip follows the server's refusal.
                for _ in range(2):
                    await self.nc.flush(math.ceil(self.settings.request_timeout))
        except nats.errors.Error as exc:
            raise _transport_error(exc, f"subscribe to {subject}") from exc
        return sub

    async def consume(
        self,
        durable: str,
        filter_subjects: Sequence[str],
        handler: Handler,
        *,
        receiver: str,
        limiter: anyio.Semaphore,
        stop: anyio.Event,
        deliver_new: bool = True,
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a durable pull consumer until ``stop`` is set, then finish in-flight work.

        Each message is acked after its handler returns (at-least-once): a worker that
        dies mid-handler has the message redelivered after ``ack_wait``; a live one
        slower than that sends progress acks, so its message is not run twice meanwhile.
        The consumer expires ``consumer_inactive_threshold`` seconds after its last
        pull (a restart within that time resumes where it stopped).

        Raises:
            ConnectionError: the connection closed for good (a reconnect is waited for).
        """
        routes = Routes([Route("", tuple(filter_subjects), handler)])
        consumer = await _open_consumer(
            self, durable, routes, receiver, limiter, stop, deliver_new, ack_wait, max_deliver
        )
        task_status.started()
        await consumer.run()

    # --- request / response ---------------------------------------------------------

    async def request(
        self,
        capability: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        agent: str,
        session: str,
        to: str = subjects.ANY,
        timeout: float | None = None,
    ) -> ResponseMessage:
        """Ask one agent (``to``) or any agent with ``capability``; returns its response.

        The answer is verified (``swarmbus._requester``): its responder, bound by the
        server's permissions, is its ``source.agent`` and ``to`` (when not ``any``), and
        it answers this request. Anything else is dropped and reported
        (``agent.error.occurred``), and the request keeps waiting.

        Raises:
            NoResponderError: nobody listens for that capability/target.
            RequestTimeoutError: no valid answer in time (``refused`` lists the answers
                that came and were dropped).
        """
        timeout = timeout or self.settings.request_timeout
        return await self._requester.request(
            capability, parameters, agent=agent, session=session, to=to, timeout=timeout
        )

    async def serve_requests(
        self,
        capability: str,
        handler: RequestHandler,
        *,
        agent: str,
        limiter: anyio.Semaphore,
        task_group: anyio.abc.TaskGroup,
    ) -> list[RequestServer]:
        """Answer ``capability`` requests addressed to ``agent`` or to ``any``.

        Returns the server (in a list, as subscriptions are): its ``unsubscribe`` stops it.

        Raises:
            InvalidIdentifierError: ``agent`` is ``any``, which cannot be addressed (it
                would answer every request to ``any`` twice).
        """
        subjects.validate_name("capability", capability)
        if agent == subjects.ANY:
            raise InvalidIdentifierError(
                "agent id", agent, f"'{subjects.ANY}' is a request target, not an agent"
            )
        server = RequestServer(
            self, capability, handler, agent=agent, limiter=limiter, task_group=task_group
        )
        return [await server.start()]


async def consume_routes(
    bus: Bus,
    durable: str,
    routes: RouteSet,
    *,
    receiver: str,
    limiter: anyio.Semaphore,
    stop: anyio.Event,
    delete: bool = False,
    task_status: anyio.abc.TaskStatus[DurableConsumer] = anyio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """``Bus.consume`` for several handlers on one durable (an agent's), by subject.

    Starts with the ``DurableConsumer`` (its ``set_routes`` updates the handlers and
    the consumer's filters in place). With ``delete`` the consumer is deleted when
    the loop ends (its owner leaves for good). ``options``: as for ``Bus.consume``.
    """
    consumer = await _open_consumer(bus, durable, routes, receiver, limiter, stop, **options)
    task_status.started(consumer)
    await consumer.run(delete=delete)


async def _open_consumer(
    bus: Bus,
    durable: str,
    routes: RouteSet,
    receiver: str,
    limiter: anyio.Semaphore,
    stop: anyio.Event,
    deliver_new: bool = True,
    ack_wait: float = 30.0,
    max_deliver: int = 5,
) -> DurableConsumer:
    """Create (or update in place) the durable ``durable`` and its receive loop."""
    options = PullOptions(
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        deliver_new=deliver_new,
        inactive_threshold=bus.settings.consumer_inactive_threshold,
        expires=bus.settings.pull_expires,
    )
    guard = bus._permission_guard
    pull = PullConsumer(bus.js, bus.nc, EVENTS_STREAM, durable, options, guard)
    await pull.create(routes.filter_subjects())
    return DurableConsumer(bus, pull, routes, receiver=receiver, limiter=limiter, stop=stop)


def _session_of(subject: str) -> str:
    session = subjects.session_token(subject)
    if session is not None:
        with contextlib.suppress(SwarmbusError):
            return subjects.validate_session_id(session)
    return subjects.UNKNOWN


def _digest(subject: str, data: bytes) -> str:
    """A de-duplication key for bad input that carries none of its own."""
    return hashlib.sha256(subject.encode() + b"\0" + data).hexdigest()[:32]


def _with_overrides(settings: Settings | None, overrides: Mapping[str, Any]) -> Settings:
    """``settings`` (default: from the environment) with ``overrides``, validated.

    An override left as None is not given, as for ``Settings.from_env``.
    """
    if settings is None:
        return Settings.from_env(**overrides)
    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings.model_validate(settings.model_dump() | given) if given else settings


def _prepare(nc: NatsClient) -> None:
    """A new connection, before its first subscription: reconnect without end, and
    drop headers nats-py cannot parse instead of ending its read loop."""
    nc.options["max_reconnect_attempts"] = -1
    SafeHeaders.install(nc)


@contextlib.asynccontextmanager
async def connect(
    settings: Settings | None = None,
    *,
    data_dir: str | None = None,
    **overrides: Any,
) -> AsyncIterator[Bus]:
    """Connect to the configured NATS server, or start an embedded one.

    With ``NATS_URL`` (or ``url=``) set, swarmbus uses that server and starts nothing.
    Otherwise it starts nats-server with JetStream in ``data_dir`` (default: the
    user's data dir) on a free loopback port, and stops it on exit.
    """
    from swarmbus._server import NatsServer

    settings = _with_overrides(settings, overrides)
    if settings.servers:
        async with Bus.open(settings) as bus:
            yield bus
        return
    server = NatsServer(data_dir)
    await anyio.to_thread.run_sync(server.start)
    try:
        async with Bus.open(settings.model_copy(update={"url": server.url})) as bus:
            yield bus
    finally:
        await anyio.to_thread.run_sync(server.stop)
