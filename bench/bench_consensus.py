"""Consensus benchmark: deciding-vote -> decision-event latency and decisions/s.

Starts its own nats-server (temp dir, 127.0.0.1) and the consensus service as a
separate process (``swarmbus consensus``), opens ``--open`` majority proposals of 5
voters each with 2 yes votes (undecided), then:

1. latency: casts the deciding third yes vote on ``--samples`` of them, one at a
   time, and times the arrival of the ``agent.action.decided`` event from the
   moment the vote is committed (its KV compare-and-set acked: the service can
   see it no earlier) and, more conservatively, from the ``Consensus.vote()`` call
   (which also reads the record first and publishes the vote event);
2. throughput: casts the deciding votes on the rest with ``--concurrency`` voters in
   flight and counts decision events per second.

Usage: python bench/bench_consensus.py [--open 1000] [--samples 500] [--concurrency 64]
[--uvloop]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import swarmbus
from swarmbus import Bus, Consensus, DecisionMessage, Message, NatsServer, Proposal, Vote

# Worker processes import the swarmbus this process imported (bench/compare.py puts
# another revision first on PYTHONPATH).
SWARMBUS_HOME = str(Path(swarmbus.__file__).resolve().parents[1])
SESSION = "BENCH"
VOTERS = [f"bench/voter-{i}" for i in range(5)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(url: str, n_open: int, samples: int, concurrency: int) -> None:
    async with Bus.open(url=url) as bus:
        consensus = await Consensus.open(bus, settle=False)  # the service decides
        arrived: dict[str, float] = {}
        waiting: dict[str, anyio.Event] = {}
        remaining: set[str] = set()
        all_done = anyio.Event()

        async def on_decision(message: Message) -> None:
            assert isinstance(message, DecisionMessage)
            pid = message.decision.proposal_id
            arrived[pid] = time.perf_counter()
            if pid in waiting:
                waiting[pid].set()
            if pid in remaining:
                remaining.discard(pid)
                if not remaining:
                    all_done.set()

        await bus.subscribe(f"agent.action.decided.{SESSION}.>", on_decision, receiver="bench/obs")

        limiter = anyio.Semaphore(concurrency)

        async def open_one(i: int) -> None:
            async with limiter:
                pid = f"p{i}"
                proposal = Proposal(proposal_id=pid, action="rollback", voters=VOTERS, timeout=3600)
                await consensus.propose(proposal, agent=VOTERS[0], session=SESSION)
                for voter in VOTERS[:2]:
                    await consensus.vote(Vote(proposal_id=pid, vote="yes"), agent=voter)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n_open):
                tg.start_soon(open_one, i)
        print(
            f"opened {n_open} proposals (2 of 5 votes each) in {time.perf_counter() - start:.2f}s"
        )

        # Time when the deciding vote is committed: its KV compare-and-set is acked.
        committed: list[float] = []
        update = consensus.store.update

        async def timed_update(*args: Any, **kwargs: Any) -> int:
            revision: int = await update(*args, **kwargs)
            committed.append(time.perf_counter())
            return revision

        consensus.store.update = timed_update  # type: ignore[method-assign]
        latencies = []
        from_commit = []
        vote_calls = []
        for i in range(samples):
            pid = f"p{i}"
            waiting[pid] = anyio.Event()
            t0 = time.perf_counter()
            await consensus.vote(Vote(proposal_id=pid, vote="yes"), agent=VOTERS[2])
            vote_calls.append((time.perf_counter() - t0) * 1000)
            with anyio.fail_after(10):
                await waiting[pid].wait()
            latencies.append((arrived[pid] - t0) * 1000)
            from_commit.append((arrived[pid] - committed[-1]) * 1000)
        consensus.store.update = update  # type: ignore[method-assign]
        print(f"latency, {samples} samples, {n_open - samples}..{n_open} proposals open:")
        for name, values in [
            ("deciding vote committed (CAS acked) -> decision event", from_commit),
            ("vote() called -> decision event", latencies),
            ("vote() call itself (KV read + CAS + vote event)", vote_calls),
        ]:
            print(
                f"  {name}: p50 {statistics.median(values):.2f} ms, "
                f"p99 {_pct(values, 0.99):.2f} ms, max {max(values):.2f} ms"
            )

        rest = [f"p{i}" for i in range(samples, n_open)]
        if not rest:
            return
        remaining.update(rest)

        async def decide(pid: str) -> None:
            async with limiter:
                await consensus.vote(Vote(proposal_id=pid, vote="yes"), agent=VOTERS[2])

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for pid in rest:
                tg.start_soon(decide, pid)
        with anyio.fail_after(60):
            await all_done.wait()
        elapsed = max(arrived[p] for p in rest) - start
        print(
            f"throughput: {len(rest)} decisions in {elapsed:.2f}s = "
            f"{len(rest) / elapsed:.0f} decisions/s ({concurrency} deciding votes in flight)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open", type=int, default=1000, help="open proposals")
    parser.add_argument("--samples", type=int, default=500, help="latency samples")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--uvloop", action="store_true", help="service and client on uvloop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-consensus-") as tmp, NatsServer(tmp) as server:
        env = {**os.environ, "PYTHONPATH": SWARMBUS_HOME, "NATS_URL": server.url}
        service = subprocess.Popen(
            [sys.executable, "-m", "swarmbus._cli", "consensus", "--session", SESSION]
            + (["--uvloop"] if args.uvloop else []),
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert service.stdout is not None
            print(service.stdout.readline().strip())
            anyio.run(
                bench,
                server.url,
                args.open,
                args.samples,
                args.concurrency,
                backend_options={"use_uvloop": args.uvloop},
            )
        finally:
            service.terminate()
            service.wait(10)


if __name__ == "__main__":
    main()
