"""Blackboard throughput and snapshot latency on a local nats-server.

Run: ``python bench/bench_blackboard.py [--findings 10000] [--writers 64]``

1. raw KV put: ``writers`` tasks put ``findings`` values (same size as a finding
   record) into a bucket, as a baseline for this machine;
2. raw create + publish: the same two acknowledged writes an append makes (a KV
   create, then a JetStream publish on the event subject) with plain nats-py, i.e. the
   floor of any design that stores the board entry and then its event;
3. Blackboard.append_finding: the same number of findings from ``writers`` tasks
   (each is a create-once KV write plus its finding.reported event);
4. Blackboard.snapshot of the session holding those findings (best and median of 5).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import anyio

from swarmbus import Blackboard, Bus, Finding, NatsServer


async def spread(total: int, writers: int, write: object) -> float:
    """Run ``write(i)`` for i in range(total) over ``writers`` tasks; returns writes/s."""
    assert callable(write)
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await write(i)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(writers):
            tg.start_soon(worker)
    return total / (time.perf_counter() - start)


async def main(findings: int, writers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
        async with Bus.open(url=server.url) as bus:
            board = await Blackboard.open(bus, "BENCH-1")
            body = Finding(
                category="observation",
                content="error rate spike correlates with deploy v1.2.3",
                confidence=0.8,
            )
            sample = await board.append_finding(body, agent="bench/warmup")
            value = board._encode("x", sample)
            raw = await bus.key_value("BENCH_RAW", history=1)

            async def put(i: int) -> None:
                await raw.put(f"raw.{i}", value)

            async def create_then_publish(i: int) -> None:
                await raw.create(f"pair.{i}", value)
                await bus.js.publish(
                    "agent.finding.reported.BENCH-2.bench", value, headers={"Nats-Msg-Id": str(i)}
                )

            async def append(i: int) -> None:
                await board.append_finding(body, agent=f"bench/w{i % writers}")

            raw_rate = await spread(findings, writers, put)
            pair_rate = await spread(findings, writers, create_then_publish)
            board_rate = await spread(findings, writers, append)
            print(f"raw KV put, {writers} writers:             {raw_rate:9.0f} /s")
            print(
                f"raw KV create + event publish (pair):  {pair_rate:9.0f} /s"
                f"  ({pair_rate / raw_rate:.2f}x put)"
            )
            print(
                f"append_finding, {writers} writers:         {board_rate:9.0f} /s"
                f"  ({board_rate / raw_rate:.2f}x put, {board_rate / pair_rate:.2f}x pair)"
            )

            times = []
            for _ in range(5):
                start = time.perf_counter()
                snapshot = await board.snapshot()
                times.append(time.perf_counter() - start)
            assert len(snapshot.findings) == findings + 1
            print(
                f"snapshot of {len(snapshot.findings)} findings:        "
                f"best {min(times) * 1000:.0f} ms, median {statistics.median(times) * 1000:.0f} ms"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--findings", type=int, default=10_000)
    parser.add_argument("--writers", type=int, default=64)
    args = parser.parse_args()
    anyio.run(main, args.findings, args.writers)
