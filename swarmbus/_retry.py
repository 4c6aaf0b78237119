"""JetStream calls that survive a leader election: retried, and idempotent when retried.

Also: a KV write (or any JetStream publish) the server's permissions refuse raises
``PermissionDeniedError`` at once instead of timing out.

When a cluster node dies, its streams elect new leaders and clients reconnect to
another node; for a few seconds a JetStream call may find no responder, get a 503, or
time out. The call usually did not happen, but a timed-out publish may have been
stored with its ack lost. So every publish carries a ``Nats-Msg-Id`` (its own, or one
made for it): a retry of a stored publish is answered from the stream's duplicate
window with the original sequence; a compare-and-set (a KV ``update``) fails its
check before the duplicate window is consulted, so its retry looks at the key's last
entry: if that is its own first attempt, it won. Either way it is never applied twice
nor reported as lost because its own first attempt won. Reads and JetStream API calls are
retried as they are. Everything built on ``bus.js`` (KV buckets included) gets this.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Final, TypeVar

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, JetStreamManager, api

from swarmbus._messages import new_id

__all__ = ["RetryingJetStream", "is_transient"]

log = logging.getLogger("swarmbus.retry")

MSG_ID: Final = "Nats-Msg-Id"
_NO_SUITABLE_PEERS: Final = 10005
_WRONG_LAST_SEQUENCE: Final = 10071
_KV_PREFIX: Final = "$KV."
_FIRST_BACKOFF: Final = 0.05
_MAX_BACKOFF: Final = 1.0
T = TypeVar("T")
#: ``guard(subject, what)``: raises PermissionDeniedError as soon as the server refuses
#: a publish to ``subject`` inside the block (a refusal is otherwise only a timeout).
Guard = Callable[[str, str], AbstractContextManager[None]]


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is what a leader election or a reconnect looks like to a client."""
    if isinstance(exc, nats.js.errors.APIError):
        # 503: JetStream temporarily unavailable (no leader yet); 10005: no suitable
        # peers, a node is offline (just started, or restarting)
        return exc.code == 503 or exc.err_code == _NO_SUITABLE_PEERS
    return isinstance(
        exc,
        (
            nats.js.errors.NoStreamResponseError,
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            asyncio.TimeoutError,
        ),
    )


class RetryingJetStream(JetStreamContext):
    """A JetStream context that retries transient failures for up to ``retry_for`` s.

    Non-transient errors (a CAS that lost, a missing key, a refused permission) are
    raised at once, as is the last transient error once ``retry_for`` has passed.
    """

    def __init__(self, nc: NatsClient, *, timeout: float, retry_for: float, guard: Guard) -> None:
        super().__init__(nc, timeout=timeout)
        self.retry_for = retry_for
        self._guard = guard

    @property
    def _jsm(self) -> JetStreamManager:
        # nats-py's subscriptions and watchers call the API through this: retry there too
        return self

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.retry_for
        backoff = _FIRST_BACKOFF
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + backoff >= deadline:
                    raise
                log.info("%s: %s; retrying", what, type(exc).__name__)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> api.PubAck:
        """Publish and wait for the ack; retries reuse one ``Nats-Msg-Id``."""
        hdrs = dict(headers) if headers else {}
        msg_id = hdrs.setdefault(MSG_ID, new_id())
        publish = super().publish
        attempts = 0

        async def once() -> api.PubAck:
            nonlocal attempts
            attempts += 1
            try:
                # nats-py adds its own headers to the dict it is given: a copy per attempt
                with self._guard(subject, f"publish to {subject}"):
                    ack: api.PubAck = await publish(
                        subject, payload, timeout, stream, dict(hdrs), msg_ttl
                    )
            except nats.js.errors.APIError as exc:
                if attempts > 1 and exc.err_code == _WRONG_LAST_SEQUENCE:
                    mine = await self._stored_already(subject, msg_id)
                    if mine is not None:
                        return mine
                raise
            return ack

        return await self._retrying(f"publish to {subject}", once)

    async def _stored_already(self, subject: str, msg_id: str) -> api.PubAck | None:
        """The ack of our own earlier attempt, if it is the last write on ``subject``.

        The server checks a compare-and-set before the duplicate window: a retried CAS
        whose first attempt was stored fails with "wrong last sequence". For a KV key
        the last entry tells whether that first attempt was ours.
        """
        if not subject.startswith(_KV_PREFIX):
            return None
        bucket = subject[len(_KV_PREFIX) :].split(".", 1)[0]
        try:
            last = await self.get_msg(f"KV_{bucket}", subject=subject)
        except nats.js.errors.Error:
            return None
        if (last.headers or {}).get(MSG_ID) != msg_id:
            return None
        return api.PubAck(stream=f"KV_{bucket}", seq=last.seq or 0, duplicate=True)

    async def get_msg(
        self,
        stream_name: str,
        seq: int | None = None,
        subject: str | None = None,
        direct: bool | None = False,
        next: bool | None = False,
    ) -> api.RawStreamMsg:
        """Read a stored message (KV gets use this); reads are safe to repeat."""
        get = super().get_msg

        async def once() -> api.RawStreamMsg:
            msg: api.RawStreamMsg = await get(stream_name, seq, subject, direct, next)
            return msg

        return await self._retrying(f"read from {stream_name}", once)

    async def _api_request(
        self, req_subject: str, req: bytes = b"", timeout: float = 5
    ) -> dict[str, Any]:
        request = super()._api_request

        async def once() -> dict[str, Any]:
            reply: dict[str, Any] = await request(req_subject, req, timeout)
            return reply

        return await self._retrying(req_subject, once)
