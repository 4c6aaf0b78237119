"""`swarmbus creds` on a real nats-server in operator (JWT) mode.

The server runs deploy/nats/single-jwt.conf (a temp copy of deploy/nats with a fresh
credentials directory); agents are added and revoked while it runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
import nats.js.errors
import pytest
import yaml

from swarmbus import (
    Agent,
    Bus,
    ConnectionError,
    Finding,
    FindingMessage,
    InvalidIdentifierError,
    NatsCluster,
    NatsServer,
    PermissionDeniedError,
    RequestMessage,
    SwarmbusError,
)
from swarmbus._cli import main
from swarmbus._creds import (
    DEFAULT_ACCOUNT_LIMITS,
    DEFAULT_ROLES,
    CredsStore,
    decode_jwt,
    inbox_prefix,
)
from swarmbus._runtime.provision import provisioning
from swarmbus._server import free_port
from swarmbus._subjects import safe_token

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nats"
SERVICE = "swarmbus/consensus"
NEWCOMER = "ops/deploy-validator"
OTHER = "security/incident-response-lead"
EVENTS = "SWARMBUS_EVENTS"

pytestmark = pytest.mark.xdist_group("creds")


def creds(store: Path, *args: str) -> None:
    """Run ``swarmbus creds --dir STORE ARGS`` and require success."""
    assert main(["creds", "--dir", str(store), *args]) == 0


def jwt_server(tmp_path: Path, resolver: str) -> tuple[NatsServer, CredsStore]:
    """A copy of deploy/nats with a fresh operator, and single-jwt.conf's server on it."""
    conf_dir = tmp_path / "nats"
    shutil.copytree(DEPLOY, conf_dir, ignore=shutil.ignore_patterns("creds"))
    store = conf_dir / "creds"
    creds(store, "init", "--resolver", resolver)
    creds(store, "add", SERVICE, "--role", "service")
    server = NatsServer(
        tmp_path / "data",
        config_file=conf_dir / "single-jwt.conf",
        extra_args=["--http_port", "-1"],
    )
    return server, CredsStore(store)


@pytest.fixture
def full_resolver(tmp_path: Path) -> Iterator[tuple[NatsServer, CredsStore]]:
    server, store = jwt_server(tmp_path, "full")
    with server:
        yield server, store


def as_agent(server: NatsServer, store: CredsStore, agent: str, **overrides: Any) -> Any:
    return Bus.open(
        url=server.url,
        creds_file=str(store.users()[agent].creds_file),
        inbox_prefix=inbox_prefix(agent),
        **overrides,
    )


@pytest.fixture
async def service(full_resolver: tuple[NatsServer, CredsStore]) -> AsyncIterator[Bus]:
    """The service user provisions the streams."""
    server, store = full_resolver
    async with as_agent(server, store, SERVICE) as bus:
        yield bus


def finding(text: str = "error rate 5x baseline") -> Finding:
    return Finding(category="observation", content=text, confidence=0.9)


async def stored(bus: Bus, subject: str) -> bool:
    try:
        await bus.js.get_last_msg(EVENTS, subject)
    except nats.js.errors.NotFoundError:
        return False
    return True


def violations(server: NatsServer, after: int) -> list[str]:
    """What the server refused from ``after`` on, apart from the stream creation every
    connect tries (agents may not create streams) and the queue-consumer creation every
    claimer tries once (the service creates them)."""
    return [
        line
        for line in server.log[after:]
        if "Violation" in line
        and "STREAM.CREATE" not in line
        and "CONSUMER.DURABLE.CREATE.SWARMBUS_TASKS" not in line
    ]


async def test_agent_added_to_a_running_server_publishes_only_as_itself(
    full_resolver: tuple[NatsServer, CredsStore], service: Bus, session_id: str
) -> None:
    server, store = full_resolver
    log_start = len(server.log)
    creds(store.root, "add", NEWCOMER)  # no --handler: one consumer per agent
    creds(store.root, "add", OTHER)
    newcomer = Agent(NEWCOMER)
    seen = anyio.Event()

    @newcomer.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        if message.source.agent == SERVICE:
            seen.set()

    async with as_agent(server, store, NEWCOMER) as bus, newcomer.serve(bus):
        own = await bus.publish(finding(), agent=NEWCOMER, session=session_id)
        assert own.source.agent == NEWCOMER
        assert await stored(service, f"agent.finding.reported.{session_id}.{NEWCOMER}")
        # its own durable consumer (named safe_token(id)) works under the template
        await service.publish(finding("from the service"), agent=SERVICE, session=session_id)
        with anyio.fail_after(10):
            await seen.wait()
        assert violations(server, log_start) == []
        with anyio.fail_after(3), pytest.raises(PermissionDeniedError):
            await bus.publish(finding("forged"), agent=OTHER, session=session_id)
    assert not await stored(service, f"agent.finding.reported.{session_id}.{OTHER}")


