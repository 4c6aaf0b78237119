"""Swarm specs and results: the seed's YAML, validated with pydantic, and what a run returns.

A swarm spec is the seed's YAML (``swarm: type: parallel_investigation`` or
``progressive_refinement``); a bad spec raises ``SpecError`` naming every bad field.
The models are plain data: the behaviours that run them live in ``_swarm.py``, the
generic coordinator they use in ``_coordinator.py``. The capability names of the swarm
steps are here too, so agents and behaviours agree on them without importing each other:

- ``investigate``: ``{task, focus, avoid_duplicate_queries}`` -> ``{findings: [...]}``
- ``synthesize``: ``{task, action, findings, hypotheses}`` -> ``{decision, ...}``
- ``refine``: ``{stage, task, output, inputs: {name: value}}`` -> ``{<output>: value}``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

import pydantic
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from swarmbus import _subjects as subjects
from swarmbus._durations import parse_duration
from swarmbus._errors import SpecError

INVESTIGATE: Final = "investigate"
SYNTHESIZE: Final = "synthesize"
REFINE: Final = "refine"
MAX_TASK_TIMEOUT: Final = 7 * 24 * 3600.0

# --- durations ---------------------------------------------------------------------------


def _task_timeout(seconds: float) -> float:
    if seconds > MAX_TASK_TIMEOUT:
        raise ValueError(f"{seconds:g}s is longer than 7d, the longest a task may run")
    return seconds


def _agent_id(value: object) -> str:
    return subjects.validate_agent_id(value)


def _name(value: object) -> str:
    return subjects.validate_name("name", value)


class _FieldError(ValueError):
    """A model-level check that blames one nested field (``stages[1].input``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


Duration = Annotated[float, BeforeValidator(parse_duration)]
AgentId = Annotated[str, BeforeValidator(_agent_id)]
Name = Annotated[str, BeforeValidator(_name)]


# --- spec models ---------------------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentAssignment(_Spec):
    """One investigating agent; YAML ``- ops/deploy-validator: {focus: "..."}``."""

    agent: AgentId
    focus: str = ""

    @model_validator(mode="before")
    @classmethod
    def _single_key(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"agent": data}
        if isinstance(data, dict) and len(data) == 1 and "agent" not in data:
            ((agent, options),) = data.items()
            if options is None:
                options = {}
            if not isinstance(options, dict):
                raise ValueError(f"options of agent {agent!r} must be a mapping, e.g. focus: ...")
            return {"agent": agent, **options}
        return data


class Coordination(_Spec):
    """How the investigating agents work together."""

    share_findings: bool = True
    avoid_duplicate_queries: bool = True
    timeout: Annotated[Duration, AfterValidator(_task_timeout)] = 600.0


class Synthesis(_Spec):
    """The agent that combines every finding into a recommendation."""

    agent: AgentId
    action: str = "Combine findings and recommend action"


class ParallelInvestigation(_Spec):
    """Several agents investigate one task at once; one agent synthesises."""

    type: Literal["parallel_investigation"]
    task: str = Field(min_length=1)
    agents: list[AgentAssignment] = Field(min_length=1)
    coordination: Coordination = Coordination()
    synthesis: Synthesis | None = None

    @model_validator(mode="after")
    def _distinct_agents(self) -> Self:
        seen: set[str] = set()
        for i, assignment in enumerate(self.agents):
            if assignment.agent in seen:
                raise _FieldError(f"agents[{i}]", f"agent {assignment.agent!r} is listed twice")
            seen.add(assignment.agent)
        return self


class Stage(_Spec):
    """One step of a progressive refinement."""

    stage: int = Field(ge=1)
    agent: AgentId
    task: str = Field(min_length=1)
    input: Name | None = None
    output: Name
    timeout: Duration = 60.0


class ProgressiveRefinement(_Spec):
    """Stages run in order, each given the output of an earlier stage."""

    type: Literal["progressive_refinement"]
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        outputs: set[str] = set()
        for i, stage in enumerate(self.stages):
            if stage.stage != i + 1:
                raise _FieldError(f"stages[{i}].stage", f"is {stage.stage}, expected {i + 1}")
            if stage.input is not None and stage.input not in outputs:
                raise _FieldError(
                    f"stages[{i}].input", f"{stage.input!r} is not the output of an earlier stage"
                )
            if stage.output in outputs:
                raise _FieldError(f"stages[{i}].output", f"{stage.output!r} is produced twice")
            outputs.add(stage.output)
        return self


SwarmSpec = Annotated[ParallelInvestigation | ProgressiveRefinement, Field(discriminator="type")]


class SpecFile(_Spec):
    """A swarm spec file: one ``swarm:`` block."""

    swarm: SwarmSpec


_TAGS: Final = ("parallel_investigation", "progressive_refinement")


def _field_path(error: Mapping[str, Any]) -> str:
    parts = [p for i, p in enumerate(error["loc"]) if not (i == 1 and p in _TAGS)]
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        path += ".type"
    blamed = error.get("ctx", {}).get("error")
    if isinstance(blamed, _FieldError):
        path = f"{path}.{blamed.path}" if path else blamed.path
    return path or "(top level)"


def _message(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "model_type" and not error["loc"]:
        return "a spec is a mapping with one key, swarm:"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def parse_spec(
    data: object, *, source: str = "<spec>"
) -> ParallelInvestigation | ProgressiveRefinement:
    """Validate a loaded YAML document as a swarm spec.

    Raises:
        SpecError: naming each bad field (``swarm.coordination.timeout: ...``).
    """
    try:
        return SpecFile.model_validate(data).swarm
    except pydantic.ValidationError as exc:
        problems = [(_field_path(e), _message(e)) for e in exc.errors()]
        raise SpecError(source, problems) from None


def spec_agents(spec: ParallelInvestigation | ProgressiveRefinement) -> list[str]:
    """Every agent id a spec names, in order of appearance."""
    if isinstance(spec, ProgressiveRefinement):
        names = [s.agent for s in spec.stages]
    else:
        names = [a.agent for a in spec.agents]
        names += [spec.synthesis.agent] if spec.synthesis else []
    return list(dict.fromkeys(names))


def load_spec(path: str | Path) -> ParallelInvestigation | ProgressiveRefinement:
    """Read and validate a swarm spec YAML file.

    Raises:
        SpecError: the file is missing, not UTF-8 YAML, or not a valid spec.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(source, [("(file)", exc.strerror or str(exc))]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(source, [("(file)", f"not UTF-8 text: {exc.reason}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [(where, f"not valid YAML: {problem}")]) from None
    return parse_spec(data, source=source)


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """One agent's part in a swarm run."""

    agent: str
    task: str
    status: Literal["completed", "failed", "skipped"]
    stage: int | None = None
    output: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class SwarmResult:
    """What a swarm run produced; ``status`` is ``failed`` if a step failed it."""

    swarm: str
    session: str
    status: Literal["completed", "failed"]
    outputs: dict[str, Any] = field(default_factory=dict)
    steps: tuple[StepResult, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the swarm completed."""
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML/JSON output."""
        steps = [{k: v for k, v in vars(s).items() if v is not None} for s in self.steps]
        data: dict[str, Any] = {
            "swarm": self.swarm,
            "session": self.session,
            "status": self.status,
        }
        if self.error:
            data["error"] = self.error
        data["steps"] = steps
        data["outputs"] = self.outputs
        return data

    def to_yaml(self) -> str:
        """The result as YAML."""
        return str(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
