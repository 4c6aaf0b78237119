"""``StateStore`` on Redis (redis-py asyncio): the seed's "Redis-based coordination".

Key layout (``key_prefix`` is the seed's ``agent:swarm:``; see docs/backends.md)::

    agent:swarm:{session}:context            board  <session>.context
    agent:swarm:{session}:session            board  <session>.session
    agent:swarm:{session}:findings:{id}      board  <session>.finding.<id>
    agent:swarm:{session}:hypotheses:{id}    board  <session>.hypothesis.<id>
    agent:swarm:{session}:actions:{id}       board  <session>.action.<id>
    agent:swarm:{session}:tasks:{id}         tasks  <session>.<id>
    agent:swarm:locks:{resource key}         locks  <resource key>
    agent:swarm:{bucket}:{a}:{b}...          any other bucket: <a>.<b>...
    agent:swarm:{bucket}/revision            INCR counter: the bucket's revisions
    agent:swarm:{bucket}/changes             stream: every write, delete and expiry
    agent:swarm:{bucket}/keys                sorted set (lex): the live keys, for list/watch
    agent:swarm:{bucket}/expiry              sorted set (ms): keys with a TTL, by deadline

Each key is a hash ``{value, revision}``. Every write is one Lua script: the check
(create-once: the seed's ``SET NX``; compare-and-set: the revision), ``INCR`` of the
bucket's counter (so revisions increase across deletes and expiries and serve as
fencing tokens), the hash, ``PEXPIRE`` for a TTL, and the ``XADD`` to the change
stream, all atomic: a watcher never misses a change. A delete with a revision is the
seed's owner-only release (the owner check compares the revision it wrote).

Expiry: Redis drops an expired key by itself; the delete event comes from a sweep
script that finds due keys in ``/expiry`` and emits their delete once. Watches run
the sweep (at the next deadline, at least once a second), every list runs it, and a
write to an expired key emits that key's delete first. Keyspace notifications were not
used: they are pub/sub (lost while nobody listens) and need ``CONFIG SET``, which
managed Redis often refuses.

The scripts touch keys they compute, so this needs a standalone Redis (or one shard),
not Redis Cluster. The change stream is capped (``stream_max_len``, approximate): a
watcher further behind than that misses changes.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

import anyio

from swarmbus._errors import (
    ConflictError,
    ConnectionError,
    InvalidIdentifierError,
    MessageTooLargeError,
    MissingDependencyError,
    PermissionDeniedError,
    PublishError,
    SwarmbusError,
)
from swarmbus._state import Entry
from swarmbus._store_lock import StoredLock

try:
    import redis.asyncio as aioredis
    import redis.exceptions as rexc
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingDependencyError("the Redis state store", "redis") from exc

__all__ = [
    "BOARD_BUCKET",
    "DEFAULT_KEY_PREFIX",
    "LOCKS_BUCKET",
    "TASKS_BUCKET",
    "RedisLayout",
    "RedisLockKey",
    "RedisStore",
]

SCAN_COUNT: Final = 500
"""Keys per ``SCAN`` call when lock keys are listed."""
DEFAULT_KEY_PREFIX: Final = "agent:swarm:"
DEFAULT_MAX_VALUE_BYTES: Final = 1024 * 1024
DEFAULT_STREAM_MAX_LEN: Final = 10_000
SWEEP_INTERVAL: Final = 1.0
"""Longest wait (seconds) between two sweeps of a watch when no key is due sooner."""

BOARD_BUCKET: Final = "SWARMBUS_BOARD"
TASKS_BUCKET: Final = "swarmbus-tasks"
LOCKS_BUCKET: Final = "SWARMBUS_LOCKS"
BOARD_KINDS: Final = {"finding": "findings", "hypothesis": "hypotheses", "action": "actions"}

_KEY_RE: Final = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")
_SEP: Final = b"\0"
_NAMES_CACHED: Final = 4096

# Shared by the scripts. BASE is the bucket's base (``agent:swarm:<bucket>/``) and MAXLEN
# the change stream's cap, both written into the script text per store so a call carries
# few arguments; the bookkeeping keys are built from BASE. Index and expiry members are
# "<store key>\0<redis key>": a lex range on a store-key prefix finds them, and the
# scripts know the Redis key.
_LUA_COMMON = """
local base = BASE
local counter, changes = base .. 'revision', base .. 'changes'
local index, expiry = base .. 'keys', base .. 'expiry'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function emit(key, rev, op, value)
  if value then
    redis.call('XADD', changes, 'MAXLEN', '~', MAXLEN, '*',
      'key', key, 'revision', rev, 'op', op, 'value', value)
  else
    redis.call('XADD', changes, 'MAXLEN', '~', MAXLEN, '*', 'key', key, 'revision', rev, 'op', op)
  end
