"""JetStream grants of the deploy configs against a hostile agent (issue 19, items 7-8).

Each attack runs under both deploy configs: the password config
(deploy/nats/single.conf with auth.conf) and the JWT roles (single-jwt.conf with users
from `swarmbus creds`). The attacker is ops/deploy-validator, the victim
security/incident-response-lead; the service account provisioned what they use
(``provisioning``, as `swarmbus consensus` does). Every test asserts the server's
refusal and that the victim's data and consumers are as they were.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig

from swarmbus import (
    Agent,
    Blackboard,
    Bus,
    ConsensusService,
    Finding,
    FindingMessage,
    Lock,
    NatsServer,
    NotFoundError,
    TaskQueue,
)
from swarmbus import _locks as locks
from swarmbus._consensus import CONSENSUS_BUCKET
from swarmbus._creds import CredsStore, inbox_prefix
from swarmbus._jetstream.workqueue import DEFAULT_ACK_WAIT, queue_consumer
from swarmbus._locks import LOCKS_BUCKET, MAX_RECHECK, lock_holder
from swarmbus._query_ledger import QUERIES_BUCKET
from swarmbus._runtime.provision import provisioning
from swarmbus._runtime.timeouts import TaskTimeouts
from swarmbus._subjects import lock_key, lock_wake_subject, safe_token
from swarmbus._tasks import TASKS_BUCKET, TASKS_STREAM
from tests.test_auth import DEPLOY, INBOX, PASSWORDS, propose, raw_record, start_with_passwords
from tests.test_creds import creds, jwt_server

ATTACKER = "ops/deploy-validator"
VICTIM = "security/incident-response-lead"
SERVICE = "swarmbus/consensus"
EVENTS = "SWARMBUS_EVENTS"
BOARD = "SWARMBUS_BOARD"
INTAKE = "consensus-SWARMBUS_CONSENSUS__-f1d71ec8"  # `swarmbus consensus`'s durable

pytestmark = pytest.mark.xdist_group("grants")


@dataclass
class Deploy:
    """A running server with a deploy config, and how each of its users connects."""

    name: str
    server: NatsServer
    options: Callable[[str], dict[str, Any]]
    """``Bus.open`` options of a user; ``nats.connect`` takes the same but for creds."""

    def bus(self, user: str) -> Any:
        return Bus.open(url=self.server.url, **self.options(user))

    async def raw(self, user: str, errors: list[str]) -> NatsClient:
        """A plain nats-py connection of ``user`` (what a hostile agent would use)."""

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        options = self.options(user)
        if "creds_file" in options:
            options["user_credentials"] = options.pop("creds_file")
        return await nats.connect(self.server.url, error_cb=on_error, **options)


@pytest.fixture(scope="module")
def password_deploy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deploy]:
    server = NatsServer(
        tmp_path_factory.mktemp("grants-password"),
        config_file=DEPLOY / "single.conf",
        extra_args=["--http_port", "-1"],
    )
    start_with_passwords(server)

    def options(user: str) -> dict[str, Any]:
        return {"user": user, "password": PASSWORDS[user], "inbox_prefix": INBOX[user]}

    try:
        yield Deploy("password", server, options)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def jwt_deploy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deploy]:
    server, store = jwt_server(tmp_path_factory.mktemp("grants-jwt"), "full")
    for agent in (ATTACKER, VICTIM):
        creds(store.root, "add", agent)

    def options(user: str) -> dict[str, Any]:
        users = CredsStore(store.root).users()
        return {"creds_file": str(users[user].creds_file), "inbox_prefix": inbox_prefix(user)}

    with server:
        yield Deploy("jwt", server, options)


@pytest.fixture(params=["password", "jwt"])
def deploy(request: pytest.FixtureRequest) -> Deploy:
    deploy: Deploy = request.getfixturevalue(f"{request.param}_deploy")
    return deploy


@pytest.fixture
async def service(deploy: Deploy) -> AsyncIterator[Bus]:
    """The service account; tests run ``provisioning`` as `swarmbus consensus` does."""
    async with deploy.bus(SERVICE) as bus:
        yield bus


async def refused(nc: NatsClient, errors: list[str], subject: str, data: bytes = b"{}") -> None:
    """Publish ``data`` to ``subject`` and wait for the server's permissions refusal."""
    await nc.publish(subject, data)
    refusal = f'permissions violation for publish to "{subject.lower()}"'
    with anyio.fail_after(5):
        while not any(refusal in error.lower() for error in errors):
            await nc.flush()


