"""Core benchmark: typed events and request/reply, swarmbus vs raw nats-py, same run.

Starts an embedded nats-server (JetStream, temp dir, 127.0.0.1) and measures, on the
default asyncio loop and on uvloop:

* events: publish -> handler msgs/s. swarmbus: ``bus.publish`` (validated, typed
  envelope, Nats-Msg-Id) to an ``Agent`` handler on its durable consumer.
  raw: ``js.publish`` of the same bytes + a durable pull consumer fetch loop with
  acks, on the same stream. "seq" waits for each publish ack; "pipelined" keeps 64
  publishes in flight.
* request/reply: ``bus.request`` to an ``@on_request`` handler vs ``nc.request`` to
  a raw queue subscription that replies; sequential and 64 in flight.

Publisher/requester and consumer/responder use separate connections in both cases.
Each cell is the median of ``--repeat`` runs; raw and swarmbus runs alternate.

Run: ``python bench/bench_core.py`` (``--loop asyncio|uvloop|both``, ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from swarmbus import Agent, Bus, Finding, FindingMessage, RequestMessage
from swarmbus._bus import EVENTS_STREAM, MSG_ID_HEADER
from swarmbus._messages import encode, envelope_for
from swarmbus._server import NatsServer

IN_FLIGHT = 64
EVENT_TARGET = 0.75
REQUEST_TARGET = 0.8
FINDING = Finding(category="observation", content="p99 latency up 40% on checkout", confidence=0.7)

Runner = Callable[[str, int, str], Awaitable[float]]


async def _in_flight(n: int, width: int, op: Callable[[int], Awaitable[Any]]) -> None:
    """Run ``op(i)`` for i < n with ``width`` calls outstanding at any time."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await op(i)

    async with anyio.create_task_group() as tg:
        for _ in range(width):
            tg.start_soon(worker)


# --- events ---------------------------------------------------------------------------


async def swarmbus_events(url: str, n: int, tag: str, width: int) -> float:
    session = f"bench-sb-{tag}"
    done = anyio.Event()
    seen = 0
    agent = Agent(f"bench/consumer-{tag}", max_concurrency=16)

    @agent.on_finding(session=session)
    async def on_finding(message: FindingMessage) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    async with Bus.open(url=url) as sub_bus, Bus.open(url=url) as pub_bus:
        async with agent.serve(sub_bus):
            start = time.perf_counter()
            await _in_flight(
                n, width, lambda _: pub_bus.publish(FINDING, agent="bench/producer", session=session)
            )
            with anyio.fail_after(60):
                await done.wait()
            elapsed = time.perf_counter() - start
    return n / elapsed


