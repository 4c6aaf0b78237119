"""Conformance: ``swarmbus up`` with clients that do not import swarmbus.

An alerting service (plain nats-py) opens incident INC-style session with one request;
the intake starts the ``parallel_investigation`` configured for its kind; the only
investigator is written in Node.js (tests/node_agent, npm ``@nats-io/transport-node``
and ``@nats-io/jetstream``): it claims and completes its task, posts a finding and
votes; the decision event arrives. Every payload on the wire validates against
schemas/. This module imports no swarmbus code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import nats
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

ROOT = Path(__file__).resolve().parents[1]
NODE_AGENT = ROOT / "tests/node_agent"
SCHEMAS = ROOT / "schemas"
WAIT = 60.0
ENVELOPE = json.loads((SCHEMAS / "envelope.schema.json").read_text())

SPEC = """\
swarm:
  type: parallel_investigation
  task: "Investigate incident {session}"
  agents:
    - node/investigator:
        focus: "Check recent deployments and changes"
  coordination:
    share_findings: true
    timeout: 1m
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("node") is None, reason="needs node (Node.js 20+)"),
]


def _api_schema(op: str, part: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / f"api/{op}.{part}.schema.json").read_text())
    return schema


@asynccontextmanager
async def swarmbus_up(tmp: Path, session: str) -> AsyncIterator[tuple[Process, str, str]]:
    """``swarmbus up`` on an embedded server: (process, NATS URL, health URL)."""
    (tmp / "spec.yaml").write_text(SPEC.format(session=session))
    (tmp / "intake.yaml").write_text("kinds:\n  deploy-regression: spec.yaml\n")
    command = [str(Path(sys.executable).parent / "swarmbus"), "up", "--data-dir", str(tmp / "nats")]
    command += ["--intake", str(tmp / "intake.yaml"), "--http", "127.0.0.1:0"]
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    async with await anyio.open_process(command, env=env, stderr=None) as up:
        assert up.stdout is not None
        with anyio.fail_after(WAIT):
            line = await BufferedByteReceiveStream(up.stdout).receive_until(b"\n", 4096)
        ready = re.search(rb"nats=(\S+) http=(\S+)", line)
        assert ready is not None, line
        try:
            yield up, ready[1].decode(), ready[2].decode()
        finally:
            if up.returncode is None:
                up.send_signal(signal.SIGTERM)
                with anyio.fail_after(WAIT):
                    await up.wait()


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_a_node_investigator_takes_part_in_a_configured_swarm(tmp_path: Path) -> None:
    if not (NODE_AGENT / "node_modules").is_dir():
        pytest.skip("run `npm ci --prefix tests/node_agent` first (.ci/run does)")
    session = f"INC-{os.getpid()}"
    async with swarmbus_up(tmp_path, session) as (up, url, health):
        status, body = await anyio.to_thread.run_sync(_get, f"{health}/readyz")
        assert status == 200, body
        nc = await nats.connect(url)
        events = await nc.subscribe(f"agent.*.*.{session}.>")

        async def call(op: str, agent: str, request: dict[str, Any]) -> dict[str, Any]:
            jsonschema.validate(request, _api_schema(op, "request"))
            subject = f"swarmbus.api.{op}.{session}.{agent}"
            msg = await nc.request(subject, json.dumps(request).encode(), timeout=WAIT)
            reply: dict[str, Any] = json.loads(msg.data)
            jsonschema.validate(reply, _api_schema(op, "reply"))
            assert reply["ok"], reply
            return reply["result"]  # type: ignore[no-any-return]

        node = ["node", str(NODE_AGENT / "agent.mjs"), url, session, "node/investigator"]
        log = tmp_path / "node.jsonl"
        with log.open("wb") as out:
            agent = await anyio.open_process(node, stdout=out, stderr=None)
        async with agent:
            try:
                opened = await call("incident.open", "alerts/relay", {"kind": "deploy-regression"})
                assert opened["swarm"] == "parallel_investigation"
                seen: list[dict[str, Any]] = []
                with anyio.fail_after(WAIT):
                    while not any(e["type"] == "session.completed" for e in seen):
                        seen.append(json.loads((await events.next_msg(timeout=WAIT)).data))
                board = (await call("board.get", "alerts/relay", {}))["board"]
                assert {f["agent"] for f in board["findings"]} == {"node/investigator"}
                tasks = [e for e in seen if e["type"] == "task.completed"]
                assert len(tasks) == 1

                proposal = {
                    "proposal_id": f"rollback-{session}",
                    "action": "rollback",
                    "parameters": {"version": "v1.2.3"},
                    "voters": ["node/investigator"],
                    "timeout": "5m",
                }
                await call("proposal.create", "ops/lead", {"proposal": proposal})
                with anyio.fail_after(WAIT):
                    while not any(e["type"] == "decision" for e in seen):
                        seen.append(json.loads((await events.next_msg(timeout=WAIT)).data))
                    await agent.wait()
                assert agent.returncode == 0
            finally:
                if agent.returncode is None:  # failed early: do not wait for it forever
                    agent.kill()
        decision = next(e for e in seen if e["type"] == "decision")["decision"]
        assert (decision["outcome"], decision["votes_for"]) == ("approved", 1)
        for envelope in seen:
            jsonschema.validate(envelope, ENVELOPE)
        await nc.drain()
        printed = [json.loads(line) for line in log.read_text().splitlines()]
        assert {p["kind"] for p in printed} == {"reply", "event"}
        for item in printed:
            if item["kind"] == "event":
                jsonschema.validate(item["data"], ENVELOPE)
            else:
                op = ".".join(item["subject"].split(".")[2:4])
                jsonschema.validate(item["data"], _api_schema(op, "reply"))
        up.send_signal(signal.SIGTERM)
        with anyio.fail_after(WAIT):
            assert await up.wait() == 0
