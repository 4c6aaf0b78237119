"""Lock hand-offs between contenders in separate processes: swarmbus vs raw designs.

    python bench/bench_lock_procs.py [--processes 8] [--handoffs 2000] [--repeat 3]

Each contender is a process of its own with its own connection, looping acquire ->
release on one resource until the run's hand-offs are done. Per repetition, in
alternating order, the same run is made with:

* ``swarmbus``: ``Lock.acquire(timeout=...)`` + ``release()`` (fencing token, TTL,
  owner-only release, one core wake per release to a queue group of the waiters);
* ``raw JetStream + wakes``: the same design in plain nats-py (``_raw_wakes``);
* ``raw JetStream + hand-over``: one compare-and-set per hand-off to a waiter that
  registered with the holder, checked by the waiter with one direct get
  (``_HandOver``; a sketch, measured for issue 18); with ``--only`` also the same
  design whose waiters believe grants unchecked (unsafe: what the check costs);
* ``raw JetStream``: plain nats-py, the same guarantees: ``kv.create`` with a per-key
  TTL (its revision is the fencing token), owner-only release as ``kv.delete`` with
  ``last=`` the lock's revision, waiters woken by a ``kv.watch`` of the key;
* ``raw Redis`` (if ``redis-server`` and the ``redis`` package are installed): ``SET
  key token NX PX ttl`` with a fencing token from ``INCR``, release by a Lua script that
  deletes only the holder's token and pushes one wake-up onto a per-resource list that
  waiters ``BLPOP`` (a release wakes one waiter, no herd; a 50 ms BLPOP timeout retries).

Prints hand-offs/s, the share of hand-offs that changed owner, and the CPU per hand-off
of the contenders (sum of their processes) and of the server, with the load average.
The contenders start together: each prints ``ready``, waits for ``go`` on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESOURCE = "file:/src/main.py"
TTL = 30
RAW_WAKES = "raw JetStream + wakes"
RAW_HANDOVER = "raw JetStream + hand-over"
UNCHECKED = "raw hand-over without grant check (unsafe)"
KINDS = (
    "swarmbus",
    RAW_WAKES,
    RAW_HANDOVER,
    "raw JetStream",
    "raw JetStream + manager",
    "swarmbus on Redis",
    "raw Redis",
)
MANAGED = "raw JetStream + manager"
EXTRA_KINDS = (UNCHECKED,)
"""Run only when named in ``--only``: what the hand-over's check of a grant costs (a
waiter that believes any grant can be made to believe it holds a lock it does not)."""


# --- contenders (child processes) -------------------------------------------------------


async def _swarmbus(url: str, name: str, stop: Callable[[int], bool]) -> list[int]:
    from swarmbus import Bus, Lock

    async with Bus.open(url=url) as bus:
        lock = Lock(bus, RESOURCE, f"bench/{name}", ttl=TTL, bucket="PROCS")
        await lock.acquire(timeout=30)  # provisions the bucket and its watch
        await lock.release()
        _ready()
        tokens: list[int] = []
        while not stop(len(tokens)):
            lease = await lock.acquire(timeout=30)
            assert lease is not None
            tokens.append(lease.token)
            await lock.release()
        return tokens


async def _swarmbus_on_redis(url: str, name: str, stop: Callable[[int], bool]) -> list[int]:
    from swarmbus import Bus, Lock

    nats_url, redis_url = url.split(" ")
    async with Bus.open(url=nats_url, backend="redis", redis_url=redis_url) as bus:
        lock = Lock(bus, RESOURCE, f"bench/{name}", ttl=TTL, bucket="PROCS")
        await lock.acquire(timeout=30)
        await lock.release()
        _ready()
        tokens: list[int] = []
        while not stop(len(tokens)):
            lease = await lock.acquire(timeout=30)
            assert lease is not None
            tokens.append(lease.token)
            await lock.release()
        return tokens


async def _raw_jetstream(url: str, name: str, stop: Callable[[int], bool]) -> list[int]:
    import nats
    import nats.js.errors

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="RAWPROCS", history=1, limit_marker_ttl=60)
        key = "lock"
        freed = asyncio.Event()
        watch = await kv.watch(key, include_history=False)

        async def follow() -> None:
            async for entry in watch:
                if entry is not None and entry.operation in ("DEL", "PURGE"):
                    freed.set()

        follower = asyncio.create_task(follow())
        value = f'{{"owner":"bench/{name}","ttl":{TTL}}}'.encode()
        _ready()
        tokens: list[int] = []
        while not stop(len(tokens)):
            while True:
                freed.clear()
                try:
                    revision = await kv.create(key, value, msg_ttl=TTL)
                    break
                except nats.js.errors.KeyWrongLastSequenceError:
                    pass
                entry = await _kv_last(kv, key)
                if entry is not None:  # held: wait for a release (or retry after 50 ms)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(freed.wait(), 0.05)
                    continue
            tokens.append(revision)
            await kv.delete(key, last=revision)  # owner-only: fails if it is not ours
        follower.cancel()
        await watch.stop()
        return tokens
    finally:
        await nc.close()


async def _raw_wakes(url: str, name: str, stop: Callable[[int], bool]) -> list[int]:
    """swarmbus's design in plain nats-py: compare-and-set create with a per-key TTL,
    owner-only release as a purge marker on the lock's revision, then one core wake (a
    queue group of the waiting connections, subscribed before the first attempt); a woken
    or timed-out (50 ms, as the Redis row) waiter reads the key and compare-and-sets on
    the release marker it finds (a revision in a wake could be forged). The
    same rule against barging as swarmbus: the wake carries a reply subject, and a
    releaser that re-acquires waits for a wake, the server's "no responders" (nobody was
    waiting) or the timeout before it tries."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.create_key_value(bucket="WAKEPROCS", history=1)
        subject, wake = "$KV.WAKEPROCS.lock", "wake.WAKEPROCS.lock"
        value = f'{{"owner":"bench/{name}","ttl":{TTL}}}'.encode()
        woken: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_wake(msg: Any) -> None:
            woken.put_nowait(b"w")

        async def on_reply(msg: Any) -> None:  # "no responders": our release is free
            if msg.headers and msg.headers.get("Status") == "503":
                woken.put_nowait(b"")

        async def read(last: int) -> int:
            """The key's last revision if it is free (a marker), else ``last``."""
            with contextlib.suppress(Exception):
                entry = await js.get_last_msg("KV_WAKEPROCS", subject)
                if entry.headers and entry.headers.get("KV-Operation"):
                    return int(entry.seq)
            return last

        replies = nc.new_inbox()
        await nc.subscribe(replies, cb=on_reply)

        async def cas(data: bytes, last: int, headers: dict[str, str]) -> int | None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
            reply = await nc.request(subject, data, timeout=10, headers=headers)
            ack = json.loads(reply.data)
            return None if "error" in ack else int(ack["seq"])

        last = 0
        with contextlib.suppress(Exception):
            last = (await js.get_last_msg("KV_WAKEPROCS", subject)).seq
        _ready()
        tokens: list[int] = []
        while not stop(len(tokens)):
            sub = await nc.subscribe(wake, queue="lock", cb=on_wake)
            if tokens:  # we released and woke someone, maybe: wait for our turn
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(woken.get(), 0.05):
                        last = await read(last)  # a wake: read; "no responders": ours
            while (revision := await cas(value, last, {"Nats-TTL": str(TTL)})) is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.get(), 0.05)
                last = await read(last)
            await sub.unsubscribe()
            while not woken.empty():
                woken.get_nowait()
            tokens.append(revision)
            released = await cas(b"", revision, {"KV-Operation": "PURGE", "Nats-TTL": "60"})
            assert released is not None  # owner-only: fails if it is not ours
            last = released
            await nc.publish(wake, b"", reply=replies)
        return tokens
    finally:
        await nc.close()


