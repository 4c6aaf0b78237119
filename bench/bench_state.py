"""The state stores against their raw clients, side by side in one run.

    python bench/bench_state.py [--ops 2000] [--reps 3] [--writers 16]

Starts its own nats-server, redis-server and PostgreSQL (temp dirs, 127.0.0.1; as root
PostgreSQL runs as the ``postgres`` user) and alternates store and raw runs, ``--reps``
times, printing a Markdown table with the store / raw ratio of each pair, by wall
clock and per CPU second (this process plus the server's process tree: steadier than
wall-clock rates on a loaded machine):

* **lock cycle** (Redis): ``RedisStore.create(ttl)`` + ``delete(revision)`` against the
  seed's ``AgentLock``: ``SET NX EX`` + the Lua owner-only release (``EVAL``).
* **lock hand-off** (Redis): two owners alternate on one lock, each retrying its
  acquire until the other released; same two implementations.
* **create -> CAS -> delete** on each backend: the store against the same three writes
  with the raw client (NATS ``kv.create/update/delete``; Redis ``SET NX``, ``SET XX``,
  ``DEL``; PostgreSQL ``INSERT``, ``UPDATE ... WHERE revision``, ``DELETE`` on a plain
  table).
* **append** (a finding-sized create-once under a new key, ``--writers`` concurrent):
  the store against NATS ``kv.create``, Redis ``SET NX``, PostgreSQL ``INSERT``.
* **task create -> claim -> complete** on each backend (``--ops`` tasks per run): create
  them all (``create_many``), then one ``TaskQueue.work()`` loop (concurrency
  ``--writers``) claims and completes them, with its lifecycle events on NATS. Raw,
  with the same guarantees as near as a raw design gets (atomic claim with a lease and
  an attempt count, completion by compare-and-set on a revision, creates ``--writers``
  at a time, ``--writers`` workers each claiming one task and completing it): Redis, a
  hash per task + a sorted set by priority (FIFO within) + a sorted set of leases,
  claim and complete one Lua script each; PostgreSQL, a plain table, claim
  ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)``, complete
  ``UPDATE ... WHERE revision = $n``; NATS, bench_tasks.py's raw JetStream loop
  (publish to a work-queue stream, fetch ``--writers`` at a time, ack).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import psycopg
import redis.asyncio as aioredis
from nats.js.api import RetentionPolicy, StreamConfig

from swarmbus import Bus, ConflictError, Lock, NatsServer, Task, TaskQueue, TaskSpec
from swarmbus._jetstream.store import NatsStore
from swarmbus._postgres_store import PostgresStore, open_pool
from swarmbus._redis_store import LOCKS_BUCKET, RedisStore
from swarmbus._state import StateStore
from swarmbus._subjects import lock_key
from tests._stores import PostgresServer, RedisServer

TTL = 30
VALUE = b'{"id":"F","agent":"ops/deploy-validator","category":"observation",' + b"x" * 240 + b"}"
RELEASE = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("del", KEYS[1])
else
    return 0
end
"""

Run = Callable[[int], Awaitable[None]]


class SeedLock:
    """The seed's AgentLock, on redis-py asyncio."""

    def __init__(self, client: aioredis.Redis, resource: str, agent: str) -> None:
        self.redis = client
        self.lock_key = f"agent:lock:{resource}"
        self.agent = agent

    async def acquire(self) -> bool:
        return bool(await self.redis.set(self.lock_key, self.agent, nx=True, ex=TTL))

    async def release(self) -> None:
        await self.redis.eval(RELEASE, 1, self.lock_key, self.agent)  # type: ignore[misc]


class SwarmLock:
    """swarmbus's ``Lock`` on the Redis backend, trying once (``acquire(timeout=0)``)."""

    def __init__(self, bus: Bus, resource: str, agent: str) -> None:
        self.lock = Lock(bus, resource, agent, ttl=TTL)

    async def acquire(self) -> bool:
        return await self.lock.acquire(timeout=0) is not None

    async def release(self) -> None:
        await self.lock.release()