async def test_agent_cannot_pull_or_ack_another_agents_consumer(
    full_resolver: tuple[NatsServer, CredsStore], service: Bus, session_id: str
) -> None:
    """Attempt 7: MSG.NEXT on someone else's durable consumer is refused."""
    server, store = full_resolver
    creds(store.root, "add", NEWCOMER, "--handler", "on_finding")
    creds(store.root, "add", OTHER, "--handler", "on_finding")
    victim = safe_token(NEWCOMER)  # an agent's one event consumer
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        server.url,
        user_credentials=str(store.users()[OTHER].creds_file),
        inbox_prefix=inbox_prefix(OTHER),
        error_cb=on_error,
    )
    try:
        for subject in (
            f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.{victim}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS}.{victim}",
            f"$JS.API.CONSUMER.CREATE.{EVENTS}.{victim}",
            f"$JS.ACK.{EVENTS}.{victim}.1.1.1.1.0",
            "$JS.API.STREAM.DELETE.SWARMBUS_EVENTS",
        ):
            await nc.publish(subject, b"{}")
            await nc.flush()
            refusal = f'permissions violation for publish to "{subject.lower()}"'
            with anyio.fail_after(5):
                while not any(refusal in error for error in errors):
                    await nc.flush()
        # its own consumer name is allowed
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.{safe_token(OTHER)}")
        await nc.flush()
    finally:
        await nc.close()
    assert not any(safe_token(OTHER) in error for error in errors)


async def test_agent_cannot_reconfigure_another_agents_consumer_by_ephemeral_create(
    full_resolver: tuple[NatsServer, CredsStore], service: Bus, session_id: str
) -> None:
    """Attempt 7: the ephemeral create (``CONSUMER.CREATE.<stream>``) takes a consumer
    name in its body and then updates that consumer; agents get it on KV streams only."""
    server, store = full_resolver
    creds(store.root, "add", NEWCOMER)
    creds(store.root, "add", OTHER)
    victim = safe_token(NEWCOMER)  # an agent's one event consumer
    newcomer = Agent(NEWCOMER)

    @newcomer.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        pass

    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    async with as_agent(server, store, NEWCOMER) as bus, newcomer.serve(bus):
        info = await service.js.consumer_info(EVENTS, victim)
        hijack = {k: v for k, v in info.config.as_dict().items() if k != "durable_name"}
        hijack |= {"ack_wait": 3600 * 10**9, "filter_subjects": ["agent.nothing.>"]}
        nc = await nats.connect(
            server.url,
            user_credentials=str(store.users()[OTHER].creds_file),
            inbox_prefix=inbox_prefix(OTHER),
            error_cb=on_error,
        )
        try:
            subject = f"$JS.API.CONSUMER.CREATE.{EVENTS}"
            request = {"stream_name": EVENTS, "config": hijack}
            await nc.publish(subject, json.dumps(request).encode())
            refusal = f'permissions violation for publish to "{subject.lower()}"'
            with anyio.fail_after(5):
                while not any(refusal in error for error in errors):
                    await nc.flush()
        finally:
            await nc.close()
        after = await service.js.consumer_info(EVENTS, victim)
        assert after.config == info.config


async def test_revoked_agent_is_disconnected_and_refused(
    full_resolver: tuple[NatsServer, CredsStore], service: Bus, tmp_path: Path
) -> None:
    server, store = full_resolver
    creds(store.root, "add", NEWCOMER)
    kept = tmp_path / "kept.creds"  # revoke deletes the file: keep a copy to retry with
    shutil.copy(store.users()[NEWCOMER].creds_file, kept)
    closed = anyio.Event()

    async def on_closed() -> None:
        closed.set()

    nc = await nats.connect(
        server.url,
        user_credentials=str(kept),
        inbox_prefix=inbox_prefix(NEWCOMER),
        allow_reconnect=False,
        closed_cb=on_closed,
    )
    try:
        assert nc.is_connected
        # pushed to the full resolver as the system user: no reload, no restart
        await anyio.to_thread.run_sync(creds, store.root, "revoke", NEWCOMER, "--url", server.url)
        with anyio.fail_after(10):
            await closed.wait()
    finally:
        await nc.close()
    with pytest.raises(ConnectionError):
        await Bus.connect(url=server.url, creds_file=str(kept), connect_timeout=2)
    assert store.users()[NEWCOMER].revoked
    assert not store.users()[NEWCOMER].creds_file.exists()
    # a re-added agent gets a new key, which is not revoked
    creds(store.root, "add", NEWCOMER)
    async with as_agent(server, store, NEWCOMER, provision=False) as bus:
        assert bus.nc.is_connected


