"""SWARM_BACKEND / REDIS_URL / DATABASE_URL in Settings, and the store factory."""

from __future__ import annotations

from datetime import timedelta

import pydantic
import pytest

from swarmbus import Bus, ConflictError, Settings
from swarmbus._backends import _BACKENDS, open_store, state_backend
from swarmbus._jetstream.store import NatsStore
from swarmbus._postgres_store import PostgresStore
from swarmbus._redis_store import RedisStore
from tests._stores import PostgresServer, RedisServer


def test_the_seeds_variables_configure_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_BACKEND", "Redis")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    settings = Settings.from_env()
    assert (settings.backend, settings.redis_url) == ("redis", "redis://127.0.0.1:6379/0")
    assert Settings().backend == "nats"


@pytest.mark.parametrize(
    ("backend", "needs"), [("redis", "REDIS_URL"), ("postgres", "DATABASE_URL"), ("etcd", "")]
)
def test_a_backend_without_its_url_is_refused(
    monkeypatch: pytest.MonkeyPatch, backend: str, needs: str
) -> None:
    for name in ("REDIS_URL", "DATABASE_URL", "SWARMBUS_REDIS_URL", "SWARMBUS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SWARM_BACKEND", backend)
    with pytest.raises(pydantic.ValidationError, match=needs or "literal_error|nats"):
        Settings.from_env()


async def test_open_store_follows_the_settings(
    nats_url: str, redis_server: RedisServer, postgres_server: PostgresServer, unique: str
) -> None:
    async with Bus.open(url=nats_url) as bus:
        assert isinstance(await open_store(bus, f"f-{unique}"), NatsStore)
    async with Bus.open(url=nats_url, backend="redis", redis_url=redis_server.url) as bus:
        store = await open_store(bus, f"f-{unique}")
        assert isinstance(store, RedisStore)
        assert await store.create("s.1", b"x") > 0
        connections = state_backend(bus)._redis.connection_pool._available_connections
        assert bus in _BACKENDS
    assert bus not in _BACKENDS  # closed with the bus
    assert not any(c.is_connected for c in connections)
    async with Bus.open(url=nats_url, backend="postgres", database_url=postgres_server.url) as bus:
        store = await open_store(bus, f"f-{unique}")
        assert isinstance(store, PostgresStore)
        assert await store.create("s.1", b"x") > 0


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_the_query_ledger_runs_a_query_once_on_each_backend(
    request: pytest.FixtureRequest, nats_url: str, session_id: str, backend: str
) -> None:
    from swarmbus import QueryLedger

    if backend == "redis":
        options = {"redis_url": request.getfixturevalue("redis_server").url}
    else:
        options = {"database_url": request.getfixturevalue("postgres_server").url}
    runs = 0

    async def query() -> str:
        nonlocal runs
        runs += 1
        return "0.05"

    async with Bus.open(url=nats_url, backend=backend, **options) as bus:
        first = await QueryLedger.open(bus, session_id, agent="t/a")
        second = await QueryLedger.open(bus, session_id, agent="t/b")
        assert not (await first.run("prometheus", "rate(errors[5m])", query)).reused
        again = await second.run("prometheus", "rate(errors[5m])", query)
    assert (again.reused, again.ran_by, again.evidence.result, runs) == (True, "t/a", "0.05", 1)


async def test_connect_reads_the_backend_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, nats_url: str, redis_server: RedisServer, unique: str
) -> None:
    import swarmbus

    monkeypatch.setenv("NATS_URL", nats_url)
    monkeypatch.setenv("SWARM_BACKEND", "redis")
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    async with swarmbus.connect() as bus:
        assert bus.settings.backend == "redis"
        store = await open_store(bus, f"c-{unique}")
        assert isinstance(store, RedisStore)
        await store.put("s.1", b"x")