def finding(text: str = "error rate 5x baseline") -> Finding:
    return Finding(category="observation", content=text, confidence=0.9)


async def stream_messages(bus: Bus, stream: str) -> int:
    return int((await bus.js.stream_info(stream)).state.messages)


# --- rollups (attempt 8) ----------------------------------------------------------------


async def test_agent_cannot_roll_up_the_swarmbus_buckets_and_streams(
    deploy: Deploy, service: Bus, session_id: str, unique: str
) -> None:
    """``Nats-Rollup: all`` through a key the attacker may write would empty the whole
    bucket; every swarmbus bucket refuses it (the lock bucket: see below)."""
    pid = f"p-{unique}"
    await propose(service, session_id, pid)
    async with (
        provisioning(service),
        deploy.bus(VICTIM) as vbus,
        TaskQueue(vbus, session_id) as queue,
    ):
        created = await queue.create("investigate", agent=VICTIM)
        claim = await queue.claim(agent=VICTIM, types=["investigate"], timeout=10)
        assert claim is not None
        board = await Blackboard.open(vbus, session_id)
        await board.append_finding(finding(), agent=VICTIM)
        before = (
            await raw_record(service, pid),
            await queue.get(created.id),
            await board.findings(),
        )
        targets = {
            f"KV_{CONSENSUS_BUCKET}": f"$KV.{CONSENSUS_BUCKET}.m.{session_id}.{ATTACKER}",
            f"KV_{TASKS_BUCKET}": f"$KV.{TASKS_BUCKET}.{session_id}.x-{unique}",
            f"KV_{BOARD}": f"$KV.{BOARD}.{session_id}.x-{unique}",
            f"KV_{QUERIES_BUCKET}": f"$KV.{QUERIES_BUCKET}.x-{unique}",
            f"KV_{LOCKS_BUCKET}": f"$KV.{LOCKS_BUCKET}.x-{unique}",
            EVENTS: f"agent.finding.reported.{session_id}.{ATTACKER}",
            TASKS_STREAM: f"swarmbus.task.{session_id}.investigate.5.x-{unique}",
        }
        counts = {stream: await stream_messages(service, stream) for stream in targets}
        async with deploy.bus(ATTACKER) as attacker:
            for stream, subject in targets.items():
                for rollup in ("all", "sub"):
                    with pytest.raises(nats.js.errors.APIError, match="rollup"):
                        await attacker.js.publish(subject, b"", headers={"Nats-Rollup": rollup})
                assert await stream_messages(service, stream) >= counts[stream], stream
        after = (
            await raw_record(service, pid),
            await queue.get(created.id),
            await board.findings(),
        )
        assert after == before
        assert (await claim.complete({"ok": True})).status == "completed"


async def test_agent_cannot_roll_up_the_lock_bucket(
    deploy: Deploy, service: Bus, unique: str
) -> None:
    async with (
        provisioning(service),
        deploy.bus(VICTIM) as vbus,
        Lock(vbus, f"deploy-{unique}", VICTIM, ttl=30),
    ):
        kv = await service.key_value(LOCKS_BUCKET)
        key = lock_key(f"deploy-{unique}")
        before = await kv.get(key)
        async with deploy.bus(ATTACKER) as attacker:
            subject = f"$KV.{LOCKS_BUCKET}.x-{unique}"
            with pytest.raises(nats.js.errors.APIError):
                await attacker.js.publish(subject, b"", headers={"Nats-Rollup": "all"})
        # The victim's key only: other tests' keys on this server expire meanwhile.
        after = await kv.get(key)
        assert (after.revision, after.value) == (before.revision, before.value)


