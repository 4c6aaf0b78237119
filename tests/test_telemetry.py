"""Tracing: one trace per session across processes, messaging conventions, off means off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from swarmbus import (
    Agent,
    Blackboard,
    Bus,
    Consensus,
    ConsensusService,
    Finding,
    FindingMessage,
    Lock,
    NatsServer,
    Proposal,
    TaskQueue,
    Vote,
    current_trace_id,
    session_span,
)
from swarmbus._bus import EVENTS_STREAM
from swarmbus._demo import incident
from swarmbus._telemetry import producer_span, send_span, traced, tracing_enabled

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("trace_agent.py")
TRACEPARENT = "traceparent"


class _OnEnd(SpanProcessor):
    """Calls each of ``callbacks`` with every span that ends (to wait on spans)."""

    def __init__(self, callbacks: list[Callable[[ReadableSpan], object]]) -> None:
        self.callbacks = callbacks

    def on_end(self, span: ReadableSpan) -> None:
        for callback in self.callbacks:
            callback(span)


@pytest.fixture
def ended() -> list[Callable[[ReadableSpan], object]]:
    return []


class _SessionSpans(InMemorySpanExporter):
    """Keeps the spans of one session and those of no session.

    A consumer that another test left running in this worker process may still be
    handling (and now tracing) its own session's messages.
    """

    def __init__(self, session: str) -> None:
        super().__init__()
        self.session = session

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        mine = [
            s
            for s in spans
            if (s.attributes or {}).get("swarmbus.session", self.session) == self.session
        ]
        return super().export(mine)


@pytest.fixture
def spans(
    monkeypatch: pytest.MonkeyPatch,
    ended: list[Callable[[ReadableSpan], object]],
    session_id: str,
) -> Iterator[InMemorySpanExporter]:
    """An SDK provider exporting ``session_id``'s spans to memory, for this test only."""
    exporter = _SessionSpans(session_id)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(_OnEnd(ended))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exporter
    provider.shutdown()


def _hex(value: int) -> str:
    return format(value, "016x")


def _one(found: list[ReadableSpan], what: str) -> ReadableSpan:
    assert len(found) == 1, f"{what}: {[s.name for s in found]}"
    return found[0]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


# --- across two processes -------------------------------------------------------------------


async def test_one_trace_across_two_processes(
    spans: InMemorySpanExporter, bus: Bus, nats_url: str, session_id: str, unique: str
) -> None:
    """Publisher (A) -> handler in process B (CONSUMER) -> B's follow-up writes (PRODUCER)."""
    agent_b = f"ops/analyst-{unique}"
    cmd = [sys.executable, str(HELPER), nats_url, session_id, agent_b]
    async with await anyio.open_process(cmd, env=_env(), stderr=None) as proc:
        try:
            assert proc.stdout is not None
            out = BufferedByteReceiveStream(proc.stdout)
            with anyio.fail_after(20):
                assert await out.receive_until(b"\n", 100) == b"ready"
            board = await Blackboard.open(bus, session_id)
            with session_span(session_id, agent="ops/lead") as root:
                await board.start("ops/lead", {"task": "investigate"})
                finding = await board.append_finding(
                    Finding(category="observation", content="error rate 5x", confidence=0.9),
                    agent="ops/lead",
                )
                trace_id = current_trace_id()
            with anyio.fail_after(30):
                theirs: list[dict[str, Any]] = json.loads(
                    await out.receive_until(b"\n", 10_000_000)
                )
                assert await proc.wait() == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    assert root is not None
    assert trace_id == format(root.get_span_context().trace_id, "032x")

    mine = spans.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in mine} == {trace_id}
    published = _one(
        [
            s
            for s in mine
            if s.kind is SpanKind.PRODUCER
            and (s.attributes or {}).get("messaging.message.id") == finding.id
        ],
        "finding publish",
    )
    assert {s["trace_id"] for s in theirs} == {trace_id}
    handler = next(s for s in theirs if s["kind"] == "CONSUMER")
    assert handler["parent_id"] == _hex(published.context.span_id)
    assert handler["attributes"]["messaging.message.id"] == finding.id
    assert handler["attributes"]["swarmbus.agent"] == agent_b
    follow_ups = [s for s in theirs if s["parent_id"] == handler["span_id"]]
    destinations = [s["attributes"]["messaging.destination.name"] for s in follow_ups]
    assert all(s["kind"] == "PRODUCER" for s in follow_ups)
    assert any(d.startswith(f"$KV.SWARMBUS_BOARD.{session_id}.hypothesis.") for d in destinations)
    assert f"agent.hypothesis.proposed.{session_id}.{agent_b}" in destinations
    assert any(d.startswith(f"swarmbus.task.{session_id}.verify.") for d in destinations)
    assert f"agent.task.created.{session_id}.{agent_b}" in destinations
    task_ids = {s["attributes"].get("swarmbus.task_id") for s in follow_ups} - {None}
    assert len(task_ids) == 1