async def raw_events(url: str, n: int, tag: str, width: int) -> float:
    session = f"bench-raw-{tag}"
    subject = f"agent.finding.reported.{session}.bench_producer"
    data = encode(envelope_for(FINDING, agent="bench_producer", session=session))
    done = anyio.Event()
    nc_sub = await nats.connect(url)
    nc_pub = await nats.connect(url)
    try:
        js_sub, js_pub = nc_sub.jetstream(), nc_pub.jetstream()
        durable = f"raw-{tag}"
        await js_sub.add_consumer(
            EVENTS_STREAM,
            ConsumerConfig(
                durable_name=durable,
                filter_subject=subject,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                max_ack_pending=1000,
            ),
        )
        psub = await js_sub.pull_subscribe_bind(durable, EVENTS_STREAM)

        async def consume() -> None:
            seen = 0
            while seen < n:
                try:
                    msgs = await psub.fetch(256, timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await msg.ack()
                    seen += 1
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            start = time.perf_counter()
            await _in_flight(
                n,
                width,
                lambda i: js_pub.publish(subject, data, headers={MSG_ID_HEADER: f"{tag}-{i}"}),
            )
            with anyio.fail_after(60):
                await done.wait()
            elapsed = time.perf_counter() - start
        await js_sub.delete_consumer(EVENTS_STREAM, durable)
    finally:
        await nc_pub.close()
        await nc_sub.close()
    return n / elapsed


# --- request / reply --------------------------------------------------------------------


async def swarmbus_requests(url: str, n: int, tag: str, width: int) -> float:
    agent = Agent(f"bench/responder-{tag}")
    capability = f"echo-{tag}"

    @agent.on_request(capability)
    async def echo(request: RequestMessage) -> dict[str, Any]:
        return {"ok": True, "n": request.request.parameters.get("n")}

    async with Bus.open(url=url) as srv_bus, Bus.open(url=url) as req_bus:
        async with agent.serve(srv_bus):
            start = time.perf_counter()
            await _in_flight(
                n,
                width,
                lambda i: req_bus.request(
                    capability, {"n": i}, agent="bench/requester", session="bench"
                ),
            )
            elapsed = time.perf_counter() - start
    return n / elapsed


async def raw_requests(url: str, n: int, tag: str, width: int) -> float:
    subject = f"raw.echo.{tag}"
    nc_srv = await nats.connect(url)
    nc_req = await nats.connect(url)
    try:

        async def respond(msg: Any) -> None:
            await msg.respond(b'{"ok":true}')

        await nc_srv.subscribe(subject, queue="echo", cb=respond)
        await nc_srv.flush()
        start = time.perf_counter()
        await _in_flight(n, width, lambda i: nc_req.request(subject, b'{"n":%d}' % i, timeout=5))
        elapsed = time.perf_counter() - start
    finally:
        await nc_req.close()
        await nc_srv.close()
    return n / elapsed


# --- driver -----------------------------------------------------------------------------

CASES: list[tuple[str, str, float, int, Callable[..., Awaitable[float]], Callable[..., Awaitable[float]]]] = [
    ("events", "seq", EVENT_TARGET, 1, swarmbus_events, raw_events),
    ("events", f"pipelined {IN_FLIGHT}", EVENT_TARGET, IN_FLIGHT, swarmbus_events, raw_events),
    ("request/reply", "seq", REQUEST_TARGET, 1, swarmbus_requests, raw_requests),
    ("request/reply", f"{IN_FLIGHT} in flight", REQUEST_TARGET, IN_FLIGHT, swarmbus_requests, raw_requests),
]


async def run_loop(url: str, loop: str, counts: dict[str, int], repeat: int) -> list[dict[str, Any]]:
    async with Bus.open(url=url):  # provisions the event stream both sides use
        pass
    rows = []
    for kind, mode, target, width, sb, raw in CASES:
        n = counts[f"{kind}/{width}"]
        sb_rates, raw_rates = [], []
        for r in range(repeat):
            tag = f"{loop}{kind[0]}{width}r{r}{os.getpid()}"
            raw_rates.append(await raw(url, n, tag, width))
            sb_rates.append(await sb(url, n, tag, width))
        row = {
            "loop": loop,
            "case": f"{kind} {mode}",
            "n": n,
            "raw": statistics.median(raw_rates),
            "swarmbus": statistics.median(sb_rates),
            "target": target,
        }
        row["ratio"] = row["swarmbus"] / row["raw"]
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict[str, Any]) -> str:
    ok = "ok" if row["ratio"] >= row["target"] else "MISSED"
    return (
        f"| {row['loop']:<7} | {row['case']:<26} | {row['n']:>6} | {row['raw']:>9.0f} | "
        f"{row['swarmbus']:>9.0f} | {row['ratio']:>5.2f} | >= {row['target']:.2f} {ok:<6} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    parser.add_argument("--url", default=None, help="use this server instead of an embedded one")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    counts = {
        "events/1": int(2000 * scale),
        f"events/{IN_FLIGHT}": int(20000 * scale),
        "request/reply/1": int(3000 * scale),
        f"request/reply/{IN_FLIGHT}": int(30000 * scale),
    }
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    print(
        f"# {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}, nats-py {importlib.metadata.version('nats-py')}"
    )
    print("| loop    | case                       |      n |  raw msg/s | swarmbus | ratio | target       |")
    print("|---------|----------------------------|--------|-----------|-----------|-------|--------------|")
    with tempfile.TemporaryDirectory(prefix="swarmbus-bench-") as tmp:
        server = None if args.url else NatsServer(tmp).start()
        url = args.url or server.url  # type: ignore[union-attr]
        try:
            for loop in loops:
                anyio.run(
                    run_loop, url, loop, counts, args.repeat,
                    backend_options={"use_uvloop": loop == "uvloop"},
                )
        finally:
            if server:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
