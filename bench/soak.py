"""Soak: agents join and leave, sessions open and close, bad input mixed in.

    python bench/soak.py [--minutes 20] [--out bench/log/soak] [--agents 200] [--mode both]

One nats-server (file storage, temp dir, 127.0.0.1), one process running the swarm:

- ``--agents`` agents are served at any time, on two buses with ``--mode both`` (the
  default): every other agent on a bus whose agents share one consumer
  (``consumer_group``, agents joining and leaving it), the rest on a bus with one
  consumer per agent id (``--mode group`` / ``--mode agent``: all on one of them);
  every second a few leave (most for good, ``serve(leave=True)``; the rest just stop,
  so their consumer expires after the consumer_inactive_threshold set here, 30 s)
  and new agent ids take their place;
- each agent has a ``session="*"`` handler, and joins and leaves sessions while served
  (a per-session handler added or removed, ``update_handlers``);
- a publisher sends findings over a rolling window of sessions (opened and closed),
  and one message in 20 is bad input (not JSON) on an event subject.

Stream limits are set low (``event_max_age`` 120 s, ``dead_letter_max_age`` 120 s) so
a steady state is reached within minutes. Every 10 s it records the consumers of the
event stream, the server's RSS and the bytes of the event and dead-letter streams in
``<out>.csv``, and plots them in ``<out>.png`` (with matplotlib, if installed). After
warm-up each should stay flat.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from swarmbus import Agent, Bus, Finding, NatsServer, SwarmbusError

THRESHOLD = 30.0
COLUMNS = ("seconds", "consumers", "server_rss_mb", "event_bytes", "dead_letter_bytes")
GROUP = "soak-process"


def server_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _ignore(message: Any) -> None:
    pass


class Swarm:
    """The churning agents: each runs in its own task until told to leave."""

    def __init__(self, buses: list[Bus], tg: anyio.abc.TaskGroup) -> None:
        self.buses, self.tg = buses, tg
        self.leaving: dict[str, anyio.Event] = {}
        self.agents: dict[str, Agent] = {}
        self.next_id = 0
        self.handled = 0

    async def start_agent(self) -> None:
        agent = Agent(f"soak/a{self.next_id}")
        self.next_id += 1

        @agent.on_finding()
        async def on_finding(message: Any) -> None:
            self.handled += 1

        leave = anyio.Event()
        self.leaving[agent.id] = leave
        bus = self.buses[self.next_id % len(self.buses)]
        await self.tg.start(self._serve, agent, bus, leave)

    async def _serve(self, agent: Agent, bus: Bus, leave: anyio.Event, *, task_status: Any) -> None:
        for_good = random.random() < 0.8
        async with agent.serve(bus, leave=for_good):
            self.agents[agent.id] = agent
            task_status.started()
            await leave.wait()
        del self.agents[agent.id]

    def stop_some(self, n: int) -> None:
        for agent_id in random.sample(list(self.leaving), min(n, len(self.leaving))):
            self.leaving.pop(agent_id).set()

    async def join_or_leave(self, sessions: list[str]) -> None:
        """One served agent joins a session, or leaves one it had joined."""
        if not self.agents:
            return
        agent = random.choice(list(self.agents.values()))
        joined = [r.name for r in agent._events if r.name.startswith("s_")]
        if joined and random.random() < 0.5:
            agent.remove_handler(random.choice(joined))
        else:
            session = random.choice(sessions)
            name = f"s_{session}"
            if name in joined:
                return
            agent.on_event("finding", "reported", session=session, name=name)(_ignore)
        await agent.update_handlers()


async def publish(bus: Bus, stop: anyio.Event, rate: float) -> None:
    sent = 0
    window = 0
    started = time.monotonic()
    while not stop.is_set():
        sent += 1
        if sent % 500 == 0:
            window += 1  # sessions close, new ones open
        session = f"S{window}-{sent % 20}"
        try:
            if sent % 20 == 0:  # bad input
                bad = b"\x00not json" * 50
                await bus.js.publish(f"agent.finding.reported.{session}.soak_pub", bad)
            else:
                finding = Finding(category="observation", content="x" * 200, confidence=0.5)
                await bus.publish(finding, agent="soak/pub", session=session, wait=False)
        except (SwarmbusError, TimeoutError, OSError) as exc:  # a loaded machine: go on
            print(f"# publish failed: {exc!r}", flush=True)
        lag = sent / rate - (time.monotonic() - started)
        if lag > 0:
            await anyio.sleep(lag)


async def sample(bus: Bus, pid: int, started: float) -> list[float]:
    events = (await bus.js.stream_info("SWARMBUS_EVENTS")).state
    dead = (await bus.js.stream_info("SWARMBUS_DEAD")).state
    return [
        round(time.monotonic() - started, 1),
        events.consumer_count,
        round(server_rss_mb(pid), 1),
        events.bytes,
        dead.bytes,
    ]


async def soak(args: argparse.Namespace) -> list[list[float]]:
    rows: list[list[float]] = []
    limits: dict[str, Any] = {
        "consumer_inactive_threshold": THRESHOLD,
        "event_max_age": 120.0,
        "dead_letter_max_age": 120.0,
        "event_max_bytes": 256 * 1024**2,
        "dead_letter_max_bytes": 64 * 1024**2,
    }
    with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
        assert server.pid is not None
        async with contextlib.AsyncExitStack() as stack:
            buses = []
            if args.mode in ("group", "both"):
                opened = Bus.open(url=server.url, consumer_group=GROUP, **limits)
                buses.append(await stack.enter_async_context(opened))
            if args.mode in ("agent", "both"):
                buses.append(await stack.enter_async_context(Bus.open(url=server.url, **limits)))
            await run_swarm(args, buses, server.pid, rows)
    return rows


async def run_swarm(args: argparse.Namespace, buses: list[Bus], pid: int, rows: list[Any]) -> None:
    bus = buses[0]
    stop = anyio.Event()
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        swarm = Swarm(buses, tg)
        for _ in range(args.agents):
            await swarm.start_agent()
        tg.start_soon(publish, bus, stop, args.rate)
        next_sample = 0.0
        while time.monotonic() - started < args.minutes * 60:
            swarm.stop_some(args.churn)
            for _ in range(args.churn):
                await swarm.start_agent()
            sessions = [f"S{int(time.monotonic() - started) // 30}-{i}" for i in range(20)]
            for _ in range(args.churn):
                await swarm.join_or_leave(sessions)
            if time.monotonic() - started >= next_sample:
                rows.append(await sample(bus, pid, started))
                print(*rows[-1], swarm.handled, sep="\t", flush=True)
                write_csv(rows, args.out)
                next_sample += 10.0
            await anyio.sleep(1.0)
        stop.set()
        swarm.stop_some(len(swarm.leaving))


def write_csv(rows: list[list[float]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def write(rows: list[list[float]], out: Path) -> None:
    write_csv(rows, out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    minutes = [r[0] / 60 for r in rows]
    labels = ("event consumers", "server RSS (MB)", "event stream (MB)", "dead letters (MB)")
    for i, (ax, label) in enumerate(zip(axes, labels, strict=True)):
        scale = 1 if i < 2 else 1024**2
        ax.plot(minutes, [r[i + 1] / scale for r in rows])
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("minutes")
    fig.suptitle("swarmbus soak: agents joining/leaving, sessions, bad input")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--churn", type=int, default=5, help="agents replaced per second")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--out", type=Path, default=Path("bench/log/soak"))
    parser.add_argument("--mode", choices=("both", "group", "agent"), default="both")
    args = parser.parse_args()
    print(f"# load {os.getloadavg()[0]:.1f}; columns: {', '.join(COLUMNS)}, handled")
    write(anyio.run(soak, args), args.out)


if __name__ == "__main__":
    main()
