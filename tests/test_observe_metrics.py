"""Metrics: a Prometheus scrape during the demo finds task and decision counters above zero."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import anyio
import pytest

from swarmbus import Bus
from swarmbus._demo import incident
from swarmbus._observe import _instruments as instruments
from swarmbus._observe import _metrics

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


@pytest.mark.slow
async def test_prometheus_scrape_during_the_demo_counts_tasks_and_decisions(
    bus: Bus, nats_url: str, session_id: str
) -> None:
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "PYTHONPATH": str(ROOT),
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
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
                url = match[1].decode()
                result = await incident(bus, session=session_id, echo=lambda _: None)
                assert result.decision.outcome == "approved"
                # The observer counts asynchronously: scrape until it caught up.
                while True:
                    samples = await anyio.to_thread.run_sync(scrape, url)
                    if (
                        total(samples, "swarmbus_decisions_total") >= 1
                        and total(samples, "swarmbus_tasks_completed_total") >= 4
                    ):
                        break
                    await anyio.sleep(0.1)
        finally:
            process.terminate()
            await process.wait()
    assert total(samples, "swarmbus_tasks_created_total") >= 4
    assert labelled(samples, "swarmbus_decisions_total", 'outcome="approved"') >= 1
    assert total(samples, "swarmbus_proposals_total") >= 1
    assert total(samples, "swarmbus_events_total") >= 30
    assert labelled(samples, "swarmbus_events_total", 'type="decision"') >= 1
    assert total(samples, "swarmbus_task_claim_latency_seconds_count") >= 4
    assert any(k.startswith("swarmbus_tasks_queue_depth{") for k in samples)
    assert any(k.startswith("swarmbus_proposals_open{") for k in samples)


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
