"""``StateStore`` on PostgreSQL (psycopg 3 async): the seed's "PostgreSQL-based coordination".

Tables (``swarmbus/migrations/postgres/*.sql``, plain SQL applied in order by
``migrate``, each once, recorded in ``swarm_migrations``):

* ``swarm_state (bucket, key, value, revision, expires_at)``: every key, the
  authoritative copy. Revisions come from the sequence ``swarm_revision``, so they
  increase across deletes and expiries and serve as fencing tokens.
* ``swarm_changes (revision, bucket, key, op, value, at)``: the change log. A watch
  LISTENs on ``swarm_changes`` (each write NOTIFYs ``"<bucket> <revision>"``) and
  catches up with ``SELECT ... WHERE revision > $last``; the notification only wakes it,
  so a missed notification delays a change, never loses it.
* The seed's ``agent_sessions``, ``agent_findings`` and ``agent_tasks`` with the seed's
  columns (plus ``name``, ``bucket``, ``key``, ``revision``, ``expires_at``), written in
  the same transaction as ``swarm_state`` for the buckets in ``swarm_projections``
  (the blackboard's and the task records'): plain SQL reads a session's findings and
  tasks. Treat them as read-only; the store does not read them back.

Each operation is one statement: a PL/pgSQL function (``swarm_write``,
``swarm_delete``, ``swarm_sweep``) that takes the bucket's transaction-scoped advisory
lock, so a bucket's revisions commit in order: a watch that read revision N has seen
every earlier change of that bucket. Compare-and-set is the revision check in
``swarm_write`` (the row's ``revision = $expected``) under that lock.

TTL: ``expires_at`` (the server's clock); reads ignore expired rows at once, and the
delete event of an expired key comes from ``swarm_sweep`` (run by watches, woken at
the next deadline) or from the next write to that key, each exactly once. Changes
older than ``change_retention`` seconds are dropped by the sweep: a watch further
behind than that misses changes.
"""

from __future__ import annotations

import builtins
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from importlib import resources
from typing import Any, Final, Self

from swarmbus._errors import (
    ConflictError,
    ConnectionError,
    InvalidIdentifierError,
    MessageTooLargeError,
    MissingDependencyError,
    PermissionDeniedError,
    PublishError,
)
from swarmbus._state import Entry
from swarmbus._store_lock import StoredLock

try:
    import psycopg
    import psycopg.errors
    from psycopg_pool import AsyncConnectionPool, PoolTimeout
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingDependencyError("the PostgreSQL state store", "postgres") from exc

__all__ = ["CHANNEL", "PostgresStore", "migrate"]

CHANNEL: Final = "swarm_changes"
DEFAULT_MAX_VALUE_BYTES: Final = 1024 * 1024
DEFAULT_CHANGE_RETENTION: Final = 3600.0
SWEEP_INTERVAL: Final = 1.0
"""Longest wait (seconds) between two sweeps, or two catch-up reads, of a watch."""
MIGRATIONS: Final = "swarmbus.migrations.postgres"
_GET_MANY: Final = (
    "SELECT key, value, revision FROM swarm_state WHERE bucket = %s AND key = ANY(%s)"
    " AND (expires_at IS NULL OR expires_at > clock_timestamp())"
)
_LOCKS: Final = (
    "SELECT key, value, revision, expires_at FROM swarm_state WHERE bucket = %s"
    " AND (%s::text IS NULL OR key = %s)"
    " AND (expires_at IS NULL OR expires_at > clock_timestamp()) ORDER BY key"
)
_MIGRATION_LOCK: Final = 0x5357_4152_4D42  # "SWARMB": one migrator at a time

_GET = (
    "SELECT value, revision FROM swarm_state WHERE bucket = %s AND key = %s"
    " AND (expires_at IS NULL OR expires_at > clock_timestamp())"
)
_LIST = (
    "SELECT key, value, revision FROM swarm_state WHERE bucket = %s AND key >= %s AND key < %s"
    " AND (expires_at IS NULL OR expires_at > clock_timestamp()) ORDER BY revision"
)
_POSITION = "SELECT coalesce(max(revision), 0) FROM swarm_changes WHERE bucket = %s"
_CHANGES = (
    "SELECT key, op, value, revision FROM swarm_changes WHERE bucket = %s AND revision > %s"
    " AND key >= %s AND key < %s ORDER BY revision LIMIT 1000"
)


@contextlib.contextmanager
def postgres_errors(what: str) -> Iterator[None]:
    """Re-raise psycopg's errors as swarmbus errors (``raise ... from``)."""
    try:
        yield
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PermissionDeniedError(f"{what}: {exc}") from exc
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise ConnectionError(f"{what}: {exc}") from exc
    except psycopg.Error as exc:
        raise PublishError(f"{what}: {exc}") from exc