async def test_memory_resolver_revokes_on_config_reload(tmp_path: Path) -> None:
    """The memory resolver (account JWT preloaded in server.conf) applies a revocation
    on a config reload (SIGHUP); the full resolver does not re-read its directory."""
    server, store = jwt_server(tmp_path, "memory")
    with server:
        creds(store.root, "add", NEWCOMER)
        kept = tmp_path / "kept.creds"
        shutil.copy(store.users()[NEWCOMER].creds_file, kept)
        closed = anyio.Event()

        async def on_closed() -> None:
            closed.set()

        nc = await nats.connect(
            server.url, user_credentials=str(kept), allow_reconnect=False, closed_cb=on_closed
        )
        try:
            log_start = len(server.log)
            assert server.pid is not None
            creds(store.root, "revoke", NEWCOMER, "--reload-pid", str(server.pid))
            await anyio.to_thread.run_sync(
                lambda: server.wait_for_log("Reloaded server configuration", after=log_start)
            )
            with anyio.fail_after(10):
                await closed.wait()
        finally:
            await nc.close()
        with pytest.raises(ConnectionError):
            await Bus.connect(url=server.url, creds_file=str(kept), connect_timeout=2)


async def test_concurrent_adds_and_revokes_lose_no_agent_and_no_revocation(
    tmp_path: Path,
) -> None:
    """Provisioning scripts run ``creds add`` and ``revoke`` in parallel: every agent
    stays listed (so it can be revoked) and every revocation reaches the server."""
    server, store = jwt_server(tmp_path, "memory")
    agents = [f"ops/agent-{i}" for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda agent: CredsStore(store.root).add(agent), agents))
    users = store.users()
    assert set(agents) <= set(users)
    kept = tmp_path / "kept"
    kept.mkdir()
    for agent in agents:
        shutil.copy(users[agent].creds_file, kept / users[agent].creds_file.name)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda agent: CredsStore(store.root).revoke(agent), agents))
    revoked = decode_jwt(store.account_jwt)["nats"]["revocations"]
    assert {users[agent].public_key for agent in agents} <= set(revoked)
    with server:  # starts from server.conf, which preloads the last account JWT
        for agent in agents:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(
                    server.url,
                    user_credentials=str(kept / users[agent].creds_file.name),
                    allow_reconnect=False,
                    connect_timeout=2,
                )


def test_user_jwt_names_the_agent_and_carries_no_permissions(tmp_path: Path) -> None:
    """Scoped users get permissions from the role's template only."""
    store = CredsStore(tmp_path / "creds")
    store.init()
    entry = store.add(NEWCOMER, "agent", handlers=["on_finding"], capabilities=["check"])
    token = entry.creds_file.read_text().split("\n")[1]
    claims = decode_jwt(token)
    assert claims["name"] == NEWCOMER
    assert set(claims["nats"]) == {"type", "version", "issuer_account", "tags"}
    assert claims["nats"]["tags"] == [
        f"token:{safe_token(NEWCOMER)}",
        "handler:on_finding",
        "capability:check",
    ]
    scopes = {k["role"]: k for k in decode_jwt(store.account_jwt)["nats"]["signing_keys"]}
    assert claims["iss"] == scopes["agent"]["key"]
    assert set(scopes) == {"agent", "service", "observer"}


def test_deploy_role_templates_match_the_built_in_ones() -> None:
    """deploy/nats/jwt-roles.yaml documents (and can replace) the built-in templates."""
    assert yaml.safe_load((DEPLOY / "jwt-roles.yaml").read_text()) == DEFAULT_ROLES


