"""Run by tests/test_observe_metrics.py in its own process (the meter provider is global).

Turns metrics on (Prometheus on a free port), makes a handler run and a lock wait, then
prints the scrape.
"""

from __future__ import annotations

import sys
import urllib.request

import anyio

from swarmbus import Bus, FindingMessage, Lock
from swarmbus._messages import Finding, Message
from swarmbus._observe._metrics import configure_metrics
from swarmbus._subjects import session_filter


async def main(url: str, session: str) -> None:
    setup = configure_metrics(prometheus_port=0)
    assert setup is not None
    assert setup.prometheus_url is not None
    handled = anyio.Event()

    async def handler(message: Message) -> None:
        if isinstance(message, FindingMessage):
            handled.set()

    async with Bus.open(url=url) as bus:
        await bus.subscribe(session_filter(session), handler, receiver="ops/observer")
        finding = Finding(category="observation", content="x", confidence=0.5)
        await bus.publish(finding, agent="ops/reporter", session=session)
        with anyio.fail_after(10):
            await handled.wait()
        holder, waiter = (
            Lock(bus, f"res-{session}", "ops/a", ttl=5),
            Lock(bus, f"res-{session}", "ops/b", ttl=5),
        )
        assert await holder.acquire() is not None
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                assert await waiter.acquire(timeout=10) is not None

            tg.start_soon(wait)
            await anyio.sleep(
                0.2
            )  # let the waiter start waiting; correctness does not depend on it
            await holder.release()
        await waiter.release()
    sys.stdout.write(await anyio.to_thread.run_sync(scrape, setup.prometheus_url))
    setup.close()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