async def test_a_refused_lock_bucket_rollup_leaves_the_victims_lease(
    deploy: Deploy, service: Bus, unique: str
) -> None:
    """The lock bucket refuses rollups (no limit markers: waiters time expiries): the
    attacker cannot take the victim's lock, which the victim still refreshes; the
    fencing token stays the second line (a takeover after expiry has a higher one)."""
    resource = f"deploy-{unique}"
    async with (
        provisioning(service),
        deploy.bus(VICTIM) as vbus,
        deploy.bus(ATTACKER) as abus,
    ):
        info = await service.js.stream_info(f"KV_{LOCKS_BUCKET}")
        assert not info.config.allow_rollup_hdrs
        assert not info.config.subject_delete_marker_ttl
        victim = Lock(vbus, resource, VICTIM, ttl=30)
        held = await victim.acquire(timeout=0)
        assert held is not None
        with pytest.raises(nats.js.errors.APIError, match="rollup"):
            await abus.js.publish(
                f"$KV.{LOCKS_BUCKET}.x-{unique}", b"", headers={"Nats-Rollup": "all"}
            )
        assert await Lock(abus, resource, ATTACKER, ttl=30).acquire(timeout=0) is None
        assert (await victim.refresh()).token == held.token
        await victim.release()
        after = await Lock(abus, resource, ATTACKER, ttl=30).acquire(timeout=0)
        assert after is not None
        assert after.token > held.token


async def test_locks_prune_and_retention_work_without_rollups(
    deploy: Deploy, service: Bus, session_id: str, unique: str
) -> None:
    """What swarmbus purged with rollups before: a lock's release marker, a task
    prune, and the blackboard's retention (a purge by subject, by the service)."""
    async with provisioning(service), deploy.bus(VICTIM) as vbus, deploy.bus(ATTACKER) as abus:
        resource = f"deploy-{unique}"
        async with Lock(vbus, resource, VICTIM, ttl=30) as first:
            assert await Lock(abus, resource, ATTACKER, ttl=30).acquire(timeout=0) is None
        second = await Lock(abus, resource, ATTACKER, ttl=30).acquire(timeout=0)
        assert second is not None
        assert second.token > first.token
        async with TaskQueue(vbus, session_id) as queue:
            created = await queue.create("investigate", agent=VICTIM)
            claim = await queue.claim(agent=VICTIM, types=["investigate"], timeout=10)
            assert claim is not None
            await claim.complete({"ok": True})
            assert await queue.prune(older_than=0) == [created.id]
            with pytest.raises(NotFoundError):
                await queue.get(created.id)
        board = await Blackboard.open(vbus, session_id)
        await board.start(VICTIM, {"task": "investigate"})
        await board.complete({"decision": "rollback"}, agent=VICTIM)
    later = datetime.now(UTC) + timedelta(days=8)
    with anyio.fail_after(10):
        purged = await Blackboard.purge_completed(service, timedelta(days=7), at=later)
    assert session_id in purged
    assert await (await Blackboard.open(service, session_id)).findings() == []