async def test_the_demo_incident_is_one_trace(
    spans: InMemorySpanExporter, fresh_server: NatsServer, session_id: str
) -> None:
    """Every span of the demo's incident (agents, tasks, board, consensus) in one tree.

    On a server of its own: the demo's agent ids are fixed, so on the shared server their
    durable consumers would resume the backlog of other tests' demo sessions.
    """
    with anyio.fail_after(60):
        async with Bus.open(url=fresh_server.url) as bus:
            result = await incident(bus, session=session_id, echo=lambda line: None)
    finished = spans.get_finished_spans()
    assert len(finished) > 50
    strays = [
        (s.name, dict(s.attributes or {}))
        for s in finished
        if format(s.context.trace_id, "032x") != result.trace_id
    ]
    assert not strays
    ids = {s.context.span_id for s in finished}
    roots = [s for s in finished if s.parent is None]
    assert [s.name for s in roots] == ["incident INC-1234"]
    assert all(s.parent.span_id in ids for s in finished if s.parent is not None)
    kinds = {s.kind for s in finished}
    assert {SpanKind.PRODUCER, SpanKind.CONSUMER} <= kinds
    decision = _one(
        [s for s in finished if s.kind is SpanKind.CONSUMER and s.links], "decision with links"
    )
    assert "swarmbus.proposal_id" in (decision.attributes or {})


# --- conventions -----------------------------------------------------------------------------


async def test_publish_and_handle_follow_messaging_conventions(
    spans: InMemorySpanExporter, bus: Bus, session_id: str, unique: str
) -> None:
    handled = anyio.Event()
    seen: list[str | None] = []
    agent = Agent(f"ops/reader-{unique}")

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        seen.append(current_trace_id())
        handled.set()

    async with agent.serve(bus):
        sent = await bus.publish(
            Finding(category="observation", content="x", confidence=0.5),
            agent="ops/writer",
            session=session_id,
        )
        with anyio.fail_after(10):
            await handled.wait()
    subject = f"agent.finding.reported.{session_id}.ops/writer"
    producer = _one([s for s in spans.get_finished_spans() if s.kind is SpanKind.PRODUCER], "pub")
    consumer = _one([s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER], "con")
    assert producer.name == f"{subject} publish"
    assert dict(producer.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.message.id": sent.id,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "swarmbus.session": session_id,
        "swarmbus.agent": "ops/writer",
    }
    assert consumer.name == f"{subject} process"
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert dict(consumer.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.message.id": sent.id,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "swarmbus.session": session_id,
        "swarmbus.agent": agent.id,
    }
    assert seen == [format(producer.context.trace_id, "032x")]
    stored = await bus.js.get_last_msg(EVENTS_STREAM, subject)
    assert stored.headers is not None
    assert stored.headers[TRACEPARENT].split("-")[1:3] == [
        format(producer.context.trace_id, "032x"),
        _hex(producer.context.span_id),
    ]


async def test_blackboard_writes_carry_trace_context(
    spans: InMemorySpanExporter, bus: Bus, session_id: str
) -> None:
    board = await Blackboard.open(bus, session_id)
    with session_span(session_id):
        await board.start("ops/lead")
        trace_id = current_trace_id()
    assert trace_id is not None
    stored = await bus.js.get_last_msg(
        "KV_SWARMBUS_BOARD", f"$KV.SWARMBUS_BOARD.{session_id}.session"
    )
    assert stored.headers is not None
    assert stored.headers[TRACEPARENT].split("-")[1] == trace_id
    root = _one([s for s in spans.get_finished_spans() if s.parent is None], "roots")
    assert root.name == f"session {session_id}"
    assert (root.attributes or {})["swarmbus.session"] == session_id


