"""The ``swarmbus up`` subcommand: flags -> ``RuntimeConfig``, signals -> drain."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import anyio

from swarmbus._config import Settings
from swarmbus._runtime.supervisor import SERVICES, Runtime, RuntimeConfig


def _http(value: str) -> tuple[str, int] | None:
    if value in ("", "off", "none"):
        return None
    host, _, port = value.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--http {value!r}: use HOST:PORT or off") from None


def _services(value: str) -> frozenset[str]:
    chosen = frozenset(s.strip() for s in value.split(",") if s.strip())
    unknown = chosen - set(SERVICES)
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SERVICES)}")
    return chosen


def add_parser(sub: Any) -> None:
    """Register ``up`` on the CLI's subparsers."""
    p = sub.add_parser(
        "up",
        help="run the coordination services (consensus, board, intake, API, presence)",
        description="Run the coordination services in one supervised process: on NATS_URL, "
        "or on an embedded nats-server. SIGTERM drains and exits 0.",
    )
    p.add_argument("--data-dir", default=None, help="embedded server store (without NATS_URL)")
    p.add_argument("--port", type=int, default=None, help="embedded server port (default: free)")
    p.add_argument("--intake", default=None, help="intake file: incident kind/label -> spec")
    p.add_argument("--http", type=_http, default=("127.0.0.1", 8090), help="health HOST:PORT")
    p.add_argument(
        "--only",
        type=_services,
        default=frozenset(SERVICES),
        help=f"comma-separated services to run (default: all of {','.join(SERVICES)})",
    )
    p.add_argument("--heartbeat-interval", type=float, default=0.5, help="presence heartbeat (s)")
    p.add_argument("--dead-after", type=float, default=1.5, help="silence before death (s)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="SIGTERM drain (s)")
    p.set_defaults(func=run_up)


def _ready(runtime: Runtime) -> None:
    http = f"http://127.0.0.1:{runtime.http_port}" if runtime.http_port else "off"
    services = ",".join(sorted(runtime.config.services))
    print(f"swarmbus up: ready nats={runtime.url} http={http} services={services}", flush=True)


def run_up(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean drain."""
    config = RuntimeConfig(
        settings=Settings.from_env(),
        data_dir=args.data_dir,
        port=args.port,
        intake=args.intake,
        http=args.http,
        services=args.only,
        heartbeat_interval=args.heartbeat_interval,
        dead_after=args.dead_after,
        drain_timeout=args.drain_timeout,
    )
    runtime = Runtime(config)

    async def main() -> int:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    async for _ in received:
                        print("swarmbus up: draining", file=sys.stderr, flush=True)
                        stop.set()
                        return

            tg.start_soon(signals)
            await runtime.run(stop, on_ready=_ready)
            tg.cancel_scope.cancel()
        return 0

    return anyio.run(main)
