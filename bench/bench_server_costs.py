"""What each kind of JetStream write costs the server (and a nats-py client), in CPU.

    python bench/bench_server_costs.py [--writes 20000]

The task queue's floor is set by the writes each task needs (bench/README.md, "Task
queue"). This measures them one kind at a time: ``--writes`` pipelined publishes of a
400-byte payload from one connection, each acked on one reply inbox, against its own
nats-server (file storage, temp dir, 127.0.0.1). CPU comes from ``/proc`` (Linux):
the server's, and this process's (the nats-py client side: publish + parse the ack).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, RetentionPolicy, StreamConfig

from swarmbus import Bus, NatsServer

Write = tuple[str, bytes, dict[str, str] | None]
DATA = b"x" * 400
TRACE = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    nc: NatsClient, pid: int, n: int, write: Callable[[int], Write], acks: int | None = None
) -> tuple[float, float]:
    """Server and client µs per write; ``acks``: how many replies to expect (default n)."""
    expected = n if acks is None else acks
    inbox = nc.new_inbox()
    got = 0
    done = asyncio.Event()

    async def on_ack(msg: Msg) -> None:
        nonlocal got
        got += 1
        if got >= expected:
            done.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    server0, client0 = server_cpu(pid), time.process_time()
    for i in range(n):
        subject, data, headers = write(i)
        reply = f"{inbox}.{i}" if acks is None or (headers or {}).get("Nats-Batch-Commit") else ""
        await nc.publish(subject, data, reply=reply, headers=headers)
        if i % 500 == 499:
            await asyncio.sleep(0)  # let acks in, as a pipelined writer does
    if expected:
        await asyncio.wait_for(done.wait(), 120)
    else:
        await nc.flush()
    server = (server_cpu(pid) - server0) / n * 1e6
    client = (time.process_time() - client0) / n * 1e6
    await sub.unsubscribe()
    return server, client


async def measure_fast_ingest(nc: NatsClient, pid: int, n: int, flow: int) -> tuple[float, float]:
    """One fast-ingest batch (nats-server 2.14+) of ``n`` writes, flow-acked every ``flow``.

    The batch is in the reply subject: ``<inbox ending in the batch id>.<flow>.<gap
    mode>.<batch sequence>.<operation>.$FI`` (0 start, 1 add, 3 end of batch).
    """
    inbox = nc.new_inbox()  # its last token is the batch id
    done = asyncio.Event()

    async def on_ack(msg: Msg) -> None:
        if b'"count"' in msg.data:  # the batch ack, after the end-of-batch marker
            done.set()

    sub = await nc.subscribe(f"{inbox}.>", cb=on_ack)
    server0, client0 = server_cpu(pid), time.process_time()
    for i in range(n):
        reply = f"{inbox}.{flow}.ok.{i + 1}.{0 if i == 0 else 1}.$FI"
        await nc.publish(f"batched.{i % 7}", DATA, reply=reply, headers=ids())
        if i % 500 == 499:
            await asyncio.sleep(0)
    await nc.publish("batched.end", b"", reply=f"{inbox}.{flow}.ok.{n + 1}.3.$FI")
    await asyncio.wait_for(done.wait(), 120)
    server = (server_cpu(pid) - server0) / n * 1e6
    client = (time.process_time() - client0) / n * 1e6
    await sub.unsubscribe()
    return server, client


def ids(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Nats-Msg-Id": uuid.uuid4().hex, **(extra or {})}


def kv_writes(keys: list[str], expected: Callable[[int], int]) -> Callable[[int], Write]:
    """Write i: a compare-and-set of key i of bucket COSTS at revision ``expected(i)``."""

    def write(i: int) -> Write:
        headers = {"Nats-Expected-Last-Subject-Sequence": str(expected(i))}
        return f"$KV.COSTS.{keys[i]}", DATA, headers

    return write


def atomic_batches(size: int) -> Callable[[int], Write]:
    """Write i of consecutive atomic batches of ``size`` (the last one commits)."""
    batch = ""

    def write(i: int) -> Write:
        nonlocal batch
        if i % size == 0:
            batch = uuid.uuid4().hex
        headers = {
            "Nats-Msg-Id": uuid.uuid4().hex,
            "Nats-Batch-Id": batch,
            "Nats-Batch-Sequence": str(i % size + 1),
        }
        if i % size == size - 1:
            headers["Nats-Batch-Commit"] = "1"
        return f"atomic.{i % 7}", DATA, headers

    return write


async def bench(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
        assert server.pid is not None
        pid = server.pid
        async with Bus.open(url=server.url) as bus:
            nc, js = bus.nc, bus.js
            await js.add_stream(StreamConfig(name="PLAIN", subjects=["plain.>"]))
            await js.add_stream(StreamConfig(name="IDS", subjects=["ids.>"], duplicate_window=120))
            await js.add_stream(
                StreamConfig(name="WQ", subjects=["wq.>"], retention=RetentionPolicy.WORK_QUEUE)
            )
            await js.create_key_value(KeyValueConfig(bucket="COSTS", history=1))
            await nc.request(
                "$JS.API.STREAM.CREATE.ATOMIC",  # nats-py 2.16: no allow_atomic
                json.dumps(
                    {"name": "ATOMIC", "subjects": ["atomic.>"], "allow_atomic": True}
                ).encode(),
            )
            await nc.request(
                "$JS.API.STREAM.CREATE.BATCHED",
                json.dumps(
                    {"name": "BATCHED", "subjects": ["batched.>"], "allow_batched": True}
                ).encode(),
            )
            keys = [uuid.uuid4().hex for _ in range(n)]

            rows: list[tuple[str, tuple[float, float]]] = [
                (
                    "stream, acked",
                    await measure(nc, pid, n, lambda i: (f"plain.{i % 7}", DATA, None)),
                ),
                (
                    "stream, no reply (no ack)",
                    await measure(nc, pid, n, lambda i: (f"plain.{i % 7}", DATA, None), acks=0),
                ),
                (
                    "stream + Nats-Msg-Id (an event)",
                    await measure(nc, pid, n, lambda i: (f"ids.{i % 7}", DATA, ids())),
                ),
                (
                    "stream + Nats-Msg-Id + traceparent",
                    await measure(
                        nc, pid, n, lambda i: (f"ids.{i % 7}", DATA, ids({"traceparent": TRACE}))
                    ),
                ),
                (
                    "work queue, one subject each + Msg-Id (a dispatch)",
                    await measure(nc, pid, n, lambda i: (f"wq.{keys[i]}", DATA, ids())),
                ),
                (
                    "KV create-once (a first claim)",
                    await measure(nc, pid, n, kv_writes(keys, lambda i: 0)),
                ),
            ]
            first = (await js.stream_info("KV_COSTS")).state.last_seq - n + 1
            rows.append(
                (
                    "KV compare-and-set, history 1 (a completion)",
                    await measure(nc, pid, n, kv_writes(keys, lambda i: first + i)),
                )
            )
            for size in (10, 100):
                rows.append(
                    (
                        f"atomic batch of {size} + Msg-Id, one ack per batch",
                        await measure(nc, pid, n, atomic_batches(size), acks=n // size),
                    )
                )
            rows.append(
                (
                    "fast-ingest batch + Msg-Id, flow ack every 100",
                    await measure_fast_ingest(nc, pid, n, 100),
                )
            )
    print(f"{n} writes of each kind, 400-byte payloads, CPU µs per write")
    print("| write | server | client (nats-py) |")
    print("| --- | --- | --- |")
    for name, (srv, client) in rows:
        print(f"| {name} | {srv:.1f} | {client:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=20000)
    args = parser.parse_args()
    asyncio.run(bench(args.writes))


if __name__ == "__main__":
    main()
