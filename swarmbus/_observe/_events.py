"""Reading the event stream from outside: stored steps of a session, and a live follow.

A ``Step`` is one stored event as an observer sees it: its stream sequence, subject,
the decoded envelope (or why it could not be decoded) and the trace id its
``traceparent`` header carries. Past and live events are read through an
ordered push consumer (``swarmbus._jetstream.follow``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from swarmbus import _subjects as subjects
from swarmbus._bus import EVENTS_STREAM, Bus
from swarmbus._errors import SwarmbusError
from swarmbus._jetstream.follow import OrderedReader, stored
from swarmbus._messages import Message, decode

TRACEPARENT: Final = "traceparent"
_TRACE_ID: Final = re.compile(r"[0-9a-f]{32}")


#: Control characters (C0, DEL, C1) as visible escapes: what an agent wrote must not
#: drive the SRE's terminal (clear the screen, retitle it, hide the lines before it).
_CONTROLS: Final = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS_BUT_NEWLINE: Final = {c: v for c, v in _CONTROLS.items() if c != 0x0A}


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` safe to print on a terminal: control characters become ``\\xNN``."""
    return text.translate(_CONTROLS_BUT_NEWLINE if keep_newlines else _CONTROLS)


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
    trace = parts[1] if len(parts) == 4 else ""
    if not _TRACE_ID.fullmatch(trace) or trace == "0" * 32:
        return None  # the header is the sender's to write: take only a real trace id
    return trace


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
    filter = subjects.session_filter(session)
    return [msg_step(msg) for msg in await stored(bus.js, EVENTS_STREAM, filter)]


def msg_step(msg: Any) -> Step:
    """The step of a message delivered by a JetStream consumer."""
    meta = msg.metadata
    return step_of(meta.sequence.stream, msg.subject, msg.data, msg.headers, meta.timestamp)


class Follower(OrderedReader):
    """Events (or dead letters) on ``filter``, live, as ``Step`` s or raw messages.

    ``start`` is ``"new"`` (only what is published from now on), ``"all"`` (the stored
    events first) or a stream sequence to resume after (an SSE reconnect). Use as
    ``async with Follower(bus, filter) as f: async for step in f.steps()``.
    """

    def __init__(
        self, bus: Bus, filter: str, *, start: str | int = "new", stream: str = EVENTS_STREAM
    ) -> None:
        super().__init__(bus.js, stream, filter, start=start)

    async def steps(self) -> AsyncIterator[Step]:
        """The messages as steps, live."""
        async for msg in self.messages():
            yield msg_step(msg)
