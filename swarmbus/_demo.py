"""The incident demo: INC-1234 end to end on one server, with a live timeline.

ops/architect coordinates (the seed's Pattern 2): ops/deploy-validator,
security/incident-response-lead and ops/rollback-advisor investigate in parallel and
post findings with evidence on the blackboard; hypotheses get pooled confidence;
ops/rollback-advisor proposes a rollback, the agents vote, the consensus service
decides; ops/architect synthesises and the decision is recorded on the blackboard.

The agents are deterministic rules over a canned incident (no LLM, no network) and
use only the public ``swarmbus`` API, like a user's agents. ``agents()`` is also the
default ``--agents`` module of ``swarmbus run``.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import anyio
import yaml
from opentelemetry import trace

import swarmbus
from swarmbus import (
    Agent,
    Evidence,
    Finding,
    HypothesisProposedMessage,
    Message,
    ProposalMessage,
    RequestMessage,
)
from swarmbus import _subjects as subjects
from swarmbus._agent import serving
from swarmbus._blackboard import Blackboard, Snapshot
from swarmbus._bus import Bus, connect
from swarmbus._consensus import ConsensusService
from swarmbus._coordinator import Coordinator
from swarmbus._messages import Decision, DecisionMessage
from swarmbus._spec import parse_spec
from swarmbus._swarm import (
    expertise_of,
    form_hypotheses,
    investigate,
    new_session,
    serve_workers,
    synthesize,
)
from swarmbus._tasks import TaskQueue
from swarmbus._telemetry import current_trace_id, tracing_enabled

INCIDENT: Final = "INC-1234"
COORDINATOR: Final = "ops/architect"
VALIDATOR: Final = "ops/deploy-validator"
RESPONDER: Final = "security/incident-response-lead"
ADVISOR: Final = "ops/rollback-advisor"
VOTERS: Final = (VALIDATOR, RESPONDER, ADVISOR)

#: The seed's parallel investigation, verbatim (also examples/parallel_investigation.yaml).
SPEC_YAML: Final = """
swarm:
  type: parallel_investigation
  task: "Investigate incident INC-1234"
  agents:
    - ops/deploy-validator:
        focus: "Check recent deployments and changes"
    - security/incident-response-lead:
        focus: "Analyze error patterns and logs"
    - ops/rollback-advisor:
        focus: "Assess rollback feasibility"
  coordination:
    share_findings: true
    avoid_duplicate_queries: true
    timeout: 10m
  synthesis:
    agent: ops/architect
    action: "Combine findings and recommend action"
"""

#: What the incident's systems answer, by (source, query).
SYSTEMS: Final[dict[tuple[str, str], str]] = {
    ("deploy-log", "deployments --service checkout --since 1h"): "v1.2.3 at 10:15 UTC",
    ("prometheus", "rate(errors[5m])"): "0.05 (baseline 0.01)",
    ("loki", '{app="checkout"} |= "error"'): "312x 'connection pool exhausted' since 10:16",
    ("argo", "history checkout"): "v1.2.2 healthy for 14 days; rollback tested",
}
DEPLOYS: Final = ("deploy-log", "deployments --service checkout --since 1h")
ERRORS: Final = ("prometheus", "rate(errors[5m])")
LOGS: Final = ("loki", '{app="checkout"} |= "error"')
HISTORY: Final = ("argo", "history checkout")

#: (vote, confidence, reason) of each agent on a rollback: the seed's votes.
VOTES: Final[dict[str, tuple[Literal["yes", "no", "abstain"], float | None, str]]] = {
    VALIDATOR: ("yes", 0.9, "Error rate 5x baseline"),
    ADVISOR: ("yes", 0.85, "Matches previous incident pattern"),
    RESPONDER: ("abstain", None, "No security implications detected"),
}


def rollback_proposal_id(session: str) -> str:
    """The id of the session's rollback proposal (one per session)."""
    return f"rollback-{session}"


# --- the agents (public API only) -----------------------------------------------------------