end
local function reap(member)
  local sep = string.find(member, '\\0', 1, true)
  if redis.call('EXISTS', string.sub(member, sep + 1)) == 1 then return 0 end
  redis.call('ZREM', expiry, member)
  redis.call('ZREM', index, member)
  emit(string.sub(member, 1, sep - 1), redis.call('INCR', counter), 'expire', nil)
  return 1
end
local function sweep(limit)
  local now = now_ms()
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, limit)) do
    reap(m)
  end
  local nxt = redis.call('ZRANGE', expiry, 0, 0, 'WITHSCORES')
  if nxt[2] then return math.max(0, tonumber(nxt[2]) - now) end
  return -1
end
"""

# KEYS: the data key. ARGV: store key, value, "<mode> <expected revision> <ttl ms or 0>".
# Returns the new revision, or 0 minus the current one (0: none) when the check fails.
_WRITE = (
    _LUA_COMMON
    + """
local key = ARGV[1]
local member = key .. '\\0' .. KEYS[1]
local mode, expected, ttl = string.match(ARGV[3], '(%a+) (%d+) (%d+)')
local current = redis.call('HGET', KEYS[1], 'revision')
-- a live key is not expired; a missing one may have expired unswept: emit that first
if not current and redis.call('ZSCORE', expiry, member) then reap(member) end
if (mode == 'create' and current) or (mode == 'update' and current ~= expected) then
  return -tonumber(current or '0')
end
local rev = redis.call('INCR', counter)
redis.call('HSET', KEYS[1], 'value', ARGV[2], 'revision', rev)
ttl = tonumber(ttl)
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZADD', expiry, now_ms() + ttl, member)
elseif current then
  redis.call('PERSIST', KEYS[1])
  redis.call('ZREM', expiry, member)
end
redis.call('ZADD', index, 0, member)
emit(key, rev, 'put', ARGV[2])
return rev
"""
)

# KEYS: the data key. ARGV: store key, expected revision ('' = any).
# Returns the delete's revision (0: there was nothing to delete), -1 if the check fails.
_DELETE = (
    _LUA_COMMON
    + """
local key = ARGV[1]
local member = key .. '\\0' .. KEYS[1]
local current = redis.call('HGET', KEYS[1], 'revision')
if not current and redis.call('ZSCORE', expiry, member) then reap(member) end
if ARGV[2] ~= '' and current ~= ARGV[2] then return -1 end
if not current then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', index, member)
redis.call('ZREM', expiry, member)
local rev = redis.call('INCR', counter)
emit(key, rev, 'del', nil)
return rev
"""
)

# ARGV: lex min, lex max. Returns {stream position, {key, value, revision, ...}}.
_SNAPSHOT = (
    _LUA_COMMON
    + """
