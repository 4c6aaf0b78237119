"""The ``swarmbus`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio

from swarmbus._errors import SwarmbusError
from swarmbus._observe._commands import add_commands as add_observing_commands
from swarmbus._telemetry import configure_tracing

if TYPE_CHECKING:
    from swarmbus._bus import Bus
    from swarmbus._creds import CredsStore
    from swarmbus._server import NatsServer

Command = Callable[[argparse.Namespace], int]
LOOP_ENV = "SWARMBUS_LOOP"
CREDS_DIR_ENV = "SWARMBUS_CREDS_DIR"
PUSH_SUBJECT = "$SYS.REQ.CLAIMS.UPDATE"


def _run(func: Callable[..., Awaitable[int]], *args: object) -> int:
    """``anyio.run`` on the event loop ``$SWARMBUS_LOOP`` names (asyncio or uvloop).

    uvloop (``pip install 'swarmbus[uvloop]'``) makes the NATS client side markedly
    faster; see bench/README.md.
    """
    loop = os.environ.get(LOOP_ENV, "asyncio")
    if loop not in ("asyncio", "uvloop"):
        raise SwarmbusError(f"{LOOP_ENV}={loop}: use asyncio or uvloop")
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise SwarmbusError(
                f"{LOOP_ENV}=uvloop needs uvloop: pip install 'swarmbus[uvloop]'"
            ) from None
    return anyio.run(func, *args, backend_options={"use_uvloop": loop == "uvloop"})


def _cmd_server(args: argparse.Namespace) -> int:
    from swarmbus._server import NatsServer

    # Wake on SIGINT/SIGTERM or on the server's own exit, whichever comes first: a
    # wrapper that outlived its server would hide the failure from a supervisor.
    # The handlers go in first, so a signal sent once the URL is printed is never lost.
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    server = NatsServer(args.data_dir, port=args.port, sync_interval=args.sync_interval)
    server.start()
    pid = server.pid
    threading.Thread(target=_set_on_exit, args=(server, stopped), daemon=True).start()
    print(f"nats-server {server.url} (pid {pid}, data {server.data_dir})", flush=True)
    print(f"export NATS_URL={server.url}", flush=True)
    stopped.wait()
    code = server.wait(timeout=0)
    if code is not None:
        last = server.log[-1] if server.log else "no output"
        print(
            f"swarmbus: error: nats-server (pid {pid}) died unexpectedly "
            f"({_exit_reason(code)}); last log line: {last}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    server.stop()
    return 0


def _set_on_exit(server: NatsServer, event: threading.Event) -> None:
    server.wait()
    event.set()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _cmd_schemas(args: argparse.Namespace) -> int:
    from swarmbus import _schemas

    out = Path(args.out)
    if args.check:
        stale = _schemas.stale(out)
        if stale:
            print(f"stale schemas in {out}: {', '.join(stale)} (run `swarmbus schemas`)")
            return 1
        print(f"schemas in {out} are up to date")
        return 0
    for path in _schemas.write(out):
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from swarmbus._demo import run_demo

    return _run(run_demo, args.data_dir, args.via_service)


def _cmd_run(args: argparse.Namespace) -> int:
    from swarmbus._bus import connect
    from swarmbus._spec import load_spec, spec_agents
    from swarmbus._swarm import load_agents, run_swarm

    spec = load_spec(args.spec)
    agents = load_agents(args.agents)
    served = {a.id for a in agents}
    how = (
        "serve it (Agent.on_request('refine'), swarmbus.run)"
        if spec.type == "progressive_refinement"
        else "claim its subtasks (serve_workers, or the API's task.claim) on this session"
    )
    for name in spec_agents(spec):
        if name not in served:
            print(
                f"swarmbus: {name} is not in {args.agents}: another process must {how}",
                file=sys.stderr,
            )

    async def main() -> int:
        async with connect(data_dir=args.data_dir) as bus:
            result = await run_swarm(bus, spec, agents, session=args.session)
        print(result.to_yaml(), end="", flush=True)
        return 0 if result.ok else 1

    return anyio.run(main)


def _cmd_board(args: argparse.Namespace) -> int:
    from swarmbus._blackboard import Blackboard
    from swarmbus._bus import Bus
    from swarmbus._config import Settings

    def show(data: object, *, document: bool) -> None:
        if args.format == "yaml":
            import yaml

            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
            print(f"---\n{text}" if document else text, end="", flush=True)
        else:
            print(json.dumps(data, indent=None if document else 2), flush=True)

    async def run() -> int:
        async with Bus.open(Settings.from_env()) as bus:
            board = await Blackboard.open(bus, args.session, bucket=args.bucket)
            if not args.watch:
                snapshot = await board.snapshot()
                if not snapshot.revision and not await _session_known(bus, args.session):
                    return _not_found(args.session)
                show(snapshot.to_dict(), document=False)
                return 0
            async for item in board.watch():
                show(item.to_dict(), document=True)
        return 0

    return anyio.run(run)


def _cmd_consensus(args: argparse.Namespace) -> int:
    from swarmbus._bus import Bus
    from swarmbus._consensus import ConsensusService
    from swarmbus._runtime.provision import provisioning

    async def serve() -> int:
        async with (
            Bus.open() as bus,
            provisioning(bus),  # what agents need and may not create under deploy auth
            ConsensusService(bus, bucket=args.bucket, session=args.session, agent=args.agent),
        ):
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                print(f"consensus service ready (bucket {args.bucket}, session {args.session})")
                sys.stdout.flush()
                async for _ in signals:
                    return 0
        return 0

    return anyio.run(serve, backend_options={"use_uvloop": args.uvloop})


def _cmd_locks(args: argparse.Namespace) -> int:
    from swarmbus._bus import Bus
    from swarmbus._locks import held_locks

    async def show() -> None:
        async with Bus.open(provision=False) as bus:
            holders = await held_locks(bus, bucket=args.bucket)
        print(f"{'RESOURCE':<40} {'OWNER':<30} {'TOKEN':>10}  EXPIRES AT (UTC)")
        for h in holders:
            print(f"{h.resource:<40} {h.owner:<30} {h.token:>10}  {h.expires_at.isoformat()}")

    anyio.run(show)
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from swarmbus._bus import Bus
    from swarmbus._tasks import TaskQueue

    async def prune() -> int:
        async with Bus.open() as bus, TaskQueue(bus, args.session) as queue:
            pruned = await queue.prune(older_than=args.prune_older_than)
        print(f"pruned {len(pruned)} finished task(s) of {args.session}")
        return 0

    if args.prune_older_than is not None:
        return anyio.run(prune)

    async def show() -> int:
        async with Bus.open() as bus, TaskQueue(bus, args.session) as queue:
            tasks = await queue.tasks(args.status)
            if not tasks and not await _session_known(bus, args.session):
                return _not_found(args.session)
        print(f"{'ID':36}  {'TYPE':12}  P  {'STATUS':9}  TRY  {'ASSIGNED TO':24}  NOTE")
        for t in tasks:
            note = t.error or ("approval " + t.approval if t.approval != "none" else "")
            note = f"DEAD {note}" if t.dead else note
            print(
                f"{t.id:36}  {t.type:12}  {t.priority:<2} {t.status:9}  {t.attempts:<3}  "
                f"{t.assigned_to or '-':24}  {note}"
            )
        print(f"{len(tasks)} task(s)")
        return 0

    return anyio.run(show)


def _cmd_creds(args: argparse.Namespace) -> int:
    from swarmbus._creds import CredsStore, inbox_prefix

    store = CredsStore(args.dir)
    if args.creds_command == "init":
        roles = _yaml_file(args.roles) if args.roles else None
        conf = store.init(roles=roles, resolver=args.resolver, resolver_dir=args.resolver_dir)
        print(f"operator and account in {store.root}; include {conf} in the server config")
        print(f"system user (pushes account updates): {store.system_creds}")
    elif args.creds_command == "add":
        entry = store.add(
            args.agent, args.role, handlers=args.handler, capabilities=args.capability
        )
        print(f"export SWARMBUS_CREDS_FILE={entry.creds_file}")
        print(f"export SWARMBUS_INBOX_PREFIX={inbox_prefix(args.agent)}")
    elif args.creds_command in ("revoke", "push"):
        if args.creds_command == "revoke":
            store.revoke(args.agent)
            print(f"revoked {args.agent}")
        _apply_account(store, args.url, args.reload_pid)
    else:
        for entry in store.users().values():
            state = "revoked" if entry.revoked else str(entry.creds_file)
            print(f"{entry.agent:40} {entry.role:10} {entry.public_key}  {state}")
    return 0


def _apply_account(store: CredsStore, url: str | None, reload_pid: int | None) -> None:
    """Get the servers to take the current account JWT (see swarmbus/_creds.py)."""
    if store.resolver == "memory":
        if reload_pid is None:
            print("reload every server to apply it: nats-server --signal reload=<pid>")
            return
        os.kill(reload_pid, signal.SIGHUP)  # nats-server reloads its config
        print(f"nats-server {reload_pid} reloads its config")
    elif url:
        _run(_push_account, url, str(store.system_creds), store.account_jwt)
        print(f"account JWT pushed to {url}")
    else:  # a full resolver does not re-read its directory on a reload
        raise SwarmbusError("push it to the servers: swarmbus creds push --url NATS_URL")


def _yaml_file(path: str) -> dict[str, dict[str, object]]:
    """Role templates from a YAML file (``deploy/nats/jwt-roles.yaml`` has the defaults)."""
    import yaml

    data: dict[str, dict[str, object]] = yaml.safe_load(Path(path).read_text())
    return data


async def _push_account(url: str, system_creds: str, account_jwt: str) -> int:
    """Send an account JWT to the servers' full resolvers as the system user."""
    from swarmbus._bus import Bus

    async with Bus.open(url=url, creds_file=system_creds, provision=False) as bus:
        try:
            reply = await bus.nc.request(PUSH_SUBJECT, account_jwt.encode(), timeout=5)
        except TimeoutError:
            raise SwarmbusError(f"no server at {url} took the account update") from None
    answer = json.loads(reply.data).get("data", {})
    if answer.get("code") != 200:
        raise SwarmbusError(f"account update refused: {reply.data.decode()}")
    return 0