async def test_a_bucket_made_with_rollups_is_updated_by_the_service(
    password_deploy: Deploy, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bucket from an older swarmbus (nats-py's default: rollups allowed) refuses
    them once the service account opened it; an agent cannot update it, and says so."""
    deploy = password_deploy
    async with deploy.bus(SERVICE) as service:
        old = await service.js.create_key_value(KeyValueConfig(bucket=f"OLD_{unique}"))
        await old.put("victim", b"data")
        assert (await service.js.stream_info(f"KV_OLD_{unique}")).config.allow_rollup_hdrs
        async with deploy.bus(ATTACKER) as agent:
            with caplog.at_level(logging.WARNING, logger="swarmbus.streams"):
                kv = await agent.key_value(f"OLD_{unique}")
            assert (await kv.get("victim")).value == b"data"
        assert "allows rollup headers" in caplog.text
        await service.key_value(f"OLD_{unique}")
        info = await service.js.stream_info(f"KV_OLD_{unique}")
        assert not info.config.allow_rollup_hdrs
        with pytest.raises(nats.js.errors.APIError, match="rollup"):
            await service.js.publish(f"$KV.OLD_{unique}.x", b"", headers={"Nats-Rollup": "all"})
        assert (await old.get("victim")).value == b"data"


# --- task-queue consumers (attempt 7) ---------------------------------------------------


async def test_agent_cannot_create_reconfigure_or_delete_a_task_queue_consumer(
    deploy: Deploy, service: Bus, session_id: str
) -> None:
    async with (
        provisioning(service),
        deploy.bus(VICTIM) as vbus,
        TaskQueue(vbus, session_id) as queue,
    ):
        await offered_once(queue)  # the service has made the queue's consumer
        created = await queue.create("investigate", agent=VICTIM)
        config = queue_consumer(session_id, "investigate", 5, DEFAULT_ACK_WAIT)
        durable = str(config.durable_name)
        info = await service.js.consumer_info(TASKS_STREAM, durable)
        hijack = {k: v for k, v in info.config.as_dict().items()}
        hijack |= {"ack_wait": 3600 * 10**9, "filter_subject": f"swarmbus.task.{session_id}.x.5.*"}
        body = json.dumps({"stream_name": TASKS_STREAM, "config": hijack}).encode()
        errors: list[str] = []
        nc = await deploy.raw(ATTACKER, errors)
        try:
            for subject in (
                f"$JS.API.CONSUMER.DURABLE.CREATE.{TASKS_STREAM}.{durable}",
                f"$JS.API.CONSUMER.CREATE.{TASKS_STREAM}",
                f"$JS.API.CONSUMER.CREATE.{TASKS_STREAM}.{durable}",
                f"$JS.API.CONSUMER.CREATE.{TASKS_STREAM}.{durable}.{config.filter_subject}",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{TASKS_STREAM}.new-queue",
                f"$JS.API.CONSUMER.DELETE.{TASKS_STREAM}.{durable}",
            ):
                await refused(nc, errors, subject, body)
        finally:
            await nc.close()
        after = await service.js.consumer_info(TASKS_STREAM, durable)
        assert after.config == info.config
        assert after.config.ack_wait == DEFAULT_ACK_WAIT
        # the victim's task is still offered and claimed
        claim = await queue.claim(agent=VICTIM, types=["investigate"], timeout=10)
        assert claim is not None
        assert claim.task.id == created.id


@pytest.mark.parametrize("settle", ["term", "ack"])
async def test_agent_cannot_erase_another_agents_task_with_term(
    deploy: Deploy, service: Bus, session_id: str, settle: str
) -> None:
    """A claimer may TERM or ACK any dispatch it fetched (its ack grant cannot tell
    them apart), which removes the message; the task's record stays, and the service's
    sweep offers it again: the victim still claims and completes it."""
    sweep = TaskTimeouts(service, agent="swarmbus/runtime", interval=0.2, grace=0.5)
    async with (
        provisioning(service),
        deploy.bus(VICTIM) as vbus,
        TaskQueue(vbus, session_id) as queue,
        anyio.create_task_group() as tg,
    ):
        await offered_once(queue)  # the service has made the queue's consumer
        created = await queue.create("investigate", agent=VICTIM)
        config = queue_consumer(session_id, "investigate", 5, DEFAULT_ACK_WAIT)
        async with deploy.bus(ATTACKER) as attacker:
            sub = await attacker.js.pull_subscribe_bind(str(config.durable_name), TASKS_STREAM)
            (msg,) = await sub.fetch(1, timeout=5)
            await (msg.term() if settle == "term" else msg.ack())
            await attacker.nc.flush()
        with anyio.fail_after(5):  # the dispatch message is gone
            while await queue._dispatched(created.id) is not None:
                await service.nc.flush()
        assert await queue.claim(agent=VICTIM, types=["investigate"]) is None
        assert (await queue.get(created.id)).status == "pending"
        sweep.note(session_id)
        tg.start_soon(sweep.run)
        claim = await queue.claim(agent=VICTIM, types=["investigate"], timeout=10)
        assert claim is not None
        assert claim.task.id == created.id
        done = await claim.complete({"ok": True})
        assert done.status == "completed"
        tg.cancel_scope.cancel()
    await sweep.close()


async def test_the_service_makes_consumers_for_pending_and_new_queues_only(
    bus: Bus, session_id: str
) -> None:
    """Queues with dispatches stored before the service started get their consumer at
    once; a dispatch that names no valid queue gets none and stops nothing."""
    async with TaskQueue(bus, session_id) as queue:
        await queue.create("early", agent="ops/a", priority=3)
        early = str(queue_consumer(session_id, "early", 3, DEFAULT_ACK_WAIT).durable_name)
        assert not await consumer_exists(bus, early)  # nobody claimed: nobody made it
        async with provisioning(bus):
            assert await consumer_exists(bus, early)
            for junk in ("99", "0", "x"):  # priorities 1-10 only
                await bus.nc.publish(f"swarmbus.task.{session_id}.junk.{junk}.t1", b"{}")
            late = str(queue_consumer(session_id, "late", 7, DEFAULT_ACK_WAIT).durable_name)
            created = anyio.Event()

            async def on_created(msg: Any) -> None:
                created.set()

            advisory = f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{TASKS_STREAM}.{late}"
            await bus.nc.subscribe(advisory, cb=on_created)
            await queue.create("late", agent="ops/a", priority=7)
            with anyio.fail_after(5):
                await created.wait()
            assert await consumer_exists(bus, late)
        names = [c.name async for c in consumers_of(bus)]
        assert not [n for n in names if "junk" in n]


async def offered_once(queue: TaskQueue) -> None:
    """Create, claim and complete a task of the victim's queue (type investigate,
    priority 5): the claim waits until the service made the queue's consumer."""
    await queue.create("investigate", agent=VICTIM)
    claim = await queue.claim(agent=VICTIM, types=["investigate"], timeout=10)
    assert claim is not None
    await claim.complete({"ok": True})


async def consumer_exists(bus: Bus, durable: str) -> bool:
    try:
        await bus.js.consumer_info(TASKS_STREAM, durable)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def consumers_of(bus: Bus) -> AsyncIterator[Any]:
    for info in await bus.js.consumers_info(TASKS_STREAM):
        yield info


# --- event consumers and the consensus service's intake (attempt 7) ---------------------


async def test_agent_cannot_touch_another_agents_consumer_or_the_consensus_intake(
    deploy: Deploy, service: Bus, session_id: str
) -> None:
    victim = Agent(VICTIM)
    seen = anyio.Event()

    @victim.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        if message.body.content == "after the attack":
            seen.set()

    async with (
        provisioning(service),
        ConsensusService(service),  # `swarmbus consensus`: its intake consumer
        deploy.bus(VICTIM) as vbus,
        victim.serve(vbus),
    ):
        mine = safe_token(VICTIM)
        before = {c: await service.js.consumer_info(EVENTS, c) for c in (mine, INTAKE)}
        errors: list[str] = []
        nc = await deploy.raw(ATTACKER, errors)
        try:
            for consumer, info in before.items():
                hijack = info.config.as_dict() | {"ack_wait": 3600 * 10**9}
                body = json.dumps({"stream_name": EVENTS, "config": hijack}).encode()
                for subject in (
                    f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.{consumer}",
                    f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS}.{consumer}",
                    f"$JS.API.CONSUMER.CREATE.{EVENTS}",
                    f"$JS.API.CONSUMER.CREATE.{EVENTS}.{consumer}",
                    f"$JS.API.CONSUMER.DELETE.{EVENTS}.{consumer}",
                    f"$JS.ACK.{EVENTS}.{consumer}.1.1.1.1.0",
                ):
                    await refused(nc, errors, subject, body)
        finally:
            await nc.close()
        for consumer, info in before.items():
            assert (await service.js.consumer_info(EVENTS, consumer)).config == info.config
        await service.publish(finding("after the attack"), agent=SERVICE, session=session_id)
        with anyio.fail_after(10):
            await seen.wait()


