"""The coordinator (the seed's Pattern 2) and parallel investigation on top of it.

A ``Coordinator`` receives a task, decomposes it into ``Subtask``s, assigns them to
workers by capability through the session's ``TaskQueue``, waits for and aggregates
their results, and makes the final decision. Workers are ordinary agents: a subtask
of capability ``c`` runs the agent's ``on_request(c)`` handler, so one handler answers
direct requests and queued subtasks alike.

Routing: a subtask for any agent with capability ``c`` is a task of type ``c``; one
for a named agent is a task of type ``route_type(c, agent)``, which only that agent
(in any number of processes) claims.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import msgspec

from swarmbus import _subjects as subjects
from swarmbus._agent import Agent
from swarmbus._blackboard import Blackboard, FindingRecord, HypothesisRecord
from swarmbus._bus import Bus
from swarmbus._confidence import Opinion, aggregate_confidence
from swarmbus._errors import SwarmbusError
from swarmbus._messages import (
    Finding,
    Message,
    Request,
    RequestMessage,
    envelope_for,
)
from swarmbus._swarm import (
    COORDINATOR_AGENT,
    INVESTIGATE,
    SYNTHESIZE,
    ParallelInvestigation,
    StepResult,
    SwarmResult,
    expertise_of,
)
from swarmbus._tasks import Task, TaskQueue, TaskSpec

#: Subtasks fail for good on the first error: a swarm reports it rather than retrying.
SUBTASK_ATTEMPTS: Final = 1


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

        A task still open at the deadline is returned as it is (not terminal).
        """
        ids = {t.id for t in tasks}
        changed = anyio.Event()

        async def on_event(message: Message) -> None:
            nonlocal changed
            body = message.body
            if getattr(body, "task_id", None) in ids:
                changed.set()

        sub = await self.bus.subscribe(
            subjects.event_filter("task", "*", self.session), on_event, receiver=self.agent
        )
        try:
            with anyio.move_on_after(timeout):
                while True:
                    changed = anyio.Event()
                    current = [await self.queue.get(t.id) for t in tasks]
                    if all(t.status in ("completed", "failed") for t in current):
                        return current
                    # Events wake us at once; the bounded wait covers a missed event.
                    with anyio.move_on_after(1.0):
                        await changed.wait()
        finally:
            await sub.unsubscribe()
        return [await self.queue.get(t.id) for t in tasks]

    async def run(self, subtasks: Sequence[Subtask], *, timeout: float) -> list[Task]:
        """Assign ``subtasks`` and gather their results, in the same order."""
        return await self.gather(await self.assign(subtasks), timeout=timeout)


@contextlib.asynccontextmanager
async def serve_workers(
    queue: TaskQueue,
    agents: Iterable[Agent],
    *,
    board: Blackboard | None = None,
    drain_timeout: float = 30.0,
) -> AsyncIterator[None]:
    """Let each agent claim the subtasks its capabilities (and its id) route to it.

    A claimed task runs the agent's request handler for the capability with a request
    built from the task (from its creator, parameters = the task's context). With a
    ``board``, the findings of an ``investigate`` subtask that asks to
    ``share_findings`` are appended to it, as the agent, before the task completes.
    On exit no new subtask is claimed and running ones get ``drain_timeout`` seconds
    to finish; then they are cancelled (a hung handler must not hold the caller).
    """
    stop = anyio.Event()
    async with contextlib.AsyncExitStack() as stack:
        # A queue object claims one batch at a time: one per agent, so agents claim in
        # parallel. The queues are entered first so they close after the workers stop.
        workers = [
            (await stack.enter_async_context(TaskQueue(queue.bus, queue.session)), agent)
            for agent in agents
            if agent._requests
        ]
        tg = await stack.enter_async_context(anyio.create_task_group())
        for own, agent in workers:
            tg.start_soon(_work, own, _Worker(agent, board), stop)
        try:
            yield
        finally:
            stop.set()
            tg.cancel_scope.deadline = anyio.current_time() + drain_timeout


