"""The observing subcommands of ``swarmbus``: tail, timeline, dead, metrics, ui."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from swarmbus._bus import Bus

UI_TOKEN_ENV = "SWARMBUS_UI_TOKEN"
TIMELINE_FORMATS = ("text", "markdown", "json")


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


@contextlib.asynccontextmanager
async def _observing_bus() -> AsyncIterator[Bus]:
    """The bus of an observing command (server from ``NATS_URL``).

    It creates the event and dead-letter streams only if they are missing (a fresh
    server): ``Bus.open()`` would also update existing ones to this process's settings
    (``event_max_age``, replicas, storage), and looking at a swarm must not change it.
    """
    from swarmbus._bus import DEAD_LETTER_STREAM, EVENTS_STREAM, Bus
    from swarmbus._jetstream.follow import stream_state

    async with Bus.open(provision=False) as bus:
        for stream in (EVENTS_STREAM, DEAD_LETTER_STREAM):
            if await stream_state(bus.js, stream) is None:
                await bus.ensure_streams()
                break
        yield bus


def _echo(line: str) -> None:
    print(line, flush=True)


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_tail(args: argparse.Namespace) -> int:
    from swarmbus._observe._tail import Tail

    async def run() -> int:
        async with _observing_bus() as bus:
            tail = Tail(
                bus,
                session=args.session,
                types=args.type or (),
                agents=args.agent or (),
                as_json=args.json,
                echo=_echo,
            )
            await tail.run(
                from_start=args.from_start,
                limit=args.limit,
                ready=lambda: _note(f"tailing {tail.filter} (Ctrl-C to stop)"),
            )
        return 0

    return anyio.run(run)


def cmd_timeline(args: argparse.Namespace) -> int:
    from swarmbus._observe._events import session_steps
    from swarmbus._observe._timeline import Timeline

    async def run() -> int:
        async with _observing_bus() as bus:
            steps = await session_steps(bus, args.session)
        if not steps:
            _note(f"no events of session {args.session}")
            return 1
        sys.stdout.write(Timeline.of(args.session, steps).render(args.format))
        return 0

    return anyio.run(run)


def cmd_dead(args: argparse.Namespace) -> int:
    from swarmbus._observe import _deadletters as dl

    async def run() -> int:
        async with _observing_bus() as bus:
            if args.dead_command == "retry":
                letter = await dl.retry_dead_letter(bus, args.id, keep=args.keep)
                kept = "kept" if args.keep else "removed"
                print(f"retried dead letter {letter.id} on {letter.original_subject} ({kept})")
                return 0
            letters = await dl.dead_letters(bus, session=args.session, code=args.code)
        if args.json:
            print(json.dumps([d.to_dict() for d in letters], indent=2))
        else:
            sys.stdout.write(dl.render_dead_letters(letters))
        return 0

    return anyio.run(run)


def cmd_metrics(args: argparse.Namespace) -> int:
    from swarmbus._observe._metrics import Observer, configure_metrics

    setup = configure_metrics(
        "swarmbus-metrics", default_exporter="prometheus", prometheus_port=args.prometheus_port
    )
    if setup is None:
        _note("metrics are off (OTEL_METRICS_EXPORTER=none or OTEL_SDK_DISABLED=true)")
        return 1

    async def run() -> int:
        async with _observing_bus() as bus:
            observer = Observer(bus, interval=args.interval)
            ready = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(observer.run, ready)
                await ready.wait()
                where = setup.prometheus_url or "the configured exporters"
                _note(f"observing; metrics at {where}")
        return 0

    try:
        return anyio.run(run)
    finally:
        setup.close()


def cmd_ui(args: argparse.Namespace) -> int:
    from swarmbus._observe._ui import serve_ui

    token = os.environ.get(args.token_env) or None

    async def run() -> int:
        async with _observing_bus() as bus:
            await serve_ui(
                bus,
                host=args.host,
                port=args.ui_port,
                token=token,
                trace_url=args.trace_url,
                ready=lambda url: _note(f"swarmbus ui at {url}"),
            )
        return 0

    return anyio.run(run)


def add_commands(sub: Any) -> None:
    """Register the observing subcommands on the ``swarmbus`` parser's subparsers."""
    p = sub.add_parser("tail", help="print live events (server from NATS_URL)")
    p.add_argument("session", nargs="?", default=None, help="one session (default: all)")
    p.add_argument(
        "--type", action="append", help="only this type (finding, task, task.completed, ...)"
    )
    p.add_argument("--agent", action="append", help="only this agent (or prefix: ops)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--from-start", action="store_true", help="replay stored events first")
    p.add_argument("--limit", type=_positive, default=None, help="stop after this many events")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("timeline", help="replay a session's events as a timeline")
    p.add_argument("session", help="session id, e.g. INC-1234")
    p.add_argument(
        "--format", choices=TIMELINE_FORMATS, default="text", help="markdown: a post-mortem"
    )
    p.set_defaults(func=cmd_timeline)

    p = sub.add_parser("dead", help="list dead letters; `dead retry ID` retries one")
    p.add_argument("--session", default=None, help="only this session")
    p.add_argument("--code", default=None, help="only this code (not_json, handler_error, ...)")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_dead, dead_command=None)
    dead = p.add_subparsers(dest="dead_command")
    r = dead.add_parser("retry", help="republish a dead letter on its original subject")
    r.add_argument("id", type=int, help="the dead letter's ID (from `swarmbus dead`)")
    r.add_argument("--keep", action="store_true", help="keep the dead letter after retrying")

    p = sub.add_parser("metrics", help="observe the swarm and export metrics (OTEL_*)")
    p.add_argument(
        "--port",
        dest="prometheus_port",  # not "port": main() turns a port of 0 into None
        type=int,
        default=None,
        help="Prometheus port, 0 for any free one (default: OTEL_EXPORTER_PROMETHEUS_PORT)",
    )
    p.add_argument("--interval", type=float, default=5.0, help="state poll period, seconds")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("ui", help="serve the live web view (read-only without a token)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", dest="ui_port", type=int, default=8222, help="0: any free port")
    p.add_argument(
        "--token-env",
        default=UI_TOKEN_ENV,
        help="variable holding the token that allows retrying dead letters (%(default)s)",
    )
    p.add_argument(
        "--trace-url",
        default=os.environ.get("SWARMBUS_TRACE_URL"),
        help="trace link template, e.g. http://jaeger:16686/trace/{trace_id}",
    )
    p.set_defaults(func=cmd_ui)
