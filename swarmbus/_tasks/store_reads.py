"""Reading a session's open task records from a ``StateStore`` (store claims' listings).

On most stores a claimer lists the session's open-task index
(``store_queue.OPEN_BUCKET``: one small key per pending or claimed task), then needs
those tasks' records with their revisions. ``get_many`` reads them in one round trip
where the store has ``get_many`` (``RedisStore``: one pipeline of ``HMGET``;
``PostgresStore``: one ``SELECT ... WHERE key = ANY``) and with one ``get`` after
another on any other store.

PostgreSQL needs no index of its own: the store already mirrors every task record
into the seed's ``agent_tasks`` (same transaction, with its ``status``), and a partial
index on its open rows (migration ``002_open_tasks.sql``) finds them. There
``lists_open`` is true and ``open_records`` is one ``SELECT``; the queue then writes
no index keys (three store writes per task instead of five).

``backlog`` counts every session's claimable unfinished tasks (and finds the oldest)
for the metrics gauges, through the same reads: the open rows on PostgreSQL (one
aggregate ``SELECT``), the open-task index elsewhere; finished tasks are never read.

A store (or a wrapper of one) may bring its own ``get_many(keys)``, ``lists_open``,
``open_records(session, types)`` and ``backlog()``; they are used first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from swarmbus._errors import InvalidMessageError
from swarmbus._state import Entry, StateStore
from swarmbus._tasks.model import TERMINAL, decode_task

__all__ = ["Backlog", "backlog", "get_many", "lists_open", "open_records"]

_PG_OPEN_RECORDS: Final = (
    "SELECT s.key, s.value, s.revision FROM agent_tasks t"
    " JOIN swarm_state s ON s.bucket = t.bucket AND s.key = t.key"
    " WHERE t.session_id = (SELECT id FROM agent_sessions WHERE name = %s)"
    " AND t.status IN ('pending', 'assigned', 'running') AND t.task_type = ANY(%s)"
    " AND t.bucket = %s"
    " AND (s.expires_at IS NULL OR s.expires_at > clock_timestamp()) ORDER BY s.revision"
)
# The open rows drive the join (partial index agent_tasks_open); the record is parsed
# only for a row whose mirror is current (inside the CASE: never for another row).
_PG_BACKLOG: Final = (
    "SELECT count(*), min(t.created_at) FROM agent_tasks t"
    " JOIN swarm_state s ON s.bucket = t.bucket AND s.key = t.key"
    " WHERE t.status IN ('pending', 'assigned', 'running') AND t.bucket = %s"
    " AND (t.expires_at IS NULL OR t.expires_at > clock_timestamp())"
    " AND CASE WHEN s.revision = t.revision THEN"
    " convert_from(s.value, 'UTF8')::jsonb ->> 'approval' IS DISTINCT FROM 'required' END"
)
BACKLOG_BATCH: Final = 1000
"""Records read per ``get_many`` while counting the backlog through the index."""
PG_TYPE_CHARS: Final = 50
"""``agent_tasks.task_type`` is the seed's ``VARCHAR(50)``: longer types are cut there."""


def lists_open(store: StateStore) -> bool:
    """Whether ``store`` finds a session's open task records itself (no index needed)."""
    own = getattr(store, "lists_open", None)
    return own if isinstance(own, bool) else False


async def open_records(store: StateStore, session: str, types: Sequence[str]) -> list[Entry]:
    """The records of ``session``'s unfinished tasks whose type may be one of ``types``
    (a type longer than ``PG_TYPE_CHARS`` may match others: check it), in write order.
    Only on a store where ``lists_open`` is true."""
    own = getattr(store, "open_records", None)
    if own is not None:
        found: list[Entry] = await own(session, types)
        return found
    from swarmbus._postgres_store import postgres_errors

    pg: Any = store
    cut = sorted({t[:PG_TYPE_CHARS] for t in types})
    with postgres_errors(f"list the open tasks of {session} in {pg.name}"):
        async with pg.pool.connection() as conn:
            cursor = await conn.execute(_PG_OPEN_RECORDS, [session, cut, pg.name])
            rows = await cursor.fetchall()
    return [Entry(key=k, value=bytes(v), revision=int(r)) for k, v, r in rows]


async def get_many(store: StateStore, keys: Sequence[str]) -> list[Entry | None]:
    """The current entry of each of ``keys`` (None: it has none), in the same order."""
    if not keys:
        return []
    own = getattr(store, "get_many", None)
    if own is not None:  # RedisStore, PostgresStore: one round trip
        found: list[Entry | None] = await own(keys)
        return found
    return await _gets(store, keys)


async def _gets(store: StateStore, keys: Sequence[str]) -> list[Entry | None]:
    return [await store.get(key, fresh=True) for key in keys]


@dataclass(frozen=True)
class Backlog:
    """The claimable unfinished tasks of every session (pending or claimed; not those
    waiting for approval): how many, and when the oldest of them was created."""

    tasks: int = 0
    oldest: datetime | None = None


async def backlog(records: StateStore, index: StateStore | None) -> Backlog:
    """The ``Backlog`` of the task records ``records``: read from the open rows where
    ``lists_open``, else through the open-task index ``index`` (``store_queue``)."""
    own = getattr(records, "backlog", None)
    if own is not None:
        found: Backlog = await own()
        return found
    if lists_open(records):
        return await _postgres_backlog(records)
    if index is None:
        return Backlog()
    keys = [entry.key for entry in await index.list()]
    tasks, oldest = 0, None
    for start in range(0, len(keys), BACKLOG_BATCH):
        for entry in await get_many(records, keys[start : start + BACKLOG_BATCH]):
            if entry is None or not entry.value:
                continue  # never created, or deleted since
            try:
                task = decode_task(entry.value, what=f"task record {entry.key}")
            except InvalidMessageError:
                continue  # claimers dead-letter it
            if task.status in TERMINAL or task.approval == "required":
                continue  # an index key left by a crash, or not yet claimable
            tasks += 1
            if task.created_at is not None and (oldest is None or task.created_at < oldest):
                oldest = task.created_at
    return Backlog(tasks, oldest)


async def _postgres_backlog(store: Any) -> Backlog:
    from swarmbus._postgres_store import postgres_errors

    with postgres_errors(f"count the open tasks in {store.name}"):
        async with store.pool.connection() as conn:
            cursor = await conn.execute(_PG_BACKLOG, [store.name])
            row = await cursor.fetchone()
    assert row is not None
    count, oldest = row
    # agent_tasks.created_at is a UTC TIMESTAMP (swarm_utc).
    return Backlog(int(count), None if oldest is None else oldest.replace(tzinfo=UTC))
