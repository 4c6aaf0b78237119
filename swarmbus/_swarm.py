"""Swarm behaviours: the seed's YAML specs, shared evidence queries, progressive refinement.

A swarm spec is the seed's YAML (``swarm: type: parallel_investigation`` or
``progressive_refinement``), validated with pydantic; a bad spec raises ``SpecError``
naming every bad field. Agents take part through capability handlers
(``Agent.on_request``), so the same handler answers a direct request and a swarm step:

- ``investigate``: ``{task, focus, avoid_duplicate_queries}`` -> ``{findings: [...]}``
- ``synthesize``: ``{task, action, findings, hypotheses}`` -> ``{decision, ...}``
- ``refine``: ``{stage, task, output, inputs: {name: value}}`` -> ``{<output>: value}``
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import math
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

import anyio
import anyio.abc
import msgspec
import nats.errors
import nats.js.errors
import pydantic
import yaml
from nats.js.kv import KeyValue
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from swarmbus import _subjects as subjects
from swarmbus._agent import Agent
from swarmbus._bus import Bus
from swarmbus._errors import (
    ConnectionError,
    NoResponderError,
    QueryTimeoutError,
    RequestTimeoutError,
    SpecError,
    SwarmbusError,
)
from swarmbus._messages import Evidence

INVESTIGATE: Final = "investigate"
SYNTHESIZE: Final = "synthesize"
REFINE: Final = "refine"
QUERIES_BUCKET: Final = "SWARMBUS_QUERIES"
QUERIES_MAX_AGE: Final = 7 * 24 * 3600.0
QUERY_LEASE: Final = 10.0
MAX_TASK_TIMEOUT: Final = 7 * 24 * 3600.0

log = logging.getLogger("swarmbus.swarm")
COORDINATOR_AGENT: Final = "swarmbus/coordinator"

# --- durations ---------------------------------------------------------------------------

_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from ``10m``, ``30s``, ``1h30m``, ``500ms`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().replace(" ", "")
        parts = _DURATION.findall(text)
        if "".join(n + u for n, u in parts) != text:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 10m, 1h30m)") from None
        else:
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 10m, 1h30m)")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 10m, 1h30m)")
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be positive")
    return seconds


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


# --- evidence queries run once per session ------------------------------------------------


class _QueryRecord(msgspec.Struct, kw_only=True, frozen=True):
    source: str
    query: str
    agent: str
    status: Literal["running", "done", "failed"] = "running"
    result: str = ""
    error: str = ""


_query_encoder = msgspec.json.Encoder()
_query_decoder = msgspec.json.Decoder(_QueryRecord)


@dataclass(frozen=True)
class QueryOutcome:
    """An evidence query's result; ``reused`` when another agent had already run it."""

    evidence: Evidence
    ran_by: str
    reused: bool


def query_key(session: str, source: str, query: str) -> str:
    """KV key of one evidence query: the session and a hash of the normalised query."""
    normalised = f"{source.strip().lower()}\n{' '.join(query.split())}"
    return f"{session}.{hashlib.sha256(normalised.encode()).hexdigest()[:32]}"


