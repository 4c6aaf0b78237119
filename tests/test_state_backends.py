"""What the seed's shapes promise on the Redis and PostgreSQL stores.

The seed's Redis keys (``agent:swarm:{session}:context|findings|tasks|locks``) hold what
the stores write, a lock is a create-once key with a TTL released only by its owner,
and a session's findings and tasks are plain-SQL rows of the seed's tables.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import psycopg
import pytest
import redis.asyncio as aioredis

from swarmbus import (
    Bus,
    ConflictError,
    FindingRecord,
    Lease,
    Lock,
    LockLostError,
    Task,
    held_locks,
    lock_holder,
)
from swarmbus._cli import main as cli_main
from swarmbus._postgres_store import PostgresStore, open_pool
from swarmbus._redis_store import BOARD_BUCKET, LOCKS_BUCKET, TASKS_BUCKET, RedisStore
from swarmbus._subjects import lock_key
from tests._stores import PostgresServer, RedisServer, store_env, store_options

NOW = datetime(2026, 12, 7, 4, 30, tzinfo=UTC)


def finding(agent: str, text: str, confidence: float) -> bytes:
    record = FindingRecord(
        id=f"F-{agent}", agent=agent, timestamp=NOW, category="observation",
        content=text, confidence=confidence,
    )  # fmt: skip
    return msgspec.json.encode(record)


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_keys_follow_the_seed_layout(
    redis_client: aioredis.Redis, session_id: str
) -> None:
    board = RedisStore(redis_client, BOARD_BUCKET)
    tasks = RedisStore(redis_client, TASKS_BUCKET)
    await board.put(f"{session_id}.context", b'{"data": {"task": "INC-1234"}}')
    await board.create(f"{session_id}.finding.F1", finding("ops/deploy-validator", "v1.2.3", 0.9))
    revision = await tasks.create(f"{session_id}.T1", msgspec.json.encode(Task(id="T1", type="x")))

    prefix = f"agent:swarm:{session_id}:"
    assert await redis_client.hget(prefix + "context", "value") == b'{"data": {"task": "INC-1234"}}'
    stored = await redis_client.hget(prefix + "findings:F1", "value")
    assert msgspec.json.decode(stored, type=FindingRecord).content == "v1.2.3"
    assert await redis_client.hget(prefix + "tasks:T1", "revision") == str(revision).encode()
    keys = sorted([k.decode() async for k in redis_client.scan_iter(match=prefix + "*")])
    assert keys == [prefix + "context", prefix + "findings:F1", prefix + "tasks:T1"]


async def test_a_redis_lock_is_a_ttl_key_only_its_owner_releases(
    redis_client: aioredis.Redis, unique: str
) -> None:
    locks = RedisStore(redis_client, LOCKS_BUCKET)
    key = f"res-{unique}"
    token = await locks.create(key, b"ops/release-manager", ttl=30)
    with pytest.raises(ConflictError):
        await locks.create(key, b"ops/other", ttl=30)  # SET NX: taken
    assert 0 < await redis_client.pttl(f"agent:swarm:locks:{key}") <= 30_000
    with pytest.raises(ConflictError):
        await locks.delete(key, revision=token - 1)  # not the owner's revision
    await locks.delete(key, revision=token)  # the owner's release
    assert await redis_client.exists(f"agent:swarm:locks:{key}") == 0
    assert await locks.create(key, b"ops/other", ttl=30) > token  # a higher fencing token


async def test_a_sessions_findings_and_tasks_are_rows_of_the_seed_tables(
    postgres_server: PostgresServer, session_id: str
) -> None:
    pool = await open_pool(postgres_server.url)
    try:
        board, tasks = PostgresStore(pool, BOARD_BUCKET), PostgresStore(pool, TASKS_BUCKET)
        await board.put(f"{session_id}.context", b'{"data": {"task": "INC-1234"}}')
        await board.create(f"{session_id}.finding.A", finding("ops/deploy-validator", "v1", 0.9))
        await board.create(f"{session_id}.finding.B", finding("security/lead", "spike", 0.7))
        first = await tasks.create(
            f"{session_id}.T1", msgspec.json.encode(Task(id="T1", type="investigate"))
        )
        done = Task(
            id="T1", type="investigate", status="completed", assigned_to="ops/a",
            result={"ok": True}, completed_at=NOW,
        )  # fmt: skip
        await tasks.update(f"{session_id}.T1", msgspec.json.encode(done), revision=first)
    finally:
        await pool.close()

    async with await psycopg.AsyncConnection.connect(postgres_server.url) as conn:
        cursor = await conn.execute(
            "SELECT f.agent_id, f.finding_type, f.content->>'content', f.confidence"
            " FROM agent_findings f JOIN agent_sessions s ON s.id = f.session_id"
            " WHERE s.name = %s ORDER BY f.agent_id",
            [session_id],
        )
        assert await cursor.fetchall() == [
            ("ops/deploy-validator", "observation", "v1", 0.9),
            ("security/lead", "observation", "spike", 0.7),
        ]
        cursor = await conn.execute(
            "SELECT t.task_type, t.status, t.assigned_to, t.result, t.completed_at"
            " FROM agent_tasks t JOIN agent_sessions s ON s.id = t.session_id WHERE s.name = %s",
            [session_id],
        )
        assert await cursor.fetchall() == [
            ("investigate", "completed", "ops/a", {"ok": True}, NOW.replace(tzinfo=None))
        ]
        cursor = await conn.execute(
            "SELECT context->>'task' FROM agent_sessions WHERE name = %s", [session_id]
        )
        assert await cursor.fetchone() == ("INC-1234",)


async def test_migrations_apply_once(postgres_server: PostgresServer) -> None:
    from swarmbus._postgres_store import migrate

    async with await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True) as conn:
        await migrate(conn)  # whatever is pending
        assert await migrate(conn) == []
        cursor = await conn.execute("SELECT name FROM swarm_migrations ORDER BY name")
        assert [row[0] for row in await cursor.fetchall()] == [
            "001_coordination.sql",
            "002_open_tasks.sql",
        ]


async def test_the_task_queues_tasks_are_rows_of_agent_tasks(
    postgres_server: PostgresServer, nats_url: str, session_id: str
) -> None:
    from swarmbus import Bus, TaskQueue

    async with (
        Bus.open(url=nats_url, backend="postgres", database_url=postgres_server.url) as bus,
        TaskQueue(bus, session_id) as queue,
    ):
        done = await queue.create("investigate", agent="ops/lead", target="api", priority=8)
        waiting = await queue.create("report", agent="ops/lead")
        claim = await queue.claim(agent="ops/deploy-validator", types=["investigate"])
        assert claim is not None
        await claim.complete({"cause": "deploy v1.2.3"})

    async with await psycopg.AsyncConnection.connect(postgres_server.url) as conn:
        cursor = await conn.execute(
            "SELECT t.task_type, t.status, t.assigned_to, t.parameters->>'target', t.result,"
            " t.completed_at IS NOT NULL"
            " FROM agent_tasks t JOIN agent_sessions s ON s.id = t.session_id"
            " WHERE s.name = %s ORDER BY t.created_at",
            [session_id],
        )
        assert await cursor.fetchall() == [
            ("investigate", "completed", "ops/deploy-validator", "api",
             {"cause": "deploy v1.2.3"}, True),
            ("report", "pending", None, "", None, False),
        ]  # fmt: skip
        cursor = await conn.execute(
            "SELECT count(*) FROM agent_tasks t JOIN agent_sessions s ON s.id = t.session_id"
            " WHERE s.name = %s AND t.status = 'pending' AND t.key = %s",
            [session_id, f"{session_id}.{waiting.id}"],
        )
        assert await cursor.fetchone() == (1,)
    assert done.id != waiting.id


async def test_the_task_queues_records_are_the_seeds_redis_task_keys(
    redis_server: RedisServer, redis_client: aioredis.Redis, nats_url: str, session_id: str
) -> None:
    from swarmbus import Bus, TaskQueue
    from swarmbus._tasks.store_queue import StoreTaskQueue

    async with (
        Bus.open(url=nats_url, backend="redis", redis_url=redis_server.url) as bus,
        TaskQueue(bus, session_id) as queue,
    ):
        assert isinstance(queue, StoreTaskQueue)  # no dispatch stream on Redis
        task = await queue.create("investigate", agent="ops/lead")
        claim = await queue.claim(agent="ops/a", types=["investigate"])
        assert claim is not None
        await claim.complete({"ok": True})
    stored = await redis_client.hget(f"agent:swarm:{session_id}:tasks:{task.id}", "value")
    record = msgspec.json.decode(stored, type=Task)
    assert (record.status, record.assigned_to, record.result) == (
        "completed",
        "ops/a",
        {"ok": True},
    )


# --- Lock on Redis: one script per acquire and release, a waiter queue ------------------


class Blocked:
    """Counts waiters that queued and blocked on their wake list (patches ``blpop``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.changed = anyio.Event()
        original = aioredis.Redis.blpop

        async def blpop(client: aioredis.Redis, keys: Any, timeout: Any = 0) -> Any:
            self.count += 1
            self.changed.set()
            return await original(client, keys, timeout)  # type: ignore[misc]

        monkeypatch.setattr(aioredis.Redis, "blpop", blpop)

    async def reach(self, n: int) -> None:
        with anyio.fail_after(10):
            while self.count < n:
                self.changed = anyio.Event()
                await self.changed.wait()


@pytest.fixture
async def redis_bus(nats_url: str, redis_server: RedisServer) -> AsyncIterator[Bus]:
    async with Bus.open(url=nats_url, backend="redis", redis_url=redis_server.url) as bus:
        yield bus


async def test_a_redis_release_hands_the_lock_to_the_first_waiter_alone(
    redis_bus: Bus, redis_client: aioredis.Redis, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = Blocked(monkeypatch)
    resource = f"file:/{unique}"
    holder = Lock(redis_bus, resource, "ops/holder")
    first = await holder.acquire()
    assert first is not None
    got: list[tuple[str, int]] = []
    released, first_got = anyio.Event(), anyio.Event()

    async def wait(name: str) -> None:
        lock = Lock(redis_bus, resource, f"ops/{name}", ttl=9)
        lease = await lock.acquire(timeout=20)
        assert lease is not None
        got.append((name, lease.token))
        first_got.set()
        await released.wait()  # hold it until the test looked
        await lock.release()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n, name in enumerate(["w1", "w2", "w3"]):
                tg.start_soon(wait, name)
                await blocked.reach(n + 1)  # queued in this order
            await holder.release()
            await first_got.wait()
            assert got == [("w1", first.token + 1)]  # handed over: the next revision
            stored = await RedisStore(redis_client, LOCKS_BUCKET).get(lock_key(resource))
            assert stored is not None
            assert msgspec.json.decode(stored.value or b"")["owner"] == "ops/w1"
            assert 0 < await redis_client.pttl(f"agent:swarm:locks:{lock_key(resource)}") <= 9000
            released.set()
    assert [name for name, _ in got] == ["w1", "w2", "w3"]  # FIFO
    assert [token for _, token in got] == sorted({t for _, t in got})
    with pytest.raises(LockLostError):
        await holder.release()


async def test_a_redis_waiter_that_left_or_died_is_skipped(
    redis_bus: Bus, redis_client: aioredis.Redis, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = Blocked(monkeypatch)
    resource = f"file:/{unique}"
    key = lock_key(resource)
    holder = Lock(redis_bus, resource, "ops/holder")
    assert await holder.acquire() is not None
    # a waiter of a process that died: its entry is queued, its record expired
    queue = f"agent:swarm:{LOCKS_BUCKET}/queue:{key}"
    await redis_client.rpush(queue, "dead")
    gave_up = await Lock(redis_bus, resource, "ops/impatient").acquire(timeout=0.3)
    assert gave_up is None
    late: list[Lease | None] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                late.append(await Lock(redis_bus, resource, "ops/late").acquire(timeout=15))

            tg.start_soon(wait)
            await blocked.reach(blocked.count + 1)  # queued behind "dead" ("impatient" left)
            entries = await redis_client.lrange(queue, 0, -1)
            assert len(entries) == 2
            assert entries[0] == b"dead"
            await holder.release()
    (lease,) = late
    assert lease is not None
    assert lease.owner == "ops/late"
    assert await redis_client.llen(queue) == 0


async def test_a_redis_acquire_given_up_in_flight_gives_the_lock_back(
    redis_bus: Bus, redis_client: aioredis.Redis, unique: str
) -> None:
    """What a cancelled acquire does when its script already wrote the lock."""
    resource = f"file:/{unique}"
    key = lock_key(resource)
    store = RedisStore(redis_client, LOCKS_BUCKET)
    mine, other = store.lock_key(key), store.lock_key(key)
    assert await mine.try_create(b"{}", 30) is not None  # written, but the caller left
    await mine._give_back()
    assert await store.get(key) is None
    revision = await other.try_create(b"{}", 30)
    assert revision is not None
    await mine._give_back()  # not written for it: nothing happens
    assert await other.release(revision)


async def test_a_redis_lock_refresh_rearms_the_ttl_and_keeps_the_token(
    redis_bus: Bus, redis_client: aioredis.Redis, unique: str
) -> None:
    resource = f"file:/{unique}"
    lock = Lock(redis_bus, resource, "ops/holder", ttl=2)
    lease = await lock.acquire()
    assert lease is not None
    redis_key = f"agent:swarm:locks:{lock_key(resource)}"
    assert 0 < await redis_client.pttl(redis_key) <= 2000
    refreshed = await lock.refresh(ttl=20)
    assert refreshed.token == lease.token
    assert 2000 < await redis_client.pttl(redis_key) <= 20000
    assert await Lock(redis_bus, resource, "ops/other").acquire(timeout=0) is None
    await lock.release()
    assert await redis_client.exists(redis_key) == 0


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_lock_holder_held_locks_and_the_cli_read_the_configured_store(
    backend: str,
    request: pytest.FixtureRequest,
    nats_url: str,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    resource = f"file:/src/{unique}.py"
    async with Bus.open(url=nats_url, backend=backend, **store_options(request, backend)) as bus:
        assert await lock_holder(bus, resource) is None
        lock = Lock(bus, resource, "ops/release-manager", ttl=30)
        lease = await lock.acquire()
        assert lease is not None
        before = datetime.now(UTC)
        holder = await lock_holder(bus, resource)
        assert holder is not None
        assert (holder.resource, holder.owner, holder.token) == (
            resource,
            "ops/release-manager",
            lease.token,
        )
        assert 25 < (holder.expires_at - before).total_seconds() <= 30.5
        [listed] = [h for h in await held_locks(bus) if h.resource == resource]
        assert (listed.owner, listed.token) == ("ops/release-manager", lease.token)

        for name, value in {"NATS_URL": nats_url, **store_env(request, backend)}.items():
            monkeypatch.setenv(name, value)
        assert await anyio.to_thread.run_sync(cli_main, ["locks"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert [line.split()[1:3] for line in out if line.startswith(resource + " ")] == [
            ["ops/release-manager", str(lease.token)]
        ]

        await lock.release()
        assert await lock_holder(bus, resource) is None
        assert resource not in [h.resource for h in await held_locks(bus)]
