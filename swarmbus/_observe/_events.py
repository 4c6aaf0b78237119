"""Reading the event stream from outside: stored steps of a session, and a live follow.

A ``Step`` is one stored event as an observer sees it: its stream sequence, subject,
the decoded envelope (or why it could not be decoded) and the trace id its
``traceparent`` header carries. Past and live events are read through an
ordered push consumer on ``bus.js`` (``Follower``): the one stream-reading primitive
this package adds outside the bus layer (nats-py is imported lazily, inside it).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import anyio

from swarmbus import _subjects as subjects
from swarmbus._bus import EVENTS_STREAM, Bus
from swarmbus._errors import ConnectionError, SwarmbusError
from swarmbus._messages import Message, decode

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

TRACEPARENT: Final = "traceparent"


@dataclass(frozen=True)
class Step:
    """One stored event: what an SRE sees as one line of a timeline."""

    seq: int
    subject: str
    stored_at: datetime
    message: Message | None
    error: str | None = None
    trace_id: str | None = None

    @property
    def session(self) -> str:
        parsed = subjects.parse_event_subject(self.subject)
        return parsed[2] if parsed else subjects.UNKNOWN

    @property
    def agent(self) -> str:
        if self.message is not None:
            return self.message.source.agent
        parsed = subjects.parse_event_subject(self.subject)
        return parsed[3] if parsed else subjects.UNKNOWN

    @property
    def type(self) -> str:
        """The envelope's type (``finding``, ``task.created``), or ``undecodable``."""
        return self.message.type if self.message is not None else "undecodable"

    @property
    def time(self) -> datetime:
        """When it happened: the envelope's timestamp, else when the stream stored it."""
        return self.message.timestamp if self.message is not None else self.stored_at


def trace_id_of(headers: Mapping[str, str] | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (``00-<trace>-<span>-<flags>``)."""
    value = (headers or {}).get(TRACEPARENT, "")
    parts = value.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    return parts[1]


def step_of(
    seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None, stored_at: datetime
) -> Step:
    """Decode one stored event; an undecodable one becomes a step that says why."""
    try:
        message: Message | None = decode(data)
        error = None
    except SwarmbusError as exc:
        message, error = None, str(exc)
    return Step(seq, subject, stored_at, message, error, trace_id_of(headers))


async def session_steps(bus: Bus, session: str) -> list[Step]:
    """Every stored event of ``session``, in stream order."""
    return [msg_step(msg) for msg in await stored(bus, subjects.session_filter(session))]


def msg_step(msg: Any) -> Step:
    """The step of a message delivered by a JetStream consumer."""
    meta = msg.metadata
    return step_of(meta.sequence.stream, msg.subject, msg.data, msg.headers, meta.timestamp)


async def stored(
    bus: Bus, filter: str, *, stream: str = EVENTS_STREAM, timeout: float = 10.0
) -> list[Any]:
    """Every message stored on ``filter`` in ``stream`` now, in order (nats-py ``Msg`` s).

    An ordered consumer from the first message, read until the count its creation
    reported (the swarmbus streams have no direct gets, so ``stored_messages`` cannot
    read them).
    """
    async with Follower(bus, filter, start="all", stream=stream) as follower:
        wanted = await follower.pending()
        out: list[Any] = []
        if wanted == 0:
            return out
        with anyio.fail_after(timeout):
            async for msg in follower.messages():
                out.append(msg)
                if len(out) >= wanted or msg.metadata.num_pending == 0:
                    break
        return out


class Follower:
    """Messages on ``filter`` through an ordered push consumer.

    ``start`` is ``"new"`` (only what is published from now on), ``"all"`` (the stored
    messages first) or a stream sequence to resume after (an SSE reconnect).
    Use as ``async with Follower(bus, filter) as f: async for step in f.steps()``.
    """

    def __init__(
        self, bus: Bus, filter: str, *, start: str | int = "new", stream: str = EVENTS_STREAM
    ) -> None:
        self.bus = bus
        self.filter = filter
        self.start = start
        self.stream = stream
        self._sub: Any = None

    async def __aenter__(self) -> Self:
        from nats.errors import Error as NatsError
        from nats.js.api import ConsumerConfig, DeliverPolicy

        js: JetStreamContext = self.bus.js
        config = ConsumerConfig()
        if isinstance(self.start, int):
            policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.start + 1
        else:
            policy = DeliverPolicy.ALL if self.start == "all" else DeliverPolicy.NEW
        try:
            self._sub = await js.subscribe(
                self.filter,
                stream=self.stream,
                ordered_consumer=True,
                deliver_policy=policy,
                config=config,
                idle_heartbeat=5.0,
            )
        except (TimeoutError, NatsError) as exc:
            raise ConnectionError(f"cannot follow {self.filter}: {exc}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from nats.errors import Error as NatsError

        if self._sub is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await self._sub.unsubscribe()

    async def pending(self) -> int:
        """How many stored messages the consumer had to deliver when it was created."""
        from nats.errors import Error as NatsError

        try:
            info = await self._sub.consumer_info()
        except (TimeoutError, NatsError) as exc:
            raise ConnectionError(f"cannot read {self.filter}: {exc}") from exc
        return int(info.num_pending or 0) + int(info.delivered.consumer_seq or 0)

    async def messages(self) -> AsyncIterator[Any]:
        """The raw messages, live."""
        assert self._sub is not None, "use Follower as an async context manager"
        async for msg in self._sub.messages:
            yield msg

    async def steps(self) -> AsyncIterator[Step]:
        """The messages as steps, live."""
        async for msg in self.messages():
            yield msg_step(msg)
