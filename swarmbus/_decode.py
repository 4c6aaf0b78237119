"""One validated decode path for everything swarmbus reads from NATS.

Every payload, header and KV value that arrives was written by someone else: any agent
with a publish grant on its subject, or on one key of its bucket. So nothing read from
NATS is decoded in place; it goes through the functions here, which return a typed
value or raise ``InvalidMessageError`` with a ``code`` and a ``reason`` (the typed
refusal). msgspec's ``DecodeError``/``ValidationError``, ``ValueError`` from ``int()``
on a header, ``UnicodeDecodeError`` and ``RecursionError`` on deeply nested JSON never
escape: a caller catches one error and can dead-letter the item with its reason, so a
bad item can never end a worker or block a queue.

Refusal codes (CONTRACT.md "Bad input", plus what is not an envelope):

* ``too_large``: over the size limit, or nested too deeply to decode;
* ``not_json``: not JSON at all (random bytes, truncated JSON);
* ``schema``: JSON of the wrong shape or types;
* ``bad_header``: a header a program reads (a revision, a count) is malformed;
* ``bad_id``: an id that cannot name a key or a subject token;
* ``wrong_subject``: a value that contradicts the subject it was found on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, TypeVar

import msgspec

from swarmbus._errors import InvalidMessageError, MessageTooLargeError
from swarmbus._subjects import MAX_ID_LENGTH

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "MAX_STORED_BYTES",
    "decode_json",
    "header_count",
    "valid_id",
]

T = TypeVar("T")

DEFAULT_MAX_VALUE_BYTES: Final = 1024 * 1024
"""The size limit of a decoded value unless the caller gives its own."""
MAX_STORED_BYTES: Final = 8 * 1024 * 1024
"""The largest stored value worth parsing (swarmbus's own cap on any message)."""
_ID: Final = re.compile(r"[A-Za-z0-9_-]+")
_COUNT: Final = re.compile(r"[0-9]{1,19}")


def decode_json(
    decoder: msgspec.json.Decoder[T],
    data: bytes | None,
    *,
    what: str = "",
    max_bytes: int = DEFAULT_MAX_VALUE_BYTES,
) -> T:
    """``data`` decoded by ``decoder`` (a typed msgspec decoder), or a refusal.

    Args:
        decoder: the module-level decoder of the expected type.
        data: the bytes as read (None or empty: not JSON).
        what: names the item at the start of the reason (``"task record S-1.abc"``).
        max_bytes: larger data is refused without being parsed.

    Raises:
        InvalidMessageError: ``too_large``, ``not_json`` or ``schema``.
    """
    prefix = f"{what}: " if what else ""
    if data is None:
        raise InvalidMessageError("not_json", f"{prefix}no value")
    if len(data) > max_bytes:
        raise MessageTooLargeError(len(data), max_bytes)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidMessageError("schema", f"{prefix}{exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidMessageError("not_json", f"{prefix}{exc}") from None
    except RecursionError:
        # msgspec's depth limit: a few KB of brackets would otherwise escape as a crash.
        reason = f"{prefix}JSON nested too deeply to decode"
        raise InvalidMessageError("too_large", reason) from None
    except (ValueError, TypeError, UnicodeError) as exc:  # a custom type's own checks
        raise InvalidMessageError("schema", f"{prefix}{exc}") from None


def header_count(headers: Mapping[str, str] | None, name: str, *, default: int = 0) -> int:
    """The non-negative integer header ``name`` (``default`` if absent), or a refusal.

    Only ASCII digits are accepted: ``int()`` alone would also take ``" 7"``, ``"+7"``,
    Arabic-Indic digits and ``"1_000"``, and raise a bare ``ValueError`` on ``"abc"``.

    Raises:
        InvalidMessageError: ``bad_header``.
    """
    if not headers or name not in headers:
        return default
    value = headers[name]
    if not isinstance(value, str) or not _COUNT.fullmatch(value):
        raise InvalidMessageError(
            "bad_header", f"header {name} must be a count, got {str(value)[:40]!r}"
        )
    return int(value)


def valid_id(kind: str, value: object, *, max_length: int = MAX_ID_LENGTH) -> str:
    """``value`` if it can be one key token and one subject token, or a refusal.

    One token of ``[A-Za-z0-9_-]`` (the contract's names): no dot, wildcard, ``$``,
    whitespace or non-ASCII letter, so it can never address another key or subject.

    Raises:
        InvalidMessageError: ``bad_id``.
    """
    if not isinstance(value, str) or not 0 < len(value) <= max_length or not _ID.fullmatch(value):
        shown = value[:40] if isinstance(value, str) else type(value).__name__
        raise InvalidMessageError(
            "bad_id", f"{kind} {shown!r} is not 1-{max_length} characters of [A-Za-z0-9_-]"
        )
    return value