class StoreLock:
    """The same lock on ``RedisStore``: create with a TTL, delete at its revision."""

    def __init__(self, store: RedisStore, resource: str, agent: str) -> None:
        self.store = store
        self.key = lock_key(resource)  # the KV key swarmbus's locks use
        self.agent = agent.encode()
        self.token = 0

    async def acquire(self) -> bool:
        try:
            self.token = await self.store.create(self.key, self.agent, ttl=TTL)
        except ConflictError:
            return False
        return True

    async def release(self) -> None:
        await self.store.delete(self.key, revision=self.token)


class PgLock:
    """A plain PostgreSQL lock: a row per resource, taken over once expired, with a
    fencing token from a sequence; owner-only release by that token (pool connection)."""

    def __init__(self, pool: Any, resource: str, agent: str) -> None:
        self.pool = pool
        self.resource = resource
        self.agent = agent
        self.token = 0

    async def acquire(self) -> bool:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO bench_locks VALUES (%s, %s, nextval('bench_fence'),"
                " now() + make_interval(secs => %s)) ON CONFLICT (resource) DO UPDATE"
                " SET owner = excluded.owner, token = excluded.token,"
                " expires_at = excluded.expires_at WHERE bench_locks.expires_at < now()"
                " RETURNING token",
                [self.resource, self.agent, TTL],
                prepare=True,
            )
            row = await cursor.fetchone()
        if row is None:
            return False
        self.token = row[0]
        return True

    async def release(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM bench_locks WHERE resource = %s AND token = %s",
                [self.resource, self.token],
                prepare=True,
            )


def lock_cycles(make: Callable[[str], Any]) -> Run:
    async def run(n: int) -> None:
        lock = make("bench/a")
        for _ in range(n):
            assert await lock.acquire()
            await lock.release()

    return run


