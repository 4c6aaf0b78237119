"""The documentation site builds with ``mkdocs build --strict`` (broken links, missing
snippets and pages left out of the nav fail it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mkdocs() -> str | None:
    beside = Path(sys.executable).parent / "mkdocs"
    return str(beside) if beside.exists() else shutil.which("mkdocs")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mkdocs = _mkdocs()
    if mkdocs is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "how" / "architecture" / "index.html").is_file()
