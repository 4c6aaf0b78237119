"""Every code sample of the documentation (docs_src/*.py) runs against a real server.

The pages include these files with pymdownx.snippets, so what a reader copies is what
this test ran. Each sample is a program of its own: it runs as a subprocess with
``NATS_URL`` pointing at the session's nats-server and must exit 0 and print what the
page says it prints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS_SRC = ROOT / "docs_src"
DOCS = ROOT / "docs"
TIMEOUT = 120

#: Lines (substrings) each sample must print; a sample not listed must print nothing in particular.
EXPECTED: dict[str, list[str]] = {
    "agent_five_lines.py": ["error rate 5x {'version': 'v1.2.3', 'healthy': False}"],
    "agents.py": [
        "grep_logs: success {'matches': 42}",
        "grep_logs without a service: failure",
        "no responder: no agent answers capability 'no_such_capability'",
        "finding from ops/prometheus-bridge : error rate 5x",
    ],
    "blackboard.py": [
        "phase: mitigate",
        "content: deployment v1.2.3 at 10:15 UTC",
        "status: approved",
        "watching from revision",
        "change: session put",
    ],
    "tasks.py": [
        "claimed True attempt 1",
        "investigate completed {'cause': 'deploy v1.2.3'}",
        "completed: 11",
        "gated: required",
        "gated: approved pending",
    ],
    "locks.py": [
        "held by ops/release-manager",
        "other acquire while held: None",
        "tokens increase: True",
        "refused: fencing token",
        "second release: LockLostError",
        "holder now: None",
    ],
    "consensus.py": ["votes are final", "approved rollback early", "for 2 against 0"],
    "confidence.py": ["weighted_average 0.8", "log_odds 0.832"],
    "dead_letter.py": [
        "error.occurred from security/incident-response-lead : not_json",
        "dead-lettered: True original subject: agent.finding.reported.",
        "kept: b'{not json' not_json",
    ],
    "external_publisher.py": [
        "agent got: ext/prometheus-bridge error rate 5x baseline",
        "on the board:",
    ],
    "swarms.py": [
        "'found': 'deploy v1.2.3 at 10:15'",
        "{'errors': 312, 'service': 'checkout'}",
        "query ran 1 time(s); reused: [False, True]",
        "swarm: completed Correlate changes with errors",
    ],
    "tracing.py": ["handler in trace True", "one trace: True"],
    "mcp_client.py": [
        "tools: 19",
        "findings: [('ops/claude', 'error rate 5x since 10:15')]",
        "confidence 1.7 is a tool error: True",
    ],
}

SAMPLES = sorted(p.name for p in DOCS_SRC.glob("*.py"))


def test_every_sample_has_expected_output() -> None:
    assert set(EXPECTED) == set(SAMPLES)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_runs(name: str, nats_url: str) -> None:
    env = {**os.environ, "NATS_URL": nats_url, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(DOCS_SRC / name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    for line in EXPECTED[name]:
        assert line in done.stdout, f"{name} did not print {line!r}:\n{done.stdout}"


def _included(text: str) -> set[str]:
    return set(re.findall(r'--8<-- "docs_src/([^":]+\.py)(?::[^"]*)?"', text))


def test_every_sample_is_in_a_page() -> None:
    pages = "".join(p.read_text() for p in DOCS.rglob("*.md"))
    assert _included(pages) == set(SAMPLES)


def test_pages_have_no_python_that_no_test_runs() -> None:
    """A ```python block in a page holds nothing but snippet includes of docs_src/."""
    for page in DOCS.rglob("*.md"):
        for block in re.findall(r"```python[^\n]*\n(.*?)```", page.read_text(), re.S):
            lines = [line for line in block.splitlines() if line.strip()]
            assert all(line.startswith('--8<-- "docs_src/') for line in lines), (
                f"{page.relative_to(ROOT)} has inline Python; put it in docs_src/"
            )


def test_readme_agent_is_the_docs_sample() -> None:
    """The README's agent example is the one the agents page includes (and this test runs)."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert (DOCS_SRC / "agent_five_lines.py").read_text() in blocks
