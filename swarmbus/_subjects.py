"""Identifiers and NATS subjects: the only module that builds or parses a subject.

Events (CONTRACT.md)::

    agent.<domain>.<event>.<session>.<agent>

where ``<agent>`` is the publisher, so a NATS publish permission on
``agent.*.*.*.<agent id>`` binds a user to one identity.

Requests are routed by capability outside ``agent.>`` (the event stream captures
``agent.>`` and would answer a request with a JetStream ack)::

    swarmbus.request.<capability>.<target>.<session>.<requester>

``<target>`` is an agent id or ``any`` (one agent of a queue group answers).
Dead letters: ``swarmbus.dead.<session>.<receiver>``.
Lock keys: ``$KV.<bucket>.<base64url(resource)>`` (see ``lock_key``); a release wakes
one waiting connection on ``swarmbus.lock.<bucket>.<key>`` (``lock_wake_subject``).
Task dispatch (work-queue stream): ``swarmbus.task.<session>.<type>.<priority>.<task id>``.

Runtime API (contract v1.1; request/reply, served by ``swarmbus up``)::

    swarmbus.api.<domain>.<verb>.<session>.<agent>

where ``<agent>`` is the requester, so ``swarmbus.api.*.*.*.<agent id>`` binds a user
to one identity as for events.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Final

from swarmbus._errors import InvalidIdentifierError

MAX_ID_LENGTH: Final = 128
TOKEN_PATTERN: Final = r"[A-Za-z0-9_-]+"
SESSION_ID_PATTERN: Final = rf"^{TOKEN_PATTERN}$"
AGENT_ID_PATTERN: Final = rf"^{TOKEN_PATTERN}(/{TOKEN_PATTERN})*$"
ANY: Final = "any"

EVENT_ROOT: Final = "agent"
EVENTS_WILDCARD: Final = "agent.>"
REQUEST_ROOT: Final = "swarmbus.request"
DEAD_LETTER_ROOT: Final = "swarmbus.dead"
DEAD_LETTER_WILDCARD: Final = "swarmbus.dead.>"
TASK_ROOT: Final = "swarmbus.task"
TASK_WILDCARD: Final = "swarmbus.task.>"
API_ROOT: Final = "swarmbus.api"
API_WILDCARD: Final = "swarmbus.api.>"
UNKNOWN: Final = "unknown"
KV_ROOT: Final = "$KV"
LOCK_WAKE_ROOT: Final = "swarmbus.lock"
LOCK_WAKE_WILDCARD: Final = "swarmbus.lock.>"
MAX_RESOURCE_BYTES: Final = 512

_session_re = re.compile(SESSION_ID_PATTERN)
_agent_re = re.compile(AGENT_ID_PATTERN)


def _check(kind: str, value: object, regex: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str):
        raise InvalidIdentifierError(kind, value, "must be a string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdentifierError(kind, value, f"longer than {MAX_ID_LENGTH} characters")
    if not regex.fullmatch(value):  # not match(): its '$' also accepts a trailing newline
        raise InvalidIdentifierError(kind, value, rule)
    return value


def validate_agent_id(value: object) -> str:
    """Return ``value`` if it is a contract agent id, else raise InvalidIdentifierError."""
    return _check("agent id", value, _agent_re, "use tokens of [A-Za-z0-9_-] joined by '/'")


def validate_session_id(value: object) -> str:
    """Return ``value`` if it is a contract session id, else raise InvalidIdentifierError."""
    return _check("session id", value, _session_re, "use one token of [A-Za-z0-9_-]")


def validate_name(kind: str, value: object) -> str:
    """Validate a capability, task type or other single-token name."""
    return _check(kind, value, _session_re, "use one token of [A-Za-z0-9_-]")


def event_subject(domain: str, event: str, session: str, agent: str) -> str:
    """``agent.<domain>.<event>.<session>.<agent>`` with both ids validated."""
    validate_session_id(session)
    validate_agent_id(agent)
    return f"{EVENT_ROOT}.{domain}.{event}.{session}.{agent}"


def event_filter(domain: str = "*", event: str = "*", session: str = "*", agent: str = "*") -> str:
    """A subscription filter over events; ``*`` for any token."""
    return f"{EVENT_ROOT}.{domain}.{event}.{session}.{agent}"


def session_filter(session: str) -> str:
    """Every event of one session."""
    return event_filter(session=validate_session_id(session))


def parse_event_subject(subject: str) -> tuple[str, str, str, str] | None:
    """Split an event subject into (domain, event, session, agent), or None if malformed."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != EVENT_ROOT:
        return None
    return parts[1], parts[2], parts[3], parts[4]


def request_subject(capability: str, target: str, session: str, requester: str) -> str:
    """Subject of a capability request to ``target`` (an agent id or ``any``)."""
    validate_name("capability", capability)
    if target != ANY:
        validate_agent_id(target)
    validate_session_id(session)
    validate_agent_id(requester)
    return f"{REQUEST_ROOT}.{capability}.{target}.{session}.{requester}"


