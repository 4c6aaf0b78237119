"""The live web view: a Starlette app over one bus, served by uvicorn.

``create_app(bus, ...)`` is the ASGI app (``swarmbus up`` can mount it);
``serve_ui(bus, host, port, ...)`` runs it standalone (``swarmbus ui``).

Pages are rendered on the server (``_pages``); a session's timeline arrives over
server-sent events (``/sessions/<id>/events``, one ``step`` event per stored event,
``id`` = stream sequence so a reconnecting browser resumes where it was) and each
step makes htmx refresh the board, proposals, tasks and locks panels. The view is
read-only unless started with a token; retrying a dead letter needs that token.
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import anyio

from swarmbus import _subjects as subjects
from swarmbus._blackboard import DEFAULT_BUCKET, Blackboard
from swarmbus._bus import Bus
from swarmbus._errors import InvalidIdentifierError, MissingDependencyError, SwarmbusError
from swarmbus._locks import held_locks
from swarmbus._observe import _pages as pages
from swarmbus._observe._deadletters import dead_letters, retry_dead_letter
from swarmbus._observe._events import Follower, session_steps
from swarmbus._observe._timeline import Timeline
from swarmbus._tasks import TaskQueue

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as exc:  # pragma: no cover - the ui extra is missing
    raise MissingDependencyError("the web view", "ui") from exc

STATIC: Final = Path(__file__).parent / "static"


#: The largest stream sequence a consumer accepts (a uint64 on the server).
MAX_SEQUENCE: Final = 2**64 - 1


def resume_after(last_event_id: str) -> str | int:
    """Where an event stream starts: after the browser's ``Last-Event-ID``, else at the
    first stored event. The header is the client's to write: anything but a sequence
    the server can take (ASCII digits, at most a uint64) counts as absent."""
    if not (last_event_id.isascii() and last_event_id.isdigit()):
        return "all"
    seq = int(last_event_id)
    return seq if seq < MAX_SEQUENCE else "all"


class _Views:
    """The request handlers, sharing one bus and the view's settings."""

    def __init__(self, bus: Bus, *, token: str | None, trace_url: str | None, board: str):
        self.bus = bus
        self.token = token
        self.trace_url = trace_url
        self.board = board
        self._streams: set[anyio.CancelScope] = set()

    def close_streams(self) -> None:
        """End every open event stream (the server is shutting down)."""
        for scope in self._streams:
            scope.cancel()

    def _session(self, request: Request) -> str:
        return subjects.validate_session_id(request.path_params["session"])

    async def sessions(self, request: Request) -> Response:
        found = await Blackboard.sessions(self.bus, bucket=self.board)
        return HTMLResponse(pages.sessions_page(found))

    async def session(self, request: Request) -> Response:
        return HTMLResponse(pages.session_page(self._session(request), self.trace_url))

    async def events(self, request: Request) -> Response:
        session = self._session(request)
        start = resume_after(request.headers.get("last-event-id", ""))
        return StreamingResponse(
            self._stream(session, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(self, session: str, start: str | int) -> AsyncIterator[str]:
        timeline = Timeline(session, keep=False)
        with anyio.CancelScope() as scope:
            self._streams.add(scope)
            try:
                async with Follower(self.bus, subjects.session_filter(session), start=start) as f:
                    yield ": connected\n\n"
                    async for step in f.steps():
                        line = timeline.add(step)
                        item = pages.step_item(timeline, step, line, self.trace_url)
                        one_line = " ".join(item.splitlines())  # SSE data ends at a newline
                        yield f"id: {step.seq}\nevent: step\ndata: {one_line}\n\n"
            finally:
                self._streams.discard(scope)

    async def board_panel(self, request: Request) -> Response:
        board = await Blackboard.open(self.bus, self._session(request), bucket=self.board)
        return HTMLResponse(pages.board_fragment(await board.snapshot()))

    async def proposals_panel(self, request: Request) -> Response:
        session = self._session(request)
        timeline = Timeline.of(session, await session_steps(self.bus, session))
        return HTMLResponse(pages.proposals_fragment(timeline))

    async def tasks_panel(self, request: Request) -> Response:
        async with TaskQueue(self.bus, self._session(request)) as queue:
            tasks = await queue.tasks()
        return HTMLResponse(pages.tasks_fragment(tasks))

    async def locks_panel(self, request: Request) -> Response:
        return HTMLResponse(pages.locks_fragment(await held_locks(self.bus)))

    async def trace(self, request: Request) -> Response:
        session = self._session(request)
        trace_id = str(request.path_params["trace_id"])
        timeline = Timeline(session)
        items = []
        for step in await session_steps(self.bus, session):
            line = timeline.add(step)
            if step.trace_id == trace_id:
                items.append(pages.step_item(timeline, step, line, self.trace_url))
        return HTMLResponse(pages.trace_page(session, trace_id, items, self.trace_url))

    async def dead(self, request: Request, notice: str = "", status: int = 200) -> Response:
        letters = await dead_letters(self.bus)
        html = pages.dead_page(letters, can_retry=self.token is not None, notice=notice)
        return HTMLResponse(html, status_code=status)

    def _authorized(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    async def retry(self, request: Request) -> Response:
        form = await request.form()
        given = str(form.get("token") or "")
        bearer = request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            given = bearer[7:]
        if self.token is None:
            return await self.dead(request, "This view is read-only: retries are off.", 403)
        if not self._authorized(given):
            return await self.dead(request, "Wrong token: nothing was retried.", 403)
        id = int(request.path_params["id"])
        try:
            letter = await retry_dead_letter(self.bus, id)
        except SwarmbusError as exc:
            return await self.dead(request, f"Dead letter {id} was not retried: {exc}", 409)
        return await self.dead(request, f"Retried dead letter {id} on {letter.original_subject}.")


async def _invalid(request: Request, exc: Exception) -> Response:
    return HTMLResponse(pages.page("Not found", f"<p>{pages.e(exc)}</p>"), status_code=404)


def create_app(
    bus: Bus,
    *,
    token: str | None = None,
    trace_url: str | None = None,
    board_bucket: str = DEFAULT_BUCKET,
) -> Starlette:
    """The web view as an ASGI app over ``bus``.

    Args:
        token: allows retrying dead letters (form field ``token`` or ``Authorization:
            Bearer``); None keeps the view read-only.
        trace_url: where a trace id links, e.g. ``http://jaeger:16686/trace/{trace_id}``;
            None links to the view's own page of the trace's steps.

    A server that mounts it calls ``app.state.views.close_streams()`` when it shuts
    down: the event streams never end by themselves.
    """
    v = _Views(bus, token=token, trace_url=trace_url, board=board_bucket)
    s = "/sessions/{session}"
    routes = [
        Route("/", v.sessions),
        Route(s, v.session),
        Route(f"{s}/events", v.events),
        Route(f"{s}/board", v.board_panel),
        Route(f"{s}/proposals", v.proposals_panel),
        Route(f"{s}/tasks", v.tasks_panel),
        Route(f"{s}/locks", v.locks_panel),
        Route(s + "/trace/{trace_id}", v.trace),
        Route("/dead", v.dead),
        Route("/dead/{id:int}/retry", v.retry, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={InvalidIdentifierError: _invalid})
    app.state.views = v
    return app


class _Server(uvicorn.Server):
    """uvicorn's server that says when it listens, stops on cancellation too, and ends
    the event streams on shutdown (they never end by themselves, and the graceful
    shutdown would wait for them)."""

    def __init__(self, config: uvicorn.Config, views: _Views) -> None:
        super().__init__(config)
        self.listening = anyio.Event()
        self.stopped = anyio.Event()
        self.views = views

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.views.close_streams()
        await super().shutdown(sockets=sockets)

    async def run_shielded(self) -> None:
        """Serve; a cancellation of the caller asks it to stop instead (``should_exit``).

        uvicorn raises ``SystemExit`` when it cannot listen (the port is taken): that
        ends the serving here, and ``serve_ui`` reports it (``started`` stays False).
        """
        try:
            with anyio.CancelScope(shield=True):
                await self.serve()
        except SystemExit:
            pass
        finally:
            self.stopped.set()
            self.listening.set()  # wake a caller waiting for a startup that failed


async def serve_ui(
    bus: Bus,
    host: str = "127.0.0.1",
    port: int = 8222,
    *,
    token: str | None = None,
    trace_url: str | None = None,
    ready: Callable[[str], Any] | None = None,
) -> None:
    """Serve the web view until interrupted (SIGINT, SIGTERM) or cancelled.

    ``ready(url)`` is called once it listens; ``port`` 0 picks a free port.

    Raises:
        SwarmbusError: it cannot listen on ``host``:``port``.
    """
    app = create_app(bus, token=token, trace_url=trace_url)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
    )
    server = _Server(config, app.state.views)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.run_shielded)
        try:
            await server.listening.wait()
            if ready is not None and server.started:
                bound = server.servers[0].sockets[0].getsockname()[1]
                ready(f"http://{host}:{bound}/")
            await server.stopped.wait()
        finally:
            server.should_exit = True
    if not server.started:
        raise SwarmbusError(f"the web view cannot listen on {host}:{port} (in use?)")
