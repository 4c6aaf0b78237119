"""Embedded server launcher: binary lookup, readiness, errors, NATS_URL, reconnects."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import swarmbus
from swarmbus import Agent, Bus, Finding, FindingMessage, NatsServer
from swarmbus._server import BINARY_ENV, check_version, find_binary

ROOT = Path(__file__).resolve().parents[1]


def test_binary_found_next_to_python_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    assert find_binary().name == "nats-server"


def test_env_variable_wins_and_must_be_executable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(swarmbus.ServerBinaryNotFoundError, match=BINARY_ENV):
        find_binary()
    monkeypatch.setenv(BINARY_ENV, str(find_binary.__globals__["shutil"].which("true")))
    assert find_binary().name == "true"


def test_missing_binary_error_names_all_three_places(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(swarmbus.ServerBinaryNotFoundError) as info:
        find_binary()
    message = str(info.value)
    assert BINARY_ENV in message
    assert str(tmp_path) in message
    assert "PATH" in message


def test_old_servers_are_refused() -> None:
    with pytest.raises(swarmbus.ServerVersionError, match=r"2\.9\.10"):
        check_version("2.9.10")
    check_version("2.11.0")
    check_version("2.15.1")


def test_busy_port_is_a_clear_error(nats_server: NatsServer, tmp_path: Path) -> None:
    with pytest.raises(swarmbus.ServerStartError, match="port busy"):
        NatsServer(tmp_path, port=nats_server.port).start()


def test_cli_busy_port_is_one_line(nats_server: NatsServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "swarmbus._cli", "server"),
            *("--data-dir", str(tmp_path), "--port", str(nats_server.port)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "port busy" in result.stderr


def test_fatal_line_read_after_exit_is_the_reason(tmp_path: Path) -> None:
    """The process exits before its last stderr line is read (a child still holds the
    pipe): the failure reason must still be that line, not "exited before ready"."""
    fake = tmp_path / "nats-server"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "nats-server: v2.15.1"; exit 0; fi\n'
        "(sleep 0.3; echo '[1] [FTL] Error listening on port: 127.0.0.1:1, "
        '"address already in use"\' >&2) &\n'
        "exit 1\n"
    )
    fake.chmod(0o755)
    with pytest.raises(swarmbus.ServerStartError, match="port busy"):
        NatsServer(tmp_path / "data", binary=fake).start(timeout=10)


async def test_connect_uses_nats_url_and_starts_nothing(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", nats_server.url)

    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not start a server when NATS_URL is set")

    monkeypatch.setattr(NatsServer, "start", no_server)
    async with swarmbus.connect() as bus:
        assert bus.nc.connected_url is not None
        assert bus.nc.connected_url.port == nats_server.port


async def test_connect_without_url_starts_and_stops_an_embedded_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    async with swarmbus.connect(data_dir=str(tmp_path)) as bus:
        assert bus.server_version
        port = bus.nc.connected_url.port if bus.nc.connected_url else None
    assert (tmp_path / "jetstream").is_dir()
    with pytest.raises(swarmbus.ConnectionError):
        await Bus.connect(url=f"nats://127.0.0.1:{port}", connect_timeout=1)


async def test_agents_reconnect_and_keep_handling_after_server_restart(
    fresh_server: NatsServer, session_id: str, unique: str
) -> None:
    agent = Agent(f"test/survivor-{unique}")
    got: list[str] = []
    events = {name: anyio.Event() for name in ("before", "after")}

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        got.append(message.finding.content)
        events[message.finding.content].set()

    async with Bus.open(url=fresh_server.url) as bus, agent.serve(bus):
        await bus.publish(
            Finding(category="observation", content="before", confidence=0.5),
            agent="test/publisher",
            session=session_id,
        )
        with anyio.fail_after(10):
            await events["before"].wait()
        bus.reconnected.clear()
        fresh_server.kill()
        await anyio.to_thread.run_sync(fresh_server.start)
        with anyio.fail_after(20):
            await bus.reconnected.wait()
        await bus.publish(
            Finding(category="observation", content="after", confidence=0.5),
            agent="test/publisher",
            session=session_id,
        )
        with anyio.fail_after(20):
            await events["after"].wait()
    # At-least-once: the kill may lose the (unconfirmed) ack of "before", which is then
    # delivered again after the restart; "after" must come, and nothing else.
    assert got[0] == "before"
    assert set(got) == {"before", "after"}


SIGTERM_APP = """
import sys, anyio, swarmbus
from swarmbus import Agent, Bus

agent = Agent(sys.argv[2])

@agent.on_finding(session=sys.argv[3])
async def on_finding(message):
    print("started", flush=True)
    await anyio.sleep(1.0)  # simulated work that must finish during the drain
    print("finished", message.id, flush=True)

async def main():
    async with Bus.open(url=sys.argv[1]) as bus:
        await swarmbus.run(agent, bus=bus)
    print("exited", flush=True)

