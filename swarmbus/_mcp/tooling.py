"""How a Swarm method becomes a tool: names, error messages a model can act on, pages."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

import msgspec
import pydantic
from mcp.server.mcpserver.exceptions import ToolError

from swarmbus._errors import (
    AlreadyVotedError,
    ConflictError,
    InvalidMessageError,
    LockLostError,
    MessageTooLargeError,
    NotEligibleError,
    NotFoundError,
    ProposalClosedError,
    SwarmbusError,
    TaskClaimLostError,
)

__all__ = [
    "TOOL_METHODS",
    "TOOL_NAME_PATTERN",
    "explain",
    "explain_validation",
    "page",
    "plain",
    "rename",
    "tool",
    "tool_name",
]

P = ParamSpec("P")
R = TypeVar("R")

#: What Claude Desktop, the OpenAI API, Copilot CLI and Windsurf accept as a tool name.
TOOL_NAME_PATTERN: Final = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

#: Swarm method -> read only; each is served as the tool ``swarm_<method>``.
TOOL_METHODS: dict[str, bool] = {}


def tool_name(method: str, *, dotted: bool = False) -> str:
    """The tool name of a Swarm method: ``swarm_<method>`` (or the seed's ``swarm.<method>``)."""
    return f"swarm.{method}" if dotted else f"swarm_{method}"


_MENTION = re.compile(r"\bswarm_([a-z_]+)")


def rename(text: str, *, dotted: bool) -> str:
    """``text`` with every tool it mentions spelled as served."""
    if not dotted:
        return text
    return _MENTION.sub(lambda m: f"swarm.{m[1]}" if m[1] in TOOL_METHODS else m[0], text)


_HINTS: Final[dict[str, str]] = {
    "session": "Call swarm_list_sessions to see the sessions, or swarm_start_session to start one.",
    "task": "Call swarm_list_tasks to see the session's tasks and their ids.",
    "proposal": "Use the proposal_id returned by swarm_propose_action.",
    "hypothesis": "Call swarm_get_blackboard to see the hypotheses and their ids.",
}


def hint(kind: str) -> str:
    """What to do about an unknown ``kind``."""
    return _HINTS.get(kind, "")


def explain(exc: SwarmbusError) -> str:
    """A message that says what went wrong and what to do about it (no internals)."""
    match exc:
        case NotFoundError(kind=kind):
            return f"{exc}. {hint(kind)}".strip()
        case AlreadyVotedError(proposal_id=pid, agent=agent):
            return (
                f"{agent} already voted on proposal {pid!r}; votes are final. Call "
                "swarm_get_proposal to see the votes and the decision."
            )
        case ProposalClosedError():
            return f"{exc}. Call swarm_get_proposal to see the votes and the decision."
        case NotEligibleError():
            return (
                f"{exc}: only its electorate votes (the voters it names, else the agents that "
                "had joined the session when it was proposed)."
            )
        case TaskClaimLostError():
            return (
                f"your claim on task {exc.task_id} lapsed (the task is {exc.status}, at attempt "
                f"{exc.current_attempt}). Your result was not recorded; claim another task."
            )
        case MessageTooLargeError():
            return f"too large: {exc.reason}. Shorten it."
        case InvalidMessageError():
            return f"invalid input: {exc.reason}"
        case LockLostError():
            return f"{exc}. Take it again with swarm_acquire_lock."
        case ConflictError():
            return (
                "someone else changed it at the same moment; read it again and retry if it "
                "still makes sense."
            )
        case _:
            return str(exc)


def explain_validation(tool: str, error: pydantic.ValidationError) -> str:
    """Bad arguments, field by field, without pydantic's internals or links."""
    problems = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"] if part != "arguments") or "input"
        if item["type"] == "missing":
            problems.append(f"{field}: missing (required)")
        else:
            problems.append(f"{field}: {item['msg']} (you sent {item.get('input')!r:.80})")
    return f"invalid arguments to {tool}: " + "; ".join(problems) + ". See the tool's schema."


class _HasNames(Protocol):
    dotted: bool


S = TypeVar("S", bound=_HasNames)


def tool(
    *, read_only: bool = False
) -> Callable[
    [Callable[Concatenate[S, P], Awaitable[R]]], Callable[Concatenate[S, P], Awaitable[R]]
]:
    """Serve a Swarm method as ``swarm_<name>`` (its docstring is the description).

    Swarmbus errors it raises become tool errors (``isError`` results the LLM reads).
    """

    def register(
        fn: Callable[Concatenate[S, P], Awaitable[R]],
    ) -> Callable[Concatenate[S, P], Awaitable[R]]:
        TOOL_METHODS[fn.__name__] = read_only

        @functools.wraps(fn)
        async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(self, *args, **kwargs)
            except SwarmbusError as exc:
                raise ToolError(rename(explain(exc), dotted=self.dotted)) from exc
            except ToolError as exc:
                raise ToolError(rename(str(exc), dotted=self.dotted)) from exc

        return call

    return register


def plain(value: Any) -> Any:
    """A record as JSON-ready builtins (timestamps as RFC 3339 strings)."""
    return msgspec.to_builtins(value)


T = TypeVar("T")


def page(items: Sequence[T], cursor: str | None, limit: int) -> tuple[list[T], str | None]:
    """One page of ``items`` from ``cursor`` (an offset), and the next page's cursor."""
    try:
        start = int(cursor or 0)
    except ValueError:
        raise ToolError(
            f"invalid cursor {cursor!r}: pass the next_cursor of the previous page, or omit it"
        ) from None
    if start < 0:
        raise ToolError(f"invalid cursor {cursor!r}: pass a next_cursor you were given")
    end = start + limit
    return list(items[start:end]), str(end) if end < len(items) else None
