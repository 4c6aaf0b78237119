"""Agent runtime on a real nats-server: durable consumers, requests, draining."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import swarmbus
from swarmbus import Agent, Bus, Finding, FindingMessage, RequestMessage
from swarmbus._agent import TASK_EVENTS
from swarmbus._subjects import event_filter

WAIT = 10


def finding(content: str = "x") -> Finding:
    return Finding(category="observation", content=content, confidence=0.5)


async def test_handler_slower_than_ack_wait_runs_once(
    bus: Bus, session_id: str, unique: str
) -> None:
    """A live handler keeps its message: it is not redelivered (and run again) meanwhile."""
    calls: list[str] = []
    done = anyio.Event()

    async def handler(message: Any) -> None:
        calls.append(message.id)
        await anyio.sleep(3.5)  # the work: longer than ack_wait
        done.set()

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: bus.consume(
                f"slow-{unique}",
                [event_filter("finding", "reported", session_id)],
                handler,
                receiver=f"test/slow-{unique}",
                limiter=anyio.Semaphore(4),
                stop=stop,
                ack_wait=1.0,
                task_status=task_status,
            )
        )
        await bus.publish(finding(), agent="test/pub", session=session_id)
        with anyio.fail_after(WAIT):
            await done.wait()
        stop.set()
    info = await bus.js.consumer_info("SWARMBUS_EVENTS", f"slow-{unique}")
    assert len(calls) == 1, calls
    assert info.num_redelivered == 0


async def test_agent_named_any_cannot_answer_requests(bus: Bus, unique: str) -> None:
    """An agent ``any`` would answer every request to ``any`` twice (in both its queue
    groups), and a request to it by id would go to any capable agent."""
    cap = f"cap_{unique}"

    async def handle(request: RequestMessage) -> dict[str, Any]:
        return {}

    with pytest.raises(swarmbus.InvalidIdentifierError):
        Agent("any").on_request(cap)
    async with anyio.create_task_group() as tg:
        with pytest.raises(swarmbus.InvalidIdentifierError):
            await bus.serve_requests(
                cap, handle, agent="any", limiter=anyio.Semaphore(1), task_group=tg
            )


async def test_one_function_registered_for_two_routes_keeps_each_routes_filter(
    bus: Bus, session_id: str, unique: str
) -> None:
    """A function used for findings and for tasks gets both: the second registration
    did not take over the first one's type filter (findings were acked unhandled)."""
    agent = Agent(f"test/both-{unique}")
    got: list[str] = []
    done = anyio.Event()

    async def record(message: Any) -> None:
        got.append(message.type)
        done.set()

    agent.on_finding(session=session_id)(record)
    agent.on_event("task", types=TASK_EVENTS, session=session_id, name="tasks")(record)
    async with agent.serve(bus):
        await bus.publish(finding(), agent="test/pub", session=session_id)
        with anyio.fail_after(WAIT):
            await done.wait()
    assert got == ["finding"]


async def test_run_stops_every_agent_at_once(bus: Bus, unique: str) -> None:
    """At the stop signal every agent stops taking messages: the first one did not
    while the second drained (agents were stopped one after the other)."""
    first = Agent(f"test/first-{unique}")
    second = Agent(f"test/second-{unique}")
    entered, release, until = anyio.Event(), anyio.Event(), anyio.Event()

    @first.on_finding(session=f"A-{unique}")
    async def on_first(message: FindingMessage) -> None:
        pass

    @second.on_finding(session=f"B-{unique}")
    async def on_second(message: FindingMessage) -> None:
        entered.set()
        await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: swarmbus.run(first, second, bus=bus, until=until))
        with anyio.fail_after(WAIT):
            while second._bus is None:
                await anyio.wait_all_tasks_blocked()
        await bus.publish(finding(), agent="test/pub", session=f"B-{unique}")
        with anyio.fail_after(WAIT):
            await entered.wait()
        until.set()  # second drains its in-flight handler...
        with anyio.fail_after(WAIT):  # ...while first has stopped
            while first._bus is not None:
                await anyio.wait_all_tasks_blocked()
        release.set()


async def test_stopped_agent_does_not_handle_a_message_its_last_fetch_brings(
    bus: Bus, session_id: str, unique: str
) -> None:
    """A message that arrives for the pull request still open at the stop is given
    back, not handled by the draining agent."""
    agent = Agent(f"test/late-{unique}")
    handled: list[str] = []
    until = anyio.Event()

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        handled.append(message.id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: swarmbus.run(agent, bus=bus, until=until))
        with anyio.fail_after(WAIT):
            while agent._bus is None:
                await anyio.wait_all_tasks_blocked()
        until.set()
        await anyio.wait_all_tasks_blocked()  # stopped, its fetch still waiting
        sent = await bus.publish(finding(), agent="test/pub", session=session_id)
    assert handled == []
    done = anyio.Event()
    agent = Agent(agent.id)  # the next instance handles it

    @agent.on_event(
        "finding", "reported", types=(FindingMessage,), session=session_id, name="on_finding"
    )
    async def again(message: FindingMessage) -> None:
        handled.append(message.id)
        done.set()

    async with agent.serve(bus):
        with anyio.fail_after(WAIT):
            await done.wait()
    assert handled == [sent.id]
