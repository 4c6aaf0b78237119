"""The swarmbus error tree.

Every error swarmbus raises derives from ``SwarmbusError``; nats-py exceptions never
leak out of the transport layer (they are chained with ``raise ... from``)::

    SwarmbusError
    ├── InvalidIdentifierError (ValueError)
    ├── InvalidMessageError (ValueError)
    ├── MessageTooLargeError (InvalidMessageError)
    │   └── ValueTooLargeError
    ├── ServerError
    │   ├── ServerBinaryNotFoundError (FileNotFoundError)
    │   ├── ServerStartError
    │   └── ServerVersionError
    ├── ConnectionError
    ├── PublishError
    ├── NoResponderError
    ├── RequestTimeoutError (TimeoutError)
    ├── RemoteError
    ├── NotFoundError (KeyError)
    ├── ConflictError
    │   ├── AlreadyVotedError
    │   └── TaskClaimLostError
    ├── InvalidTaskError (ValueError)
    ├── InvalidTransitionError (ValueError)
    ├── PermissionDeniedError (PermissionError)
    │   └── NotEligibleError
    ├── ProposalClosedError
    ├── DecisionTimeoutError (TimeoutError)
    ├── InvalidTTLError (ValueError)
    ├── LockLostError
    ├── LockTimeoutError (TimeoutError)
    ├── MissingDependencyError (ImportError)
    ├── SpecError (ValueError)
    └── QueryTimeoutError (TimeoutError)
"""

from __future__ import annotations

__all__ = [
    "AlreadyVotedError",
    "ConflictError",
    "ConnectionError",
    "DecisionTimeoutError",
    "InvalidIdentifierError",
    "InvalidMessageError",
    "InvalidTTLError",
    "InvalidTaskError",
    "InvalidTransitionError",
    "LockLostError",
    "LockTimeoutError",
    "MessageTooLargeError",
    "MissingDependencyError",
    "NoResponderError",
    "NotEligibleError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProposalClosedError",
    "PublishError",
    "QueryTimeoutError",
    "RemoteError",
    "RequestTimeoutError",
    "ServerBinaryNotFoundError",
    "ServerError",
    "ServerStartError",
    "ServerVersionError",
    "SpecError",
    "SwarmbusError",
    "TaskClaimLostError",
    "ValueTooLargeError",
]

import builtins
from collections.abc import Sequence


class SwarmbusError(Exception):
    """Root of every error swarmbus raises."""


class InvalidIdentifierError(SwarmbusError, ValueError):
    """An agent id, session id, capability or similar name breaks the contract."""

    def __init__(self, kind: str, value: object, rule: str) -> None:
        self.kind = kind
        self.value = value
        self.rule = rule
        super().__init__(f"invalid {kind} {value!r}: {rule}")


class InvalidMessageError(SwarmbusError, ValueError):
    """Bytes or a value that is not a valid swarmbus message.

    ``code`` is a short machine-readable reason (``not_json``, ``not_envelope``,
    ``schema``, ``too_large``, ``source_mismatch``, ``wrong_subject``).
    """

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


class MessageTooLargeError(InvalidMessageError):
    """A message exceeds the configured size limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__("too_large", f"message is {size} bytes, limit is {limit}")


class ValueTooLargeError(MessageTooLargeError):
    """A value to store (e.g. a blackboard entry) exceeds its size limit."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        super().__init__(size, limit)
        self.key = key
        self.reason = f"value for {key!r} is {size} bytes, limit is {limit}"
        self.args = (f"too_large: {self.reason}",)


class ServerError(SwarmbusError):
    """The NATS server could not be found, started or used."""


class ServerBinaryNotFoundError(ServerError, FileNotFoundError):
    """No nats-server binary was found in any of the places swarmbus looks."""


class ServerStartError(ServerError):
    """nats-server exited or did not become ready."""


class ServerVersionError(ServerError):
    """The server is too old for swarmbus (per-message TTL needs 2.11)."""

    def __init__(self, version: str, minimum: str) -> None:
        self.version = version
        self.minimum = minimum
        super().__init__(f"nats-server {version} is too old: swarmbus needs {minimum} or newer")


class ConnectionError(SwarmbusError, builtins.ConnectionError):
    """Could not connect to NATS, or the connection is closed."""


class PublishError(SwarmbusError):
    """The server did not accept (or acknowledge) a publish."""


class NoResponderError(SwarmbusError):
    """A request found no agent listening for that capability/target."""

    def __init__(self, capability: str, to: str) -> None:
        self.capability = capability
        self.to = to
        super().__init__(f"no agent answers capability {capability!r} (to={to!r})")


class RequestTimeoutError(SwarmbusError, TimeoutError):
    """A responder exists but did not answer in time."""

    def __init__(
        self, capability: str, to: str, timeout: float, refused: Sequence[str] = ()
    ) -> None:
        self.capability = capability
        self.to = to
        self.timeout = timeout
        #: Answers that came but were not the request's (forged, wrong request id):
        #: "<code>: <reason>" each.
        self.refused = tuple(refused)
        message = f"request for {capability!r} (to={to!r}) timed out after {timeout:g}s"
        if refused:
            message += f"; {len(refused)} answer(s) refused, first: {refused[0]}"
        super().__init__(message)


