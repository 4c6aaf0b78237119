"""The web view: pages and auth over HTTP, and a browser that sees the decision arrive live."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from swarmbus import Bus
from swarmbus._demo import incident
from swarmbus._observe._deadletters import dead_letters
from swarmbus._observe._events import session_steps
from tests._observe_recording import GOLDEN_DIR, replay

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TOKEN = "s3cret-for-tests"
URL = re.compile(rb"swarmbus ui at (http://\S+/)")


async def _start_ui(nats_url: str, token: str | None) -> tuple[Process, str]:
    env = {k: v for k, v in os.environ.items() if k != "SWARMBUS_UI_TOKEN"}
    env.update({"NATS_URL": nats_url, "PYTHONPATH": str(ROOT)})
    if token:
        env["SWARMBUS_UI_TOKEN"] = token
    command = [sys.executable, "-m", "swarmbus._cli", "ui", "--port", "0"]
    process = await anyio.open_process(command, env=env, cwd=ROOT)
    assert process.stderr is not None
    note = b""
    with anyio.fail_after(30):
        while not URL.search(note):
            chunk = await process.stderr.receive()
            note += chunk
    match = URL.search(note)
    assert match is not None
    return process, match[1].decode()


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


@pytest.fixture
async def read_only_ui(nats_url: str) -> AsyncIterator[str]:
    process, url = await _start_ui(nats_url, None)
    async with process:
        try:
            yield url
        finally:
            process.terminate()
            await process.wait()


def fetch(url: str, data: dict[str, str] | None = None) -> tuple[int, str]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(url, data=body, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_pages_show_the_recorded_session(ui: str, bus: Bus, session_id: str) -> None:
    await replay(bus, GOLDEN_DIR / "demo_session.jsonl", session_id)
    status, html = await anyio.to_thread.run_sync(fetch, f"{ui}sessions/{session_id}")
    assert status == 200
    assert '<main id="main">' in html
    assert f"<h1>Session {session_id}</h1>" in html
    assert 'aria-live="polite"' in html
    status, proposals = await anyio.to_thread.run_sync(
        fetch, f"{ui}sessions/{session_id}/proposals"
    )
    assert "<strong>Decision: rollback</strong> (approved; for 2, against 0, abstentions 1)" in (
        proposals
    )
    status, _ = await anyio.to_thread.run_sync(fetch, f"{ui}sessions/not%20a%20session")
    assert status == 404

    # Each step links to its trace; the trace's page lists the steps of that trace.
    decided = next(s for s in await session_steps(bus, session_id) if s.type == "decision")
    assert decided.trace_id
    status, trace = await anyio.to_thread.run_sync(
        fetch, f"{ui}sessions/{session_id}/trace/{decided.trace_id}"
    )
    assert status == 200
    assert "DECISION: rollback" in trace
    assert f'aria-label="trace {decided.trace_id}"' in trace


async def test_retrying_a_dead_letter_needs_the_token(ui: str, bus: Bus, session_id: str) -> None:
    await replay(bus, GOLDEN_DIR / "demo_session.jsonl", session_id)
    (letter,) = await dead_letters(bus, session=session_id)
    retry = f"{ui}dead/{letter.id}/retry"

    status, html = await anyio.to_thread.run_sync(fetch, retry, {"token": "wrong"})
    assert status == 403
    assert "Wrong token: nothing was retried." in html
    assert await dead_letters(bus, session=session_id) == [letter]

    status, html = await anyio.to_thread.run_sync(fetch, retry, {"token": TOKEN})
    assert status == 200, html
    assert f"Retried dead letter {letter.id} on {letter.original_subject}." in html
    assert await dead_letters(bus, session=session_id) == []


async def test_a_view_without_a_token_is_read_only(
    read_only_ui: str, bus: Bus, session_id: str
) -> None:
    await replay(bus, GOLDEN_DIR / "demo_session.jsonl", session_id)
    (letter,) = await dead_letters(bus, session=session_id)
    status, page = await anyio.to_thread.run_sync(fetch, f"{read_only_ui}dead")
    assert "Read-only" in page
    assert f'action="/dead/{letter.id}/retry"' not in page
    status, _ = await anyio.to_thread.run_sync(
        fetch, f"{read_only_ui}dead/{letter.id}/retry", {"token": ""}
    )
    assert status == 403
    assert await dead_letters(bus, session=session_id) == [letter]


def _node_modules() -> None:
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, check=True,
                       timeout=300)  # fmt: skip


@pytest.mark.slow
async def test_browser_sees_the_decision_appear_without_a_reload(
    ui: str, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - one stat before anything starts
        pytest.skip(f"no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium)")
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("no node/npm (.ci/run needs Node.js 20 and npm)")
    await anyio.to_thread.run_sync(_node_modules)
    screenshot = tmp_path / "session.png"
    command = ["node", "watch_decision.mjs", f"{ui}sessions/{session_id}", str(screenshot),
               str(tmp_path / "chromium-profile")]  # fmt: skip
    async with await anyio.open_process(command, cwd=BROWSER_DIR) as node:
        assert node.stdout is not None
        out = b""
        with anyio.fail_after(90):
            while b"watching\n" not in out:
                chunk = await node.stdout.receive()
                out += chunk
            # The page is open and following: now the incident runs.
            result = await incident(bus, session=session_id, echo=lambda _: None)
            assert result.decision.outcome == "approved"
            async for chunk in node.stdout:
                out += chunk
            code = await node.wait()
            assert node.stderr is not None
            errors = b"".join([chunk async for chunk in node.stderr])
    assert code == 0, (out + errors).decode()
    report = json.loads(out.decode().splitlines()[-1])
    assert report["decision"].startswith("+")
    assert "DECISION: rollback (approved; for 2, against 0, abstentions 1)" in report["decision"]
    assert report["panel"] == "Decision: rollback"
    assert report["sameDocument"] is True  # no reload happened
    assert report["steps"] >= 25
    assert report["traceLinks"] == 0 or report["traceLinks"] == report["steps"]
    assert report["landmarks"] == {
        "main": 1,
        "h1": f"Session {session_id}",
        "nav": 2,
        "live": "polite",
    }
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("SWARMBUS_SAVE_SCREENSHOT"):
        shutil.copy(screenshot, ROOT / "docs" / "img" / "ui-session.png")


async def test_serve_ui_stops_with_its_caller_and_ends_the_event_streams(
    bus: Bus, session_id: str
) -> None:
    """What ``swarmbus up`` relies on: cancelling the caller stops the view gracefully."""
    from swarmbus._observe._ui import serve_ui

    urls: list[str] = []
    listening, connected = anyio.Event(), anyio.Event()
    results: list[tuple[bytes, bytes]] = []

    def ready(url: str) -> None:
        urls.append(url)
        listening.set()

    def stream(url: str) -> tuple[bytes, bytes]:
        with urllib.request.urlopen(url, timeout=20) as response:
            first = response.readline()
            anyio.from_thread.run_sync(connected.set)
            return first, response.read()  # returns only once the server ends the stream

    async def client() -> None:
        url = f"{urls[0]}sessions/{session_id}/events"
        results.append(await anyio.to_thread.run_sync(stream, url))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as clients, anyio.create_task_group() as server:
            server.start_soon(lambda: serve_ui(bus, port=0, ready=ready))
            await listening.wait()
            clients.start_soon(client)
            await connected.wait()
            cancelled_at = anyio.current_time()
            server.cancel_scope.cancel()
    # The stream ended cleanly (an empty line, then EOF), before uvicorn's 2 s graceful
    # timeout would have cut it: the server ended it at once.
    assert results == [(b": connected\n", b"\n")]
    assert anyio.current_time() - cancelled_at < 2.0


def test_pages_escape_what_agents_wrote() -> None:
    from datetime import UTC, datetime

    from swarmbus._messages import Finding, encode, envelope_for
    from swarmbus._observe import _pages as pages
    from swarmbus._observe._events import step_of
    from swarmbus._observe._timeline import Timeline

    evil = "<script>alert(1)</script>"
    finding = Finding(category="observation", content=evil, confidence=0.5)
    message = envelope_for(finding, agent="ops/x", session="S-1")
    step = step_of(7, "agent.finding.reported.S-1.ops/x", encode(message), None, datetime.now(UTC))
    timeline = Timeline("S-1")
    item = pages.step_item(timeline, step, timeline.add(step), None)
    assert evil not in item
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in item
    assert 'data-type="finding"' in item
