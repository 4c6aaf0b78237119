"""Auth on a real server started from deploy/nats/single.conf (ports and store rewritten).

Each identity connects with the credentials the deploy config gives it; the server
refuses what its permissions do not allow, and swarmbus turns that into a clear
PermissionDeniedError without storing anything.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
import nkeys
import pytest
import yaml
from anyio.streams.memory import MemoryObjectReceiveStream

from swarmbus import (
    Agent,
    AlreadyVotedError,
    Ballot,
    Blackboard,
    Bus,
    Claim,
    ConnectionError,
    Consensus,
    ConsensusService,
    ErrorOccurred,
    Finding,
    FindingMessage,
    InvalidTransitionError,
    Lock,
    NatsServer,
    NotEligibleError,
    PermissionDeniedError,
    Proposal,
    QueryLedger,
    RequestMessage,
    TaskQueue,
    Vote,
)
from swarmbus._cli import build_parser
from swarmbus._consensus import CONSENSUS_BUCKET, proposal_key
from swarmbus._demo import incident
from swarmbus._runtime.provision import provisioning
from swarmbus._tasks import TASKS_BUCKET

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nats"
VALIDATOR = "ops/deploy-validator"
LEAD = "security/incident-response-lead"
SERVICE = "swarmbus/consensus"
OBSERVER = "observer"
PASSWORD_ENV = {
    VALIDATOR: "NATS_PASSWORD_DEPLOY_VALIDATOR",
    LEAD: "NATS_PASSWORD_INCIDENT_LEAD",
    SERVICE: "NATS_PASSWORD_CONSENSUS",
    OBSERVER: "NATS_PASSWORD_OBSERVER",
    "demo": "NATS_PASSWORD_DEMO",
}
PASSWORDS = {user: secrets.token_hex(12) for user in PASSWORD_ENV}
INBOX = {
    VALIDATOR: "_INBOX_ops_deploy-validator",
    LEAD: "_INBOX_security_incident-response-lead",
    SERVICE: "_INBOX_swarmbus_consensus",
    OBSERVER: "_INBOX_observer",
    "demo": "_INBOX_demo",
}
EVENTS = "SWARMBUS_EVENTS"

pytestmark = pytest.mark.xdist_group("deploy-auth")


def start_with_passwords(server: NatsServer) -> NatsServer:
    """Start ``server``; the deploy config reads the passwords from its environment."""
    with pytest.MonkeyPatch.context() as mp:
        for user, env in PASSWORD_ENV.items():
            mp.setenv(env, PASSWORDS[user])
        return server.start()


@pytest.fixture(scope="module")
def deploy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """deploy/nats/single.conf on a free 127.0.0.1 port with its store in a temp dir."""
    server = NatsServer(
        tmp_path_factory.mktemp("deploy-single"),
        config_file=DEPLOY / "single.conf",
        extra_args=["--http_port", "-1"],
    )
    start_with_passwords(server)
    try:
        yield server
    finally:
        server.stop()


def as_user(server: NatsServer, user: str, **overrides: Any) -> Any:
    """``Bus.open`` as a deploy-config user with its own inbox prefix."""
    return Bus.open(
        url=server.url,
        user=user,
        password=PASSWORDS[user],
        inbox_prefix=INBOX[user],
        **overrides,
    )


@pytest.fixture
async def service(deploy_server: NatsServer) -> AsyncIterator[Bus]:
    """The service account: it provisions the streams the agents use."""
    async with as_user(deploy_server, SERVICE) as bus:
        yield bus


def violations(server: NatsServer, user: str, after: int) -> list[str]:
    """What the server refused ``user`` in log lines from ``after`` on, apart from the
    stream creation every connect tries and the queue-consumer creation every claimer
    tries once (the service creates them)."""
    return [
        line
        for line in server.log[after:]
        if f"user:{user}" in line and "Violation" in line and not expected_refusal(line)
    ]


def expected_refusal(line: str) -> bool:
    return "STREAM.CREATE" in line or "CONSUMER.DURABLE.CREATE.SWARMBUS_TASKS" in line


def finding(text: str = "error rate 5x baseline") -> Finding:
    return Finding(category="observation", content=text, confidence=0.9)


async def stored(bus: Bus, subject: str) -> bool:
    try:
        await bus.js.get_last_msg(EVENTS, subject)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def test_agent_cannot_publish_as_another_agent(
    deploy_server: NatsServer, service: Bus, session_id: str
) -> None:
    async with as_user(deploy_server, LEAD) as lead:
        own = await lead.publish(finding(), agent=LEAD, session=session_id)
        assert await stored(service, f"agent.finding.reported.{session_id}.{LEAD}")
        assert own.source.agent == LEAD
        with anyio.fail_after(3), pytest.raises(PermissionDeniedError) as refused:
            # well under the 5 s request timeout: the refusal is not a timeout
            await lead.publish(finding("forged"), agent=VALIDATOR, session=session_id)
    forged = f"agent.finding.reported.{session_id}.{VALIDATOR}"
    assert forged in str(refused.value)
    assert "permissions" in str(refused.value)
    assert not await stored(service, forged)


async def test_agent_cannot_request_as_another_agent(
    deploy_server: NatsServer, service: Bus, session_id: str
) -> None:
    async with as_user(deploy_server, LEAD) as lead:
        with anyio.fail_after(3), pytest.raises(PermissionDeniedError, match="request"):
            await lead.request("check_deployment", agent=VALIDATOR, session=session_id)


async def test_agent_cannot_read_another_agents_inbox(
    deploy_server: NatsServer, service: Bus
) -> None:
    async def ignore(message: Any) -> None:
        raise AssertionError("must not receive anything")

    async with as_user(deploy_server, LEAD) as lead:
        for subject in (f"{INBOX[VALIDATOR]}.>", "_INBOX.>", f"swarmbus.request.*.{VALIDATOR}.*.*"):
            with anyio.fail_after(3), pytest.raises(PermissionDeniedError, match="subscribe"):
                await lead.subscribe(subject, ignore, receiver=LEAD)
        # its own inbox and every event are readable
        await lead.subscribe(f"{INBOX[LEAD]}.>", ignore, receiver=LEAD)
        await lead.subscribe("agent.>", ignore, receiver=LEAD)


async def test_agent_has_no_jetstream_admin(
    deploy_server: NatsServer, service: Bus, unique: str
) -> None:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        deploy_server.url,
        user=VALIDATOR,
        password=PASSWORDS[VALIDATOR],
        inbox_prefix=INBOX[VALIDATOR],
        error_cb=on_error,
    )
    try:
        js = nc.jetstream(timeout=1)
        attempts = {
            f"$JS.API.STREAM.DELETE.{EVENTS}": lambda: js.delete_stream(EVENTS),
            f"$JS.API.STREAM.PURGE.{EVENTS}": lambda: js.purge_stream(EVENTS),
            f"$JS.API.CONSUMER.DELETE.{EVENTS}.x": lambda: js.delete_consumer(EVENTS, "x"),
        }
        for subject, attempt in attempts.items():
            with pytest.raises(nats.errors.TimeoutError):
                await attempt()
            refusal = f'permissions violation for publish to "{subject.lower()}"'
            assert any(refusal in error for error in errors), errors
    finally:
        await nc.close()
    assert (await service.js.stream_info(EVENTS)).config.name == EVENTS
    async with as_user(deploy_server, VALIDATOR) as agent:
        with pytest.raises(PermissionDeniedError, match="create bucket"):
            await agent.key_value(f"B{unique}")
    with pytest.raises(nats.js.errors.NotFoundError):
        await service.js.stream_info(f"KV_B{unique}")


async def test_agents_work_within_their_permissions(
    deploy_server: NatsServer, service: Bus, session_id: str, unique: str
) -> None:
    """Every JetStream grant an agent needs, and no more: events, requests, KV."""
    log_start = len(deploy_server.log)
    bucket = f"B{unique}"
    await (await service.key_value(bucket)).put("context", b"INC-1234")
    validator = Agent(VALIDATOR)
    lead = Agent(LEAD)
    seen = anyio.Event()

    @validator.on_request("check_deployment")
    async def check(request: RequestMessage) -> dict[str, Any]:
        return {"version": "v1.2.3"}

    @lead.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        if message.source.agent == VALIDATOR:
            seen.set()

    async with (
        as_user(deploy_server, VALIDATOR) as vbus,
        as_user(deploy_server, LEAD) as lbus,
        validator.serve(vbus),
        lead.serve(lbus),
    ):
        with anyio.fail_after(10):
            await validator.publish(finding(), session=session_id)
            await seen.wait()
            answer = await lead.request("check_deployment", session=session_id)
            assert answer.response.result == {"version": "v1.2.3"}
            kv = await lbus.key_value(bucket)
            assert (await kv.get("context")).value == b"INC-1234"
            watcher = await kv.watch("context")
            # agents write only the swarmbus buckets: the service updates this one
            await (await service.key_value(bucket)).put("context", b"INC-1234 rollback")
            values = []
            while len(values) < 2:
                entry = await watcher.updates(timeout=5)
                if entry is not None:  # None marks the end of the initial values
                    values.append(entry.value)
            await watcher.stop()
    assert values == [b"INC-1234", b"INC-1234 rollback"]
    assert violations(deploy_server, VALIDATOR, log_start) == []
    assert violations(deploy_server, LEAD, log_start) == []


async def test_observer_reads_but_cannot_publish(
    deploy_server: NatsServer, service: Bus, session_id: str
) -> None:
    received = anyio.Event()

    async def on_event(message: Any) -> None:
        if message.source.session == session_id:
            received.set()

    async with as_user(deploy_server, OBSERVER) as observer:
        await observer.subscribe(f"agent.*.*.{session_id}.>", on_event, receiver=OBSERVER)
        async with as_user(deploy_server, VALIDATOR) as agent:
            await agent.publish(finding(), agent=VALIDATOR, session=session_id)
        with anyio.fail_after(5):
            await received.wait()
        subject = f"agent.finding.reported.{session_id}.{VALIDATOR}"
        history = await observer.js.get_last_msg(EVENTS, subject)
        assert observer.accept(subject, history.data).source.agent == VALIDATOR
        for agent_id in (OBSERVER, VALIDATOR):
            with anyio.fail_after(3), pytest.raises(PermissionDeniedError):
                await observer.publish(finding("forged"), agent=agent_id, session=session_id)
    assert not await stored(service, f"agent.finding.reported.{session_id}.{OBSERVER}")


async def test_wrong_password_is_refused(deploy_server: NatsServer) -> None:
    with pytest.raises(ConnectionError, match="cannot connect"):
        await Bus.connect(
            url=deploy_server.url, user=VALIDATOR, password="wrong", connect_timeout=2
        )


# --- the other auth methods swarmbus supports (own small servers) --------------------


def _server_with(tmp_path: Path, authorization: str) -> NatsServer:
    conf = tmp_path / "auth-test.conf"
    conf.write_text(f"jetstream {{}}\nauthorization {{\n{authorization}\n}}\n")
    return NatsServer(tmp_path / "data", config_file=conf)


async def test_token_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = secrets.token_hex(16)
    with _server_with(tmp_path, f'  token: "{token}"') as server:
        monkeypatch.setenv("NATS_URL", server.url)
        monkeypatch.setenv("SWARMBUS_TOKEN", token)
        async with Bus.open() as bus:
            assert bus.nc.is_connected
        with pytest.raises(ConnectionError):
            await Bus.connect(token="wrong", connect_timeout=2)


async def test_nkey_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "agent.nk"
    seed_file.write_bytes(seed)
    users = f'  users = [ {{ nkey: "{public}" }} ]'
    with _server_with(tmp_path, users) as server:
        monkeypatch.setenv("SWARMBUS_NKEY_SEED_FILE", str(seed_file))
        async with Bus.open(url=server.url) as bus:
            assert bus.nc.is_connected
        other = tmp_path / "other.nk"
        other.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
        with pytest.raises(ConnectionError):
            await Bus.connect(url=server.url, nkey_seed_file=str(other), connect_timeout=2)


async def test_locks_board_and_votes_work_under_agent_permissions(
    deploy_server: NatsServer, service: Bus, session_id: str, unique: str
) -> None:
    """The coordination features agents use, with the buckets the service provisioned."""
    log_start = len(deploy_server.log)
    async with (
        provisioning(service),
        ConsensusService(service, session=session_id),
        as_user(deploy_server, VALIDATOR) as agent,
    ):
        async with TaskQueue(agent, session_id) as queue:
            created = await queue.create("investigate", agent=VALIDATOR)
            claim = await queue.claim(agent=VALIDATOR, types=["investigate"], timeout=5)
            assert claim is not None
            assert claim.task.id == created.id
            assert (await claim.complete({"ok": True})).status == "completed"
        async with Lock(agent, f"deploy-{unique}", VALIDATOR, ttl=5) as lease:
            assert lease.owner == VALIDATOR
        board = await Blackboard.open(agent, session_id)
        await board.append_finding(finding(), agent=VALIDATOR)
        assert len(await board.findings()) == 1
        consensus = await Consensus.open(agent, via_service=True)
        pid = f"p-{unique}"
        await consensus.propose(
            Proposal(proposal_id=pid, action="rollback", voters=[VALIDATOR]),
            agent=VALIDATOR,
            session=session_id,
        )
        await consensus.vote(Vote(proposal_id=pid, vote="yes", reason="5xx"), agent=VALIDATOR)
        decision = await consensus.wait_for_decision(pid, timeout=10)
    assert decision.outcome == "approved"
    assert violations(deploy_server, VALIDATOR, log_start) == []


def _keypair(prefix: int) -> tuple[bytes, nkeys.KeyPair]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed))


def _jwt(issuer: nkeys.KeyPair, subject: nkeys.KeyPair, kind: str, **claims: Any) -> str:
    """A NATS JWT (what `nsc` writes): ed25519-nkey signed claims."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    body = {
        "jti": b64(os.urandom(24)).upper(),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": subject.public_key.decode(),
        "name": kind,
        "nats": {"type": kind, "version": 2, **claims},
    }
    header = json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode()
    signed = f"{b64(header)}.{b64(json.dumps(body).encode())}"
    return f"{signed}.{b64(issuer.sign(signed.encode()))}"