def test_grants_files_name_no_task_consumer_create_for_agents() -> None:
    """The deploy configs give agents no create (= update) on SWARMBUS_TASKS consumers."""
    roles = (DEPLOY / "jwt-roles.yaml").read_text()
    agent_role = roles.split("\nagent:\n", 1)[1].split("\nservice:\n", 1)[0]
    auth = (DEPLOY / "auth.conf").read_text()
    agents = auth.split('user: "swarmbus/consensus"', 1)[0]
    for text in (agent_role, agents):
        assert "DURABLE.CREATE.SWARMBUS_TASKS" not in text
        assert "$JS.API.CONSUMER.MSG.NEXT.SWARMBUS_TASKS.*" in text


# --- lock wakes (issue 18): hints with no authority ---------------------------------------


class _LockAttempts:
    """Counts the finished attempts of one ``Lock``; tells when there were ``n``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock: Lock | None = None
        self.count = 0
        self._waiting: list[tuple[int, anyio.Event]] = []
        attempt = locks.Lock._attempt

        async def counted(lock: Lock, ttl: int, expected: int | None = None) -> Any:
            try:
                return await attempt(lock, ttl, expected)
            finally:  # done (the waiter subscribed to its wakes before its first)
                self.count += lock is self.lock
                for n, event in self._waiting:
                    if self.count >= n:
                        event.set()

        monkeypatch.setattr(locks.Lock, "_attempt", counted)

    async def reach(self, n: int) -> None:
        event = anyio.Event()
        self._waiting.append((n, event))
        if self.count >= n:
            event.set()
        await event.wait()


async def test_forged_lock_wakes_cannot_take_or_free_a_lock(
    deploy: Deploy, service: Bus, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker may publish wakes (agents need to): each one costs the waiter a
    read, none lets it take a held lock, not even one that names the holder's revision
    (a compare-and-set on it would succeed); the victim keeps and refreshes it."""
    resource = f"deploy-{unique}"
    subject = lock_wake_subject(LOCKS_BUCKET, lock_key(resource))
    attempts = _LockAttempts(monkeypatch)
    errors: list[str] = []
    async with (
        provisioning(service),
        deploy.bus(VICTIM) as holder_bus,
        deploy.bus(VICTIM) as waiter_bus,
    ):
        holder = Lock(holder_bus, resource, VICTIM, ttl=30)
        held = await holder.acquire()
        assert held is not None
        attempts.lock = waiter = Lock(waiter_bus, resource, VICTIM, ttl=30)
        attacker = await deploy.raw(ATTACKER, errors)
        try:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(functools.partial(waiter.acquire, timeout=20))
                    await attempts.reach(1)  # subscribed, found it held
                    forged = [b"", b"0", b"1", str(held.token).encode(), b"99999999", b"x" * 64]
                    for data in forged * 3:
                        await attacker.publish(subject, data)
                    await attacker.flush()
                    await attempts.reach(1 + len(forged))  # the forged wakes arrived
                    assert waiter.lease is None
                    stored = await lock_holder(holder_bus, resource)
                    assert stored is not None
                    assert stored.token == held.token
                    assert (await holder.refresh()).token == held.token
                    await holder.release()
        finally:
            await attacker.close()
        assert not errors  # granted: publishing wakes is allowed
        assert waiter.lease is not None
        assert waiter.lease.token > held.token
        await waiter.release()