class _Worker:
    def __init__(self, agent: Agent, board: Blackboard | None) -> None:
        self.agent = agent
        self.board = board
        self.types = {route_type(c): c for c in agent._requests}
        self.types |= {route_type(c, agent.id): c for c in agent._requests}

    async def __call__(self, task: Task) -> Mapping[str, Any]:
        capability = self.types[task.type]
        parameters = dict(task.parameters.context)
        request = envelope_for(
            Request(to=self.agent.id, capability=capability, parameters=parameters),
            agent=task.created_by or COORDINATOR_AGENT,
            session=task.session,
        )
        assert isinstance(request, RequestMessage)
        result: dict[str, Any] = msgspec.to_builtins(
            dict(await self.agent._requests[capability](request))
        )
        if (
            self.board is not None
            and capability == INVESTIGATE
            and parameters.get("share_findings")
        ):
            for i, finding in enumerate(_findings_of(result, self.agent.id)):
                await self.board.append_finding(
                    finding, agent=self.agent.id, id=finding_id(task, i)
                )
        return result


async def _work(queue: TaskQueue, worker: _Worker, stop: anyio.Event) -> None:
    await queue.work(worker, agent=worker.agent.id, types=sorted(worker.types), stop=stop)


# --- parallel investigation --------------------------------------------------------------


def _step(task: Task, agent: str, what: str) -> StepResult:
    if task.status == "completed":
        return StepResult(agent, what, "completed")
    error = task.error or f"not finished in time (status {task.status})"
    return StepResult(agent, what, "failed", error=error)


def finding_id(task: Task, index: int) -> str:
    """The board id of a subtask's ``index``-th finding (create-once: stored once)."""
    return f"{task.id}-{index}"


def _findings_of(result: Mapping[str, Any] | None, agent: str) -> list[Finding]:
    try:
        return msgspec.convert((result or {}).get("findings", []), list[Finding])
    except msgspec.ValidationError as exc:
        raise SwarmbusError(f"{agent} returned bad findings: {exc}") from None


async def investigate(
    coordinator: Coordinator,
    board: Blackboard,
    spec: ParallelInvestigation,
) -> tuple[list[StepResult], list[FindingRecord]]:
    """Every spec agent investigates its focus at once; findings go on the board.

    With ``share_findings`` each agent's findings are on the blackboard (as that
    agent) as soon as it is done, for the others to read; otherwise only the
    coordinator records them, after everyone finished.
    """
    coordination = spec.coordination
    subtasks = [
        Subtask(
            INVESTIGATE,
            {
                "task": spec.task,
                "focus": a.focus,
                "avoid_duplicate_queries": coordination.avoid_duplicate_queries,
                "share_findings": coordination.share_findings,
            },
            agent=a.agent,
            timeout=coordination.timeout,
        )
        for a in spec.agents
    ]
    tasks = await coordinator.run(subtasks, timeout=coordination.timeout)
    shared = {f.id: f for f in await board.findings()}
    steps: list[StepResult] = []
    records: list[FindingRecord] = []
    for assignment, task in zip(spec.agents, tasks, strict=True):
        step = _step(task, assignment.agent, assignment.focus or spec.task)
        if task.status == "completed":
            try:
                findings = _findings_of(task.result, assignment.agent)
            except SwarmbusError as exc:
                step = StepResult(assignment.agent, step.task, "failed", error=str(exc))
                findings = []
            for i, finding in enumerate(findings):
                record = shared.get(finding_id(task, i))
                if record is None:
                    record = await board.append_finding(
                        finding, agent=assignment.agent, id=finding_id(task, i)
                    )
                records.append(record)
        steps.append(step)
    return steps, records


