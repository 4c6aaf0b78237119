"""The console script: demo, schemas."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
import yaml

from swarmbus import Blackboard, Bus, Finding, TaskQueue

ROOT = Path(__file__).resolve().parents[1]


def swarmbus_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "swarmbus._cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        check=False,
    )


def test_demo_runs_on_an_embedded_server(tmp_path: Path) -> None:
    result = swarmbus_cli("demo", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "DECISION: rollback (approved; for 2, against 0, abstentions 1)" in out
    assert "ops/deploy-validator" in out
    assert "decision 'rollback'" in out
    board = yaml.safe_load(out.split("\nblackboard:\n", 1)[1].rsplit("\n\n", 1)[0])
    assert list(board) == ["context", "findings", "hypotheses", "actions_taken"]
    assert board["actions_taken"][0]["status"] == "approved"
    assert out.rstrip().endswith("tracing off") or "trace id: " in out


def test_schemas_check_passes_on_the_repo() -> None:
    result = swarmbus_cli("schemas", "--check")
    assert result.returncode == 0, result.stdout


def test_schemas_check_fails_when_stale(tmp_path: Path) -> None:
    assert swarmbus_cli("schemas", "--out", str(tmp_path)).returncode == 0
    (tmp_path / "finding.schema.json").write_text("{}")
    result = swarmbus_cli("schemas", "--check", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "finding.schema.json" in result.stdout


@pytest.mark.parametrize("args", [["nonsense"], []])
def test_bad_usage_exits_non_zero(args: list[str]) -> None:
    assert swarmbus_cli(*args).returncode != 0


async def _cli_on(nats_url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(120):
        return await anyio.run_process(
            [sys.executable, "-m", "swarmbus._cli", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": nats_url},
            check=False,
        )


@pytest.mark.parametrize("command", ["board", "tasks"])
async def test_unknown_session_is_exit_code_3(
    bus: Bus, nats_url: str, session_id: str, command: str
) -> None:
    await bus.publish(
        Finding(category="observation", content="x", confidence=0.5), agent="a", session="other"
    )
    result = await _cli_on(nats_url, command, session_id)
    assert result.returncode == 3, result.stderr
    assert result.stderr.decode() == (
        f"swarmbus: session {session_id} not found (no board keys, tasks or events)\n"
    )
    assert result.stdout == b""


async def _on_board(bus: Bus, session: str) -> None:
    await (await Blackboard.open(bus, session)).start("lead", {"task": "t"})


async def _with_task(bus: Bus, session: str) -> None:
    async with TaskQueue(bus, session) as queue:
        await queue.create("verify", agent="lead")


async def _with_event(bus: Bus, session: str) -> None:
    await bus.publish(
        Finding(category="observation", content="x", confidence=0.5), agent="a", session=session
    )


@pytest.mark.parametrize("command", ["board", "tasks"])
@pytest.mark.parametrize("write", [_on_board, _with_task, _with_event])
async def test_a_session_known_by_any_trace_is_found(
    bus: Bus,
    nats_url: str,
    session_id: str,
    command: str,
    write: Callable[[Bus, str], Awaitable[None]],
) -> None:
    await write(bus, session_id)
    result = await _cli_on(nats_url, command, session_id)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