async def _evidence(agent: Agent, request: RequestMessage, query: tuple[str, str]) -> Evidence:
    """Run an evidence query, at most once per session across all agents."""
    ledger = await swarmbus.QueryLedger.open(
        agent.bus,
        request.source.session,
        agent=agent.id,
        enabled=bool(request.request.parameters.get("avoid_duplicate_queries", True)),
    )
    source, text = query

    async def execute() -> str:
        return SYSTEMS[query]

    return (await ledger.run(source, text, execute)).evidence


def _finding(
    category: Literal["observation", "hypothesis"],
    content: str,
    confidence: float,
    *evidence: Evidence,
) -> Finding:
    return Finding(
        category=category, content=content, confidence=confidence, evidence=list(evidence)
    )


def agents(*, consensus: bool = False, via_service: bool = False) -> list[Agent]:
    """The incident's agents; with ``consensus`` they also propose and vote on a rollback
    (``via_service``: as events that the consensus service records)."""
    validator = Agent(VALIDATOR, expertise={"observation": 0.9, "hypothesis": 0.8})
    responder = Agent(RESPONDER, expertise={"observation": 0.8, "hypothesis": 0.6})
    advisor = Agent(ADVISOR, expertise={"observation": 0.7, "hypothesis": 0.7})
    architect = Agent(COORDINATOR, expertise={"conclusion": 0.9})

    @validator.on_request("investigate")
    async def validator_investigates(request: RequestMessage) -> dict[str, Any]:
        deploys = await _evidence(validator, request, DEPLOYS)
        errors = await _evidence(validator, request, ERRORS)
        return {
            "findings": [
                _finding("observation", "deployment v1.2.3 at 10:15 UTC", 0.95, deploys),
                _finding("observation", "error rate 5x baseline since 10:16 UTC", 0.9, errors),
                _finding(
                    "hypothesis", "deployment v1.2.3 caused the error spike", 0.8, deploys, errors
                ),
            ]
        }

    @responder.on_request("investigate")
    async def responder_investigates(request: RequestMessage) -> dict[str, Any]:
        errors = await _evidence(responder, request, ERRORS)
        logs = await _evidence(responder, request, LOGS)
        return {
            "findings": [
                _finding("observation", "error rate spike correlates with deploy", 0.85, errors),
                _finding("observation", "no sign of intrusion in the error logs", 0.8, logs),
                _finding("hypothesis", "database connection pool exhaustion", 0.7, logs),
            ]
        }

    @advisor.on_request("investigate")
    async def advisor_investigates(request: RequestMessage) -> dict[str, Any]:
        deploys = await _evidence(advisor, request, DEPLOYS)
        history = await _evidence(advisor, request, HISTORY)
        return {
            "findings": [
                _finding("observation", "v1.2.2 is a safe rollback target", 0.9, history),
                _finding("hypothesis", "deployment v1.2.3 caused the error spike", 0.85, deploys),
                _finding("hypothesis", "memory leak in new feature", 0.3),
            ]
        }

    @architect.on_request("synthesize")
    async def architect_synthesizes(request: RequestMessage) -> dict[str, Any]:
        parameters = request.request.parameters
        decided = parameters.get("decision") or {}
        best = max(parameters.get("hypotheses", []), key=lambda h: h["confidence"], default=None)
        if decided.get("outcome") == "approved" or (
            not decided and best and "deployment" in best["description"]
        ):
            cause = best["description"] if best else "the deployment"
            return {
                "decision": "rollback",
                "target": "checkout",
                "from": "v1.2.3",
                "to": "v1.2.2",
                "reason": f"{cause}; the swarm agreed" if decided else cause,
            }
        return {"decision": "keep investigating", "reason": "no agreed remedy"}

    @validator.on_request("refine")
    async def validator_refines(request: RequestMessage) -> dict[str, Any]:
        deploys = await _evidence(validator, request, DEPLOYS)
        return {"changes_list": [{"service": "checkout", "change": deploys.result}]}

    @responder.on_request("refine")
    async def responder_refines(request: RequestMessage) -> dict[str, Any]:
        changes = request.request.parameters["inputs"]["changes_list"]
        errors = await _evidence(responder, request, ERRORS)
        return {
            "correlation_report": {
                "suspect": changes[0]["change"],
                "error_rate": errors.result,
                "correlated": True,
            }
        }

    @advisor.on_request("refine")
    async def advisor_refines(request: RequestMessage) -> dict[str, Any]:
        report = request.request.parameters["inputs"]["correlation_report"]
        action = "rollback" if report["correlated"] else "monitor"
        return {"recommendation": {"action": action, "from": report["suspect"], "to": "v1.2.2"}}

    if consensus:
        _consensus_behaviour(validator, responder, advisor, via_service=via_service)
    return [validator, responder, advisor, architect]


