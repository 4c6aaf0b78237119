"""Swarm behaviours: parallel investigation and progressive refinement, run from a spec.

The specs and results are in ``_spec.py``; a parallel investigation runs on the
generic coordinator (``_coordinator.py``) and registers its one special step through
the coordinator's step hook: with ``share_findings``, an ``investigate`` subtask's
findings go on the blackboard as soon as its agent is done, for the others to read.
Shared evidence queries are the query ledger's (``_query_ledger.py``). Agents take
part through capability handlers (``Agent.on_request``), so the same handler answers
a direct request and a swarm step (capabilities and parameters: see ``_spec.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from swarmbus import _subjects as subjects
from swarmbus._agent import Agent, serving
from swarmbus._blackboard import Blackboard, FindingRecord, HypothesisRecord
from swarmbus._bus import Bus
from swarmbus._confidence import Opinion, aggregate_confidence
from swarmbus._coordinator import (
    COORDINATOR_AGENT,
    Coordinator,
    Subtask,
    serve_subtasks,
)
from swarmbus._errors import (
    ConflictError,
    NoResponderError,
    RequestTimeoutError,
    SpecError,
    SwarmbusError,
)
from swarmbus._messages import Finding
from swarmbus._spec import (
    INVESTIGATE,
    REFINE,
    SYNTHESIZE,
    ParallelInvestigation,
    ProgressiveRefinement,
    StepResult,
    SwarmResult,
)
from swarmbus._tasks import Task, TaskQueue

# --- agent modules ----------------------------------------------------------------------------


def load_agents(ref: str) -> list[Agent]:
    """Agents from a module (``pkg.mod``) or file (``examples/x.py``) defining ``agents()``.

    Raises:
        SpecError: the module cannot be loaded or defines no ``agents()``.
    """
    try:
        if ref.endswith(".py") or Path(ref).is_file():
            path = Path(ref).resolve()
            name = f"swarmbus_agents_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {ref}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(ref)
    except (ImportError, OSError, SyntaxError) as exc:
        raise SpecError(ref, [("--agents", f"cannot import: {exc}")]) from exc
    except Exception as exc:  # the module's own code failed: a bad --agents
        problem = f"cannot import: {type(exc).__name__}: {exc}"
        raise SpecError(ref, [("--agents", problem)]) from exc
    factory = getattr(module, "agents", None)
    if not callable(factory):
        raise SpecError(ref, [("--agents", "the module must define agents() -> list[Agent]")])
    try:
        agents = list(factory())
    except Exception as exc:  # as above
        problem = f"agents() raised {type(exc).__name__}: {exc}"
        raise SpecError(ref, [("--agents", problem)]) from exc
    if not all(isinstance(a, Agent) for a in agents):
        raise SpecError(ref, [("--agents", "agents() must return swarmbus.Agent objects")])
    return agents


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
    hooks = {INVESTIGATE: _ShareFindings(board)} if board is not None else {}
    async with serve_subtasks(queue, agents, step_hooks=hooks, drain_timeout=drain_timeout):
        yield


class _ShareFindings:
    """The ``investigate`` step hook: findings on the board as soon as the agent is done."""

    def __init__(self, board: Blackboard) -> None:
        self.board = board

    async def __call__(self, agent: Agent, task: Task, result: Mapping[str, Any]) -> None:
        if not task.parameters.context.get("share_findings"):
            return
        for i, finding in enumerate(_findings_of(result, agent.id)):
            await self.board.append_finding(finding, agent=agent.id, id=finding_id(task, i))


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
    try:
        await board.start(agent, {"task": spec.task, "swarm": spec.type})
    except ConflictError:
        detail = (
            f"session {session} was already run: use a new session id (or none for a fresh one)"
        )
        raise ConflictError(f"{session}.session", 0, detail) from None
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


# --- sessions and requests ----------------------------------------------------------------


def new_session(prefix: str = "swarm") -> str:
    """A fresh session id (``<prefix>-<12 hex digits>``) for one run."""
    return subjects.validate_session_id(f"{prefix}-{uuid.uuid4().hex[:12]}")


async def ask(
    bus: Bus,
    capability: str,
    parameters: Mapping[str, Any],
    *,
    to: str,
    session: str,
    agent: str = COORDINATOR_AGENT,
    timeout: float,
) -> dict[str, Any]:
    """Ask agent ``to`` for ``capability``; returns its result or raises SwarmbusError."""
    try:
        response = await bus.request(
            capability, parameters, agent=agent, session=session, to=to, timeout=timeout
        )
    except NoResponderError:
        raise SwarmbusError(f"no agent {to} answers {capability!r}") from None
    except RequestTimeoutError:
        raise SwarmbusError(f"{to} did not answer {capability!r} within {timeout:g}s") from None
    result = dict(response.response.result)
    if response.response.status != "success":
        raise SwarmbusError(f"{to} failed: {result.get('error', 'no reason given')}")
    return result


# --- progressive refinement -------------------------------------------------------------------


async def run_progressive(
    bus: Bus,
    spec: ProgressiveRefinement,
    *,
    session: str,
    agent: str = COORDINATOR_AGENT,
) -> SwarmResult:
    """Run the stages in order, each given its input; the first failure stops the pipeline.

    Stage ``n`` is a ``refine`` request to the stage's agent with
    ``{stage, task, output, inputs: {<input>: <that stage's output>}}``; its result must
    hold the ``output`` key. Later stages are reported as ``skipped``.
    """
    outputs: dict[str, Any] = {}
    steps: list[StepResult] = []
    error: str | None = None
    for stage in spec.stages:
        if error is not None:
            steps.append(StepResult(stage.agent, stage.task, "skipped", stage.stage, stage.output))
            continue
        inputs = {stage.input: outputs[stage.input]} if stage.input else {}
        parameters = {
            "stage": stage.stage,
            "task": stage.task,
            "output": stage.output,
            "inputs": inputs,
        }
        try:
            result = await ask(
                bus,
                REFINE,
                parameters,
                to=stage.agent,
                session=session,
                agent=agent,
                timeout=stage.timeout,
            )
            if stage.output not in result:
                raise SwarmbusError(f"{stage.agent} returned no {stage.output!r}")
        except SwarmbusError as exc:
            error = f"stage {stage.stage} failed: {exc}"
            steps.append(
                StepResult(stage.agent, stage.task, "failed", stage.stage, stage.output, str(exc))
            )
            continue
        outputs[stage.output] = result[stage.output]
        steps.append(StepResult(stage.agent, stage.task, "completed", stage.stage, stage.output))
    return SwarmResult(
        swarm=spec.type,
        session=session,
        status="failed" if error else "completed",
        outputs=outputs,
        steps=tuple(steps),
        error=error,
    )


def expertise_of(agents: Iterable[Agent]) -> dict[str, dict[str, float]]:
    """``agent id -> expertise`` as confidence aggregation wants it."""
    return {a.id: dict(a.expertise) for a in agents}


async def run_swarm(
    bus: Bus,
    spec: ParallelInvestigation | ProgressiveRefinement,
    agents: Iterable[Agent] = (),
    *,
    session: str | None = None,
) -> SwarmResult:
    """Serve ``agents`` on ``bus`` and run ``spec`` in a fresh (or the given) session.

    Agents the spec names but ``agents`` lacks must claim their subtasks from another
    process (``async with serve_workers(queue, [agent])``, ``queue`` a ``TaskQueue`` of
    the same session).
    """
    session = subjects.validate_session_id(session) if session else new_session()
    local = list(agents)
    async with serving(bus, local):
        if isinstance(spec, ProgressiveRefinement):
            return await run_progressive(bus, spec, session=session)
        return await run_parallel(bus, spec, local, session=session)
