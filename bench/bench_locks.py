"""Benchmark swarmbus locks against a raw nats-py KV create+delete loop, in one run.

    python bench/bench_locks.py [--cycles 3000] [--handoffs 3000] [--contenders 8]

Starts its own nats-server (file storage, temp dir, 127.0.0.1) and prints a Markdown
table. The ``floor`` row is two bare compare-and-set requests, the round trips any
acquire + release needs, measured in the same run. Uses uvloop when it is installed
(``pip install -e '.[uvloop]'``). Contenders in separate processes, side by side with raw
JetStream and Redis designs: ``bench/bench_lock_procs.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from swarmbus import Bus, Lock, NatsServer

RESOURCE = "file:/src/main.py"
TTL = 30


def _row(name: str, count: int, elapsed: float, latencies: list[float] | None) -> str:
    rate = f"{count / elapsed:,.0f}/s"
    if not latencies:
        return f"| {name} | {rate} | | |"
    lat = sorted(latencies)
    p50 = statistics.median(lat) * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    return f"| {name} | {rate} | {p50:.2f} ms | {p99:.2f} ms |"


async def _cycles(n: int, cycle: Callable[[], Awaitable[None]]) -> tuple[float, list[float]]:
    for _ in range(min(200, n)):  # warm up
        await cycle()
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        await cycle()
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - start, latencies


async def _handoffs(buses: list[Bus], contenders: int, total: int) -> tuple[float, int, int]:
    """(elapsed, acquisitions, owner changes) with ``contenders`` looping acquire/release."""
    done = 0
    changes = 0
    last_owner = ""

    async def contender(i: int) -> None:
        nonlocal done, changes, last_owner
        lock = Lock(buses[i % len(buses)], RESOURCE, f"bench/c{i}", ttl=TTL, bucket="HANDOFF")
        while done < total:
            lease = await lock.acquire(timeout=30)
            assert lease is not None
            done += 1
            changes += lease.owner != last_owner
            last_owner = lease.owner
            await lock.release()

    start = time.perf_counter()
    await asyncio.gather(*(contender(i) for i in range(contenders)))
    return time.perf_counter() - start, done, changes


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
        async with AsyncExitStack() as stack:
            buses = [
                await stack.enter_async_context(Bus.open(url=server.url))
                for _ in range(args.contenders)
            ]
            bus = buses[0]
            version = bus.server_version
            rows = []

            kv = await bus.key_value("RAW", history=1, limit_marker_ttl=60)

            async def raw() -> None:
                await kv.create("k", b'{"owner":"bench/raw","ttl":30}', msg_ttl=TTL)
                await kv.delete("k")

            elapsed, lat = await _cycles(args.cycles, raw)
            rows.append(_row("raw nats-py `kv.create` + `kv.delete`", args.cycles, elapsed, lat))

            # The floor of any acquire + release: two compare-and-set round trips, here
            # as bare requests on one key of the same bucket type (no swarmbus code).
            floor_kv = await bus.key_value("FLOOR", history=1)
            last = await floor_kv.create("k", b"x")

            async def floor() -> None:
                nonlocal last
                for _ in range(2):
                    reply = await bus.nc.request(
                        "$KV.FLOOR.k",
                        b"x",
                        headers={"Nats-Expected-Last-Subject-Sequence": str(last)},
                    )
                    last = json.loads(reply.data)["seq"]

            elapsed, lat = await _cycles(args.cycles, floor)
            rows.append(_row("floor: 2 bare compare-and-set requests", args.cycles, elapsed, lat))

            lock = Lock(bus, RESOURCE, "bench/one", ttl=TTL)

            async def cycle() -> None:
                await lock.acquire()
                await lock.release()

            elapsed, lat = await _cycles(args.cycles, cycle)
            rows.append(_row("`Lock.acquire()` + `release()`", args.cycles, elapsed, lat))

            async def fresh() -> None:
                async with Lock(bus, RESOURCE, "bench/fresh", ttl=TTL):
                    pass

            elapsed, lat = await _cycles(args.cycles, fresh)
            rows.append(_row("`async with Lock(...)` (new object)", args.cycles, elapsed, lat))

            for connections in (1, args.contenders):
                elapsed, done, changes = await _handoffs(
                    buses[:connections], args.contenders, args.handoffs
                )
                rows.append(
                    _row(
                        f"hand-offs, {args.contenders} contenders on {connections} "
                        f"connection(s) ({changes / done:.0%} change owner)",
                        done,
                        elapsed,
                        None,
                    )
                )
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"nats-server {version}, event loop: {loop}")
    print("| benchmark | rate | p50 | p99 |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--handoffs", type=int, default=3000)
    parser.add_argument("--contenders", type=int, default=8)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))


if __name__ == "__main__":
    main()
