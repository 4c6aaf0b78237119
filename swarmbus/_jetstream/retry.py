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

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Final, TypeVar

import anyio
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, JetStreamManager, api

from swarmbus._jetstream.errors import is_transient, is_wrong_last_sequence
from swarmbus._jetstream.headers import KV_SUBJECT_PREFIX, MSG_ID
from swarmbus._messages import new_id

__all__ = ["FIRST_BACKOFF", "MAX_BACKOFF", "RetryingJetStream", "is_transient", "stored_already"]

log = logging.getLogger("swarmbus.retry")

FIRST_BACKOFF: Final = 0.05
MAX_BACKOFF: Final = 1.0
T = TypeVar("T")
#: ``guard(subject, what)``: raises PermissionDeniedError as soon as the server refuses
#: a publish to ``subject`` inside the block (a refusal is otherwise only a timeout).
Guard = Callable[[str, str], AbstractContextManager[None]]


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
        backoff = FIRST_BACKOFF
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + backoff >= deadline:
                    raise
                log.info("%s: %s; retrying", what, type(exc).__name__)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

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
                if attempts > 1 and is_wrong_last_sequence(exc):
                    seq = await stored_already(self, subject, msg_id)
                    if seq is not None:
                        bucket = subject[len(KV_SUBJECT_PREFIX) :].split(".", 1)[0]
                        return api.PubAck(stream=f"KV_{bucket}", seq=seq, duplicate=True)
                raise
            return ack

        return await self._retrying(f"publish to {subject}", once)

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


async def stored_already(js: JetStreamContext, subject: str, msg_id: str) -> int | None:
    """The sequence of our own earlier write if it is the last one on KV ``subject``.

    The lost-ack check. The server checks a compare-and-set before the duplicate
    window: a retried CAS whose first attempt was stored (its ack lost) fails with
    "wrong last sequence". For a KV key the last entry (read from the stream leader)
    tells whether that first attempt was ours, by its ``Nats-Msg-Id``.
    """
    if not subject.startswith(KV_SUBJECT_PREFIX):
        return None
    bucket = subject[len(KV_SUBJECT_PREFIX) :].split(".", 1)[0]
    try:
        last = await js.get_msg(f"KV_{bucket}", subject=subject, direct=False)
    except nats.js.errors.Error:
        return None
    if (last.headers or {}).get(MSG_ID) != msg_id:
        return None
    return last.seq or 0
