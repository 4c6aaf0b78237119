"""In-process metrics: what only the process itself knows, recorded by small functions.

Handler latency, lock waits and the events a process published. Core modules call
these in one line each; while metrics are off (no ``configure_metrics``) each costs
one boolean test, and ``observed``/``lock_wait`` add no coroutine frame. This module
imports only OpenTelemetry, so the bus and locks can import it without a cycle.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from opentelemetry import metrics

METER_NAME: Final = "swarmbus"
T = TypeVar("T")
M = TypeVar("M")

_meter = metrics.get_meter(METER_NAME)
#: True once a meter provider is installed (``configure_metrics``).
state = {"on": False}

_handler_duration = _meter.create_histogram(
    "swarmbus.handler.duration", unit="s", description="Time a handler took on one message"
)
_lock_wait = _meter.create_histogram(
    "swarmbus.lock.wait", unit="s", description="Time spent waiting to acquire a lock"
)
_published = _meter.create_counter(
    "swarmbus.events.published", description="Events this process published, by type"
)


def record_handler(seconds: float, *, type: str, receiver: str, failed: bool = False) -> None:
    """A handler of ``receiver`` took ``seconds`` on a ``type`` message."""
    if state["on"]:
        attributes = {"type": type, "receiver": receiver, "outcome": "error" if failed else "ok"}
        _handler_duration.record(seconds, attributes)


def record_lock_wait(seconds: float, *, acquired: bool) -> None:
    """A lock acquisition waited ``seconds`` (and got the lock or gave up)."""
    if state["on"]:
        _lock_wait.record(seconds, {"acquired": acquired})


def record_published(message: object) -> None:
    """This process published ``message`` (an envelope; counted by its type)."""
    if state["on"]:
        _published.add(1, {"type": str(getattr(message, "type", "unknown"))})


def observed(handler: Callable[[M], Awaitable[None]], message: M, receiver: str) -> Awaitable[None]:
    """``handler(message)``, timed while metrics are on (``await observed(h, m, r)``)."""
    if not state["on"]:
        return handler(message)
    return _timed_handler(handler, message, receiver)


async def _timed_handler(
    handler: Callable[[M], Awaitable[None]], message: M, receiver: str
) -> None:
    started, failed = time.perf_counter(), True
    try:
        await handler(message)
        failed = False
    finally:
        type = str(getattr(message, "type", "unknown"))
        record_handler(time.perf_counter() - started, type=type, receiver=receiver, failed=failed)


def lock_wait(waiting: Awaitable[T]) -> Awaitable[T]:
    """``waiting`` (a lock's wait for its lease), timed while metrics are on."""
    if not state["on"]:
        return waiting
    return _timed_wait(waiting)


async def _timed_wait(waiting: Awaitable[T]) -> T:
    started, acquired = time.perf_counter(), False
    try:
        result = await waiting
        acquired = result is not None
        return result
    finally:
        record_lock_wait(time.perf_counter() - started, acquired=acquired)