@pytest.mark.parametrize("backend", ["nats", "redis", "postgres"])
async def test_a_killed_holders_lock_expires_and_the_next_token_is_higher(
    request: pytest.FixtureRequest, nats_url: str, unique: str, backend: str
) -> None:
    import signal
    import sys

    import anyio
    import anyio.lowlevel

    url = ""
    options: dict[str, str] = {}
    if backend == "redis":
        url = request.getfixturevalue("redis_server").url
        options = {"redis_url": url}
    elif backend == "postgres":
        url = request.getfixturevalue("postgres_server").url
        options = {"database_url": url}
    bucket, key = f"kill-{unique}", "lock.res"
    argv = [sys.executable, "-m", "tests._store_holder", backend, nats_url, url, bucket, key]
    async with await anyio.open_process(argv) as holder:
        assert holder.stdout is not None
        with anyio.fail_after(30):
            line = (await holder.stdout.receive()).decode()
        assert line.startswith("held "), line
        token = int(line.split()[1])
        holder.send_signal(signal.SIGKILL)  # no release: only the TTL frees the lock
        await holder.wait()
    async with Bus.open(url=nats_url, backend=backend, **options) as bus:
        store = await open_store(bus, bucket, history=1, limit_marker_ttl=60)
        with pytest.raises(ConflictError):
            await store.create(key, b"next", ttl=30)
        async with store.watch(key, initial=False) as changes:
            with anyio.fail_after(15):
                async for item in changes:
                    if item is not None and item.value is None:
                        break
        assert await store.create(key, b"next", ttl=30) > token


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_a_blackboard_on_each_backend(
    request: pytest.FixtureRequest, nats_url: str, session_id: str, backend: str
) -> None:
    import anyio
    import anyio.lowlevel

    from swarmbus import Blackboard, Finding

    if backend == "redis":
        options = {"redis_url": request.getfixturevalue("redis_server").url}
    else:
        options = {"database_url": request.getfixturevalue("postgres_server").url}
    async with Bus.open(url=nats_url, backend=backend, **options) as bus:
        board = await Blackboard.open(bus, session_id)
        await board.start("ops/lead", {"task": "INC-1234"})
        await board.append_finding(
            Finding(category="observation", content="v1.2.3 at 10:15", confidence=0.9),
            agent="ops/deploy-validator",
        )
        other = await Blackboard.open(bus, session_id)  # another agent's view
        seen = []
        with anyio.fail_after(10):
            async for item in other.watch():
                seen.append(item)
                if len(seen) == 1:
                    await board.append_finding(
                        Finding(category="hypothesis", content="pool exhaustion", confidence=0.7),
                        agent="security/lead",
                    )
                else:
                    break
        snapshot, change = seen
        assert [f.content for f in snapshot.findings] == ["v1.2.3 at 10:15"]
        assert snapshot.context is not None
        assert snapshot.context.data == {"task": "INC-1234"}
        assert (change.kind, change.operation, change.value.content) == (
            "finding",
            "put",
            "pool exhaustion",
        )
        assert session_id in [s.session_id for s in await Blackboard.sessions(bus)]
    if backend == "postgres":  # the real blackboard's findings, with plain SQL
        import psycopg

        async with await psycopg.AsyncConnection.connect(options["database_url"]) as conn:
            cursor = await conn.execute(
                "SELECT f.agent_id, f.finding_type, f.content->>'content' FROM agent_findings f"
                " JOIN agent_sessions s ON s.id = f.session_id WHERE s.name = %s"
                " ORDER BY f.revision",
                [session_id],
            )
            assert await cursor.fetchall() == [
                ("ops/deploy-validator", "observation", "v1.2.3 at 10:15"),
                ("security/lead", "hypothesis", "pool exhaustion"),
            ]
            cursor = await conn.execute(
                "SELECT status, context->>'task' FROM agent_sessions WHERE name = %s",
                [session_id],
            )
            assert await cursor.fetchone() == ("active", "INC-1234")
    async with Bus.open(url=nats_url, backend=backend, **options) as bus:  # retention
        board = await Blackboard.open(bus, session_id)
        await board.complete({"decision": "rollback"}, agent="ops/lead")
        assert session_id in await Blackboard.purge_completed(bus, timedelta(0))
        assert (await board.snapshot()).findings == ()


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_locks_on_each_backend_exclude_fence_and_expire(
    request: pytest.FixtureRequest, nats_url: str, unique: str, backend: str
) -> None:
    import anyio
    import anyio.lowlevel

    from swarmbus import Lock, LockLostError

    if backend == "redis":
        options = {"redis_url": request.getfixturevalue("redis_server").url}
    else:
        options = {"database_url": request.getfixturevalue("postgres_server").url}
    resource = f"file:/src/{unique}.py"
    async with Bus.open(url=nats_url, backend=backend, **options) as bus:
        holders: list[str] = []
        tokens: list[int] = []

        async def worker(n: int) -> None:
            for _ in range(5):
                async with Lock(bus, resource, f"t/w{n}", ttl=30, timeout=30) as lease:
                    holders.append(f"t/w{n}")
                    assert len(holders) == 1, holders
                    tokens.append(lease.token)
                    await anyio.lowlevel.checkpoint()
                    holders.pop()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for n in range(3):
                    tg.start_soon(worker, n)
        assert len(tokens) == 15
        assert tokens == sorted(set(tokens))

        # A holder that never releases: its lease expires, a waiter gets a higher token.
        stale = Lock(bus, resource, "t/crashed", ttl=1)
        first = await stale.acquire()
        assert first is not None
        assert await Lock(bus, resource, "t/other").acquire(timeout=0) is None
        with anyio.fail_after(15):
            lease = await Lock(bus, resource, "t/next", ttl=30).acquire(timeout=None)
        assert lease is not None
        assert lease.token > first.token
        with pytest.raises(LockLostError):
            await stale.release()  # the fenced-out holder changes nothing
        with pytest.raises(LockLostError):
            await stale.refresh()


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_a_proposal_is_decided_by_votes_on_each_backend(
    request: pytest.FixtureRequest, nats_url: str, session_id: str, unique: str, backend: str
) -> None:
    import anyio

    from swarmbus import Consensus, Proposal, Vote

    if backend == "redis":
        options = {"redis_url": request.getfixturevalue("redis_server").url}
    else:
        options = {"database_url": request.getfixturevalue("postgres_server").url}
    voters = ["ops/a", "ops/b", "ops/c"]
    async with Bus.open(url=nats_url, backend=backend, **options) as bus:
        consensus = await Consensus.open(bus, bucket=f"CONS_{unique}")
        other = await Consensus.open(bus, bucket=f"CONS_{unique}")  # another agent
        await consensus.propose(
            Proposal(proposal_id="p1", action="rollback", voters=voters, timeout=60),
            agent=voters[0],
            session=session_id,
        )
        await consensus.vote(Vote(proposal_id="p1", vote="yes", reason="5x"), agent="ops/a")
        await other.vote(Vote(proposal_id="p1", vote="yes", reason="same"), agent="ops/b")
        with anyio.fail_after(15):
            decision = await other.wait_for_decision("p1", timeout=15)
        assert (decision.outcome, decision.votes_for) == ("approved", 2)
        assert (await consensus.get("p1")).decision == decision
        # the record lives in the configured store, not in NATS KV
        store = await open_store(bus, f"CONS_{unique}")
        assert [e.key for e in await store.list()] != []