def hand_offs(make: Callable[[str], Any]) -> Run:
    async def run(n: int) -> None:
        owners = [make("bench/a"), make("bench/b")]
        turn = [asyncio.Event(), asyncio.Event()]
        turn[0].set()

        async def owner(i: int) -> None:
            for _ in range(n // 2):
                await turn[i].wait()
                turn[i].clear()
                while not await owners[i].acquire():
                    pass  # the other one has not released yet
                turn[1 - i].set()  # the other may now try (it spins until we release)
                await owners[i].release()

        await asyncio.gather(owner(0), owner(1))

    return run


def store_cas(store: StateStore) -> Run:
    async def run(n: int) -> None:
        for i in range(n):
            key = f"cas.k{i % 64}"
            first = await store.create(key, VALUE)
            await store.update(key, VALUE, revision=first)
            await store.delete(key)

    return run


def appends(create: Callable[[str], Awaitable[object]], writers: int) -> Run:
    async def run(n: int) -> None:
        run_id = uuid.uuid4().hex[:8]

        async def writer(w: int) -> None:
            for i in range(w, n, writers):
                await create(f"S.finding.{run_id}-{i}")

        await asyncio.gather(*(writer(w) for w in range(writers)))

    return run


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its children (Linux /proc)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


async def timed(run: Run, n: int, server: int) -> tuple[float, float]:
    """(operations per second, operations per CPU second of this process + the server)."""
    start, cpu = time.perf_counter(), time.process_time() + tree_cpu(server)
    await run(n)
    used = time.process_time() + tree_cpu(server) - cpu
    return n / (time.perf_counter() - start), n / max(used, 1e-9)


class Bench:
    """Store/raw pairs, alternating; each ratio also per CPU second (steadier under load)."""

    def __init__(self, ops: int, reps: int, only: str | None = None) -> None:
        self.ops = ops
        self.reps = reps
        self.only = only
        self.rows: list[str] = []

    async def pair(self, name: str, store: Run, raw: Run, server: int) -> None:
        if self.only and self.only not in name:
            return
        await store(min(200, self.ops))  # warm up both
        await raw(min(200, self.ops))
        ratios, cpu_ratios, rates = [], [], []
        for _ in range(self.reps):
            s, s_cpu = await timed(store, self.ops, server)
            r, r_cpu = await timed(raw, self.ops, server)
            ratios.append(s / r)
            cpu_ratios.append(s_cpu / r_cpu)
            rates.append(f"{s:,.0f} / {r:,.0f}")
        ratio = " ".join(f"{x:.2f}x" for x in ratios)
        median = sorted(ratios)[len(ratios) // 2]
        cpu = sorted(cpu_ratios)[len(cpu_ratios) // 2]
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        self.rows.append(
            f"| {name} | {'; '.join(rates)} | {ratio} | **{median:.2f}x** | {cpu:.2f}x | {load} |"
        )
        print(self.rows[-1], flush=True)


async def main(args: argparse.Namespace) -> None:
    bench = Bench(args.ops, args.reps, args.only)
    print("| benchmark | store /s vs raw /s per rep | store / raw | median | per CPU s | load |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    with ExitStack() as servers:
        tmp = Path(servers.enter_context(tempfile.TemporaryDirectory()))
        nats = servers.enter_context(NatsServer(tmp / "nats"))
        redis_server = servers.enter_context(RedisServer(tmp / "redis"))
        pg = servers.enter_context(PostgresServer())
        async with AsyncExitStack() as stack:
            client = aioredis.Redis.from_url(redis_server.url)
            stack.push_async_callback(client.aclose)
            locks = RedisStore(client, LOCKS_BUCKET)
            assert redis_server.proc is not None
            assert pg.proc is not None
            assert nats.pid is not None
            redis_pid = redis_server.proc.pid
            pids = {"NATS": nats.pid, "Redis": redis_pid, "PostgreSQL": pg.proc.pid}
            on_redis = await stack.enter_async_context(
                Bus.open(url=nats.url, backend="redis", redis_url=redis_server.url)
            )
            await bench.pair(
                "lock cycle, `Lock` (Redis)",
                lock_cycles(lambda a: SwarmLock(on_redis, "file:/src/lock.py", a)),
                lock_cycles(lambda a: SeedLock(client, "file:/src/lock.py", a)),
                redis_pid,
            )
            await bench.pair(
                "lock hand-off, `Lock` (Redis)",
                hand_offs(lambda a: SwarmLock(on_redis, "file:/src/lock-handoff.py", a)),
                hand_offs(lambda a: SeedLock(client, "file:/src/lock-handoff.py", a)),
                redis_pid,
            )
            await bench.pair(
                "lock cycle, store (Redis)",
                lock_cycles(lambda a: StoreLock(locks, "file:/src/main.py", a)),
                lock_cycles(lambda a: SeedLock(client, "file:/src/main.py", a)),
                redis_pid,
            )
            await bench.pair(
                "lock hand-off, store (Redis)",
                hand_offs(lambda a: StoreLock(locks, "file:/src/handoff.py", a)),
                hand_offs(lambda a: SeedLock(client, "file:/src/handoff.py", a)),
                redis_pid,
            )
            bus = await stack.enter_async_context(Bus.open(url=nats.url))
            kv = await bus.key_value("BENCH_STATE", history=1)
            pool = await open_pool(pg.url, max_size=args.writers)
            stack.push_async_callback(pool.close)
            raw_pg = await psycopg.AsyncConnection.connect(pg.url, autocommit=True)
            stack.push_async_callback(raw_pg.close)
            await raw_pg.execute(
                "CREATE TABLE IF NOT EXISTS bench_raw"
                " (key TEXT PRIMARY KEY, value BYTEA, revision BIGINT)"
            )
            await raw_pg.execute(
                "CREATE TABLE IF NOT EXISTS bench_locks (resource TEXT PRIMARY KEY,"
                " owner TEXT, token BIGINT, expires_at TIMESTAMPTZ)"
            )
            await raw_pg.execute("CREATE SEQUENCE IF NOT EXISTS bench_fence")
            on_pg = await stack.enter_async_context(
                Bus.open(url=nats.url, backend="postgres", database_url=pg.url)
            )
            await bench.pair(
                "lock cycle, `Lock` (PostgreSQL)",
                lock_cycles(lambda a: SwarmLock(on_pg, "file:/src/lock.py", a)),
                lock_cycles(lambda a: PgLock(pool, "file:/src/lock.py", a)),
                pg.proc.pid,
            )
            await bench.pair(
                "lock hand-off, `Lock` (PostgreSQL)",
                hand_offs(lambda a: SwarmLock(on_pg, "file:/src/lock-handoff.py", a)),
                hand_offs(lambda a: PgLock(pool, "file:/src/lock-handoff.py", a)),
                pg.proc.pid,
            )
            stores: dict[str, StateStore] = {
                "NATS": NatsStore(kv),
                "Redis": RedisStore(client, "BENCH_STATE"),
                "PostgreSQL": PostgresStore(pool, "BENCH_STATE"),
            }
            raws: dict[str, Run] = {
                "NATS": raw_nats_cas(kv),
                "Redis": raw_redis_cas(client),
                "PostgreSQL": raw_pg_cas(raw_pg),
            }
            raw_creates: dict[str, Callable[[str], Awaitable[object]]] = {
                "NATS": lambda k: kv.create(k, VALUE),
                "Redis": lambda k: client.set(f"raw:{k}", VALUE, nx=True),
                "PostgreSQL": lambda k: pg_insert(pool, k),
            }
            await raw_pg_task_table(raw_pg)
            task_pairs: dict[str, tuple[Run, Run]] = {
                "NATS": (swarm_tasks(bus, args.writers), raw_nats_tasks(bus, args.writers)),
                "Redis": (
                    swarm_tasks(on_redis, args.writers),
                    raw_redis_tasks(client, args.writers),
                ),
                "PostgreSQL": (
                    swarm_tasks(on_pg, args.writers),
                    raw_pg_tasks(pool, args.writers),
                ),
            }
            for name, (swarm, raw) in task_pairs.items():
                await bench.pair(
                    f"task create -> claim -> complete, `TaskQueue` ({name})",
                    swarm,
                    raw,
                    pids[name],
                )
            for name, store in stores.items():
                pid = pids[name]
                await bench.pair(
                    f"create -> CAS -> delete ({name})", store_cas(store), raws[name], pid
                )
                await bench.pair(
                    f"append, {args.writers} writers ({name})",
                    appends(lambda k, s=store: s.create(k, VALUE), args.writers),  # type: ignore[misc]
                    appends(raw_creates[name], args.writers),
                    pid,
                )


# --- task create -> claim -> complete ------------------------------------------------

TASK_DATA = b'{"type":"noop","parameters":{"target":"api","context":{}},"priority":5}'


def swarm_tasks(bus: Bus, writers: int) -> Run:
    """``create_many`` n tasks, then one ``work()`` loop claims and completes them; the
    run ends at the n-th ``task.completed`` event (a stopped loop waits up to 0.5 s
    for its last claim call, which is not the queue's throughput)."""

    async def run(n: int) -> None:
        session = f"bench-{uuid.uuid4().hex[:10]}"
        completed = 0
        all_done = anyio.Event()

        async def on_completed(msg: Any) -> None:
            nonlocal completed
            completed += 1
            if completed >= n:
                all_done.set()

        async def noop(task: Task) -> dict[str, object]:
            return {}

        sub = await bus.nc.subscribe(f"agent.task.completed.{session}.>", cb=on_completed)
        try:
            async with TaskQueue(bus, session) as queue, anyio.create_task_group() as tg:
                for i in range(0, n, 1000):
                    specs = [TaskSpec(type="noop", priority=5) for _ in range(min(1000, n - i))]
                    await queue.create_many(specs, agent="bench/creator")
                tg.start_soon(
                    functools.partial(
                        queue.work,
                        noop,
                        agent="bench/worker",
                        types=["noop"],
                        stop=anyio.Event(),
                        concurrency=writers,
                    )
                )
                with anyio.fail_after(600):
                    await all_done.wait()
                tg.cancel_scope.cancel()
        finally:
            await sub.unsubscribe()

    return run


async def in_parallel(count: int, work: Callable[[int], Awaitable[None]]) -> None:
    await asyncio.gather(*(work(w) for w in range(count)))


# KEYS: the session's pending zset, lease zset. ARGV: hash prefix, lease ms. Pops the
# best pending task (or one whose lease ran out) and claims it: {id, revision} or nil.
RAW_REDIS_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1)
if expired[1] then id = expired[1] else
  local best = redis.call('ZPOPMIN', KEYS[1])
  if not best[1] then return nil end
  id = best[1]
end
local h = ARGV[1] .. id
local rev = redis.call('HINCRBY', h, 'revision', 1)
redis.call('HINCRBY', h, 'attempts', 1)
redis.call('HSET', h, 'status', 'claimed', 'lease_until', now + tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
return {id, rev}
"""
# KEYS: the task hash, lease zset. ARGV: id, revision, result. 1 done, 0 lost.
RAW_REDIS_COMPLETE = """
if redis.call('HGET', KEYS[1], 'revision') ~= ARGV[2] then return 0 end
redis.call('HINCRBY', KEYS[1], 'revision', 1)
redis.call('HSET', KEYS[1], 'status', 'completed', 'result', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


def raw_redis_tasks(client: aioredis.Redis, writers: int) -> Run:
    claim = client.register_script(RAW_REDIS_CLAIM)
    complete = client.register_script(RAW_REDIS_COMPLETE)

    async def run(n: int) -> None:
        session = uuid.uuid4().hex[:10]
        hashes, pending, leases = (
            f"raw:{session}:task:",
            f"raw:{session}:pending",
            f"raw:{session}:leases",
        )
        base = time.time()

        async def create(w: int) -> None:
            for i in range(w, n, writers):
                task_id = f"t{i}"
                async with client.pipeline(transaction=True) as pipe:  # MULTI/EXEC
                    pipe.hset(
                        hashes + task_id,
                        mapping={
                            "data": TASK_DATA,
                            "status": "pending",
                            "revision": 1,
                            "attempts": 0,
                        },
                    )
                    # priority first (higher first), FIFO within: the score orders both
                    pipe.zadd(pending, {task_id: -5 * 1e10 + (time.time() - base) * 1e3})
                    await pipe.execute()

        async def work(w: int) -> None:
            while True:
                won = await claim(keys=[pending, leases], args=[hashes, 30_000])
                if won is None:
                    return
                task_id, revision = won[0].decode(), int(won[1])
                done = await complete(
                    keys=[hashes + task_id, leases], args=[task_id, revision, b"{}"]
                )
                assert done == 1

        await in_parallel(writers, create)
        await in_parallel(writers, work)

    return run


RAW_PG_CLAIM = (
    "UPDATE bench_tasks SET status = 'claimed', revision = revision + 1,"
    " attempts = attempts + 1, lease_until = now() + interval '30 seconds'"
    " WHERE id = (SELECT id FROM bench_tasks WHERE session = %s AND type = %s"
    " AND (status = 'pending' OR (status = 'claimed' AND lease_until < now()))"
    " ORDER BY priority DESC, created_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING id, revision"
)
RAW_PG_COMPLETE = (
    "UPDATE bench_tasks SET status = 'completed', result = %s, revision = revision + 1"
    " WHERE id = %s AND revision = %s"
)


def raw_pg_tasks(pool: Any, writers: int) -> Run:
    async def run(n: int) -> None:
        session = uuid.uuid4().hex[:10]

        async def create(w: int) -> None:
            async with pool.connection() as conn:
                for i in range(w, n, writers):
                    await conn.execute(
                        "INSERT INTO bench_tasks (id, session, type, priority, data)"
                        " VALUES (%s, %s, 'noop', 5, %s)",
                        [f"{session}-{i}", session, TASK_DATA],
                        prepare=True,
                    )

        async def work(w: int) -> None:
            async with pool.connection() as conn:
                while True:
                    cursor = await conn.execute(RAW_PG_CLAIM, [session, "noop"], prepare=True)
                    row = await cursor.fetchone()
                    if row is None:
                        return
                    cursor = await conn.execute(
                        RAW_PG_COMPLETE, [b"{}", row[0], row[1]], prepare=True
                    )
                    assert cursor.rowcount == 1

        await in_parallel(writers, create)
        await in_parallel(writers, work)

    return run


async def raw_pg_task_table(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_tasks (id TEXT PRIMARY KEY, session TEXT NOT NULL,"
        " type TEXT NOT NULL, priority INT NOT NULL, status TEXT NOT NULL DEFAULT 'pending',"
        " revision BIGINT NOT NULL DEFAULT 1, attempts INT NOT NULL DEFAULT 0,"
        " lease_until TIMESTAMPTZ, data BYTEA, result BYTEA,"
        " created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())"
    )
    await conn.execute(
        "CREATE INDEX IF NOT EXISTS bench_tasks_open ON bench_tasks"
        " (session, type, priority DESC, created_at) WHERE status <> 'completed'"
    )


def raw_nats_tasks(bus: Bus, writers: int) -> Run:
    """bench_tasks.py's raw loop: publish to a work-queue stream, fetch, ack."""

    async def run(n: int) -> None:
        name = f"BENCH_RAW_{uuid.uuid4().hex[:8]}"
        subject = f"bench.raw.{name}"
        await bus.ensure_stream(
            StreamConfig(name=name, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE)
        )
        try:
            for i in range(0, n, 1000):
                acks = [
                    await bus.js.publish_async(subject, TASK_DATA) for _ in range(min(1000, n - i))
                ]
                for ack in acks:
                    await ack
            psub = await bus.js.pull_subscribe(subject, durable="raw", stream=name)
            acked = 0
            while acked < n:
                for msg in await psub.fetch(writers, timeout=5.0):
                    await msg.ack()
                    acked += 1
        finally:
            await bus.js.delete_stream(name)

    return run


def raw_nats_cas(kv: Any) -> Run:
    async def run(n: int) -> None:
        for i in range(n):
            key = f"raw.k{i % 64}"
            first = await kv.create(key, VALUE)
            await kv.update(key, VALUE, last=first)
            await kv.delete(key)

    return run


def raw_redis_cas(client: aioredis.Redis) -> Run:
    async def run(n: int) -> None:
        for i in range(n):
            key = f"raw:k{i % 64}"
            await client.set(key, VALUE, nx=True)
            await client.set(key, VALUE, xx=True)
            await client.delete(key)

    return run


def raw_pg_cas(conn: psycopg.AsyncConnection[Any]) -> Run:
    async def run(n: int) -> None:
        for i in range(n):
            key = f"k{i % 64}"
            await conn.execute(
                "INSERT INTO bench_raw VALUES (%s, %s, 1)", [key, VALUE], prepare=True
            )
            await conn.execute(
                "UPDATE bench_raw SET value = %s, revision = 2 WHERE key = %s AND revision = 1",
                [VALUE, key],
                prepare=True,
            )
            await conn.execute("DELETE FROM bench_raw WHERE key = %s", [key], prepare=True)

    return run


async def pg_insert(pool: Any, key: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO bench_raw VALUES (%s, %s, 1)", [key, VALUE], prepare=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--only", help="run only the pairs whose name contains this")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(parser.parse_args()))
