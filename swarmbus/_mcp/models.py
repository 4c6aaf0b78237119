"""Tool results and tool arguments: every field a model sees is described here."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import pydantic
from pydantic import BaseModel, Field

from swarmbus import _subjects as subjects

#: Longest a tool call may block waiting (claim_task, get_proposal, wait): MCP clients
#: time calls out, and an LLM should rather call again than hang.
MAX_WAIT: Final = 30.0
#: Items per page of a list tool, by default and at most.
PAGE: Final = 50
MAX_PAGE: Final = 200


class SessionView(BaseModel):
    """A session as the calling agent sees it."""

    session_id: str
    status: str = Field(description="active or completed")
    initiator: str
    you: str = Field(description="the agent id this server acts as")
    members: list[str] = Field(description="agents that joined (they vote on proposals)")
    context: dict[str, Any]
    findings: int
    hypotheses: int
    actions_taken: int


class Posted(BaseModel):
    """A record this agent just wrote (finding, hypothesis, ...)."""

    session_id: str
    id: str
    record: dict[str, Any]


class TaskPosted(Posted):
    """A task this agent created."""

    approval_proposal_id: str | None = Field(
        description="The vote that approves it (requires_approval), else null"
    )


class Records(BaseModel):
    """One page of board records or tasks."""

    session_id: str
    count: int = Field(description="items on this page")
    items: list[dict[str, Any]]
    next_cursor: str | None = Field(
        default=None, description="pass as cursor to get the next page; null on the last page"
    )


class Board(BaseModel):
    """The whole blackboard of a session (the seed's shape)."""

    session_id: str
    status: str
    revision: int
    context: dict[str, Any]
    findings: list[dict[str, Any]]
    hypotheses: list[dict[str, Any]]
    actions_taken: list[dict[str, Any]]


class Claimed(BaseModel):
    """The outcome of a claim attempt."""

    claimed: bool
    task: dict[str, Any] | None = None
    message: str


class ProposalView(BaseModel):
    """A proposal with its votes so far and, once closed, the decision."""

    proposal_id: str
    session_id: str
    proposer: str
    status: Literal["open", "decided"]
    action: str
    target: str
    parameters: dict[str, Any]
    quorum: str
    threshold: float | None
    deadline: str
    electorate: list[str]
    votes: list[dict[str, Any]]
    your_vote: str | None = Field(description="yes/no/abstain if you voted, else null")
    decision: dict[str, Any] | None


class SessionList(BaseModel):
    """One page of the sessions."""

    sessions: list[dict[str, Any]]
    next_cursor: str | None = Field(
        default=None, description="pass as cursor to get the next page; null on the last page"
    )


class SwarmEvent(BaseModel):
    """Something that happened in one of your sessions."""

    seq: int = Field(description="position in your event feed")
    session_id: str
    kind: str = Field(description="e.g. finding.posted, task.created, action.proposed")
    agent: str = Field(description="who did it")
    id: str = Field(description="the event's id")
    body: dict[str, Any] = Field(description="the event's content")


class Events(BaseModel):
    """What happened since your cursor."""

    events: list[SwarmEvent]
    cursor: str = Field(description="pass to the next swarm_wait to get only newer events")
    timed_out: bool = Field(description="true if nothing happened within timeout_seconds")
    missed: int = Field(default=0, description="events dropped because you did not wait for long")
    sessions: list[str] = Field(description="the sessions whose events you receive")


class LockView(BaseModel):
    """A lock (lease) you hold, or the outcome of trying to take one."""

    resource: str
    acquired: bool
    token: int | None = Field(
        default=None,
        description="fencing token: pass it to the resource; newer leases have larger ones",
    )
    ttl_seconds: int | None = None
    holder: str | None = Field(default=None, description="who holds it, if not you")
    message: str


# --- tool arguments ----------------------------------------------------------------------

SessionId = Annotated[
    str,
    Field(
        description="Session (incident) id, e.g. INC-1234: one token of letters, digits, '_', '-'.",
        pattern=subjects.SESSION_ID_PATTERN,
        max_length=subjects.MAX_ID_LENGTH,
    ),
]
Confidence = Annotated[float, Field(ge=0.0, le=1.0, description="How sure you are, 0.0 to 1.0.")]
TaskType = Annotated[
    str,
    Field(
        description="Task type, e.g. investigate, analyze, remediate, report.",
        pattern=subjects.SESSION_ID_PATTERN,
        max_length=subjects.MAX_ID_LENGTH,
    ),
]
TaskId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=subjects.MAX_ID_LENGTH,
        description="The task's id, as swarm_create_task, swarm_claim_task or swarm_list_tasks "
        "return it.",
    ),
]
ProposalId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=subjects.MAX_ID_LENGTH,
        description="The proposal's id, as swarm_propose_action returns it.",
    ),
]
HypothesisId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=subjects.MAX_ID_LENGTH,
        description="The hypothesis's id, as swarm_report_hypothesis returns it.",
    ),
]
Cursor = Annotated[
    str | None,
    Field(description="next_cursor of the previous page; omit for the first page."),
]
Limit = Annotated[int, Field(ge=1, le=MAX_PAGE, description=f"Items per page (1 to {MAX_PAGE}).")]
Category = Literal["observation", "hypothesis", "conclusion"]
WaitSeconds = Annotated[
    float, Field(ge=0.0, le=MAX_WAIT, description=f"Seconds to wait (0 to {MAX_WAIT:g}).")
]
JsonObject = dict[str, Any]


class EvidenceItem(BaseModel):
    """One piece of evidence behind a finding."""

    model_config = pydantic.ConfigDict(extra="forbid")

    source: str = Field(description="Where it comes from, e.g. prometheus, kubectl, logs.")
    query: str = Field("", description="What was asked, e.g. rate(errors[5m]).")
    result: str = Field("", description="What came back, e.g. 0.05.")
