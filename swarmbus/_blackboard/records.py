"""The blackboard's stored values and in-process views.

Values are msgspec Structs encoded as JSON under the wire-evolution rule: fields are
only added, with defaults, at the end; unknown fields are ignored on decode. A
``Snapshot`` is a session's board as of one revision; a ``BoardChange`` is one later
change as a watcher sees it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar

import msgspec
import yaml

from swarmbus import _subjects as subjects
from swarmbus._confidence import DEFAULT_EXPERTISE, Opinion, Pooling, aggregate_confidence
from swarmbus._errors import InvalidMessageError
from swarmbus._messages import Evidence, new_id

_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")

Json: TypeAlias = dict[str, Any]
Confidence = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]

#: action status -> the statuses it may move to (terminal statuses map to nothing)
ACTION_TRANSITIONS: Final[Mapping[str, frozenset[str]]] = {
    "proposed": frozenset({"awaiting_approval", "approved", "rejected", "running", "completed"}),
    "awaiting_approval": frozenset({"approved", "rejected"}),
    "approved": frozenset({"running", "completed", "failed"}),
    "running": frozenset({"completed", "failed"}),
    "rejected": frozenset(),
    "completed": frozenset(),
    "failed": frozenset(),
}
#: statuses an action may be recorded with
ACTION_INITIAL: Final = frozenset(
    {"proposed", "awaiting_approval", "approved", "running", "completed"}
)


# --- stored values (msgspec, wire-evolution rule) -----------------------------------


class _Record(msgspec.Struct, kw_only=True, frozen=True):
    """Base of every stored value; kw_only so fields can be added with defaults."""


class SessionRecord(_Record, frozen=True):
    """A session's lifecycle: ``status`` is ``active`` or ``completed``."""

    session_id: str
    initiator: str
    started: datetime
    status: str = "active"
    outcome: Json = {}
    completed: datetime | None = None
    completed_by: str | None = None


class ContextRecord(_Record, frozen=True):
    """The session's shared context (the seed's ``context``)."""

    data: Json = {}
    updated_by: str = ""
    updated: datetime | None = None


class FindingRecord(_Record, frozen=True):
    """One finding with its provenance; ``id`` is the reporting envelope's id."""

    id: str
    agent: str
    timestamp: datetime
    category: str
    content: str
    confidence: Confidence
    evidence: list[Evidence] = []


class ConfidenceUpdate(_Record, frozen=True):
    """One agent's assessment of a hypothesis, kept so no update is ever lost.

    ``expertise`` (the assessor's declared expertise in the hypothesis's domain,
    None = the default) and ``evidence`` (how many pieces back it) weigh the
    assessment in the pooled confidence.
    """

    agent: str
    confidence: Confidence
    at: datetime
    reason: str = ""
    expertise: float | None = None
    evidence: int = 0


class HypothesisRecord(_Record, frozen=True):
    """A hypothesis: ``status`` is ``proposed``, ``validated`` or ``refuted``.

    ``confidence`` pools the latest assessment of every agent (the proposer's
    ``initial`` one and each agent's last entry in ``updates``) with the board's
    pooling rule (swarmbus._confidence); ``updates`` holds every assessment in the
    order it was applied.
    """

    id: str
    agent: str
    description: str
    confidence: Confidence
    created: datetime
    status: str = "proposed"
    updates: list[ConfidenceUpdate] = []
    validated_by: str | None = None
    evidence: Any = None
    initial: ConfidenceUpdate | None = None

    def assessments(self) -> list[ConfidenceUpdate]:
        """The latest assessment of each agent, in first-assessed order."""
        latest: dict[str, ConfidenceUpdate] = {}
        for update in [*([self.initial] if self.initial else []), *self.updates]:
            latest[update.agent] = update
        return list(latest.values())


def pooled_confidence(assessments: list[ConfidenceUpdate], pooling: Pooling) -> float:
    """Pool agents' assessments, weighted by expertise and evidence (the seed's rule)."""
    opinions = [Opinion(u.agent, u.confidence, u.evidence) for u in assessments]
    expertise = {
        u.agent: {"": u.expertise if u.expertise is not None else DEFAULT_EXPERTISE}
        for u in assessments
    }
    return aggregate_confidence(opinions, expertise, method=pooling, category="")


class StatusChange(_Record, frozen=True):
    """One step of an action's status history."""

    status: str
    agent: str
    at: datetime
    reason: str = ""


class ActionRecord(_Record, frozen=True):
    """An action taken or proposed (the seed's ``actions_taken``); see ACTION_TRANSITIONS."""

    id: str
    agent: str
    action: str
    status: str
    created: datetime
    type: str = "modify"
    target: str = ""
    parameters: Json = {}
    history: list[StatusChange] = []
    result: Json = {}


