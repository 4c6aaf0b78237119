"""Issue 21's smaller fixes: a timed-out subtask ends as failed, a session id cannot be
run twice without a clear error, ``swarmbus run`` names what each absent agent needs, and
a malformed capability request is answered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarmbus import (
    Agent,
    Bus,
    ConflictError,
    NatsServer,
    RequestMessage,
    TaskQueue,
    run_swarm,
)
from swarmbus._coordinator import Coordinator, Subtask
from swarmbus._spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]


def _spec(timeout: str) -> object:
    return parse_spec(
        {
            "swarm": {
                "type": "parallel_investigation",
                "task": "t",
                "agents": [{"ops/absent": {"focus": "f"}}],
                "coordination": {"timeout": timeout},
            }
        }
    )


async def test_a_subtask_not_finished_in_time_ends_as_failed(
    fresh_server: NatsServer, session_id: str
) -> None:
    # The late claim creates durable consumers: a server of its own keeps them off the
    # shared one.
    async with Bus.open(url=fresh_server.url) as bus, TaskQueue(bus, session_id) as queue:
        coordinator = Coordinator(queue)
        (task,) = await coordinator.run([Subtask("investigate", agent="ops/absent")], timeout=0.5)
        assert task.status == "failed"
        assert task.error is not None
        assert "not finished in time (0.5s)" in task.error
        assert (await queue.get(task.id)).status == "failed"
        # a worker arriving late finds nothing to claim
        assert await queue.claim(agent="ops/absent", types=[task.type]) is None


async def test_running_a_session_id_again_says_so(bus: Bus, session_id: str) -> None:
    spec = _spec("1s")
    first = await run_swarm(bus, spec, session=session_id)  # type: ignore[arg-type]
    assert first.status == "failed"
    with pytest.raises(ConflictError, match=f"session {session_id} was already run"):
        await run_swarm(bus, spec, session=session_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "needs"),
    [
        ("progressive_refinement.yaml", "Agent.on_request('refine')"),
        ("parallel_investigation.yaml", "serve_workers, or the API's task.claim"),
    ],
)
def test_run_names_what_an_absent_agent_needs(
    tmp_path: Path, nats_url: str, session_id: str, spec: str, needs: str
) -> None:
    (tmp_path / "none.py").write_text("def agents():\n    return []\n")
    text = (ROOT / "examples" / spec).read_text().replace("timeout: 10m", "timeout: 1s")
    (tmp_path / spec).write_text(text)
    command = [sys.executable, "-m", "swarmbus._cli", "run", str(tmp_path / spec)]
    done = subprocess.run(
        [*command, "--agents", str(tmp_path / "none.py"), "--session", session_id],
        env={**os.environ, "NATS_URL": nats_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert needs in done.stderr
    if spec.startswith("progressive"):
        assert "serve_workers" not in done.stderr


async def test_a_malformed_capability_request_gets_a_failure_response(
    bus: Bus, session_id: str, unique: str
) -> None:
    """It used to get no reply at all: the requester waited for its timeout."""
    agent = Agent(f"test/responder-{unique}")

    @agent.on_request("analyze_logs")
    async def analyze(request: RequestMessage) -> dict[str, object]:
        return {}

    subject = f"swarmbus.request.analyze_logs.{agent.id}.{session_id}.ext/go"
    async with agent.serve(bus):
        msg = await bus.nc.request(subject, b'{"id": "R-1", "not": "an envelope"}', timeout=10)
    reply = json.loads(msg.data)
    assert reply["type"] == "response"
    assert reply["response"]["request_id"] == "R-1"
    assert reply["response"]["status"] == "failure"
    assert reply["response"]["result"]["error"] == "not_envelope"
    assert reply["source"]["session"] == session_id