NOT_FOUND: Final = 3
"""Exit code of ``board`` and ``tasks`` for a session nothing has written about."""


async def _session_known(bus: Bus, session: str) -> bool:
    """Whether anything names ``session``: a key on the board, a task or an event."""
    from swarmbus._blackboard import Blackboard
    from swarmbus._bus import EVENTS_STREAM
    from swarmbus._jetstream.reads import has_messages
    from swarmbus._subjects import session_filter
    from swarmbus._tasks import TaskQueue

    if (await (await Blackboard.open(bus, session)).snapshot()).revision:
        return True
    async with TaskQueue(bus, session) as queue:
        if await queue.tasks():
            return True
    return await has_messages(bus.js, EVENTS_STREAM, session_filter(session))


def _not_found(session: str) -> int:
    print(
        f"swarmbus: session {session} not found (no board keys, tasks or events)",
        file=sys.stderr,
        flush=True,
    )
    return NOT_FOUND


def _duration(value: str) -> float:
    from swarmbus._durations import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="swarmbus", description="Agent coordination on NATS.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "server",
        help="run an embedded nats-server with JetStream",
        description="Run an embedded nats-server with JetStream until SIGINT/SIGTERM "
        "(then exit 0). Exits 1 at once if the nats-server process dies.",
    )
    p.add_argument("--data-dir", default=None, help="JetStream store (default: user data dir)")
    p.add_argument("--port", type=int, default=4222, help="client port (0 = any free port)")
    p.add_argument("--sync-interval", default=None, help='fsync interval, e.g. "always"')
    p.set_defaults(func=_cmd_server)

    p = sub.add_parser("schemas", help="write (or --check) the JSON Schema files")
    p.add_argument("--out", default="schemas", help="directory (default: schemas)")
    p.add_argument("--check", action="store_true", help="fail if the files are stale")
    p.set_defaults(func=_cmd_schemas)

    p = sub.add_parser("demo", help="run the incident demo on an embedded server")
    p.add_argument("--data-dir", default=None, help="JetStream store (default: a temp dir)")
    p.add_argument(
        "--via-service",
        action="store_true",
        help="votes go through a running `swarmbus consensus` (as under deploy auth)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="run a swarm spec (YAML) on the configured server")
    p.add_argument("spec", help="swarm spec, e.g. examples/parallel_investigation.yaml")
    p.add_argument(
        "--agents",
        default="swarmbus._demo",
        help="module or .py file defining agents() (default: the demo's incident agents)",
    )
    p.add_argument("--session", default=None, help="session id (default: a fresh one)")
    p.add_argument("--data-dir", default=None, help="embedded server store (without NATS_URL)")
    p.set_defaults(func=_cmd_run)

    not_found = f"Exits {NOT_FOUND} if nothing (board key, task or event) names the session."
    p = sub.add_parser(
        "board",
        help="print a session's blackboard (NATS_URL); --watch follows it",
        description="Print a session's blackboard (server from NATS_URL). "
        f"{not_found} With --watch, wait for it instead.",
    )
    p.add_argument("session", help="session id, e.g. INC-1234")
    p.add_argument("--watch", action="store_true", help="then print every change as it happens")
    p.add_argument("--format", choices=("json", "yaml"), default="json")
    p.add_argument("--bucket", default="SWARMBUS_BOARD", help="KV bucket of the blackboard")
    p.set_defaults(func=_cmd_board)

    p = sub.add_parser("consensus", help="run the consensus service against NATS_URL")
    p.add_argument("--bucket", default="SWARMBUS_CONSENSUS", help="proposals KV bucket")
    p.add_argument("--session", default="*", help="ingest events of one session (* = all)")
    p.add_argument("--agent", default="swarmbus/consensus", help="agent id decisions come from")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (swarmbus[uvloop])")
    p.set_defaults(func=_cmd_consensus)

    p = sub.add_parser(
        "locks", help="list held locks (NATS_URL; SWARM_BACKEND with REDIS_URL or DATABASE_URL)"
    )
    p.add_argument("--bucket", default="SWARMBUS_LOCKS", help="locks bucket (default: %(default)s)")
    p.set_defaults(func=_cmd_locks)

    p = sub.add_parser(
        "tasks",
        help="list a session's tasks (server from NATS_URL)",
        description=f"List a session's tasks (server from NATS_URL). {not_found}",
    )
    p.add_argument("session", help="session id, e.g. INC-1234")
    p.add_argument(
        "--status", default=None, choices=["pending", "assigned", "running", "completed", "failed"]
    )
    p.add_argument(
        "--prune-older-than",
        type=_duration,
        default=None,
        metavar="AGE",
        help="instead: delete records of tasks finished at least AGE ago (e.g. 7d, 12h)",
    )
    p.set_defaults(func=_cmd_tasks)

    _add_creds_command(sub)

    add_observing_commands(sub)  # tail, timeline, dead, metrics, ui

    from swarmbus._runtime.command import add_parser as add_up

    add_up(sub)
    return parser


def _add_creds_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``swarmbus creds``: NATS JWT credentials (operator, roles, one per agent)."""
    p = sub.add_parser("creds", help="NATS JWT credentials: operator, roles, one per agent")
    p.add_argument(
        "--dir",
        default=os.environ.get(CREDS_DIR_ENV, "swarmbus-creds"),
        help=f"credentials directory (default: ${CREDS_DIR_ENV} or ./swarmbus-creds)",
    )
    creds = p.add_subparsers(dest="creds_command", required=True)
    c = creds.add_parser("init", help="create operator, account, role keys, server.conf")
    c.add_argument("--resolver", choices=("full", "memory"), default="full")
    c.add_argument("--resolver-dir", default=None, help="full resolver's dir on the server")
    c.add_argument("--roles", default=None, help="role templates YAML (default: built in)")
    c = creds.add_parser("add", help="write AGENT's .creds (no server restart)")
    c.add_argument("agent", help="agent id, e.g. ops/deploy-validator")
    c.add_argument("--role", default="agent", help="agent, service or observer")
    c.add_argument("--handler", action="append", default=[], help="event handler name")
    c.add_argument("--capability", action="append", default=[], help="capability it serves")
    revoke = creds.add_parser("revoke", help="revoke AGENT's credentials, then apply (as push)")
    revoke.add_argument("agent")
    push = creds.add_parser("push", help="get the servers to take the account JWT")
    for c in (revoke, push):
        c.add_argument("--url", default=os.environ.get("NATS_URL"), help="full resolver: push")
        c.add_argument("--reload-pid", type=int, default=None, help="memory: SIGHUP it")
    creds.add_parser("list", help="issued credentials")
    p.set_defaults(func=_cmd_creds)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``swarmbus`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "port", None) == 0:
        args.port = None
    func: Command = args.func
    try:
        configure_tracing()  # off unless the OTEL_* variables ask for it
        return func(args)
    except SwarmbusError as exc:
        print(f"swarmbus: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