def _consensus_behaviour(
    validator: Agent, responder: Agent, advisor: Agent, *, via_service: bool
) -> None:
    """The advisor proposes a rollback on a strong deployment hypothesis; everyone votes."""

    async def vote(agent: Agent, proposal_id: str) -> None:
        choice, confidence, reason = VOTES[agent.id]
        client = await swarmbus.Consensus.open(agent.bus, via_service=via_service)
        with contextlib.suppress(swarmbus.AlreadyVotedError):
            await client.vote(
                swarmbus.Vote(
                    proposal_id=proposal_id, vote=choice, confidence=confidence, reason=reason
                ),
                agent=agent.id,
            )

    @advisor.on_event(
        "hypothesis", "proposed", types=(HypothesisProposedMessage,), ignore_own=False
    )
    async def propose_rollback(message: HypothesisProposedMessage) -> None:
        hypothesis = message.hypothesis_proposed
        if "deployment" not in hypothesis.description or hypothesis.confidence < 0.7:
            return
        session = message.source.session
        proposal_id = rollback_proposal_id(session)
        board = await swarmbus.Blackboard.open(advisor.bus, session)
        client = await swarmbus.Consensus.open(advisor.bus, via_service=via_service)
        with contextlib.suppress(swarmbus.ConflictError):  # a redelivered event
            await board.record_action(
                "recommended rollback",
                agent=advisor.id,
                status="awaiting_approval",
                target="checkout",
                parameters={"from": "v1.2.3", "to": "v1.2.2"},
                id=proposal_id,
            )
            await client.propose(
                swarmbus.Proposal(
                    proposal_id=proposal_id,
                    action="rollback",
                    target="checkout",
                    parameters={"version": "v1.2.3"},
                    quorum="threshold",
                    threshold=0.7,
                    timeout=30,
                    voters=list(VOTERS),
                ),
                agent=advisor.id,
                session=session,
            )
        await vote(advisor, proposal_id)

    for voter in (validator, responder):

        @voter.on_action("proposed")
        async def on_proposal(message: Message, voter: Agent = voter) -> None:
            if isinstance(message, ProposalMessage) and voter.id in message.proposal.voters:
                await vote(voter, message.proposal.proposal_id)


# --- the timeline -------------------------------------------------------------------------


