"""A session replayed from its events: the steps in order, and what they add up to.

``describe`` says in one line what an event means (the demo's live timeline, plus
task durations); ``Timeline.of`` folds a session's steps into findings, hypotheses
with pooled confidence, tasks with durations, proposals with their votes and
decisions, actions and errors, and renders them as text, Markdown (a post-mortem) or
JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import msgspec

from swarmbus import _subjects as subjects
from swarmbus._messages import Message
from swarmbus._observe._events import Step, printable

#: Running tasks a live follower remembers; beyond it the oldest is forgotten (a task
#: whose end never comes, e.g. its session was abandoned, must not be kept forever).
RUNNING_TASKS_LIMIT: Final = 10_000


def forget_oldest(running: dict[str, Any], limit: int = RUNNING_TASKS_LIMIT) -> None:
    """Drop the oldest entries of ``running`` (insertion order) beyond ``limit``."""
    while len(running) > limit:
        del running[next(iter(running))]


@dataclass
class TaskRow:
    """One task's life as the events tell it."""

    id: str
    label: str
    created: datetime
    agent: str | None = None
    assigned: datetime | None = None
    finished: datetime | None = None
    status: str = "pending"
    error: str | None = None

    @property
    def wait(self) -> float | None:
        """Seconds from creation to claim."""
        return (self.assigned - self.created).total_seconds() if self.assigned else None

    @property
    def duration(self) -> float | None:
        """Seconds from creation to completion or failure."""
        return (self.finished - self.created).total_seconds() if self.finished else None


@dataclass
class ProposalRow:
    """A proposal with the votes cast and the decision, if any."""

    id: str
    action: str
    target: str
    proposer: str
    rule: str
    votes: list[dict[str, Any]] = field(default_factory=list)
    decision: dict[str, Any] | None = None


def task_label(type: str, target: object = "") -> str:
    """A task type without the ``-<agent token>`` a coordinator appends to route it.

    ``target`` is whatever the task's parameters say: any JSON value, as the sender wrote
    it; only a string names an agent.
    """
    if not isinstance(target, str) or not target:
        return type
    return type.removesuffix(f"-{subjects.safe_token(target)}")


def describe(step: Step, tasks: dict[str, TaskRow] | None = None) -> str:
    """One line saying what ``step`` means (``tasks`` adds durations to task events)."""
    message = step.message
    if message is None:
        return f"UNDECODABLE event on {step.subject}: {step.error}"
    body: Any = message.body
    match message.type:
        case "session.started":
            return f"started the session: {body.context.get('task', '')}"
        case "session.completed":
            return f"closed the session: {body.outcome.get('decision', body.outcome)}"
        case "task.created":
            target = body.parameters.get("target", "")
            return f"created task '{task_label(body.type, target)}' for {target or 'any agent'}"
        case "task.assigned":
            return f"claimed task '{_task_name(body.task_id, tasks)}'{_after(body.task_id, tasks)}"
        case "task.completed":
            return f"finished task '{_task_name(body.task_id, tasks)}'{_took(body.task_id, tasks)}"
        case "task.failed":
            dead = " (dead)" if body.dead else ""
            return f"FAILED task '{_task_name(body.task_id, tasks)}'{dead}: {body.error}"
        case "finding":
            evidence = "; ".join(f"{e.source}: {e.result}" for e in body.evidence)
            where = f"  [{evidence}]" if evidence else ""
            return f"reports {body.category} ({body.confidence:.2f}): {body.content}{where}"
        case "finding.reported":
            return f"reports {body.category}: {body.content}"
        case "hypothesis.proposed":
            return f"forms hypothesis, pooled confidence {body.confidence:.2f}: {body.description}"
        case "hypothesis.validated":
            verdict = "validated" if body.result else "refuted"
            return f"{verdict} hypothesis {body.hypothesis_id}"
        case "action":
            status = "awaiting approval" if body.requires_approval else "recorded"
            details = ", ".join(f"{k}={v}" for k, v in body.parameters.items())
            return f"records {body.type} action on {body.target or '-'} ({status}): {details}"
        case "action.completed":
            return f"action {body.action_id} {body.status}"
        case "proposal":
            rule = f"{body.quorum} {body.threshold}" if body.threshold else body.quorum
            return f"proposes '{body.action}' of {body.target} ({rule}, voters: {len(body.voters)})"
        case "vote":
            confidence = f" {body.confidence:.2f}" if body.confidence is not None else ""
            return f"votes {body.vote}{confidence} on {body.proposal_id}: {body.reason}"
        case "decision":
            return (
                f"DECISION: {body.decision} ({body.outcome}; for {body.votes_for}, "
                f"against {body.votes_against}, abstentions {body.abstentions})"
            )
        case "error.occurred":
            return f"ERROR {body.code}: {body.reason}"
    return message.type


def _task_name(task_id: str, tasks: dict[str, TaskRow] | None) -> str:
    row = (tasks or {}).get(task_id)
    return row.label if row else task_id


