"""Dead letters: a dispatch message the queue cannot use is dead-lettered once, then ended.

Anyone with a publish grant on ``swarmbus.task.>`` (or one key of the record bucket)
can send a queue something that is not a task of it: random bytes, a malformed
revision header, an id that cannot be a key, a record that is not a task. Such a
message is refused: its bytes go to the dead-letter stream with the refusal's code and
reason (``Bus.reject``, which also publishes ``agent.error.occurred``), then it is
terminated, so it is never redelivered, never fails its claim batch and never ends a
worker. The dead letter is written before the termination (a crash in between
redelivers it, and its de-duplication id, the message's stream sequence, keeps the
second copy out within the duplicate window).

An unexpected error while settling one message (a bug, not the message's fault) is
retried a few times with a delay, then refused the same way: a message that always
triggers it cannot loop forever.
"""

from __future__ import annotations

import logging
from typing import Final

from swarmbus._bus import Bus
from swarmbus._errors import InvalidMessageError
from swarmbus._jetstream.reads import deliveries, quietly
from swarmbus._jetstream.workqueue import Dispatch, stream_sequence
from swarmbus._tasks.model import TASKS_STREAM

log = logging.getLogger("swarmbus.tasks")

MAX_FAILED_DELIVERIES: Final = 5
"""Deliveries of a message that failed unexpectedly before it is refused."""


class DeadLetters:
    """Dead-letters and terminates the dispatch messages a queue refuses."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def refuse(self, msg: Dispatch, agent: str, exc: InvalidMessageError) -> None:
        """Dead-letter ``msg`` with the refusal's code and reason, then terminate it."""
        log.error("refusing a dispatch message on %s: %s", msg.subject, exc)
        sequence = stream_sequence(msg)
        await self._bus.reject(
            subject=msg.subject,
            data=msg.data,
            code=exc.code,
            reason=exc.reason,
            receiver=agent,
            dedupe_key=None if sequence is None else f"{TASKS_STREAM}:{sequence}",
        )
        await quietly(msg.term())

    async def failed(self, msg: Dispatch, agent: str, exc: Exception) -> None:
        """Retry ``msg`` later after an unexpected error; refuse it after a few tries."""
        log.error("settling a dispatch message on %s failed", msg.subject, exc_info=exc)
        if deliveries(msg) < MAX_FAILED_DELIVERIES:
            await quietly(msg.nak(delay=0.5))
            return
        reason = f"settling failed {deliveries(msg)} times: {type(exc).__name__}: {exc}"
        await self.refuse(msg, agent, InvalidMessageError("internal_error", reason))