sweep(1000)
local out = {}
for _, m in ipairs(redis.call('ZRANGEBYLEX', index, ARGV[1], ARGV[2])) do
  local sep = string.find(m, '\\0', 1, true)
  local vr = redis.call('HMGET', string.sub(m, sep + 1), 'value', 'revision')
  if vr[2] then
    out[#out + 1] = string.sub(m, 1, sep - 1)
    out[#out + 1] = vr[1]
    out[#out + 1] = vr[2]
  end
end
local last = redis.call('XREVRANGE', changes, '+', '-', 'COUNT', 1)
local pos = '0-0'
if last[1] then pos = last[1][1] end
return {pos, out}
"""
)

# Returns the milliseconds until the next deadline (-1: none).
_SWEEP = _LUA_COMMON + "\nreturn sweep(1000)\n"


class _Script:
    """One Lua script, called by SHA (loaded again if the server forgot it)."""

    def __init__(self, client: aioredis.Redis, text: str, base: str, stream_max_len: int) -> None:
        self.client = client
        self.text = text.replace("MAXLEN, '*'", f"'{int(stream_max_len)}', '*'").replace(
            "local base = BASE", f"local base = '{base}'"
        )
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()

    async def __call__(self, *keys_and_args: bytes | str | int, keys: int = 0) -> Any:
        try:
            return await self.client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self.sha, keys, *keys_and_args
            )
        except rexc.NoScriptError:
            await self.client.script_load(self.text)
            return await self.client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self.sha, keys, *keys_and_args
            )


class RedisLayout:
    """Where a store key of a bucket lives in Redis (the seed's layout; module docstring)."""

    def __init__(self, bucket: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self.bucket = bucket
        self.prefix = key_prefix
        self.base = base = f"{key_prefix}{bucket}/"
        if any(c in base for c in "'\\\n\r") or not bucket:
            raise InvalidIdentifierError("bucket", base, "no quote, backslash or line break")
        self.counter = base + "revision"
        self.changes = base + "changes"
        self.keys = base + "keys"
        self.expiry = base + "expiry"
        self._names: dict[str, str] = {}

    def redis_key(self, key: str) -> str:
        """The Redis key of store key ``key`` (injective: tokens never contain ``:``)."""
        if not _KEY_RE.match(key):
            raise InvalidIdentifierError("state key", key, "use tokens of [-/_=A-Za-z0-9] and '.'")
        tokens = key.split(".")
        if self.bucket == BOARD_BUCKET and len(tokens) >= 2:
            if tokens[1] in BOARD_KINDS.values():
                raise InvalidIdentifierError("board key", key, "kind tokens are singular")
            tokens[1] = BOARD_KINDS.get(tokens[1], tokens[1])
        elif self.bucket == TASKS_BUCKET and len(tokens) >= 2:
            tokens.insert(1, "tasks")
        elif self.bucket == LOCKS_BUCKET:
            tokens.insert(0, "locks")
        else:
            tokens.insert(0, self.bucket)
        return self.prefix + ":".join(tokens)

    def cached(self, key: str) -> str:
        """``redis_key(key)``, remembered for the hot keys (locks, compare-and-set)."""
        redis_key = self._names.get(key)
        if redis_key is None:
            if len(self._names) >= _NAMES_CACHED:
                self._names.clear()
            redis_key = self._names[key] = self.redis_key(key)
        return redis_key


def _lex_range(prefix: str) -> tuple[bytes, bytes]:
    """ZRANGEBYLEX bounds of the members whose store key has ``prefix`` (or is it)."""
    if not prefix:
        return b"-", b"+"
    if prefix.endswith("."):
        return b"[" + prefix.encode(), b"(" + prefix[:-1].encode() + b"/"  # '/' follows '.'
    return b"[" + prefix.encode() + _SEP, b"(" + prefix.encode() + b"\x01"


def _matches(prefix: str, key: str) -> bool:
    return not prefix or key == prefix or (prefix.endswith(".") and key.startswith(prefix))


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Re-raise redis-py's errors as swarmbus errors (``raise ... from``)."""
    try:
        yield
    except rexc.RedisError as exc:
        raise _translated(what, exc) from exc


def _translated(what: str, exc: rexc.RedisError) -> SwarmbusError:
    """The swarmbus error for a redis-py error."""
    if isinstance(exc, (rexc.NoPermissionError, rexc.AuthenticationError)):
        return PermissionDeniedError(f"{what}: {exc}")
    if isinstance(exc, rexc.AuthorizationError):
        return PermissionDeniedError(f"{what}: {exc}")
    if isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError)):
        return ConnectionError(f"{what}: {exc}")
    if isinstance(exc, rexc.ResponseError):
        if str(exc).startswith("NOPERM"):
            return PermissionDeniedError(f"{what}: {exc}")
        return PublishError(f"{what}: {exc}")
    return PublishError(f"{what}: {exc}")


class RedisStore:
    """A ``StateStore`` for one bucket, on a ``redis.asyncio.Redis`` client.

    The client is the caller's (``RedisStore.from_url`` makes one and ``aclose``
    closes it). ``key_prefix``: the seed's ``agent:swarm:``.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        bucket: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        stream_max_len: int = DEFAULT_STREAM_MAX_LEN,
    ) -> None:
        self.client = client
        self.name: str = bucket
        self.max_value_bytes: int = max_value_bytes
        self.layout = RedisLayout(bucket, key_prefix)
        base = self.layout.base
        self._write = _Script(client, _WRITE, base, stream_max_len)
        self._delete = _Script(client, _DELETE, base, stream_max_len)
        self._snapshot = _Script(client, _SNAPSHOT, base, stream_max_len)
        self._sweep = _Script(client, _SWEEP, base, stream_max_len)
        self._locks: RedisLocks | None = None

    @classmethod
    def from_url(cls, url: str, bucket: str, **options: Any) -> RedisStore:
        """A store on a new client for ``url`` (``redis://host:port/db``)."""
        return cls(aioredis.Redis.from_url(url), bucket, **options)

    async def aclose(self) -> None:
        """Close the client (and its connections)."""
        await self.client.aclose()

    def lock_key(self, key: str) -> RedisLockKey:
        """The lock ``key`` of this bucket, on the lock scripts (what ``Lock`` uses)."""
        if self._locks is None:
            self._locks = RedisLocks(self.client, self.layout)
        return RedisLockKey(self._locks, key)

    async def get(self, key: str, *, fresh: bool = False) -> Entry | None:
        # one primary: every read is fresh
        with redis_errors(f"get {key} from {self.name}"):
            value, revision = cast(
                builtins.list[bytes | None],
                await self.client.hmget(self.layout.cached(key), ["value", "revision"]),
            )
        if revision is None:
            return None
        return Entry(key=key, value=value or b"", revision=int(revision))

    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        return await self._put(key, value, ttl, "create", 0)

    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        return await self._put(key, value, ttl, "update", revision)

    async def put(self, key: str, value: bytes) -> int:
        return await self._put(key, value, None, "put", 0)

    async def _put(self, key: str, value: bytes, ttl: int | None, mode: str, expected: int) -> int:
        if len(value) > self.max_value_bytes:
            raise MessageTooLargeError(len(value), self.max_value_bytes)
        ttl_ms = 0 if ttl is None else max(1, int(ttl * 1000))
        check = f"{mode} {expected} {ttl_ms}"
        with redis_errors(f"{mode} {key} in {self.name}"):
            revision = int(await self._write(self.layout.cached(key), key, value, check, keys=1))
        if revision <= 0:
            detail = "already exists" if mode == "create" else "changed since it was read"
            raise ConflictError(key, expected, detail)
        return revision

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        expected = "" if revision is None else revision
        with redis_errors(f"delete {key} from {self.name}"):
            done = int(await self._delete(self.layout.cached(key), key, expected, keys=1))
        if done < 0:
            raise ConflictError(key, revision, "changed since it was read")

    async def list(self, prefix: str = "") -> list[Entry]:
        entries, _ = await self._snapshot_of(prefix)
        return entries

    async def sweep(self) -> float | None:
        """Emit the delete of every key whose TTL ran out; seconds until the next one."""
        with redis_errors(f"sweep {self.name}"):
            wait = int(await self._sweep())
        return None if wait < 0 else wait / 1000

    async def _snapshot_of(self, prefix: str) -> tuple[builtins.list[Entry], bytes]:
        low, high = _lex_range(prefix)
        with redis_errors(f"list {self.name}"):
            position, flat = await self._snapshot(low, high)
        entries = [
            Entry(key=flat[i].decode(), value=flat[i + 1] or b"", revision=int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]
        entries.sort(key=lambda e: e.revision)
        return entries, position

    @contextlib.asynccontextmanager
    async def watch(
        self, prefix: str = "", *, initial: bool = True
    ) -> AsyncIterator[AsyncIterator[Entry | None]]:
        entries, position = await self._snapshot_of(prefix)
        yield _Changes(self, prefix, position, entries if initial else None).entries()

    async def get_many(self, keys: Sequence[str]) -> builtins.list[Entry | None]:
        """The current entry of each of ``keys`` (None: none), in one pipeline."""
        layout = self.layout
        with redis_errors(f"get {len(keys)} keys from {self.name}"):
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(layout.cached(key), ["value", "revision"])
                rows = cast(builtins.list[builtins.list[bytes | None]], await pipe.execute())
        return [
            None if revision is None else Entry(key=key, value=value or b"", revision=int(revision))
            for key, (value, revision) in zip(keys, rows, strict=True)
        ]

    async def stored_locks(self, key: str | None = None) -> builtins.list[StoredLock]:
        """The lock keys holding a value (only ``key`` if given), with their expiry."""
        layout = self.layout
        base = layout.redis_key("x")[:-1]  # the Redis key of store key "a.b" is base + "a:b"
        with redis_errors(f"list the locks of {self.name}"):
            if key is not None:
                names = [layout.redis_key(key)]
            else:
                names = [
                    name.decode() if isinstance(name, bytes) else name
                    async for name in self.client.scan_iter(match=f"{base}*", count=SCAN_COUNT)
                ]
            async with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hmget(name, ["value", "revision"])
                    pipe.pttl(name)
                replies = await pipe.execute()
        now = datetime.now(UTC)
        found = []
        for i, name in enumerate(names):
            (value, revision), pttl = replies[2 * i], replies[2 * i + 1]
            if revision is None or not value:
                continue
            expires = now + timedelta(milliseconds=pttl) if pttl >= 0 else None
            store_key = name[len(base) :].replace(":", ".")
            found.append(StoredLock(store_key, value, int(revision), expires))
        return sorted(found, key=lambda s: s.key)


class _Changes:
    """A watch's entries: the snapshot, ``None``, then the change stream after it.

    Between reads it runs the bucket's sweep when one is due (at the next deadline, at
    least every ``SWEEP_INTERVAL``), so expiries reach the stream while anyone watches.
    No background task: a watch is one coroutine, closed in whatever task ends it.
    """

    def __init__(
        self,
        store: RedisStore,
        prefix: str,
        position: bytes,
        initial: builtins.list[Entry] | None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.position = position
        self.initial = initial
        self.next_sweep = 0.0

    async def entries(self) -> AsyncIterator[Entry | None]:
        if self.initial is not None:
            for entry in self.initial:
                yield entry
            yield None
        while True:
            for entry in await self._read():
                yield entry

    async def _read(self) -> builtins.list[Entry]:
        """The next changes under the prefix (empty when the wait ran out)."""
        if time.monotonic() >= self.next_sweep:
            wait = await self.store.sweep()
            pause = SWEEP_INTERVAL if wait is None else min(wait, SWEEP_INTERVAL)
            self.next_sweep = time.monotonic() + pause
        block = max(1, int((self.next_sweep - time.monotonic()) * 1000))
        with redis_errors(f"watch {self.store.name}"):
            batches = cast(
                builtins.list[tuple[bytes, builtins.list[tuple[bytes, dict[bytes, bytes]]]]],
                await self.store.client.xread(
                    {self.store.layout.changes: self.position}, block=block, count=512
                ),
            )
        found = []
        for _, items in batches:
            for item_id, fields in items:
                self.position = item_id
                key = fields[b"key"].decode()
                if _matches(self.prefix, key):
                    value = fields.get(b"value") if fields[b"op"] == b"put" else None
                    found.append(Entry(key=key, value=value, revision=int(fields[b"revision"])))
        return found


# --- locks ------------------------------------------------------------------------------
#
# ``Lock`` on Redis does not go through ``_WRITE``/``_DELETE``: a lock is the seed's
# create-once key with a TTL plus a fencing token, and its waiters queue instead of
# watching. These scripts keep the hash layout (``get`` still reads a lock) and the
# bucket's revision counter (the fencing token), but skip the index, the expiry set and
# the change stream: nothing lists or watches lock keys, waiters are woken by the
# queue. The hash's ``waiter`` field is the id of the ``RedisLockKey`` it was written
# for; the queue (KEYS[2]) lists waiting ids in arrival order; WAITERS.<id> is a
# waiter's record ("<ttl ms>\n<value>", on a short TTL while it waits); WAKES.<id> the
# list it blocks on (BLPOP) for the revision handed to it.

# KEYS: lock, queue. ARGV: value, ttl ms, the acquirer's id[, "queue"]. With "queue" a
# waiter that finds the lock held joins the queue (or refreshes its entry). Returns the
# new revision (also when the lock was handed to this id already), or minus the
# holder's remaining ms (at least 1).
_LOCK_ACQUIRE = """
local held = redis.call('HGET', KEYS[1], 'revision')
if not held then
  local rev = redis.call('INCR', COUNTER)
  redis.call('HSET', KEYS[1], 'value', ARGV[1], 'revision', rev, 'waiter', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if ARGV[4] then
    redis.call('LREM', KEYS[2], 0, ARGV[3])
    redis.call('DEL', WAITERS .. ARGV[3], WAKES .. ARGV[3])
  end
  return rev
end
if redis.call('HGET', KEYS[1], 'waiter') == ARGV[3] then return tonumber(held) end
if ARGV[4] then
  local record = ARGV[2] .. '\\n' .. ARGV[1]
  if not redis.call('SET', WAITERS .. ARGV[3], record, 'PX', LIVENESS, 'XX') then
    redis.call('SET', WAITERS .. ARGV[3], record, 'PX', LIVENESS)
    redis.call('RPUSH', KEYS[2], ARGV[3])
  end
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then pttl = LIVENESS end  -- no TTL (not written by a lock): poll
return -math.max(1, pttl)
"""

# KEYS: lock, queue. ARGV: revision. 0: not held at that revision; 1: freed; 2: handed
# to the first live waiter (written for it, its wake list told the revision).
_LOCK_RELEASE = """
if redis.call('HGET', KEYS[1], 'revision') ~= ARGV[1] then return 0 end
while true do
  local id = redis.call('LPOP', KEYS[2])
  if not id then break end
  local record = redis.call('GET', WAITERS .. id)
  if record then
    local nl = string.find(record, '\\n', 1, true)
    local rev = redis.call('INCR', COUNTER)
    redis.call('HSET', KEYS[1], 'value', string.sub(record, nl + 1), 'revision', rev, 'waiter', id)
    redis.call('PEXPIRE', KEYS[1], string.sub(record, 1, nl - 1))
    redis.call('DEL', WAITERS .. id)
    redis.call('RPUSH', WAKES .. id, rev)
    redis.call('PEXPIRE', WAKES .. id, LIVENESS)
    return 2
  end
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: lock. ARGV: value, ttl ms, revision. The new revision, 0 if not held at it.
_LOCK_REFRESH = """
if redis.call('HGET', KEYS[1], 'revision') ~= ARGV[3] then return 0 end
local rev = redis.call('INCR', COUNTER)
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'revision', rev)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return rev
"""

# KEYS: lock, queue. ARGV: the acquirer's id. Leaves the queue; the revision of a lock
# written for this id (handed over, or acquired as its caller gave up), else 0.
_LOCK_LEAVE = """
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('DEL', WAITERS .. ARGV[1], WAKES .. ARGV[1])
if redis.call('HGET', KEYS[1], 'waiter') == ARGV[1] then
  return tonumber(redis.call('HGET', KEYS[1], 'revision'))
end
return 0
"""

LOCK_LIVENESS_MS: Final = 5000
"""How long a waiter's queue entry outlives its last try (a dead waiter is skipped)."""
LOCK_POLL: Final = 2.0
"""Longest wait (seconds) between two tries of a queued waiter: refreshes its entry."""


class RedisLocks:
    """The lock scripts of one bucket (``RedisStore.lock_key``)."""

    def __init__(self, client: aioredis.Redis, layout: RedisLayout) -> None:
        base = layout.base
        self.client = client
        self.layout = layout
        self.wake_prefix = f"{base}wake:"
        self.queue_prefix = f"{base}queue:"
        acquire, release, refresh, leave = _lock_scripts(base)
        self.acquire = _Script(client, acquire, base, 0)
        self.release = _Script(client, release, base, 0)
        self.refresh = _Script(client, refresh, base, 0)
        self.leave = _Script(client, leave, base, 0)


@functools.lru_cache(maxsize=64)
def _lock_scripts(base: str) -> tuple[str, str, str, str]:
    """The lock scripts' texts for bucket base ``base`` (names written in as literals)."""
    names = {
        "COUNTER": f"'{base}revision'",
        "WAITERS": f"'{base}waiter:'",
        "WAKES": f"'{base}wake:'",
        "LIVENESS": str(LOCK_LIVENESS_MS),
    }
    texts = []
    for text in (_LOCK_ACQUIRE, _LOCK_RELEASE, _LOCK_REFRESH, _LOCK_LEAVE):
        for name, literal in names.items():
            text = re.sub(rf"\b{name}\b", literal, text)
        texts.append(text)
    return texts[0], texts[1], texts[2], texts[3]


class RedisLockKey:
    """One lock key on Redis for one ``Lock``: ``StoreLockKey``'s methods, one script each.

    Acquire is one ``EVALSHA`` (the seed's ``SET NX PX`` with a fencing token from the
    bucket's counter), release one (owner-only: the holder's revision). A waiter queues
    (FIFO) and blocks on its own wake list; a release hands the lock to the first live
    waiter in the same script (the waiter's token is the hand-over's revision) and wakes
    that waiter alone: no herd, and no barging past the queue. A waiter tries again at
    the holder's expiry and at least every ``LOCK_POLL`` seconds, which keeps its queue
    entry alive: a dead waiter drops out within ``LOCK_LIVENESS_MS`` (a lock handed to a
    waiter that died just then is held until its TTL).

    Every lock written for this object carries its id, so a caller that gives up (or is
    cancelled) while its acquire is in flight gives back whatever was written for it
    (``_leave``) instead of shielding the call.
    """

    def __init__(self, locks: RedisLocks, key: str) -> None:
        self.locks = locks
        self.key = key
        self.id = os.urandom(12).hex()
        self.name = f"lock {key} in {locks.layout.bucket}"
        self.keys = (locks.layout.cached(key), locks.queue_prefix + key)
        self._wake = locks.wake_prefix + self.id

    async def try_create(self, value: bytes, ttl: int) -> int | None:
        """The new lock's revision, or None if the key is held."""
        lock, queue = self.keys
        script = self.locks.acquire
        try:
            try:  # the script by SHA, without a wrapper's call: this is the hot path
                revision = int(
                    await script.client.execute_command(  # type: ignore[no-untyped-call]
                        "EVALSHA", script.sha, 2, lock, queue, value, ttl * 1000, self.id
                    )
                )
            except rexc.NoScriptError:
                revision = int(await script(lock, queue, value, ttl * 1000, self.id, keys=2))
        except rexc.RedisError as exc:
            await self._give_back()
            raise _translated(f"acquire {self.name}", exc) from exc
        except BaseException:
            await self._give_back()
            raise
        return revision if revision > 0 else None

    async def wait_create(self, value: bytes, ttl: int) -> int:
        """Acquire, queueing behind earlier waiters (bound it with a timeout)."""
        acquire, client = self.locks.acquire, self.locks.client
        try:
            while True:
                revision = int(await acquire(*self.keys, value, ttl * 1000, self.id, "q", keys=2))
                if revision > 0:
                    return revision
                woken = await client.blpop([self._wake], timeout=min(LOCK_POLL, -revision / 1000))
                if woken is not None:
                    return int(woken[1])
        except rexc.RedisError as exc:
            await self._give_back()
            raise _translated(f"wait for {self.name}", exc) from exc
        except BaseException:
            await self._give_back()
            raise

    async def refresh(self, value: bytes, revision: int, ttl: int) -> int | None:
        """Re-arm the TTL; the new revision, or None if the lock was lost."""
        with redis_errors(f"refresh {self.name}"):
            new = int(await self.locks.refresh(self.keys[0], value, ttl * 1000, revision, keys=1))
        return new or None

    async def release(self, revision: int) -> bool:
        """Release (or hand to the next waiter) if still at ``revision``; False if lost."""
        lock, queue = self.keys
        script = self.locks.release
        try:
            try:
                done = int(
                    await script.client.execute_command(  # type: ignore[no-untyped-call]
                        "EVALSHA", script.sha, 2, lock, queue, revision
                    )
                )
            except rexc.NoScriptError:
                done = int(await script(lock, queue, revision, keys=2))
        except rexc.RedisError as exc:
            raise _translated(f"release {self.name}", exc) from exc
        return done > 0

    async def _give_back(self) -> None:
        """Leave the queue and release a lock written for this id (the caller gave up)."""
        with anyio.CancelScope(shield=True), contextlib.suppress(rexc.RedisError):
            handed = int(await self.locks.leave(*self.keys, self.id, keys=2))
            if handed:
                await self.locks.release(*self.keys, handed, keys=2)
        # on a Redis error the queue entry drops out by itself, a written lock by its TTL
