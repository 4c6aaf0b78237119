"""Evidence queries run once per session: the query ledger.

Agents investigating one incident tend to ask the same questions (the same PromQL, the
same log search). The ledger lets the first agent run a query and every other agent of
the session reuse its result. Each query is one key of a ``StateStore`` (the
``SWARMBUS_QUERIES`` KV bucket by default): a create-once write decides who runs it,
compare-and-set writes renew and finish it, and a watch tells waiters when it changed.
Any store that implements the ``StateStore`` protocol gives the same guarantees.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

import anyio
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._backends import open_store
from swarmbus._bus import Bus
from swarmbus._decode import MAX_STORED_BYTES, decode_json
from swarmbus._errors import (
    ConflictError,
    ConnectionError,
    InvalidMessageError,
    QueryTimeoutError,
    SwarmbusError,
)
from swarmbus._messages import Evidence
from swarmbus._state import StateStore

QUERIES_BUCKET: Final = "SWARMBUS_QUERIES"
QUERIES_MAX_AGE: Final = 7 * 24 * 3600.0
QUERY_LEASE: Final = 10.0

log = logging.getLogger("swarmbus.swarm")


class _QueryRecord(msgspec.Struct, kw_only=True, frozen=True):
    source: str
    query: str
    agent: str
    status: Literal["running", "done", "failed"] = "running"
    result: str = ""
    error: str = ""


_query_encoder = msgspec.json.Encoder()
_query_decoder = msgspec.json.Decoder(_QueryRecord)


@dataclass(frozen=True)
class QueryOutcome:
    """An evidence query's result; ``reused`` when another agent had already run it."""

    evidence: Evidence
    ran_by: str
    reused: bool


def query_key(session: str, source: str, query: str) -> str:
    """KV key of one evidence query: the session and a hash of the normalised query."""
    normalised = f"{source.strip().lower()}\n{' '.join(query.split())}"
    return f"{session}.{hashlib.sha256(normalised.encode()).hexdigest()[:32]}"


class QueryLedger:
    """Evidence queries of one session, each run by exactly one agent.

    ``run`` creates the query's key once (create-once write); the winner executes
    the query and stores its result, everyone else waits for that result and reuses
    it. If the winner fails, the next caller takes the query over (compare-and-set).
    While it runs, the winner renews its record every third of ``lease``; a record not
    renewed for a whole ``lease`` (its agent crashed or lost NATS) is taken over by the
    next waiting caller. Renewals only move the key's revision and waiters time them
    on their own monotonic clocks, so agents' wall clocks never matter.
    With ``store=None`` every call simply executes (no deduplication).
    """

    def __init__(
        self, store: StateStore | None, session: str, agent: str, *, lease: float = QUERY_LEASE
    ) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
        self._kv = store
        self.session = subjects.validate_session_id(session)
        self.agent = subjects.validate_agent_id(agent)
        self.lease = lease

    @classmethod
    async def open(
        cls,
        bus: Bus,
        session: str,
        *,
        agent: str,
        enabled: bool = True,
        lease: float = QUERY_LEASE,
    ) -> QueryLedger:
        """The ledger of ``session`` for ``agent`` (bucket ``SWARMBUS_QUERIES``)."""
        store = (
            await open_store(
                bus, QUERIES_BUCKET, ttl=QUERIES_MAX_AGE, description="swarmbus evidence queries"
            )
            if enabled
            else None
        )
        return cls(store, session, agent, lease=lease)

    async def run(
        self,
        source: str,
        query: str,
        execute: Callable[[], Awaitable[str]],
        *,
        timeout: float = 30.0,
    ) -> QueryOutcome:
        """Run ``execute`` unless an agent of this session ran (or is running) the query.

        Raises:
            QueryTimeoutError: another agent's run did not finish within ``timeout``.
            Whatever ``execute`` raises (the query is then free to be run again).
        """
        if self._kv is None:
            return _outcome(source, query, await execute(), self.agent, reused=False)
        base = _QueryRecord(source=source, query=query, agent=self.agent)
        key = query_key(self.session, source, query)
        try:
            with anyio.fail_after(timeout):
                revision = await self._claim(self._kv, key, _query_encoder.encode(base))
        except TimeoutError:
            raise QueryTimeoutError(source, query, timeout) from None
        except SwarmbusError as exc:
            raise ConnectionError(f"evidence query ledger of {self.session}: {exc}") from exc
        if isinstance(revision, _QueryRecord):
            return _outcome(source, query, revision.result, revision.agent, True)
        # Outside the waiting timeout: the query runs as long as it takes, and what it
        # raises (a TimeoutError too) is the caller's to see as raised.
        run = _Run(self._kv, key, revision, base, lease=self.lease, session=self.session)
        result = await run.execute(execute)
        return _outcome(source, query, result, self.agent, reused=False)

    async def _claim(self, store: StateStore, key: str, running: bytes) -> int | _QueryRecord:
        """The record's revision once this agent runs the query, or the done record."""
        while True:
            try:
                return await store.create(key, running)
            except ConflictError:
                pass
            entry = await store.get(key)
            if entry is None or entry.value is None:
                continue  # aged out between our create and get: create again
            try:
                record = decode_json(_query_decoder, entry.value, max_bytes=MAX_STORED_BYTES)
            except InvalidMessageError as exc:
                log.warning("query ledger: %s is not a query record (%s): taking it over", key, exc)
                record = None
            if record is not None and record.status == "done":
                return record
            # Broken, failed, or running but not renewed for a whole lease: take it over.
            if (
                record is None
                or record.status == "failed"
                or not await _changed(store, key, entry.revision, within=self.lease)
            ):
                try:
                    return await store.update(key, running, revision=entry.revision)
                except ConflictError:
                    continue