async def test_role_and_account_quotas(
    full_resolver: tuple[NatsServer, CredsStore], service: Bus
) -> None:
    """Attempt 9: per-user subscription and payload limits from the role template, and
    the account's JetStream storage limits."""
    server, store = full_resolver
    limits = (await service.js.account_info()).limits
    assert limits.max_storage == DEFAULT_ACCOUNT_LIMITS["disk_storage"]
    assert limits.max_memory == DEFAULT_ACCOUNT_LIMITS["mem_storage"]
    assert limits.max_streams == DEFAULT_ACCOUNT_LIMITS["streams"]
    creds(store.root, "add", "ops/watcher", "--role", "observer")
    template = DEFAULT_ROLES["observer"]["template"]
    watcher = Watcher(server, store.users()["ops/watcher"].creds_file)
    mark = len(server.log)
    async with watcher.connected() as nc:
        for i in range(template["subs"]):
            await nc.subscribe(f"agent.finding.reported.s{i}.*")
        await nc.flush()
        assert watcher.errors == []
        await nc.subscribe("agent.>")  # one too many: the server closes the connection
        with anyio.fail_after(5):
            await watcher.closed.wait()
    await anyio.to_thread.run_sync(
        lambda: server.wait_for_log("maximum subscriptions exceeded", timeout=5, after=mark)
    )
    watcher = Watcher(server, store.users()["ops/watcher"].creds_file)
    async with watcher.connected() as nc:
        await nc.publish("$JS.API.INFO", b"x" * template["payload"])  # at the limit: fine
        await nc.flush()
        await nc.publish("$JS.API.INFO", b"x" * (template["payload"] + 1))
        with anyio.fail_after(5):
            await watcher.closed.wait()
    await anyio.to_thread.run_sync(
        lambda: server.wait_for_log("maximum payload exceeded", timeout=5, after=mark)
    )


class Watcher:
    """A raw connection that records the server's errors and its closing."""

    def __init__(self, server: NatsServer, creds_file: Path) -> None:
        self.server = server
        self.creds_file = creds_file
        self.errors: list[str] = []
        self.closed = anyio.Event()

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def on_closed(self) -> None:
        self.closed.set()

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[Any]:
        nc = await nats.connect(
            self.server.url,
            user_credentials=str(self.creds_file),
            error_cb=self.on_error,
            closed_cb=self.on_closed,
            allow_reconnect=False,
        )
        try:
            yield nc
        finally:
            await nc.close()


async def test_only_agents_with_a_capability_read_its_requests(
    full_resolver: tuple[NatsServer, CredsStore], service: Bus, session_id: str
) -> None:
    """``--capability`` (``{{tag(capability)}}``): who may read ``any`` requests."""
    server, store = full_resolver
    creds(store.root, "add", NEWCOMER, "--capability", "check_deployment")
    creds(store.root, "add", OTHER)
    newcomer = Agent(NEWCOMER)

    @newcomer.on_request("check_deployment")
    async def check(request: RequestMessage) -> dict[str, Any]:
        return {"version": "v1.2.3"}

    async def ignore(message: Any) -> None:
        raise AssertionError("must not receive anything")

    async with (
        as_agent(server, store, NEWCOMER) as bus,
        newcomer.serve(bus),
        as_agent(server, store, OTHER) as other,
    ):
        with anyio.fail_after(10):
            answer = await other.request("check_deployment", agent=OTHER, session=session_id)
        assert answer.response.result == {"version": "v1.2.3"}
        with anyio.fail_after(3), pytest.raises(PermissionDeniedError, match="subscribe"):
            await other.subscribe(
                "swarmbus.request.check_deployment.any.*.*", ignore, receiver=OTHER
            )


def test_an_agent_with_live_credentials_is_not_issued_a_second_key(tmp_path: Path) -> None:
    store = CredsStore(tmp_path / "creds")
    store.init()
    first = store.add(NEWCOMER)
    with pytest.raises(SwarmbusError, match="revoke them first"):
        store.add(NEWCOMER, handlers=["on_finding"])
    assert store.users()[NEWCOMER] == first
    store.revoke(NEWCOMER)
    assert store.add(NEWCOMER).public_key != first.public_key
    # `any` is the request target of every capability: not an identity
    with pytest.raises(InvalidIdentifierError):
        store.add("any")


