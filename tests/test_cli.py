"""The console script: demo, schemas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
