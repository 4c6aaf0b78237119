"""``ConsensusService``: a process that settles every proposal (for large swarms)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.abc

from swarmbus import _subjects as subjects
from swarmbus._blackboard import DEFAULT_BUCKET, DEFAULT_MAX_VALUE_BYTES
from swarmbus._bus import Bus
from swarmbus._consensus.book import ProposalBook
from swarmbus._consensus.client import DEFAULT_RETENTION, SERVICE_AGENT, open_store
from swarmbus._consensus.decider import REPUBLISH_AFTER, Deadlines, Decider
from swarmbus._consensus.record import (
    CONSENSUS_BUCKET,
    PROPOSAL_PREFIX,
    ProposalRecord,
    decision_of,
    decode_record,
)
from swarmbus._errors import InvalidTTLError, NotFoundError, SwarmbusError
from swarmbus._messages import Message, ProposalMessage, VoteMessage, now
from swarmbus._state import Entry

__all__ = ["MAX_RETENTION", "MIN_RETENTION", "ConsensusService"]

log = logging.getLogger("swarmbus.consensus")

#: Well past any redelivery of a proposal's events (a record re-created after expiry
#: would be decided again); the server's expiry overflows at ~240 years.
MIN_RETENTION: Final = 3600.0
MAX_RETENTION: Final = 10 * 365 * 24 * 3600.0


class ConsensusService:
    """Decides proposals: tallies on every recorded vote, closes them at their deadline.

    Use ``async with ConsensusService(bus): ...``; run several replicas for HA (each
    proposal is still decided once, and only the replica that decided it publishes).
    Clients and MCP servers settle the proposals they touch on their own; the service
    is the way for large swarms and for wire-only clients. It watches the proposal
    records (the watch's initial snapshot recovers open proposals and their timers
    after a restart), and ingests ``proposal`` / ``vote`` events published by
    wire-only clients through a durable consumer shared by the replicas; an illegal
    one is answered with an ``agent.error.occurred`` event and changes nothing.

    Args:
        bus: a connected bus.
        bucket: the consensus bucket (tests use their own).
        session: decide proposals of, and ingest events of, this session only (``*``:
            all sessions). A service scoped to one session (the demo's) never settles
            another session's proposals, which belong to their own trace and deciders.
        agent: the agent id decisions are published as.
        ingest: consume proposal/vote events (off: only KV-recorded proposals).
        republish_after: seconds before a replica publishes a decision that another
            participant recorded but has not marked published (it may have died; 10 s).
        board_bucket: the blackboard bucket decisions are recorded in (None: don't).
        retention: seconds a decided (and published) proposal's record is kept before
            the server deletes it (None: forever; 1 hour to 10 years); its events stay
            in the event stream, and its id can be proposed again after it.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        bucket: str = CONSENSUS_BUCKET,
        session: str = "*",
        agent: str = SERVICE_AGENT,
        ingest: bool = True,
        republish_after: float = REPUBLISH_AFTER,
        max_concurrency: int = 64,
        board_bucket: str | None = DEFAULT_BUCKET,
        retention: float | None = DEFAULT_RETENTION,
    ) -> None:
        if session != "*":
            subjects.validate_session_id(session)
        if retention is not None and not MIN_RETENTION <= retention <= MAX_RETENTION:
            raise InvalidTTLError(retention)
        self.retention = None if retention is None else math.ceil(retention)
        self.bus = bus
        self.bucket = bucket
        self.session = session
        self.agent = subjects.validate_agent_id(agent)
        self.ingest = ingest
        self.republish_after = republish_after
        self.max_concurrency = max_concurrency
        self.board_bucket = board_bucket
        self._decider: Decider | None = None
        self._deadlines: Deadlines | None = None
        # Envelope ids of proposals/votes already in a record (seen by the watch), so
        # ingesting a Python client's own event costs no KV read.
        self._recorded: dict[str, set[str]] = {}
        self._recorded_ids: set[str] = set()
        self._stop = anyio.Event()
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def decided(self) -> int:
        """Decisions this replica committed (won the CAS for)."""
        return 0 if self._decider is None else self._decider.decided

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self._running())
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        await stack.__aexit__(exc_type, exc, tb)

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        board_limit = None if self.board_bucket is None else DEFAULT_MAX_VALUE_BYTES
        book = ProposalBook(await open_store(self.bus, self.bucket), board_limit=board_limit)
        self._decider = Decider(
            self.bus,
            book,
            agent=self.agent,
            board_bucket=self.board_bucket,
            retention=self.retention,
            republish_after=self.republish_after,
        )
        self._deadlines = Deadlines(
            self._decider.settle,
            retry_after=self.republish_after,
            max_concurrency=self.max_concurrency,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._deadlines.run)
            await tg.start(self._watch, book)
            if self.ingest:
                durable = f"consensus-{subjects.safe_token(self.bucket + '.' + self.session)}"
                await tg.start(self._consume, durable)
            try:
                yield
            finally:
                self._stop.set()
                tg.cancel_scope.cancel()

    # --- triggers ---------------------------------------------------------------------

    async def _watch(self, book: ProposalBook, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with book.store.watch(PROPOSAL_PREFIX) as entries:
            async for entry in entries:
                if entry is None:  # end of the initial snapshot (open proposals recovered)
                    task_status.started()
                elif entry.value:
                    self._on_entry(entry)

    def _on_entry(self, entry: Entry) -> None:
        assert self._deadlines is not None
        assert entry.value is not None
        try:
            record = decode_record(entry.key, entry.value)
        except SwarmbusError as exc:  # bad input must not stop the service
            log.warning("consensus: skipping %s", exc)
            self._deadlines.forget(entry.key)
            return
        if self.session != "*" and record.session != self.session:
            return  # another session's proposal: its own deciders settle it
        self._remember(entry.key, record)
        if record.decision is None:
            at = now()
            if decision_of(record, closed=at >= record.deadline, at=at) is not None:
                self._deadlines.settle_now(entry.key, record, entry.revision)
            else:
                self._deadlines.schedule(entry.key, record.deadline.timestamp())
        elif not record.published or record.effects_pending:
            since = record.publish_claimed_at or record.decision.decided_at or record.created_at
            self._deadlines.schedule(entry.key, since.timestamp() + self.republish_after)
        else:
            self._deadlines.forget(entry.key)

    def _remember(self, key: str, record: ProposalRecord) -> None:
        ids = self._recorded.setdefault(key, set())
        if record.published:
            self._recorded_ids -= ids
            del self._recorded[key]
            return
        ids.add(record.message_id)
        ids.update(b.message_id for b in record.votes if b.message_id)
        self._recorded_ids |= ids

    # --- ingesting wire events ------------------------------------------------------------

    async def _consume(self, durable: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        await self.bus.consume(
            durable,
            [
                subjects.event_filter("action", "proposed", self.session),
                subjects.event_filter("action", "voted", self.session),
            ],
            self._ingest,
            receiver=self.agent,
            limiter=anyio.Semaphore(32),
            stop=self._stop,
            task_status=task_status,
        )

    async def _ingest(self, message: Message) -> None:
        assert self._decider is not None
        book = self._decider.book
        source = message.source
        if message.id in self._recorded_ids:
            return
        if isinstance(message, ProposalMessage):
            await book.record_proposal(
                message.proposal,
                agent=source.agent,
                session=source.session,
                message_id=message.id,
                at=message.timestamp,
            )
        elif isinstance(message, VoteMessage):
            for attempt in range(3):
                try:
                    await book.record_vote(
                        message.vote, agent=source.agent, message_id=message.id, at=now()
                    )
                    return
                except NotFoundError:
                    if attempt == 2:
                        raise
                    await anyio.sleep(0.2)  # its proposal event may be in a parallel handler