class RemoteError(SwarmbusError):
    """The remote side answered with an error."""


class NotFoundError(SwarmbusError, KeyError):
    """A named thing (session, task, proposal, key) does not exist."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(f"{kind} {name!r} not found")

    def __str__(self) -> str:
        return str(self.args[0])


class ConflictError(SwarmbusError):
    """A compare-and-set lost: someone else changed the value first."""

    def __init__(self, key: str, expected_revision: int | None, detail: str = "") -> None:
        self.key = key
        self.expected_revision = expected_revision
        msg = f"conflict on {key!r} (expected revision {expected_revision})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class TaskClaimLostError(ConflictError):
    """A worker's claim on a task expired and the task moved on; its call changed nothing."""

    def __init__(self, task_id: str, attempt: int, current_attempt: int, status: str) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.current_attempt = current_attempt
        self.status = status
        super().__init__(
            task_id,
            None,
            f"claim {attempt} of task {task_id} was lost "
            f"(task is {status}, at attempt {current_attempt})",
        )


class InvalidTaskError(SwarmbusError, ValueError):
    """A task (or queue option) with a bad field: priority, type, parameters, result."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid task {field}: {reason}")


class InvalidTransitionError(SwarmbusError, ValueError):
    """A status change that the state machine does not allow."""

    def __init__(self, kind: str, name: str, current: str, requested: str) -> None:
        self.kind = kind
        self.name = name
        self.current = current
        self.requested = requested
        super().__init__(f"{kind} {name!r}: cannot go from {current!r} to {requested!r}")


class PermissionDeniedError(SwarmbusError, PermissionError):
    """The server or a swarmbus rule refused an operation for this identity."""


class AlreadyVotedError(ConflictError):
    """An agent voted a second time on a proposal (votes are final)."""

    def __init__(self, proposal_id: str, agent: str) -> None:
        self.proposal_id = proposal_id
        self.agent = agent
        super().__init__(proposal_id, None, f"{agent} already voted; votes are final")


class NotEligibleError(PermissionDeniedError):
    """An agent outside a proposal's electorate tried to vote."""

    def __init__(self, proposal_id: str, agent: str) -> None:
        self.proposal_id = proposal_id
        self.agent = agent
        super().__init__(f"{agent} may not vote on proposal {proposal_id!r}")


class ProposalClosedError(SwarmbusError):
    """A vote arrived after the proposal was decided or its timeout passed."""

    def __init__(self, proposal_id: str, outcome: str | None) -> None:
        self.proposal_id = proposal_id
        self.outcome = outcome
        state = f"decided ({outcome})" if outcome else "past its timeout"
        super().__init__(f"proposal {proposal_id!r} is closed: {state}")


class DecisionTimeoutError(SwarmbusError, TimeoutError):
    """No decision on a proposal arrived within the wait's timeout."""

    def __init__(self, proposal_id: str, timeout: float) -> None:
        self.proposal_id = proposal_id
        self.timeout = timeout
        super().__init__(f"no decision on proposal {proposal_id!r} within {timeout:g}s")


class InvalidTTLError(SwarmbusError, ValueError):
    """A TTL that the server cannot apply (per-key TTLs are whole seconds, at least 1)."""

    def __init__(self, ttl: object) -> None:
        self.ttl = ttl
        super().__init__(f"invalid TTL {ttl!r}: use a finite number of seconds > 0")


class LockLostError(SwarmbusError):
    """The lock is not (or no longer) held by this holder: released, expired or taken.

    ``token`` is the fencing token of the lost lease (None if it was never acquired).
    """

    def __init__(self, resource: str, owner: str, token: int | None) -> None:
        self.resource = resource
        self.owner = owner
        self.token = token
        if token is None:
            super().__init__(f"{owner} does not hold the lock on {resource!r}")
        else:
            super().__init__(f"{owner} lost the lock on {resource!r} (token {token})")


class LockTimeoutError(SwarmbusError, TimeoutError):
    """A lock was not acquired within the timeout."""

    def __init__(self, resource: str, owner: str, timeout: float | None) -> None:
        self.resource = resource
        self.owner = owner
        self.timeout = timeout
        super().__init__(f"{owner} did not get the lock on {resource!r} within {timeout}s")


class MissingDependencyError(SwarmbusError, ImportError):
    """An optional feature was asked for without its extra installed."""

    def __init__(self, feature: str, extra: str) -> None:
        self.feature = feature
        self.extra = extra
        super().__init__(f"{feature} needs the {extra} extra: pip install 'swarmbus[{extra}]'")


class SpecError(SwarmbusError, ValueError):
    """A swarm spec (YAML) that cannot be read or does not validate.

    ``problems`` holds ``(field, message)`` pairs, the field as a dotted path such as
    ``swarm.coordination.timeout``.
    """

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {field}: {message}" for field, message in problems)
        super().__init__(f"bad swarm spec {source}:\n{lines}")


class QueryTimeoutError(SwarmbusError, TimeoutError):
    """Waiting for another agent's run of the same evidence query took too long."""

    def __init__(self, source: str, query: str, timeout: float) -> None:
        self.source = source
        self.query = query
        self.timeout = timeout
        super().__init__(f"evidence query {source}:{query!r} not answered within {timeout:g}s")