anyio.run(main)
"""


async def test_sigterm_drains_in_flight_handlers(
    bus: Bus, nats_url: str, session_id: str, unique: str
) -> None:
    agent_id = f"test/sigterm-{unique}"
    durable = swarmbus._subjects.safe_token(agent_id)  # the agent's one event consumer
    created = anyio.Event()

    async def on_created(msg: object) -> None:
        created.set()

    advisory = await bus.nc.subscribe(
        f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.SWARMBUS_EVENTS.{durable}", cb=on_created
    )
    proc = await anyio.open_process(
        [sys.executable, "-c", SIGTERM_APP, nats_url, agent_id, session_id],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        with anyio.fail_after(20):
            await created.wait()
        await advisory.unsubscribe()
        sent = await bus.publish(
            Finding(category="observation", content="work", confidence=0.5),
            agent="test/publisher",
            session=session_id,
        )
        assert proc.stdout is not None
        output = ""
        with anyio.fail_after(20):
            async for chunk in proc.stdout:
                output += chunk.decode()
                if "started" in output:
                    break
            proc.terminate()  # SIGTERM while the handler is in flight
            async for chunk in proc.stdout:
                output += chunk.decode()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    assert f"finished {sent.id}" in output
    assert output.index("finished") < output.index("exited")
    info = await bus.js.consumer_info("SWARMBUS_EVENTS", durable)
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0


_ORPHAN_SCRIPT = """
import sys, threading
from swarmbus import NatsServer
server = NatsServer(sys.argv[1])
# Started from a thread that ends at once: the server must outlive the thread...
starter = threading.Thread(target=server.start)
starter.start()
starter.join()
print(server.pid, server.url, flush=True)
sys.stdin.read()  # ...and live until this process dies
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
async def test_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    async with await anyio.open_process(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path / "data")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as owner:
        assert owner.stdout is not None
        with anyio.fail_after(30):
            line = await BufferedByteReceiveStream(owner.stdout).receive_until(b"\n", 200)
        pid, url = line.decode().split()
        exited = os.pidfd_open(int(pid))  # readable once the server has exited
        try:
            async with Bus.open(url=url) as bus:  # alive after its starting thread ended
                assert bus.nc.is_connected
            assert not select.select([exited], [], [], 0)[0]
            owner.kill()  # SIGKILL: no cleanup code runs in the owner
            await owner.wait()
            with anyio.fail_after(15):
                await anyio.wait_readable(exited)
        finally:
            os.close(exited)


_FORK_SCRIPT = """
import multiprocessing, sys
from pathlib import Path
from swarmbus import NatsServer

def child(data):
    with NatsServer(data):
        pass

if __name__ == "__main__":
    base = Path(sys.argv[1])
    with NatsServer(base / "parent"):
        forked = multiprocessing.get_context("fork").Process(target=child, args=(base / "child",))
        forked.start()
        forked.join(30)
        if forked.exitcode is None:
            forked.kill()
        print(forked.exitcode, flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fork is Linux's default start method")
def test_forked_child_can_start_a_server(tmp_path: Path) -> None:
    """The spawning thread does not survive a fork: the child must get its own."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _FORK_SCRIPT, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = owner.communicate(timeout=60)
    finally:
        if owner.poll() is None:
            os.kill(owner.pid, 9)
            owner.wait()
    assert out.strip() == "0"


_MAIN_RETURNS_SCRIPT = """
import subprocess, sys, threading
from swarmbus import NatsServer

server = NatsServer(sys.argv[1]).start()
proc = server._proc

def keep_serving():
    threading.main_thread().join()  # the main thread is done; this process lives on
    try:
        proc.wait(timeout=3)
        print("server died", flush=True)
    except subprocess.TimeoutExpired:
        print("server alive", flush=True)
    server.stop()

threading.Thread(target=keep_serving).start()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
def test_server_lives_as_long_as_its_process_not_its_main_thread(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _MAIN_RETURNS_SCRIPT, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = owner.communicate(timeout=60)
    finally:
        if owner.poll() is None:
            os.kill(owner.pid, 9)
            owner.wait()
    assert out.strip() == "server alive"


def test_port_zero_is_any_free_port(tmp_path: Path) -> None:
    """nats-server reads -p 0 as its default port 4222; 0 must mean "any" as for sockets."""
    try:
        server = NatsServer(tmp_path, port=0).start()
    except swarmbus.ServerStartError as exc:  # 4222 was busy: the bug as well
        pytest.fail(str(exc))
    try:
        assert server.port != 4222
    finally:
        server.stop()


def _start_cli_server(tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """``swarmbus server`` on a free port; returns the wrapper and its nats-server's pid."""
    wrapper = subprocess.Popen(
        [
            *(sys.executable, "-m", "swarmbus._cli", "server"),
            *("--data-dir", str(tmp_path), "--port", "0"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert wrapper.stdout is not None
    line = wrapper.stdout.readline()  # "nats-server nats://... (pid N, data ...)"
    match = re.search(r"\(pid (\d+),", line)
    if match is None:
        wrapper.kill()
        _, err = wrapper.communicate()
        pytest.fail(f"no server line: {line!r} {err!r}")
    return wrapper, int(match[1])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_cli_server_exits_non_zero_when_its_nats_server_dies(tmp_path: Path) -> None:
    wrapper, pid = _start_cli_server(tmp_path)
    try:
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = wrapper.communicate(timeout=10)
        elapsed = time.monotonic() - killed
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
    assert wrapper.returncode == 1
    assert elapsed < 2, elapsed
    assert f"nats-server (pid {pid}) died unexpectedly (killed by SIGKILL)" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_server_stops_on_a_signal_and_exits_zero(tmp_path: Path, sig: signal.Signals) -> None:
    wrapper, pid = _start_cli_server(tmp_path)
    try:
        wrapper.send_signal(sig)
        _, err = wrapper.communicate(timeout=30)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    assert wrapper.returncode == 0, err
    assert err == ""
    assert _gone(pid)  # the wrapper stopped (and reaped) its nats-server
