"""Metrics: a Prometheus scrape during the demo finds task and decision counters above zero;
on Redis and PostgreSQL the task and proposal gauges read the store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from swarmbus import Bus, Consensus, Proposal, TaskQueue, Vote
from swarmbus._demo import incident
from swarmbus._observe import _instruments as instruments
from swarmbus._observe import _metrics
from tests._stores import store_options

ROOT = Path(__file__).resolve().parents[1]
URL = re.compile(rb"metrics at (http://\S+/metrics)")


def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on the endpoint."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def labelled(samples: dict[str, float], name: str, label: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{") and label in k)


@asynccontextmanager
async def metrics_command(nats_url: str, **extra: str) -> AsyncIterator[str]:
    """``swarmbus metrics`` (gauges polled every 0.2 s) running; yields its scrape URL."""
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "PYTHONPATH": str(ROOT),
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
        **extra,
    }
    command = [sys.executable, "-m", "swarmbus._cli", "metrics", "--interval", "0.2"]
    async with await anyio.open_process(command, env=env, cwd=ROOT) as process:
        try:
            assert process.stderr is not None
            with anyio.fail_after(30):
                note = b""
                while not URL.search(note):
                    note += await process.stderr.receive()
            match = URL.search(note)
            assert match is not None
            yield match[1].decode()
        finally:
            process.terminate()
            await process.wait()


async def scrape_until(url: str, done: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """Scrape until ``done`` (the observer polls asynchronously); fails after 20 s."""
    with anyio.fail_after(20):
        while True:
            samples = await anyio.to_thread.run_sync(scrape, url)
            if done(samples):
                return samples
            await anyio.sleep(0.1)


@pytest.mark.slow
async def test_prometheus_scrape_during_the_demo_counts_tasks_and_decisions(
    bus: Bus, nats_url: str, session_id: str
) -> None:
    async with metrics_command(nats_url) as url:
        with anyio.fail_after(30):
            result = await incident(bus, session=session_id, echo=lambda _: None)
        assert result.decision.outcome == "approved"
        samples = await scrape_until(
            url,
            lambda s: (
                total(s, "swarmbus_decisions_total") >= 1
                and total(s, "swarmbus_tasks_completed_total") >= 4
            ),
        )
    assert total(samples, "swarmbus_tasks_created_total") >= 4
    assert labelled(samples, "swarmbus_decisions_total", 'outcome="approved"') >= 1
    assert total(samples, "swarmbus_proposals_total") >= 1
    assert total(samples, "swarmbus_events_total") >= 30
    assert labelled(samples, "swarmbus_events_total", 'type="decision"') >= 1
    assert total(samples, "swarmbus_task_claim_latency_seconds_count") >= 4
    assert any(k.startswith("swarmbus_tasks_queue_depth{") for k in samples)
    assert any(k.startswith("swarmbus_proposals_open{") for k in samples)


def own_store(
    request: pytest.FixtureRequest, backend: str, unique: str
) -> tuple[dict[str, str], dict[str, str]]:
    """``Bus.open`` options and environment for a store of this test's own (the servers
    are shared and the gauges count every session): a key prefix on Redis, a new
    database on PostgreSQL."""
    options = store_options(request, backend)
    if backend == "redis":
        prefix = f"metrics-{unique}:"
        env = {"REDIS_URL": options["redis_url"], "SWARMBUS_KEY_PREFIX": prefix}
        return {**options, "key_prefix": prefix}, {"SWARM_BACKEND": backend, **env}
    base = options["database_url"]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE metrics_{unique}")
    url = base.rsplit("/", 1)[0] + f"/metrics_{unique}"
    return {"database_url": url}, {"SWARM_BACKEND": backend, "DATABASE_URL": url}


GAUGES = ("swarmbus_tasks_queue_depth", "swarmbus_proposals_open")


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_the_task_and_proposal_gauges_read_the_store_backend(
    request: pytest.FixtureRequest, backend: str, nats_url: str, session_id: str, unique: str
) -> None:
    options, env = own_store(request, backend, unique)

    def gauges(depth: int, proposals: int) -> Callable[[dict[str, float]], bool]:
        def done(s: dict[str, float]) -> bool:
            return (total(s, GAUGES[0]), total(s, GAUGES[1])) == (depth, proposals)

        return done

    kw: dict[str, Any] = {"backend": backend, **options}
    async with (
        Bus.open(url=nats_url, **kw) as bus,
        TaskQueue(bus, session_id) as queue,
        metrics_command(nats_url, **env) as url,
    ):
        consensus = await Consensus.open(bus)
        # A finished task is not counted, nor one waiting for approval.
        done = await queue.create("probe", agent="ops/lead")
        claim = await queue.claim(agent="ops/w", types=["probe"], timeout=5)
        assert claim is not None
        assert claim.task.id == done.id
        await claim.complete()
        await queue.create("probe", agent="ops/lead", requires_approval=True)
        await scrape_until(url, gauges(0, 0))
        for _ in range(3):
            await queue.create("probe", agent="ops/lead")
        proposal = Proposal(proposal_id=f"p-{unique}", action="rollback", voters=["ops/v"])
        await consensus.propose(proposal, agent="ops/lead", session=session_id)
        samples = await scrape_until(url, gauges(3, 1))
        assert total(samples, "swarmbus_tasks_queue_age_seconds") > 0

        claim = await queue.claim(agent="ops/w", types=["probe"], timeout=5)
        assert claim is not None
        await claim.complete()
        await scrape_until(url, gauges(2, 1))
        for claim in await queue.claim_many(agent="ops/w", types=["probe"], limit=5, timeout=5):
            await claim.complete()
        await consensus.vote(Vote(proposal_id=proposal.proposal_id, vote="yes"), agent="ops/v")
        samples = await scrape_until(url, gauges(0, 0))
        assert total(samples, "swarmbus_tasks_queue_age_seconds") == 0


async def test_in_process_instruments_add_nothing_while_metrics_are_off() -> None:
    assert instruments.state["on"] is False
    instruments.record_handler(0.1, type="finding", receiver="ops/a")
    instruments.record_lock_wait(0.1, acquired=True)
    instruments.record_published(object())
    seen: list[str] = []

    async def handler(message: str) -> None:
        seen.append(message)

    handling = instruments.observed(handler, "m", "ops/a")
    assert getattr(handling, "__qualname__", "").endswith(".handler")  # no wrapper frame
    await handling
    waiting = handler("n")
    assert instruments.lock_wait(waiting) is waiting
    await waiting
    assert seen == ["m", "n"]


def test_metrics_are_off_without_an_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    assert _metrics.configure_metrics() is None
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "carrier-pigeon")
    with pytest.raises(Exception, match="carrier-pigeon: swarmbus supports prometheus"):
        _metrics.configure_metrics()


def test_in_process_instruments_record_handlers_locks_and_publishes(
    nats_url: str, session_id: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OTEL_METRICS_EXPORTER": "prometheus",
           "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "tests._observe_inprocess", nats_url, session_id],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = {}
    for line in result.stdout.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    handled = 'receiver="ops/observer"'
    assert labelled(samples, "swarmbus_handler_duration_seconds_count", handled) >= 1
    assert labelled(samples, "swarmbus_lock_wait_seconds_count", 'acquired="true"') >= 1
    assert labelled(samples, "swarmbus_events_published_total", 'type="finding"') >= 1
