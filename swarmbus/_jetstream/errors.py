"""The one mapping from nats-py's exceptions to swarmbus's error tree.

Every nats-py error that reaches swarmbus code is re-raised through here
(``raise translate(...) from exc``), so callers only ever see ``SwarmbusError``s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping

import nats.errors
import nats.js.errors

from swarmbus._errors import (
    ConnectionError,
    MessageTooLargeError,
    PermissionDeniedError,
    PublishError,
    SwarmbusError,
)
from swarmbus._jetstream.headers import EMPTY_HEADERS, WRONG_LAST_SEQUENCE, ErrorCode

__all__ = [
    "NatsError",
    "check_payload",
    "denied",
    "is_transient",
    "is_wrong_last_sequence",
    "nats_errors",
    "translate",
    "transport_error",
]

#: Everything nats-py raises for a failed call (a transport error or a JetStream refusal).
NatsError = (TimeoutError, nats.errors.Error)


def translate(exc: nats.js.errors.APIError, what: str) -> SwarmbusError:
    """The swarmbus error for a JetStream API refusal of ``what``."""
    description = exc.description or str(exc)
    if exc.code == 403 or "permission" in description.lower():
        return PermissionDeniedError(f"{what}: {description}")
    return PublishError(f"{what}: {description}")


def denied(what: str, subject: str) -> PermissionDeniedError:
    """The error for a publish or subscription the server's permissions refused."""
    return PermissionDeniedError(
        f"{what}: refused by the NATS server, {subject!r} is outside this user's permissions"
    )


def transport_error(exc: BaseException, what: str) -> SwarmbusError:
    """The swarmbus error for a transport failure (timeout, no connection) of ``what``."""
    text = str(exc) or type(exc).__name__
    if "permission" in text.lower() or "authorization" in text.lower():
        return PermissionDeniedError(f"{what}: {text}")
    if isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError)):
        return PublishError(f"{what}: timed out")
    return ConnectionError(f"{what}: {text}")


@contextlib.contextmanager
def nats_errors(what: str) -> Iterator[None]:
    """Re-raise any nats-py error inside the block as the swarmbus error for ``what``."""
    try:
        yield
    except nats.js.errors.APIError as exc:
        raise translate(exc, what) from exc
    except (TimeoutError, nats.errors.Error) as exc:
        raise transport_error(exc, what) from exc


def is_wrong_last_sequence(exc: BaseException) -> bool:
    """Whether ``exc`` is a compare-and-set that lost (10071 or 10164)."""
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return True  # nats-py's KV raises it without an err_code
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in WRONG_LAST_SEQUENCE


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is what a leader election or a reconnect looks like to a client."""
    if isinstance(exc, nats.js.errors.APIError):
        # 503: JetStream temporarily unavailable (no leader yet); 10005: no suitable
        # peers, a node is offline (just started, or restarting)
        return exc.code == 503 or exc.err_code == ErrorCode.NO_SUITABLE_PEERS
    return isinstance(
        exc,
        (
            nats.js.errors.NoStreamResponseError,
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            asyncio.TimeoutError,
        ),
    )


def check_payload(data: bytes, headers: Mapping[str, str] | None, limit: int) -> None:
    """MessageTooLargeError if ``data`` with ``headers`` exceeds ``limit`` (the server's
    max_payload). The server counts the header block too, and answers a message over it
    by closing the connection; nats-py checks only the payload."""
    size = len(data)
    if headers:  # a message without headers is sent as PUB, with none at all
        framing = len(EMPTY_HEADERS) + 4 * len(headers)  # ": " and CRLF per header
        chars = sum(len(k) + len(v) for k, v in headers.items())
        if size + framing + 4 * chars <= limit:  # UTF-8: at most 4 bytes per character
            return
        size += framing + sum(len(k.encode()) + len(v.encode()) for k, v in headers.items())
    if size > limit:
        raise MessageTooLargeError(size, limit)