class _Run:
    """One agent's run of a query it holds: renews the record, then records the outcome."""

    def __init__(
        self,
        store: StateStore,
        key: str,
        revision: int,
        base: _QueryRecord,
        *,
        lease: float,
        session: str,
    ) -> None:
        self.store = store
        self.key = key
        self.base = base
        self.lease = lease
        self.session = session
        #: The record's revision while this agent holds it; None once taken over.
        self.held: int | None = revision

    async def execute(self, execute: Callable[[], Awaitable[str]]) -> str:
        """Run ``execute`` while renewing the record; its result, recorded as done."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._renew)
                result = await execute()
                tg.cancel_scope.cancel()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                # Shielded: a cancelled run must still free the query for the next caller.
                await self._finish(
                    msgspec.structs.replace(self.base, status="failed", error=repr(exc))
                )
            if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                raise exc.exceptions[0] from None  # execute's own error, as it raised it
            raise
        await self._finish(msgspec.structs.replace(self.base, status="done", result=str(result)))
        return str(result)

    async def _renew(self) -> None:
        data = _query_encoder.encode(self.base)
        while self.held is not None:
            await anyio.sleep(self.lease / 3)
            try:
                # Shielded: a renewal the server applied must update ``held`` even
                # when the query ends meanwhile, or the final write loses its CAS.
                with anyio.CancelScope(shield=True):
                    self.held = await self.store.update(self.key, data, revision=self.held)
            except ConflictError:
                log.warning("query %s was taken over while it ran", self.key)
                self.held = None
            except (TimeoutError, SwarmbusError) as exc:  # try again next time
                log.warning("cannot renew query %s: %s", self.key, exc)

    async def _finish(self, record: _QueryRecord) -> None:
        if self.held is None:
            return  # taken over: the new runner's record stands
        try:
            await self.store.update(self.key, _query_encoder.encode(record), revision=self.held)
        except ConflictError:
            log.warning("query %s was taken over; its result is not recorded", self.key)
        except SwarmbusError as exc:
            raise ConnectionError(f"evidence query ledger of {self.session}: {exc}") from exc


def _outcome(source: str, query: str, result: str, agent: str, reused: bool) -> QueryOutcome:
    return QueryOutcome(
        evidence=Evidence(source=source, query=query, result=result),
        ran_by=agent,
        reused=reused,
    )


async def _changed(store: StateStore, key: str, revision: int, *, within: float) -> bool:
    """Whether ``key`` gets a revision newer than ``revision`` within ``within`` seconds."""
    async with store.watch(key) as entries:
        with anyio.move_on_after(within):
            async for entry in entries:
                if entry is not None and entry.revision > revision:
                    return True
    return False