class _HandOver:
    """One contender of the hand-over design (``_raw_handover``), in plain nats-py.

    A lock record names its holder's connection (``via``) and, if it was handed over,
    the waiter it was written for (``nonce``, new for every turn). A waiter that finds
    the lock held registers with the holder's connection (``hq.<via>``, the waiter's
    nonce, connection and TTL). The holder's release, if waiters registered, is ONE
    compare-and-set writing the first one's record over its own revision, then a grant
    (``hg.<via>``: the new revision, the nonce and the rest of the queue). The granted
    waiter believes it only after one direct get of the key's last message shows that
    revision with its own nonce (a grant is a hint anyone could forge); it then holds
    the queue. A connection that may hold the lock soon (a try in flight, checking a
    grant, waiting for one) keeps registrations that reach it for its turn; one that
    handed the lock on answers with a hint (``hr.<via>``: whom it handed it to). No
    waiter registered: a purge marker and a queue-group wake, as ``_raw_wakes``.

    Fallbacks in this sketch: a waiter re-reads the key after 50 ms without news (and
    hands back what it kept), a grant whose connection closed ("no responders") is
    handed on by its granter, a grant for an earlier turn of this contender is taken.
    Not in it: waiters that give up, holders that die (the record's TTL).
    """

    def __init__(self, nc: Any, name: str, check: bool = True) -> None:
        self.nc, self.name, self.checks = nc, name, check
        self.js = nc.jetstream()
        self.subject, self.stream = "$KV.HANDPROCS.lock", "KV_HANDPROCS"
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.holding: int | None = None
        self.queue: list[dict[str, Any]] = []  # registered waiters, while we hold it
        self.parked: list[Any] = []  # registrations kept while we may hold it soon
        self.taking = False  # a try or a grant's check is in flight
        self.waiting = False  # waiting for a grant, a hint or a wake
        self.handed_to = ""  # whom we last handed the lock to (a hint)
        self.granted: dict[int, list[dict[str, Any]]] = {}  # revision -> queue behind it
        self.released_at: int | None = None
        self.nonce = ""
        self.turns = 0

    def enqueue(self, msg: Any) -> None:
        entry = json.loads(msg.data)
        if all(e["nonce"] != entry["nonce"] for e in self.queue):
            self.queue.append(entry)

    async def on_register(self, msg: Any) -> None:
        if self.holding is not None:
            self.enqueue(msg)
        elif self.taking or self.waiting:
            self.parked.append(msg)
        elif msg.reply:
            await self.nc.publish(msg.reply, self.handed_to.encode())

    async def settle(self, hint: str) -> None:
        """A try or a wait ended: queue the kept registrations, or answer them."""
        parked, self.parked, self.taking = self.parked, [], False
        for msg in parked:
            if self.holding is not None:
                self.enqueue(msg)
            elif msg.reply:
                await self.nc.publish(msg.reply, hint.encode())

    async def on_grant(self, msg: Any) -> None:
        self.events.put_nowait(("grant", json.loads(msg.data)))

    async def on_hint(self, msg: Any) -> None:
        self.events.put_nowait(("hint", "" if msg.headers else msg.data.decode()))

    async def on_wake(self, msg: Any) -> None:
        self.events.put_nowait(("wake", None))

    async def on_refused(self, msg: Any) -> None:
        """No connection took a grant of ours (it closed): hand on what we wrote for it."""
        revision = int(msg.subject.rsplit(".", 1)[1])
        queue = self.granted.pop(revision, None)
        if queue is not None and msg.headers:
            self.queue = queue
            await self.hand_over(revision)

    async def cas(self, data: bytes, last: int, headers: dict[str, str]) -> int | None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        reply = await self.nc.request(self.subject, data, timeout=10, headers=headers)
        ack = json.loads(reply.data)
        return None if "error" in ack else int(ack["seq"])

    async def read(self) -> tuple[int, dict[str, Any] | None]:
        """(last revision, record or None if free), from the stream leader."""
        import nats.js.errors

        try:
            entry = await self.js.get_msg(self.stream, subject=self.subject, direct=False)
        except nats.js.errors.NotFoundError:
            return 0, None
        if entry.headers and entry.headers.get("KV-Operation"):
            return int(entry.seq), None
        return int(entry.seq), json.loads(entry.data)

    async def check(self, revision: int, nonce: str) -> bool:
        """Whether the key's last message is ``revision`` and names ``nonce`` (a direct
        get: a stale replica can only show a record that was written for us)."""
        msg = await self.nc.request(f"$JS.API.DIRECT.GET.{self.stream}.{self.subject}", b"")
        headers = msg.headers or {}
        if headers.get("Nats-Sequence") != str(revision) or headers.get("KV-Operation"):
            return False
        return bool(json.loads(msg.data).get("nonce") == nonce)

    async def register(self, via: str) -> None:
        entry = {"nonce": self.nonce, "via": self.name, "owner": f"bench/{self.name}", "ttl": TTL}
        await self.nc.publish(f"hq.{via}", json.dumps(entry).encode(), reply=f"hr.{self.name}")

    async def attempt(self) -> str | None:
        """One try: None if we hold the lock now, else the holder's connection (or "")."""
        value = json.dumps({"owner": f"bench/{self.name}", "ttl": TTL, "via": self.name})
        self.taking, via = True, ""
        try:
            last, record = (self.released_at, None) if self.released_at else await self.read()
            self.released_at = None
            if record is not None:
                via = record["via"]
                return str(via)
            revision = await self.cas(value.encode(), last, {"Nats-TTL": str(TTL)})
            if revision is None:
                return ""
            self.holding = revision
            return None
        finally:
            await self.settle(via)

    async def next_event(self) -> tuple[str, Any]:
        self.waiting = True
        try:
            return await asyncio.wait_for(self.events.get(), 0.05)
        except TimeoutError:
            await self.settle("")
            return "timeout", None
        finally:
            self.waiting = False

    async def acquire(self) -> int:
        self.turns += 1
        self.nonce = f"{self.name}.{self.turns}"
        hint: str | None = self.handed_to
        events = [self.events.get_nowait() for _ in range(self.events.qsize())]
        for event in events:
            if event[0] == "grant":  # for an earlier turn of ours: still ours
                self.events.put_nowait(event)
        while True:
            if not hint:
                hint = await self.attempt()
                if hint is None:
                    assert self.holding is not None
                    return self.holding
            if hint:
                await self.register(hint)
            hint = ""
            while True:
                kind, data = await self.next_event()
                if kind != "grant":
                    hint = data or ""
                    break
                if not data["nonce"].startswith(f"{self.name}."):
                    continue
                self.taking = True
                if self.checks and not await self.check(data["rev"], data["nonce"]):
                    await self.settle("")
                    continue
                self.holding = data["rev"]
                seen = {e["nonce"] for e in data["queue"]}
                self.queue = data["queue"] + [e for e in self.queue if e["nonce"] not in seen]
                await self.settle("")
                return int(data["rev"])

    async def release(self) -> None:
        revision, self.holding = self.holding, None
        assert revision is not None
        await self.hand_over(revision)

    async def hand_over(self, revision: int) -> None:
        queue, self.queue = self.queue, []
        if not queue:
            self.handed_to = ""
            released = await self.cas(b"", revision, {"KV-Operation": "PURGE", "Nats-TTL": "60"})
            assert released is not None
            self.released_at = released
            await self.nc.publish("hw.lock", b"")
            return
        head = queue[0]
        self.handed_to = head["via"]
        new = await self.cas(json.dumps(head).encode(), revision, {"Nats-TTL": str(head["ttl"])})
        assert new is not None  # owner-only: fails if it is not ours
        self.granted[new] = queue[1:]
        if len(self.granted) > 64:
            del self.granted[next(iter(self.granted))]
        grant = json.dumps({"rev": new, "nonce": head["nonce"], "queue": queue[1:]}).encode()
        await self.nc.publish(f"hg.{head['via']}", grant, reply=f"hx.{self.name}.{new}")