async def test_swallowed_lock_wakes_only_delay_waiters(
    deploy: Deploy, service: Bus, unique: str
) -> None:
    """The attacker joins the wake queue group ten times over and drops what it gets:
    the waiter still takes each released lock, by its re-check (at most ~1 s)."""
    resource = f"deploy-{unique}"
    key = lock_key(resource)
    swallowed: list[bytes] = []
    errors: list[str] = []

    async def swallow(msg: Any) -> None:
        swallowed.append(msg.data)

    async with (
        provisioning(service),
        deploy.bus(VICTIM) as holder_bus,
        deploy.bus(VICTIM) as waiter_bus,
    ):
        attacker = await deploy.raw(ATTACKER, errors)
        try:
            for _ in range(10):
                await attacker.subscribe(lock_wake_subject(LOCKS_BUCKET, key), key, cb=swallow)
            await attacker.flush()
            holder = Lock(holder_bus, resource, VICTIM, ttl=30)
            waiter = Lock(waiter_bus, resource, VICTIM, ttl=30)
            for _ in range(4):
                held = await holder.acquire()
                assert held is not None
                with anyio.fail_after(MAX_RECHECK + 4):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(functools.partial(waiter.acquire, timeout=20))
                        await anyio.wait_all_tasks_blocked()
                        await holder.release()
                assert waiter.lease is not None
                assert waiter.lease.token > held.token
                await waiter.release()
        finally:
            await attacker.close()
    assert not errors
    assert swallowed  # (all but certain: 10 of the group's 11 members are the attacker's)
