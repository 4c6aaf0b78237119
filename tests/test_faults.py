"""kill -9 of a node of the deploy cluster during a run of tasks and votes.

The 3-node cluster runs from deploy/nats/ (auth included) with replicas 3; every client
connects with all three URLs. While 2,000 tasks are worked by several claimers and 50
proposals are voted on by three agents, the node leading the task records is killed:
every task must complete exactly once and every proposal be decided exactly once.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from swarmbus import (
    Bus,
    Consensus,
    ConsensusService,
    NatsCluster,
    Proposal,
    Task,
    TaskCompleted,
    TaskQueue,
    TaskSpec,
    Vote,
)
from swarmbus._runtime.provision import provisioning
from tests._cluster import deploy_cluster, deploy_passwords

pytestmark = [pytest.mark.fault, pytest.mark.slow]

SERVICE = "swarmbus/consensus"
VALIDATOR = "ops/deploy-validator"
LEAD = "security/incident-response-lead"
CREDENTIALS = {
    SERVICE: ("NATS_PASSWORD_CONSENSUS", "_INBOX_swarmbus_consensus"),
    VALIDATOR: ("NATS_PASSWORD_DEPLOY_VALIDATOR", "_INBOX_ops_deploy-validator"),
    LEAD: ("NATS_PASSWORD_INCIDENT_LEAD", "_INBOX_security_incident-response-lead"),
}
TASKS = 2000
PROPOSALS = 50
VOTERS = (VALIDATOR, LEAD, SERVICE)
WORKERS = 4
EVENTS = "SWARMBUS_EVENTS"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsCluster]:
    passwords = deploy_passwords(monkeypatch)
    with deploy_cluster(tmp_path / "cluster") as running:
        running.passwords = passwords  # type: ignore[attr-defined]
        yield running


def connect(cluster: NatsCluster, user: str) -> Any:
    env, inbox = CREDENTIALS[user]
    return Bus.open(
        url=",".join(cluster.urls),
        user=user,
        password=cluster.passwords[env],  # type: ignore[attr-defined]
        inbox_prefix=inbox,
        replicas=3,
        request_timeout=5.0,
    )


async def leader_of(bus: Bus, stream: str) -> str:
    info = await bus.js.stream_info(stream)
    assert info.cluster is not None
    assert info.cluster.leader is not None
    return info.cluster.leader


async def count_events(bus: Bus, subject: str, key: str) -> collections.Counter[str]:
    """How often each ``body[key]`` occurs in the stored events on ``subject``."""
    counts: collections.Counter[str] = collections.Counter()
    sub = await bus.js.subscribe(
        subject,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            counts[getattr(bus.accept(msg.subject, msg.data).body, key)] += 1
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return counts


@pytest.fixture
async def buses(cluster: NatsCluster) -> AsyncIterator[dict[str, Bus]]:
    async with AsyncExitStack() as stack:
        # the service account first: it provisions the R3 streams and buckets
        opened = {SERVICE: await stack.enter_async_context(connect(cluster, SERVICE))}
        for user in (VALIDATOR, LEAD):
            opened[user] = await stack.enter_async_context(connect(cluster, user))
        yield opened


@pytest.fixture
async def second_service(cluster: NatsCluster, buses: dict[str, Bus]) -> AsyncIterator[Bus]:
    """A connection for a second consensus service replica."""
    async with connect(cluster, SERVICE) as bus:
        yield bus


async def test_kill_a_node_during_tasks_and_votes(
    cluster: NatsCluster, buses: dict[str, Bus], second_service: Bus, session_id: str
) -> None:
    service = buses[SERVICE]
    executed: collections.Counter[str] = collections.Counter()
    completed_ids: set[str] = set()
    all_completed = anyio.Event()
    halfway = anyio.Event()
    votes_underway = anyio.Event()
    killed = anyio.Event()
    voted: list[str] = []
    at_kill: dict[str, int] = {}
    stop = anyio.Event()

    async def handler(task: Task) -> dict[str, Any]:
        executed[task.id] += 1
        if len(executed) >= TASKS // 4:
            halfway.set()
        if len(executed) >= TASKS * 3 // 4:  # the node dies with tasks still running
            await killed.wait()
        return {"ok": task.id}

    async with (
        provisioning(service),  # the task-queue consumers agents may not create
        TaskQueue(service, session_id) as provisioned,
        # two replicas: each proposal must still be decided once
        ConsensusService(service, session=session_id, board_bucket=None) as replica1,
        ConsensusService(second_service, session=session_id, board_bucket=None) as replica2,
    ):
        # agents may not write the consensus bucket: the service records their votes
        consensus = {
            user: await Consensus.open(bus, board_bucket=None, via_service=user != SERVICE)
            for user, bus in buses.items()
        }
        decisions = {}

        async def vote_stream() -> None:
            for i in range(PROPOSALS):
                pid = f"p{i}-{session_id}"
                await consensus[LEAD].propose(
                    Proposal(
                        proposal_id=pid, action="rollback", voters=list(VOTERS), quorum="unanimous"
                    ),
                    agent=LEAD,
                    session=session_id,
                )
                async with anyio.create_task_group() as tg:
                    for voter in VOTERS:
                        vote = Vote(proposal_id=pid, vote="yes")
                        tg.start_soon(lambda v=vote, a=voter: consensus[a].vote(v, agent=a))
                voted.append(pid)
                if len(voted) == 5:
                    votes_underway.set()
                    await killed.wait()  # the rest are cast during the failover
            for i in range(PROPOSALS):
                pid = f"p{i}-{session_id}"
                decisions[pid] = await consensus[VALIDATOR].wait_for_decision(pid, timeout=30)

        async def worker(agent: str) -> None:
            async with TaskQueue(buses[agent], session_id, ack_wait=2.0) as queue:
                await queue.work(handler, agent=agent, types=["work"], stop=stop)

        async def kill_a_node() -> None:
            await halfway.wait()
            await votes_underway.wait()
            victim = await leader_of(service, "KV_swarmbus-tasks")
            node = next(n for n in cluster.nodes if n.name == victim)
            node.kill()  # SIGKILL by pid
            at_kill.update(completed=len(completed_ids), voted=len(voted))
            killed.set()

        async def on_completed(msg: Any) -> None:
            body = service.accept(msg.subject, msg.data).body
            assert isinstance(body, TaskCompleted)
            completed_ids.add(body.task_id)
            if len(completed_ids) == TASKS:
                all_completed.set()

        # an ordered consumer resumes after the failover where it stopped
        watch = await service.js.subscribe(
            f"agent.task.completed.{session_id}.*", cb=on_completed, ordered_consumer=True
        )
        with anyio.fail_after(80):
            async with anyio.create_task_group() as tg:
                for i in range(WORKERS):
                    tg.start_soon(worker, VALIDATOR if i % 2 else LEAD)
                tg.start_soon(kill_a_node)
                specs = [TaskSpec(type="work") for _ in range(TASKS)]
                for start in range(0, TASKS, 200):
                    await provisioned.create_many(specs[start : start + 200], agent=SERVICE)
                await vote_stream()
                await all_completed.wait()
                stop.set()

        await watch.unsubscribe()
        assert sum(1 for n in cluster.nodes if n.pid is None) == 1
        # the node died mid-run: tasks and votes were still going on
        assert at_kill["completed"] < TASKS
        assert at_kill["voted"] < PROPOSALS
        tasks = await provisioned.tasks()
        assert len(tasks) == TASKS
        assert {t.status for t in tasks} == {"completed"}
        assert set(executed) == {t.id for t in tasks}
        completed = await count_events(service, f"agent.task.completed.{session_id}.*", "task_id")
        assert set(completed) == {t.id for t in tasks}
        assert set(completed.values()) == {1}
        assert len(decisions) == PROPOSALS
        for pid, decision in decisions.items():
            record = await consensus[SERVICE].get(pid)
            assert record.decision == decision
            assert len(record.votes) == 3
            assert decision.outcome == "approved"
        decided = await count_events(service, f"agent.action.decided.{session_id}.*", "proposal_id")
        assert set(decided) == set(decisions)
        assert set(decided.values()) == {1}
        assert replica1.decided + replica2.decided == PROPOSALS


# --- the retries themselves, on the session's server ------------------------------------


async def test_a_retried_compare_and_set_is_not_applied_twice(
    bus: Bus, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt of a KV update is stored but its ack is lost (as in a
    failover): the retry finds its own write and reports the CAS as won, once."""
    kv = await bus.key_value(f"R{unique}")
    first = await kv.create("k", b"v1")
    publish = JetStreamContext.publish
    lost: list[int] = []

    async def ack_lost(self: JetStreamContext, *args: Any, **kwargs: Any) -> Any:
        ack = await publish(self, *args, **kwargs)
        if not lost:
            lost.append(ack.seq)
            raise nats.errors.TimeoutError
        return ack

    monkeypatch.setattr(JetStreamContext, "publish", ack_lost)
    revision = await kv.update("k", b"v2", last=first)
    assert revision == lost[0]
    assert (await kv.get("k")).revision == revision
    status = await kv.status()
    assert status.stream_info.state.messages == 1  # history 1: just the update
    assert status.stream_info.state.last_seq == revision  # written once


async def test_transient_errors_are_retried_for_retry_for_seconds(nats_url: str) -> None:
    async with Bus.open(url=nats_url, retry_for=1.0) as bus:
        started = anyio.current_time()
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            # nothing stores this subject: "no responders", as during an election
            await bus.js.publish(f"nowhere.{int(started)}", b"x")
        assert 0.5 <= anyio.current_time() - started < 5
