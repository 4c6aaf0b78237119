"""Many agents, many sessions: idle cost and event cost, swarmbus vs raw nats-py.

    python bench/bench_scale.py [--quick] [--idle 1,1000,10000] [--sessions 1,1000,10000,100000]

Each case runs against its own nats-server (file storage, temp dir, 127.0.0.1), the
two designs side by side in the same run:

- idle: N agents, each with an event handler, served in one process: swarmbus with
  one durable consumer per agent id (the default; a long pull with idle heartbeats
  each), swarmbus with one consumer per process (``consumer_group`` set: the N agents
  share one durable, dispatch in process) and the raw design (one durable pull
  consumer per process on ``agent.>``, one long ``fetch`` at a time, dispatch in
  process to N handlers). After a warm-up, client CPU (this process) and server CPU
  over ``--window`` seconds (default: one long pull's expiry + 5 s, so every agent's
  re-pull and heartbeats fall inside), and the server's RSS (``/proc``, Linux only).
- events: 1 agent with a ``session="*"`` handler vs the raw consumer (push delivery to a
  callback, for the lowest latency: its long ``fetch(64)`` waits for 64); ``--events``
  events (at least S) published (64 in flight, acked) round robin over S sessions; events/s from
  the first publish to the last handler call, p99 of publish -> handler latency.
- agent events (``--agent-events``): N agents in one process, each following a session
  of its own, ``--events`` events round robin over the N sessions (each reaches one
  agent): one consumer per agent id (only up to 1,000 agents: starting 10,000
  consumers takes minutes), one per process (``consumer_group``), and the raw push
  consumer dispatching by session.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from swarmbus import Agent, Bus, Finding, FindingMessage, NatsServer, Settings
from swarmbus._agent import serving

WARMUP = 3.0


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def idle_cost(pid: int, window: float) -> tuple[float, float, float]:
    """Client %, server % of one core over ``window`` s, and server RSS in MB."""
    await anyio.sleep(WARMUP)
    s0, c0, t0 = server_cpu(pid), time.process_time(), time.monotonic()
    await anyio.sleep(window)
    elapsed = time.monotonic() - t0
    client = (time.process_time() - c0) / elapsed * 100
    server = (server_cpu(pid) - s0) / elapsed * 100
    return client, server, server_rss_mb(pid)


async def _ignore(message: Any) -> None:
    pass


def idle_agents(n: int) -> list[Agent]:
    agents = []
    for i in range(n):
        agent = Agent(f"bench/idle{i}")
        agent.on_finding(session=f"S{i}")(_ignore)  # a session each: n distinct filters
        agents.append(agent)
    return agents


async def idle_swarmbus(url: str, pid: int, n: int, window: float) -> tuple[float, float, float]:
    async with Bus.open(url=url) as bus, serving(bus, idle_agents(n)):
        return await idle_cost(pid, window)


async def idle_group(url: str, pid: int, n: int, window: float) -> tuple[float, float, float]:
    """One consumer per process: the n agents share the durable ``bench-process``."""
    agents = idle_agents(n)
    async with Bus.open(url=url, consumer_group="bench-process") as bus, serving(bus, agents):
        return await idle_cost(pid, window)


class RawConsumer:
    """The raw design: one durable pull consumer per process, dispatch by session."""

    def __init__(self, nc: Any, handlers: dict[str, Callable[[Any], Awaitable[None]]]) -> None:
        self.nc, self.handlers = nc, handlers
        self.default: Callable[[Any], Awaitable[None]] | None = None

    async def push(self, durable: str, stop: anyio.Event) -> None:
        """Push delivery (a callback per message): the low-latency raw design."""
        js = self.nc.jetstream()

        async def on_msg(msg: Any) -> None:
            session = msg.subject.split(".")[3]
            handler = self.handlers.get(session, self.default)
            if handler is not None:
                await handler(json.loads(msg.data))
            await msg.ack()

        sub = await js.subscribe(
            "agent.>", durable=durable, cb=on_msg, manual_ack=True, stream="SWARMBUS_EVENTS"
        )
        await stop.wait()
        await sub.unsubscribe()

    async def run(self, durable: str, stop: anyio.Event) -> None:
        js = self.nc.jetstream()
        await js.add_consumer(
            "SWARMBUS_EVENTS",
            ConsumerConfig(
                durable_name=durable,
                filter_subject="agent.>",
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                max_ack_pending=1000,
            ),
        )
        psub = await js.pull_subscribe_bind(durable, "SWARMBUS_EVENTS")
        async with anyio.create_task_group() as tg:

            async def stopper() -> None:
                await stop.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stopper)
            while True:
                try:
                    msgs = await psub.fetch(64, timeout=30, heartbeat=10)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                for msg in msgs:
                    session = msg.subject.split(".")[3]
                    handler = self.handlers.get(session, self.default)
                    if handler is not None:
                        await handler(json.loads(msg.data))
                    await msg.ack()


async def idle_raw(url: str, pid: int, n: int, window: float) -> tuple[float, float, float]:
    nc = await nats.connect(url)
    raw = RawConsumer(nc, {f"S{i}": _ignore for i in range(n)})
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(raw.run, "raw-idle", stop)
            result = await idle_cost(pid, window)
            stop.set()
    finally:
        await nc.close()
    return result


class Sink:
    """Receive times of sent events, by id."""

    def __init__(self, total: int) -> None:
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.total = total
        self.done = anyio.Event()
        self.last = 0.0

    def got(self, key: str) -> None:
        now = time.monotonic()
        sent = self.sent.pop(key, None)
        if sent is not None:
            self.latencies.append(now - sent)
            self.last = now
            if len(self.latencies) >= self.total:
                self.done.set()

    def result(self, started: float) -> tuple[float, float]:
        rate = len(self.latencies) / max(self.last - started, 1e-9)
        p99 = statistics.quantiles(self.latencies, n=100)[98] * 1000
        return rate, p99


async def publish_all(send: Callable[[int], Awaitable[None]], total: int) -> None:
    """``total`` sends, 64 in flight."""
    limiter = anyio.Semaphore(64)

    async def one(i: int) -> None:
        async with limiter:
            await send(i)

    async with anyio.create_task_group() as tg:
        for i in range(total):
            await limiter.acquire()
            limiter.release()
            tg.start_soon(one, i)


async def events_swarmbus(url: str, sessions: int, total: int) -> tuple[float, float]:
    sink = Sink(total)
    agent = Agent(f"bench/sink{sessions}", max_concurrency=64)

    @agent.on_finding()
    async def on_finding(message: FindingMessage) -> None:
        sink.got(message.id)

    async with Bus.open(url=url) as bus, agent.serve(bus, leave=True):
        started = time.monotonic()

        async def send(i: int) -> None:
            key = f"e{sessions}-{i}"
            sink.sent[key] = time.monotonic()
            await bus.publish(
                Finding(category="observation", content="x", confidence=0.5),
                agent="bench/pub",
                session=f"S{i % sessions}",
                id=key,
            )

        await publish_all(send, total)
        with anyio.fail_after(120):
            await sink.done.wait()
        return sink.result(started)


async def agent_events(url: str, n: int, total: int, group: str | None) -> tuple[float, float]:
    """n agents, a session each, in one process; events round robin over the sessions."""
    sink = Sink(total)
    agents = []
    for i in range(n):
        agent = Agent(f"bench/ae{i}", max_concurrency=64)

        @agent.on_finding(session=f"S{i}")
        async def on_finding(message: FindingMessage) -> None:
            sink.got(message.id)

        agents.append(agent)
    async with Bus.open(url=url, consumer_group=group) as bus, serving(bus, agents):
        started = time.monotonic()

        async def send(i: int) -> None:
            key = f"a{n}-{i}"
            sink.sent[key] = time.monotonic()
            await bus.publish(
                Finding(category="observation", content="x", confidence=0.5),
                agent="bench/pub",
                session=f"S{i % n}",
                id=key,
            )

        await publish_all(send, total)
        with anyio.fail_after(300):
            await sink.done.wait()
        return sink.result(started)


async def events_raw(url: str, sessions: int, total: int) -> tuple[float, float]:
    sink = Sink(total)
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def handler(body: Any) -> None:
        sink.got(body["id"])

    raw = RawConsumer(nc, {})
    raw.default = handler
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(raw.push, f"raw-events{sessions}", stop)
            await anyio.sleep(1.0)  # the consumer is created (bench only)
            started = time.monotonic()

            async def send(i: int) -> None:
                key = f"r{sessions}-{i}"
                sink.sent[key] = time.monotonic()
                data = json.dumps({"id": key, "finding": "x"}).encode()
                await js.publish(f"agent.finding.reported.S{i % sessions}.bench_pub", data)

            await publish_all(send, total)
            with anyio.fail_after(120):
                await sink.done.wait()
            stop.set()
    finally:
        await nc.close()
    return sink.result(started)


async def bench(args: argparse.Namespace) -> None:
    print(
        "| case | swarmbus, a consumer per agent id | swarmbus, a consumer per process "
        "(consumer_group) | raw nats-py (one consumer per process) |"
    )
    print("| --- | --- | --- | --- |")
    for n in (n for n in args.idle if n > 0):
        row = []
        for design in (idle_swarmbus, idle_group, idle_raw):
            with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
                async with Bus.open(url=server.url):  # provision the streams
                    pass
                assert server.pid is not None
                client, srv, rss = await design(server.url, server.pid, n, args.window)
                row.append(f"client {client:.1f} %, server {srv:.1f} %, RSS {rss:.0f} MB")
        ratio = f" ({float(row[1].rsplit(' ', 2)[1]) / float(row[2].rsplit(' ', 2)[1]):.2f}x raw)"
        print(f"| idle, {n:,} agents | {row[0]} | {row[1]}{ratio} | {row[2]} |", flush=True)
    for s in (s for s in args.sessions if s > 0):
        row = []
        for events in (events_swarmbus, events_raw):
            with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
                async with Bus.open(url=server.url):
                    pass
                rate, p99 = await events(server.url, s, max(args.events, s))
                row.append(f"{rate:,.0f} events/s, p99 {p99:.1f} ms")
        print(f"| events, {s:,} sessions | {row[0]} | (as per agent id: one agent) | {row[1]} |")
    for n in (n for n in args.agent_events if n > 0):
        row = []
        for group in (None, "bench-process", "raw"):
            if group is None and n > 1000:
                row.append("(not run)")
                continue
            with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
                async with Bus.open(url=server.url):
                    pass
                total = max(args.events, n)
                if group == "raw":
                    rate, p99 = await events_raw(server.url, n, total)
                else:
                    rate, p99 = await agent_events(server.url, n, total, group)
                row.append(f"{rate:,.0f} events/s, p99 {p99:.1f} ms")
        print(f"| events, {n:,} agents, a session each | {' | '.join(row)} |", flush=True)


def counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, shorter windows")
    parser.add_argument("--idle", type=counts, default=None, help="0: skip")
    parser.add_argument("--sessions", type=counts, default=None, help="0: skip")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--agent-events", type=counts, default=[0], help="e.g. 1000,10000")
    parser.add_argument("--window", type=float, default=None, help="idle window, seconds")
    args = parser.parse_args()
    quick = args.quick
    args.idle = args.idle or ([1, 100, 1000] if quick else [1, 1000, 10000])
    args.sessions = args.sessions or ([1, 1000, 10000] if quick else [1, 1000, 10000, 100000])
    args.events = args.events or (2000 if quick else 20000)
    args.window = args.window or Settings.from_env().pull_expires + 5.0
    print(f"# load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")
    anyio.run(bench, args)


if __name__ == "__main__":
    main()
