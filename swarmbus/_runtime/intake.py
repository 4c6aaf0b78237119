"""Incident intake: an incident from any service starts the swarm configured for it.

The intake file maps incident kinds and labels to swarm specs (paths relative to the
file)::

    kinds:
      deploy-regression: specs/parallel_investigation.yaml
    labels:
      team=payments: specs/payments.yaml
    default: specs/triage.yaml        # optional: any other incident

An incident opens by ``swarmbus.api.incident.open.<session>.<agent>`` or by a
``session.started`` event whose context carries ``kind`` (and ``labels``). The first
match wins: the kind, then each label in the order the file lists them, then
``default``. A matched incident runs its swarm (``run_swarm``) in the runtime with no
local agents: the spec's agents claim their subtasks through the task API or
``serve_workers``. An incident without a match only starts its session's board.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

import anyio
import pydantic
import yaml
from anyio.abc import TaskGroup
from pydantic import BaseModel, ConfigDict

from swarmbus._blackboard import Blackboard, SessionRecord
from swarmbus._bus import Bus
from swarmbus._errors import ConflictError, NotFoundError, SpecError, SwarmbusError
from swarmbus._runtime import api
from swarmbus._spec import ParallelInvestigation, ProgressiveRefinement, load_spec
from swarmbus._swarm import run_swarm
from swarmbus._yaml import load_yaml

log = logging.getLogger("swarmbus.runtime")

Spec = ParallelInvestigation | ProgressiveRefinement
INTAKE_AGENT: Final = "swarmbus/intake"


class _IntakeFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kinds: dict[str, str] = {}
    labels: dict[str, str] = {}
    default: str | None = None


class Routes:
    """Incident kind / label -> (spec path, spec), loaded and validated up front."""

    def __init__(
        self,
        kinds: dict[str, tuple[str, Spec]] | None = None,
        labels: dict[str, tuple[str, Spec]] | None = None,
        default: tuple[str, Spec] | None = None,
    ) -> None:
        self.kinds = kinds or {}
        self.labels = labels or {}
        self.default = default

    @classmethod
    def load(cls, path: str | Path) -> Routes:
        """Read an intake file and every spec it names.

        Raises:
            SpecError: the file or one of its specs is missing or invalid.
        """
        source = str(path)
        try:
            data = load_yaml(Path(path).read_text(encoding="utf-8"))
            parsed = _IntakeFile.model_validate(data or {})
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SpecError(source, [("(file)", str(exc))]) from None
        except pydantic.ValidationError as exc:
            problems = [(".".join(map(str, e["loc"])), e["msg"]) for e in exc.errors()]
            raise SpecError(source, problems) from None
        for label in parsed.labels:
            if "=" not in label:
                raise SpecError(source, [(f"labels.{label}", "write labels as key=value")])
        base = Path(path).parent

        def spec(name: str) -> tuple[str, Spec]:
            return name, load_spec(base / name)

        return cls(
            {k: spec(v) for k, v in parsed.kinds.items()},
            {k: spec(v) for k, v in parsed.labels.items()},
            spec(parsed.default) if parsed.default else None,
        )

    def match(self, kind: str, labels: dict[str, str]) -> tuple[str, Spec] | None:
        """The spec for an incident, or None."""
        if kind in self.kinds:
            return self.kinds[kind]
        for label, route in self.labels.items():
            key, _, value = label.partition("=")
            if labels.get(key) == value:
                return route
        return self.default


class Intake:
    """Opens and closes incidents; runs their swarms in ``tg`` until they finish.

    Args:
        bus: the runtime's connection.
        routes: which spec each incident gets.
        tg: where swarms run (cancelled when the runtime stops).
    """

    def __init__(self, bus: Bus, routes: Routes, tg: TaskGroup) -> None:
        self.bus = bus
        self.routes = routes
        self.tg = tg
        self.running: dict[str, anyio.CancelScope] = {}

    async def open(self, session: str, agent: str, request: api.IncidentOpen) -> api.IncidentOpened:
        """Start the incident's swarm (or only its board, without a matching spec)."""
        board = await Blackboard.open(self.bus, session)
        if session in self.running or await _started(board):
            return api.IncidentOpened(session=session, already_open=True)
        route = self.routes.match(request.kind, request.labels)
        if route is None:
            try:
                await board.start(agent, _context(request))
            except ConflictError:
                return api.IncidentOpened(session=session, already_open=True)
            return api.IncidentOpened(session=session)
        name, spec = route
        scope = anyio.CancelScope()
        self.running[session] = scope
        self.tg.start_soon(self._run, session, spec, scope)
        return api.IncidentOpened(session=session, swarm=spec.type, spec=name)

    async def close(self, session: str, agent: str, outcome: dict[str, Any]) -> SessionRecord:
        """Stop the incident's swarm if it still runs, and complete its board."""
        scope = self.running.pop(session, None)
        if scope is not None:
            scope.cancel()
        board = await Blackboard.open(self.bus, session)
        return await board.complete(outcome, agent=agent)

    async def _run(self, session: str, spec: Spec, scope: anyio.CancelScope) -> None:
        with scope:
            try:
                result = await run_swarm(self.bus, spec, [], session=session)
                log.info("swarm %s of %s: %s", spec.type, session, result.status)
            except SwarmbusError as exc:
                log.error("swarm %s of %s failed: %s", spec.type, session, exc)
        self.running.pop(session, None)


async def _started(board: Blackboard) -> bool:
    try:
        await board.info()
    except NotFoundError:
        return False
    return True


def _context(request: api.IncidentOpen) -> dict[str, Any]:
    context = dict(request.context)
    context.setdefault("kind", request.kind)
    if request.title:
        context.setdefault("title", request.title)
    if request.labels:
        context.setdefault("labels", dict(request.labels))
    return context
