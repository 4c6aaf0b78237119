"""One task at a time: create -> completion seen by the creator, p50 / p99, three designs.

    python bench/bench_task_latency.py [--tasks 500] [--reps 3] [--warmup 50]
                                       [--loop asyncio|uvloop] [--only raw,safe,swarmbus]

Every design has its worker in a process of its own (as an agent would be: the
creator's and the worker's event loops do not share a core's turns), waiting for
work before the clock starts; the creator runs one task at a time and stops the clock
when it sees the task finished. Designs, alternating in each repetition:

* ``raw``: the issue's floor. Publish (acked) to a work-queue stream; the worker
  waits in ``fetch(1)``, acks, and publishes a core-NATS reply the creator listens to.
  No claim, no exactly-once completion, nothing durable about the outcome.
* ``safe``: raw nats-py with swarmbus's guarantees. Publish (acked) the dispatch; the
  worker waits in ``fetch(1)``, claims with a create-once KV write, completes with a
  compare-and-set on the claim's revision, then acks; the creator sees the completion
  write through one KV watch (ordered push consumer) started before the run.
* ``swarmbus``: ``TaskQueue.create`` then ``TaskQueue.wait`` (the record's completion
  write seen through the queue's watch, as the docs recommend); the worker is
  ``TaskQueue.work`` with a no-op handler, every lifecycle event published.

The load average is printed with each repetition; ratios are of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig

import swarmbus
from swarmbus import Bus, NatsServer, TaskQueue

# Worker processes import the swarmbus this process imported (bench/compare.py puts
# another revision first on PYTHONPATH; the script's own tree may be the other one).
SWARMBUS_HOME = str(Path(swarmbus.__file__).resolve().parents[1])
LOOP_ENV = "SWARMBUS_BENCH_LOOP"
RAW_STREAM = "LAT_RAW"
SAFE_STREAM = "LAT_SAFE"
SAFE_BUCKET = "lat-safe"
DESIGNS = ("raw", "safe", "swarmbus")


# --- workers (each in its own process) ---------------------------------------------


async def raw_worker(url: str) -> None:
    async with Bus.open(url=url) as bus:
        psub = await bus.js.pull_subscribe("lat.raw.*", durable="w", stream=RAW_STREAM)
        while True:
            try:
                (msg,) = await psub.fetch(1, timeout=5.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            await msg.ack()
            await bus.nc.publish(f"lat.done.{msg.subject.rsplit('.', 1)[1]}", b"")


async def safe_worker(url: str) -> None:
    async with Bus.open(url=url) as bus:
        kv = await bus.js.key_value(SAFE_BUCKET)
        psub = await bus.js.pull_subscribe("lat.safe.*", durable="w", stream=SAFE_STREAM)
        while True:
            try:
                (msg,) = await psub.fetch(1, timeout=5.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            key = msg.subject.rsplit(".", 1)[1]
            revision = await kv.create(key, b"claimed")  # the exactly-once commit point
            await kv.update(key, b"done", last=revision)  # completion: CAS on the claim
            await msg.ack()


async def swarmbus_worker(url: str, session: str) -> None:
    async def noop(task: object) -> dict[str, Any]:
        return {}

    async with Bus.open(url=url) as bus, TaskQueue(bus, session) as queue:
        await queue.work(noop, agent="bench/worker", types=["lat"], stop=anyio.Event())


# --- creators -----------------------------------------------------------------------


class Waiters:
    """Futures by key, resolved by a subscription callback."""

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[None]] = {}

    def expect(self, key: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.futures[key] = future
        return future

    def done(self, key: str) -> None:
        future = self.futures.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)


class Creators:
    """One creator per design on one connection; ``run(design)`` times one task."""

    def __init__(self, bus: Bus, session: str) -> None:
        self.bus = bus
        self.session = session
        self.waiters = Waiters()
        self.count = 0
        self.queue: TaskQueue | None = None

    async def setup(self) -> None:
        bus = self.bus
        for name, subject in ((RAW_STREAM, "lat.raw.*"), (SAFE_STREAM, "lat.safe.*")):
            await bus.ensure_stream(
                StreamConfig(name=name, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE)
            )
        await bus.js.create_key_value(bucket=SAFE_BUCKET, history=1)
        await bus.nc.subscribe("lat.done.*", cb=self._on_done)
        await bus.js.subscribe(
            f"$KV.{SAFE_BUCKET}.>",
            stream=f"KV_{SAFE_BUCKET}",
            cb=self._on_kv,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, mem_storage=True),
        )
        if not hasattr(TaskQueue, "wait"):
            await bus.js.subscribe(
                f"$KV.swarmbus-tasks.{self.session}.*",
                stream="KV_swarmbus-tasks",
                cb=self._on_record,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, mem_storage=True),
            )

    async def _on_done(self, msg: Msg) -> None:
        self.waiters.done(msg.subject.rsplit(".", 1)[1])

    async def _on_kv(self, msg: Msg) -> None:
        if msg.data == b"done":
            self.waiters.done(msg.subject.rsplit(".", 1)[1])

    async def _on_record(self, msg: Msg) -> None:
        # swarmbus before TaskQueue.wait (a revision to compare with): the same watch
        if b'"status":"completed"' in msg.data:
            self.waiters.done(msg.subject.rsplit(".", 1)[1])

    async def once(self, design: str) -> float:
        """Seconds from create to completion seen, for one task."""
        self.count += 1
        key = f"t{self.count}"
        if design == "swarmbus":
            assert self.queue is not None
            start = time.perf_counter()
            task = await self.queue.create("lat", agent="bench/creator")
            if hasattr(self.queue, "wait"):
                done = await self.queue.wait(task.id)
                assert done.status == "completed"
            else:  # an older swarmbus: its record's completion through the same watch
                future = self.waiters.expect(task.id)
                if (await self.queue.get(task.id)).status != "completed":
                    await future
            return time.perf_counter() - start
        future = self.waiters.expect(key)
        stream = "raw" if design == "raw" else "safe"
        start = time.perf_counter()
        await self.bus.js.publish(f"lat.{stream}.{key}", b"x")
        await future
        return time.perf_counter() - start


def cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": SWARMBUS_HOME}
    return subprocess.Popen([sys.executable, __file__, *args], env=env)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(n: int, reps: int, warmup: int, designs: list[str]) -> None:
    session = f"lat-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
        async with Bus.open(url=server.url) as bus, TaskQueue(bus, session) as queue:
            creators = Creators(bus, session)
            creators.queue = queue
            await creators.setup()
            workers = {
                "raw": spawn("--worker", "raw", server.url),
                "safe": spawn("--worker", "safe", server.url),
                "swarmbus": spawn("--worker", "swarmbus", server.url, session),
            }
            results: dict[str, list[tuple[float, float]]] = {d: [] for d in designs}
            try:
                for design in designs:  # connect, create consumers, warm up
                    for _ in range(warmup):
                        with anyio.fail_after(30):
                            await creators.once(design)
                for rep in range(reps):
                    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
                    for design in designs:
                        times = []
                        pids = (server.pid or 0, os.getpid(), workers[design].pid)
                        before = [cpu(pid) for pid in pids]
                        for _ in range(n):
                            with anyio.fail_after(10):
                                times.append(await creators.once(design))
                        used = [
                            (cpu(pid) - b) / n * 1e6 for pid, b in zip(pids, before, strict=True)
                        ]
                        p50, p99 = pct(times, 0.5) * 1e3, pct(times, 0.99) * 1e3
                        results[design].append((p50, p99))
                        print(
                            f"rep {rep + 1} {design:9s} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  "
                            f"(load {load}; CPU us/task server {used[0]:.0f}, creator "
                            f"{used[1]:.0f}, worker {used[2]:.0f})",
                            flush=True,
                        )
            finally:
                for proc in workers.values():
                    proc.kill()
                    proc.wait()
    print("medians over repetitions:")
    med = {
        d: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
        for d, rs in results.items()
    }
    for design, (p50, p99) in med.items():
        ratios = ""
        if design == "swarmbus":
            ratios = "  ".join(
                f"{p50 / med[d][0]:.2f}x / {p99 / med[d][1]:.2f}x of {d}"
                for d in designs
                if d != "swarmbus"
            )
        print(f"  {design:9s} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  {ratios}")
    print(f"load after: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")


def run(func: Any, *args: Any) -> None:
    anyio.run(func, *args, backend_options={"use_uvloop": os.environ.get(LOOP_ENV) == "uvloop"})


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        design, url, *rest = sys.argv[2:]
        worker = {"raw": raw_worker, "safe": safe_worker, "swarmbus": swarmbus_worker}[design]
        run(worker, url, *rest)
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=500, help="tasks per design and repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--only", default=",".join(DESIGNS))
    args = parser.parse_args()
    os.environ[LOOP_ENV] = args.loop
    designs = [d for d in DESIGNS if d in args.only.split(",")]
    print(
        f"{args.tasks} tasks x {args.reps} reps, one at a time, {args.loop}, "
        f"{os.cpu_count()} CPUs, designs {designs}"
    )
    run(bench, args.tasks, args.reps, args.warmup, designs)


if __name__ == "__main__":
    main()
