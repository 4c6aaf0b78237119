"""The observing tools against hostile or huge input, on a real server (review of issue 22).

Each test here failed before its fix: a sender's JSON value where a string was
expected, a browser's ``Last-Event-ID``, a dead letter id the stream cannot hold, a
session too large to read within one fixed deadline, and per-task or per-session
state that a long-running observer kept forever.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import anyio
import pytest

from swarmbus import Bus, NatsServer
from swarmbus._bus import EVENTS_STREAM
from swarmbus._errors import NotFoundError, SwarmbusError
from swarmbus._jetstream.follow import stored
from swarmbus._messages import Finding, SessionStarted, TaskCreated, encode, envelope_for
from swarmbus._observe._deadletters import get_dead_letter, retry_dead_letter
from swarmbus._observe._events import Step, step_of
from swarmbus._observe._metrics import Observer
from swarmbus._observe._tail import LIVE_SESSIONS_LIMIT, Tail
from swarmbus._observe._timeline import RUNNING_TASKS_LIMIT, Timeline
from swarmbus._subjects import event_subject, session_filter
from tests.test_observe import ROOT, cli
from tests.test_observe_ui import TOKEN, URL, _start_ui, fetch

AGENT = "ops/architect"


@pytest.fixture
async def ui(nats_url: str) -> AsyncIterator[str]:
    """``swarmbus ui`` with a retry token; yields its base URL."""
    process, url = await _start_ui(nats_url, TOKEN)
    async with process:
        try:
            yield url
        finally:
            process.terminate()
            await process.wait()


def _task_created(session: str, n: int, target: object = "ops/x") -> bytes:
    body = TaskCreated(task_id=f"t-{n}", type="investigate", parameters={"target": target})
    return encode(envelope_for(body, agent=AGENT, session=session))


def _task_step(session: str, n: int) -> Step:
    subject = event_subject("task", "created", session, AGENT)
    return step_of(n, subject, _task_created(session, n), None, datetime.now(UTC))


async def _publish_odd_target(bus: Bus, session: str) -> None:
    """A valid envelope whose ``parameters.target`` is a number, not an agent id."""
    await bus.js.publish(
        event_subject("task", "created", session, AGENT), _task_created(session, 1, 5)
    )


# --- a sender's JSON where a string was expected -----------------------------------------------


async def test_a_task_target_that_is_not_a_string_is_shown_not_a_crash(
    bus: Bus,
    nats_url: str,
    session_id: str,
    ui: str,
) -> None:
    await _publish_odd_target(bus, session_id)
    result = await anyio.to_thread.run_sync(lambda: cli(nats_url, "timeline", session_id))
    assert result.returncode == 0, result.stderr
    assert "created task 'investigate' for 5" in result.stdout
    status, html = await anyio.to_thread.run_sync(fetch, f"{ui}sessions/{session_id}/proposals")
    assert status == 200, html


async def test_the_event_stream_of_the_view_carries_a_number_target(
    bus: Bus,
    session_id: str,
    ui: str,
) -> None:
    await _publish_odd_target(bus, session_id)

    def first_step() -> bytes:
        url = f"{ui}sessions/{session_id}/events"
        with urllib.request.urlopen(url, timeout=20) as response:
            while not (line := bytes(response.readline())).startswith(b"data:"):
                assert line, "the stream ended before its first step"
            return line

    with anyio.fail_after(30):
        line = await anyio.to_thread.run_sync(first_step)
    assert b"created task &#x27;investigate&#x27; for 5" in line


# --- a browser's Last-Event-ID -------------------------------------------------------------------


@pytest.mark.parametrize("last", ["\u00b2", "9" * 30], ids=["superscript-two", "beyond-uint64"])
async def test_a_garbage_last_event_id_replays_from_the_start(
    bus: Bus,
    session_id: str,
    ui: str,
    last: str,
) -> None:
    await bus.js.publish(
        event_subject("session", "started", session_id, AGENT),
        encode(
            envelope_for(
                SessionStarted(session_id=session_id, initiator=AGENT, context={"task": "t"}),
                agent=AGENT,
                session=session_id,
            )
        ),
    )

    def first_lines() -> tuple[int, bytes]:
        request = urllib.request.Request(f"{ui}sessions/{session_id}/events")
        request.add_unredirected_header("Last-Event-ID", last)  # latin-1 on the wire
        with urllib.request.urlopen(request, timeout=20) as response:
            out = b""
            while b"\ndata:" not in out:
                line = response.readline()
                assert line, f"the stream ended early: {out!r}"
                out += line
            return response.status, out

    with anyio.fail_after(30):
        status, out = await anyio.to_thread.run_sync(first_lines)
    assert status == 200
    assert b"event: step" in out
    assert b"started the session" in out


# --- dead letter ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("id", [0, -5])
async def test_a_dead_letter_id_below_one_is_not_found(bus: Bus, nats_url: str, id: int) -> None:
    with pytest.raises(NotFoundError):
        await get_dead_letter(bus, id)
    with pytest.raises(NotFoundError):
        await retry_dead_letter(bus, id)
    result = await anyio.to_thread.run_sync(lambda: cli(nats_url, "dead", "retry", "--", str(id)))
    assert result.returncode == 2
    assert f"dead letter '{id}' not found" in result.stderr


# --- a huge session -----------------------------------------------------------------------------


async def test_a_session_longer_to_read_than_the_timeout_is_read_whole(
    bus: Bus, session_id: str
) -> None:
    """The timeout bounds the wait for each next event, not the whole read."""
    events = 80_000  # 2.5-8 s to read here: longer than the timeout below
    data = _task_created(session_id, 0)
    subject = event_subject("task", "created", session_id, AGENT)
    for _ in range(events - 1):
        await bus.nc.publish(subject, data)
    # One connection's messages reach the stream in order: the last one's ack says
    # every earlier one is stored.
    await bus.js.publish(subject, data)
    with anyio.fail_after(60):
        started = anyio.current_time()
        messages = await stored(bus.js, EVENTS_STREAM, session_filter(session_id), timeout=1.5)
    assert len(messages) == events
    assert anyio.current_time() - started > 1.5  # else this test proves nothing


# --- state an observer that runs for weeks must not keep forever --------------------------------


def test_a_live_timeline_forgets_tasks_that_never_end() -> None:
    timeline = Timeline("S-1", keep=False)
    for n in range(RUNNING_TASKS_LIMIT + 50):
        timeline.add(_task_step("S-1", n))
    assert len(timeline.tasks) == RUNNING_TASKS_LIMIT
    assert "t-0" not in timeline.tasks  # the oldest went first
    assert f"t-{RUNNING_TASKS_LIMIT + 49}" in timeline.tasks


async def test_the_metrics_observer_forgets_tasks_that_never_end(bus: Bus) -> None:
    observer = Observer(bus)
    for n in range(RUNNING_TASKS_LIMIT + 50):
        observer.count(_task_step("S-1", n))
    assert len(observer._created) == RUNNING_TASKS_LIMIT


async def test_tail_forgets_sessions_that_never_complete(bus: Bus) -> None:
    tail = Tail(bus, echo=lambda _: None)
    for n in range(LIVE_SESSIONS_LIMIT + 5):
        tail.line(_task_step(f"S-{n}", n))
    assert len(tail._timelines) == LIVE_SESSIONS_LIMIT
    assert "S-0" not in tail._timelines
    assert f"S-{LIVE_SESSIONS_LIMIT + 4}" in tail._timelines


# --- a port that is taken, a port that is not a number ------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def test_the_view_on_a_taken_port_says_so(bus: Bus, taken_port: int) -> None:
    from swarmbus._observe._ui import serve_ui

    with anyio.fail_after(20), pytest.raises(SwarmbusError, match="cannot listen"):
        await serve_ui(bus, port=taken_port)


async def test_ui_on_a_taken_port_is_an_error_not_a_traceback(
    nats_url: str, taken_port: int
) -> None:
    result = await anyio.to_thread.run_sync(lambda: cli(nats_url, "ui", "--port", str(taken_port)))
    assert result.returncode == 2
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["taken", "not-a-number"])
async def test_metrics_on_a_bad_port_is_an_error_not_a_traceback(
    nats_url: str, taken_port: int, how: str
) -> None:
    env = (
        {"OTEL_EXPORTER_PROMETHEUS_PORT": str(taken_port)}
        if how == "taken"
        else {"OTEL_EXPORTER_PROMETHEUS_PORT": "9464x"}
    )
    result = await anyio.to_thread.run_sync(lambda: cli(nats_url, "metrics", env=env))
    assert result.returncode == 2, result.stderr
    assert "OTEL_EXPORTER_PROMETHEUS_PORT" in result.stderr or "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


# --- a tracing backend's URL with braces of its own ---------------------------------------------

GRAFANA = 'http://grafana:3000/explore?left={"queries":[{"query":"{trace_id}"}]}'
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_a_trace_url_with_braces_of_its_own_links_every_step(
    bus: Bus, nats_url: str, session_id: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SWARMBUS_UI_TOKEN"}
    env.update({"NATS_URL": nats_url, "PYTHONPATH": str(ROOT)})
    command = [sys.executable, "-m", "swarmbus._cli", "ui", "--port", "0", "--trace-url", GRAFANA]
    body = SessionStarted(session_id=session_id, initiator=AGENT, context={"task": "t"})
    await bus.js.publish(
        event_subject("session", "started", session_id, AGENT),
        encode(envelope_for(body, agent=AGENT, session=session_id)),
        headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"},
    )
    async with await anyio.open_process(command, env=env, cwd=ROOT) as process:
        try:
            assert process.stderr is not None
            note = b""
            with anyio.fail_after(30):
                while not URL.search(note):
                    note += await process.stderr.receive()
            match = URL.search(note)
            assert match is not None
            base = match[1].decode()
            status, html = await anyio.to_thread.run_sync(
                fetch, f"{base}sessions/{session_id}/trace/{TRACE}"
            )
        finally:
            process.terminate()
            await process.wait()
    assert status == 200, html
    expected = GRAFANA.replace("{trace_id}", TRACE).replace('"', "&quot;")
    assert f'href="{expected}"' in html
    assert "started the session" in html


# --- tail --limit ------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0", "-1"])
async def test_tail_refuses_a_limit_below_one(
    bus: Bus, nats_url: str, session_id: str, limit: str
) -> None:
    """``--limit 0`` printed one event (or waited for one) instead of none."""
    await _publish_odd_target(bus, session_id)
    result = await anyio.to_thread.run_sync(
        lambda: cli(nats_url, "tail", session_id, "--from-start", f"--limit={limit}")
    )
    assert result.returncode == 2
    assert "must be at least 1" in result.stderr
    assert result.stdout == ""


async def test_a_second_retry_of_a_kept_dead_letter_says_it_was_not_published(
    bus: Bus, nats_url: str, session_id: str
) -> None:
    """The stream de-duplicates the second publish: "retried" would be a lie."""
    subject = event_subject("finding", "reported", session_id, "ops/x")
    headers = {"Swarmbus-Code": "not_json", "Swarmbus-Reason": "bad",
               "Swarmbus-Original-Subject": subject}  # fmt: skip
    ack = await bus.js.publish(f"swarmbus.dead.{session_id}.ops/y", b"{nope", headers=headers)
    first = await anyio.to_thread.run_sync(
        lambda: cli(nats_url, "dead", "retry", str(ack.seq), "--keep")
    )
    assert first.returncode == 0, first.stderr
    again = await anyio.to_thread.run_sync(
        lambda: cli(nats_url, "dead", "retry", str(ack.seq), "--keep")
    )
    assert again.returncode == 2
    assert "not published again" in again.stderr
    assert len(await stored(bus.js, EVENTS_STREAM, session_filter(session_id))) == 1


# --- looking must not change the swarm ----------------------------------------------------------


async def test_observing_leaves_the_event_streams_config_alone(fresh_server: NatsServer) -> None:
    """An SRE's defaults (7 days of events) must not overwrite what the swarm provisioned."""
    async with Bus.open(url=fresh_server.url, event_max_age=3600.0):
        pass  # provisions SWARMBUS_EVENTS with a one-hour max age
    for args in (["timeline", "S-1"], ["dead"]):
        result = await anyio.to_thread.run_sync(lambda a=args: cli(fresh_server.url, *a))
        assert result.returncode in (0, 1), result.stderr
    async with Bus.open(url=fresh_server.url, provision=False) as bus:
        info = await bus.js.stream_info(EVENTS_STREAM)
    assert info.config.max_age == pytest.approx(3600.0)


