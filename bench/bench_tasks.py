"""End-to-end task queue throughput vs a raw JetStream pull-consumer loop, same server.

    python bench/bench_tasks.py [--tasks 20000] [--workers 2] [--batch 256]

Both runs: one process creates N items, ``--workers`` processes consume them with a
no-op handler. ``raw`` is the floor: publish to a work-queue stream, fetch in
batches, ack. ``tasks`` is swarmbus: create_many -> claim (KV CAS) -> complete (KV
CAS + ack), with the task.created/assigned/completed events. The clock runs from the
first create to the last completion.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StreamConfig

from swarmbus import Bus, NatsServer, TaskQueue, TaskSpec

ROOT = Path(__file__).resolve().parents[1]
RAW_STREAM = "BENCH_RAW"


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


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, __file__, *args], env=env)


async def run_raw(bus: Bus, url: str, n: int, workers: int, batch: int) -> float:
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
        start = time.perf_counter()
        for i in range(0, n, 1000):
            futures = [
                await bus.js.publish_async("bench.raw", b"x") for _ in range(min(1000, n - i))
            ]
            for f in futures:
                await f
        with anyio.fail_after(600):
            await all_done.wait()
        return time.perf_counter() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
        await sub.unsubscribe()


async def run_tasks(bus: Bus, url: str, n: int, workers: int, batch: int) -> float:
    session = f"bench-{os.getpid()}"
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
            start = time.perf_counter()
            for i in range(0, n, 1000):
                specs = [TaskSpec(type="noop") for _ in range(min(1000, n - i))]
                await queue.create_many(specs, agent="bench/creator")
            created = time.perf_counter() - start
            with anyio.fail_after(600):
                await all_done.wait()
            elapsed = time.perf_counter() - start
            print(f"  (creating all {n} took {created:.2f}s of it)")
        finally:
            for p in procs:
                p.kill()
                p.wait()
    await sub.unsubscribe()
    tasks = await queue.tasks()
    assert len(tasks) == n
    assert all(t.status == "completed" for t in tasks)
    return elapsed


async def bench(n: int, workers: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
        async with Bus.open(url=server.url) as bus:
            raw = await run_raw(bus, server.url, n, workers, batch)
            print(f"raw JetStream pull loop : {n / raw:8.0f} msgs/s  ({n} in {raw:.2f}s)")
            tasks = await run_tasks(bus, server.url, n, workers, batch)
            print(f"swarmbus TaskQueue      : {n / tasks:8.0f} tasks/s ({n} in {tasks:.2f}s)")
            print(f"ratio                   : {tasks / raw:8.1f}x the raw time")


def main() -> None:
    if sys.argv[1:2] == ["--raw-worker"]:
        anyio.run(raw_worker, sys.argv[2], int(sys.argv[3]))
        return
    if sys.argv[1:2] == ["--task-worker"]:
        anyio.run(task_worker, sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--batch", type=int, default=256, help="fetch batch / concurrency")
    args = parser.parse_args()
    print(
        f"{args.tasks} items, {args.workers} worker processes, batch {args.batch}, "
        f"{os.cpu_count()} CPUs"
    )
    anyio.run(bench, args.tasks, args.workers, args.batch)


if __name__ == "__main__":
    main()