async def test_board_start_roots_a_trace_of_its_own(
    spans: InMemorySpanExporter, bus: Bus, session_id: str
) -> None:
    """Without a caller's span, Blackboard.start is the root of the session's trace."""
    await (await Blackboard.open(bus, session_id)).start("ops/lead")
    finished = spans.get_finished_spans()
    root = _one([s for s in finished if s.parent is None], "roots")
    assert root.name == f"session {session_id}"
    assert {s.context.trace_id for s in finished} == {root.context.trace_id}
    assert len(finished) == 4  # the root, two KV writes, session.started


async def test_task_handler_continues_the_creators_trace(
    spans: InMemorySpanExporter, bus: Bus, session_id: str
) -> None:
    stop = anyio.Event()
    ran: list[str | None] = []

    async def handler(task: Any) -> dict[str, Any]:
        ran.append(current_trace_id())
        stop.set()
        return {}

    async with TaskQueue(bus, session_id) as queue:
        with session_span(session_id):
            task = await queue.create("investigate", agent="ops/lead")
            trace_id = current_trace_id()
        with anyio.fail_after(10):
            await queue.work(handler, agent="ops/worker", types=["investigate"], stop=stop)
    assert ran == [trace_id]
    finished = spans.get_finished_spans()
    consumer = _one([s for s in finished if s.kind is SpanKind.CONSUMER], "task handler")
    assert consumer.parent is not None
    dispatch = _one([s for s in finished if s.context.span_id == consumer.parent.span_id], "parent")
    assert dispatch.kind is SpanKind.PRODUCER
    assert dispatch.name.startswith(f"swarmbus.task.{session_id}.investigate.")
    for span in (consumer, dispatch):
        assert (span.attributes or {})["swarmbus.task_id"] == task.id
    for span in (consumer, dispatch):  # one message, one id
        assert (span.attributes or {})["messaging.message.id"] == f"task:{task.id}:dispatch"
    completed = _one(
        [s for s in finished if s.name.startswith(f"agent.task.completed.{session_id}.")],
        "task.completed",
    )
    assert completed.parent is not None
    assert completed.parent.span_id == consumer.context.span_id


async def test_lock_writes_carry_trace_context(
    spans: InMemorySpanExporter, bus: Bus, unique: str, session_id: str
) -> None:
    lock = Lock(bus, "file:/src/main.py", "ops/editor", bucket=f"LOCKS_{unique}")
    with session_span(session_id):
        assert await lock.acquire() is not None
        trace_id = current_trace_id()
    stored = await bus.js.get_last_msg(f"KV_LOCKS_{unique}", lock._subject)
    assert stored.headers is not None
    assert stored.headers[TRACEPARENT].split("-")[1] == trace_id
    write = _one([s for s in spans.get_finished_spans() if s.kind is SpanKind.PRODUCER], "lock")
    assert (write.attributes or {})["swarmbus.lock"] == "file:/src/main.py"
    assert (write.attributes or {})["swarmbus.agent"] == "ops/editor"
    await lock.release()


@pytest.fixture
async def service(bus: Bus, unique: str, session_id: str) -> AsyncIterator[ConsensusService]:
    started: asyncio.Future[ConsensusService] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def run() -> None:
        async with ConsensusService(bus, bucket=f"CONS_{unique}", session=session_id) as svc:
            started.set_result(svc)
            await stop.wait()

    task = asyncio.create_task(run())
    yield await asyncio.wait_for(asyncio.shield(started), 10)
    stop.set()
    await task


