"""Claims on a ``StateStore`` (``SWARM_BACKEND=redis|postgres``): found by listing, taken by CAS.

Without a dispatch stream the record is the whole task: it is created with the task
(create-once) and is what claimers look for. A claimer reads the records of the
session's open tasks of its types (the open-task index of ``store_queue``, then the
records in one batched read; on PostgreSQL one query of the ``agent_tasks`` mirror:
``store_reads``), keeps the claimable ones and takes the best first: a task that
waited ``starvation_after`` (aging), else the highest priority, FIFO within.
Claimable means pending (approved if gated, past its retry delay) or claimed with a
lease that ran out. Each claim is a compare-and-set from the revision
the listing returned, so two claimers never both win; the loser moves on to the next
candidate. A task out of attempts is failed for good (dead letter) by the claimer that
finds it. Every later transition (heartbeat, complete, fail) is a compare-and-set at
the claim's revision: the attempt number is the claim's fencing token, exactly as on
NATS (``claims``), so a late completion after a reclaim is refused.

When nothing is claimable a claimer waits on the store's watch of the session's wake
key (bucket ``swarmbus-task-wake``, key ``<session>``), which is written whenever a
task becomes claimable (created, approved, retried, given back), and at most until
the next lease or retry delay runs out (expired leases write nothing). A ``work()``
loop keeps one such watch for all its claims and, while it is quiet, trusts its last
listing (``_Recent``): it claims that listing's untried candidates before listing
again, and does not list again after an empty one (for up to ``IDLE_RELIST``).

A retry's delay (``min(0.1 * 2**attempts, 30)`` seconds, as on NATS) is the pending
record's ``lease_until``: claimers skip it until then.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import anyio
import anyio.abc
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._bus import Bus
from swarmbus._errors import (
    ConflictError,
    ConnectionError,
    InvalidMessageError,
    InvalidTaskError,
    InvalidTransitionError,
    SwarmbusError,
    TaskClaimLostError,
)
from swarmbus._jetstream.headers import MSG_ID as MSG_ID_HEADER
from swarmbus._messages import TaskAssigned, TaskCompleted, TaskFailed
from swarmbus._state import Entry, StateStore
from swarmbus._tasks.claims import Event, _Completed, _Failed, _Outcomes, _released, _running
from swarmbus._tasks.model import TERMINAL, Claim, Task, after, claimed, encoder, now, record_of
from swarmbus._tasks.store_reads import get_many, open_records

if TYPE_CHECKING:
    from swarmbus._jetstream.workqueue import Dispatch

__all__ = ["WAKE_BUCKET", "StoreClaimer", "StoreTransitions", "Wake"]

log = logging.getLogger("swarmbus.tasks")

WAKE_BUCKET: Final = "swarmbus-task-wake"
"""One key per session, written when a task becomes claimable (waiting claimers watch it)."""
MAX_WAIT: Final = 0.5
"""Longest wait (seconds) between two listings of an idle claimer without a live watch."""
IDLE_RELIST: Final = 2.0
"""Longest time (seconds) a ``work()`` loop's claims trust their last listing while their
live watch is quiet (they list again at once when it wakes them)."""


class StoreQueueView(Protocol):
    """What store claims need of their ``StoreTaskQueue``."""

    bus: Bus
    session: str
    starvation_after: float

    @property
    def records(self) -> StateStore: ...

    @property
    def wakes(self) -> StateStore: ...

    @property
    def open_tasks(self) -> StateStore | None: ...

    def _key(self, task_id: str) -> str: ...

    async def _closed(self, task_id: str) -> None: ...

    async def _wake(self) -> None: ...

    async def _events(self, items: Iterable[Event]) -> None: ...

    async def _cas(self, task: Task, revision: int) -> int | None: ...

    async def _transition(
        self, claim: Claim, change: Callable[[Task], Task], requested: str
    ) -> Task: ...

    async def _heartbeat(self, claim: Claim) -> None: ...

    async def _complete(self, claim: Claim, result: Mapping[str, Any] | None) -> Task: ...

    async def _fail(self, claim: Claim, error: str, *, retry: bool) -> Task: ...

    async def _announce(self, claim: Claim, agent: str) -> None: ...


@dataclass(frozen=True, slots=True)
class StoreOffer:
    """What a store claim has instead of a dispatch message: its queue's subject and the
    message id, which the worker names its spans after. There is nothing to ack: store
    transitions never touch it (only ``claims.Claimer`` and ``Transitions`` do)."""

    subject: str
    headers: dict[str, str] = field(default_factory=dict)


def offer(task: Task) -> Dispatch:
    subject = f"{subjects.task_subject(task.session, task.type, task.priority)}.{task.id}"
    return cast("Dispatch", StoreOffer(subject, {MSG_ID_HEADER: f"task:{task.id}:dispatch"}))


@dataclass(slots=True)
class _Recent:
    """The last listing of a ``work()`` loop's claims, trusted instead of listing again
    until ``until`` (monotonic) unless ``woken`` (its wake watch's event when it listed)
    is set: ``rest`` holds its candidates not tried yet, in claim order; ``idle``, that
    it had none at all."""

    wake: Wake
    woken: anyio.Event
    types: frozenset[str]
    until: float
    rest: list[tuple[Task, int]]
    idle: bool

    def holds(self, wakes: list[Wake], types: frozenset[str]) -> bool:
        return (
            self.wake in wakes
            and self.types == types
            and not self.woken.is_set()
            and time.monotonic() < self.until
        )


@dataclass(slots=True)
class _Listing:
    """One listing's claimable tasks of some types, and when the next may become so."""

    candidates: list[tuple[Task, int]] = field(default_factory=list)
    exhausted: list[tuple[Task, int]] = field(default_factory=list)
    due: float = math.inf


class Wake:
    """A live watch of a session's wake key: ``event`` is set (and replaced) on each write.

    A waiter takes ``event`` before it lists the records, so a write in between is not
    missed. Runs in a task group until cancelled; a broken watch is made again (the
    waiters still list at least every ``MAX_WAIT`` meanwhile).
    """

    def __init__(self) -> None:
        self.event = anyio.Event()

    async def run(
        self, store: StateStore, key: str, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        started = False
        while True:
            try:
                async with store.watch(key, initial=False) as changes:
                    if not started:
                        started = True
                        task_status.started()
                    async for _ in changes:
                        self.event.set()
                        self.event = anyio.Event()
            except SwarmbusError as exc:
                log.warning("watching the wake key of %s: %s; again", key, exc)
                if not started:  # claims list without it meanwhile (IDLE_RELIST)
                    started = True
                    task_status.started()
                await anyio.sleep(MAX_WAIT)


class StoreClaimer:
    """Claims tasks for one ``StoreTaskQueue``: listing, choosing, compare-and-set."""

    def __init__(self, queue: StoreQueueView) -> None:
        self._queue = queue
        #: Live wake watches kept by running ``work()`` loops (shared by their claims).
        self.wakes: list[Wake] = []
        #: Decoded records by key, with the revision they were decoded at (None: broken).
        self._decoded: dict[str, tuple[int, Task | None]] = {}
        self._recent: _Recent | None = None

    async def claim_many(
        self, *, agent: str, types: Sequence[str], limit: int, timeout: float | None
    ) -> list[Claim]:
        """See ``TaskQueue.claim_many``."""
        queue = self._queue
        queue.bus.act_as(agent)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidTaskError("limit", f"must be an integer >= 1, got {limit!r}")
        if isinstance(types, str | bytes) or not types:
            raise InvalidTaskError("types", f"must be a non-empty list of types, got {types!r}")
        for type in types:
            subjects.validate_name("task type", type)
        deadline = time.monotonic() + (timeout or 0.0)
        wanted = frozenset(types)
        wake = self.wakes[-1] if self.wakes else None
        if wake is not None:
            return await self._claim_until(agent, wanted, limit, deadline, wake)
        claims, _ = await self._scan(agent, wanted, limit)
        if claims or time.monotonic() >= deadline:
            return claims
        # Idle outside a work() loop: a watch of the wake key of its own while it waits.
        claims = []
        try:
            async with anyio.create_task_group() as tg:
                wake = Wake()
                await tg.start(wake.run, queue.wakes, queue.session)
                claims = await self._claim_until(agent, wanted, limit, deadline, wake)
                tg.cancel_scope.cancel()
        except BaseException:
            # Cancelled on the way out of the task group: nobody will run them.
            with anyio.CancelScope(shield=True):
                for claim in claims:
                    await self._release(claim)
            raise
        return claims

    async def _claim_until(
        self, agent: str, wanted: frozenset[str], limit: int, deadline: float, wake: Wake
    ) -> list[Claim]:
        """List and claim until something is won or ``deadline``, woken by ``wake``."""
        shared = wake in self.wakes
        while True:
            woken = wake.event  # taken before the listing: a write during it wakes us
            if shared:
                claims, due = await self._scan(agent, wanted, limit, wake, woken)
            else:
                claims, due = await self._scan(agent, wanted, limit)
            remaining = deadline - time.monotonic()
            if claims or remaining <= 0:
                return claims
            with anyio.move_on_after(min(remaining, due, MAX_WAIT)):
                await woken.wait()

    async def _scan(
        self,
        agent: str,
        types: frozenset[str],
        limit: int,
        wake: Wake | None = None,
        woken: anyio.Event | None = None,
    ) -> tuple[list[Claim], float]:
        """Claims won, and the seconds until more may be claimable.

        With a ``work()`` loop's ``wake`` (and its event ``woken`` as it was before this
        call), the last listing is trusted while its watch is quiet (``_Recent``): its
        untried candidates are claimed first, and an empty one is not listed again.
        """
        recent, self._recent = self._recent, None
        if recent is not None and recent.holds(self.wakes, types):
            if recent.idle:
                self._recent = recent
                return [], recent.until - time.monotonic()
            claims, recent.rest = await self._claim_from(recent.rest, agent, limit, stale=True)
            if claims:
                self._recent = recent
                return claims, recent.until - time.monotonic()
        listing = await self._list(types)
        for task, revision in listing.exhausted:
            await self._give_up(task, revision, agent)
        claims, rest = await self._claim_from(self._choose(listing.candidates), agent, limit)
        if wake is not None and woken is not None:
            until = time.monotonic() + min(listing.due, IDLE_RELIST)
            idle = not (listing.candidates or listing.exhausted)
            self._recent = _Recent(wake, woken, types, until, rest, idle)
        return claims, listing.due

    async def _claim_from(
        self, chosen: list[tuple[Task, int]], agent: str, limit: int, *, stale: bool = False
    ) -> tuple[list[Claim], list[tuple[Task, int]]]:
        """Claim up to ``limit`` of ``chosen`` in order (a lost race moves on to the
        next); the claims and the candidates not tried. ``stale`` candidates (an earlier
        listing's) are given up at the first batch that wins nothing: others took them."""
        claims: list[Claim] = []
        try:
            try:
                while chosen and len(claims) < limit:
                    batch, chosen = chosen[: limit - len(claims)], chosen[limit - len(claims) :]
                    with anyio.CancelScope(shield=True):  # a won claim must reach the caller
                        won = await self._take(batch, agent)
                    claims.extend(won)
                    if stale and not won:
                        break
            except ConnectionError as exc:
                if not claims:
                    raise
                # Claims already won are returned (see claims._scan).
                log.warning("claiming stopped early, %d claimed: %s", len(claims), exc)
            for claim in claims:
                event = TaskAssigned(task_id=claim.task.id, agent_id=agent)
                await self._queue._events([(event, agent, None)])
        except BaseException:
            # Cancelled: nobody will run them. Give them back now (see claims._scan).
            with anyio.CancelScope(shield=True):
                for claim in claims:
                    await self._release(claim)
            raise
        return claims, chosen

    async def _records(self, types: frozenset[str]) -> list[Entry]:
        """The records of the session's open tasks of ``types`` (the open-task index
        read first: finished tasks cost nothing), in the order they were listed."""
        queue = self._queue
        index = queue.open_tasks
        if index is None:
            return await open_records(queue.records, queue.session, sorted(types))
        keys = []
        for entry in await index.list(f"{queue.session}."):
            if entry.value is not None and entry.value.decode(errors="replace") in types:
                keys.append(entry.key)
        return [e for e in await get_many(queue.records, keys) if e is not None]

    async def _list(self, types: frozenset[str]) -> _Listing:
        queue = self._queue
        prefix = f"{queue.session}."
        listing = _Listing()
        at = time.time()
        decoded, self._decoded = self._decoded, {}
        for entry in await self._records(types):
            task_id = entry.key[len(prefix) :]
            if not entry.value or "." in task_id:
                continue
            known = decoded.get(entry.key)
            if known is not None and known[0] == entry.revision:
                task = known[1]
            else:
                try:
                    task = record_of(entry.value, queue.session, task_id)
                except InvalidMessageError as exc:  # written by something else: skipped
                    log.warning("skipping a broken task record: %s", exc.reason)
                    task = None
            self._decoded[entry.key] = (entry.revision, task)
            if task is None:
                continue
            if task.status in TERMINAL:  # left in the index by a crash: taken out
                await queue._closed(task.id)
                continue
            if task.type not in types:
                continue
            if task.approval in ("required", "rejected"):
                continue  # approve() wakes claimers
            if task.lease_until is not None:
                wait = task.lease_until.timestamp() - at
                if wait > 0:  # claimed, or a retry's delay
                    listing.due = min(listing.due, wait)
                    continue
            elif task.status != "pending":
                continue
            if task.attempts >= task.max_attempts:
                listing.exhausted.append((task, entry.revision))
            else:
                listing.candidates.append((task, entry.revision))
        return listing

    def _choose(self, candidates: list[tuple[Task, int]]) -> list[tuple[Task, int]]:
        """The candidates in claim order: the oldest starved one alone, else the highest
        priority's, oldest first (FIFO within a priority, as on NATS)."""
        if not candidates:
            return []

        def age(item: tuple[Task, int]) -> tuple[float, int]:
            created = item[0].created_at
            return (created.timestamp() if created else 0.0, item[1])

        starvation_after = self._queue.starvation_after
        if starvation_after:
            cutoff = time.time() - starvation_after
            top = max(task.priority for task, _ in candidates)
            starved = [c for c in candidates if c[0].priority < top and age(c)[0] <= cutoff]
            if starved:
                return [min(starved, key=age)]
        top = max(task.priority for task, _ in candidates)
        return sorted((c for c in candidates if c[0].priority == top), key=age)

    async def _take(self, batch: list[tuple[Task, int]], agent: str) -> list[Claim]:
        """Claim every task of ``batch`` at its listed revision, concurrently; the won ones."""
        outcomes = _Outcomes(len(batch))
        async with anyio.create_task_group() as tg:
            for i, (task, revision) in enumerate(batch):
                tg.start_soon(self._take_one, outcomes, i, task, revision, agent)
        claims = [c for c in outcomes.claims if c is not None]
        if outcomes.error is not None and not claims:
            raise outcomes.error
        return claims

    async def _take_one(
        self, outcomes: _Outcomes, i: int, task: Task, revision: int, agent: str
    ) -> None:
        mine = claimed(task, agent)
        try:
            new_revision = await self._queue._cas(mine, revision)
        except ConnectionError as exc:  # unknown outcome: if it landed, the lease runs out
            outcomes.error = exc
            return
        if new_revision is not None:
            outcomes.claims[i] = Claim(self._queue, mine, new_revision, offer(mine))

    async def _release(self, claim: Claim) -> None:
        try:
            await self._queue._transition(claim, _released, "pending")
        except SwarmbusError as exc:  # its lease runs out instead
            log.warning("could not give back task %s: %s", claim.task.id, exc)
            return
        await self._queue._wake()

    async def _give_up(self, task: Task, revision: int, agent: str) -> None:
        """Fail ``task`` for good (dead letter), unless someone moved it on meanwhile."""
        reason = "claim timed out" if task.status != "pending" else (task.error or "")
        dead = msgspec.structs.replace(
            task,
            status="failed",
            dead=True,
            error=f"gave up after {task.attempts} attempts: {reason}",
            completed_at=now(),
            lease_until=None,
        )
        try:
            if await self._queue._cas(dead, revision) is None:
                return
        except ConnectionError as exc:  # the next listing tries again
            log.warning("could not fail task %s: %s", task.id, exc)
            return
        failed = TaskFailed(
            task_id=task.id, error=dead.error or "", attempts=dead.attempts, dead=True
        )
        await self._queue._events([(failed, agent, f"task:{task.id}:dead")])


class StoreTransitions:
    """Compare-and-set transitions of claimed tasks on a ``StateStore``."""

    def __init__(self, queue: StoreQueueView) -> None:
        self._queue = queue

    async def transition(
        self, claim: Claim, change: Callable[[Task], Task], requested: str
    ) -> Task:
        """CAS ``change(task)`` at the claim's revision; one transition at a time."""
        queue = self._queue
        async with claim._lock:
            queue.bus.act_as(claim.task.assigned_to or subjects.UNKNOWN)
            if claim.finished:
                raise InvalidTransitionError("task", claim.task.id, claim.task.status, requested)
            new = change(claim.task)
            revision = await self._write(new, claim.revision)
            if revision is None:
                entry = await queue.records.get(queue._key(claim.task.id), fresh=True)
                if entry is None or not entry.value:  # finished by another claim, then pruned
                    raise TaskClaimLostError(claim.task.id, claim.attempt, 0, "pruned")
                current = record_of(entry.value, queue.session, claim.task.id)
                raise TaskClaimLostError(
                    claim.task.id, claim.attempt, current.attempts, current.status
                )
            claim.task, claim.revision = new, revision
            claim.finished = new.status != "running"
            if new.status in TERMINAL:
                await queue._closed(new.id)
            return new

    async def _write(self, new: Task, revision: int) -> int | None:
        """CAS ``new`` at ``revision``; None if the record moved on. A write whose answer
        was lost is settled by reading the record: our bytes there mean it landed."""
        queue = self._queue
        key = queue._key(new.id)
        data = encoder.encode(new)
        try:
            return await queue.records.update(key, data, revision=revision)
        except ConflictError:
            return None
        except ConnectionError:
            entry = await queue.records.get(key, fresh=True)
            if entry is not None and entry.value == data:
                return entry.revision
            if entry is not None and entry.revision == revision:
                raise  # it did not happen: the caller may try again
            return None

    async def heartbeat(self, claim: Claim) -> None:
        with anyio.CancelScope(shield=True):  # see complete
            await self.transition(claim, _running, "running")

    async def complete(self, claim: Claim, result: Mapping[str, Any] | None) -> Task:
        try:
            result_dict = msgspec.convert(dict(result or {}), dict[str, Any])
            encoder.encode(result_dict)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise InvalidTaskError("result", str(exc)) from None
        # Shielded: a write cancelled in flight may still land; the claim must then
        # follow it (or its next call is refused as lost) and its event go out.
        with anyio.CancelScope(shield=True):
            new = await self.transition(claim, _Completed(result_dict), "completed")
            agent = new.assigned_to or subjects.UNKNOWN
            event = TaskCompleted(task_id=new.id, result=result_dict)
            await self._queue._events([(event, agent, f"task:{new.id}:completed")])
        return new

    async def fail(self, claim: Claim, error: str, *, retry: bool) -> Task:
        with anyio.CancelScope(shield=True):  # see complete
            new = await self.transition(claim, _Delayed(_Failed(error, retry)), "failed")
            if new.status == "pending":
                await self._queue._wake()
            agent = new.assigned_to or subjects.UNKNOWN
            event = TaskFailed(task_id=new.id, error=error, attempts=new.attempts, dead=new.dead)
            await self._queue._events([(event, agent, f"task:{new.id}:failed:{new.attempts}")])
        return new


class _Delayed:
    """A failure's change, with a retry delay as the pending record's ``lease_until``."""

    def __init__(self, change: Callable[[Task], Task]) -> None:
        self._change = change

    def __call__(self, task: Task) -> Task:
        new = self._change(task)
        if new.status != "pending":
            return new
        return msgspec.structs.replace(new, lease_until=after(min(2.0**new.attempts * 0.1, 30.0)))


def stamped() -> bytes:
    """A wake key's value: when it was written (only its change matters)."""
    return str(now().timestamp()).encode()
