"""End-to-end task queue throughput vs a raw JetStream pull-consumer loop, same server.

    python bench/bench_tasks.py [--tasks 20000] [--workers 2] [--batch 256]
                                [--loop asyncio|uvloop] [--rounds 1]

Both runs: one process creates N items, ``--workers`` processes consume them with a
no-op handler. ``raw`` is the floor: publish to a work-queue stream, fetch in
batches, ack. ``tasks`` is swarmbus: create_many -> claim (KV CAS) -> complete (KV
CAS + ack), with the task.created/assigned/completed events. The clock runs from the
first create to the last completion. ``--loop`` picks the event loop of every
process (parent and workers); ``--rounds`` repeats raw + tasks to show the noise of
a shared machine (the load average is printed with each round).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StreamConfig

import swarmbus
from swarmbus import Bus, NatsServer, TaskQueue, TaskSpec

# Worker processes import the swarmbus this process imported (bench/compare.py puts
# another revision first on PYTHONPATH).
SWARMBUS_HOME = str(Path(swarmbus.__file__).resolve().parents[1])
RAW_STREAM = "BENCH_RAW"
LOOP_ENV = "SWARMBUS_BENCH_LOOP"


async def raw_worker(url: str, batch: int) -> None:
    async with Bus.open(url=url) as bus:
        psub = await bus.js.pull_subscribe("bench.raw", durable="raw", stream=RAW_STREAM)
        while True:
            try:
                msgs = await psub.fetch(batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                await msg.ack()
            await bus.nc.publish("bench.raw.done", str(len(msgs)).encode())


async def task_worker(url: str, session: str, batch: int) -> None:
    async def noop(task: object) -> dict[str, object]:
        return {}

    async with Bus.open(url=url) as bus, TaskQueue(bus, session) as queue:
        stop = anyio.Event()
        await queue.work(
            noop, agent=f"bench/w{os.getpid()}", types=["noop"], stop=stop, concurrency=batch
        )


def cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(pids: dict[str, list[int]], before: dict[str, float], n: int) -> str:
    """Microseconds of CPU per item by role since ``before``."""
    used = {role: sum(cpu(p) for p in ps) - before[role] for role, ps in pids.items()}
    return ", ".join(f"{role} {used[role] / n * 1e6:.0f}" for role in pids)


def snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu(p) for p in ps) for role, ps in pids.items()}


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": SWARMBUS_HOME}
    return subprocess.Popen([sys.executable, __file__, *args], env=env)


async def run_raw(bus: Bus, url: str, n: int, workers: int, batch: int, server: int) -> float:
    await bus.ensure_stream(
        StreamConfig(name=RAW_STREAM, subjects=["bench.raw"], retention=RetentionPolicy.WORK_QUEUE)
    )
    acked = 0
    all_done = anyio.Event()

    async def on_done(msg: Msg) -> None:
        nonlocal acked
        acked += int(msg.data)
        if acked >= n:
            all_done.set()

    sub = await bus.nc.subscribe("bench.raw.done", cb=on_done)
    procs = [spawn("--raw-worker", url, str(batch)) for _ in range(workers)]
    try:
        await anyio.sleep(1.0)  # let the workers connect and bind
        pids = {"server": [server], "producer": [os.getpid()], "workers": [p.pid for p in procs]}
        before = snapshot(pids)
        start = time.perf_counter()
        for i in range(0, n, 1000):
            futures = [
                await bus.js.publish_async("bench.raw", b"x") for _ in range(min(1000, n - i))
            ]
            for f in futures:
                await f
        with anyio.fail_after(600):
            await all_done.wait()
        elapsed = time.perf_counter() - start
        print(f"  raw CPU us/item: {cpu_split(pids, before, n)}")
        return elapsed
    finally:
        for p in procs:
            p.kill()
            p.wait()
        await sub.unsubscribe()


async def run_tasks(bus: Bus, url: str, n: int, workers: int, batch: int, server: int) -> float:
    session = f"bench-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    completed = 0
    all_done = anyio.Event()

    async def on_completed(msg: Msg) -> None:
        nonlocal completed
        completed += 1
        if completed >= n:
            all_done.set()

    sub = await bus.nc.subscribe(f"agent.task.completed.{session}.>", cb=on_completed)
    async with TaskQueue(bus, session) as queue:
        procs = [spawn("--task-worker", url, session, str(batch)) for _ in range(workers)]
        try:
            await anyio.sleep(1.0)
            pids = {"server": [server], "creator": [os.getpid()], "workers": [p.pid for p in procs]}
            before = snapshot(pids)
            start = time.perf_counter()
            for i in range(0, n, 1000):
                specs = [TaskSpec(type="noop") for _ in range(min(1000, n - i))]
                await queue.create_many(specs, agent="bench/creator")
            created = time.perf_counter() - start
            with anyio.fail_after(600):
                await all_done.wait()
            elapsed = time.perf_counter() - start
            print(f"  (creating all {n} took {created:.2f}s of it)")
            print(f"  tasks CPU us/task: {cpu_split(pids, before, n)}")
        finally:
            for p in procs:
                p.kill()
                p.wait()
    await sub.unsubscribe()
    tasks = await queue.tasks()
    assert len(tasks) == n
    assert all(t.status == "completed" for t in tasks)
    return elapsed


async def bench(n: int, workers: int, batch: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
        async with Bus.open(url=server.url) as bus:
            for _ in range(rounds):
                load = "/".join(f"{x:.1f}" for x in os.getloadavg())
                assert server.pid is not None
                raw = await run_raw(bus, server.url, n, workers, batch, server.pid)
                print(f"raw JetStream pull loop : {n / raw:8.0f} msgs/s  ({n} in {raw:.2f}s)")
                tasks = await run_tasks(bus, server.url, n, workers, batch, server.pid)
                print(f"swarmbus TaskQueue      : {n / tasks:8.0f} tasks/s ({n} in {tasks:.2f}s)")
                print(f"ratio                   : {tasks / raw:8.1f}x the raw time (load {load})")


def run(func: Any, *args: Any) -> None:
    anyio.run(func, *args, backend_options={"use_uvloop": os.environ.get(LOOP_ENV) == "uvloop"})


def main() -> None:
    if sys.argv[1:2] == ["--raw-worker"]:
        run(raw_worker, sys.argv[2], int(sys.argv[3]))
        return
    if sys.argv[1:2] == ["--task-worker"]:
        run(task_worker, sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--batch", type=int, default=256, help="fetch batch / concurrency")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    os.environ[LOOP_ENV] = args.loop  # inherited by the worker processes
    print(
        f"{args.tasks} items, {args.workers} worker processes, batch {args.batch}, "
        f"{args.loop}, {os.cpu_count()} CPUs"
    )
    run(bench, args.tasks, args.workers, args.batch, args.rounds)


if __name__ == "__main__":
    main()