async def test_decision_continues_the_proposal_and_links_the_votes(
    spans: InMemorySpanExporter,
    ended: list[Callable[[ReadableSpan], object]],
    bus: Bus,
    service: ConsensusService,
    session_id: str,
    unique: str,
) -> None:
    consensus = await Consensus.open(bus, bucket=f"CONS_{unique}")
    decided = anyio.Event()
    ended.append(
        lambda span: (
            "swarmbus.proposal_id" in (span.attributes or {})
            and span.kind is SpanKind.CONSUMER
            and decided.set()
        )
    )
    voters = ["ops/a", "ops/b", "ops/c"]
    tracer = trace.get_tracer("test")
    with session_span(session_id) as root:
        await consensus.propose(
            Proposal(proposal_id="p1", action="rollback", voters=voters, timeout=60),
            agent="ops/a",
            session=session_id,
        )
    assert root is not None
    vote_spans = []
    for voter in voters[:2]:
        with tracer.start_as_current_span(f"vote {voter}") as span:  # a voter's own trace
            await consensus.vote(Vote(proposal_id="p1", vote="yes"), agent=voter)
        vote_spans.append(span)
    with anyio.fail_after(10):
        await consensus.wait_for_decision("p1", timeout=10)
        await decided.wait()  # the decider's span has ended
    decider = _one(
        [
            s
            for s in spans.get_finished_spans()
            if s.kind is SpanKind.CONSUMER and (s.attributes or {}).get("swarmbus.proposal_id")
        ],
        "decision",
    )
    assert decider.context.trace_id == root.get_span_context().trace_id
    assert {link.context.span_id for link in decider.links} == {
        s.get_span_context().span_id for s in vote_spans
    }
    decision = _one(
        [
            s
            for s in spans.get_finished_spans()
            if s.parent is not None
            and s.parent.span_id == decider.context.span_id
            and s.name.startswith("agent.action.decided.")
        ],
        "decision publish",
    )
    assert decision.kind is SpanKind.PRODUCER


def test_kv_writes_join_a_trace_but_never_start_one(
    spans: InMemorySpanExporter, session_id: str
) -> None:
    assert traced({}, "$KV.B.k", {}, new_trace=False) == {}
    with send_span("$KV.B.k", headers := {}, {}) as span:
        assert span is None
    assert headers == {}
    assert spans.get_finished_spans() == ()
    started = traced({}, "swarmbus.task.S.t.5", {})  # a dispatch message may start one
    assert TRACEPARENT in started
    with session_span(session_id):
        joined = traced({}, "$KV.B.k", {}, new_trace=False)
    assert joined[TRACEPARENT].split("-")[1] != started[TRACEPARENT].split("-")[1]
    assert len(spans.get_finished_spans()) == 3


# --- off ----------------------------------------------------------------------------------------


async def test_no_spans_and_no_trace_headers_when_off(bus: Bus, session_id: str) -> None:
    assert not tracing_enabled()
    headers: dict[str, str] = {}
    with producer_span("x", "id", {}, headers) as span, session_span(session_id) as root:
        assert span is None
        assert root is None
    assert headers == {}
    board = await Blackboard.open(bus, session_id)
    await board.start("ops/lead")
    await board.append_finding(
        Finding(category="observation", content="x", confidence=0.5), agent="ops/lead"
    )
    async with TaskQueue(bus, session_id) as queue:
        task = await queue.create("investigate", agent="ops/lead")
        claim = await queue.claim(agent="ops/worker", types=["investigate"], timeout=5)
        assert claim is not None
        await claim.complete({})
    assert current_trace_id() is None
    for stream, subject in [
        (EVENTS_STREAM, f"agent.finding.reported.{session_id}.ops/lead"),
        ("KV_SWARMBUS_BOARD", f"$KV.SWARMBUS_BOARD.{session_id}.session"),
        ("KV_swarmbus-tasks", f"$KV.swarmbus-tasks.{session_id}.{task.id}"),
    ]:
        stored = await bus.js.get_last_msg(stream, subject)
        assert TRACEPARENT not in (stored.headers or {}), subject


# --- configuration ------------------------------------------------------------------------------

_CONFIGURE = """
import os, sys
from swarmbus import configure_tracing, SwarmbusError
from swarmbus._telemetry import tracing_enabled

def case(name, env):
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]
    os.environ.update(env)
    try:
        print(name, configure_tracing(), tracing_enabled())
    except SwarmbusError as exc:
        print(name, type(exc).__name__, isinstance(exc, ImportError), exc)

case("default", {})
case("none", {"OTEL_TRACES_EXPORTER": "none"})
case("disabled", {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"})
case("bogus", {"OTEL_TRACES_EXPORTER": "bogus"})
case("otlp", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
case("console", {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "svc-x"})
from swarmbus import session_span
with session_span("S-1"):
    pass
"""


