"""The public surface is exactly ``swarmbus.__all__``."""

from __future__ import annotations

import re
import types
from pathlib import Path

import swarmbus


def test_all_matches_public_attributes() -> None:
    public = {
        name
        for name, value in vars(swarmbus).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(swarmbus.__all__) - {"__version__"}


def test_every_error_derives_from_swarmbus_error() -> None:
    errors = [
        getattr(swarmbus, name)
        for name in swarmbus.__all__
        if name.endswith("Error") and isinstance(getattr(swarmbus, name), type)
    ]
    assert errors
    for error in errors:
        assert issubclass(error, swarmbus.SwarmbusError), error


def test_the_readme_points_users_at_public_names_only() -> None:
    """A call the README shows (``swarmbus.x(...)``) is public, never ``swarmbus._mod.x``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert re.findall(r"swarmbus\._\w+\.\w+", readme) == []
    called = set(re.findall(r"\bswarmbus\.(\w+)\(", readme))
    assert called
    assert called <= set(swarmbus.__all__), called - set(swarmbus.__all__)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _is_additive(ours: str, baseline: str) -> bool:
    """Every non-blank line of ``baseline`` is in ``ours``, in the same order."""
    remaining = iter(_lines(ours))
    return all(line in remaining for line in _lines(baseline))


def test_the_repository_carries_the_shared_wire_contract() -> None:
    """External services read CONTRACT.md from the repository. It may only grow: every
    line of the team's v1.0 baseline stays, in order (additions only)."""
    root = Path(__file__).resolve().parents[1]
    ours = (root / "CONTRACT.md").read_text()
    assert "# swarmbus wire contract" in ours
    copies = [p / "shared" / "CONTRACT.md" for p in root.parents]
    shared = next((c for c in copies if c.is_file()), None)
    if shared is not None:  # in the team's workspace: compare with the baseline
        assert _is_additive(ours, shared.read_text())


def test_the_additive_check_can_fail() -> None:
    baseline = "# title\n\na\nb\nc\n"
    assert _is_additive("# title\na\nnew\nb\n\nc\nmore\n", baseline)
    assert not _is_additive("# title\na\nc\n", baseline)
    assert not _is_additive("# title\nb\na\nc\n", baseline)
    assert not _is_additive("# title\na\nb changed\nc\n", baseline)
