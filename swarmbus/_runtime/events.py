"""Inbound events: act on what a component can act on, answer the rest; never ignore.

The runtime watches ``agent.>`` as it arrives (core NATS). A message that is not a
valid envelope, or is on a subject of the wrong shape (``agent.finding.reported.S`` or
``...S.a.b``), is dead-lettered with an ``agent.error.occurred`` event naming the
shape to use. For valid lifecycle events sent by services:

==========================  ====================================================
``session.started``         opens the incident (intake: starts its swarm)
``session.completed``       closes it (completes the board)
``hypothesis.proposed``     proposes it on the board (as its ``agent_id``)
``task.created``            error event: use ``swarmbus.api.task.create``
``task.assigned``           error event: use ``swarmbus.api.task.claim``
``task.completed/.failed``  error event: use ``swarmbus.api.task.complete/fail``
``finding.reported``        error event: publish a ``finding`` (it has a confidence)
==========================  ====================================================

An event that matches the state already stored is swarmbus's own notification (the
components write state first, then publish) and is left alone.
"""

from __future__ import annotations

import logging
from typing import Final

from swarmbus._blackboard import Blackboard
from swarmbus._bus import Bus
from swarmbus._errors import InvalidMessageError, NotFoundError, SwarmbusError
from swarmbus._jetstream.replies import RawMessage
from swarmbus._messages import (
    FindingReportedMessage,
    HypothesisProposedMessage,
    Message,
    SessionCompletedMessage,
    SessionStartedMessage,
    TaskAssignedMessage,
    TaskCompletedMessage,
    TaskCreatedMessage,
    TaskFailedMessage,
)
from swarmbus._runtime import api
from swarmbus._runtime.intake import Intake
from swarmbus._runtime.timeouts import TaskTimeouts
from swarmbus._tasks import TaskQueue

log = logging.getLogger("swarmbus.runtime")

EVENT_SHAPE: Final = "agent.<domain>.<event>.<session>.<agent>"
_API: Final = "swarmbus.api.{}.<session>.<agent>"


class InboundEvents:
    """The ``agent.>`` watcher (see the module docstring)."""

    def __init__(
        self, bus: Bus, intake: Intake, *, agent: str, timeouts: TaskTimeouts | None = None
    ) -> None:
        self.bus = bus
        self.intake = intake
        self.agent = agent
        self.timeouts = timeouts
        self._queues: dict[str, TaskQueue] = {}

    async def close(self) -> None:
        """Close the task queues opened to look tasks up."""
        for queue in self._queues.values():
            await queue.close()
        self._queues.clear()

    async def handle(self, raw: RawMessage) -> bytes | None:
        """Check one event and act on it; never raises."""
        try:
            message = self.bus.accept(raw.subject, raw.data)
        except InvalidMessageError as exc:
            reason = exc.reason
            if exc.code == "wrong_subject":
                reason = f"{reason}; events go on {EVENT_SHAPE}"
            await self._reject(raw, exc.code, reason, message_id=None)
            return None
        try:
            problem = await self._act(message)
        except SwarmbusError as exc:
            problem = f"could not act on {message.type}: {exc}"
        if problem is not None:
            await self._reject(raw, "not_acted_on", problem, message_id=message.id)
        return None

    async def _reject(
        self, raw: RawMessage, code: str, reason: str, message_id: str | None
    ) -> None:
        await self.bus.reject(
            subject=raw.subject,
            data=raw.data,
            code=code,
            reason=reason,
            receiver=self.agent,
            dedupe_key=message_id,
            message_id=message_id,
        )

    async def _act(self, message: Message) -> str | None:
        """Act on ``message``; returns the reason it was not acted on, if so."""
        session = message.source.session
        if self.timeouts is not None and message.type.startswith("task."):
            self.timeouts.note(session)
        match message:
            case SessionStartedMessage():
                return await self._session_started(message)
            case SessionCompletedMessage():
                return await self._session_completed(message)
            case HypothesisProposedMessage():
                return await self._hypothesis(message)
            case FindingReportedMessage():
                return (
                    "finding.reported is not recorded: its seed shape has no confidence. "
                    "Publish a finding message (category, content, confidence) on "
                    f"agent.finding.reported.{session}.<agent>, or request "
                    + _API.format("finding.post")
                )
            case TaskCreatedMessage():
                return await self._task_event(message.task_created.task_id, session, "task.create")
            case TaskAssignedMessage():
                return await self._task_event(message.task_assigned.task_id, session, "task.claim")
            case TaskCompletedMessage():
                return await self._task_event(
                    message.task_completed.task_id, session, "task.complete"
                )
            case TaskFailedMessage():
                return await self._task_event(message.task_failed.task_id, session, "task.fail")
        return None

    async def _session_started(self, message: SessionStartedMessage) -> str | None:
        body = message.session_started
        board = await Blackboard.open(self.bus, message.source.session)
        try:
            await board.info()
            return None  # started already: swarmbus's own event, or a repeat
        except NotFoundError:
            pass
        context = dict(body.context)
        labels = context.get("labels")
        request = api.IncidentOpen(
            kind=str(context.get("kind", "")),
            title=str(context.get("title", "")),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
            context=context,
        )
        await self.intake.open(message.source.session, body.initiator, request)
        return None

    async def _session_completed(self, message: SessionCompletedMessage) -> str | None:
        session = message.source.session
        board = await Blackboard.open(self.bus, session)
        try:
            record = await board.info()
        except NotFoundError:
            return f"session {session} was never started: " + _API.format("incident.open")
        if record.status != "active":
            return None
        await self.intake.close(session, message.source.agent, message.session_completed.outcome)
        return None

    async def _hypothesis(self, message: HypothesisProposedMessage) -> str | None:
        body = message.hypothesis_proposed
        if body.agent_id != message.source.agent:
            return f"agent_id {body.agent_id} is not the publisher {message.source.agent}"
        board = await Blackboard.open(self.bus, message.source.session)
        try:
            await board.get_hypothesis(body.hypothesis_id)
            return None
        except NotFoundError:
            pass
        await board.propose_hypothesis(
            body.description, body.confidence, agent=body.agent_id, id=body.hypothesis_id
        )
        return None

    async def _task_event(self, task_id: str, session: str, operation: str) -> str | None:
        queue = self._queues.get(session)
        if queue is None:
            queue = self._queues[session] = TaskQueue(self.bus, session)
            await queue.open()
        try:
            await queue.get(task_id)
            return None  # a notification of a task the queue holds
        except NotFoundError:
            pass
        return (
            f"no task {task_id} in {session}: task events are notifications; "
            f"request {_API.format(operation)}"
        )
