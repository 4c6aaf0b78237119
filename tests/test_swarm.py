"""Swarm specs, evidence queries run once, coordinator, parallel investigation, refinement."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from swarmbus import (
    Agent,
    Blackboard,
    Bus,
    Coordinator,
    Finding,
    Opinion,
    ParallelInvestigation,
    ProgressiveRefinement,
    QueryLedger,
    QueryTimeoutError,
    RequestMessage,
    SpecError,
    Subtask,
    TaskQueue,
    aggregate_confidence,
    load_spec,
    serve_workers,
)
from swarmbus._agent import serving
from swarmbus._coordinator import route_type
from swarmbus._durations import parse_duration
from swarmbus._query_ledger import _query_decoder, query_key
from swarmbus._spec import parse_spec
from swarmbus._swarm import load_agents, run_swarm

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "swarmbus._cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )


# --- specs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600.0), ("30s", 30.0), ("1h30m", 5400.0), ("500ms", 0.5), (45, 45.0), ("2.5", 2.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["10x", "", "m10", "-5s", 0, True, None, "10 minutes", "nan", "inf", "1e400", float("nan")],
)
def test_bad_durations_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_the_seeds_parallel_investigation_loads_as_given() -> None:
    spec = load_spec(EXAMPLES / "parallel_investigation.yaml")
    assert isinstance(spec, ParallelInvestigation)
    assert spec.task == "Investigate incident INC-1234"
    assert [(a.agent, a.focus) for a in spec.agents] == [
        ("ops/deploy-validator", "Check recent deployments and changes"),
        ("security/incident-response-lead", "Analyze error patterns and logs"),
        ("ops/rollback-advisor", "Assess rollback feasibility"),
    ]
    assert spec.coordination.share_findings
    assert spec.coordination.avoid_duplicate_queries
    assert spec.coordination.timeout == 600.0
    assert spec.synthesis is not None
    assert spec.synthesis.agent == "ops/architect"
    assert spec.synthesis.action == "Combine findings and recommend action"


def test_the_seeds_progressive_refinement_loads_as_given() -> None:
    spec = load_spec(EXAMPLES / "progressive_refinement.yaml")
    assert isinstance(spec, ProgressiveRefinement)
    assert [(s.stage, s.agent, s.input, s.output) for s in spec.stages] == [
        (1, "ops/deploy-validator", None, "changes_list"),
        (2, "security/incident-response-lead", "changes_list", "correlation_report"),
        (3, "ops/rollback-advisor", "correlation_report", "recommendation"),
    ]


PARALLEL = yaml.safe_load((EXAMPLES / "parallel_investigation.yaml").read_text())
PROGRESSIVE = yaml.safe_load((EXAMPLES / "progressive_refinement.yaml").read_text())


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with ``path`` (a.b.0.c) set to ``value`` (or deleted)."""
    data: Any = yaml.safe_load(yaml.safe_dump(base))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return dict(data)