class QueryLedger:
    """Evidence queries of one session, each run by exactly one agent.

    ``run`` creates the query's key once (create-once KV write); the winner executes
    the query and stores its result, everyone else waits for that result and reuses
    it. If the winner fails, the next caller takes the query over (compare-and-set).
    While it runs, the winner renews its record every third of ``lease``; a record not
    renewed for a whole ``lease`` (its agent crashed or lost NATS) is taken over by the
    next waiting caller. Renewals only move the key's revision and waiters time them
    on their own monotonic clocks, so agents' wall clocks never matter.
    With ``enabled=False`` every call simply executes (no deduplication).
    """

    def __init__(
        self, kv: KeyValue | None, session: str, agent: str, *, lease: float = QUERY_LEASE
    ) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
        self._kv = kv
        self.session = subjects.validate_session_id(session)
        self.agent = subjects.validate_agent_id(agent)
        self.lease = lease

    @classmethod
    async def open(
        cls,
        bus: Bus,
        session: str,
        *,
        agent: str,
        enabled: bool = True,
        lease: float = QUERY_LEASE,
    ) -> QueryLedger:
        """The ledger of ``session`` for ``agent`` (bucket ``SWARMBUS_QUERIES``)."""
        kv = (
            await bus.key_value(
                QUERIES_BUCKET, ttl=QUERIES_MAX_AGE, description="swarmbus evidence queries"
            )
            if enabled
            else None
        )
        return cls(kv, session, agent, lease=lease)

    async def run(
        self,
        source: str,
        query: str,
        execute: Callable[[], Awaitable[str]],
        *,
        timeout: float = 30.0,
    ) -> QueryOutcome:
        """Run ``execute`` unless an agent of this session ran (or is running) the query.

        Raises:
            QueryTimeoutError: another agent's run did not finish within ``timeout``.
            Whatever ``execute`` raises (the query is then free to be run again).
        """
        if self._kv is None:
            return self._outcome(source, query, await execute(), self.agent, reused=False)
        kv = self._kv
        key = query_key(self.session, source, query)
        running = _query_encoder.encode(_QueryRecord(source=source, query=query, agent=self.agent))
        try:
            with anyio.fail_after(timeout):
                revision = await self._claim(kv, key, running)
        except TimeoutError:
            raise QueryTimeoutError(source, query, timeout) from None
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise ConnectionError(f"evidence query ledger of {self.session}: {exc}") from exc
        if isinstance(revision, _QueryRecord):
            return self._outcome(source, query, revision.result, revision.agent, True)
        # Outside the waiting timeout: the query runs as long as it takes, and what it
        # raises (a TimeoutError too) is the caller's to see as raised.
        return await self._execute(kv, key, revision, source, query, execute)

    async def _claim(self, kv: KeyValue, key: str, running: bytes) -> int | _QueryRecord:
        """The record's revision once this agent runs the query, or the done record."""
        while True:
            try:
                return await kv.create(key, running)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # aged out between our create and get: create again
            assert entry.value is not None
            assert entry.revision is not None
            record = _query_decoder.decode(entry.value)
            if record.status == "done":
                return record
            # Failed, or running but not renewed for a whole lease: take it over.
            if record.status == "failed" or not await _changed(
                kv, key, entry.revision, within=self.lease
            ):
                try:
                    return await kv.update(key, running, last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue

    async def _execute(
        self,
        kv: KeyValue,
        key: str,
        revision: int,
        source: str,
        query: str,
        execute: Callable[[], Awaitable[str]],
    ) -> QueryOutcome:
        base = _QueryRecord(source=source, query=query, agent=self.agent)
        held = [revision]  # the record's revision while we hold it; empty once lost

        async def renew() -> None:
            data = _query_encoder.encode(base)
            while held:
                await anyio.sleep(self.lease / 3)
                try:
                    # Shielded: a renewal the server applied must update ``held`` even
                    # when the query ends meanwhile, or the final write loses its CAS.
                    with anyio.CancelScope(shield=True):
                        held[0] = await kv.update(key, data, last=held[0])
                except nats.js.errors.KeyWrongLastSequenceError:
                    log.warning("query %s was taken over while it ran", key)
                    held.clear()
                except (TimeoutError, nats.errors.Error) as exc:  # try again next time
                    log.warning("cannot renew query %s: %s", key, exc)

        async def finish(record: _QueryRecord) -> None:
            if not held:
                return  # taken over: the new runner's record stands
            try:
                await kv.update(key, _query_encoder.encode(record), last=held[0])
            except nats.js.errors.KeyWrongLastSequenceError:
                log.warning("query %s was taken over; its result is not recorded", key)
            except nats.errors.Error as exc:
                raise ConnectionError(f"evidence query ledger of {self.session}: {exc}") from exc

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(renew)
                result = await execute()
                tg.cancel_scope.cancel()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await finish(msgspec.structs.replace(base, status="failed", error=repr(exc)))
            if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                raise exc.exceptions[0] from None  # execute's own error, as it raised it
            raise
        await finish(msgspec.structs.replace(base, status="done", result=str(result)))
        return self._outcome(source, query, str(result), self.agent, reused=False)

    @staticmethod
    def _outcome(source: str, query: str, result: str, agent: str, reused: bool) -> QueryOutcome:
        return QueryOutcome(
            evidence=Evidence(source=source, query=query, result=result),
            ran_by=agent,
            reused=reused,
        )


async def _changed(kv: KeyValue, key: str, revision: int, *, within: float) -> bool:
    """Whether ``key`` gets a revision newer than ``revision`` within ``within`` seconds."""
    watcher = await kv.watch(key)
    try:
        with anyio.move_on_after(within):
            async for entry in watcher:
                if entry is not None and (entry.revision or 0) > revision:
                    return True
        return False
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


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


@contextlib.asynccontextmanager
async def serving(bus: Bus, agents: Iterable[Agent]) -> AsyncIterator[None]:
    """Serve ``agents`` on ``bus`` for the block; on exit they drain concurrently.

    An error of the block (or of one agent) is raised as it is, not in an exception
    group, so callers (and ``swarmbus run``) can catch a ``SwarmbusError``.
    """
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            for agent in agents:
                await tg.start(_serve_until, agent, bus, stop)
            try:
                yield
            finally:
                stop.set()
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        raise error from None


async def _serve_until(
    agent: Agent,
    bus: Bus,
    stop: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with agent.serve(bus):
        task_status.started()
        await stop.wait()


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
        from swarmbus._coordinator import run_parallel

        return await run_parallel(bus, spec, local, session=session)
