"""Dead letters: list them with why they were rejected, and retry one.

A dead letter is a message a receiver refused or failed on (CONTRACT "Bad input"),
kept in ``SWARMBUS_DEAD`` on ``swarmbus.dead.<session>.<receiver>`` with its original
bytes and the headers ``Swarmbus-Code``, ``Swarmbus-Reason`` and
``Swarmbus-Original-Subject``. Its id is its stream sequence.

Retrying republishes the original bytes on the original subject, so every
subscriber of that subject sees the message again (handlers must be idempotent, as
at-least-once delivery already requires), then removes the dead letter. A request
(``swarmbus.request.>``) is not retried: its requester is no longer waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from swarmbus import _subjects as subjects
from swarmbus._bus import DEAD_LETTER_STREAM, Bus
from swarmbus._errors import NotFoundError, SwarmbusError
from swarmbus._jetstream.errors import nats_errors
from swarmbus._jetstream.follow import delete_message, stored, stored_message
from swarmbus._jetstream.headers import CODE as CODE_HEADER
from swarmbus._jetstream.headers import MSG_ID as MSG_ID_HEADER
from swarmbus._jetstream.headers import ORIGINAL_SUBJECT as ORIGINAL_SUBJECT_HEADER
from swarmbus._jetstream.headers import REASON as REASON_HEADER
from swarmbus._observe._events import printable

RETRY_OF_HEADER: Final = "Swarmbus-Retry-Of"


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter; ``id`` is its sequence in the dead-letter stream."""

    id: int
    session: str
    receiver: str
    code: str
    reason: str
    original_subject: str
    stored_at: datetime
    data: bytes

    def to_dict(self) -> dict[str, Any]:
        """As plain data (``dead --json``); the bytes as text, undecodable ones replaced."""
        return {
            "id": self.id,
            "session": self.session,
            "receiver": self.receiver,
            "code": self.code,
            "reason": self.reason,
            "original_subject": self.original_subject,
            "stored_at": self.stored_at.isoformat(),
            "data": self.data.decode(errors="replace"),
        }


def dead_letter_of(
    seq: int, subject: str, headers: dict[str, str] | None, data: bytes, stored_at: datetime
) -> DeadLetter:
    """Read a dead-letter message (``swarmbus.dead.<session>.<receiver>``)."""
    headers = headers or {}
    _, _, session, receiver = [*subject.split(".", 3), "", "", "", ""][:4]
    return DeadLetter(
        id=seq,
        session=session,
        receiver=receiver,
        code=headers.get(CODE_HEADER, ""),
        reason=headers.get(REASON_HEADER, ""),
        original_subject=headers.get(ORIGINAL_SUBJECT_HEADER, ""),
        stored_at=stored_at,
        data=data or b"",
    )


async def dead_letters(
    bus: Bus, *, session: str | None = None, code: str | None = None
) -> list[DeadLetter]:
    """Every dead letter (of one session, with one code), oldest first."""
    if session is not None:
        subjects.validate_session_id(session)
    filter = f"{subjects.DEAD_LETTER_ROOT}.{session or '*'}.>"
    out = []
    for msg in await stored(bus.js, DEAD_LETTER_STREAM, filter):
        meta = msg.metadata
        letter = dead_letter_of(
            meta.sequence.stream, msg.subject, msg.headers, msg.data, meta.timestamp
        )
        if code is None or letter.code == code:
            out.append(letter)
    return out


async def get_dead_letter(bus: Bus, id: int) -> DeadLetter:
    """The dead letter with sequence ``id`` (``NotFoundError`` if there is none)."""
    if id < 1:  # stream sequences start at 1; the server would answer "bad request"
        raise NotFoundError("dead letter", str(id))
    raw = await stored_message(bus.js, DEAD_LETTER_STREAM, id)
    if raw is None or not (raw.subject or "").startswith(f"{subjects.DEAD_LETTER_ROOT}."):
        raise NotFoundError("dead letter", str(id))
    stored_at = raw.time or datetime.fromtimestamp(0, UTC)
    return dead_letter_of(id, str(raw.subject), raw.headers, raw.data or b"", stored_at)


async def retry_dead_letter(bus: Bus, id: int, *, keep: bool = False) -> DeadLetter:
    """Republish dead letter ``id`` on its original subject; then delete it unless ``keep``.

    Raises:
        NotFoundError: no dead letter ``id``.
        SwarmbusError: it cannot be retried (a request, or no original subject), or it
            was kept and retried already within the duplicate window.
    """
    letter = await get_dead_letter(bus, id)
    subject = letter.original_subject
    if not subject:
        raise SwarmbusError(f"dead letter {id} has no original subject")
    if subject.startswith(f"{subjects.REQUEST_ROOT}."):
        raise SwarmbusError(
            f"dead letter {id} is a request on {subject}: its requester no longer waits "
            "for the answer; ask it to send the request again"
        )
    # De-duplicated per dead letter: a double retry within the window publishes once.
    headers = {MSG_ID_HEADER: f"retry:{id}", RETRY_OF_HEADER: str(id)}
    with nats_errors(f"retry dead letter {id} on {subject}"):
        if subject.startswith((f"{subjects.EVENT_ROOT}.", f"{subjects.TASK_ROOT}.")):
            ack = await bus.js.publish(subject, letter.data, headers=headers)
            if ack.duplicate and keep:
                # Without --keep a duplicate only means an earlier retry published and
                # did not get to delete the letter: deleting it now finishes that retry.
                raise SwarmbusError(
                    f"dead letter {id} was retried already within the stream's duplicate "
                    "window: it was not published again"
                )
        else:
            await bus.nc.publish(subject, letter.data, headers=headers)
            await bus.nc.flush()
    if not keep:
        await delete_message(bus.js, DEAD_LETTER_STREAM, id)
    return letter


def render_dead_letters(letters: list[DeadLetter]) -> str:
    """The terminal table of ``swarmbus dead``."""
    lines = [f"{'ID':>6}  {'STORED (UTC)':19}  {'SESSION':20}  {'RECEIVER':30}  CODE"]
    for d in letters:
        stored_at = d.stored_at.strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{d.id:>6}  {stored_at:19}  {d.session:20}  {d.receiver:30}  {d.code}")
        lines.append(f"{'':8}subject: {d.original_subject}")
        lines.append(f"{'':8}reason:  {d.reason}")
        preview = d.data[:120].decode(errors="replace")
        lines.append(f"{'':8}data:    {preview}{'...' if len(d.data) > 120 else ''}")
    lines.append(f"{len(letters)} dead letter(s)")
    return "".join(printable(line) + "\n" for line in lines)
