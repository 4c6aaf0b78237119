"""Tracing benchmark: event throughput with tracing off vs on vs no instrumentation.

Starts an embedded nats-server (JetStream, temp dir, 127.0.0.1) and measures
publish -> handler events/s (``bus.publish`` to an ``Agent`` handler on its durable
consumer, 64 publishes in flight, separate connections; ``bench_core.swarmbus_events``)
in three modes, in the same process and run, rotating their order every repeat:

* none: no instrumentation. The bus's tracing guard is replaced by the constant
  ``bool()`` (always False, a C call), so publish and dispatch run no tracing code.
* off: swarmbus as shipped with no tracer provider installed (the default).
* on: an OpenTelemetry SDK ``TracerProvider`` with a ``BatchSpanProcessor`` and an
  exporter that drops the spans (what it costs to create, fill and end them).

It also times the off path itself per message (the guard as called on publish and
on dispatch), which no load on the machine can blur.

Each mode's events/s is the median over ``--repeat`` runs; the paired ratio is the
median, over repeats, of the mode's rate divided by the "none" run of that repeat.

Run: ``python bench/bench_tracing.py [--events 3000] [--repeat 9]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import timeit
from collections.abc import Sequence
from pathlib import Path

import anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import swarmbus._bus
from swarmbus import Bus
from swarmbus._server import NatsServer
from swarmbus._telemetry import tracing_enabled

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import swarmbus_events

WIDTH = 64
MODES = ("none", "off", "on")


class DropExporter(SpanExporter):
    """Accepts and discards spans (the cost of tracing without a collector)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def use(mode: str, provider: TracerProvider) -> None:
    """Switch the process to ``mode`` (the global provider and the bus's guard)."""
    trace._TRACER_PROVIDER = provider if mode == "on" else None  # type: ignore[attr-defined]
    swarmbus._bus.tracing_enabled = bool if mode == "none" else tracing_enabled  # type: ignore[assignment]


async def run(url: str, events: int, repeat: int) -> dict[str, list[tuple[float, float]]]:
    async with Bus.open(url=url):  # provisions the event stream
        pass
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    await swarmbus_events(url, events // 3, "warmup", WIDTH)
    for r in range(repeat):
        for mode in MODES[r % 3 :] + MODES[: r % 3]:
            use(mode, provider)
            results[mode].append(
                await swarmbus_events(url, events, f"{mode}r{r}p{os.getpid()}", WIDTH)
            )
            print(f"  run {r} {mode}: {results[mode][-1][0]:.0f}/s", file=sys.stderr)
    use("off", provider)
    provider.shutdown()
    return results


def guard_ns() -> float:
    """Nanoseconds the off path spends per event (guard on publish and on dispatch)."""
    n = 1_000_000
    seconds = min(timeit.repeat(tracing_enabled, number=n, repeat=5))
    return 2 * seconds / n * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=3000, help="events per run")
    parser.add_argument("--repeat", type=int, default=9, help="runs per mode (median)")
    args = parser.parse_args()
    print(f"# {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="swarmbus-bench-") as tmp:
        server = NatsServer(tmp).start()
        try:
            results = anyio.run(run, server.url, args.events, args.repeat)
        finally:
            server.stop()
    base = statistics.median(rate for rate, _ in results["none"])
    print(
        "| mode | events/s (median) | min-max | median / none's | median of paired ratios "
        "| CPU us/event (median) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        rates = [rate for rate, _ in results[mode]]
        # Each repeat runs the three modes back to back: compare within a repeat.
        paired = statistics.median(
            rate / none for (rate, _), (none, _) in zip(results[mode], results["none"], strict=True)
        )
        cpu = statistics.median(c for _, c in results[mode])
        median = statistics.median(rates)
        print(
            f"| {mode} | {median:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
            f"{median / base:.3f}x | {paired:.3f}x | {cpu:.0f} |"
        )
    print(f"# off-path guard: {guard_ns():.0f} ns per event")
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