async def test_observing_a_fresh_server_provisions_the_missing_streams(
    fresh_server: NatsServer,
) -> None:
    result = await anyio.to_thread.run_sync(lambda: cli(fresh_server.url, "dead"))
    assert result.returncode == 0, result.stderr
    assert "0 dead letter(s)" in result.stdout


# --- what an agent wrote must not drive the SRE's terminal ----------------------------------


EVIL = "\x1b]0;owned\x07\x1b[2J\x9b31m"  # retitle the terminal, clear it, CSI in C1


@pytest.mark.parametrize(
    "args",
    [["timeline"], ["timeline", "--format", "markdown"], ["tail", "--from-start", "--limit=1"]],
    ids=["timeline", "markdown", "tail"],
)
async def test_terminal_output_shows_control_characters_as_escapes(
    bus: Bus, nats_url: str, session_id: str, args: list[str]
) -> None:
    finding = Finding(category="observation", content=f"ok {EVIL} ok", confidence=0.5)
    await bus.js.publish(
        event_subject("finding", "reported", session_id, AGENT),
        encode(envelope_for(finding, agent=AGENT, session=session_id)),
    )
    command, *options = args
    result = await anyio.to_thread.run_sync(lambda: cli(nats_url, command, session_id, *options))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "\x9b" not in result.stdout
    assert "\x07" not in result.stdout
    assert "ok \\x1b]0;owned\\x07\\x1b[2J\\x9b31m ok" in result.stdout


async def test_dead_shows_control_characters_of_a_letter_as_escapes(
    bus: Bus, nats_url: str, session_id: str
) -> None:
    subject = event_subject("finding", "reported", session_id, "ops/x")
    headers = {"Swarmbus-Code": "not_json", "Swarmbus-Reason": f"bad {EVIL}",
               "Swarmbus-Original-Subject": subject}  # fmt: skip
    await bus.js.publish(
        f"swarmbus.dead.{session_id}.ops/y", f"data {EVIL}".encode(), headers=headers
    )
    result = await anyio.to_thread.run_sync(lambda: cli(nats_url, "dead", "--session", session_id))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "data \\x1b]0;owned" in result.stdout
    assert "bad \\x1b]0;owned" in result.stdout
