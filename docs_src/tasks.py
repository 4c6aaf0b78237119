"""The task queue: create, claim, heartbeat, complete; a worker loop; approval."""

import secrets
from typing import Any

import anyio

import swarmbus
from swarmbus import Task, TaskQueue, TaskSpec

SESSION = f"INC-1234-{secrets.token_hex(3)}"  # a fresh session each run


async def analyze(task: Task) -> dict[str, Any]:
    """A worker's handler: returns the result (a JSON object); raising fails the task."""
    return {"analyzed": task.id}


async def main() -> None:
    async with swarmbus.connect() as bus, TaskQueue(bus, SESSION) as queue:
        task = await queue.create(
            "investigate",
            agent="ops/lead",
            priority=8,
            target="checkout-api",
            context={"since": "10:15Z"},
            timeout=120,
        )
        specs = [TaskSpec(type="analyze", priority=3)] * 10
        analyses = await queue.create_many(specs, agent="ops/lead")

        claim = await queue.claim(agent="ops/deploy-validator", types=["investigate"], timeout=5)
        assert claim is not None
        print("claimed", claim.task.id == task.id, "attempt", claim.attempt)
        await claim.heartbeat()  # status running, lease += timeout
        done = await claim.complete({"cause": "deploy v1.2.3"})  # or claim.fail("why", retry=True)
        print(done.type, done.status, done.result)

        # Or let the queue run the loop: batched claims, heartbeats, fail + retry on errors.
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: queue.work(analyze, agent="ops/analyst", types=["analyze"], stop=stop)
            )
            with anyio.fail_after(30):  # wait(): a task's final record, once written
                results = [(await queue.wait(t.id)).result for t in analyses]
            stop.set()  # work() stops claiming, then finishes (completes) what it holds
        print("completed:", len(await queue.tasks("completed")), results[0] is not None)

        # A gated task is stored but offered to nobody until approved.
        gated = await queue.create("rollback", agent="ops/lead", requires_approval=True)
        print("gated:", (await queue.get(gated.id)).approval)
        approved = await queue.approve(gated.id, by="consensus/decider")  # or queue.reject(...)
        print("gated:", approved.approval, approved.status)


anyio.run(main)
