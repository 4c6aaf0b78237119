"""The worker loop behind ``TaskQueue.work``: claim in batches, run, heartbeat, finish.

A ``Worker`` keeps up to ``concurrency`` claims running. It claims when at least half
of its slots are free (or after a short wait with any free), so a busy worker claims
in batches instead of one round trip per task; each batch runs in one task-group task
(gather's tasks are much cheaper to start; a task of its own per batch, so what a
handler sets in its context never reaches another batch's handler). Every claim is
heartbeated each third of min(its timeout, ack_wait) until it is settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Final, Protocol

import anyio
import anyio.abc

from swarmbus._errors import (
    ConnectionError,
    InvalidTaskError,
    InvalidTransitionError,
    SwarmbusError,
    TaskClaimLostError,
)
from swarmbus._jetstream.headers import MSG_ID as MSG_ID_HEADER
from swarmbus._tasks.model import Claim, Handler
from swarmbus._telemetry import process_span, tracing_enabled

log = logging.getLogger("swarmbus.tasks")

_NO_SPAN: Final = contextlib.nullcontext()


class ClaimSource(Protocol):
    """What a worker needs of its queue."""

    session: str
    ack_wait: float

    async def claim_many(
        self, *, agent: str, types: Sequence[str], limit: int, timeout: float | None = None
    ) -> list[Claim]: ...


class Worker:
    """Claims and runs tasks of ``types`` with ``handler`` until ``stop`` is set.

    ``handler(task)`` returns the result; if it raises (or its result is not a JSON
    object), the task is failed with ``retry=True``.
    """

    def __init__(
        self,
        queue: ClaimSource,
        handler: Handler,
        *,
        agent: str,
        types: Sequence[str],
        stop: anyio.Event,
        concurrency: int,
    ) -> None:
        self._queue = queue
        self._handler = handler
        self._agent = agent
        self._types = types
        self._stop = stop
        self._concurrency = concurrency
        #: Claims being run, with when each was last heartbeated (monotonic).
        self._active: dict[Claim, float] = {}
        #: Set when a claim is settled; replaced by whoever waits for the next one.
        self._freed = anyio.Event()

    async def run(self) -> None:
        """Claim and run tasks until stopped, then finish the claimed ones."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeats, tg)
            while not self._stop.is_set():
                await self._wait_for_slots()
                claims = await self._claim()
                for claim in claims:
                    self._active[claim] = time.monotonic()
                if claims:
                    tg.start_soon(self._run_batch, claims)
                    # The batch first, then this loop's next claim (a quick handler's
                    # completion is written before the loop's next pull is prepared).
                    await asyncio.sleep(0)
            while self._active:
                self._freed = anyio.Event()
                await self._freed.wait()
            tg.cancel_scope.cancel()

    async def _wait_for_slots(self) -> None:
        """Until half the slots are free, or any after a short wait (20 ms)."""
        concurrency = self._concurrency
        active = self._active
        deadline = time.monotonic() + 0.02
        while concurrency - len(active) < max(concurrency // 2, 1):
            self._freed = anyio.Event()
            wait = deadline - time.monotonic() if len(active) < concurrency else 1.0
            with anyio.move_on_after(wait):
                await self._freed.wait()
            if time.monotonic() >= deadline and len(active) < concurrency:
                break

    async def _claim(self) -> list[Claim]:
        try:
            return await self._queue.claim_many(
                agent=self._agent,
                types=self._types,
                limit=self._concurrency - len(self._active),
                timeout=0.5,
            )
        except ConnectionError as exc:
            log.warning("claim failed: %s; retrying", exc)
            await anyio.sleep(0.5)
            return []

    async def _run_batch(self, claims: list[Claim]) -> None:
        if len(claims) == 1:  # no task to start
            await self._run(claims[0])
            return
        # One task-group task per batch; gather's tasks are much cheaper to start.
        results = await asyncio.gather(*(self._run(c) for c in claims), return_exceptions=True)
        for error in results:
            if isinstance(error, BaseException):
                raise error

    def _span(self, claim: Claim) -> contextlib.AbstractContextManager[object]:
        """The CONSUMER span of running ``claim`` (nothing to build when tracing is off)."""
        if not tracing_enabled():
            return _NO_SPAN
        attrs = {
            "swarmbus.session": self._queue.session,
            "swarmbus.task_id": claim.task.id,
            "swarmbus.agent": self._agent,
        }
        queue = claim._msg.subject.rsplit(".", 1)[0]  # span names without the id
        headers = claim._msg.headers or {}
        return process_span(queue, headers.get(MSG_ID_HEADER, ""), attrs, headers)

    async def _run(self, claim: Claim) -> None:
        try:
            with self._span(claim):
                await claim._announced()  # a claim's task.assigned, held back for this
                try:
                    result = await self._handler(claim.task)
                except Exception as exc:  # noqa: BLE001 - any handler error fails the task
                    log.warning("task %s failed: %s", claim.task.id, exc)
                    await claim.fail(f"{type(exc).__name__}: {exc}", retry=True)
                else:
                    try:
                        await claim.complete(result)
                    except InvalidTaskError as exc:  # not a JSON object: a handler error
                        log.warning("task %s failed: %s", claim.task.id, exc)
                        await claim.fail(str(exc), retry=True)
        except (TaskClaimLostError, InvalidTransitionError, ConnectionError) as exc:
            # ConnectionError: the claim expires and the task is offered again
            log.warning("%s", exc)
        finally:
            del self._active[claim]
            self._freed.set()

    async def _heartbeats(self, tg: anyio.abc.TaskGroup) -> None:
        ack_wait = self._queue.ack_wait
        while True:
            await anyio.sleep(ack_wait / 6)
            now = time.monotonic()
            for claim, last in list(self._active.items()):
                if now - last >= min(claim.task.constraints.timeout, ack_wait) / 3:
                    self._active[claim] = now
                    tg.start_soon(_beat, claim)


async def _beat(claim: Claim) -> None:
    with contextlib.suppress(SwarmbusError):
        await claim.heartbeat()
