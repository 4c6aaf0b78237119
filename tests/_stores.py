"""Real redis-server and PostgreSQL processes for the state-store tests.

Each starts on 127.0.0.1 on a free port with its own temp dir, is ready when its log
says so (never a fixed sleep), and is stopped by its pid. PostgreSQL refuses to run as
root: as root, ``initdb`` and ``postgres`` run as the ``postgres`` user (the temp data
and socket dirs are chowned to it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_line(
    stream: IO[str], marker: str, proc: subprocess.Popen[str], timeout: float
) -> str:
    """Read ``stream`` until a line contains ``marker``; the log so far on failure."""
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            seen.append(line)
            if marker in line:
                found.set()
                break

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not found.wait(timeout) or proc.poll() is not None:
        raise RuntimeError(f"server not ready ({marker!r}):\n{''.join(seen)}")
    return "".join(seen)


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


class RedisServer:
    """``redis-server`` without persistence on a free 127.0.0.1 port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> Self:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: apt-get install -y redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                 str(self.directory), "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--loglevel", "notice"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            try:
                assert self.proc.stdout is not None
                _wait_for_line(self.proc.stdout, "Ready to accept connections", self.proc, 20)
                return self
            except RuntimeError:
                _stop(self.proc)  # most likely the port was taken meanwhile: try another
        raise RuntimeError("redis-server did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop(self.proc)
            assert self.proc.stdout is not None
            self.proc.stdout.close()


class PostgresServer:
    """A throwaway PostgreSQL 15 cluster (``initdb`` + ``postgres``) on a free port."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="swarmbus-pg-"))
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self._user: str | None = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def __enter__(self) -> Self:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError("PostgreSQL 15 not found: apt-get install -y postgresql")
        self._own(self.root)
        data, sockets = self.root / "data", self.root / "sock"
        self._own(sockets)
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
             "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True, user=self._user, cwd=self.root,
        )  # fmt: skip
        for _ in range(5):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(self.port),
                 "-k", str(sockets), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                user=self._user, cwd=self.root,
            )  # fmt: skip
            try:
                assert self.proc.stdout is not None
                _wait_for_line(self.proc.stdout, "ready to accept connections", self.proc, 60)
                threading.Thread(target=self._drain, daemon=True).start()
                return self
            except RuntimeError:
                _stop(self.proc, signal.SIGINT)
        raise RuntimeError("postgres did not start")

    def _drain(self) -> None:
        """Keep reading the log so the server never blocks on a full pipe."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            _stop(self.proc, signal.SIGINT)  # "fast" shutdown
        shutil.rmtree(self.root, ignore_errors=True)


def store_options(request: Any, backend: str) -> dict[str, str]:
    """``Bus.open`` options for ``backend``, starting its server fixture if it needs one."""
    if backend == "redis":
        return {"redis_url": request.getfixturevalue("redis_server").url}
    if backend == "postgres":
        return {"database_url": request.getfixturevalue("postgres_server").url}
    return {}


def store_env(request: Any, backend: str) -> dict[str, str]:
    """The seed's environment variables for ``backend`` (``SWARM_BACKEND``, ``REDIS_URL`` ...)."""
    names = {"redis_url": "REDIS_URL", "database_url": "DATABASE_URL"}
    options = store_options(request, backend)
    return {"SWARM_BACKEND": backend, **{names[k]: v for k, v in options.items()}}
