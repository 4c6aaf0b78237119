"""Many agents, many sessions, long uptime: nothing grows without bound (issue 17).

Each test that counts consumers runs on a server of its own (``fresh_server``), so the
stream's consumer count is exactly what the test created.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import anyio.abc
import nats
import pytest

import swarmbus
from swarmbus import (
    Agent,
    Bus,
    Consensus,
    ConsensusService,
    Finding,
    FindingMessage,
    NatsServer,
    Proposal,
    Vote,
)
from swarmbus._agent import serving
from swarmbus._subjects import safe_token

WAIT = 30


def finding(content: str = "x") -> Finding:
    return Finding(category="observation", content=content, confidence=0.5)


async def consumer_count(bus: Bus, stream: str = "SWARMBUS_EVENTS") -> int:
    return (await bus.js.stream_info(stream)).state.consumer_count


async def test_5000_agents_with_2_handlers_each_start_receive_and_use_one_consumer_each(
    fresh_server: NatsServer, unique: str
) -> None:
    n = 5000
    session = f"S-{unique}"
    got: set[str] = set()
    tasks: set[str] = set()
    all_got = anyio.Event()
    agents = []
    for i in range(n):
        agent = Agent(f"scale/a{i}-{unique}", max_concurrency=2)

        @agent.on_finding(session=session)
        async def on_finding(message: FindingMessage, agent: Agent = agent) -> None:
            got.add(agent.id)
            if len(got) == n:
                all_got.set()

        @agent.on_task(session=session)
        async def on_task(message: Any, agent: Agent = agent) -> None:
            tasks.add(agent.id)

        agents.append(agent)
    async with Bus.open(url=fresh_server.url) as bus:
        async with serving(bus, agents):
            # Consumers follow agent ids, not handlers: 5,000, not 10,000 (and past the
            # server's default of 1,000 a stream).
            assert await consumer_count(bus) == n
            await bus.publish(finding(), agent="scale/publisher", session=session)
            with anyio.fail_after(120):
                await all_got.wait()
        assert not tasks
        info = await bus.js.consumer_info("SWARMBUS_EVENTS", safe_token(agents[0].id))
        assert sorted(info.config.filter_subjects or []) == [
            f"agent.finding.reported.{session}.*",
            f"agent.task.*.{session}.*",
        ]


async def test_consumers_expire_after_the_threshold_and_leave_deletes_at_once(
    fresh_server: NatsServer, unique: str
) -> None:
    threshold = 2.0
    agents = []
    for i in range(20):
        agent = Agent(f"scale/gone{i}-{unique}")
        agent.on_finding()(_ignore)
        agents.append(agent)
    leaver = Agent(f"scale/leaver-{unique}")
    leaver.on_finding()(_ignore)
    async with Bus.open(url=fresh_server.url, consumer_inactive_threshold=threshold) as bus:
        # The server announces each deletion (an expiry too) with an advisory.
        deleted = await bus.nc.subscribe("$JS.EVENT.ADVISORY.CONSUMER.DELETED.SWARMBUS_EVENTS.*")
        async with leaver.serve(bus, leave=True), serving(bus, agents):
            assert await consumer_count(bus) == 21
        # Left for good: deleted at exit.
        with pytest.raises(nats.js.errors.NotFoundError):
            await bus.js.consumer_info("SWARMBUS_EVENTS", safe_token(leaver.id))
        started = time.monotonic()
        # The rest expire within the documented time (the threshold) plus the server's sweep.
        gone: set[str] = set()
        with anyio.fail_after(threshold + 10):
            while len(gone) < 21:
                gone.add((await deleted.next_msg(timeout=None)).subject.rsplit(".", 1)[1])
        assert time.monotonic() - started >= threshold * 0.5  # expired, not deleted at exit
        assert gone == {safe_token(a.id) for a in [*agents, leaver]}


async def _ignore(message: Any) -> None:
    pass


async def test_agent_restarted_within_the_threshold_resumes_where_it_stopped(
    bus: Bus, session_id: str, unique: str
) -> None:
    agent = Agent(f"scale/restart-{unique}")
    got: list[str] = []
    arrived = anyio.Event()

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        got.append(message.finding.content)
        arrived.set()

    async with agent.serve(bus):
        pass
    await bus.publish(finding("while away"), agent="scale/pub", session=session_id)
    async with agent.serve(bus):
        with anyio.fail_after(WAIT):
            await arrived.wait()
    assert got == ["while away"]


async def test_leaving_serve_with_nothing_in_flight_is_prompt(bus: Bus, unique: str) -> None:
    """Leaving interrupts the open long pull: no wait for it to expire.

    A bound, not a speed target: the best of 5 exits (scheduler noise on a loaded machine
    only adds time) must be under 50 ms; waiting for a pull would take seconds.
    """
    agent = Agent(f"scale/quick-{unique}")
    agent.on_finding()(_ignore)
    agent.on_event("task", name="tasks")(_ignore)
    exits = []
    for _ in range(5):
        async with agent.serve(bus):
            await anyio.wait_all_tasks_blocked()  # the pull request is sent...
            await bus.nc.flush()  # ...and the server has it
            info = await bus.js.consumer_info("SWARMBUS_EVENTS", safe_token(agent.id))
            assert info.num_waiting == 1  # the long pull is open on the server
            started = time.monotonic()
        exits.append(time.monotonic() - started)
    assert min(exits) < 0.05, exits


async def test_handlers_are_isolated_a_retry_does_not_rerun_the_succeeded_one(
    bus: Bus, session_id: str, unique: str
) -> None:
    agent = Agent(f"scale/iso-{unique}")
    calls: list[str] = []
    done = anyio.Event()

    @agent.on_finding(session=session_id)
    async def steady(message: FindingMessage) -> None:
        calls.append("steady")

    @agent.on_finding(session=session_id)
    async def flaky(message: FindingMessage) -> None:
        calls.append("flaky")
        if calls.count("flaky") < 3:
            raise swarmbus.ConnectionError("KV unreachable")
        done.set()

    async with agent.serve(bus):
        await bus.publish(finding(), agent="scale/pub", session=session_id)
        with anyio.fail_after(WAIT):
            await done.wait()
    await bus.nc.flush()  # the ack sent at the drain has reached the server
    info = await bus.js.consumer_info("SWARMBUS_EVENTS", safe_token(agent.id))
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert calls.count("steady") == 1
    assert calls.count("flaky") == 3


async def test_handlers_added_and_removed_while_served_update_the_one_consumer(
    bus: Bus, unique: str
) -> None:
    agent = Agent(f"scale/joiner-{unique}")
    seen: list[str] = []
    arrived = anyio.Event()

    @agent.on_finding(session=f"S1-{unique}")
    async def first(message: FindingMessage) -> None:
        seen.append(message.source.session)

    durable = safe_token(agent.id)
    async with agent.serve(bus):
        created = (await bus.js.consumer_info("SWARMBUS_EVENTS", durable)).created

        @agent.on_event("finding", "reported", session=f"S2-{unique}", name="second")
        async def second(message: FindingMessage) -> None:
            seen.append(message.source.session)
            arrived.set()

        await agent.update_handlers()  # joined S2
        info = await bus.js.consumer_info("SWARMBUS_EVENTS", durable)
        assert info.created == created  # the same durable, updated in place
        assert f"agent.finding.reported.S2-{unique}.*" in (info.config.filter_subjects or [])
        await bus.publish(finding(), agent="scale/pub", session=f"S2-{unique}")
        with anyio.fail_after(WAIT):
            await arrived.wait()
        agent.remove_handler("second")
        await agent.update_handlers()  # left S2
        info = await bus.js.consumer_info("SWARMBUS_EVENTS", durable)
        assert info.config.filter_subjects == [f"agent.finding.reported.S1-{unique}.*"]
    assert seen == [f"S2-{unique}"]


async def test_a_bad_message_is_dead_lettered_once_whatever_the_receivers(
    bus: Bus, session_id: str, unique: str
) -> None:
    # One at a time: a receiver that got the good message after the bad one has
    # handed the bad one's dead letter to the connection already.
    agents = [Agent(f"scale/r{i}-{unique}", max_concurrency=1) for i in range(3)]
    after: set[str] = set()
    all_after = anyio.Event()
    for agent in agents:

        @agent.on_finding(session=session_id)
        async def on_finding(message: FindingMessage, agent: Agent = agent) -> None:
            after.add(agent.id)
            if len(after) == len(agents):
                all_after.set()

    async with serving(bus, agents):
        await bus.js.publish(f"agent.finding.reported.{session_id}.scale_x", b"not json")
        await bus.publish(finding("after"), agent="scale/pub", session=session_id)
        with anyio.fail_after(WAIT):
            await all_after.wait()
    await bus.nc.flush()
    info = await bus.js.stream_info(
        "SWARMBUS_DEAD", subjects_filter=f"swarmbus.dead.{session_id}.>"
    )
    assert sum((info.state.subjects or {}).values()) == 1


async def test_streams_have_the_configured_limits(fresh_server: NatsServer) -> None:
    async with Bus.open(
        url=fresh_server.url,
        event_max_bytes=64 * 1024**2,
        dead_letter_max_bytes=8 * 1024**2,
        dead_letter_max_age=3600.0,
    ) as bus:
        events = (await bus.js.stream_info("SWARMBUS_EVENTS")).config
        dead = (await bus.js.stream_info("SWARMBUS_DEAD")).config
    assert events.max_bytes == 64 * 1024**2
    assert events.max_consumers == bus.settings.event_max_consumers > 1000
    assert (dead.max_bytes, dead.max_age) == (8 * 1024**2, 3600.0)


async def test_2000_consensus_calls_in_a_minute_leave_no_watch_consumer(
    fresh_server: NatsServer, unique: str
) -> None:
    """500 proposals x (propose, 2 votes, wait_for_decision), through the service."""
    voters = [f"scale/v{i}" for i in range(3)]
    async with Bus.open(url=fresh_server.url) as bus, ConsensusService(bus):
        consensus = await Consensus.open(bus, via_service=True)

        async def one(i: int) -> None:
            pid = f"p{i}-{unique}"
            proposal = Proposal(proposal_id=pid, action="noop", quorum="majority", voters=voters)
            await consensus.propose(proposal, agent=voters[0], session=f"S-{unique}")
            for voter in voters[:2]:
                await consensus.vote(Vote(proposal_id=pid, vote="yes"), agent=voter)
            await consensus.wait_for_decision(pid, timeout=30)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(500):
                    tg.start_soon(one, i)
        # The service's own watch may remain while it runs; no call left one behind.
        assert await consumer_count(bus, "KV_SWARMBUS_CONSENSUS") <= 1


# --- one consumer per process (Settings.consumer_group) ---------------------------------


async def test_5000_agents_with_2_handlers_in_one_process_share_one_consumer(
    fresh_server: NatsServer, unique: str
) -> None:
    """Each agent follows a session of its own and a shared one; each gets its own events."""
    n = 5000
    shared = f"S-{unique}"
    got: dict[str, list[str]] = {}
    tasks: set[str] = set()
    all_got = anyio.Event()
    agents = []
    for i in range(n):
        agent = Agent(f"scale/g{i}-{unique}", max_concurrency=2)

        @agent.on_finding(session=f"S{i}-{unique}")
        async def on_finding(message: FindingMessage, agent: Agent = agent) -> None:
            got.setdefault(agent.id, []).append(message.source.session)
            if len(got) == n:
                all_got.set()

        @agent.on_task(session=shared)
        async def on_task(message: Any, agent: Agent = agent) -> None:
            tasks.add(agent.id)

        agents.append(agent)
    group = f"proc-{unique}"
    async with Bus.open(url=fresh_server.url, consumer_group=group) as bus, serving(bus, agents):
        assert await consumer_count(bus) == 1  # not 5,000, not 10,000
        info = await bus.js.consumer_info("SWARMBUS_EVENTS", group)
        # 5,000 session filters are past the byte budget: widened (all of them to three
        # tokens), still one consumer; handlers get only what their own filters match.
        assert sorted(info.config.filter_subjects or []) == [
            "agent.finding.reported.>",
            "agent.task.*.>",
        ]
        limiter = anyio.Semaphore(64)

        async def send(i: int) -> None:
            async with limiter:
                await bus.publish(finding(), agent="scale/publisher", session=f"S{i}-{unique}")

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(send, i)
        with anyio.fail_after(120):
            await all_got.wait()
    assert all(got[a.id] == [f"S{i}-{unique}"] for i, a in enumerate(agents))
    assert not tasks


def _group_agent(name: str, session: str, seen: list[tuple[str, str]], event: anyio.Event) -> Agent:
    agent = Agent(name)

    @agent.on_finding(session=session)
    async def on_finding(message: FindingMessage) -> None:
        seen.append((agent.id, message.finding.content))
        event.set()

    return agent


async def test_a_consumer_group_restarted_resumes_where_it_stopped(
    nats_url: str, session_id: str, unique: str
) -> None:
    seen: list[tuple[str, str]] = []
    arrived = anyio.Event()
    a = _group_agent(f"scale/ra-{unique}", session_id, seen, arrived)
    b = _group_agent(f"scale/rb-{unique}", f"other-{unique}", seen, arrived)
    async with Bus.open(url=nats_url, consumer_group=f"restart-{unique}") as bus:
        async with serving(bus, [a, b]):
            pass
        # The process is down: what is published now waits in the group's consumer.
        await bus.publish(finding("while away"), agent="scale/pub", session=session_id)
        async with serving(bus, [a, b]):
            with anyio.fail_after(WAIT):
                await arrived.wait()
    assert seen == [(a.id, "while away")]


async def test_two_processes_of_one_group_share_the_work(nats_url: str, unique: str) -> None:
    session = f"S-{unique}"
    handled: dict[str, list[str]] = {"p1": [], "p2": []}
    one = anyio.Event()
    group = f"shared-{unique}"

    def agent_of(process: str) -> Agent:
        agent = Agent(f"scale/same-{unique}")  # the same agent id in both processes

        @agent.on_finding(session=session)
        async def on_finding(message: FindingMessage) -> None:
            handled[process].append(message.finding.content)
            one.set()

        return agent

    async with (
        Bus.open(url=nats_url, consumer_group=group) as bus1,
        Bus.open(url=nats_url, consumer_group=group) as bus2,
        serving(bus1, [agent_of("p1")]),
        serving(bus2, [agent_of("p2")]),
    ):
        assert await consumer_count(bus1) >= 1
        for i in range(20):  # one at a time: the server serves the waiting pulls in turn
            one = anyio.Event()
            await bus1.publish(finding(f"e{i}"), agent="scale/pub", session=session)
            with anyio.fail_after(WAIT):
                await one.wait()
    everything = handled["p1"] + handled["p2"]
    assert sorted(everything) == sorted(f"e{i}" for i in range(20))  # each once
    assert handled["p1"]
    assert handled["p2"]


class _Served:
    """An agent served in a task of its own, until told to leave."""

    def __init__(self, agent: Agent, bus: Bus, *, leave: bool = False) -> None:
        self.agent, self.bus, self.leave = agent, bus, leave
        self.stop, self.gone = anyio.Event(), anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with self.agent.serve(self.bus, leave=self.leave):
            task_status.started()
            await self.stop.wait()
        self.gone.set()

    async def exit(self) -> None:
        self.stop.set()
        with anyio.fail_after(WAIT):
            await self.gone.wait()


async def test_agents_join_and_leave_a_group_at_run_time_on_the_same_durable(
    nats_url: str, unique: str
) -> None:
    seen: list[tuple[str, str]] = []
    arrived = anyio.Event()
    group = f"churn-{unique}"
    agents = [
        _group_agent(f"scale/m{i}-{unique}", f"S{i}-{unique}", seen, arrived) for i in range(3)
    ]
    wanted = [f"agent.finding.reported.S{i}-{unique}.*" for i in range(4)]
    async with (
        Bus.open(url=nats_url, consumer_group=group) as bus,
        anyio.create_task_group() as tg,
    ):

        async def filters() -> list[str]:
            info = await bus.js.consumer_info("SWARMBUS_EVENTS", group)
            return sorted(info.config.filter_subjects or [])

        served = [
            _Served(agents[0], bus),
            _Served(agents[1], bus),
            _Served(agents[2], bus, leave=True),
        ]
        await tg.start(served[0].run)  # the first member runs the pull loop
        created = (await bus.js.consumer_info("SWARMBUS_EVENTS", group)).created
        for s in served[1:]:
            await tg.start(s.run)
        assert await filters() == wanted[:3]
        await served[2].exit()  # left for good: its interest goes
        assert await filters() == wanted[:2]
        # A session joined at run time: the same durable, updated in place.
        agents[1].on_event("finding", "reported", session=f"S3-{unique}", name="s3")(_ignore)
        await agents[1].update_handlers()
        assert await filters() == [wanted[0], wanted[1], wanted[3]]
        # The loop's host leaves: the loop moves to the member left, which still receives.
        await served[0].exit()
        await bus.publish(finding("after"), agent="scale/pub", session=f"S1-{unique}")
        with anyio.fail_after(WAIT):
            await arrived.wait()
        await served[1].exit()
        assert (await bus.js.consumer_info("SWARMBUS_EVENTS", group)).created == created
        # The last member leaves for good: the group's consumer goes with it.
        async with agents[1].serve(bus, leave=True):
            pass
        with pytest.raises(nats.js.errors.NotFoundError):
            await bus.js.consumer_info("SWARMBUS_EVENTS", group)
    assert seen == [(agents[1].id, "after")]


def test_filters_are_deduplicated_and_widened_past_the_byte_budget() -> None:
    from swarmbus._consumer import MAX_FILTER_BYTES, consumer_filters

    assert consumer_filters(["agent.a.b.S1.*", "agent.a.*.S1.*", "agent.a.b.S1.*"]) == [
        "agent.a.*.S1.*"
    ]
    many = [f"agent.finding.reported.S{i}-{'x' * 30}.*" for i in range(5000)]
    assert sum(len(f) for f in many) > MAX_FILTER_BYTES
    assert consumer_filters([*many, "agent.task.created.S1.*"]) == [
        "agent.finding.reported.>",
        "agent.task.created.>",
    ]
    fewer = many[:100]
    assert consumer_filters(fewer) == sorted(fewer)


def test_a_route_table_matches_by_subject_whatever_the_number_of_routes() -> None:
    from swarmbus._consumer import Route, RouteTable

    table = RouteTable()
    routes = [Route(f"r{i}", (f"agent.finding.reported.S{i}.*",), _ignore) for i in range(10_000)]
    every = Route("all", ("agent.>",), _ignore)
    table.add([*routes, every])
    assert table.match("agent.finding.reported.S42.pub") == (routes[42], every)
    assert table.match("agent.task.created.S42.pub") == (every,)
    table.remove([routes[42]])
    assert table.match("agent.finding.reported.S42.pub") == (every,)
    assert not table.serves(routes[42])
    assert table.serves(routes[41])
    assert table.filter_subjects() == ["agent.>"]


def test_the_consumer_group_is_a_setting_and_a_consumer_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("SWARMBUS_CONSUMER_GROUP", "billing-workers")
    assert swarmbus.Settings.from_env().consumer_group == "billing-workers"
    assert swarmbus.Settings().consumer_group is None  # one consumer per agent id
    for bad in ("a.b", "a*", "a >", ""):
        with pytest.raises(ValidationError):
            swarmbus.Settings(consumer_group=bad)