def _describe(message: Message) -> str:
    """One line saying what an event means."""
    body: Any = message.body
    match message.type:
        case "session.started":
            return f"started the session: {body.context.get('task', '')}"
        case "session.completed":
            return f"closed the session: {body.outcome.get('decision', body.outcome)}"
        case "task.created":
            target = body.parameters.get("target", "")
            capability = body.type.removesuffix(f"-{subjects.safe_token(target)}")
            return f"assigned '{capability}' to {target or 'any agent'}"
        case "task.assigned":
            return "claimed its task"
        case "task.completed":
            return "finished its task"
        case "task.failed":
            return f"FAILED its task: {body.error}"
        case "finding":
            evidence = "; ".join(f"{e.source}: {e.result}" for e in body.evidence)
            where = f"  [{evidence}]" if evidence else ""
            return f"reports {body.category} ({body.confidence:.2f}): {body.content}{where}"
        case "hypothesis.proposed":
            return f"forms hypothesis, pooled confidence {body.confidence:.2f}: {body.description}"
        case "action":
            status = "awaiting approval" if body.requires_approval else "recorded"
            details = ", ".join(f"{k}={v}" for k, v in body.parameters.items())
            return f"records action on {body.target or '-'} ({status}): {details}"
        case "proposal":
            rule = f"{body.quorum} {body.threshold}" if body.threshold else body.quorum
            return f"proposes '{body.action}' of {body.target} ({rule}, voters: {len(body.voters)})"
        case "vote":
            confidence = f" {body.confidence:.2f}" if body.confidence is not None else ""
            return f"votes {body.vote}{confidence}: {body.reason}"
        case "decision":
            return (
                f"DECISION: {body.decision} ({body.outcome}; for {body.votes_for}, "
                f"against {body.votes_against}, abstentions {body.abstentions})"
            )
        case "action.completed":
            return f"action {body.status}"
        case "error.occurred":
            return f"ERROR {body.code}: {body.reason}"
    return message.type


@contextlib.asynccontextmanager
async def timeline(bus: Bus, session: str, echo: Callable[[str], None]) -> AsyncIterator[None]:
    """Print every event of ``session`` as it happens: time, agent, what it did."""
    start = time.monotonic()

    async def show(message: Message) -> None:
        elapsed = time.monotonic() - start
        echo(f"  +{elapsed:6.3f}s  {message.source.agent:<32} {_describe(message)}")

    sub = await bus.subscribe(subjects.session_filter(session), show, receiver="swarmbus/demo")
    try:
        yield
    finally:
        await sub.unsubscribe()


# --- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IncidentResult:
    """What the demo decided and left on the blackboard."""

    session: str
    decision: Decision
    synthesis: dict[str, Any]
    snapshot: Snapshot
    trace_id: str | None


def board_view(snapshot: Snapshot) -> dict[str, Any]:
    """The blackboard in the seed's shape: context, findings, hypotheses, actions_taken."""
    started = snapshot.session.started.isoformat() if snapshot.session else None
    context = dict(snapshot.context.data) if snapshot.context else {}
    return {
        "context": {**context, "started": started},
        "findings": [
            {"agent": f.agent, "finding": f.content, "confidence": f.confidence}
            for f in snapshot.findings
        ],
        "hypotheses": [
            f"{h.description} (confidence: {h.confidence:.2f})"
            for h in sorted(snapshot.hypotheses, key=lambda h: -h.confidence)
        ],
        "actions_taken": [
            {"agent": a.agent, "action": a.action, "status": a.status}
            for a in snapshot.actions_taken
        ],
    }


@contextlib.contextmanager
def _root_span(name: str) -> Iterator[None]:
    if not tracing_enabled():
        yield
        return
    with trace.get_tracer("swarmbus").start_as_current_span(name):
        yield


class _FirstDecision:
    """A subscription handler that keeps the first decision of the session."""

    def __init__(self) -> None:
        self.decision: Decision | None = None
        self._decided = anyio.Event()

    async def __call__(self, message: Message) -> None:
        if isinstance(message, DecisionMessage) and self.decision is None:
            self.decision = message.decision
            self._decided.set()

    async def wait(self) -> Decision:
        """The first decision, once there is one."""
        await self._decided.wait()
        assert self.decision is not None
        return self.decision