def _after(task_id: str, tasks: dict[str, TaskRow] | None) -> str:
    row = (tasks or {}).get(task_id)
    return f" after {row.wait:.3f}s" if row and row.wait is not None else ""


def _took(task_id: str, tasks: dict[str, TaskRow] | None) -> str:
    row = (tasks or {}).get(task_id)
    return f" in {row.duration:.3f}s" if row and row.duration is not None else ""


@dataclass
class Timeline:
    """A session folded from its steps; build with ``Timeline.of``.

    With ``keep=False`` (a live follower that runs for days) it keeps only what the
    next lines need: the first event's time and the tasks still running.
    """

    session: str
    keep: bool = True
    start: datetime | None = None
    steps: list[Step] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    hypotheses: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, TaskRow] = field(default_factory=dict)
    proposals: dict[str, ProposalRow] = field(default_factory=dict)
    actions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    outcome: dict[str, Any] | None = None

    @classmethod
    def of(cls, session: str, steps: list[Step]) -> Timeline:
        timeline = cls(session)
        for step in steps:
            timeline.add(step)
        return timeline

    def offset(self, step: Step) -> float:
        """Seconds from the session's first event to ``step``."""
        return (step.time - self.start).total_seconds() if self.start else 0.0

    def add(self, step: Step) -> str:
        """Fold one step in; returns its line (``describe`` with task durations)."""
        if self.start is None:
            self.start = step.time
        if self.keep:
            self.steps.append(step)
            self._fold(step)
        elif step.message is not None:
            self._fold_task(step.message)
            forget_oldest(self.tasks)
        line = describe(step, self.tasks)
        if self.keep:
            self.lines.append(line)
        elif step.type in ("task.completed", "task.failed"):
            self.tasks.pop(
                getattr(step.message.body if step.message else None, "task_id", ""), None
            )
        return line

    def _fold_task(self, message: Message) -> None:
        body: Any = message.body
        at = message.timestamp
        match message.type:
            case "task.created":
                label = task_label(body.type, body.parameters.get("target", ""))
                self.tasks[body.task_id] = TaskRow(body.task_id, label, at)
            case "task.assigned" if body.task_id in self.tasks:
                row = self.tasks[body.task_id]
                row.agent, row.assigned, row.status = body.agent_id, at, "assigned"
            case "task.completed" if body.task_id in self.tasks:
                row = self.tasks[body.task_id]
                row.finished, row.status = at, "completed"
            case "task.failed" if body.task_id in self.tasks:
                row = self.tasks[body.task_id]
                row.finished, row.status, row.error = at, "failed", body.error

    def _fold(self, step: Step) -> None:
        message = step.message
        if message is None:
            self.errors.append({"seq": step.seq, "code": "undecodable", "reason": step.error})
            return
        body: Any = message.body
        agent = message.source.agent
        match message.type:
            case "finding":
                self.findings.append(
                    {
                        "agent": agent,
                        "category": body.category,
                        "content": body.content,
                        "confidence": body.confidence,
                        "evidence": [msgspec.to_builtins(e) for e in body.evidence],
                    }
                )
            case "hypothesis.proposed":
                self.hypotheses[body.hypothesis_id] = {
                    "description": body.description,
                    "confidence": body.confidence,
                    "status": "proposed",
                }
            case "hypothesis.validated" if body.hypothesis_id in self.hypotheses:
                self.hypotheses[body.hypothesis_id]["status"] = (
                    "validated" if body.result else "refuted"
                )
            case "task.created" | "task.assigned" | "task.completed" | "task.failed":
                self._fold_task(message)
            case "proposal":
                rule = f"{body.quorum} {body.threshold}" if body.threshold else body.quorum
                self.proposals[body.proposal_id] = ProposalRow(
                    body.proposal_id, body.action, body.target, agent, rule
                )
            case "vote" if body.proposal_id in self.proposals:
                self.proposals[body.proposal_id].votes.append(
                    {
                        "voter": agent,
                        "vote": body.vote,
                        "confidence": body.confidence,
                        "reason": body.reason,
                    }
                )
            case "decision" if body.proposal_id in self.proposals:
                self.proposals[body.proposal_id].decision = {
                    "decision": body.decision,
                    "outcome": body.outcome,
                    "votes_for": body.votes_for,
                    "votes_against": body.votes_against,
                    "abstentions": body.abstentions,
                }
            case "action":
                self.actions.append(
                    {
                        "agent": agent,
                        "type": body.type,
                        "target": body.target,
                        "parameters": body.parameters,
                        "requires_approval": body.requires_approval,
                    }
                )
            case "error.occurred":
                self.errors.append({"seq": step.seq, "code": body.code, "reason": body.reason})
            case "session.completed":
                self.outcome = dict(body.outcome)

    # --- rendering ---------------------------------------------------------------------

    def render(self, format: str) -> str:
        """The timeline as ``text``, ``markdown`` or ``json``."""
        if format == "json":
            return json.dumps(self.to_dict(), indent=2, default=str) + "\n"
        if format == "markdown":
            return printable(_Markdown(self).render(), keep_newlines=True)
        return "".join(printable(self.text_line(s, line)) + "\n" for s, line in self._pairs())

    def text_line(self, step: Step, line: str) -> str:
        """``+seconds  agent  what  [trace]``: the terminal form of one step."""
        trace = f"  [trace {step.trace_id}]" if step.trace_id else ""
        return f"+{self.offset(step):7.3f}s  {step.agent:<32} {line}{trace}"

    def _pairs(self) -> list[tuple[Step, str]]:
        return list(zip(self.steps, self.lines, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain data (``--format json``)."""
        return {
            "session": self.session,
            "started": self.start.isoformat() if self.start else None,
            "outcome": self.outcome,
            "steps": [
                {
                    "seq": s.seq,
                    "time": s.time.isoformat(),
                    "offset": round(self.offset(s), 3),
                    "agent": s.agent,
                    "type": s.type,
                    "text": line,
                    "trace_id": s.trace_id,
                }
                for s, line in self._pairs()
            ],
            "findings": self.findings,
            "hypotheses": sorted(self.hypotheses.values(), key=lambda h: -h["confidence"]),
            "tasks": [
                {
                    "id": t.id,
                    "type": t.label,
                    "agent": t.agent,
                    "status": t.status,
                    "wait": t.wait,
                    "duration": t.duration,
                    "error": t.error,
                }
                for t in self.tasks.values()
            ],
            "proposals": [
                {
                    "id": p.id,
                    "action": p.action,
                    "target": p.target,
                    "proposer": p.proposer,
                    "rule": p.rule,
                    "votes": p.votes,
                    "decision": p.decision,
                }
                for p in self.proposals.values()
            ],
            "actions": self.actions,
            "errors": self.errors,
        }


class _Markdown:
    """A post-mortem document of a timeline."""

    def __init__(self, timeline: Timeline) -> None:
        self.t = timeline
        self.out: list[str] = []

    def render(self) -> str:
        t = self.t
        started = t.start.isoformat() if t.start else "-"
        self.out += [f"# Session {t.session}", "", f"- Started: {started}"]
        if t.steps:
            self.out.append(f"- Duration: {t.offset(t.steps[-1]):.3f}s, {len(t.steps)} events")
        if t.outcome is not None:
            self.out.append(f"- Outcome: {json.dumps(t.outcome, sort_keys=True)}")
        self._decisions()
        self._table(
            "Hypotheses",
            ["Hypothesis", "Pooled confidence", "Status"],
            [
                [h["description"], f"{h['confidence']:.2f}", h["status"]]
                for h in sorted(t.hypotheses.values(), key=lambda h: -h["confidence"])
            ],
        )
        self._table(
            "Findings",
            ["Agent", "Category", "Confidence", "Finding", "Evidence"],
            [
                [
                    f["agent"],
                    f["category"],
                    f"{f['confidence']:.2f}",
                    f["content"],
                    "; ".join(f"{e['source']}: {e['result']}" for e in f["evidence"]),
                ]
                for f in t.findings
            ],
        )
        self._table(
            "Tasks",
            ["Task", "Agent", "Status", "Waited", "Took"],
            [
                [r.label, r.agent or "-", r.status, _secs(r.wait), _secs(r.duration)]
                for r in t.tasks.values()
            ],
        )
        self._table(
            "Actions",
            ["Agent", "Type", "Target", "Parameters", "Needs approval"],
            [
                [
                    a["agent"],
                    a["type"],
                    a["target"],
                    json.dumps(a["parameters"], sort_keys=True),
                    "yes" if a["requires_approval"] else "no",
                ]
                for a in t.actions
            ],
        )
        self._table(
            "Errors",
            ["Seq", "Code", "Reason"],
            [[e["seq"], e["code"], e["reason"]] for e in t.errors],
        )
        self.out += ["", "## Timeline", ""]
        self.out += [f"    {t.text_line(s, line)}" for s, line in t._pairs()]
        return "\n".join(self.out) + "\n"

    def _decisions(self) -> None:
        for p in self.t.proposals.values():
            self.out += ["", f"## Proposal {p.id}: {p.action} of {p.target}", ""]
            self.out.append(f"Proposed by {p.proposer}, rule {p.rule}.")
            for v in p.votes:
                confidence = f" ({v['confidence']:.2f})" if v["confidence"] is not None else ""
                self.out.append(f"- {v['voter']}: {v['vote']}{confidence}: {v['reason']}")
            d = p.decision
            self.out.append(
                f"\n**Decision: {d['decision']}** ({d['outcome']}; for {d['votes_for']}, "
                f"against {d['votes_against']}, abstentions {d['abstentions']})"
                if d
                else "\nNo decision yet."
            )

    def _table(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        if not rows:
            return
        self.out += ["", f"## {title}", "", "| " + " | ".join(header) + " |"]
        self.out.append("|" + "---|" * len(header))
        for row in rows:
            cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
            self.out.append("| " + " | ".join(cells) + " |")


def _secs(value: float | None) -> str:
    return f"{value:.3f}s" if value is not None else "-"
