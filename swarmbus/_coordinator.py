"""The coordinator (the seed's Pattern 2): decompose, assign by capability, aggregate.

A ``Coordinator`` receives a task, decomposes it into ``Subtask``s, assigns them to
workers by capability through the session's ``TaskQueue``, waits for and aggregates
their results, and makes the final decision. Workers are ordinary agents: a subtask
of capability ``c`` runs the agent's ``on_request(c)`` handler (``agent.request_handler``),
so one handler answers direct requests and queued subtasks alike.

Routing: a subtask for any agent with capability ``c`` is a task of type ``c``; one
for a named agent is a task of type ``route_type(c, agent)``, which only that agent
(in any number of processes) claims.

The coordinator knows no particular step. A behaviour built on it (the swarms in
``_swarm.py``) passes ``step_hooks``: per capability, a hook that runs after the
agent's handler and before the task completes (e.g. sharing an investigation's
findings on the blackboard).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._agent import Agent, RequestHandler
from swarmbus._messages import Message, Request, RequestMessage, envelope_for
from swarmbus._tasks import Task, TaskQueue, TaskSpec

#: Subtasks fail for good on the first error: a swarm reports it rather than retrying.
SUBTASK_ATTEMPTS: Final = 1
#: The agent id a coordinator acts as unless given one.
COORDINATOR_AGENT: Final = "swarmbus/coordinator"

StepHook = Callable[[Agent, Task, Mapping[str, Any]], Awaitable[None]]
"""Runs after ``agent``'s handler answered ``task`` with the result, before it completes."""


def route_type(capability: str, agent: str | None = None) -> str:
    """The task type that carries ``capability`` to ``agent`` (or to any agent)."""
    subjects.validate_name("capability", capability)
    if agent is None:
        return capability
    return f"{capability}-{subjects.safe_token(subjects.validate_agent_id(agent))}"


@dataclass(frozen=True)
class Subtask:
    """One piece of a decomposed task: a capability, parameters, optionally one agent."""

    capability: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    agent: str | None = None
    target: str = ""
    priority: int = 5
    timeout: float = 60.0


class Coordinator:
    """Decomposes work into subtasks, assigns them via the task queue, aggregates results.

    Args:
        queue: the session's open task queue.
        agent: the coordinator's agent id (it creates the tasks).
    """

    def __init__(self, queue: TaskQueue, *, agent: str = COORDINATOR_AGENT) -> None:
        self.queue = queue
        self.bus = queue.bus
        self.session = queue.session
        self.agent = subjects.validate_agent_id(agent)

    async def assign(self, subtasks: Sequence[Subtask]) -> list[Task]:
        """Create one task per subtask; workers with the capability claim them."""
        specs = [
            TaskSpec(
                type=route_type(s.capability, s.agent),
                priority=s.priority,
                target=s.target or s.agent or "",
                context=dict(s.parameters),
                timeout=s.timeout,
                max_attempts=SUBTASK_ATTEMPTS,
            )
            for s in subtasks
        ]
        return await self.queue.create_many(specs, agent=self.agent)

    async def gather(self, tasks: Sequence[Task], *, timeout: float) -> list[Task]:
        """Wait until every task completed or failed (or ``timeout``); their records.

        A task still open at the deadline is cancelled: it ends as failed, and a late
        completion by its worker is refused (the claim is lost).
        """
        changes = _TaskChanges({t.id for t in tasks})
        sub = await self.bus.subscribe(
            subjects.event_filter("task", "*", self.session), changes, receiver=self.agent
        )
        try:
            with anyio.move_on_after(timeout):
                while True:
                    changes.reset()
                    current = [await self.queue.get(t.id) for t in tasks]
                    if all(t.status in ("completed", "failed") for t in current):
                        return current
                    # Events wake us at once; the bounded wait covers a missed event.
                    with anyio.move_on_after(1.0):
                        await changes.wait()
        finally:
            await sub.unsubscribe()
        reason = f"not finished in time ({timeout:g}s)"
        return [await self.queue.cancel(t.id, by=self.agent, reason=reason) for t in tasks]

    async def run(self, subtasks: Sequence[Subtask], *, timeout: float) -> list[Task]:
        """Assign ``subtasks`` and gather their results, in the same order."""
        return await self.gather(await self.assign(subtasks), timeout=timeout)


class _TaskChanges:
    """A subscription handler that wakes the waiter on an event of one of ``ids``."""

    def __init__(self, ids: set[str]) -> None:
        self.ids = ids
        self._changed = anyio.Event()

    async def __call__(self, message: Message) -> None:
        if getattr(message.body, "task_id", None) in self.ids:
            self._changed.set()

    def reset(self) -> None:
        """Forget earlier events: ``wait`` returns on the next one."""
        self._changed = anyio.Event()

    async def wait(self) -> None:
        """Until an event of one of the tasks arrived since ``reset``."""
        await self._changed.wait()


@contextlib.asynccontextmanager
async def serve_subtasks(
    queue: TaskQueue,
    agents: Iterable[Agent],
    *,
    step_hooks: Mapping[str, StepHook] | None = None,
    drain_timeout: float = 30.0,
) -> AsyncIterator[None]:
    """Let each agent claim the subtasks its capabilities (and its id) route to it.

    A claimed task runs the agent's request handler for the capability with a request
    built from the task (from its creator, parameters = the task's context); then the
    capability's hook in ``step_hooks``, if any; then the task completes with the
    handler's result. On exit no new subtask is claimed and running ones get
    ``drain_timeout`` seconds to finish; then they are cancelled (a hung handler must
    not hold the caller).
    """
    stop = anyio.Event()
    hooks = dict(step_hooks or {})
    async with contextlib.AsyncExitStack() as stack:
        workers = [w for w in (_Worker(agent, hooks) for agent in agents) if w.handlers]
        # A queue object claims one batch at a time: one per agent, so agents claim in
        # parallel. The queues are entered first so they close after the workers stop.
        queues = [
            await stack.enter_async_context(TaskQueue(queue.bus, queue.session)) for _ in workers
        ]
        tg = await stack.enter_async_context(anyio.create_task_group())
        for own, worker in zip(queues, workers, strict=True):
            tg.start_soon(_work, own, worker, stop)
        try:
            yield
        finally:
            stop.set()
            tg.cancel_scope.deadline = anyio.current_time() + drain_timeout


class _Worker:
    """Runs an agent's request handlers on the subtasks routed to it."""

    def __init__(self, agent: Agent, hooks: Mapping[str, StepHook]) -> None:
        self.agent = agent
        self.hooks = hooks
        self.handlers: dict[str, RequestHandler] = {}
        for capability in sorted(agent.capabilities):
            handler = agent.request_handler(capability)
            if handler is not None:
                self.handlers[capability] = handler
        self.types = {route_type(c): c for c in self.handlers}
        self.types |= {route_type(c, agent.id): c for c in self.handlers}

    async def __call__(self, task: Task) -> Mapping[str, Any]:
        capability = self.types[task.type]
        request = envelope_for(
            Request(
                to=self.agent.id, capability=capability, parameters=dict(task.parameters.context)
            ),
            agent=task.created_by or COORDINATOR_AGENT,
            session=task.session,
        )
        assert isinstance(request, RequestMessage)
        result: dict[str, Any] = msgspec.to_builtins(dict(await self.handlers[capability](request)))
        hook = self.hooks.get(capability)
        if hook is not None:
            await hook(self.agent, task, result)
        return result


async def _work(queue: TaskQueue, worker: _Worker, stop: anyio.Event) -> None:
    await queue.work(worker, agent=worker.agent.id, types=sorted(worker.types), stop=stop)
