"""Blackboard throughput and snapshot latency on a local nats-server.

Run: ``python bench/bench_blackboard.py [--findings 5000] [--rounds 2] [--writers 64]``

Each round runs, one after the other (so load on a shared machine hits all three):

1. raw KV put: ``writers`` tasks put ``findings`` values (same size as a finding
   record) into a bucket, as a baseline for this machine;
2. raw create + publish: the same two acknowledged writes an append makes (a KV
   create, then a JetStream publish on the event subject) with plain nats-py, i.e. the
   floor of any design that stores the board entry and then its event;
3. Blackboard.append_finding: the same number of findings from ``writers`` tasks
   (each is a create-once KV write plus its finding.reported event);
4. Blackboard.snapshot of the session holding the findings of all rounds
   (``findings x rounds``, 10,000 by default; best and median of 5).
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


async def main(per_round: int, writers: int, repeat: int) -> None:
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

            rounds: list[tuple[float, float, float]] = []
            for r in range(repeat):

                async def put(i: int, r: int = r) -> None:
                    await raw.put(f"raw.{r}.{i}", value)

                async def create_then_publish(i: int, r: int = r) -> None:
                    await raw.create(f"pair.{r}.{i}", value)
                    await bus.js.publish(
                        "agent.finding.reported.BENCH-2.bench",
                        value,
                        headers={"Nats-Msg-Id": f"{r}.{i}"},
                    )

                async def append(i: int) -> None:
                    await board.append_finding(body, agent=f"bench/w{i % writers}")

                rounds.append(
                    (
                        await spread(per_round, writers, put),
                        await spread(per_round, writers, create_then_publish),
                        await spread(per_round, writers, append),
                    )
                )
            for name, col in (("raw KV put", 0), ("raw KV create + event publish", 1)):
                rates = [r[col] for r in rounds]
                print(f"{name:32} {' '.join(f'{x:7.0f}' for x in rates)}  /s")
            rates = [r[2] for r in rounds]
            print(f"{'append_finding':32} {' '.join(f'{x:7.0f}' for x in rates)}  /s")
            vs_put = [r[2] / r[0] for r in rounds]
            vs_pair = [r[2] / r[1] for r in rounds]
            print(
                f"{'append / put':32} {' '.join(f'{x:7.2f}' for x in vs_put)}  "
                f"median {statistics.median(vs_put):.2f}x"
            )
            print(
                f"{'append / (create + publish)':32} {' '.join(f'{x:7.2f}' for x in vs_pair)}  "
                f"median {statistics.median(vs_pair):.2f}x"
            )

            times = []
            for _ in range(5):
                start = time.perf_counter()
                snapshot = await board.snapshot()
                times.append(time.perf_counter() - start)
            assert len(snapshot.findings) == per_round * repeat + 1
            print(
                f"snapshot of {len(snapshot.findings)} findings:        "
                f"best {min(times) * 1000:.0f} ms, median {statistics.median(times) * 1000:.0f} ms"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--findings", type=int, default=5_000, help="writes per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (snapshot holds them all)")
    parser.add_argument("--writers", type=int, default=64)
    args = parser.parse_args()
    anyio.run(main, args.findings, args.writers, args.rounds)
