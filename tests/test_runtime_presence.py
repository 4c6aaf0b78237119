"""Presence and death: a SIGKILLed worker's task is offered again and its lock is free
at once, not when the task's 60 s timeout or the lock's 60 s TTL runs out."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import anyio
import nats
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from swarmbus import NatsServer, Settings
from swarmbus._runtime.supervisor import RuntimeConfig, running

HERE = Path(__file__).resolve().parent
WAIT = 10.0


async def _call(nc: nats.NATS, op: str, session: str, agent: str, body: dict[str, object]) -> dict:
    msg = await nc.request(
        f"swarmbus.api.{op}.{session}.{agent}", json.dumps(body).encode(), timeout=WAIT
    )
    reply: dict = json.loads(msg.data)
    assert reply["ok"], reply
    return reply["result"]  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_a_killed_workers_task_and_lock_are_released_within_3_seconds(
    fresh_server: NatsServer, session_id: str, unique: str
) -> None:
    nats_url = fresh_server.url  # its claims' consumers stay off the shared server
    resource = f"db:{unique}"
    config = RuntimeConfig(settings=Settings(url=nats_url), http=None)
    async with running(config):
        nc = await nats.connect(nats_url)
        lost = await nc.subscribe(f"agent.presence.lost.{session_id}.>")
        created = await _call(
            nc, "task.create", session_id, "ext/boss", {"type": "migrate", "timeout": 60}
        )
        command = [sys.executable, str(HERE / "plain_worker.py"), nats_url, session_id]
        command += ["ext/victim", "migrate", resource]
        async with await anyio.open_process(command, stderr=None) as worker:
            assert worker.stdout is not None
            with anyio.fail_after(WAIT):
                line = await BufferedByteReceiveStream(worker.stdout).receive_until(b"\n", 4096)
            held = json.loads(line)
            assert held["task"] == created["task"]["id"]
            os.kill(worker.pid, signal.SIGKILL)
            killed = time.monotonic()
            await worker.wait()
        with anyio.fail_after(3.0):
            again = await _call(
                nc, "task.claim", session_id, "ext/heir", {"types": ["migrate"], "wait": 3}
            )
            lock = await _call(
                nc, "lock.acquire", session_id, "ext/heir", {"resource": resource, "wait": 3}
            )
        elapsed = time.monotonic() - killed
        assert again["task"]["id"] == created["task"]["id"]
        assert again["attempt"] == 2  # the fencing token moved on
        assert lock["held"] is True
        assert lock["token"] > held["token"]
        assert elapsed < 3.0
        event = json.loads((await lost.next_msg(timeout=WAIT)).data)
        assert event["presence.lost"]["agent_id"] == "ext/victim"
        assert event["presence.lost"]["reason"] == "dead"
        assert event["presence.lost"]["released_tasks"] == [created["task"]["id"]]
        assert event["presence.lost"]["released_locks"] == [resource]
        await nc.drain()
