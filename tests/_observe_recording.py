"""Record the INC-1234 demo's events as a fixture, and replay a recording into a server.

Re-record (after a change to the demo's events) with::

    python -m tests._observe_recording tests/fixtures/observe/demo_session.jsonl

The recording keeps each stored event's subject, headers and bytes in stream order,
plus the dead letters the session left. Replaying under a fresh session id gives every
test the same events in the same order, so golden output is stable.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from swarmbus import Bus, NatsServer
from swarmbus._bus import DEAD_LETTER_STREAM
from swarmbus._observe._events import stored
from swarmbus._subjects import session_filter

RECORDED_SESSION = "INC-1234-recorded"
DEAD_SUBJECT_PREFIX = f"swarmbus.dead.{RECORDED_SESSION}."


def _entry(kind: str, msg: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "subject": msg.subject,
        "headers": dict(msg.headers or {}),
        "data": base64.b64encode(msg.data).decode(),
    }


async def record(out: Path) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from swarmbus._demo import incident

    trace.set_tracer_provider(TracerProvider())  # traceparent headers on every event
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as server:
        async with Bus.open(url=server.url) as bus:
            # A malformed event the validator's subscription rejects: one dead letter.
            await bus.subscribe(
                session_filter(RECORDED_SESSION), _ignore, receiver="ops/deploy-validator"
            )
            await incident(bus, session=RECORDED_SESSION, echo=lambda _: None)
            await bus.nc.publish(
                f"agent.finding.reported.{RECORDED_SESSION}.ops/deploy-validator", b"{not json"
            )
            await bus.nc.flush()
            with anyio.fail_after(10):
                while True:
                    dead = await stored(bus, DEAD_SUBJECT_PREFIX + ">", stream=DEAD_LETTER_STREAM)
                    events = await stored(bus, session_filter(RECORDED_SESSION))
                    if dead and any(b"error.occurred" in m.data for m in events[-3:]):
                        break
                    await anyio.sleep(0.1)
    lines = [_entry("event", m) for m in events] + [_entry("dead", m) for m in dead]
    text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    await anyio.Path(out).write_text(text)


async def _ignore(_: object) -> None:
    pass


async def replay(bus: Bus, recording: Path, session: str) -> None:
    """Publish a recording's events and dead letters as ``session``, in recorded order."""
    for line in (await anyio.Path(recording).read_text()).splitlines():
        entry = json.loads(line)
        data = base64.b64decode(entry["data"]).replace(RECORDED_SESSION.encode(), session.encode())
        headers = {
            k: v.replace(RECORDED_SESSION, session)
            for k, v in entry["headers"].items()
            if k != "Nats-Msg-Id"  # the stream would de-duplicate a second replay
        }
        subject = entry["subject"].replace(RECORDED_SESSION, session)
        await bus.js.publish(subject, data, headers=headers or None)


if __name__ == "__main__":
    anyio.run(record, Path(sys.argv[1]))


# --- golden files ----------------------------------------------------------------------

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "observe"
UPDATE_ENV = "SWARMBUS_UPDATE_GOLDENS"
_MASKS = (
    (re.compile(r"[0-9a-f]{32}"), "<trace>"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?"), "<datetime>"),
    (re.compile(r"\b\d\d:\d\d:\d\d\.\d{3}\b"), "<clock>"),
    (re.compile(r"\+ *\d+\.\d{3}s"), "+<offset>"),
    (re.compile(r"\b(after|in) \d+\.\d{3}s"), r"\1 <seconds>"),
    (re.compile(r"\| \d+\.\d{3}s \| \d+\.\d{3}s \|"), "| <seconds> | <seconds> |"),
    (re.compile(r"Duration: \d+\.\d{3}s"), "Duration: <seconds>"),
    # Stream sequences depend on what other tests stored on the shared server.
    (re.compile(r"^\| \d+ \|", re.MULTILINE), "| <seq> |"),
    (re.compile(r"^ *\d+(?=  <datetime>)", re.MULTILINE), "<seq>"),
)


def mask(text: str, session: str) -> str:
    """``text`` with the session id, trace ids, uuids, times and durations masked."""
    text = text.replace(session, "<session>")
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def check_golden(name: str, text: str, session: str) -> None:
    """Compare masked ``text`` with ``fixtures/observe/<name>`` (or rewrite it)."""
    path = GOLDEN_DIR / name
    masked = mask(text, session)
    if os.environ.get(UPDATE_ENV):
        path.write_text(masked)
    assert masked == path.read_text(), f"differs from {path} (rewrite: {UPDATE_ENV}=1)"
