"""Every code block of the README (and of docs/**/*.md) runs, so a snippet cannot rot.

Each ```python block runs in its own process against a fresh nats-server (``NATS_URL``),
with a timeout. A block with top-level ``await`` runs inside an event loop with ``bus``
(a connected ``swarmbus.Bus``) and swarmbus's public names in scope; a plain script
runs as it is. An HTML comment right before a block changes that:

- ``<!-- not-run: reason -->``: skipped (a fragment that cannot run on its own);
- ``<!-- run-with: name -->``: :data:`SETUPS` [name] runs first, in the same scope
  (with ``tg``, a task group, and ``stack``, an AsyncExitStack, both closed after the
  block), e.g. to define the handler a fragment passes on.

```sh blocks are not run here; the first two are the commands ``.ci/run`` runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarmbus import NatsServer

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(?:<!--\s*(?P<marker>[\w-]+):\s*(?P<arg>.*?)\s*-->\n)?^```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)^```",
    re.S | re.M,
)
TIMEOUT = 60


@dataclass(frozen=True)
class Setup:
    """Code run before a block; ``cancel_after`` seconds, for a block that never ends."""

    code: str = ""
    cancel_after: float | None = None


SETUPS: dict[str, Setup] = {
    "runs-forever": Setup(cancel_after=3),
    "tasks": Setup(
        """
async def handler(task):
    return {"done": task.id}

stop_event = anyio.Event()
stop_event.set()
async with TaskQueue(bus, "INC-1234") as _queue:
    gated_id = (await _queue.create("deploy", agent="ops/lead", requires_approval=True)).id
"""
    ),
    "locks": Setup(
        """
async def edit_file(path, *, fencing_token):
    assert fencing_token > 0
"""
    ),
    "consensus": Setup(
        # The block's proposal needs a second voter to reach its quorum.
        """
_proposed = anyio.Event()

async def _on_proposal(message):
    _proposed.set()

async def _second_vote():
    await _proposed.wait()
    await (await Consensus.open(bus)).vote(
        Vote(proposal_id="rollback-v1.2.3", vote="yes", confidence=0.8),
        agent="security/incident-response-lead",
    )

await bus.subscribe("agent.action.proposed.INC-1234.>", _on_proposal, receiver="readme")
tg.start_soon(_second_vote)
"""
    ),
    "confidence": Setup(
        """
agents = [Agent("ops/dba", expertise={"database": 0.9}), Agent("ops/sre")]
findings = [Opinion("ops/dba", 0.9, evidence=3), Opinion("ops/sre", 0.6, category="database")]
"""
    ),
    "coordinator": Setup(
        """
validator = Agent("ops/deploy-validator")
analyst = Agent("ops/log-analyst")

@validator.on_request("investigate")
async def _investigate(request):
    return {"cause": "deploy v1.2.3"}

@analyst.on_request("analyze_logs")
async def _analyze(request):
    return {"errors": 42}

agents = [validator, analyst]
"""
    ),
    "tracing": Setup(
        """
board = await Blackboard.open(bus, "INC-1234")
lead = Agent("security/incident-response-lead")
await stack.enter_async_context(lead.serve(bus))
finding = Finding(category="observation", content="error rate 5x", confidence=0.9)
"""
    ),
}

# Runs one block: argv[1] is a JSON object {code, line, path, setup, cancel_after}.
RUNNER = """
import ast, contextlib, inspect, json, os, sys
import anyio, swarmbus
from datetime import timedelta
from swarmbus import *

job = json.loads(sys.argv[1])

def compiled(code, line):
    padded = "\\n" * (line - 1) + code
    return compile(padded, job["path"], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)

block = compiled(job["code"], job["line"])
scope = {"__name__": "__main__", **{k: v for k, v in globals().items() if k != "job"}}

async def run_async():
    async with (
        swarmbus.Bus.open(url=os.environ["NATS_URL"]) as bus,
        anyio.create_task_group() as tg,
        contextlib.AsyncExitStack() as stack,
    ):
        scope.update(bus=bus, tg=tg, stack=stack)
        setup = eval(compiled(job["setup"], 1), scope)
        if setup is not None:
            await setup
        with anyio.move_on_after(job["cancel_after"] or float("inf")):
            result = eval(block, scope)
            if result is not None:
                await result
        await stack.aclose()  # e.g. an agent's serve(), while the task group still runs
        tg.cancel_scope.cancel()

async def provision():
    async with swarmbus.Bus.open(url=os.environ["NATS_URL"]):
        pass  # the streams a swarmbus deployment has, for scripts that publish into them

if job["setup"] or block.co_flags & inspect.CO_COROUTINE:
    anyio.run(run_async)
else:
    anyio.run(provision)
    exec(block, scope)
"""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    marker: str | None
    arg: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [
        Block(
            path,
            text.count("\n", 0, m.start("code")) + 1,
            m["lang"],
            m["code"],
            m["marker"],
            m["arg"] or "",
        )
        for m in BLOCK.finditer(text)
    ]


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


PYTHON_BLOCKS = [
    b
    for doc in documents()
    for b in blocks(doc)
    if b.lang == "python" and not b.code.lstrip().startswith("--8<--")
]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    if block.marker == "not-run":
        pytest.skip(block.arg)
    assert block.marker in (None, "run-with"), f"unknown marker {block.marker!r}"
    setup = SETUPS[block.arg] if block.marker == "run-with" else Setup()
    job = {
        "code": block.code,
        "line": block.line,
        "path": str(block.path),
        "setup": setup.code,
        "cancel_after": setup.cancel_after,
    }
    with NatsServer(tmp_path / "nats") as server:
        env = {**os.environ, "NATS_URL": server.url, "PYTHONPATH": str(ROOT)}
        try:
            result = subprocess.run(
                [sys.executable, "-c", RUNNER, json.dumps(job)],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                cwd=tmp_path,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{block.id} still ran after {TIMEOUT} s")
    assert result.returncode == 0, f"{block.id}\n{result.stdout}\n{result.stderr}"


def test_every_python_block_is_found() -> None:
    readme = [b for b in PYTHON_BLOCKS if b.path.name == "README.md"]
    assert len(readme) >= 1  # the agent example; the other samples are in docs_src/
    assert all(b.marker != "run-with" or b.arg in SETUPS for b in PYTHON_BLOCKS)


def test_ci_runs_the_readme_commands() -> None:
    """.ci/run reads the README's first two ```sh blocks (demo, tests) and runs them."""
    demo, tests = [b.code.strip() for b in blocks(ROOT / "README.md") if b.lang == "sh"][:2]
    assert demo.startswith("python3 -m venv .venv && ")
    assert demo.endswith(" && .venv/bin/swarmbus demo")
    assert tests.startswith("python3 -m venv .venv && ")
    assert tests.endswith(" && .venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    extract = next(line for line in ci.splitlines() if line.startswith("readme_command()"))
    assert "for n in 1 2; do" in ci
    for n, command in enumerate((demo, tests), 1):
        out = subprocess.run(
            ["bash", "-c", f"{extract}\nreadme_command {n}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert out.strip() == command
