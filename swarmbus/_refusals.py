"""The server's permission refusals, matched to the operations waiting on them.

NATS answers a publish or subscribe outside the user's permissions with an asynchronous
``-ERR`` on the connection, not on the operation itself: without this a refused
JetStream publish would only time out. An operation registers its subject for the
duration of a block (``guard``); the connection's error callback hands each error to
``wake``, which marks (and, if asked, cancels) the blocks waiting on that subject.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import anyio

from swarmbus._jetstream.errors import NatsError, denied

# nats-py lower-cases the server's -ERR text before handing it to the error callback.
_PERMISSION_VIOLATION: Final = re.compile(
    r'permissions violation for (?:publish|subscription) to "([^"]+)"'
)


@dataclass
class _Refusal:
    """An operation waiting to learn whether the server refuses its subject."""

    cancel: bool
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    reason: str | None = None


class Refusals:
    """The operations of one connection waiting to learn whether a subject is refused."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[_Refusal]] = {}

    def wake(self, error: str) -> tuple[str | None, bool]:
        """Wake the operations waiting on the subject ``error`` refuses.

        Returns the refused subject (lower-cased; None if ``error`` is no refusal) and
        whether an operation was waiting on it.
        """
        match = _PERMISSION_VIOLATION.search(error)
        if match is None:
            return None, False
        waiting = self._waiting.get(match[1])
        for refusal in waiting or ():
            refusal.reason = error
            if refusal.cancel:
                refusal.scope.cancel()
        return match[1], bool(waiting)

    @contextlib.contextmanager
    def guard(self, subject: str, what: str, *, cancel: bool = True) -> Iterator[None]:
        """Raise PermissionDeniedError if the server refuses ``subject`` during the block.

        With ``cancel`` the block is cancelled as soon as the refusal arrives; otherwise
        it runs to its end (a flush, which must not be cancelled) and the refusal is
        raised after it.
        """
        key = subject.lower()
        refusal = _Refusal(cancel=cancel)
        self._waiting.setdefault(key, []).append(refusal)
        try:
            with refusal.scope:
                yield
        except NatsError as exc:
            if refusal.reason is None:
                raise
            raise denied(what, subject) from exc
        finally:
            waiting = self._waiting[key]
            waiting.remove(refusal)
            if not waiting:
                del self._waiting[key]
        if refusal.reason is not None:
            raise denied(what, subject)
