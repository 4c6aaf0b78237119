"""JSON Schema for the wire contract, generated from the message Structs.

``schemas/envelope.schema.json`` accepts any message (a union tagged on ``type``);
``schemas/<type>.schema.json`` accepts one message type. External services validate
against these; ``swarmbus schemas --check`` fails when they are stale.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Final

import msgspec

from swarmbus._messages import CONTRACT_VERSION, MESSAGE_TYPES, Message

SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
BASE_ID: Final = "https://swarmbus.dev/schemas/v{version}/"
NEWLINE: Final = "\n"
ASYNCAPI_FILE: Final = "asyncapi.json"


def _portable_value(key: str, value: Any) -> Any:
    if key == "pattern" and isinstance(value, str) and value.endswith(r"\Z"):
        return value[:-2] + "$"
    if key == "description" and isinstance(value, str):
        return inspect.cleandoc(value)
    if key in ("anyOf", "oneOf") and isinstance(value, list):
        # msgspec versions order the members of a union differently (``T | None``);
        # the order means nothing to a validator, so fix one.
        return sorted((_portable(v) for v in value), key=_canonical)
    return _portable(value)


def _canonical(node: Any) -> str:
    return json.dumps(node, sort_keys=True)


def _dropped(key: str, value: Any, node: dict[str, Any]) -> bool:
    # A timestamp's pattern is its rule: ``format: date-time`` would refuse the zone-less
    # form the decoder reads as UTC, and date-time checkers differ between languages.
    return key == "format" and value == "date-time" and "pattern" in node


def _portable(node: Any) -> Any:
    """The same schema from every msgspec version we allow, in every regex dialect.

    Python's end anchor ``\\Z`` is ``$`` in JSON Schema (ECMA-262) and Go's RE2. Python's
    ``re.search`` (Python's jsonschema) lets ``$`` match before a final newline, so every
    pattern also carries ``not: {pattern: "\\n"}``: then every validator refuses what the
    decoder refuses.
    Descriptions come from docstrings, which msgspec 0.23 dedents and older versions
    do not: ``inspect.cleandoc`` makes them equal.
    """
    if isinstance(node, dict):
        out = {k: _portable_value(k, v) for k, v in node.items() if not _dropped(k, v, node)}
        if isinstance(out.get("pattern"), str) and out["pattern"].endswith("$"):
            out["not"] = {"pattern": NEWLINE}
        return out
    if isinstance(node, list):
        return [_portable(v) for v in node]
    return node


def _document(schema: dict[str, Any], name: str, title: str) -> dict[str, Any]:
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": BASE_ID.format(version=CONTRACT_VERSION) + name,
        "title": title,
        **_portable(schema),
    }


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document (``schemas/asyncapi.json``)."""
    from swarmbus._runtime.asyncapi import document

    return document()


def _api_documents() -> dict[str, dict[str, Any]]:
    """``api/<op>.request.schema.json`` and ``api/<op>.reply.schema.json`` per operation."""
    from swarmbus._runtime.api import OPERATIONS, ApiError

    files: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        (request, result, error), defs = msgspec.json.schema_components(
            [op.request, op.result, ApiError], ref_template="#/$defs/{name}"
        )
        name = f"api/{op.name}.request.schema.json"
        files[name] = _document(
            {**request, "$defs": defs}, name, f"swarmbus API {op.name} request: {op.summary}"
        )
        reply = {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"ok": {"const": True}, "result": result},
                    "required": ["ok", "result"],
                },
                {
                    "type": "object",
                    "properties": {"ok": {"const": False}, "error": error},
                    "required": ["ok", "error"],
                },
            ],
            "$defs": defs,
        }
        name = f"api/{op.name}.reply.schema.json"
        files[name] = _document(reply, name, f"swarmbus API {op.name} reply")
    return files


def generate() -> dict[str, str]:
    """File name -> JSON text of every schema file (``api/`` names are in a subdirectory)."""
    files = {
        "envelope.schema.json": _document(
            msgspec.json.schema(Message), "envelope.schema.json", "swarmbus message (any type)"
        )
    }
    for cls in MESSAGE_TYPES:
        tag = cls.__struct_config__.tag
        name = f"{tag}.schema.json"
        files[name] = _document(msgspec.json.schema(cls), name, f"swarmbus {tag} message")
    files.update(_api_documents())
    texts = {name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in files.items()}
    texts[ASYNCAPI_FILE] = json.dumps(asyncapi_document(), indent=2) + "\n"
    return texts


def write(directory: Path) -> list[Path]:
    """Write every schema file into ``directory``; returns the paths written."""
    written = []
    for name, text in generate().items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Names of schema files that are missing, different or extra in ``directory``."""
    expected = generate()
    out = [
        n
        for n, t in expected.items()
        if not (directory / n).is_file() or (directory / n).read_text() != t
    ]
    present = [p.relative_to(directory).as_posix() for p in directory.rglob("*.schema.json")]
    extra = [name for name in present if name not in expected]
    return sorted(out + extra)