def test_revoke_on_a_full_resolver_asks_for_a_push(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full resolver does not re-read its directory on a reload: without --url the
    revocation is recorded but not applied, and the command says so (exit 2)."""
    monkeypatch.delenv("NATS_URL", raising=False)
    store = tmp_path / "creds"
    creds(store, "init")
    creds(store, "add", NEWCOMER)
    assert main(["creds", "--dir", str(store), "revoke", NEWCOMER]) == 2
    assert "swarmbus creds push --url" in capsys.readouterr().err
    assert CredsStore(store).users()[NEWCOMER].revoked


async def test_coordination_works_under_the_agent_role(
    full_resolver: tuple[NatsServer, CredsStore], service: Bus, session_id: str, unique: str
) -> None:
    """The agent role template refuses nothing swarmbus needs: tasks, locks, the
    blackboard, evidence queries, votes through the consensus service."""
    from swarmbus import (
        Blackboard,
        Consensus,
        ConsensusService,
        Lock,
        Proposal,
        QueryLedger,
        TaskQueue,
        Vote,
    )

    server, store = full_resolver
    creds(store.root, "add", NEWCOMER)
    log_start = len(server.log)
    # what the service provisions for the agents (agents may not create streams, buckets
    # or task-queue consumers)
    async with (
        provisioning(service),
        ConsensusService(service, session=session_id),
        as_agent(server, store, NEWCOMER) as agent,
    ):
        async with TaskQueue(agent, session_id) as queue:
            created = await queue.create("investigate", agent=NEWCOMER)
            claim = await queue.claim(agent=NEWCOMER, types=["investigate"], timeout=5)
            assert claim is not None
            assert claim.task.id == created.id
            assert (await claim.complete({"ok": True})).status == "completed"
        async with Lock(agent, f"deploy-{unique}", NEWCOMER, ttl=5) as lease:
            assert lease.owner == NEWCOMER
        board = await Blackboard.open(agent, session_id)
        await board.append_finding(finding(), agent=NEWCOMER)
        assert len(await board.findings()) == 1
        ledger = await QueryLedger.open(agent, session_id, agent=NEWCOMER)

        async def execute() -> str:
            return "0.05"

        ran = await ledger.run("prometheus", f"rate(errors_{unique}[5m])", execute)
        assert not ran.reused
        consensus = await Consensus.open(agent, via_service=True)
        pid = f"p-{unique}"
        await consensus.propose(
            Proposal(proposal_id=pid, action="rollback", voters=[NEWCOMER]),
            agent=NEWCOMER,
            session=session_id,
        )
        await consensus.vote(Vote(proposal_id=pid, vote="yes", reason="5xx"), agent=NEWCOMER)
        decision = await consensus.wait_for_decision(pid, timeout=10)
    assert decision.outcome == "approved"
    assert violations(server, log_start) == []


@pytest.mark.slow
async def test_revocation_pushed_to_one_node_reaches_the_whole_cluster(tmp_path: Path) -> None:
    """Full resolvers in a cluster share account updates over the system account."""
    store = CredsStore(tmp_path / "creds")
    store.init()
    store.add(NEWCOMER)
    kept = tmp_path / "kept.creds"
    shutil.copy(store.users()[NEWCOMER].creds_file, kept)
    route_ports = [free_port() for _ in range(3)]
    routes = ", ".join(f"nats://127.0.0.1:{port}" for port in route_ports)
    cluster = NatsCluster(tmp_path / "unused", size=0)
    for i, port in enumerate(route_ports):
        node = tmp_path / f"n{i}"
        node.mkdir()
        # the same creds, each node its own resolver directory
        own_dir = str(store.server_config.read_text()).replace(
            str((store.root / "jwt").resolve()), str(node / "jwt")
        )
        (node / "server.conf").write_text(own_dir)
        (node / "node.conf").write_text(
            f'include "server.conf"\njetstream {{}}\n'
            f"cluster {{ name: c, listen: 127.0.0.1:{port}, routes: [{routes}] }}\n"
        )
        cluster.nodes.append(
            NatsServer(node / "data", name=f"n{i}", config_file=node / "node.conf")
        )
    with cluster:
        watchers = [Watcher(node, kept) for node in cluster.nodes]
        async with contextlib.AsyncExitStack() as stack:
            for watcher in watchers:
                await stack.enter_async_context(watcher.connected())
            store.revoke(NEWCOMER)
            await anyio.to_thread.run_sync(
                main, ["creds", "--dir", str(store.root), "push", "--url", cluster.nodes[0].url]
            )
            with anyio.fail_after(10):
                for watcher in watchers:
                    await watcher.closed.wait()
        for node in cluster.nodes:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(
                    node.url, user_credentials=str(kept), allow_reconnect=False, connect_timeout=2
                )