_DELETE = object()


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (_with(PARALLEL, "swarm.type", "swarming"), "swarm.type", "does not match"),
        (_with(PARALLEL, "swarm.task", _DELETE), "swarm.task", "missing"),
        (_with(PARALLEL, "swarm.coordination.timeout", "10x"), "swarm.coordination.timeout", "10x"),
        (_with(PARALLEL, "swarm.coordination.timeout", "8d"), "swarm.coordination.timeout", "7d"),
        (
            _with(PARALLEL, "swarm.coordination.share_finding", True),
            "swarm.coordination.share_finding",
            "unknown field",
        ),
        (
            _with(PARALLEL, "swarm.agents.0", {"ops/deploy validator": {"focus": "x"}}),
            "swarm.agents[0].agent",
            "invalid agent id",
        ),
        (
            _with(PARALLEL, "swarm.agents.1", {"ops/x": "just a string"}),
            "swarm.agents[1]",
            "must be a mapping",
        ),
        (_with(PARALLEL, "swarm.agents", []), "swarm.agents", "at least 1"),
        (
            _with(PARALLEL, "swarm.agents.2", {"ops/deploy-validator": {"focus": "again"}}),
            "swarm.agents[2]",
            "listed twice",
        ),
        (_with(PARALLEL, "swarm.synthesis.agent", _DELETE), "swarm.synthesis.agent", "missing"),
        (
            _with(PROGRESSIVE, "swarm.stages.1.input", "nothing"),
            "swarm.stages[1].input",
            "not the output of an earlier stage",
        ),
        (_with(PROGRESSIVE, "swarm.stages.2.stage", 7), "swarm.stages[2].stage", "expected 3"),
        (
            _with(PROGRESSIVE, "swarm.stages.2.output", "changes_list"),
            "swarm.stages[2].output",
            "produced twice",
        ),
        (_with(PROGRESSIVE, "swarm.stages.0.agent", _DELETE), "swarm.stages[0].agent", "missing"),
        ({"swarm": {"stages": []}}, "swarm.type", "type"),
        ({}, "swarm", "missing"),
        (["swarm"], "(top level)", "mapping"),
    ],
)
def test_bad_specs_name_the_field(data: Any, field: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(data, source="spec.yaml")
    fields = dict(caught.value.problems)
    assert field in fields, caught.value.problems
    assert words in fields[field]
    assert f"  {field}: " in str(caught.value)
    assert "spec.yaml" in str(caught.value)


def test_unreadable_specs(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="No such file"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("swarm:\n  type: [unclosed\n")
    with pytest.raises(SpecError, match="line 3: not valid YAML"):
        load_spec(broken)


def test_cli_run_refuses_a_spec_that_is_not_utf8(tmp_path: Path) -> None:
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes(
        "swarm:\n  type: parallel_investigation\n  task: caf\u00e9\n".encode("latin-1")
    )
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(spec)
    result = cli("run", str(spec))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "not UTF-8" in result.stderr


def test_cli_run_reports_a_bad_spec_by_field(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        (EXAMPLES / "parallel_investigation.yaml").read_text().replace("10m", "ten minutes")
    )
    result = cli("run", str(spec))
    assert result.returncode == 2
    assert "swarm.coordination.timeout: invalid duration 'ten minutes'" in result.stderr


def test_agent_modules(tmp_path: Path) -> None:
    assert {a.id for a in load_agents(str(EXAMPLES / "incident_agents.py"))} == {
        "ops/deploy-validator",
        "security/incident-response-lead",
        "ops/rollback-advisor",
        "ops/architect",
    }
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(SpecError, match=r"agents\(\)"):
        load_agents(str(empty))
    with pytest.raises(SpecError, match="cannot import"):
        load_agents("no_such_module_here")
    broken = tmp_path / "broken.py"
    broken.write_text("def agents(:\n")  # not Python: a bad --agents, not a crash
    with pytest.raises(SpecError, match="cannot import"):
        load_agents(str(broken))


# --- evidence queries ----------------------------------------------------------------------


async def test_a_query_runs_once_per_session(bus: Bus, session_id: str, unique: str) -> None:
    runs: Counter[str] = Counter()
    started = anyio.Event()
    release = anyio.Event()

    async def slow() -> str:
        runs["q"] += 1
        started.set()
        await release.wait()
        return "0.05"

    first = await QueryLedger.open(bus, session_id, agent=f"t/a-{unique}")
    second = await QueryLedger.open(bus, session_id, agent=f"t/b-{unique}")
    outcomes = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def run(ledger: QueryLedger) -> None:
                outcomes.append(await ledger.run("prometheus", "rate(errors[5m])", slow))

            tg.start_soon(run, first)
            await started.wait()
            tg.start_soon(run, second)
            release.set()
    assert runs["q"] == 1
    assert sorted(o.reused for o in outcomes) == [False, True]
    assert {o.evidence.result for o in outcomes} == {"0.05"}
    assert {o.ran_by for o in outcomes} == {f"t/a-{unique}"}
    # Normalised: whitespace and source case do not make a new query.
    again = await second.run("Prometheus", "rate(errors[5m])  ", slow)
    assert again.reused
    assert runs["q"] == 1
    # Another session runs it again; so does a ledger with deduplication off.
    other = await QueryLedger.open(bus, f"{session_id}-2", agent=f"t/a-{unique}")
    assert not (await other.run("prometheus", "rate(errors[5m])", slow)).reused
    off = await QueryLedger.open(bus, session_id, agent=f"t/a-{unique}", enabled=False)
    assert not (await off.run("prometheus", "rate(errors[5m])", slow)).reused
    assert runs["q"] == 3


async def test_a_failed_query_is_taken_over(bus: Bus, session_id: str, unique: str) -> None:
    async def broken() -> str:
        raise RuntimeError("prometheus is down")

    async def works() -> str:
        return "ok"

    ledger = await QueryLedger.open(bus, session_id, agent=f"t/a-{unique}")
    with pytest.raises(RuntimeError, match="down"):
        await ledger.run("prometheus", "up", broken)
    other = await QueryLedger.open(bus, session_id, agent=f"t/b-{unique}")
    outcome = await other.run("prometheus", "up", works)
    assert (outcome.reused, outcome.ran_by, outcome.evidence.result) == (
        False,
        f"t/b-{unique}",
        "ok",
    )


async def test_a_query_whose_runner_vanished_is_taken_over_after_its_lease(
    bus: Bus, session_id: str, unique: str
) -> None:
    # A runner that crashed leaves a "running" record that nobody renews.
    first = await QueryLedger.open(bus, session_id, agent=f"t/a-{unique}", lease=0.5)
    kv = first._kv
    assert kv is not None
    orphan = b'{"source":"prometheus","query":"up","agent":"t/crashed"}'
    await kv.create(query_key(session_id, "prometheus", "up"), orphan)

    async def works() -> str:
        return "ok"

    with anyio.fail_after(10):
        outcome = await first.run("prometheus", "up", works, timeout=8)
    assert (outcome.reused, outcome.ran_by, outcome.evidence.result) == (
        False,
        f"t/a-{unique}",
        "ok",
    )


async def test_a_query_running_longer_than_its_lease_is_renewed_not_taken_over(
    bus: Bus, session_id: str, unique: str
) -> None:
    runner = await QueryLedger.open(bus, session_id, agent=f"t/a-{unique}", lease=0.6)
    waiter = await QueryLedger.open(bus, session_id, agent=f"t/b-{unique}", lease=0.6)
    assert runner._kv is not None
    key = query_key(session_id, "loki", "errors")
    runs = 0
    started = anyio.Event()

    async def slow() -> str:
        # Runs until the record was renewed 4 times: longer than 2 leases.
        nonlocal runs
        runs += 1
        first = (await runner._kv.get(key)).revision  # type: ignore[union-attr]
        started.set()
        async with runner._kv.watch(key) as entries:  # type: ignore[union-attr]
            async for entry in entries:
                if entry is not None and entry.revision >= first + 4:
                    return "42"
        raise AssertionError("watch ended")

    outcomes = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:

            async def run(ledger: QueryLedger) -> None:
                outcomes.append(await ledger.run("loki", "errors", slow, timeout=15))

            tg.start_soon(run, runner)
            await started.wait()
            tg.start_soon(run, waiter)
    assert runs == 1
    assert sorted((o.reused, o.ran_by) for o in outcomes) == [
        (False, f"t/a-{unique}"),
        (True, f"t/a-{unique}"),
    ]


async def test_a_query_runs_longer_than_the_waiting_timeout_and_raises_its_own_errors(
    bus: Bus, session_id: str, unique: str
) -> None:
    # ``timeout`` bounds waiting for another agent's run, not this agent's own query.
    ledger = await QueryLedger.open(bus, session_id, agent=f"t/a-{unique}")

    async def slow() -> str:
        await anyio.sleep(0.6)  # the query's own duration, longer than timeout
        return "42"

    async def times_out() -> str:
        raise TimeoutError("prometheus timed out")

    with anyio.fail_after(10):
        outcome = await ledger.run("prometheus", "slow", slow, timeout=0.2)
        assert (outcome.reused, outcome.evidence.result) == (False, "42")
        with pytest.raises(TimeoutError, match="prometheus timed out") as raised:
            await ledger.run("prometheus", "times out", times_out)
    assert not isinstance(raised.value, QueryTimeoutError)


async def test_a_query_finishing_during_a_renewal_records_its_result(
    bus: Bus, session_id: str, unique: str
) -> None:
    # A short lease renews every 2 ms, so queries often finish while a renewal is in
    # flight: cancelling it mid-request lost the new revision, the final "done" write
    # failed as "taken over" and the record stayed "running" for others to run again.
    ledger = await QueryLedger.open(bus, session_id, agent=f"t/a-{unique}", lease=0.006)
    assert ledger._kv is not None

    async def query() -> str:
        await anyio.sleep(0.01)  # the query's own duration: several renewals
        return "ok"

    statuses = Counter[str]()
    with anyio.fail_after(30):
        for i in range(30):
            await ledger.run("prometheus", f"q{i}", query)
            entry = await ledger._kv.get(query_key(session_id, "prometheus", f"q{i}"))
            assert entry is not None
            assert entry.value is not None
            statuses[_query_decoder.decode(entry.value).status] += 1
    assert statuses == {"done": 30}


def test_query_lease_must_be_positive() -> None:
    with pytest.raises(ValueError, match="lease"):
        QueryLedger(None, "s", "t/a", lease=0)


QUERY_WORKER = textwrap.dedent(
    """
    import random, sys
    import anyio
    from swarmbus import Bus, QueryLedger

    url, session, agent, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    async def main() -> None:
        async with Bus.open(url=url) as bus:
            ledger = await QueryLedger.open(bus, session, agent=agent)
            # Opposite orders: the two processes meet in the middle and race there.
            queries = list(range(count))[:: 1 if agent.endswith("0") else -1]
            print("READY", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)  # the test says GO

            async def one(q: int) -> None:
                async def execute() -> str:
                    print(f"RAN {q}", flush=True)
                    await anyio.sleep(random.random() * 0.02)  # the query's own work
                    return f"result-{q}"

                outcome = await ledger.run("prometheus", f"query {q}", execute)
                print(f"GOT {q} {outcome.evidence.result} {outcome.ran_by}", flush=True)

            for q in queries:
                await one(q)

    anyio.run(main)
    """
)


def test_avoid_duplicate_queries_across_two_processes(nats_url: str, session_id: str) -> None:
    count = 40
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", QUERY_WORKER, nats_url, session_id, f"t/agent-{i}", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:  # both connected: start them together so their queries race
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "READY"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outputs.append(out.splitlines())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    ran = Counter(line.split()[1] for lines in outputs for line in lines if line.startswith("RAN"))
    assert ran == Counter({str(q): 1 for q in range(count)}), "a query ran twice (or never)"
    for lines in outputs:
        got = {line.split()[1]: line.split()[2] for line in lines if line.startswith("GOT")}
        assert got == {str(q): f"result-{q}" for q in range(count)}
    runners = {line.split()[3] for lines in outputs for line in lines if line.startswith("GOT")}
    assert runners == {"t/agent-0", "t/agent-1"}, "both processes should have run some queries"


# --- progressive refinement -------------------------------------------------------------------


async def test_progressive_refinement_chains_outputs(bus: Bus) -> None:
    spec = load_spec(EXAMPLES / "progressive_refinement.yaml")
    result = await run_swarm(bus, spec, load_agents(str(EXAMPLES / "incident_agents.py")))
    assert result.ok, result.error
    assert [s.status for s in result.steps] == ["completed"] * 3
    assert result.outputs["changes_list"] == [
        {"service": "checkout", "change": "v1.2.3 at 10:15 UTC"}
    ]
    assert result.outputs["correlation_report"]["suspect"] == "v1.2.3 at 10:15 UTC"
    assert result.outputs["recommendation"] == {
        "action": "rollback",
        "from": "v1.2.3 at 10:15 UTC",
        "to": "v1.2.2",
    }


def _stage_agents(unique: str, *, fail_at: int | None) -> tuple[list[Agent], list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    agents = []
    for n, output in enumerate(["a", "b", "c"], start=1):
        agent = Agent(f"t/stage{n}-{unique}")

        @agent.on_request("refine")
        async def refine(request: RequestMessage, n: int = n, output: str = output) -> Any:
            seen.append(dict(request.request.parameters))
            if n == fail_at:
                raise RuntimeError(f"stage {n} broke")
            return {output: f"{output}({request.request.parameters['inputs']})"}

        agents.append(agent)
    return agents, seen


def _stages_spec(unique: str) -> ProgressiveRefinement:
    spec = parse_spec(
        {
            "swarm": {
                "type": "progressive_refinement",
                "stages": [
                    {"stage": 1, "agent": f"t/stage1-{unique}", "task": "one", "output": "a"},
                    {
                        "stage": 2,
                        "agent": f"t/stage2-{unique}",
                        "task": "two",
                        "input": "a",
                        "output": "b",
                    },
                    {
                        "stage": 3,
                        "agent": f"t/stage3-{unique}",
                        "task": "three",
                        "input": "b",
                        "output": "c",
                        "timeout": "2s",
                    },
                ],
            }
        }
    )
    assert isinstance(spec, ProgressiveRefinement)
    return spec


async def test_each_stage_gets_the_previous_output(bus: Bus, unique: str) -> None:
    agents, seen = _stage_agents(unique, fail_at=None)
    result = await run_swarm(bus, _stages_spec(unique), agents)
    assert result.ok
    assert [p["inputs"] for p in seen] == [{}, {"a": "a({})"}, {"b": "b({'a': 'a({})'})"}]
    assert [p["task"] for p in seen] == ["one", "two", "three"]
    assert result.outputs["c"] == "c({'b': \"b({'a': 'a({})'})\"})"


async def test_a_failed_stage_stops_the_pipeline(bus: Bus, unique: str) -> None:
    agents, seen = _stage_agents(unique, fail_at=2)
    result = await run_swarm(bus, _stages_spec(unique), agents)
    assert not result.ok
    assert [s.status for s in result.steps] == ["completed", "failed", "skipped"]
    assert result.error is not None
    assert result.error.startswith("stage 2 failed")
    assert "stage 2 broke" in result.error
    assert len(seen) == 2, "stage 3 must not run"
    assert result.outputs == {"a": "a({})"}
    assert result.to_dict()["status"] == "failed"


async def test_a_missing_stage_agent_fails_clearly(bus: Bus, unique: str) -> None:
    agents, _ = _stage_agents(unique, fail_at=None)
    result = await run_swarm(bus, _stages_spec(unique), agents[:2])
    assert [s.status for s in result.steps] == ["completed", "completed", "failed"]
    assert result.error == f"stage 3 failed: no agent t/stage3-{unique} answers 'refine'"


# --- coordinator and parallel investigation ------------------------------------------------------


async def test_coordinator_assigns_by_capability(bus: Bus, session_id: str, unique: str) -> None:
    """'any' subtasks go to whoever has the capability; routed ones to that agent only."""
    alice, bob = Agent(f"t/alice-{unique}"), Agent(f"t/bob-{unique}")
    for agent in (alice, bob):

        @agent.on_request("count")
        async def count(request: RequestMessage, agent: Agent = agent) -> Any:
            return {"by": agent.id, "n": request.request.parameters["n"] + 1}

    @bob.on_request("fail")
    async def fail(request: RequestMessage) -> Any:
        raise ValueError("no such thing")

    async with (
        TaskQueue(bus, session_id) as queue,
        serving(bus, [alice, bob]),
        serve_workers(queue, [alice, bob]),
    ):
        coordinator = Coordinator(queue, agent=f"t/boss-{unique}")
        tasks = await coordinator.run(
            [
                *(Subtask("count", {"n": i}, agent=alice.id) for i in range(3)),
                Subtask("count", {"n": 10}),
                Subtask("fail"),
            ],
            timeout=20,
        )
    assert [t.status for t in tasks] == ["completed"] * 4 + ["failed"]
    assert [t.result["by"] for t in tasks[:3] if t.result] == [alice.id] * 3
    assert [t.result["n"] for t in tasks[:4] if t.result] == [1, 2, 3, 11]
    assert tasks[3].assigned_to in (alice.id, bob.id)
    assert tasks[4].assigned_to == bob.id
    assert "no such thing" in (tasks[4].error or "")
    assert tasks[0].type == route_type("count", alice.id) != route_type("count", bob.id)
    assert all(t.created_by == f"t/boss-{unique}" for t in tasks)


async def test_parallel_investigation_end_to_end(bus: Bus, unique: str) -> None:
    spec = load_spec(EXAMPLES / "parallel_investigation.yaml")
    agents = load_agents(str(EXAMPLES / "incident_agents.py"))
    session = f"INC-{unique}"
    with anyio.fail_after(60):
        result = await run_swarm(bus, spec, agents, session=session)
    assert result.ok, result.error
    assert result.session == session
    assert [s.agent for s in result.steps] == [
        "ops/deploy-validator",
        "security/incident-response-lead",
        "ops/rollback-advisor",
        "ops/architect",
    ]
    assert result.outputs["decision"]["decision"] == "rollback"
    hypotheses = {h["description"]: h["confidence"] for h in result.outputs["hypotheses"]}
    # The seed's weighted average over the two agents that backed it.
    expected = aggregate_confidence(
        [
            Opinion("ops/deploy-validator", 0.8, 2, "hypothesis"),
            Opinion("ops/rollback-advisor", 0.85, 1, "hypothesis"),
        ],
        {a.id: a.expertise for a in agents},
    )
    assert hypotheses["deployment v1.2.3 caused the error spike"] == pytest.approx(
        expected, abs=1e-3
    )
    board = await Blackboard.open(bus, session)
    snapshot = await board.snapshot()
    assert {f.agent for f in snapshot.findings} == {
        "ops/deploy-validator",
        "security/incident-response-lead",
        "ops/rollback-advisor",
    }
    assert len(snapshot.findings) == len(result.outputs["findings"]) == 7
    assert all(f.evidence for f in snapshot.findings if f.category == "observation")
    assert len(snapshot.hypotheses) == 3
    assert [a.action for a in snapshot.actions_taken] == ["rollback"]
    assert snapshot.session is not None
    assert snapshot.session.status == "completed"


async def test_a_failing_investigator_fails_the_swarm(bus: Bus, unique: str) -> None:
    good, bad = Agent(f"t/good-{unique}"), Agent(f"t/bad-{unique}")

    @good.on_request("investigate")
    async def fine(request: RequestMessage) -> Any:
        return {"findings": [Finding(category="observation", content="all fine", confidence=0.5)]}

    @bad.on_request("investigate")
    async def broken(request: RequestMessage) -> Any:
        raise RuntimeError("cannot reach logs")

    spec = parse_spec(
        {
            "swarm": {
                "type": "parallel_investigation",
                "task": "look",
                "agents": [{good.id: {"focus": "a"}}, {bad.id: {"focus": "b"}}],
                "coordination": {"timeout": "20s", "share_findings": False},
            }
        }
    )
    result = await run_swarm(bus, spec, [good, bad], session=f"S-{unique}")
    assert not result.ok
    assert [s.status for s in result.steps] == ["completed", "failed"]
    assert result.error is not None
    assert "cannot reach logs" in result.error
    assert [f["content"] for f in result.outputs["findings"]] == ["all fine"]


def test_cli_runs_both_seed_specs(tmp_path: Path, nats_url: str) -> None:
    embedded = cli(
        "run", "examples/parallel_investigation.yaml", "--data-dir", str(tmp_path / "nats")
    )
    assert embedded.returncode == 0, embedded.stderr
    result = yaml.safe_load(embedded.stdout)
    assert result["status"] == "completed"
    assert result["outputs"]["decision"]["decision"] == "rollback"
    progressive = cli(
        "run",
        "examples/progressive_refinement.yaml",
        "--agents",
        "examples/incident_agents.py",
        env={"NATS_URL": nats_url},
    )
    assert progressive.returncode == 0, progressive.stderr
    result = yaml.safe_load(progressive.stdout)
    assert result["status"] == "completed"
    assert result["outputs"]["recommendation"]["action"] == "rollback"


def test_cli_run_in_a_session_already_run_is_a_one_line_error(
    nats_url: str, session_id: str
) -> None:
    run = ("run", "examples/parallel_investigation.yaml", "--session", session_id)
    assert cli(*run, env={"NATS_URL": nats_url}).returncode == 0
    again = cli(*run, env={"NATS_URL": nats_url})
    assert again.returncode == 2, again.stderr
    assert again.stderr.startswith("swarmbus: error: conflict on"), again.stderr
    assert "Traceback" not in again.stderr


async def test_an_investigator_still_running_at_the_timeout_does_not_hold_the_run(
    bus: Bus, unique: str
) -> None:
    """The coordination timeout bounds the run: a hung investigator is reported, not awaited."""
    quick, stuck = Agent(f"t/quick-{unique}"), Agent(f"t/stuck-{unique}")

    @quick.on_request("investigate")
    async def fine(request: RequestMessage) -> Any:
        return {"findings": [Finding(category="observation", content="all fine", confidence=0.5)]}

    @stuck.on_request("investigate")
    async def hangs(request: RequestMessage) -> Any:
        await anyio.sleep_forever()

    spec = parse_spec(
        {
            "swarm": {
                "type": "parallel_investigation",
                "task": "look",
                "agents": [quick.id, stuck.id],
                "coordination": {"timeout": "2s"},
            }
        }
    )
    with anyio.fail_after(20):
        result = await run_swarm(bus, spec, [quick, stuck], session=f"S-{unique}")
    assert [s.status for s in result.steps] == ["completed", "failed"]
    assert "not finished in time" in (result.error or "")


@pytest.mark.parametrize(
    "source", ['raise RuntimeError("boom")\n', 'def agents():\n    raise KeyError("boom")\n']
)
def test_cli_run_with_an_agents_module_that_raises_is_a_one_line_error(
    tmp_path: Path, nats_url: str, source: str
) -> None:
    """Exit 1 means 'a step failed': a module that cannot give its agents is exit 2."""
    module = tmp_path / "raising.py"
    module.write_text(source)
    run = cli(
        "run",
        "examples/progressive_refinement.yaml",
        "--agents",
        str(module),
        env={"NATS_URL": nats_url},
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("swarmbus: error:"), run.stderr
    assert "boom" in run.stderr
    assert "Traceback" not in run.stderr