async def incident(
    bus: Bus,
    *,
    session: str | None = None,
    echo: Callable[[str], None] = print,
    timeout: float = 30.0,
    via_service: bool = False,
) -> IncidentResult:
    """Run incident INC-1234 on ``bus`` in a fresh session; returns the outcome.

    ``via_service``: a consensus service runs elsewhere (``swarmbus consensus``, as in
    docker-compose.yml) and records the proposal and votes, which the agents only
    publish: what agents may do under the deploy auth configs. Otherwise the demo
    decides in-process, writing the consensus bucket itself.
    """
    session = session or new_session(INCIDENT)
    spec = parse_spec(yaml.safe_load(SPEC_YAML), source="the demo")
    assert spec.type == "parallel_investigation"
    team = agents(consensus=True, via_service=via_service)
    first_decision = _FirstDecision()
    with _root_span(f"incident {INCIDENT}"):
        trace_id = current_trace_id()
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(timeline(bus, session, echo))
            if not via_service:
                await stack.enter_async_context(
                    ConsensusService(bus, session=session, ingest=False)
                )
            await stack.enter_async_context(serving(bus, team))
            decisions = await bus.subscribe(
                subjects.event_filter("action", "decided", session),
                first_decision,
                receiver=COORDINATOR,
            )
            stack.push_async_callback(decisions.unsubscribe)
            board = await Blackboard.open(bus, session)
            await board.start(
                COORDINATOR, {"task": "investigate incident INC-1234", "service": "checkout"}
            )
            queue = await stack.enter_async_context(TaskQueue(bus, session))
            await stack.enter_async_context(serve_workers(queue, team, board=board))
            coordinator = Coordinator(queue, agent=COORDINATOR)
            steps, findings = await investigate(coordinator, board, spec)
            failed = [s for s in steps if s.status != "completed"]
            if failed:
                raise swarmbus.SwarmbusError(f"investigation failed: {failed}")
            hypotheses = await form_hypotheses(
                board, findings, expertise_of(team), agent=COORDINATOR
            )
            with anyio.fail_after(timeout):
                decision = await first_decision.wait()
            step, synthesis = await synthesize(
                coordinator,
                spec,
                findings,
                hypotheses,
                decision={
                    "decision": decision.decision,
                    "outcome": decision.outcome,
                    "votes_for": decision.votes_for,
                    "votes_against": decision.votes_against,
                    "abstentions": decision.abstentions,
                },
            )
            if step.status != "completed":
                raise swarmbus.SwarmbusError(f"synthesis failed: {step.error}")
            approved = decision.outcome == "approved"
            # The consensus service records the decision on the board too, after it
            # published it: whichever of us is first, the board holds the outcome now.
            with contextlib.suppress(swarmbus.InvalidTransitionError):
                await board.set_action_status(
                    rollback_proposal_id(session),
                    "approved" if approved else "rejected",
                    agent=COORDINATOR,
                    reason=f"consensus: {decision.votes_for} for, "
                    f"{decision.votes_against} against, {decision.abstentions} abstaining",
                )
            await board.record_action(
                f"decided: {synthesis['decision']}",
                agent=COORDINATOR,
                status="approved" if approved else "proposed",
                target=str(synthesis.get("target", "")),
                parameters=synthesis,
            )
            await board.complete(
                {"decision": synthesis["decision"], "consensus": decision.outcome},
                agent=COORDINATOR,
            )
            snapshot = await board.snapshot()
    return IncidentResult(session, decision, synthesis, snapshot, trace_id)


async def run_demo(data_dir: str | None = None, via_service: bool = False) -> int:
    """``swarmbus demo``: the incident on ``NATS_URL`` or an embedded server; exit code.

    ``via_service`` (``swarmbus demo --via-service``): see ``incident``.
    """
    print(f"swarmbus demo: incident {INCIDENT}", flush=True)
    with tempfile.TemporaryDirectory(prefix="swarmbus-demo-") as tmp:
        async with connect(data_dir=data_dir or tmp) as bus:
            print(f"NATS {bus.server_version} at {bus.settings.url}\n", flush=True)
            result = await incident(
                bus, echo=lambda line: print(line, flush=True), via_service=via_service
            )
    print(f"\nsession {result.session}: decision {result.synthesis['decision']!r}")
    print("\nblackboard:")
    print(yaml.safe_dump(board_view(result.snapshot), sort_keys=False, allow_unicode=True))
    print(f"trace id: {result.trace_id}" if result.trace_id else "tracing off", flush=True)
    sys.stdout.flush()
    return 0 if result.decision.decision == "rollback" else 1
