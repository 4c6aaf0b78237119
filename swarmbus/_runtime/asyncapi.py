"""The AsyncAPI 3.0 document of the wire, generated from the code beside the schemas.

Channels are the event subjects (``_messages.EVENT_OF``), capability requests, dead
letters and every runtime API operation (``api.OPERATIONS``) with its reply; message
payloads ``$ref`` the JSON Schema files next to it (``schemas/``), so the two cannot
disagree. Only our own strings go in (no docstrings): the text does not depend on the
installed version of a dependency.
"""

from __future__ import annotations

from typing import Any, Final

from swarmbus._messages import EVENT_OF, MESSAGE_TYPES
from swarmbus._runtime.api import OPERATIONS

ASYNCAPI_VERSION: Final = "3.0.0"
DOCUMENT_VERSION: Final = "1.1.0"

_PARAMETERS: Final = {
    "session": {"description": "session id: one token of [A-Za-z0-9_-]"},
    "agent": {"description": "the publisher's (requester's) agent id; '/' joins tokens"},
    "capability": {"description": "capability name: one token of [A-Za-z0-9_-]"},
    "target": {"description": "an agent id, or 'any'"},
    "receiver": {"description": "the agent id that rejected the message"},
    "requester": {"description": "the requester's agent id (only it may read these)"},
    "inbox": {"description": "a random token of the requester's connection"},
    "request_id": {"description": "the request's envelope id"},
    "responder": {
        "description": "the responder's agent id, bound to it by the server's permissions"
    },
}


def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}


def _params(*names: str) -> dict[str, Any]:
    return {name: _PARAMETERS[name] for name in names}


def _events(channels: dict[str, Any], operations: dict[str, Any], messages: dict[str, Any]) -> None:
    by_subject: dict[tuple[str, str], list[str]] = {}
    for cls in MESSAGE_TYPES:
        tag = str(cls.__struct_config__.tag)
        messages[tag] = {
            "name": tag,
            "title": f"{tag} envelope",
            "contentType": "application/json",
            "payload": _ref(f"{tag}.schema.json"),
        }
        route = EVENT_OF[cls]
        if route is not None:
            by_subject.setdefault(route, []).append(tag)
    for (domain, event), tags in sorted(by_subject.items()):
        name = f"agent.{domain}.{event}"
        channels[name] = {
            "address": f"agent.{domain}.{event}.{{session}}.{{agent}}",
            "description": f"{domain}.{event} events (stored in the event stream)",
            "parameters": _params("session", "agent"),
            "messages": {tag: _ref(f"#/components/messages/{tag}") for tag in sorted(tags)},
        }
        operations[f"publish.{domain}.{event}"] = {
            "action": "send",
            "channel": _ref(f"#/channels/{name}"),
            "messages": [_ref(f"#/channels/{name}/messages/{tag}") for tag in sorted(tags)],
        }
        operations[f"receive.{domain}.{event}"] = {
            "action": "receive",
            "channel": _ref(f"#/channels/{name}"),
            "messages": [_ref(f"#/channels/{name}/messages/{tag}") for tag in sorted(tags)],
        }


def _requests(channels: dict[str, Any], operations: dict[str, Any]) -> None:
    channels["swarmbus.request"] = {
        "address": "swarmbus.request.{capability}.{target}.{session}.{agent}",
        "description": "a capability request (core NATS request/reply)",
        "parameters": _params("capability", "target", "session", "agent"),
        "messages": {"request": _ref("#/components/messages/request")},
    }
    channels["swarmbus.request.reply"] = {
        "address": None,
        "description": (
            "the request's reply subject: a plain inbox, answered on itself, or a verified "
            "reply subject (swarmbus.reply.{requester}.{inbox}.{request_id}), answered on "
            "the swarmbus.reply channel"
        ),
        "messages": {"response": _ref("#/components/messages/response")},
    }
    channels["swarmbus.reply"] = {
        "address": "swarmbus.reply.{requester}.{inbox}.{request_id}.{responder}",
        "description": (
            "the answer to a request with a verified reply subject: that subject plus the "
            "responder's agent id (CONTRACT.md, Verified replies)"
        ),
        "parameters": _params("requester", "inbox", "request_id", "responder"),
        "messages": {"response": _ref("#/components/messages/response")},
    }
    operations["request"] = {
        "action": "send",
        "channel": _ref("#/channels/swarmbus.request"),
        "reply": {"channel": _ref("#/channels/swarmbus.request.reply")},
    }
    operations["reply"] = {
        "action": "send",
        "channel": _ref("#/channels/swarmbus.reply"),
        "messages": [_ref("#/channels/swarmbus.reply/messages/response")],
    }
    channels["swarmbus.dead"] = {
        "address": "swarmbus.dead.{session}.{receiver}",
        "description": "original bytes of a rejected message (headers say why)",
        "parameters": _params("session", "receiver"),
        "messages": {"rejected": {"name": "rejected", "payload": {}}},
    }
    operations["receive.dead"] = {"action": "receive", "channel": _ref("#/channels/swarmbus.dead")}


def _api(channels: dict[str, Any], operations: dict[str, Any], messages: dict[str, Any]) -> None:
    for op in OPERATIONS:
        base = f"api/{op.name}"
        messages[f"api.{op.name}.request"] = {
            "name": f"{op.name}.request",
            "contentType": "application/json",
            "payload": _ref(f"{base}.request.schema.json"),
        }
        messages[f"api.{op.name}.reply"] = {
            "name": f"{op.name}.reply",
            "contentType": "application/json",
            "payload": _ref(f"{base}.reply.schema.json"),
        }
        channels[f"swarmbus.api.{op.name}"] = {
            "address": f"swarmbus.api.{op.name}.{{session}}.{{agent}}",
            "description": op.summary,
            "parameters": _params("session", "agent"),
            "messages": {"request": _ref(f"#/components/messages/api.{op.name}.request")},
        }
        channels[f"swarmbus.api.{op.name}.reply"] = {
            "address": None,
            "messages": {"reply": _ref(f"#/components/messages/api.{op.name}.reply")},
        }
        operations[f"api.{op.name}"] = {
            "action": "send",
            "summary": op.summary,
            "channel": _ref(f"#/channels/swarmbus.api.{op.name}"),
            "reply": {"channel": _ref(f"#/channels/swarmbus.api.{op.name}.reply")},
        }


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document as plain data."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    _events(channels, operations, messages)
    _requests(channels, operations)
    _api(channels, operations, messages)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "swarmbus wire contract",
            "version": DOCUMENT_VERSION,
            "description": "Events, capability requests and the runtime API of swarmbus "
            "(CONTRACT.md). Payloads are the JSON Schemas beside this file.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "swarmbus up"}
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