Record: TypeAlias = SessionRecord | ContextRecord | FindingRecord | HypothesisRecord | ActionRecord
RecordT = TypeVar(
    "RecordT", SessionRecord, ContextRecord, FindingRecord, HypothesisRecord, ActionRecord
)

RECORD_TYPES: Final[dict[str, type[Record]]] = {
    "session": SessionRecord,
    "context": ContextRecord,
    "finding": FindingRecord,
    "hypothesis": HypothesisRecord,
    "action": ActionRecord,
}
DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    kind: msgspec.json.Decoder(cls) for kind, cls in RECORD_TYPES.items()
}
encoder: Final = msgspec.json.Encoder()


# --- in-process values ----------------------------------------------------------------


@dataclass(frozen=True)
class BoardChange:
    """One change of a session's board, as a watcher sees it.

    ``value`` is None when the key was deleted or purged (``operation`` says which).
    """

    revision: int
    kind: str
    item_id: str | None
    operation: Literal["put", "delete", "purge"]
    value: Record | None

    def to_dict(self) -> Json:
        """The change as plain data (for JSON/YAML output)."""
        return {
            "revision": self.revision,
            "kind": self.kind,
            "id": getattr(self.value, "id", self.item_id),
            "operation": self.operation,
            "value": msgspec.to_builtins(self.value),
        }


@dataclass(frozen=True)
class Snapshot:
    """A session's board as of ``revision`` (the KV stream sequence last applied)."""

    session_id: str
    revision: int = 0
    session: SessionRecord | None = None
    context: ContextRecord | None = None
    findings: tuple[FindingRecord, ...] = ()
    hypotheses: tuple[HypothesisRecord, ...] = ()
    actions_taken: tuple[ActionRecord, ...] = ()

    def to_dict(self) -> Json:
        """The seed's shape: ``{context, findings, hypotheses, actions_taken}``."""
        builtins: Json = msgspec.to_builtins(
            {
                "context": self.context.data if self.context else {},
                "findings": self.findings,
                "hypotheses": self.hypotheses,
                "actions_taken": self.actions_taken,
            }
        )
        return builtins

    def to_json(self) -> str:
        """The snapshot as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_yaml(self) -> str:
        """The snapshot as YAML."""
        return str(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    def apply(self, change: BoardChange) -> Snapshot:
        """The snapshot after ``change`` (changes must be applied in revision order)."""
        items: dict[str, dict[str, Any]] = {
            "finding": {item_token(f.id): f for f in self.findings},
            "hypothesis": {item_token(h.id): h for h in self.hypotheses},
            "action": {item_token(a.id): a for a in self.actions_taken},
        }
        session, context = self.session, self.context
        value = change.value
        if change.kind == "session":
            session = value if isinstance(value, SessionRecord) else None
        elif change.kind == "context":
            context = value if isinstance(value, ContextRecord) else None
        elif change.kind in items:
            table = items[change.kind]
            if value is None:
                table.pop(change.item_id or "", None)
            else:
                table[change.item_id or ""] = value
        return Snapshot(
            session_id=self.session_id,
            revision=max(self.revision, change.revision),
            session=session,
            context=context,
            findings=tuple(items["finding"].values()),
            hypotheses=tuple(items["hypothesis"].values()),
            actions_taken=tuple(items["action"].values()),
        )


# --- helpers ---------------------------------------------------------------------------


def item_token(item_id: str) -> str:
    """The key token of an item id: itself if it is one safe token, else a safe hash."""
    if not isinstance(item_id, str) or not item_id:
        raise InvalidMessageError("schema", f"an item id must be a non-empty string: {item_id!r}")
    return item_id if _TOKEN.fullmatch(item_id) else subjects.safe_token(item_id)


def check_id(item_id: str | None) -> str:
    """A caller's item id, or a new one; it is also a wire id, so at most 128 characters."""
    if item_id is not None and len(item_id) > subjects.MAX_ID_LENGTH:
        raise InvalidMessageError(
            "schema", f"an id is at most {subjects.MAX_ID_LENGTH} characters: {item_id!r}"
        )
    return item_id or new_id()


def check_confidence(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidMessageError("schema", f"confidence must be a number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise InvalidMessageError("schema", f"confidence must be within [0, 1], got {value!r}")
    return float(value)


def check_expertise(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise InvalidMessageError("schema", f"expertise must be within [0, 1], got {value!r}")
    return value


def check_evidence(value: int) -> int:
    """A count of evidence; a negative one would give a negative weight in the pool."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidMessageError("schema", f"evidence must be a count >= 0, got {value!r}")
    return value


def parse_key(session: str, key: str) -> tuple[str, str | None] | None:
    """(kind, item token) of a key in ``session``, or None if it is not a board key."""
    parts = key.split(".", 2)
    if len(parts) < 2 or parts[0] != session or parts[1] not in RECORD_TYPES:
        return None
    return parts[1], parts[2] if len(parts) == 3 else None
