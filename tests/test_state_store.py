"""Conformance of every ``StateStore`` backend: the same tests, parametrised by backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from swarmbus import Bus, ConflictError, MessageTooLargeError
from swarmbus._jetstream.store import NatsStore
from swarmbus._state import Entry, StateStore


@pytest.fixture(params=["nats"])
async def store(request: pytest.FixtureRequest, bus: Bus, unique: str) -> AsyncIterator[StateStore]:
    if request.param == "nats":
        kv = await bus.key_value(f"conformance-{unique}", history=1, limit_marker_ttl=60)
        yield NatsStore(kv)


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


async def test_an_update_over_the_limit_is_refused_and_changes_nothing(store: StateStore) -> None:
    revision = await store.create("big.2", b"small")
    with pytest.raises(MessageTooLargeError):
        await store.update("big.2", b"x" * (store.max_value_bytes + 1), revision=revision)
    entry = await store.get("big.2", fresh=True)
    assert entry is not None
    assert (entry.value, entry.revision) == (b"small", revision)
