"""Locks: mapping and TTL rules, the three KV/TTL pitfalls, owner-only release, fencing."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import re
import signal
import sys
import textwrap
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import nats.js.errors
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

import swarmbus
from swarmbus import (
    Bus,
    InvalidIdentifierError,
    InvalidTransitionError,
    InvalidTTLError,
    Lease,
    Lock,
    LockLostError,
    LockTimeoutError,
    held_locks,
    lock_holder,
)
from swarmbus import _locks as locks
from swarmbus._cli import main
from swarmbus._jetstream.acks import CasWriter as _Writer
from swarmbus._locks import TTL_HEADER, _bucket, whole_seconds
from swarmbus._subjects import MAX_RESOURCE_BYTES, kv_subject, lock_key, resource_of_lock_key

RESOURCE = "file:/src/main.py"
REPO_ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def bucket(unique: str) -> str:
    return f"LOCKS_{unique}"


async def _kv(bus: Bus, bucket: str) -> KeyValue:
    await _bucket(bus, bucket)  # creates it the way Lock does
    return await bus.js.key_value(bucket)


async def _stored_headers(bus: Bus, bucket: str, key: str) -> dict[str, str]:
    msg = await bus.js.get_msg(f"KV_{bucket}", subject=kv_subject(bucket, key))
    return dict(msg.headers or {})


async def _wait_for_expiry(kv: KeyValue, key: str, after: int) -> None:
    """Wait until the server removed the entry of ``key`` stored now (the lock whose
    token is ``after``, maybe refreshed since): its TTL passed on the server's clock. No
    marker is written: the bucket has no limit markers."""
    current: int | None = None
    with anyio.fail_after(15):
        while True:
            try:
                msg = await kv._js.get_msg(kv._stream, subject=kv._pre + key, direct=False)
            except nats.js.errors.NotFoundError:
                return
            seq = msg.seq or 0
            assert seq >= after
            if current is not None and seq != current:
                return
            current = seq
            await anyio.sleep(0.02)  # polls the server's state: nothing to wait on


# --- pure logic -------------------------------------------------------------------


@pytest.mark.parametrize(
    "resource", ["file:/src/main.py", "a.b", "a_b", "a/b", "*", ">", " x y ", "ünï/cødé", "x" * 512]
)
def test_lock_key_is_a_safe_reversible_key(resource: str) -> None:
    key = lock_key(resource)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", key)
    assert resource_of_lock_key(key) == resource


def test_lock_key_is_injective_where_safe_token_like_mappings_collide() -> None:
    names = ["a.b", "a_b", "a/b", "a b", "a:b", "A.b"]
    assert len({lock_key(n) for n in names}) == len(names)


@pytest.mark.parametrize("key", ["not-a.lock", "a+b", "YQ==", "YR", "_w"])
def test_only_canonical_lock_keys_map_back(key: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        resource_of_lock_key(key)


@pytest.mark.parametrize("bad", ["", "x" * (MAX_RESOURCE_BYTES + 1), "\ud800", None, 42])
def test_lock_key_refuses_bad_resources(bad: object) -> None:
    with pytest.raises(InvalidIdentifierError):
        lock_key(bad)


@pytest.mark.parametrize(("ttl", "seconds"), [(0.5, 1), (1, 1), (1.2, 2), (30, 30), (29.999, 30)])
def test_ttl_rounds_up_to_whole_seconds(ttl: float, seconds: int) -> None:
    assert whole_seconds(ttl) == seconds


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, True, "3"])
def test_ttl_refuses_values_the_server_cannot_apply(ttl: object) -> None:
    with pytest.raises(InvalidTTLError):
        whole_seconds(ttl)  # type: ignore[arg-type]


async def test_owner_must_be_an_agent_id(bus: Bus, bucket: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        Lock(bus, RESOURCE, "not an agent!", bucket=bucket)


# --- the lock's read of a key (kv_last) ------------------------------------------------


async def test_kv_last_reads_what_nats_py_reads(bus: Bus, bucket: str) -> None:
    """``kv_last`` decodes STREAM.MSG.GET itself: the same revision, value, headers and
    server time as nats-py's ``get_msg``, for a held lock, a release marker; None for
    a key never written and for a bucket that does not exist (as nats-py's 404)."""
    from swarmbus._jetstream.latest import kv_last

    key = lock_key(RESOURCE)
    assert await kv_last(bus.js, bucket, key) is None  # no such bucket yet
    await _bucket(bus, bucket)
    assert await kv_last(bus.js, bucket, key) is None  # never written
    lock = Lock(bus, RESOURCE, "ops/release-manager", ttl=7, bucket=bucket)
    lease = await lock.acquire()
    assert lease is not None

    async def both() -> tuple[Any, Any]:
        ours = await kv_last(bus.js, bucket, key)
        theirs = await bus.js.get_msg(f"KV_{bucket}", subject=kv_subject(bucket, key))
        return ours, theirs

    held, msg = await both()
    assert held is not None
    assert (held.revision, held.operation, held.value, held.ttl) == (
        lease.token,
        "put",
        msg.data,
        "7",
    )
    assert held.time == msg.time
    await lock.release()
    marker, msg = await both()
    assert marker is not None
    assert (marker.revision, marker.operation, marker.value) == (msg.seq, "purge", b"")
    assert marker.ttl == (msg.headers or {}).get(TTL_HEADER) == str(locks.MARKER_TTL)
    assert await kv_last(bus.js, bucket, lock_key("never-locked")) is None


# --- basic behaviour ----------------------------------------------------------------


async def test_acquire_release_and_holder_lookup(bus: Bus, bucket: str) -> None:
    lock = Lock(bus, RESOURCE, "ops/release-manager", ttl=30, bucket=bucket)
    other = Lock(bus, RESOURCE, "ops/deploy-validator", bucket=bucket)
    before = datetime.now(UTC)
    lease = await lock.acquire()
    assert lease is not None
    assert lease == Lease(RESOURCE, "ops/release-manager", lease.token, 30) == lock.lease
    assert await other.acquire() is None
    holder = await lock_holder(bus, RESOURCE, bucket=bucket)
    assert holder is not None
    assert (holder.resource, holder.owner, holder.token) == (RESOURCE, lease.owner, lease.token)
    assert before + timedelta(seconds=25) < holder.expires_at < before + timedelta(seconds=40)
    [listed] = await held_locks(bus, bucket=bucket)
    assert (listed.resource, listed.owner, listed.token) == (RESOURCE, lease.owner, lease.token)
    assert abs(listed.expires_at - holder.expires_at) < timedelta(milliseconds=1)
    with pytest.raises(InvalidTransitionError):
        await lock.acquire()

    await lock.release()
    assert lock.lease is None
    assert await lock_holder(bus, RESOURCE, bucket=bucket) is None
    assert await held_locks(bus, bucket=bucket) == []
    second = await other.acquire()
    assert second is not None
    assert second.token > lease.token
    again = Lock(bus, RESOURCE, "ops/release-manager", bucket=bucket)
    assert await again.acquire() is None  # a fresh object reads the live lock first


async def test_locks_on_different_resources_are_independent(bus: Bus, bucket: str) -> None:
    a = await Lock(bus, "a.b", "ops/a", bucket=bucket).acquire()
    b = await Lock(bus, "a_b", "ops/b", bucket=bucket).acquire()
    await (await _kv(bus, bucket)).put("not-a.lock", b"junk")  # skipped by the listing
    assert a is not None
    assert b is not None
    assert [h.resource for h in await held_locks(bus, bucket=bucket)] == ["a.b", "a_b"]


async def test_release_by_non_owner_fails_and_keeps_the_lock(bus: Bus, bucket: str) -> None:
    owner = Lock(bus, RESOURCE, "ops/owner", bucket=bucket)
    lease = await owner.acquire()
    assert lease is not None
    same_name = Lock(bus, RESOURCE, "ops/owner", bucket=bucket)  # same id, no lease
    for intruder in (Lock(bus, RESOURCE, "ops/intruder", bucket=bucket), same_name):
        assert await intruder.acquire() is None
        with pytest.raises(LockLostError) as info:
            await intruder.release()
        assert info.value.token is None
    holder = await lock_holder(bus, RESOURCE, bucket=bucket)
    assert holder is not None
    assert (holder.owner, holder.token) == ("ops/owner", lease.token)
    await owner.release()
    with pytest.raises(LockLostError):
        await owner.release()  # twice


async def test_blocking_acquire_wakes_on_release(bus: Bus, bucket: str) -> None:
    holder = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
    waiter = Lock(bus, RESOURCE, "ops/b", bucket=bucket)
    first = await holder.acquire()
    assert first is not None
    assert await waiter.acquire(timeout=0.2) is None  # times out while held
    got: list[Lease | None] = []

    async def wait() -> None:
        got.append(await waiter.acquire(timeout=10))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await holder.release()
    assert got[0] is not None
    assert got[0].token > first.token


async def test_context_manager_releases_and_times_out(bus: Bus, bucket: str) -> None:
    async with Lock(bus, RESOURCE, "ops/a", bucket=bucket) as lease:
        assert (await lock_holder(bus, RESOURCE, bucket=bucket)) is not None
        with pytest.raises(LockTimeoutError):
            async with Lock(bus, RESOURCE, "ops/b", timeout=0, bucket=bucket):
                pass
    assert await lock_holder(bus, RESOURCE, bucket=bucket) is None
    assert lease.owner == "ops/a"


# --- TTL and the three pitfalls ------------------------------------------------------


async def test_fractional_ttl_is_rounded_up_not_rejected(bus: Bus, bucket: str) -> None:
    """Pitfall: per-key TTLs are whole seconds >= 1 (the server refuses "0.5")."""
    lock = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
    with pytest.raises(InvalidTTLError):
        await lock.acquire(ttl=0)
    lease = await lock.acquire(ttl=0.5)
    assert lease is not None
    assert lease.ttl == 1
    headers = await _stored_headers(bus, bucket, lock_key(RESOURCE))
    assert headers[TTL_HEADER] == "1"


async def test_acquire_after_ttl_expiry(bus: Bus, bucket: str) -> None:
    """A lock the server removed at its TTL (no marker) is taken with a higher token."""
    kv = await _kv(bus, bucket)
    key = lock_key(RESOURCE)
    crashed = await Lock(bus, RESOURCE, "ops/crashed", bucket=bucket).acquire(ttl=1)
    assert crashed is not None
    await _wait_for_expiry(kv, key, crashed.token)
    with pytest.raises(nats.js.errors.NotFoundError):  # removed, no marker left
        await bus.js.get_msg(f"KV_{bucket}", subject=kv_subject(bucket, key))
    lease = await Lock(bus, RESOURCE, "ops/next", bucket=bucket).acquire()
    assert lease is not None
    assert lease.token > crashed.token


async def test_blocking_acquire_wakes_on_expiry(bus: Bus, bucket: str) -> None:
    crashed = await Lock(bus, RESOURCE, "ops/crashed", bucket=bucket).acquire(ttl=1)
    waiter = Lock(bus, RESOURCE, "ops/next", bucket=bucket)
    with anyio.fail_after(15):
        lease = await waiter.acquire(timeout=15)
    assert crashed is not None
    assert lease is not None
    assert lease.token > crashed.token


async def test_refresh_keeps_the_ttl_where_kv_update_drops_it(bus: Bus, bucket: str) -> None:
    """Pitfall: kv.update() writes a revision without a TTL (the key never expires)."""
    kv = await _kv(bus, bucket)
    raw = await kv.create("raw", b"x", msg_ttl=5)
    await kv.update("raw", b"y", last=raw)
    assert TTL_HEADER not in await _stored_headers(bus, bucket, "raw")

    lock = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
    lease = await lock.acquire(ttl=30)
    assert lease is not None
    refreshed = await lock.refresh(ttl=1)
    assert (refreshed.token, refreshed.ttl) == (lease.token, 1)
    key = lock_key(RESOURCE)
    assert (await _stored_headers(bus, bucket, key))[TTL_HEADER] == "1"
    holder = await lock_holder(bus, RESOURCE, bucket=bucket)
    assert holder is not None
    assert holder.token == lease.token
    await _wait_for_expiry(kv, key, lease.token)  # it still expires after the refresh
    assert await lock_holder(bus, RESOURCE, bucket=bucket) is None


async def test_refresh_and_release_after_loss(bus: Bus, bucket: str) -> None:
    kv = await _kv(bus, bucket)
    slow = Lock(bus, RESOURCE, "ops/slow", bucket=bucket)
    lease = await slow.acquire(ttl=1)
    assert lease is not None
    await _wait_for_expiry(kv, lock_key(RESOURCE), lease.token)
    with pytest.raises(LockLostError) as info:
        await slow.refresh()
    assert info.value.token == lease.token
    assert slow.lease is None

    lease = await slow.acquire(ttl=1)
    assert lease is not None
    await _wait_for_expiry(kv, lock_key(RESOURCE), lease.token)
    successor = await Lock(bus, RESOURCE, "ops/next", bucket=bucket).acquire(ttl=30)
    assert successor is not None
    with pytest.raises(LockLostError):
        await slow.refresh()
    with pytest.raises(LockLostError):
        await slow.release()
    holder = await lock_holder(bus, RESOURCE, bucket=bucket)
    assert holder is not None
    assert holder.token == successor.token


async def test_context_exit_reports_a_lost_lock(bus: Bus, bucket: str) -> None:
    kv = await _kv(bus, bucket)
    with pytest.raises(LockLostError):
        async with Lock(bus, RESOURCE, "ops/slow", ttl=1, bucket=bucket) as lease:
            await _wait_for_expiry(kv, lock_key(RESOURCE), lease.token)


_HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys, anyio
    from swarmbus import Bus, Lock

    async def main(url, bucket, resource):
        async with Bus.open(url=url) as bus:
            lease = await Lock(bus, resource, "ops/doomed", bucket=bucket).acquire(ttl=1)
            print(lease.token, flush=True)
            await anyio.sleep_forever()

    anyio.run(main, *sys.argv[1:])
    """
)


@pytest.mark.fault
async def test_a_killed_holders_lock_expires(bus: Bus, bucket: str, nats_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    cmd = [sys.executable, "-c", _HOLDER_SCRIPT, nats_url, bucket, RESOURCE]
    async with await anyio.open_process(cmd, env=env, stderr=None) as proc:
        try:
            assert proc.stdout is not None
            with anyio.fail_after(20):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 100)
            token = int(line)
            waiter = Lock(bus, RESOURCE, "ops/survivor", bucket=bucket)
            assert await waiter.acquire() is None
            os.kill(proc.pid, signal.SIGKILL)
            lease = await waiter.acquire(timeout=15)
            assert lease is not None
            assert lease.token > token
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


# --- safety ------------------------------------------------------------------------


class StaleTokenError(Exception):
    pass


class FencedResource:
    """What a protected resource does: remember the highest token, refuse lower ones."""

    def __init__(self) -> None:
        self.highest = 0
        self.writes = 0

    def write(self, token: int) -> None:
        if token < self.highest:
            raise StaleTokenError(f"token {token} < {self.highest}")
        self.highest = token
        self.writes += 1


@pytest.mark.slow
async def test_safety_16_contenders_and_a_stalled_holder(nats_url: str, bucket: str) -> None:
    target, contenders = 2000, 16
    fenced = FencedResource()
    tokens: list[int] = []
    active = 0
    half_way, stalled, took_over, late_release_done = (anyio.Event() for _ in range(4))
    takeover: list[int] = []
    stalled_token: list[int] = []

    def acquired(token: int) -> None:
        assert not tokens or token > tokens[-1], "fencing tokens must strictly increase"
        tokens.append(token)
        if len(tokens) >= target // 2:
            half_way.set()

    async with AsyncExitStack() as stack:
        buses = [await stack.enter_async_context(Bus.open(url=nats_url)) for _ in range(4)]

        async def contender(i: int) -> None:
            nonlocal active
            bus = buses[i % len(buses)]
            lock = Lock(bus, RESOURCE, f"swarm/c{i}", ttl=10, bucket=bucket)
            while len(tokens) < target:
                lease = await lock.acquire(timeout=30)
                assert lease is not None
                acquired(lease.token)
                active += 1
                assert active == 1, "two holders at once"
                fenced.write(lease.token)
                await anyio.lowlevel.checkpoint()
                fenced.write(lease.token)
                if stalled.is_set() and not late_release_done.is_set():
                    takeover.append(lease.token)
                    took_over.set()
                    await late_release_done.wait()
                    holder = await lock_holder(bus, RESOURCE, bucket=bucket)
                    assert holder is not None
                    assert holder.token == lease.token
                active -= 1
                await lock.release()

        async def stalled_holder() -> None:
            lock = Lock(buses[0], RESOURCE, "swarm/stalled", bucket=bucket)
            await half_way.wait()
            lease = await lock.acquire(timeout=30, ttl=1)
            assert lease is not None
            acquired(lease.token)
            stalled_token.append(lease.token)
            fenced.write(lease.token)
            stalled.set()
            await took_over.wait()  # stalled past the TTL: someone else holds it and wrote
            with pytest.raises(StaleTokenError):
                fenced.write(lease.token)
            with pytest.raises(LockLostError):
                await lock.release()
            late_release_done.set()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stalled_holder)
                for i in range(contenders):
                    tg.start_soon(contender, i)

        assert len(tokens) >= target
        assert len(takeover) == 1
        assert tokens[tokens.index(takeover[0]) - 1] == stalled_token[0]
        assert fenced.writes == 2 * (len(tokens) - 1) + 1
        assert await lock_holder(buses[0], RESOURCE, bucket=bucket) is None


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_safety_with_a_stalled_holder_on_each_store(
    request: pytest.FixtureRequest, nats_url: str, unique: str, backend: str
) -> None:
    """8 contenders on 4 connections and a holder that stalls past its TTL: one holder
    at a time, tokens strictly increase, the stalled holder is fenced out and its
    release changes nothing (Redis: the waiter queue; PostgreSQL: the store's watch)."""
    if backend == "redis":
        options = {"redis_url": request.getfixturevalue("redis_server").url}
    else:
        options = {"database_url": request.getfixturevalue("postgres_server").url}
    target, resource = 300, f"file:/{unique}"
    fenced, tokens, active = FencedResource(), [], [0]
    half_way, stalled, took_over, done = (anyio.Event() for _ in range(4))

    async with AsyncExitStack() as stack:
        buses = [
            await stack.enter_async_context(Bus.open(url=nats_url, backend=backend, **options))
            for _ in range(4)
        ]

        async def contender(i: int) -> None:
            lock = Lock(buses[i % 4], resource, f"swarm/c{i}", ttl=10)
            while len(tokens) < target:
                lease = await lock.acquire(timeout=30)
                assert lease is not None
                assert not tokens or lease.token > tokens[-1], "tokens must increase"
                tokens.append(lease.token)
                active[0] += 1
                assert active[0] == 1, "two holders at once"
                fenced.write(lease.token)
                await anyio.lowlevel.checkpoint()
                fenced.write(lease.token)
                if len(tokens) >= target // 2:
                    half_way.set()
                if stalled.is_set() and not took_over.is_set():
                    took_over.set()
                    await done.wait()  # hold it while the stalled one wakes up
                active[0] -= 1
                await lock.release()

        async def stalled_holder() -> None:
            lock = Lock(buses[0], resource, "swarm/stalled")
            await half_way.wait()
            lease = await lock.acquire(timeout=30, ttl=1)
            assert lease is not None
            tokens.append(lease.token)
            fenced.write(lease.token)
            stalled.set()  # never released: the TTL hands it on
            await took_over.wait()
            with pytest.raises(StaleTokenError):
                fenced.write(lease.token)
            with pytest.raises(LockLostError):
                await lock.release()
            with pytest.raises(LockLostError):
                await lock.refresh()
            done.set()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stalled_holder)
                for i in range(8):
                    tg.start_soon(contender, i)
    assert len(tokens) >= target
    assert tokens == sorted(set(tokens))


# --- CLI ------------------------------------------------------------------------------


async def test_cli_lists_held_locks(
    bus: Bus,
    bucket: str,
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lease = await Lock(bus, RESOURCE, "ops/release-manager", bucket=bucket).acquire()
    assert lease is not None
    monkeypatch.setenv("NATS_URL", nats_url)
    code = await anyio.to_thread.run_sync(main, ["locks", "--bucket", bucket])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["RESOURCE", "OWNER", "TOKEN"]
    assert out[1].split()[:3] == [RESOURCE, "ops/release-manager", str(lease.token)]


async def test_acquire_when_the_key_was_emptied(bus: Bus, bucket: str) -> None:
    """Markers expire (MARKER_TTL) and leave the key empty: a stale CAS base is recovered."""
    lock = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
    first = await lock.acquire()
    await lock.release()
    await bus.js.purge_stream(f"KV_{bucket}", subject=kv_subject(bucket, lock_key(RESOURCE)))
    second = await lock.acquire()
    assert first is not None
    assert second is not None
    assert second.token > first.token


async def test_a_waiter_that_gives_up_leaves_the_queue(bus: Bus, bucket: str) -> None:
    holder = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
    assert await holder.acquire() is not None
    results: dict[str, Lease | None] = {}
    gave_up = anyio.Event()

    async def wait(name: str, timeout: float) -> None:
        results[name] = await Lock(bus, RESOURCE, f"ops/{name}", bucket=bucket).acquire(
            timeout=timeout
        )
        if name == "impatient":
            gave_up.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "impatient", 0.3)  # first in the local queue
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(wait, "patient", 10)
            await gave_up.wait()
            await holder.release()
    assert results["impatient"] is None
    assert results["patient"] is not None


# --- the lock write path and hand-offs across connections ----------------------------


@pytest.mark.fault
@pytest.mark.parametrize("held_by_other", [False, True])
async def test_a_write_whose_ack_was_lost_is_settled(
    nats_url: str, bucket: str, monkeypatch: pytest.MonkeyPatch, held_by_other: bool
) -> None:
    """One ack on the writer's inbox is dropped: the retry (same Nats-Msg-Id) fails its
    compare-and-set, and the key's last entry says whether the write was ours."""
    armed: list[bool] = []
    dropped: list[Msg] = []
    original = _Writer._on_reply

    async def lose_one(self: _Writer, msg: Msg) -> None:
        if armed and not dropped:
            dropped.append(msg)
            return
        await original(self, msg)

    monkeypatch.setattr(_Writer, "_on_reply", lose_one)
    async with (
        Bus.open(url=nats_url) as other_bus,
        Bus.open(url=nats_url, request_timeout=0.5) as bus,
    ):
        lock = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
        assert await lock.acquire() is not None
        await lock.release()  # the next try is a CAS on this release's revision
        if held_by_other:
            assert await Lock(other_bus, RESOURCE, "ops/b", bucket=bucket).acquire()
        armed.append(True)
        with anyio.fail_after(10):
            lease = await lock.acquire()
        holder = await lock_holder(bus, RESOURCE, bucket=bucket)
        assert len(dropped) == 1
        assert holder is not None
        if held_by_other:  # the lost ack was a refusal: not ours, nothing changed
            assert lease is None
            assert holder.owner == "ops/b"
            assert b"wrong last sequence" in dropped[0].data
        else:  # the lost ack was ours: the lease is the stored write
            assert lease is not None
            assert (holder.owner, holder.token) == ("ops/a", lease.token)
            assert msgspec.json.decode(dropped[0].data)["seq"] == lease.token
            await lock.release()
            assert await lock_holder(bus, RESOURCE, bucket=bucket) is None


async def _cycle(bus: Bus, bucket: str, name: str, total: int, order: list[str]) -> None:
    """Acquire and release (re-queueing at once) until ``order`` has ``total`` entries."""
    lock = Lock(bus, RESOURCE, f"ops/{name}", bucket=bucket)
    while len(order) < total:
        lease = await lock.acquire(timeout=20)
        assert lease is not None
        order.append(name)
        await lock.release()


def _no_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only wakes wake waiters (far above any test's run): no timing luck."""
    monkeypatch.setattr(locks, "RECHECK", 60.0)
    monkeypatch.setattr(locks, "MAX_RECHECK", 60.0)


class _Waits:
    """Counts wake deliveries and create attempts; tells when an owner's attempt failed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.wakes: list[str] = []  # the owner of the head each wake reached ("": none)
        self.creates: list[str] = []
        self.failed: dict[str, anyio.Event] = {}
        on_wake, retry_later, create = (
            locks._Bucket._on_wake,
            locks._Bucket.retry_later,
            locks.Lock._create,
        )

        async def counted_wake(bucket: locks._Bucket, msg: Msg) -> None:
            queue = bucket._queues.get(msg.subject.rsplit(".", 1)[1])
            self.wakes.append(queue.waiters[0].owner if queue else "")
            await self.on_wake(bucket, msg, on_wake)

        def failed(bucket: locks._Bucket, key: str, waiter: locks._Waiter) -> None:
            self.failed.setdefault(waiter.owner, anyio.Event()).set()
            retry_later(bucket, key, waiter)

        async def counted_create(lock: Lock, ttl: int, expected: int) -> Lease:
            self.creates.append(lock.owner)
            return await create(lock, ttl, expected)

        monkeypatch.setattr(locks._Bucket, "_on_wake", counted_wake)
        monkeypatch.setattr(locks._Bucket, "retry_later", failed)
        monkeypatch.setattr(locks.Lock, "_create", counted_create)

    async def on_wake(self, bucket: locks._Bucket, msg: Msg, original: object) -> None:
        await original(bucket, msg)  # type: ignore[operator]

    async def have_failed(self, *owners: str) -> None:
        for owner in owners:
            await self.failed.setdefault(owner, anyio.Event()).wait()


async def test_waiters_on_different_connections_take_turns(
    nats_url: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A releaser that re-queues at once does not barge past the waiter its release
    woke: two connections that cycle alternate strictly (only wakes wake them), once
    each has seen the other take one of its wakes."""
    _no_recheck(monkeypatch)
    order: list[str] = []
    async with Bus.open(url=nats_url) as a, Bus.open(url=nats_url) as b:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cycle, a, bucket, "a", 40, order)
                tg.start_soon(_cycle, b, bucket, "b", 40, order)
    assert all(x != y for x, y in itertools.pairwise(order[4:])), order


async def test_a_lone_contender_takes_its_lock_back_at_once(
    bus: Bus, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody else waits: each wake is answered "no responders" before the next
    release, so the contender never waits for a turn (here: no re-check would come,
    and the answers after the first two are dropped)."""
    _no_recheck(monkeypatch)
    answers: list[object] = []
    on_reply = locks._Bucket._on_reply

    async def first_two(bucket: locks._Bucket, msg: Msg) -> None:
        answers.append(msg)
        if len(answers) <= 2:
            await on_reply(bucket, msg)

    monkeypatch.setattr(locks._Bucket, "_on_reply", first_two)
    lock = Lock(bus, RESOURCE, "ops/a", bucket=bucket, timeout=30)
    with anyio.fail_after(10):
        for _ in range(4):
            async with lock:
                pass
    assert len(answers) >= 3


async def test_waiters_on_many_connections_all_get_the_lock(nats_url: str, bucket: str) -> None:
    """Five connections, 12 rounds each: every one is served, tokens strictly increase."""
    tokens: dict[str, list[int]] = {}

    async def rounds(bus: Bus, name: str) -> None:
        lock = Lock(bus, RESOURCE, f"ops/{name}", bucket=bucket)
        for _ in range(12):
            lease = await lock.acquire(timeout=20)
            assert lease is not None
            tokens.setdefault(name, []).append(lease.token)
            await lock.release()

    async with AsyncExitStack() as stack:
        buses = [await stack.enter_async_context(Bus.open(url=nats_url)) for _ in range(5)]
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i, bus in enumerate(buses):
                    tg.start_soon(rounds, bus, f"c{i}")
    assert sorted(len(t) for t in tokens.values()) == [12] * 5
    every = sorted(t for ts in tokens.values() for t in ts)
    assert len(set(every)) == len(every)


async def test_a_release_wakes_exactly_one_of_the_waiting_connections(
    nats_url: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No herd: four connections wait; one release is one wake and one create."""
    _no_recheck(monkeypatch)
    waits = _Waits(monkeypatch)
    names = [f"ops/w{i}" for i in range(4)]
    got: list[str] = []
    acquired = anyio.Event()
    async with AsyncExitStack() as stack:
        holder_bus, *buses = [
            await stack.enter_async_context(Bus.open(url=nats_url)) for _ in range(5)
        ]
        holder = Lock(holder_bus, RESOURCE, "ops/h", bucket=bucket)
        assert await holder.acquire() is not None

        async def wait(bus: Bus, owner: str) -> None:
            if await Lock(bus, RESOURCE, owner, bucket=bucket).acquire(timeout=30):
                got.append(owner)
                acquired.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for bus, owner in zip(buses, names, strict=True):
                    tg.start_soon(wait, bus, owner)
                await waits.have_failed(*names)  # all subscribed, all waiting
                waits.wakes.clear()
                waits.creates.clear()
                await holder.release()
                await acquired.wait()
                for bus in buses:  # anything the server sent them has arrived
                    await bus.nc.flush()
                tg.cancel_scope.cancel()
    assert len(got) == 1
    assert waits.wakes == got
    assert waits.creates == got


async def test_a_lost_wake_is_recovered_by_the_recheck(
    nats_url: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The releaser's wake never leaves (as if it died first): the waiter re-reads."""
    waits = _Waits(monkeypatch)

    async def lost(bucket: locks._Bucket, key: str, reply: str = "") -> None:
        pass

    monkeypatch.setattr(locks._Bucket, "_publish", lost)
    reads = 0
    kv_last = locks.kv_last

    async def counted(*args: object) -> object:
        nonlocal reads
        reads += 1
        return await kv_last(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(locks, "kv_last", counted)
    async with Bus.open(url=nats_url) as a, Bus.open(url=nats_url) as b:
        holder = Lock(a, RESOURCE, "ops/h", bucket=bucket)
        assert await holder.acquire() is not None
        waiter = Lock(b, RESOURCE, "ops/w", bucket=bucket)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(waiter.acquire, timeout=10))
                await waits.have_failed("ops/w")
                await holder.release()
        assert waiter.lease is not None
    assert waits.wakes == []
    assert reads >= 2  # the first attempt, then the re-check that found it free


async def test_a_cancelled_woken_waiter_passes_the_wake_on(
    nats_url: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The woken connection's only waiter is cancelled as the wake arrives: it passes
    the wake on, and the waiter on the other connection takes the lock."""
    _no_recheck(monkeypatch)
    waits = _Waits(monkeypatch)
    scopes = {"ops/a": anyio.CancelScope(), "ops/b": anyio.CancelScope()}
    results: dict[str, Lease | None] = {}

    async def cancel_first(bucket: locks._Bucket, msg: Msg, original: object) -> None:
        if len(waits.wakes) == 1:
            scopes[waits.wakes[0]].cancel()  # as a deadline firing before it runs again
        await original(bucket, msg)  # type: ignore[operator]

    monkeypatch.setattr(waits, "on_wake", cancel_first)
    async with AsyncExitStack() as stack:
        h, a, b = [await stack.enter_async_context(Bus.open(url=nats_url)) for _ in "hab"]
        holder = Lock(h, RESOURCE, "ops/h", bucket=bucket)
        assert await holder.acquire() is not None

        async def wait(bus: Bus, owner: str) -> None:
            results[owner] = None
            with scopes[owner]:
                results[owner] = await Lock(bus, RESOURCE, owner, bucket=bucket).acquire(timeout=30)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait, a, "ops/a")
                tg.start_soon(wait, b, "ops/b")
                await waits.have_failed("ops/a", "ops/b")
                await holder.release()
    first, second = waits.wakes
    assert {first, second} == {"ops/a", "ops/b"}
    assert results[first] is None
    assert results[second] is not None


# --- hand-over to the next local waiter ------------------------------------------------


async def test_release_hands_the_lock_to_the_next_local_waiter(bus: Bus, bucket: str) -> None:
    """One write: the holder's release stores the waiter's lock (no marker in between)."""
    holder = Lock(bus, RESOURCE, "ops/a", bucket=bucket, ttl=7)
    first = await holder.acquire()
    assert first is not None
    waiter = Lock(bus, RESOURCE, "ops/b", bucket=bucket, ttl=9)
    got: list[Lease | None] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                got.append(await waiter.acquire(timeout=10))

            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await holder.release()
    (lease,) = got
    assert lease is not None
    assert (lease.owner, lease.ttl) == ("ops/b", 9)
    assert lease.token == first.token + 1  # the bucket's next write was the hand-over
    stored = await lock_holder(bus, RESOURCE, bucket=bucket)
    assert stored is not None
    assert (stored.owner, stored.token) == ("ops/b", lease.token)
    assert (await _stored_headers(bus, bucket, lock_key(RESOURCE)))[TTL_HEADER] == "9"
    with pytest.raises(LockLostError):
        await holder.release()  # the old holder has nothing left to release
    await waiter.release()
    assert await lock_holder(bus, RESOURCE, bucket=bucket) is None


async def test_a_waiter_that_left_during_the_hand_over_is_not_left_holding(
    bus: Bus, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiter gives up while the hand-over write is in flight: its lock is released."""
    holder = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
    assert await holder.acquire() is not None
    left = anyio.Event()
    scope = anyio.CancelScope()
    original = _Writer.write

    async def leave_first(
        self: _Writer, subject: str, payload: bytes, headers: dict[str, str], what: str
    ) -> int:
        if b"ops/b" in payload:  # the hand-over: the waiter leaves before it lands
            scope.cancel()
            await left.wait()
        return await original(self, subject, payload, headers, what)

    monkeypatch.setattr(_Writer, "write", leave_first)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                with scope:
                    await Lock(bus, RESOURCE, "ops/b", bucket=bucket).acquire(timeout=10)
                left.set()

            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await holder.release()
    assert await lock_holder(bus, RESOURCE, bucket=bucket) is None
    assert await Lock(bus, RESOURCE, "ops/c", bucket=bucket).acquire() is not None


async def test_a_remote_waiter_is_not_starved_by_hand_overs(nats_url: str, bucket: str) -> None:
    """Two contenders hand the lock back and forth on one connection; a waiter on
    another connection still gets it (a release marker at least every eighth hand-off)."""
    order: list[str] = []
    both_held = anyio.Event()
    stop = anyio.Event()
    async with Bus.open(url=nats_url) as x, Bus.open(url=nats_url) as y:

        async def cycle(name: str) -> None:
            lock = Lock(x, RESOURCE, f"ops/{name}", bucket=bucket)
            while not stop.is_set():
                lease = await lock.acquire(timeout=10)
                assert lease is not None
                order.append(name)
                if {"a1", "a2"} <= set(order):
                    both_held.set()
                await anyio.sleep(0.002)  # the work done holding it: the other re-queues
                await lock.release()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(cycle, "a1")
                tg.start_soon(cycle, "a2")
                await both_held.wait()
                remote = Lock(y, RESOURCE, "ops/c", bucket=bucket)
                lease = await remote.acquire(timeout=10)
                stop.set()
                assert lease is not None
                await remote.release()


async def _release_to(holder: Lock, waiter: Lock, scope: anyio.CancelScope) -> None:
    """``holder`` releases while ``waiter`` waits (inside ``scope``) for the lock."""
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                with scope:
                    await waiter.acquire(timeout=10)

            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await holder.release()


async def _assert_held_or_given_back(bus: Bus, bucket: str, waiter: Lock) -> None:
    """Either acquire() returned the lease (its caller holds it) or it gave it back:
    never a lock held by nobody; the next contender gets it at once."""
    stored = await lock_holder(bus, RESOURCE, bucket=bucket)
    if waiter.lease is None:
        assert stored is None
    else:
        assert stored is not None
        assert (stored.owner, stored.token) == ("ops/b", waiter.lease.token)
        await waiter.release()
    assert await Lock(bus, RESOURCE, "ops/c", bucket=bucket).acquire() is not None


async def test_a_waiter_cancelled_as_the_lock_is_handed_to_it_gives_it_back(
    bus: Bus, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiter is cancelled in the same turn as the hand-over reaches it: the lock
    written for it is released, not left to its TTL."""
    holder = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
    assert await holder.acquire() is not None
    scope = anyio.CancelScope()
    original = locks._Bucket.handed

    def cancelled_first(self: locks._Bucket, key: str, waiter: object, revision: int) -> bool:
        scope.cancel()  # as a deadline firing before the waiter runs again
        return original(self, key, waiter, revision)  # type: ignore[arg-type]

    monkeypatch.setattr(locks._Bucket, "handed", cancelled_first)
    waiter = Lock(bus, RESOURCE, "ops/b", bucket=bucket, ttl=30)
    await _release_to(holder, waiter, scope)  # hands over to ops/b
    await _assert_held_or_given_back(bus, bucket, waiter)


async def test_a_write_that_landed_as_acquire_was_cancelled_is_given_back(
    bus: Bus, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its compare-and-set is in flight, acquire() sees the write
    through: its caller gets the lease, or it is given back. Never a lock held by
    nobody until its TTL (before: acquire returned None with the write stored)."""
    holder = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
    assert await holder.acquire() is not None
    scope = anyio.CancelScope()
    original = _Writer._request

    async def cancelled_in_flight(
        self: _Writer, subject: str, payload: bytes, headers: dict[str, str]
    ) -> Msg:
        reply = await original(self, subject, payload, headers)
        if b"ops/b" in payload:
            scope.cancel()  # stored, ack not yet handed back: the deadline fires
            await anyio.lowlevel.checkpoint()
        return reply

    monkeypatch.setattr(_Writer, "_request", cancelled_in_flight)
    monkeypatch.setattr(locks._Bucket, "successor", lambda self, key: None)  # plain release
    waiter = Lock(bus, RESOURCE, "ops/b", bucket=bucket)
    await _release_to(holder, waiter, scope)
    await _assert_held_or_given_back(bus, bucket, waiter)


async def test_a_release_that_could_not_reach_nats_can_be_retried(
    bus: Bus, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = Lock(bus, RESOURCE, "ops/release-manager", ttl=30, bucket=bucket)
    lease = await lock.acquire()
    assert lease is not None

    async def unreachable(*args: object) -> int:
        raise swarmbus.ConnectionError("release: NATS unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(lock, "_write", unreachable)
        with pytest.raises(swarmbus.ConnectionError):
            await lock.release()
    assert lock.lease == lease  # still ours: the release did not happen
    await lock.release()  # so it can be retried, instead of waiting out the 30 s TTL
    assert await lock_holder(bus, RESOURCE, bucket=bucket) is None


# --- expiry without markers -----------------------------------------------------------


async def test_waiters_take_expired_locks_within_their_ttl(nats_url: str, bucket: str) -> None:
    """No marker says a lock expired: waiters time it, both for a record they read (held
    before they came) and for one their watch saw written (taken while they waited)."""
    bound = timedelta(milliseconds=500)
    async with Bus.open(url=nats_url) as first, Bus.open(url=nats_url) as second:
        crashed = await Lock(first, RESOURCE, "ops/crashed", bucket=bucket).acquire(ttl=1)
        holder = await lock_holder(first, RESOURCE, bucket=bucket)
        assert crashed is not None
        assert holder is not None
        expiries = [holder.expires_at]
        taken: list[tuple[datetime, Lease]] = []

        async def wait(bus: Bus, owner: str) -> None:
            lease = await Lock(bus, RESOURCE, owner, bucket=bucket).acquire(timeout=10, ttl=1)
            now = datetime.now(UTC)
            assert lease is not None  # and never released: it expires too
            held = await lock_holder(bus, RESOURCE, bucket=bucket)
            assert held is not None
            taken.append((now, lease))
            expiries.append(held.expires_at)

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait, first, "ops/a")
                tg.start_soon(wait, second, "ops/b")
        assert crashed.token < taken[0][1].token < taken[1][1].token
        for (at, _), expired in zip(taken, expiries, strict=False):
            assert expired <= at < expired + bound  # never early, late by a small bound


async def test_a_lock_bucket_with_limit_markers_is_updated_in_place(
    nats_url: str, bucket: str
) -> None:
    """A lock bucket made by an older swarmbus (limit markers, hence rollups allowed)
    loses both when a lock opens it; its locks and revisions stay."""
    async with Bus.open(url=nats_url) as old:
        await old.key_value(bucket, history=1, limit_marker_ttl=60)
        config = (await old.js.stream_info(f"KV_{bucket}")).config
        assert config.subject_delete_marker_ttl
        assert config.allow_rollup_hdrs
        held = await Lock(old, RESOURCE, "ops/old", bucket=bucket, ttl=30).acquire()
    assert held is not None
    async with Bus.open(url=nats_url) as new:
        assert await Lock(new, RESOURCE, "ops/new", bucket=bucket).acquire() is None
        config = (await new.js.stream_info(f"KV_{bucket}")).config
        assert not config.subject_delete_marker_ttl
        assert not config.allow_rollup_hdrs
        holder = await lock_holder(new, RESOURCE, bucket=bucket)
        assert holder is not None
        assert holder.token == held.token
        with pytest.raises(nats.js.errors.APIError, match="rollup"):
            await new.js.publish(kv_subject(bucket, "x"), b"", headers={"Nats-Rollup": "all"})


async def test_a_waiter_that_lost_to_a_write_it_never_saw_times_its_expiry(
    nats_url: str, bucket: str
) -> None:
    """The waiter's hint (its own release marker) loses to a lock written before its
    connection watched the bucket: it reads that lock to time its expiry."""
    async with Bus.open(url=nats_url) as first, Bus.open(url=nats_url) as second:
        waiter = Lock(second, RESOURCE, "ops/next", bucket=bucket)
        assert await waiter.acquire(timeout=0) is not None
        await waiter.release()  # a hint for later, and no watch yet
        crashed = await Lock(first, RESOURCE, "ops/crashed", bucket=bucket).acquire(ttl=1)
        holder = await lock_holder(first, RESOURCE, bucket=bucket)
        assert crashed is not None
        assert holder is not None
        with anyio.fail_after(5):
            lease = await waiter.acquire(timeout=5)
        assert lease is not None
        assert holder.expires_at <= datetime.now(UTC) < holder.expires_at + timedelta(seconds=0.5)


async def test_a_waiter_whose_clock_is_ahead_rereads_with_backoff(
    bus: Bus, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter's clock 0.8 s ahead of the server's reads the key too early: it finds
    the holder still there and reads again after 20 ms, 40 ms, ... (not in a loop)."""

    class Ahead(datetime):
        @classmethod
        def now(cls, tz: object = None) -> Ahead:  # type: ignore[override]
            return super().now(UTC) + timedelta(seconds=0.8)  # type: ignore[return-value]

    reads = 0
    kv_last = locks.kv_last

    async def counted(*args: object) -> object:
        nonlocal reads
        reads += 1
        return await kv_last(*args)  # type: ignore[arg-type]

    crashed = await Lock(bus, RESOURCE, "ops/crashed", bucket=bucket).acquire(ttl=2)
    holder = await lock_holder(bus, RESOURCE, bucket=bucket)
    assert crashed is not None
    assert holder is not None
    monkeypatch.setattr(locks, "datetime", Ahead)
    monkeypatch.setattr(locks, "kv_last", counted)
    with anyio.fail_after(10):
        lease = await Lock(bus, RESOURCE, "ops/next", bucket=bucket).acquire(timeout=10)
    assert lease is not None
    assert datetime.now(UTC) < holder.expires_at + timedelta(seconds=0.8)
    assert 2 < reads < 12


async def test_a_release_cancelled_during_its_hand_over_still_tells_the_successor(
    bus: Bus, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``release()`` called under a deadline that fires once the hand-over write is
    stored: the successor still gets the lock at once, not at the end of its TTL."""
    holder = Lock(bus, RESOURCE, "ops/a", bucket=bucket)
    assert await holder.acquire() is not None
    release_scope = anyio.CancelScope()
    original = _Writer._request

    async def cancel_after_store(self: _Writer, subject: str, payload: bytes, headers: Any) -> Msg:
        reply = await original(self, subject, payload, headers)
        if b"ops/b" in payload:  # the hand-over to the waiter is stored
            release_scope.cancel()
            await anyio.lowlevel.checkpoint()
        return reply

    monkeypatch.setattr(_Writer, "_request", cancel_after_store)
    waiter = Lock(bus, RESOURCE, "ops/b", bucket=bucket, ttl=10)
    got = anyio.Event()

    async def take() -> None:
        assert await waiter.acquire(timeout=20) is not None
        got.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await anyio.wait_all_tasks_blocked()
        with release_scope:
            await holder.release()
        with anyio.fail_after(5):  # far less than the waiter's TTL
            await got.wait()
    assert waiter.lease is not None
    assert waiter.lease.owner == "ops/b"


async def test_a_flood_of_forged_wakes_merges_into_one_pending_attempt(
    nats_url: str, bucket: str
) -> None:
    async with (
        Bus.open(url=nats_url) as a,
        Bus.open(url=nats_url) as b,
        Bus.open(url=nats_url) as evil,
    ):
        holder = Lock(a, RESOURCE, "ops/a", bucket=bucket, ttl=30)
        assert await holder.acquire() is not None
        async with anyio.create_task_group() as tg:
            waiter = Lock(b, RESOURCE, "ops/b", bucket=bucket)
            tg.start_soon(lambda: waiter.acquire(timeout=30))
            state = await _bucket(b, bucket)
            with anyio.fail_after(10):  # the waiter has subscribed and found it held
                while not (q := state._queues.get(lock_key(RESOURCE))) or q.sub is None:
                    await anyio.wait_all_tasks_blocked()
                    await anyio.lowlevel.checkpoint()
                await b.nc.flush()
            subject = locks.subjects.lock_wake_subject(bucket, lock_key(RESOURCE))
            for _ in range(5000):
                await evil.nc.publish(subject, b"x", reply="bogus.reply")
            await evil.nc.flush()
            await b.nc.flush()  # every wake reached b's connection
            sub = q.sub
            with anyio.fail_after(10):
                while sub.pending_msgs:  # type: ignore[union-attr]
                    await anyio.lowlevel.checkpoint()
            assert q.waiters[0].updates.qsize() <= 1
            assert waiter.lease is None  # the holder still holds it
            tg.cancel_scope.cancel()
