"""Health and readiness over HTTP, for process supervisors and Kubernetes probes.

``GET /healthz`` is 200 while the process runs its services; ``GET /readyz`` is 200
once every service started and the NATS connection is up, else 503; both answer a
small JSON document naming each service. Plain HTTP/1.0 on an anyio listener: two
fixed paths need no web framework.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
from anyio.abc import SocketStream, TaskStatus

_STATUS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


class Health:
    """Service states and the probe endpoints.

    Args:
        connected: whether the NATS connection is up right now.
    """

    def __init__(self, connected: Callable[[], bool]) -> None:
        self.connected = connected
        self.services: dict[str, bool] = {}
        self.draining = False

    def expect(self, name: str) -> None:
        """A service that must start before the runtime is ready."""
        self.services[name] = False

    def started(self, name: str) -> None:
        self.services[name] = True

    @property
    def ready(self) -> bool:
        return not self.draining and self.connected() and all(self.services.values())

    def _answer(self, path: str) -> tuple[int, dict[str, object]]:
        state: dict[str, object] = {
            "services": dict(self.services),
            "nats": self.connected(),
            "draining": self.draining,
        }
        if path == "/healthz":
            return 200, {"status": "alive", **state}
        if path == "/readyz":
            return (200 if self.ready else 503), {"ready": self.ready, **state}
        return 404, {"error": f"no {path}: use /healthz or /readyz"}

    async def serve(
        self, host: str, port: int, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (0: any free port, reported to ``task_status``)."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
            await listener.serve(self._connection)

    async def _connection(self, stream: SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(5):
                head = b""
                while b"\r\n" not in head and len(head) < 8192:
                    try:
                        head += await stream.receive(8192)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
                path = parts[1] if len(parts) >= 2 else "/"
                code, body = self._answer(path.split("?", 1)[0])
                data = json.dumps(body).encode()
                response = (
                    f"HTTP/1.0 {code} {_STATUS[code]}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                ).encode() + data
                try:
                    await stream.send(response)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