async def test_creds_file_auth(tmp_path: Path) -> None:
    """Operator (JWT) mode: a .creds file made like `nsc` makes it, no nsc needed."""
    _, operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    limits = {"subs": -1, "data": -1, "payload": -1, "conn": -1, "wildcards": True}
    js_limits = {**limits, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    accounts = {
        account.public_key.decode(): _jwt(operator, account, "account", limits=js_limits),
        system.public_key.decode(): _jwt(operator, system, "account", limits=limits),
    }
    conf = tmp_path / "operator.conf"
    conf.write_text(
        f'operator: "{_jwt(operator, operator, "operator")}"\n'
        f"system_account: {system.public_key.decode()}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {json.dumps(accounts)}\n"
        "jetstream {}\n"
    )

    def creds(issuer: nkeys.KeyPair) -> str:
        seed, user = _keypair(nkeys.PREFIX_BYTE_USER)
        path = tmp_path / f"{user.public_key.decode()[:8]}.creds"
        token = _jwt(issuer, user, "user", subs=-1, data=-1, payload=-1)
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n"
            "------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )
        return str(path)

    with NatsServer(tmp_path / "data", config_file=conf) as server:
        async with Bus.open(url=server.url, creds_file=creds(account)) as bus:
            assert (await bus.js.stream_info(EVENTS)).config.name == EVENTS
        _, stranger = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        with pytest.raises(ConnectionError):
            await Bus.connect(url=server.url, creds_file=creds(stranger), connect_timeout=2)


# --- claims and votes are bound to the agent ------------------------------------------


async def test_agent_cannot_complete_another_agents_claimed_task(
    deploy_server: NatsServer, service: Bus, session_id: str
) -> None:
    async with (
        provisioning(service),
        as_user(deploy_server, VALIDATOR) as vbus,
        as_user(deploy_server, LEAD) as lbus,
        TaskQueue(vbus, session_id) as validator,
        TaskQueue(lbus, session_id) as lead,
    ):
        created = await validator.create("investigate", agent=VALIDATOR)
        claim = await validator.claim(agent=VALIDATOR, types=["investigate"], timeout=5)
        assert claim is not None
        before = await service_record(service, session_id, created.id)
        # the lead cannot take the claim: it is leased to the validator
        assert await lead.claim(agent=LEAD, types=["investigate"]) is None
        # nor claim or create as the validator, nor finish the validator's claim
        with pytest.raises(PermissionDeniedError, match="cannot act as ops/deploy-validator"):
            await lead.claim(agent=VALIDATOR, types=["investigate"])
        with pytest.raises(PermissionDeniedError, match="cannot act as ops/deploy-validator"):
            await lead.create("investigate", agent=VALIDATOR)
        stolen = Claim(lead, claim.task, claim.revision, claim._msg)
        with pytest.raises(PermissionDeniedError, match="cannot act as ops/deploy-validator"):
            await stolen.complete({"forged": True})
        with pytest.raises(PermissionDeniedError):
            await stolen.fail("forged")
        assert await service_record(service, session_id, created.id) == before
        # the holder still completes it, once
        assert (await claim.complete({"ok": True})).result == {"ok": True}
        with pytest.raises(InvalidTransitionError):
            await claim.complete({"again": True})
        assert (await lead.get(created.id)).assigned_to == VALIDATOR


async def service_record(bus: Bus, session: str, task_id: str) -> tuple[int, bytes]:
    """Revision and bytes of a task record, as the service reads it."""
    entry = await (await bus.key_value(TASKS_BUCKET)).get(f"{session}.{task_id}")
    assert entry.revision is not None
    assert entry.value is not None
    return entry.revision, entry.value


async def propose(service: Bus, session: str, pid: str) -> None:
    """An open proposal with the validator and the service as its voters."""
    consensus = await Consensus.open(service, board_bucket=None)
    await consensus.propose(
        Proposal(proposal_id=pid, action="rollback", voters=[VALIDATOR, SERVICE]),
        agent=SERVICE,
        session=session,
    )


async def error_events(bus: Bus, session: str) -> MemoryObjectReceiveStream[ErrorOccurred]:
    """The ``error.occurred`` events of ``session`` from now on (the service's refusals)."""
    send, receive = anyio.create_memory_object_stream[ErrorOccurred](100)

    async def on_msg(msg: Any) -> None:
        body = bus.accept(msg.subject, msg.data).body
        assert isinstance(body, ErrorOccurred)
        send.send_nowait(body)

    await bus.nc.subscribe(f"agent.error.occurred.{session}.*", cb=on_msg)
    await bus.nc.flush()
    return receive


async def raw_record(bus: Bus, pid: str) -> tuple[int, bytes]:
    entry = await (await bus.key_value(CONSENSUS_BUCKET)).get(proposal_key(pid))
    assert entry.revision is not None
    assert entry.value is not None
    return entry.revision, entry.value


async def test_agent_cannot_vote_twice(
    deploy_server: NatsServer, service: Bus, session_id: str, unique: str
) -> None:
    proposal = f"p-{unique}"
    async with ConsensusService(service, session=session_id, board_bucket=None):
        await propose(service, session_id, proposal)
        errors = await error_events(service, session_id)
        async with as_user(deploy_server, VALIDATOR) as vbus:
            consensus = await Consensus.open(vbus, board_bucket=None, via_service=True)
            record = await consensus.vote(Vote(proposal_id=proposal, vote="no"), agent=VALIDATOR)
            assert [(b.voter, b.vote) for b in record.votes] == [(VALIDATOR, "no")]
            before = await raw_record(service, proposal)
            with anyio.fail_after(5), pytest.raises(AlreadyVotedError):
                await consensus.vote(Vote(proposal_id=proposal, vote="yes"), agent=VALIDATOR)
            # past the client's check, straight on the wire: the service refuses it
            await vbus.publish(
                Vote(proposal_id=proposal, vote="yes"), agent=VALIDATOR, session=session_id
            )
            with anyio.fail_after(10):
                refusal = await errors.receive()
            assert "already voted" in refusal.reason
            assert await raw_record(service, proposal) == before


async def test_agent_cannot_vote_where_it_is_not_allowed(
    deploy_server: NatsServer, service: Bus, session_id: str, unique: str
) -> None:
    proposal = f"p-{unique}"
    async with ConsensusService(service, session=session_id, board_bucket=None):
        await propose(service, session_id, proposal)
        errors = await error_events(service, session_id)
        before = await raw_record(service, proposal)
        async with as_user(deploy_server, LEAD) as lbus:
            consensus = await Consensus.open(lbus, board_bucket=None, via_service=True)
            yes = Vote(proposal_id=proposal, vote="yes")
            # not in the electorate
            with anyio.fail_after(5), pytest.raises(NotEligibleError):
                await consensus.vote(yes, agent=LEAD)
            await lbus.publish(yes, agent=LEAD, session=session_id)
            with anyio.fail_after(10):
                refusal = await errors.receive()
            assert "may not vote" in refusal.reason
            # nor as an agent it is not: the server refuses the vote event
            with anyio.fail_after(5), pytest.raises(PermissionDeniedError, match="voted"):
                await consensus.vote(yes, agent=VALIDATOR)
            # nor may it write the proposal's record itself (agents cannot write the bucket)
            record = await consensus.get(proposal)
            ballot = Ballot(voter=VALIDATOR, vote="yes", cast_at=record.created_at)
            forged = msgspec.structs.replace(record, votes=[ballot])
            kv = await lbus.key_value(CONSENSUS_BUCKET)
            with anyio.fail_after(5), pytest.raises(PermissionDeniedError, match="publish"):
                await kv.put(proposal_key(proposal), msgspec.json.encode(forged))
            # it joins sessions as itself only (the electorate of member-voted proposals)
            await consensus.join(session_id, LEAD)
            with anyio.fail_after(5), pytest.raises(PermissionDeniedError, match="publish"):
                await consensus.join(session_id, VALIDATOR)
            assert await consensus.members(session_id) == [LEAD]
        assert await raw_record(service, proposal) == before


async def test_refused_background_publish_is_reported_not_resent(
    deploy_server: NatsServer, service: Bus, session_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    forged = f"agent.finding.reported.{session_id}.{VALIDATOR}"
    async with as_user(deploy_server, LEAD) as lead:
        with caplog.at_level(logging.ERROR, logger="swarmbus.outbox"):
            await lead.publish(finding("forged"), agent=VALIDATOR, session=session_id, wait=False)
            # dropped on the server's refusal, not re-sent until give_up_after (110 s)
            assert await lead.outbox.flush(timeout=3)
    assert forged.lower() in caplog.text.lower()
    assert "permissions" in caplog.text
    assert not await stored(service, forged)


async def test_evidence_query_ledger_works_under_agent_permissions(
    deploy_server: NatsServer, service: Bus, session_id: str, unique: str
) -> None:
    """Swarm investigators dedupe evidence queries in SWARMBUS_QUERIES (on by default)."""
    log_start = len(deploy_server.log)
    await QueryLedger.open(service, session_id, agent=SERVICE)  # provisions the bucket
    ran: list[str] = []

    async def execute() -> str:
        ran.append(VALIDATOR)
        return "0.05"

    async with as_user(deploy_server, VALIDATOR) as vbus, as_user(deploy_server, LEAD) as lbus:
        first = await QueryLedger.open(vbus, session_id, agent=VALIDATOR)
        again = await QueryLedger.open(lbus, session_id, agent=LEAD)
        with anyio.fail_after(10):
            won = await first.run("prometheus", f"rate(errors_{unique}[5m])", execute)
            reused = await again.run("prometheus", f"rate(errors_{unique}[5m])", execute)
    assert (won.reused, reused.reused) == (False, True)
    assert ran == [VALIDATOR]
    assert violations(deploy_server, VALIDATOR, log_start) == []
    assert violations(deploy_server, LEAD, log_start) == []


async def test_service_runs_blackboard_retention(
    deploy_server: NatsServer, service: Bus, session_id: str
) -> None:
    """``Blackboard.recording(retention=...)`` / ``purge_completed`` purge old sessions."""
    log_start = len(deploy_server.log)
    board = await Blackboard.open(service, session_id)
    await board.start(SERVICE, {"task": "investigate"})
    await board.complete({"decision": "rollback"}, agent=SERVICE)
    later = datetime.now(UTC) + timedelta(days=8)
    with anyio.fail_after(10):
        purged = await Blackboard.purge_completed(service, timedelta(days=7), at=later)
    assert session_id in purged
    assert violations(deploy_server, SERVICE, log_start) == []
    # ... and nothing else: the event stream stays unpurgeable
    with pytest.raises(nats.errors.TimeoutError):
        await service.nc.jetstream(timeout=1).purge_stream(EVENTS)
    assert violations(deploy_server, SERVICE, log_start)


async def test_agents_work_after_the_compose_service_provisioned(
    tmp_path: Path, session_id: str, unique: str
) -> None:
    """docker-compose.yml: start the service (`swarmbus consensus`) first, then agents."""
    server = start_with_passwords(
        NatsServer(tmp_path, config_file=DEPLOY / "single.conf", extra_args=["--http_port", "-1"])
    )
    try:
        async with compose_consensus(server):
            log_start = len(server.log)
            async with (
                as_user(server, VALIDATOR) as agent,
                as_user(server, LEAD) as lead,
                TaskQueue(agent, session_id) as queue,
                TaskQueue(lead, session_id) as lead_queue,
            ):
                await Blackboard.open(agent, session_id)
                await QueryLedger.open(agent, session_id, agent=VALIDATOR)
                with anyio.fail_after(10):
                    await Lock(agent, f"deploy-{unique}", VALIDATOR, ttl=5).acquire(timeout=0)
                    created = await queue.create("investigate", agent=VALIDATOR)
                    # the service made the queue's consumer when the task was dispatched
                    claim = await lead_queue.claim(agent=LEAD, types=["investigate"], timeout=8)
                assert claim is not None
                assert claim.task.id == created.id
                await claim.complete({"ok": True})
            assert violations(server, VALIDATOR, log_start) == []
            assert violations(server, LEAD, log_start) == []
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def compose_consensus(server: NatsServer) -> AsyncIterator[None]:
    """`swarmbus consensus` as docker-compose.yml runs it, until it said it is ready."""
    env = {
        **os.environ,
        "NATS_URL": server.url,
        "SWARMBUS_USER": SERVICE,
        "SWARMBUS_PASSWORD": PASSWORDS[SERVICE],
        "SWARMBUS_INBOX_PREFIX": INBOX[SERVICE],
    }
    command = [sys.executable, "-c", "from swarmbus._cli import main; main()", "consensus"]
    async with await anyio.open_process(command, env=env) as process:
        try:
            assert process.stdout is not None
            output = b""
            with anyio.fail_after(30):
                async for chunk in process.stdout:
                    output += chunk
                    if b"consensus service ready" in output:
                        break
            assert b"consensus service ready" in output, output
            yield
        finally:
            process.terminate()
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()


async def test_agent_cannot_wipe_the_consensus_bucket(
    deploy_server: NatsServer, service: Bus, session_id: str, unique: str
) -> None:
    pid = f"p-{unique}"
    await propose(service, session_id, pid)
    before = await raw_record(service, pid)
    async with as_user(deploy_server, VALIDATOR) as agent:
        own_key = f"$KV.{CONSENSUS_BUCKET}.m.{session_id}.{VALIDATOR}"
        with pytest.raises(nats.js.errors.APIError, match="rollup"):
            await agent.js.publish(own_key, b"", headers={"Nats-Rollup": "all"})
    assert await raw_record(service, pid) == before


async def test_demo_runs_under_the_demo_user(
    deploy_server: NatsServer, service: Bus, session_id: str
) -> None:
    """`swarmbus demo --via-service` in docker-compose.yml: the demo user, next to the
    consensus service."""
    compose = yaml.safe_load((DEPLOY.parents[1] / "docker-compose.yml").read_text())
    assert compose["services"]["demo"]["command"] == ["demo", "--via-service"]
    assert compose["services"]["demo"]["environment"]["SWARMBUS_USER"] == "demo"
    assert build_parser().parse_args(["demo", "--via-service"]).via_service
    log_start = len(deploy_server.log)
    async with (
        provisioning(service),
        ConsensusService(service),
        as_user(deploy_server, "demo") as bus,
    ):
        result = await incident(
            bus, session=session_id, echo=lambda _: None, timeout=20, via_service=True
        )
    assert result.decision.decision == "rollback"
    assert violations(deploy_server, "demo", log_start) == []
