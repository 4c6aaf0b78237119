"""Conformance of every ``StateStore`` backend: the same tests, parametrised by backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from swarmbus import Bus, ConflictError, MessageTooLargeError
from swarmbus._jetstream.store import NatsStore
from swarmbus._state import Entry, StateStore


@pytest.fixture(params=["nats", "redis", "postgres"])
async def store(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[StateStore]:
    bucket = f"conformance-{unique}"
    if request.param == "nats":
        async with Bus.open(url=request.getfixturevalue("nats_url")) as bus:
            kv = await bus.key_value(bucket, history=1, limit_marker_ttl=60)
            yield NatsStore(kv)
    elif request.param == "redis":
        from swarmbus._redis_store import RedisStore

        redis_store = RedisStore.from_url(request.getfixturevalue("redis_server").url, bucket)
        try:
            yield redis_store
        finally:
            await redis_store.aclose()
    else:
        from swarmbus._postgres_store import PostgresStore

        async with PostgresStore.open(request.getfixturevalue("postgres_server").url, bucket) as pg:
            yield pg


async def test_create_is_once(store: StateStore) -> None:
    revision = await store.create("s.a", b"1")
    assert revision > 0
    with pytest.raises(ConflictError):
        await store.create("s.a", b"2")
    entry = await store.get("s.a")
    assert entry is not None
    assert (entry.value, entry.revision) == (b"1", revision)


async def test_get_of_a_missing_key_is_none(store: StateStore) -> None:
    assert await store.get("s.none") is None


async def test_update_is_compare_and_set(store: StateStore) -> None:
    first = await store.create("s.b", b"1")
    second = await store.update("s.b", b"2", revision=first)
    assert second > first
    with pytest.raises(ConflictError) as caught:
        await store.update("s.b", b"3", revision=first)
    assert caught.value.expected_revision == first
    entry = await store.get("s.b")
    assert entry is not None
    assert entry.value == b"2"


async def test_create_after_delete_and_revisions_keep_increasing(store: StateStore) -> None:
    first = await store.create("s.c", b"1")
    await store.delete("s.c")
    assert await store.get("s.c") is None
    again = await store.create("s.c", b"2")
    assert again > first


async def test_delete_with_a_stale_revision_conflicts(store: StateStore) -> None:
    first = await store.create("s.d", b"1")
    await store.update("s.d", b"2", revision=first)
    with pytest.raises(ConflictError):
        await store.delete("s.d", revision=first)


async def test_list_by_prefix_skips_deleted_keys(store: StateStore) -> None:
    await store.put("x.1", b"a")
    await store.put("x.2", b"b")
    await store.put("y.1", b"c")
    await store.delete("x.2")
    entries = await store.list("x.")
    assert [(e.key, e.value) for e in entries] == [("x.1", b"a")]


async def test_watch_gives_initial_values_a_marker_then_changes(store: StateStore) -> None:
    await store.put("w.1", b"a")
    async with store.watch("w.") as changes:
        seen: list[Entry | None] = []
        with anyio.fail_after(5):
            async for item in changes:
                seen.append(item)
                if item is None:
                    await store.put("w.2", b"b")
                    await store.delete("w.1")
                if len(seen) == 4:
                    break
    assert [(e.key, e.value) if e else None for e in seen] == [
        ("w.1", b"a"),
        None,
        ("w.2", b"b"),
        ("w.1", None),
    ]


async def test_a_ttl_expires_the_key(store: StateStore) -> None:
    await store.create("t.1", b"a", ttl=1)
    async with store.watch("t.", initial=False) as changes:
        with anyio.fail_after(10):
            async for item in changes:
                if item is not None and item.key == "t.1" and item.value is None:
                    break
    assert await store.get("t.1") is None


async def test_a_key_expired_by_its_ttl_can_be_created_again(store: StateStore) -> None:
    first = await store.create("t.2", b"a", ttl=1)
    async with store.watch("t.2") as changes:
        with anyio.fail_after(10):
            async for item in changes:
                if item is not None and item.value is None:
                    break
    again = await store.create("t.2", b"b", ttl=60)
    assert again > first
    entry = await store.get("t.2")
    assert entry is not None
    assert (entry.value, entry.revision) == (b"b", again)
    # and without a TTL
    await store.delete("t.2")
    assert await store.create("t.2", b"c") > again


async def test_a_finished_watch_leaves_no_consumer(bus: Bus, unique: str) -> None:
    kv = await bus.key_value(f"watch-{unique}", history=1)
    store = NatsStore(kv)
    for _ in range(3):
        async with store.watch("a.") as changes:
            with anyio.fail_after(5):
                assert await anext(changes) is None
    info = await bus.js.stream_info(f"KV_watch-{unique}")
    assert info.state.consumer_count == 0


async def test_watch_of_one_exact_key(store: StateStore) -> None:
    await store.put("k.one", b"a")
    await store.put("k.onex", b"b")
    async with store.watch("k.one") as changes:
        with anyio.fail_after(5):
            first = await anext(changes)
            assert first is not None
            assert (first.key, first.value) == ("k.one", b"a")
            assert await anext(changes) is None


async def test_a_value_over_the_limit_is_refused_with_the_limit(store: StateStore) -> None:
    with pytest.raises(MessageTooLargeError) as caught:
        await store.put("big.1", b"x" * (store.max_value_bytes + 1))
    assert caught.value.limit == store.max_value_bytes
    assert await store.get("big.1", fresh=True) is None


async def test_one_compare_and_set_wins_a_race(store: StateStore) -> None:
    first = await store.create("r.1", b"0")
    outcomes: list[bool] = []

    async def contend(n: int) -> None:
        try:
            await store.update("r.1", str(n).encode(), revision=first)
            outcomes.append(True)
        except ConflictError:
            outcomes.append(False)

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(contend, n)
    assert sorted(outcomes) == [False] * 7 + [True]


async def test_a_watch_misses_no_concurrent_write(store: StateStore) -> None:
    # Distinct keys: NATS KV (history 1) may skip a superseded revision of ONE key
    # that a lagging watch had not read yet; Redis and PostgreSQL deliver every one.
    count = 60
    async with store.watch("c.", initial=False) as changes:
        async with anyio.create_task_group() as tg:
            for n in range(count):
                tg.start_soon(store.put, f"c.{n}", str(n).encode())
        seen: list[Entry] = []
        with anyio.fail_after(10):
            async for item in changes:
                assert item is not None
                seen.append(item)
                if len(seen) == count:
                    break
    assert [e.revision for e in seen] == sorted(e.revision for e in seen)
    assert {(e.key, e.value) for e in seen} == {(f"c.{n}", str(n).encode()) for n in range(count)}


async def test_a_watch_ends_on_the_last_write_of_a_busy_key(store: StateStore) -> None:
    async with store.watch("h.", initial=False) as changes:
        last = 0
        for n in range(30):
            last = await store.put("h.1", str(n).encode())
        with anyio.fail_after(10):
            async for item in changes:
                assert item is not None
                if item.revision == last:
                    assert item.value == b"29"
                    break


async def test_a_key_created_again_after_its_ttl_has_a_higher_revision(store: StateStore) -> None:
    first = await store.create("e.1", b"a", ttl=1)
    async with store.watch("e.1", initial=False) as changes:
        with anyio.fail_after(10):
            async for item in changes:
                if item is not None and item.value is None:
                    assert item.revision > first
                    break
    again = await store.create("e.1", b"b", ttl=1)
    assert again > first
    entry = await store.get("e.1")
    assert entry is not None
    assert (entry.value, entry.revision) == (b"b", again)


async def test_a_watch_without_initial_values_starts_after_them(store: StateStore) -> None:
    await store.put("n.1", b"old")
    async with store.watch("n.", initial=False) as changes:
        await store.put("n.2", b"new")
        with anyio.fail_after(5):
            item = await anext(changes)
    assert item is not None
    assert (item.key, item.value) == ("n.2", b"new")


async def test_a_lock_on_the_store_excludes_and_fences(store: StateStore) -> None:
    # The seed's lock on the seam: acquire = create with a TTL, release = delete at the
    # holder's revision. Four contenders, 40 acquisitions: never two holders at once,
    # and every acquisition's token (its revision) is higher than the one before.
    holders: list[str] = []
    tokens: list[int] = []

    async def contender(name: str) -> None:
        for _ in range(10):
            while True:
                try:
                    token = await store.create("lock.res", name.encode(), ttl=30)
                    break
                except ConflictError:
                    await anyio.lowlevel.checkpoint()
            holders.append(name)
            assert len(holders) == 1, holders
            tokens.append(token)
            await anyio.lowlevel.checkpoint()
            holders.remove(name)
            await store.delete("lock.res", revision=token)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(contender, f"agent-{n}")
    assert len(tokens) == 40
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 40


async def test_an_update_over_the_limit_is_refused_and_changes_nothing(store: StateStore) -> None:
    revision = await store.create("big.2", b"small")
    with pytest.raises(MessageTooLargeError):
        await store.update("big.2", b"x" * (store.max_value_bytes + 1), revision=revision)
    entry = await store.get("big.2", fresh=True)
    assert entry is not None
    assert (entry.value, entry.revision) == (b"small", revision)
