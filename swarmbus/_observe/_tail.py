"""``swarmbus tail``: live events, one readable line (or one JSON object) each."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Final

import msgspec

from swarmbus import _subjects as subjects
from swarmbus._bus import Bus
from swarmbus._observe._events import Follower, Step, printable
from swarmbus._observe._timeline import Timeline, forget_oldest

#: Sessions a tail follows at once; beyond it the one idle longest is forgotten (a
#: session never completed must not be kept forever by a tail that runs for weeks).
LIVE_SESSIONS_LIMIT: Final = 1_000


def type_matches(step: Step, types: Iterable[str]) -> bool:
    """Whether ``step``'s type is one of ``types``; ``task`` matches every ``task.*``."""
    wanted = list(types)
    return not wanted or any(step.type == t or step.type.startswith(f"{t}.") for t in wanted)


def agent_matches(step: Step, agents: Iterable[str]) -> bool:
    """Whether ``step``'s agent is one of ``agents``; ``ops`` matches every ``ops/...``."""
    wanted = list(agents)
    return not wanted or any(
        step.agent == a or step.agent.startswith(f"{a.rstrip('/')}/") for a in wanted
    )


def step_json(step: Step, text: str) -> dict[str, Any]:
    """A step as one JSON object (``tail --json``)."""
    return {
        "seq": step.seq,
        "time": step.time.isoformat(),
        "session": step.session,
        "agent": step.agent,
        "type": step.type,
        "subject": step.subject,
        "text": text,
        "trace_id": step.trace_id,
        "message": msgspec.to_builtins(step.message) if step.message is not None else None,
        "error": step.error,
    }


class Tail:
    """Follows events (of one session or all) and echoes those that pass the filters.

    Each session's steps are folded into a ``Timeline``, so task lines carry durations.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        session: str | None = None,
        types: Iterable[str] = (),
        agents: Iterable[str] = (),
        as_json: bool = False,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.bus = bus
        self.session = session
        self.types = tuple(types)
        self.agents = tuple(agents)
        self.as_json = as_json
        self.echo = echo
        self.shown = 0
        self._timelines: dict[str, Timeline] = {}

    @property
    def filter(self) -> str:
        return subjects.session_filter(self.session) if self.session else subjects.EVENTS_WILDCARD

    def line(self, step: Step) -> str | None:
        """Fold ``step`` in; its output line, or None if the filters drop it."""
        timeline = self._timelines.pop(step.session, None)
        if timeline is None:
            timeline = Timeline(step.session, keep=False)
        text = timeline.add(step)
        if step.type != "session.completed":
            self._timelines[step.session] = timeline  # now the most recently active
            forget_oldest(self._timelines, LIVE_SESSIONS_LIMIT)
        if not (type_matches(step, self.types) and agent_matches(step, self.agents)):
            return None
        if self.as_json:
            return json.dumps(step_json(step, text), default=str)
        clock = step.time.strftime("%H:%M:%S.%f")[:-3]
        where = "" if self.session else f"{step.session:<20} "
        trace = f"  [trace {step.trace_id}]" if step.trace_id else ""
        return printable(f"{clock}  {where}{step.agent:<32} {text}{trace}")

    async def run(
        self,
        *,
        from_start: bool = False,
        limit: int | None = None,
        ready: Callable[[], None] | None = None,
    ) -> int:
        """Echo events until cancelled or ``limit`` lines were shown; returns that count."""
        async with Follower(self.bus, self.filter, start="all" if from_start else "new") as f:
            if ready is not None:
                ready()
            async for step in f.steps():
                line = self.line(step)
                if line is None:
                    continue
                self.echo(line)
                self.shown += 1
                if limit is not None and self.shown >= limit:
                    break
        return self.shown
