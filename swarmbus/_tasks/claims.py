"""Claims: taking tasks off the queue, and every transition of a claimed task.

``Claimer`` pulls dispatch messages (highest non-empty priority first, aging aside)
and turns them into claims: a first delivery's claim is a compare-and-set pipelined
with the batch's others; anything else (a redelivery, a lost race, an approval, dead
letter) is decided one message at a time against the record. ``Transitions`` writes
the record: every change is a compare-and-set at the claim's revision (the claim's
attempt number is its fencing token), the writes of one event-loop turn go out as one
pipelined batch (``AckPublisher``), and a write whose ack was lost is settled by
reading the record back. Writes that may have landed are shielded from cancellation;
the reason is written beside each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._bus import Bus
from swarmbus._errors import (
    ConnectionError,
    InvalidMessageError,
    InvalidTaskError,
    InvalidTransitionError,
    NotFoundError,
    SwarmbusError,
    TaskClaimLostError,
)
from swarmbus._jetstream.acks import AckPublisher, Refused
from swarmbus._jetstream.headers import EXPECTED_LAST_SUBJECT_SEQUENCE as EXPECTED_LAST_HEADER
from swarmbus._jetstream.headers import WRONG_LAST_SEQUENCE as _WRONG_LAST
from swarmbus._jetstream.reads import PullInbox, deliveries, quietly
from swarmbus._jetstream.workqueue import (
    Dispatch,
    KeyValue,
    Puller,
    QueueConsumers,
    Signals,
    queue_consumer,
    settle_unacked,
    stored_age,
)
from swarmbus._messages import TaskAssigned, TaskCompleted, TaskFailed
from swarmbus._tasks.dead_letters import DeadLetters
from swarmbus._tasks.model import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    RECORD_SLACK,
    TASKS_BUCKET,
    TASKS_STREAM,
    TERMINAL,
    Claim,
    Offer,
    Task,
    after,
    claimed,
    encoder,
    now,
    offer_of,
)
from swarmbus._telemetry import continued

log = logging.getLogger("swarmbus.tasks")

REPULLS = 8
"""Pulls from one queue per scan while its batches hold messages that are not claims."""

Event = tuple[Any, str, str | None]
"""A lifecycle event to publish: (body, agent, message id or None)."""


class QueueView(Protocol):
    """What claims need of their ``TaskQueue`` (its state, reads and events)."""

    bus: Bus
    session: str
    ack_wait: float
    starvation_after: float
    _acks: AckPublisher

    @property
    def kv(self) -> KeyValue: ...

    def _key(self, task_id: str) -> str: ...

    async def _read(self, task_id: str) -> tuple[Task, int]: ...

    async def _record_of(self, task_id: str) -> tuple[Task, int] | None: ...

    async def _events(self, items: Iterable[Event]) -> None: ...

    async def _cas(self, task: Task, revision: int) -> int | None: ...

    async def _cas_many(
        self, writes_in: Sequence[tuple[Task, int]]
    ) -> list[int | ConnectionError | None]: ...

    async def _settle_unknown(
        self, task: Task, revision: int, subject: str, data: bytes, headers: dict[str, str]
    ) -> int | ConnectionError | None: ...

    async def _transition(
        self, claim: Claim, change: Callable[[Task], Task], requested: str
    ) -> Task: ...

    async def _heartbeat(self, claim: Claim) -> None: ...

    async def _complete(self, claim: Claim, result: Mapping[str, Any] | None) -> Task: ...

    async def _fail(self, claim: Claim, error: str, *, retry: bool) -> Task: ...

    async def _announce(self, claim: Claim, agent: str) -> None: ...


def announce(claim: Claim, agent: str) -> Event:
    """The task.assigned event of ``claim``."""
    return TaskAssigned(task_id=claim.task.id, agent_id=agent), agent, None


def _released(task: Task) -> Task:
    """``task`` as before a claim that was never handed out."""
    return msgspec.structs.replace(
        task,
        status="pending",
        assigned_to=None,
        attempts=task.attempts - 1,
        claimed_at=None,
        lease_until=None,
    )


class _Outcomes:
    """Claims won and the last error of dispatch messages settled concurrently."""

    def __init__(self, size: int) -> None:
        self.claims: list[Claim | None] = [None] * size
        self.error: ConnectionError | None = None


class Claimer:
    """Claims tasks for one ``TaskQueue``: pulls, aging, settling dispatch messages."""

    def __init__(self, queue: QueueView) -> None:
        self._queue = queue
        bus = queue.bus
        self._pullers: dict[tuple[str, int], Puller] = {}
        self._inbox = PullInbox(bus.nc, bus.settings.request_timeout)
        self._consumers = QueueConsumers(bus.js, self._inbox, TASKS_STREAM, bus._permission_guard)
        self._last_aging = 0.0
        # One pull at a time per queue object: the pullers share one reply inbox.
        self._scan_lock = anyio.Lock(fast_acquire=True)  # no loop turn when free
        self._dead_letters = DeadLetters(bus)
        refresh = min(queue.ack_wait / 2, 0.5)  # redeliveries and delayed naks
        self._signals = Signals(
            bus.nc, queue.session, refresh, range(MIN_PRIORITY, MAX_PRIORITY + 1)
        )
        self._lingering = 0
        #: The queue claimed from last: an idle ``work()`` loop waits in a pull there.
        self._likely: tuple[str, int] | None = None
        self._parked: anyio.CancelScope | None = None
        #: The claims handed out and still referenced (``Transitions.cas``).
        self.open_claims: weakref.WeakSet[Claim] = weakref.WeakSet()

    async def close(self) -> None:
        await self._signals.disarm()
        self._pullers.clear()
        await self._inbox.close()

    async def claim_many(
        self, *, agent: str, types: Sequence[str], limit: int, timeout: float | None
    ) -> list[Claim]:
        """See ``TaskQueue.claim_many``."""
        self._queue.bus.act_as(agent)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidTaskError("limit", f"must be an integer >= 1, got {limit!r}")
        if isinstance(types, str | bytes) or not types:
            raise InvalidTaskError("types", f"must be a non-empty list of types, got {types!r}")
        for type in types:
            subjects.validate_name("task type", type)
        deadline = time.monotonic() + (timeout or 0.0)
        signals = self._signals
        try:
            while True:
                if time.monotonic() - signals.refreshed_at >= signals.refresh_every:
                    signals.refresh()
                changed = signals.changed
                if self._parked is not None:
                    self._parked.cancel()  # another caller's idle pull: end it, scan now
                async with self._scan_lock:
                    claims = await self._scan(agent, types, limit)
                if claims:
                    await self._adjust(claims, types, limit)
                    return claims
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                if not signals.armed(types):
                    # Idle: subscribe, then scan again (a dispatch may have come in
                    # between): from then on only the queues that get one are pulled.
                    await signals.arm(types)
                    continue
                wait = min(remaining, signals.refresh_every)
                likely = self._likely
                if self._lingering and likely in self._queues(types) and not signals.owed(*likely):
                    # A waiting pull is answered at its expiry: within the request timeout.
                    wait = min(wait, self._queue.bus.settings.request_timeout / 2)
                    claims = await self._wait_on(likely, agent, types, wait)
                    if claims:
                        return claims
                    continue
                with anyio.move_on_after(wait):
                    await changed.wait()
        finally:
            if not self._lingering:  # a work() loop keeps them between its claims
                with anyio.CancelScope(shield=True):
                    await signals.disarm()

    async def _adjust(self, claims: list[Claim], types: Sequence[str], limit: int) -> None:
        """Subscribe to dispatches or not, by how busy the claimer is (a failure to is
        logged: the claims are won). Cancelled meanwhile, give ``claims`` back first:
        nobody would run them."""
        signals = self._signals
        try:
            if len(claims) >= limit:
                # Busy: its pulls find the work; it need not hear every dispatch.
                await signals.disarm()
            elif self._lingering and not signals.armed(types):
                # Keeping up: from the next call on, pull only where dispatches go.
                await signals.arm(types)
        except ConnectionError as exc:  # the next call tries again
            log.warning("cannot subscribe to dispatches: %s", exc)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._release(claims)
            raise

    async def _wait_on(
        self, queue: tuple[str, int], agent: str, types: Sequence[str], wait: float
    ) -> list[Claim]:
        """Idle in a ``work()`` loop: wait in a pull of one message from ``queue`` (the
        one claimed from last), which hands a dispatch over as soon as it is stored,
        until ``wait`` passes or another queue gets a dispatch. A pull given up on
        stays open on the server until ``wait``: a dispatch it gets is kept by the
        inbox for the next pull."""
        msgs: list[Dispatch] = []
        signals = self._signals
        others = [q for q in self._queues(types) if q != queue]
        async with self._scan_lock:
            puller = await self.puller(*queue)
            if any(signals.owed(*q) for q in others):
                return []  # another queue got a dispatch meanwhile: scan
            with anyio.CancelScope() as scope:
                # Ended by a dispatch on one of ``others`` (``Signals.park``) or by
                # another caller of this claimer (``claim_many``).
                self._parked = scope
                signals.park(scope, others)
                try:
                    msgs = await self._pull(puller, *queue, 1, wait=wait)
                finally:
                    self._parked = None
                    signals.park(None, ())
            return await self.settle_all(msgs, agent) if msgs else []

    @staticmethod
    def _queues(types: Sequence[str]) -> list[tuple[str, int]]:
        priorities = range(MAX_PRIORITY, MIN_PRIORITY - 1, -1)
        return [(type, priority) for priority in priorities for type in types]

    @contextlib.asynccontextmanager
    async def lingering(self) -> AsyncIterator[None]:
        """Keep the dispatch subscriptions between ``claim_many`` calls (``work()``)."""
        self._lingering += 1
        try:
            yield
        finally:
            self._lingering -= 1
            if not self._lingering:
                with anyio.CancelScope(shield=True):
                    await self._signals.disarm()

    async def _scan(self, agent: str, types: Sequence[str], limit: int) -> list[Claim]:
        claims: list[Claim] = []
        try:
            starvation_after = self._queue.starvation_after
            if starvation_after and time.monotonic() - self._last_aging >= 1.0:
                self._last_aging = time.monotonic()
                claims = await self._claim_starved(agent, types)
            for priority in range(MAX_PRIORITY, MIN_PRIORITY - 1, -1):
                for type in types:
                    puller = await self.puller(type, priority)
                    # Pull again while a batch yielded fewer claims than messages (bad
                    # ones were dead-lettered, others put back): good tasks may follow.
                    for _ in range(REPULLS):
                        if len(claims) >= limit:
                            return claims
                        if not self._signals.owed(type, priority):
                            break  # empty since it was last pulled (``Signals``)
                        msgs = await self._pull(puller, type, priority, limit - len(claims))
                        won = await self.settle_all(msgs, agent)
                        claims.extend(won)
                        if won:
                            self._likely = (type, priority)
                        if len(won) == len(msgs):
                            break
                if claims:
                    return claims
        except ConnectionError as exc:
            if not claims:
                raise
            # Claims already won are returned: their records name this agent, so
            # dropping them would leave those tasks waiting out their leases.
            log.warning("claiming stopped early, %d claimed: %s", len(claims), exc)
        except BaseException:
            # Cancelled: nobody will run the claims won so far. Give them back now,
            # or each would wait out its lease and use up one of its attempts.
            with anyio.CancelScope(shield=True):
                await self._release(claims)
            raise
        return claims

    async def _pull(
        self, puller: Puller, type: str, priority: int, batch: int, *, wait: float = 0.0
    ) -> list[Dispatch]:
        signals = self._signals
        mark = signals.mark(type, priority)
        msgs = await puller.pull(batch, wait=wait)
        if signals.pulled(type, priority, mark, len(msgs), batch) and not msgs and not wait:
            mark = signals.mark(type, priority)
            msgs = await puller.pull(1, wait=signals.LAG_WAIT)
            signals.pulled(type, priority, mark, len(msgs), 1)
        return msgs

    async def _release(self, claims: Sequence[Claim]) -> None:
        """Undo claims that were never handed out: pending again, at the attempt count
        they had, and their dispatch messages offered again at once."""
        await asyncio.gather(*(self._release_one(c) for c in claims))

    async def _release_one(self, claim: Claim) -> None:
        try:
            await self._queue._transition(claim, _released, "pending")
        except SwarmbusError as exc:  # its lease runs out instead
            log.warning("could not give back task %s: %s", claim.task.id, exc)
            return
        await quietly(claim._msg.nak())

    async def _claim_starved(self, agent: str, types: Sequence[str]) -> list[Claim]:
        """Peek at each lower priority's head; claim it if it waited too long."""
        for priority in range(MIN_PRIORITY, MAX_PRIORITY):
            for type in types:
                if not self._signals.owed(type, priority):
                    continue  # empty: no head to age
                msgs = await self._pull(await self.puller(type, priority), type, priority, 1)
                for msg in msgs:
                    if stored_age(msg) >= self._queue.starvation_after:
                        claims = await self.settle_all([msg], agent)
                        if claims:
                            return claims
                    else:
                        await quietly(msg.nak())
        return []

    async def settle_all(self, msgs: list[Dispatch], agent: str) -> list[Claim]:
        """``_settle_batch``, finished even if the caller is cancelled meanwhile: its
        writes may have landed, and a claim must not be lost on its way to the caller
        (``_scan`` gives the claims back if it was cancelled)."""
        claims: list[Claim] = []
        with anyio.CancelScope(shield=True):
            claims = await self._settle_batch(msgs, agent)
        self.open_claims.update(claims)
        return claims

    async def _settle_batch(self, msgs: list[Dispatch], agent: str) -> list[Claim]:
        """Claim what the dispatch messages offer, with one round trip for the batch.

        A first delivery carries the task and its revision: if that task is
        claimable its claim CAS is pipelined with the others (one timeout for all).
        Everything else (redeliveries, a lost CAS race, approvals, dead letter) goes
        through ``_settle`` one message at a time. A message that is not a valid
        dispatch of this queue is dead-lettered with its reason and terminated: it
        never fails the batch nor comes back.
        """
        queue = self._queue
        fast: list[tuple[Dispatch, Offer, Task]] = []
        slow: list[tuple[Dispatch, Offer | InvalidMessageError, bool]] = []
        for msg in msgs:
            try:
                offer = offer_of(msg.subject, msg.data, msg.headers, queue.session)
            except InvalidMessageError as exc:
                slow.append((msg, exc, True))
                continue
            hint = offer.task
            if (
                deliveries(msg) == 1
                and hint.status == "pending"
                and hint.approval in ("none", "approved")
                and hint.attempts < hint.max_attempts
            ):
                fast.append((msg, offer, claimed(hint, agent)))
            else:
                slow.append((msg, offer, True))
        claims: list[Claim] = []
        error: ConnectionError | None = None
        revisions = await queue._cas_many([(task, offer.revision) for _, offer, task in fast])
        for (msg, offer, task), revision in zip(fast, revisions, strict=True):
            if isinstance(revision, ConnectionError):
                error = revision  # unacked: the redelivery sees the lease, if it was taken
            elif revision is None:
                slow.append((msg, offer, False))  # someone else moved the record: read it
            else:
                claims.append(Claim(queue, task, revision, msg))
        if slow:
            outcomes = _Outcomes(len(slow))
            async with anyio.create_task_group() as tg:
                for i, (msg, offer_or_refusal, trust_hint) in enumerate(slow):
                    tg.start_soon(
                        self._settle_into, outcomes, i, msg, offer_or_refusal, agent, trust_hint
                    )
            claims.extend(c for c in outcomes.claims if c is not None)
            error = outcomes.error or error
        if error is not None and not claims:
            raise error
        for c in claims:
            c._announce_as = agent
            if not self._lingering:
                await c._announced()
            # else work() announces it as it starts the handler: in one flush with what
            # its loop publishes meanwhile, and with a quick handler's completion
        return claims

    async def _settle_into(
        self,
        outcomes: _Outcomes,
        i: int,
        msg: Dispatch,
        offer: Offer | InvalidMessageError,
        agent: str,
        trust_hint: bool,
    ) -> None:
        try:
            if isinstance(offer, InvalidMessageError):
                raise offer
            outcomes.claims[i] = await self._settle(msg, offer, agent, trust_hint=trust_hint)
        except ConnectionError as exc:  # not the others' claims: keep going
            outcomes.error = exc
            await quietly(msg.nak(delay=0.5))
        except InvalidMessageError as exc:  # a bad message, or its task's record is broken
            await self._dead_letters.refuse(msg, agent, exc)
        except Exception as exc:  # noqa: BLE001 - one message must not end the worker
            await self._dead_letters.failed(msg, agent, exc)

    async def _settle(
        self, msg: Dispatch, offer: Offer, agent: str, *, trust_hint: bool = True
    ) -> Claim | None:
        """Decide what one dispatch message means now; claim its task if possible.

        Raises:
            InvalidMessageError: the task's record is broken.
        """
        queue = self._queue
        hint = offer.task
        task_id = hint.id
        first = trust_hint and deliveries(msg) == 1
        for _ in range(5):
            if first:
                # First delivery: trust the task it carries; the CAS checks it.
                task, revision, first = hint, offer.revision, False
            else:
                # No record yet: nobody claimed it, this message is the task.
                task, revision = await queue._record_of(task_id) or (hint, 0)
            if task.status in TERMINAL:
                await quietly(msg.ack())
                return None
            if task.approval in ("required", "rejected"):
                await quietly(msg.ack())  # approve() offers it again
                return None
            lease = task.lease_until
            if task.status != "pending" and lease is not None:
                remaining = (lease - now()).total_seconds()
                if remaining > 0:
                    await quietly(msg.nak(delay=remaining + 0.05))
                    return None
            if task.attempts >= task.max_attempts:
                if await self._give_up(msg, task, revision, agent):
                    return None
                continue
            mine = claimed(task, agent)
            new_revision = await queue._cas(mine, revision)
            if new_revision is None:
                continue
            return Claim(queue, mine, new_revision, msg)
        await quietly(msg.nak(delay=0.1))
        return None

    async def _give_up(self, msg: Dispatch, task: Task, revision: int, agent: str) -> bool:
        """Fail ``task`` for good (dead letter); False if the record moved on meanwhile."""
        reason = "claim timed out" if task.status != "pending" else (task.error or "")
        dead = msgspec.structs.replace(
            task,
            status="failed",
            dead=True,
            error=f"gave up after {task.attempts} attempts: {reason}",
            completed_at=now(),
            lease_until=None,
        )
        if await self._queue._cas(dead, revision) is None:
            return False
        await quietly(msg.ack())
        failed = TaskFailed(
            task_id=task.id, error=dead.error or "", attempts=dead.attempts, dead=True
        )
        await self._queue._events([(failed, agent, f"task:{task.id}:dead")])
        return True

    async def puller(self, type: str, priority: int) -> Puller:
        """The puller of the queue of ``type`` at ``priority`` (its consumer created once)."""
        key = (type, priority)
        puller = self._pullers.get(key)
        if puller is None:
            session = self._queue.session
            settings = self._queue.bus.settings
            config = queue_consumer(
                session,
                type,
                priority,
                self._queue.ack_wait,
                settings.task_consumer_inactive_threshold,
            )
            puller = self._pullers[key] = self._consumers.puller(config)
        return puller


