"""Process B of the cross-process tracing test: an agent whose handler does follow-up work.

Usage: ``python tests/trace_agent.py NATS_URL SESSION AGENT``. Prints ``ready`` once its
handler is subscribed; after handling one finding (it proposes a hypothesis on the
board and creates a task, both inside its handler) it prints its finished spans as
one JSON line and exits.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from swarmbus import Agent, Blackboard, Bus, FindingMessage, TaskQueue


def span_json(span: ReadableSpan) -> dict[str, Any]:
    """The facts of a finished span the tests compare across processes."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "links": [format(link.context.span_id, "016x") for link in span.links],
    }


async def main(url: str, session: str, agent_id: str) -> None:
    agent = Agent(agent_id)
    handled = anyio.Event()

    async with Bus.open(url=url) as bus:
        board = await Blackboard.open(bus, session)

        @agent.on_finding(session=session)
        async def on_finding(message: FindingMessage) -> None:
            await board.propose_hypothesis(
                f"caused by: {message.finding.content}", 0.6, agent=agent_id
            )
            async with TaskQueue(bus, session) as queue:
                await queue.create("verify", agent=agent_id)
            handled.set()

        async with agent.serve(bus):
            print("ready", flush=True)
            with anyio.fail_after(30):
                await handled.wait()


if __name__ == "__main__":
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    anyio.run(main, *sys.argv[1:4])
    print(json.dumps([span_json(s) for s in exporter.get_finished_spans()]), flush=True)