def test_configure_tracing_reads_the_otel_variables() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CONFIGURE],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[:4] == [
        "default False False",
        "none False False",
        "disabled False False",
        "bogus SwarmbusError False OTEL_TRACES_EXPORTER=bogus: "
        "swarmbus supports otlp, console, none",
    ]
    try:
        import opentelemetry.exporter.otlp  # noqa: F401
    except ImportError:
        assert lines[4] == (
            "otlp MissingDependencyError True OTLP trace export needs the otlp extra: "
            "pip install 'swarmbus[otlp]'"
        )
    else:
        assert lines[4] == "otlp True True"
        return
    assert lines[5] == "console True True"
    exported = json.loads("\n".join(lines[6:]))  # the console exporter prints the span at exit
    assert exported["name"] == "session S-1"
    assert exported["resource"]["attributes"]["service.name"] == "svc-x"


def test_cli_configures_tracing_at_startup() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "swarmbus._cli", "schemas", "--check"],
        env={**_env(), "OTEL_TRACES_EXPORTER": "bogus"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "OTEL_TRACES_EXPORTER=bogus" in result.stderr


async def test_handler_error_event_joins_the_trace_of_the_failed_message(
    spans: InMemorySpanExporter, bus: Bus, session_id: str, unique: str
) -> None:
    agent = Agent(f"ops/failing-{unique}")
    subject = f"agent.error.occurred.{session_id}.{agent.id}"
    reported = anyio.Event()

    async def on_error(msg: Any) -> None:
        reported.set()

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        raise RuntimeError("handler bug")

    sub = await bus.nc.subscribe(subject, cb=on_error)
    await bus.nc.flush()
    try:
        async with agent.serve(bus):
            with session_span(session_id):
                trace_id = current_trace_id()
                await bus.publish(
                    Finding(category="observation", content="x", confidence=0.5),
                    agent="ops/writer",
                    session=session_id,
                )
            with anyio.fail_after(10):
                await reported.wait()
    finally:
        await sub.unsubscribe()
    stored = await bus.js.get_last_msg(EVENTS_STREAM, subject)
    assert stored.headers is not None
    assert stored.headers[TRACEPARENT].split("-")[1] == trace_id
    consumer = _one([s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER], "con")
    assert not consumer.status.is_ok


async def test_request_handler_error_event_joins_the_requests_trace(
    spans: InMemorySpanExporter, bus: Bus, session_id: str, unique: str
) -> None:
    agent = Agent(f"ops/broken-{unique}")

    @agent.on_request(f"broken_{unique}")
    async def handle(request: Any) -> dict[str, Any]:
        raise ValueError("cannot do that")

    async with agent.serve(bus):
        with session_span(session_id):
            trace_id = current_trace_id()
            response = await bus.request(f"broken_{unique}", agent="ops/asker", session=session_id)
    assert response.response.status == "failure"
    # The error event is published before the answer: it is stored by now.
    stored = await bus.js.get_last_msg(
        EVENTS_STREAM, f"agent.error.occurred.{session_id}.{agent.id}"
    )
    assert stored.headers is not None
    assert stored.headers[TRACEPARENT].split("-")[1] == trace_id
    consumer = _one([s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER], "con")
    assert not consumer.status.is_ok


def test_mcp_server_configures_tracing_at_startup(nats_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "swarmbus._mcp"],
        env={
            **_env(),
            "AGENT_ID": "ops/mcp-tracing",
            "NATS_URL": nats_url,
            "OTEL_TRACES_EXPORTER": "bogus",
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "OTEL_TRACES_EXPORTER=bogus" in result.stderr


async def test_task_assigned_event_joins_the_creators_trace(
    spans: InMemorySpanExporter, bus: Bus, session_id: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:
        with session_span(session_id):
            task = await queue.create("investigate", agent="ops/lead")
            trace_id = current_trace_id()
        claim = await queue.claim(agent="ops/worker", types=["investigate"], timeout=5)
        assert claim is not None
        await claim.complete({})
    assigned = _one(
        [s for s in spans.get_finished_spans() if s.name.startswith("agent.task.assigned.")],
        "task.assigned",
    )
    assert format(assigned.context.trace_id, "032x") == trace_id
    assert (assigned.attributes or {})["swarmbus.session"] == session_id
    assert claim.task.id == task.id


async def test_a_vote_cast_outside_any_trace_joins_the_proposals(
    spans: InMemorySpanExporter, bus: Bus, session_id: str, unique: str
) -> None:
    await _vote_outside_any_trace(spans, bus, session_id, unique, via_service=False)


async def test_a_vote_sent_to_the_service_outside_any_trace_joins_the_proposals(
    spans: InMemorySpanExporter,
    bus: Bus,
    service: ConsensusService,
    session_id: str,
    unique: str,
) -> None:
    await _vote_outside_any_trace(spans, bus, session_id, unique, via_service=True)


async def _vote_outside_any_trace(
    spans: InMemorySpanExporter, bus: Bus, session_id: str, unique: str, *, via_service: bool
) -> None:
    consensus = await Consensus.open(bus, bucket=f"CONS_{unique}", via_service=via_service)
    with session_span(session_id):
        await consensus.propose(
            Proposal(proposal_id="p1", action="rollback", voters=["ops/a", "ops/b"], timeout=60),
            agent="ops/a",
            session=session_id,
        )
        trace_id = current_trace_id()
    await consensus.vote(Vote(proposal_id="p1", vote="yes"), agent="ops/b")  # e.g. via MCP
    voted = _one(
        [
            s
            for s in spans.get_finished_spans()
            if s.name.startswith("agent.action.voted.") and s.kind is SpanKind.PRODUCER
        ],
        "vote event",
    )
    assert format(voted.context.trace_id, "032x") == trace_id


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_completing_a_claim_outside_any_trace_joins_the_tasks(
    spans: InMemorySpanExporter, bus: Bus, session_id: str, outcome: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:
        with session_span(session_id):
            await queue.create("investigate", agent="ops/lead")
            trace_id = current_trace_id()
        # As the MCP server's complete_task / fail_task do: no span is current.
        claim = await queue.claim(agent="ops/worker", types=["investigate"], timeout=5)
        assert claim is not None
        await (claim.complete({}) if outcome == "completed" else claim.fail("no access"))
    event = _one(
        [s for s in spans.get_finished_spans() if s.name.startswith(f"agent.task.{outcome}.")],
        f"task.{outcome}",
    )
    assert format(event.context.trace_id, "032x") == trace_id


async def test_a_task_approved_outside_any_trace_runs_in_its_creators(
    spans: InMemorySpanExporter, bus: Bus, session_id: str
) -> None:
    ran: list[str | None] = []
    stop = anyio.Event()

    async def handler(task: Any) -> dict[str, Any]:
        ran.append(current_trace_id())
        stop.set()
        return {}

    async with TaskQueue(bus, session_id) as queue:
        with session_span(session_id):
            task = await queue.create("restart", agent="ops/lead", requires_approval=True)
            trace_id = current_trace_id()
        await queue.approve(task.id, by="ops/approver")  # no span is current
        with anyio.fail_after(10):
            await queue.work(handler, agent="ops/worker", types=["restart"], stop=stop)
    assert ran == [trace_id]


async def test_a_task_created_outside_any_trace_is_one_trace(
    spans: InMemorySpanExporter, bus: Bus, session_id: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:  # as the MCP server's tools do: no span
        await queue.create("investigate", agent="ops/lead")
        claim = await queue.claim(agent="ops/worker", types=["investigate"], timeout=5)
        assert claim is not None
        await claim.complete({})
    finished = spans.get_finished_spans()
    dispatch = _one([s for s in finished if s.name.startswith("swarmbus.task.")], "dispatch")
    for event in ("created", "assigned", "completed"):
        span = _one([s for s in finished if s.name.startswith(f"agent.task.{event}.")], event)
        assert span.context.trace_id == dispatch.context.trace_id, event
