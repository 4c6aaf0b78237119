"""The server's permission refusals, matched to the operations waiting on them.

NATS answers a publish or subscribe outside the user's permissions with an asynchronous
``-ERR`` on the connection, not on the operation itself: without this a refused
JetStream publish would only time out. An operation registers its subject for the
duration of a block (``guard``); the connection's error callback hands each error to
``wake``, which marks (and, if asked, cancels) the blocks waiting on that subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol

import anyio

from swarmbus._jetstream.errors import NatsError, denied

# nats-py lower-cases the server's -ERR text before handing it to the error callback.
_PERMISSION_VIOLATION: Final = re.compile(
    r'permissions violation for (?:publish|subscription) to "([^"]+)"'
)


class Cancellable(Protocol):
    """What a refusal interrupts: a cancel scope, a block, a pending request."""

    def cancel(self) -> None: ...


@dataclass
class _Refusal:
    """An operation waiting to learn whether the server refuses its subject."""

    cancel: bool
    scope: Cancellable
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
        scope = anyio.CancelScope()
        refusal = _Refusal(cancel=cancel, scope=scope)
        self._waiting.setdefault(key, []).append(refusal)
        try:
            with scope:
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

    def watch(self, key: str, target: Cancellable) -> _Refusal:
        """Cancel ``target`` if the subject ``key`` (lower-cased) is refused, until
        ``unwatch``: the cheapest registration, for a request that fails a future."""
        refusal = _Refusal(cancel=True, scope=target)
        self._waiting.setdefault(key, []).append(refusal)
        return refusal

    def unwatch(self, key: str, refusal: _Refusal) -> None:
        """Undo ``watch``."""
        waiting = self._waiting[key]
        waiting.remove(refusal)
        if not waiting:
            del self._waiting[key]

    def interrupting(self, subject: str, what: str) -> Interrupting:
        """``guard`` (cancelling) as an async context manager for hot paths."""
        return Interrupting(self, subject, what)


class Interrupting:
    """Raise PermissionDeniedError, interrupting the block, if ``subject`` is refused.

    The same as ``Refusals.guard`` with ``cancel``, without an anyio CancelScope (~10 us
    to create, enter and leave on every request): a refusal cancels the task directly,
    and leaving the block takes that cancellation back (``Task.uncancel``, as
    ``asyncio.timeout`` does), so an outer cancellation still propagates.
    """

    __slots__ = ("_cancelled", "_key", "_refusal", "_refusals", "_subject", "_task", "_what")

    def __init__(self, refusals: Refusals, subject: str, what: str) -> None:
        self._refusals = refusals
        self._subject = subject
        self._what = what
        self._key = subject.lower()
        self._refusal = _Refusal(cancel=True, scope=self)
        self._task: asyncio.Task[object] | None = None
        self._cancelled = False

    def cancel(self) -> None:
        """Interrupt the block (once), as a refusal for its subject arrived."""
        if self._task is not None and not self._cancelled:
            self._cancelled = True
            self._task.cancel()

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        self._refusals._waiting.setdefault(self._key, []).append(self._refusal)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        refusal, waiting = self._refusal, self._refusals._waiting
        queue = waiting[self._key]
        queue.remove(refusal)
        if not queue:
            del waiting[self._key]
        self._task, task = None, self._task
        if self._cancelled and task is not None and task.uncancel() == 0:
            # Ours was the only cancellation: the block ended because of the refusal.
            raise denied(self._what, self._subject) from exc
        if refusal.reason is not None and (exc is None or isinstance(exc, NatsError)):
            raise denied(self._what, self._subject) from exc