async def _raw_handover(
    url: str, name: str, stop: Callable[[int], bool], check: bool = True
) -> list[int]:
    """The hand-over design in plain nats-py (``_HandOver``): one compare-and-set per
    hand-off to a registered waiter, which checks its grant with one direct get."""
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().create_key_value(bucket="HANDPROCS", history=1, direct=True)
        me = _HandOver(nc, name, check)
        await nc.subscribe(f"hq.{name}", cb=me.on_register)
        await nc.subscribe(f"hg.{name}", cb=me.on_grant)
        await nc.subscribe(f"hr.{name}", cb=me.on_hint)
        await nc.subscribe(f"hx.{name}.*", cb=me.on_refused)
        _ready()
        tokens: list[int] = []
        while not stop(len(tokens)):
            sub = await nc.subscribe("hw.lock", queue="lock", cb=me.on_wake)
            tokens.append(await me.acquire())
            await sub.unsubscribe()
            await me.release()
        return tokens
    finally:
        await nc.close()


async def _raw_unchecked(url: str, name: str, stop: Callable[[int], bool]) -> list[int]:
    return await _raw_handover(url, name, stop, check=False)


async def _managed(url: str, name: str, stop: Callable[[int], bool]) -> list[int]:
    """A contender of the lock-manager design: core requests to ``_manager``."""
    import nats

    nc = await nats.connect(url)
    try:
        _ready()
        tokens: list[int] = []
        while not stop(len(tokens)):
            reply = await nc.request("mgr.acquire", f"bench/{name}".encode(), timeout=60)
            tokens.append(int(reply.data))
            reply = await nc.request("mgr.release", reply.data, timeout=60)
            assert reply.data == b"ok", reply.data
        return tokens
    finally:
        await nc.close()