class Transitions:
    """Compare-and-set writes of task records, batched per event-loop turn."""

    def __init__(self, queue: QueueView, open_claims: Collection[Claim] = ()) -> None:
        self._queue = queue
        self._writes: list[tuple[Task, int, asyncio.Future[int | None]]] = []
        self._open_claims = open_claims

    async def cas(self, task: Task, revision: int) -> int | None:
        """Write ``task`` if the record is still at ``revision``; None if it moved on.

        The writes of one event-loop turn (e.g. the completions of a worker's batch)
        go out together (when more than one claim is held) through ``_cas_many``: one
        pipelined batch, one timeout. The first writer of the turn sends the batch for
        everyone (no background task).
        """
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._writes.append((task, revision, future))
        if len(self._writes) == 1:
            try:
                # Let the other writers of this turn join, if another claim is held (a
                # lone claim's write goes out with what this turn already published).
                if len(self._open_claims) > 1:
                    await asyncio.sleep(0)
            finally:
                # Even if cancelled: the batch holds other writers' writes too.
                with anyio.CancelScope(shield=True):
                    await self._flush_writes(future)
        return await future

    async def _flush_writes(self, own: asyncio.Future[int | None]) -> None:
        batch, self._writes = self._writes, []
        results: list[int | BaseException | None]
        try:
            results = [*await self._queue._cas_many([(task, rev) for task, rev, _ in batch])]
        except Exception as exc:  # noqa: BLE001 - every waiter gets it, the flusher too
            results = [exc] * len(batch)
        except BaseException:
            # The flusher was cancelled: the others' writes have unknown outcomes.
            for _, _, future in batch:
                if future is not own and not future.done():
                    future.set_exception(ConnectionError("write abandoned by its batch"))
            raise
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def cas_many(
        self, writes_in: Sequence[tuple[Task, int]]
    ) -> list[int | ConnectionError | None]:
        """``cas`` for many records, pipelined, with one timeout for the whole batch.

        Per write: the new revision, None if the record moved on, or the error if the
        outcome is unknown (no answer in time, connection lost).
        """
        queue = self._queue
        writes = [
            (
                subjects.kv_subject(TASKS_BUCKET, queue._key(task.id)),
                encoder.encode(task),
                {EXPECTED_LAST_HEADER: str(revision)},
            )
            for task, revision in writes_in
        ]
        results: list[int | ConnectionError | None] = []
        acks = await queue._acks.publish(writes)
        for (task, revision), (subject, data, headers), ack in zip(
            writes_in, writes, acks, strict=True
        ):
            if isinstance(ack, int):
                results.append(ack)
            elif isinstance(ack, Refused) and ack.err_code in _WRONG_LAST:
                results.append(None)
            elif isinstance(ack, Refused):
                results.append(ConnectionError(f"cannot update task {task.id}: {ack}"))
            else:  # no answer (a node died, a leader election): find out what happened
                results.append(await queue._settle_unknown(task, revision, subject, data, headers))
        return results

    async def settle_unknown(
        self, task: Task, revision: int, subject: str, data: bytes, headers: dict[str, str]
    ) -> int | ConnectionError | None:
        """Settle a CAS write whose ack never came: it landed, lost, or never happened.

        Reads the record (retried through failover by ``bus.js``): our bytes there mean
        our write won; a newer revision means someone else's did; otherwise it did not
        happen and is sent again, alone, through the retrying JetStream. Without this a
        completion whose ack was lost would stay unreported: its event is published only
        after a confirmed transition, and a completed task is never offered again.
        """
        queue = self._queue
        return await settle_unacked(
            queue.bus.js,
            queue.kv,
            queue._key(task.id),
            revision,
            (subject, data, headers),
            f"cannot update task {task.id}",
        )

    async def transition(
        self, claim: Claim, change: Callable[[Task], Task], requested: str
    ) -> Task:
        """CAS ``change(task)`` at the claim's revision; one transition at a time."""
        queue = self._queue
        await claim._announced()  # its task.assigned event goes first
        async with claim._lock:
            queue.bus.act_as(claim.task.assigned_to or subjects.UNKNOWN)
            if claim.finished:
                raise InvalidTransitionError("task", claim.task.id, claim.task.status, requested)
            new = change(claim.task)
            revision = await self.cas(new, claim.revision)
            if revision is None:
                try:
                    current, _ = await queue._read(claim.task.id)
                except NotFoundError:  # finished by another claim, then pruned
                    raise TaskClaimLostError(claim.task.id, claim.attempt, 0, "pruned") from None
                raise TaskClaimLostError(
                    claim.task.id, claim.attempt, current.attempts, current.status
                )
            claim.task, claim.revision = new, revision
            claim.finished = new.status != "running"
            return new

    async def heartbeat(self, claim: Claim) -> None:
        with anyio.CancelScope(shield=True):  # see complete
            await self.transition(claim, _running, "running")
            await quietly(claim._msg.in_progress())

    async def complete(self, claim: Claim, result: Mapping[str, Any] | None) -> Task:
        try:
            result_dict = msgspec.convert(dict(result or {}), dict[str, Any])
            size = len(encoder.encode(result_dict)) + len(claim._msg.data)  # ~ the record
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise InvalidTaskError("result", str(exc)) from None
        room = self._queue.bus.nc.max_payload - RECORD_SLACK
        if size > room:  # the server would refuse the record (and close the connection)
            raise InvalidTaskError("result", f"the record would be {size} bytes, at most {room}")
        completed = _Completed(result_dict)
        # Shielded: a write cancelled in flight may still land; the claim must then
        # follow it (or its next call is refused as lost) and its event go out.
        with anyio.CancelScope(shield=True):
            new = await self.transition(claim, completed, "completed")
            await quietly(claim._msg.ack())
            agent = new.assigned_to or subjects.UNKNOWN
            event = TaskCompleted(task_id=new.id, result=result_dict)
            with continued(claim._msg.headers):  # outside work()'s span: the task's trace
                await self._queue._events([(event, agent, f"task:{new.id}:completed")])
        return new

    async def fail(self, claim: Claim, error: str, *, retry: bool) -> Task:
        with anyio.CancelScope(shield=True):  # see complete
            new = await self.transition(claim, _Failed(error, retry), "failed")
            if new.status == "pending":
                await quietly(claim._msg.nak(delay=min(2.0**new.attempts * 0.1, 30.0)))
            else:
                await quietly(claim._msg.ack())
            agent = new.assigned_to or subjects.UNKNOWN
            event = TaskFailed(task_id=new.id, error=error, attempts=new.attempts, dead=new.dead)
            with continued(claim._msg.headers):  # outside work()'s span: the task's trace
                await self._queue._events([(event, agent, f"task:{new.id}:failed:{new.attempts}")])
        return new


def _running(task: Task) -> Task:
    """``task`` running, its lease extended by its timeout."""
    return msgspec.structs.replace(
        task, status="running", lease_until=after(task.constraints.timeout)
    )


class _Completed:
    """The change a completion makes (a transition's ``change``)."""

    def __init__(self, result: dict[str, Any]) -> None:
        self._result = result

    def __call__(self, task: Task) -> Task:
        return msgspec.structs.replace(
            task,
            status="completed",
            result=self._result,
            error=None,
            completed_at=now(),
            lease_until=None,
        )


class _Failed:
    """The change a failure makes: pending again if retried and attempts are left."""

    def __init__(self, error: str, retry: bool) -> None:
        self._error = error
        self._retry = retry

    def __call__(self, task: Task) -> Task:
        if self._retry and task.attempts < task.max_attempts:
            return msgspec.structs.replace(
                task, status="pending", error=self._error, lease_until=None
            )
        return msgspec.structs.replace(
            task,
            status="failed",
            error=self._error,
            dead=self._retry,
            completed_at=now(),
            lease_until=None,
        )
