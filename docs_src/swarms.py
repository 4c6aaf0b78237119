"""Swarms: a coordinator over the task queue, the query ledger, and a YAML spec."""

import secrets
import tempfile
from pathlib import Path
from typing import Any

import anyio

import swarmbus
from swarmbus import Agent, Coordinator, QueryLedger, RequestMessage, Subtask, TaskQueue

SESSION = f"INC-1234-{secrets.token_hex(3)}"

validator = Agent("ops/deploy-validator")
analyst = Agent("ops/log-analyst")


@validator.on_request("investigate")
async def investigate(request: RequestMessage) -> dict[str, Any]:
    return {"focus": request.request.parameters["focus"], "found": "deploy v1.2.3 at 10:15"}


@analyst.on_request("analyze_logs")
async def analyze_logs(request: RequestMessage) -> dict[str, Any]:
    return {"errors": 312, "service": request.request.parameters["service"]}


@validator.on_request("refine")
@analyst.on_request("refine")
async def refine(request: RequestMessage) -> dict[str, Any]:
    """A stage of a progressive refinement: read the `input`, return the `output` key."""
    p = request.request.parameters
    return {p["output"]: f"{p['task']} (from {sorted(p['inputs'])})"}


SPEC = """
swarm:
  type: progressive_refinement
  stages:
    - stage: 1
      agent: ops/deploy-validator
      task: "Identify recent changes"
      output: changes_list
    - stage: 2
      agent: ops/log-analyst
      task: "Correlate changes with errors"
      input: changes_list
      output: correlation_report
"""


async def coordinate(bus: swarmbus.Bus) -> None:
    async with (
        TaskQueue(bus, SESSION) as queue,
        swarmbus.serve_workers(queue, [validator, analyst]),
    ):
        coordinator = Coordinator(queue, agent="ops/architect")
        tasks = await coordinator.run(
            [
                Subtask("investigate", {"focus": "deployments"}, agent="ops/deploy-validator"),
                Subtask("analyze_logs", {"service": "checkout"}),  # any agent with it
            ],
            timeout=60,
        )
        print("subtasks:", [t.result for t in tasks if t.status == "completed"])


async def ledger(bus: swarmbus.Bus) -> None:
    runs = 0

    async def execute() -> str:
        nonlocal runs
        runs += 1
        return "0.05 (baseline 0.01)"

    outcomes = []
    for agent in ("ops/deploy-validator", "ops/log-analyst"):
        ledger = await QueryLedger.open(bus, SESSION, agent=agent)
        outcomes.append(await ledger.run("prometheus", "rate(errors[5m])", execute))
    print("query ran", runs, "time(s); reused:", [o.reused for o in outcomes])


async def main() -> None:
    async with swarmbus.connect() as bus:
        await coordinate(bus)
        await ledger(bus)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "refine.yaml"
            path.write_text(SPEC)
            result = await swarmbus.run_swarm(bus, swarmbus.load_spec(path), [validator, analyst])
        print("swarm:", result.status, result.outputs["correlation_report"])


anyio.run(main)