class _Manager:
    """The lock-manager design (a sketch of what would reach 1,600 hand-offs/s on NATS).

    One process owns the waiter queue of the lock in memory and serialises every
    operation; a grant is one compare-and-set publish to the KV key (its revision is
    the fencing token, with a per-key TTL), a release to a queued waiter hands the
    lock over in that one write, then both requests are answered. Per hand-off: one
    KV write, two requests and two replies, no watch deliveries. Not in it (a real one
    needs them): fail-over of the manager, expiry of a crashed holder (a watch of the
    key by the manager alone), waiters that give up.
    """

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subject = "$KV.MGRPROCS.lock"
        self.last = 0  # the key's last revision (the holder's, or a release marker's)
        self.holder: int | None = None
        self.queue: collections.deque[tuple[bytes, str]] = collections.deque()

    async def write(self, value: bytes, headers: dict[str, str]) -> int:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(self.last)
        ack = await self.js.publish(self.subject, value, headers=headers)
        self.last = int(ack.seq)
        return self.last

    async def grant(self, owner: bytes, reply: str) -> None:
        value = b'{"owner":"%s","ttl":%d}' % (owner, TTL)
        self.holder = await self.write(value, {"Nats-TTL": str(TTL)})
        await self.nc.publish(reply, str(self.holder).encode())

    async def run(self, requests: asyncio.Queue[Any]) -> None:
        while True:
            msg = await requests.get()
            if msg.subject == "mgr.acquire":
                if self.holder is None:
                    await self.grant(msg.data, msg.reply)
                else:
                    self.queue.append((msg.data, msg.reply))
            elif int(msg.data) != self.holder:  # owner-only release
                await msg.respond(b"lost")
            else:
                self.holder = None
                if self.queue:
                    await self.grant(*self.queue.popleft())  # the hand-over: one write
                else:
                    marker = {"KV-Operation": "PURGE", "Nats-Rollup": "sub", "Nats-TTL": "60"}
                    await self.write(b"", marker)
                await msg.respond(b"ok")


