"""Tracing: one incident, one trace, across agents (here with an in-memory exporter)."""

import secrets

import anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import swarmbus
from swarmbus import Agent, Blackboard, Finding, FindingMessage

SESSION = f"INC-1234-{secrets.token_hex(3)}"

# In your program: swarmbus.configure_tracing() (reads OTEL_*), or your own provider.
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

lead = Agent("security/incident-response-lead")
dba = Agent("ops/dba")
handled = anyio.Event()


@dba.on_finding(session=SESSION)
async def on_finding(message: FindingMessage) -> None:
    # The handler continues the trace of the message it handles.
    print("handler in trace", swarmbus.current_trace_id() == trace_id)
    handled.set()


trace_id: str | None = None


async def main() -> None:
    global trace_id
    async with swarmbus.connect() as bus, lead.serve(bus), dba.serve(bus):
        board = await Blackboard.open(bus, SESSION)
        with swarmbus.session_span(SESSION, agent=lead.id):
            trace_id = swarmbus.current_trace_id()  # 32 hex digits; None when tracing is off
            await board.start(lead.id, {"task": "investigate"})
            finding = Finding(category="observation", content="pool at 100%", confidence=0.8)
            await lead.publish(finding, session=SESSION)
        with anyio.fail_after(10):
            await handled.wait()
    provider.force_flush()
    spans = exporter.get_finished_spans()
    print("one trace:", {format(s.context.trace_id, "032x") for s in spans} == {trace_id})
    for name in sorted({s.name for s in spans}):
        print(" ", name)


anyio.run(main)