async def migrate(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """Apply the migration files not yet applied, in name order; the names applied."""
    applied: list[str] = []
    files = sorted(
        (f for f in resources.files(MIGRATIONS).iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    await conn.execute("SELECT pg_advisory_lock(%s)", [_MIGRATION_LOCK])
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS swarm_migrations"
            " (name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute("SELECT name FROM swarm_migrations")
        done = {row[0] for row in await cursor.fetchall()}
        for file in files:
            if file.name in done:
                continue
            async with conn.transaction():
                await conn.execute(file.read_text())
                await conn.execute("INSERT INTO swarm_migrations (name) VALUES (%s)", [file.name])
            applied.append(file.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", [_MIGRATION_LOCK])
    return applied


def _key_range(prefix: str) -> tuple[str, str]:
    """``key >= low AND key < high`` bounds (C collation) of a prefix or one exact key."""
    if not prefix:
        return "", "\U0010ffff"
    if prefix.endswith("."):
        return prefix, prefix[:-1] + "/"  # '/' follows '.'
    return prefix, prefix + "\x01"


def _check_key(key: str) -> str:
    if not key or "\x00" in key:
        raise InvalidIdentifierError("state key", key, "must be a non-empty string")
    return key


class PostgresStore:
    """A ``StateStore`` for one bucket on a psycopg connection pool.

    ``PostgresStore.open(url, bucket)`` makes the pool, applies the migrations and
    closes the pool at the end; several stores can share one pool
    (``PostgresStore(pool, bucket)``).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        bucket: str,
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        change_retention: float = DEFAULT_CHANGE_RETENTION,
    ) -> None:
        self.pool = pool
        self.name: str = bucket
        self.max_value_bytes: int = max_value_bytes
        self.change_retention = change_retention
        # Task records are mirrored into the seed's agent_tasks (migrations), whose
        # partial index finds a session's open tasks (``_tasks.store_reads``).
        self.lists_open = True

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, url: str, bucket: str, *, max_size: int = 8, **options: Any
    ) -> AsyncIterator[Self]:
        """A store on a new pool for ``url`` (``postgresql://user@host:port/db``)."""
        pool = await open_pool(url, max_size=max_size)
        try:
            yield cls(pool, bucket, **options)
        finally:
            await pool.close()

    async def get(self, key: str, *, fresh: bool = False) -> Entry | None:
        # one primary: every read is fresh
        with postgres_errors(f"get {key} from {self.name}"):
            async with self.pool.connection() as conn:
                cursor = await conn.execute(_GET, [self.name, _check_key(key)])
                row = await cursor.fetchone()
        if row is None:
            return None
        return Entry(key=key, value=bytes(row[0]), revision=int(row[1]))

    async def create(self, key: str, value: bytes, *, ttl: int | None = None) -> int:
        return await self._write(key, value, ttl, "create", None)

    async def update(self, key: str, value: bytes, *, revision: int, ttl: int | None = None) -> int:
        return await self._write(key, value, ttl, "update", revision)

    async def put(self, key: str, value: bytes) -> int:
        return await self._write(key, value, None, "put", None)

    async def _write(
        self, key: str, value: bytes, ttl: int | None, mode: str, expected: int | None
    ) -> int:
        if len(value) > self.max_value_bytes:
            raise MessageTooLargeError(len(value), self.max_value_bytes)
        ttl_ms = 0 if ttl is None else max(1, int(ttl * 1000))
        with postgres_errors(f"{mode} {key} in {self.name}"):
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT ok, rev FROM swarm_write(%s, %s, %s, %s, %s, %s)",
                    [self.name, _check_key(key), value, ttl_ms, mode, expected],
                )
                row = await cursor.fetchone()
        assert row is not None
        if not row[0]:
            detail = "already exists" if mode == "create" else "changed since it was read"
            raise ConflictError(key, expected or 0, detail)
        return int(row[1])

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        with postgres_errors(f"delete {key} from {self.name}"):
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT ok, rev FROM swarm_delete(%s, %s, %s)",
                    [self.name, _check_key(key), revision],
                )
                row = await cursor.fetchone()
        assert row is not None
        if not row[0]:
            raise ConflictError(key, revision, "changed since it was read")

    async def list(self, prefix: str = "") -> list[Entry]:
        entries, _ = await self._snapshot(prefix)
        return entries

    async def sweep(self) -> float | None:
        """Emit the delete of every key whose TTL ran out; seconds until the next one."""
        with postgres_errors(f"sweep {self.name}"):
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT swarm_sweep(%s, 1000, %s)", [self.name, self.change_retention]
                )
                row = await cursor.fetchone()
        assert row is not None
        return None if row[0] < 0 else row[0] / 1000

    async def _snapshot(self, prefix: str) -> tuple[builtins.list[Entry], int]:
        """The live entries under ``prefix`` and the bucket's change position, atomically."""
        low, high = _key_range(prefix)
        with postgres_errors(f"list {self.name}"):
            async with self.pool.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cursor = await conn.execute(_POSITION, [self.name])
                position = await cursor.fetchone()
                cursor = await conn.execute(_LIST, [self.name, low, high])
                rows = await cursor.fetchall()
        assert position is not None
        entries = [Entry(key=k, value=bytes(v), revision=int(r)) for k, v, r in rows]
        return entries, int(position[0])

    async def changes_after(self, prefix: str, revision: int) -> builtins.list[Entry]:
        """The changes under ``prefix`` after ``revision`` (at most 1,000), in order."""
        low, high = _key_range(prefix)
        with postgres_errors(f"watch {self.name}"):
            async with self.pool.connection() as conn:
                cursor = await conn.execute(_CHANGES, [self.name, revision, low, high])
                rows = await cursor.fetchall()
        return [
            Entry(key=k, value=bytes(v or b"") if op == "put" else None, revision=int(r))
            for k, op, v, r in rows
        ]

    @contextlib.asynccontextmanager
    async def watch(
        self, prefix: str = "", *, initial: bool = True
    ) -> AsyncIterator[AsyncIterator[Entry | None]]:
        with postgres_errors(f"watch {self.name}"):
            conninfo = self.pool.conninfo
            assert isinstance(conninfo, str)
            listener = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        try:
            with postgres_errors(f"watch {self.name}"):
                await listener.execute(f"LISTEN {CHANNEL}")
            entries, position = await self._snapshot(prefix)
            changes = _Changes(self, listener, prefix, position, entries if initial else None)
            yield changes.entries()
        finally:
            await listener.close()

    async def get_many(self, keys: Sequence[str]) -> builtins.list[Entry | None]:
        """The current entry of each of ``keys`` (None: none), in one ``SELECT``."""
        with postgres_errors(f"get {len(keys)} keys from {self.name}"):
            async with self.pool.connection() as conn:
                cursor = await conn.execute(_GET_MANY, [self.name, builtins.list(keys)])
                rows = await cursor.fetchall()
        found = {k: Entry(key=k, value=bytes(v), revision=int(r)) for k, v, r in rows}
        return [found.get(key) for key in keys]

    async def stored_locks(self, key: str | None = None) -> builtins.list[StoredLock]:
        """The lock keys holding a value (only ``key`` if given), with their expiry."""
        with postgres_errors(f"list the locks of {self.name}"):
            async with self.pool.connection() as conn:
                cursor = await conn.execute(_LOCKS, [self.name, key, key])
                rows = await cursor.fetchall()
        return [StoredLock(k, bytes(v), int(r), e) for k, v, r, e in rows if v]


async def open_pool(url: str, *, max_size: int = 8) -> AsyncConnectionPool[Any]:
    """A connection pool for ``url`` with the migrations applied."""
    with postgres_errors(f"connect to {url.rsplit('@', 1)[-1]}"):
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await migrate(conn)
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url, min_size=1, max_size=max_size, kwargs={"autocommit": True}, open=False
        )
        await pool.open(wait=True)
    return pool


class _Changes:
    """A watch's entries: the snapshot, ``None``, then the change log after it.

    Between reads it runs the bucket's sweep when one is due (at the next deadline, at
    least every ``SWEEP_INTERVAL``), so expiries reach the log while anyone watches.
    No background task: a watch is one coroutine, closed in whatever task ends it.
    """

    def __init__(
        self,
        store: PostgresStore,
        listener: psycopg.AsyncConnection[Any],
        prefix: str,
        position: int,
        initial: builtins.list[Entry] | None,
    ) -> None:
        self.store = store
        self.listener = listener
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
            if time.monotonic() >= self.next_sweep:
                wait = await self.store.sweep()
                pause = SWEEP_INTERVAL if wait is None else min(wait, SWEEP_INTERVAL)
                self.next_sweep = time.monotonic() + pause
            batch = await self.store.changes_after(self.prefix, self.position)
            for entry in batch:
                self.position = entry.revision
                yield entry
            if len(batch) < 1000:
                await self._woken()

    async def _woken(self) -> None:
        """Wait for a notification of a newer change of this bucket (or the next sweep)."""
        timeout = max(0.001, self.next_sweep - time.monotonic())
        with postgres_errors(f"watch {self.store.name}"):
            async for note in self.listener.notifies(timeout=timeout):
                bucket, _, revision = note.payload.rpartition(" ")
                if bucket == self.store.name and int(revision) > self.position:
                    return