async def _manager(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.create_key_value(bucket="MGRPROCS", history=1, limit_marker_ttl=60)
    manager = _Manager(nc)
    with contextlib.suppress(Exception):  # a previous run's last revision
        manager.last = (await js.get_last_msg("KV_MGRPROCS", manager.subject)).seq
    requests: asyncio.Queue[Any] = asyncio.Queue()
    await nc.subscribe("mgr.*", cb=requests.put)
    task = asyncio.create_task(manager.run(requests))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "stop"
    task.cancel()
    await nc.close()


async def _kv_last(kv: object, key: str) -> object | None:
    """The live entry of ``key``, or None if it is free (deleted, expired, absent)."""
    import nats.js.errors

    try:
        return await kv.get(key)  # type: ignore[attr-defined]
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None


_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('del', KEYS[2])
  redis.call('rpush', KEYS[2], '1')
  return 1
end
return 0
"""


async def _raw_redis(url: str, name: str, stop: Callable[[int], bool]) -> list[int]:
    import redis.asyncio as redis

    client = redis.from_url(url)
    try:
        release = client.register_script(_RELEASE)
        key, wake, fence = "lock", "lock:wake", "lock:fence"
        _ready()
        tokens: list[int] = []
        while not stop(len(tokens)):
            while True:
                token = int(await client.incr(fence))  # fencing token, increasing
                if await client.set(key, str(token), nx=True, px=TTL * 1000):
                    break
                await client.blpop([wake], timeout=0.05)
            tokens.append(token)
            assert await release(keys=[key, wake], args=[str(token)]) == 1
        return tokens
    finally:
        await client.aclose()


_started: list[float] = []  # CPU time of this process at "go"


def _ready() -> None:
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    _started.append(time.process_time())


def child(kind: str, url: str, name: str, total_file: str, quota: int) -> None:
    """Contend until this process did ``quota`` hand-offs; print the result."""

    def stop(done: int) -> bool:
        return done >= quota

    run = {
        "swarmbus": _swarmbus,
        "raw JetStream": _raw_jetstream,
        RAW_WAKES: _raw_wakes,
        RAW_HANDOVER: _raw_handover,
        UNCHECKED: _raw_unchecked,
        "swarmbus on Redis": _swarmbus_on_redis,
        "raw Redis": _raw_redis,
        MANAGED: _managed,
    }
    try:
        import uvloop

        tokens = uvloop.run(run[kind](url, name, stop))
    except ImportError:
        tokens = asyncio.run(run[kind](url, name, stop))
    Path(total_file).write_text(" ".join(map(str, [time.process_time() - _started[0], *tokens])))


# --- driver -----------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(kind: str, url: str, server_pid: int, procs: int, handoffs: int) -> dict[str, float]:
    """Hand-offs/s, owner changes and CPU per hand-off of one run of ``kind``."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        manager = None
        if kind == MANAGED:
            manager = stack.enter_context(
                subprocess.Popen(
                    [sys.executable, __file__, "--manager", url],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            stack.callback(manager.kill)
            assert manager.stdout is not None
            assert manager.stdout.readline().strip() == "ready"
        files = [f"{tmp}/{i}" for i in range(procs)]
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    url,
                    f"c{i}",
                    files[i],
                    str(handoffs // procs),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(procs)
        ]
        try:
            for c in children:
                assert c.stdout is not None
                assert c.stdout.readline().strip() == "ready"
            server_cpu = _cpu_seconds(server_pid)
            manager_cpu = _cpu_seconds(manager.pid) if manager else 0.0
            start = time.perf_counter()
            for c in children:
                assert c.stdin is not None
                c.stdin.write("go\n")
                c.stdin.flush()
            for c in children:
                c.wait(timeout=600)
            elapsed = time.perf_counter() - start
            server_cpu = _cpu_seconds(server_pid) - server_cpu
            manager_cpu = _cpu_seconds(manager.pid) - manager_cpu if manager else 0.0
        finally:
            for c in children:
                if c.poll() is None:
                    c.kill()
        client_cpu = manager_cpu  # the manager is a client process too
        owners: list[tuple[int, int]] = []  # (fencing token, contender), all of them
        for i, f in enumerate(files):
            cpu, *tokens = Path(f).read_text().split()
            client_cpu += float(cpu)
            owners += [(int(t), i) for t in tokens]
        owners.sort()
        done = len(owners)
        assert len({t for t, _ in owners}) == done, "two holders got the same token"
        changes = sum(a[1] != b[1] for a, b in itertools.pairwise(owners))
    return {
        "load": os.getloadavg()[0],
        "rate": done / elapsed,
        "changes": changes / done,
        "client_us": client_cpu / done * 1e6,  # from "go" to the end
        "server_us": server_cpu / done * 1e6,
    }


def _start_redis(tmp: str) -> subprocess.Popen[bytes] | None:
    try:
        import redis  # noqa: F401
    except ImportError:
        return None
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    sock = f"{tmp}/redis.sock"
    proc = subprocess.Popen(
        [exe, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        if os.path.exists(sock):
            return proc
        time.sleep(0.05)
    proc.kill()
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--handoffs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only", help=f"comma-separated designs to run (default: all but {EXTRA_KINDS})"
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--manager", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.manager:
        asyncio.run(_manager(args.manager))
        return 0
    if args.child:
        kind, url, name, total_file, quota = args.child
        child(kind, url, name, total_file, int(quota))
        return 0
    from swarmbus import NatsServer

    results: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS + EXTRA_KINDS}
    with tempfile.TemporaryDirectory() as tmp, NatsServer(tmp) as server:
        redis_proc = _start_redis(tmp)
        nats_kinds = ("swarmbus", RAW_WAKES, RAW_HANDOVER, UNCHECKED, "raw JetStream", MANAGED)
        urls = {k: server.url for k in nats_kinds}
        pids: dict[str, int | None] = {k: server.pid for k in urls}
        if redis_proc is not None:
            urls["raw Redis"] = f"unix://{tmp}/redis.sock"
            pids["raw Redis"] = redis_proc.pid
            urls["swarmbus on Redis"] = f"{server.url} unix://{tmp}/redis.sock"
            pids["swarmbus on Redis"] = redis_proc.pid
        try:
            for r in range(args.repeat):
                only = args.only.split(",") if args.only else KINDS
                kinds = [k for k in KINDS + EXTRA_KINDS if k in urls and k in only]
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    pid = pids[kind]
                    assert pid is not None
                    results[kind].append(
                        one_run(kind, urls[kind], pid, args.processes, args.handoffs)
                    )
        finally:
            if redis_proc is not None:
                redis_proc.kill()
                redis_proc.wait()
    loads = [x["load"] for runs in results.values() for x in runs]
    print(
        f"# {args.processes} processes, {args.handoffs} hand-offs per run, median of "
        f"{args.repeat}, load average {min(loads):.1f}-{max(loads):.1f} during the runs"
    )
    print(
        "| design | hand-offs/s (runs) | vs raw Redis (per repetition) | changed owner "
        "| client CPU us | server CPU us |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    redis_runs = results.get("raw Redis") or []
    for kind, runs in results.items():
        if not runs:
            continue

        def med(field: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(x[field] for x in runs)

        rates = ", ".join(f"{x['rate']:,.0f}" for x in runs)
        ratio = "-"
        if redis_runs and len(redis_runs) == len(runs):
            each = [x["rate"] / r["rate"] for x, r in zip(runs, redis_runs, strict=True)]
            ratio = f"{statistics.median(each):.2f}x ({', '.join(f'{e:.2f}' for e in each)})"
        print(
            f"| {kind} | {med('rate'):,.0f} ({rates}) | {ratio} | {med('changes'):.0%} | "
            f"{med('client_us'):,.0f} | {med('server_us'):,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