async def form_hypotheses(
    board: Blackboard,
    findings: Iterable[FindingRecord],
    expertise: Mapping[str, Mapping[str, float]],
    *,
    agent: str = COORDINATOR_AGENT,
) -> list[HypothesisRecord]:
    """One hypothesis per distinct hypothesis finding, confidence pooled over its backers.

    Pooling is ``aggregate_confidence`` (the seed's weighted average) with each
    agent's declared expertise and the evidence behind its finding; ``agent`` (the
    coordinator) proposes the pooled hypotheses on the board.
    """
    groups: dict[str, list[FindingRecord]] = {}
    for finding in findings:
        if finding.category == "hypothesis":
            groups.setdefault(" ".join(finding.content.split()).lower(), []).append(finding)
    hypotheses = []
    for backers in groups.values():
        opinions = [
            Opinion(
                agent=f.agent,
                confidence=f.confidence,
                evidence=len(f.evidence),
                category=f.category,
            )
            for f in backers
        ]
        confidence = round(aggregate_confidence(opinions, expertise), 3)
        hypotheses.append(
            await board.propose_hypothesis(backers[0].content, confidence, agent=agent)
        )
    hypotheses.sort(key=lambda h: h.confidence, reverse=True)
    return hypotheses


def _brief(
    findings: Iterable[FindingRecord], hypotheses: Iterable[HypothesisRecord]
) -> dict[str, Any]:
    return {
        "findings": [
            {
                "agent": f.agent,
                "category": f.category,
                "content": f.content,
                "confidence": f.confidence,
            }
            for f in findings
        ],
        "hypotheses": [
            {"description": h.description, "confidence": h.confidence, "agent": h.agent}
            for h in hypotheses
        ],
    }


async def synthesize(
    coordinator: Coordinator,
    spec: ParallelInvestigation,
    findings: Sequence[FindingRecord],
    hypotheses: Sequence[HypothesisRecord],
    **context: Any,
) -> tuple[StepResult, dict[str, Any]]:
    """The synthesis agent combines findings and hypotheses into a decision."""
    assert spec.synthesis is not None
    synthesis = spec.synthesis
    parameters = {
        "task": spec.task,
        "action": synthesis.action,
        **_brief(findings, hypotheses),
        **context,
    }
    (task,) = await coordinator.run(
        [Subtask(SYNTHESIZE, parameters, agent=synthesis.agent, timeout=spec.coordination.timeout)],
        timeout=spec.coordination.timeout,
    )
    return _step(task, synthesis.agent, synthesis.action), dict(task.result or {})


async def run_parallel(
    bus: Bus,
    spec: ParallelInvestigation,
    agents: Sequence[Agent],
    *,
    session: str,
    agent: str = COORDINATOR_AGENT,
) -> SwarmResult:
    """Run a parallel investigation end to end; agents are already served on ``bus``.

    Session started on the blackboard -> every agent investigates -> findings on the
    board -> hypotheses with pooled confidence -> synthesis -> decision recorded and
    the session completed with it.
    """
    board = await Blackboard.open(bus, session)
    await board.start(agent, {"task": spec.task, "swarm": spec.type})
    # Every step is reported by the end of the block: a subtask still running past the
    # coordination timeout is not waited for.
    async with (
        TaskQueue(bus, session) as queue,
        serve_workers(queue, agents, board=board, drain_timeout=0),
    ):
        coordinator = Coordinator(queue, agent=agent)
        steps, findings = await investigate(coordinator, board, spec)
        hypotheses = await form_hypotheses(board, findings, expertise_of(agents), agent=agent)
        decision: dict[str, Any] = {}
        if spec.synthesis is not None:
            step, decision = await synthesize(coordinator, spec, findings, hypotheses)
            steps.append(step)
            if step.status == "completed":
                await board.record_action(
                    str(decision.get("decision", "decision")),
                    agent=spec.synthesis.agent,
                    status="proposed",
                    type="escalate",
                    target=str(decision.get("target", "")),
                    parameters=decision,
                )
    failed = [s for s in steps if s.status != "completed"]
    error = "; ".join(f"{s.agent}: {s.error}" for s in failed) or None
    await board.complete(
        {"decision": decision, "error": error} if error else {"decision": decision}, agent=agent
    )
    return SwarmResult(
        swarm=spec.type,
        session=session,
        status="failed" if failed else "completed",
        outputs={**_brief(findings, hypotheses), "decision": decision},
        steps=tuple(steps),
        error=error,
    )