def request_filter(capability: str, target: str) -> str:
    """What a responder subscribes to for ``capability`` addressed to ``target``."""
    return f"{REQUEST_ROOT}.{capability}.{target}.*.*"


def parse_request_subject(subject: str) -> tuple[str, str, str, str] | None:
    """Split a request subject into (capability, target, session, requester)."""
    parts = subject.split(".")
    if len(parts) != 6 or f"{parts[0]}.{parts[1]}" != REQUEST_ROOT:
        return None
    return parts[2], parts[3], parts[4], parts[5]


def api_subject(domain: str, verb: str, session: str, agent: str) -> str:
    """Subject of a runtime API request (``swarmbus.api.task.claim.INC-1234.ops/x``)."""
    validate_session_id(session)
    validate_agent_id(agent)
    return f"{API_ROOT}.{domain}.{verb}.{session}.{agent}"


def parse_api_subject(subject: str) -> tuple[str, str, str, str] | None:
    """Split an API subject into (domain, verb, session, agent), or None if malformed."""
    parts = subject.split(".")
    if len(parts) != 6 or f"{parts[0]}.{parts[1]}" != API_ROOT:
        return None
    return parts[2], parts[3], parts[4], parts[5]


def session_token(subject: str) -> str | None:
    """The session token of an event, request, API or task subject (None: not one)."""
    parsed = parse_event_subject(subject) or parse_request_subject(subject)
    parsed = parsed or parse_api_subject(subject)
    if parsed:
        return parsed[2]
    parts = subject.split(".")
    if len(parts) == 6 and f"{parts[0]}.{parts[1]}" == TASK_ROOT:
        return parts[2]
    return None


def dead_letter_subject(session: str | None, receiver: str) -> str:
    """Where a rejected message's original bytes are kept."""
    return f"{DEAD_LETTER_ROOT}.{session or UNKNOWN}.{receiver}"


def task_subject(session: str, type: str, priority: int | str) -> str:
    """The queue of a session's tasks of ``type`` at ``priority`` (or ``*``).

    A task's dispatch message goes to ``<queue>.<task id>``.
    """
    validate_session_id(session)
    validate_name("task type", type)
    return f"{TASK_ROOT}.{session}.{type}.{priority}"


def task_filter(session: str, task_id: str = "*") -> str:
    """The dispatch subjects of one task (by id, any type and priority) or of all."""
    validate_session_id(session)
    return f"{TASK_ROOT}.{session}.*.*.{task_id}"


def safe_token(value: str) -> str:
    """Map any string to a name usable as a consumer, bucket key or stream token.

    Keeps readable characters and appends a short hash so distinct inputs never
    collide (``ops/deploy-validator`` -> ``ops_deploy-validator-1a2b3c4d``).
    """
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", value)[:64]
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def lock_key(resource: object) -> str:
    """The KV key of a lock on ``resource``: unpadded base64url of its UTF-8 bytes.

    Injective and reversible (``resource_of_lock_key``), and only uses ``[A-Za-z0-9_-]``,
    so any string (``file:/src/main.py``, spaces, dots, ``*``, ``>``) is a safe key.
    """
    if not isinstance(resource, str):
        raise InvalidIdentifierError("lock resource", resource, "must be a string")
    try:
        data = resource.encode()
    except UnicodeEncodeError as exc:
        raise InvalidIdentifierError("lock resource", resource, "must be valid UTF-8") from exc
    if not data or len(data) > MAX_RESOURCE_BYTES:
        raise InvalidIdentifierError(
            "lock resource", resource, f"must be 1 to {MAX_RESOURCE_BYTES} UTF-8 bytes"
        )
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def resource_of_lock_key(key: str) -> str:
    """Invert ``lock_key`` (strictly: only keys that ``lock_key`` produces)."""
    try:
        data = base64.b64decode(key + "=" * (-len(key) % 4), altchars=b"-_", validate=True)
        resource = data.decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidIdentifierError("lock key", key, "not a base64url UTF-8 string") from exc
    if lock_key(resource) != key:
        raise InvalidIdentifierError("lock key", key, "not a canonical lock key")
    return resource


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV bucket stores ``key`` under (for compare-and-set publishes)."""
    return f"{KV_ROOT}.{bucket}.{key}"


def lock_wake_subject(bucket: str, key: str) -> str:
    """Where a release of lock ``key`` (a ``lock_key``) in ``bucket`` wakes one waiter.

    ``swarmbus.lock.<bucket>.<key>``: waiting connections queue-subscribe to it (queue
    group: the key), so NATS delivers each wake to one of them. ``key`` "" gives the
    prefix.
    """
    return f"{LOCK_WAKE_ROOT}.{bucket}.{key}"
