"""Run one benchmark on two revisions of swarmbus, alternating, in the same session.

For "no path got slower" checks: both revisions run on the same machine, under the
same load, one after the other, ``--rounds`` times (base, head, base, head, ...).

    python bench/compare.py --base d9966fb --head HEAD bench/bench_core.py -- --quick

Each revision is checked out into a temporary git worktree and the benchmark script of
the *head* revision runs with that worktree first on ``PYTHONPATH``, so both sides run
the same measuring code against different swarmbus code. Output is printed per run,
tagged with the revision. Worktrees are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _worktree(ref: str, parent: Path) -> Path:
    path = parent / ref.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), ref], check=True
    )
    return path


def _run(tree: Path, script: Path, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout + (
        f"\n[exit {done.returncode}] {done.stderr[-2000:]}" if done.returncode else ""
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git ref of the baseline")
    parser.add_argument("--head", default="HEAD", help="git ref to compare (default HEAD)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations (default 3)")
    parser.add_argument("script", type=Path, help="benchmark script (e.g. bench/bench_core.py)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments after --")
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    with tempfile.TemporaryDirectory(prefix="swarmbus-compare-") as tmp:
        trees = {ref: _worktree(ref, Path(tmp)) for ref in (opts.base, opts.head)}
        try:
            for round_ in range(1, opts.rounds + 1):
                for ref, tree in trees.items():
                    print(f"===== round {round_} {ref} =====", flush=True)
                    print(_run(tree, opts.script.resolve(), args), flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
