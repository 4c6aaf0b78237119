"""A worker that knows only NATS and JSON (no swarmbus import): joins a session, claims
a task and takes a lock through the runtime API, heartbeats, and prints what it holds.

    python tests/plain_worker.py NATS_URL SESSION AGENT TASK_TYPE RESOURCE
"""

from __future__ import annotations

import asyncio
import json
import sys

import nats


async def main(url: str, session: str, agent: str, task_type: str, resource: str) -> None:
    nc = await nats.connect(url)

    async def call(op: str, body: dict[str, object]) -> dict[str, object]:
        subject = f"swarmbus.api.{op}.{session}.{agent}"
        reply = json.loads((await nc.request(subject, json.dumps(body).encode(), timeout=10)).data)
        if not reply["ok"]:
            raise SystemExit(f"{op}: {reply['error']}")
        result: dict[str, object] = reply["result"]
        return result

    joined = await call("session.join", {})
    claimed = await call("task.claim", {"types": [task_type], "wait": 10})
    locked = await call("lock.acquire", {"resource": resource, "ttl": 60})
    task = claimed["task"]
    assert isinstance(task, dict)
    print(json.dumps({"task": task["id"], "token": locked["token"]}), flush=True)
    while True:  # heartbeats until killed
        await nc.publish(f"swarmbus.api.presence.heartbeat.{session}.{agent}", b"{}")
        await asyncio.sleep(float(str(joined["heartbeat_interval"])))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
