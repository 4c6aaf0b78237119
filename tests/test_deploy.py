"""The deploy files: docker-compose.yml validates and mounts only files that exist, and
the 3-node cluster from deploy/nats/ runs swarmbus with replicas 3."""

from __future__ import annotations

import itertools
import json
import re
import secrets
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
import yaml

from swarmbus import Agent, Bus, Finding, FindingMessage, NatsCluster, NatsServer
from swarmbus._server import free_port
from tests._cluster import deploy_cluster as start_deploy_cluster
from tests._cluster import deploy_nodes, route_url

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NATS_CONF = DEPLOY / "nats"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
PASSWORD_VAR = re.compile(r"\$(NATS_PASSWORD_[A-Z_]+)")
ROUTE_URL_VAR = re.compile(r"\$(NATS_ROUTE_URL_\d)")
INCLUDE = re.compile(r'^\s*include\s+"?([^"\s]+)"?', re.MULTILINE)
SERVICE = "swarmbus/consensus"
AGENT = "ops/deploy-validator"


def env_example() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key: value for key, value in pairs}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def with_includes(conf: Path) -> list[Path]:
    """``conf`` and every file it includes, recursively (includes are relative)."""
    found = [conf]
    for name in INCLUDE.findall(conf.read_text()):
        found += with_includes(conf.parent / name)
    return found


def test_compose_config_validates(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package)")
    ok = subprocess.run(
        [binary, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)
    assert {"nats-1", "nats-2", "nats-3", "consensus", "demo", "otel-collector", "jaeger"} <= set(
        resolved["services"]
    )
    assert resolved["services"]["consensus"]["environment"]["SWARMBUS_REPLICAS"] == "3"
    # without passwords compose refuses to start anything
    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = subprocess.run(
        [binary, "-f", str(COMPOSE), "--env-file", str(empty), "config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0
    assert "deploy/.env.example" in missing.stderr


def test_every_mounted_file_exists() -> None:
    services = compose()["services"]
    checked = []
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                path = ROOT / source
                assert path.exists(), f"{name} mounts missing {source}"
                checked.append((path, target))
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
        command = service.get("command", [])
        for flag, value in itertools.pairwise(command):
            if flag == "-c" or value.startswith("--config="):
                path_in_container = value.removeprefix("--config=") if flag != "-c" else value
                host = [
                    src / Path(path_in_container).relative_to(dst) if src.is_dir() else src
                    for src, dst in ((p, Path(t)) for p, t in checked)
                    if Path(path_in_container).is_relative_to(dst)
                ]
                assert host, f"{name} reads {path_in_container}, which is not mounted"
                for conf in with_includes(host[0]):
                    assert conf.is_file(), f"{name}: {conf} is missing"
    assert len(checked) >= 4


def test_every_password_is_supplied() -> None:
    confs = ("auth.conf", "cluster.conf")
    wanted = set(PASSWORD_VAR.findall("".join((NATS_CONF / c).read_text() for c in confs)))
    assert "NATS_PASSWORD_ROUTE" in wanted
    assert wanted == set(env_example())
    routes = set(ROUTE_URL_VAR.findall((NATS_CONF / "cluster.conf").read_text()))
    assert routes == {"NATS_ROUTE_URL_1", "NATS_ROUTE_URL_2", "NATS_ROUTE_URL_3"}
    for node in ("nats-1", "nats-2", "nats-3"):
        environment = compose()["services"][node]["environment"]
        assert set(environment) == wanted | routes
        for name in routes:  # every route URL carries the route credentials
            assert environment[name].startswith("nats://route:${NATS_PASSWORD_ROUTE}@nats-")


def test_only_the_service_account_has_the_jetstream_admin_api() -> None:
    users = re.split(r"\n\s*\{\s*\n\s*user:", (NATS_CONF / "auth.conf").read_text())[1:]
    by_user = {block.split('"')[1]: block for block in users}
    assert set(by_user) == {AGENT, "security/incident-response-lead", "demo", SERVICE, "observer"}
    for user, block in by_user.items():
        assert ('"$JS.API.>"' in block) == (user == SERVICE), user
        publish = block.split("subscribe")[0]
        if user == SERVICE:  # `swarmbus up` acts for the agent each API subject names
            assert '"agent.>"' in publish
        elif "/" in user:
            assert '"agent.>"' not in publish
            assert f'"agent.*.*.*.{user}"' in block
        if "/" in user:
            assert f'"swarmbus.request.*.*.*.{user}"' in block
            assert f'"_INBOX_{user.replace("/", "_")}.>"' in block
    assert '"agent.' not in by_user["observer"].split("subscribe")[0]


def test_durable_fsync_everywhere() -> None:
    for conf in ("single.conf", "nats-1.conf", "nats-2.conf", "nats-3.conf"):
        text = "".join(path.read_text() for path in with_includes(NATS_CONF / conf))
        assert re.search(r"^\s*sync_interval:\s*always\s*$", text, re.MULTILINE), conf
        assert not re.search(r"^\s*persist_mode", text, re.MULTILINE), conf


# --- the cluster from the deploy configs, on 127.0.0.1 ----------------------------


@pytest.fixture
def passwords(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fresh passwords in the environment the deploy configs read them from."""
    values = {name: secrets.token_hex(12) for name in env_example()}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def deploy_cluster(tmp_path: Path, passwords: dict[str, str]) -> Iterator[NatsCluster]:
    """deploy/nats/nats-{1,2,3}.conf with ports and store dirs rewritten."""
    with start_deploy_cluster(tmp_path / "cluster") as cluster:
        yield cluster


def monitor(node: NatsServer, path: str) -> Any:
    line = node.wait_for_log("Starting http monitor on")
    with urllib.request.urlopen(f"http://{line.rsplit(' ', 1)[1]}{path}", timeout=5) as r:
        return json.load(r)


@pytest.mark.slow
async def test_cluster_from_deploy_configs_runs_swarmbus_with_replicas_3(
    deploy_cluster: NatsCluster, passwords: dict[str, str], session_id: str, unique: str
) -> None:
    for node in deploy_cluster.nodes:
        jetstream = (await anyio.to_thread.run_sync(monitor, node, "/varz"))["jetstream"]
        assert jetstream["config"]["sync_always"] is True
    url = ",".join(deploy_cluster.urls)
    async with Bus.open(
        url=url,
        user=SERVICE,
        password=passwords["NATS_PASSWORD_CONSENSUS"],
        inbox_prefix="_INBOX_swarmbus_consensus",
        replicas=3,
    ) as service:
        for stream in ("SWARMBUS_EVENTS", "SWARMBUS_DEAD"):
            info = await service.js.stream_info(stream)
            assert info.config.num_replicas == 3
            assert info.cluster is not None
            assert len(info.cluster.replicas or []) == 2
        kv = await service.key_value(f"B{unique}")
        assert (await kv.status()).stream_info.config.num_replicas == 3

        agent = Agent(AGENT)
        seen = anyio.Event()

        @agent.on_finding(session=session_id)
        async def on_finding(message: FindingMessage) -> None:
            if message.source.agent == SERVICE:
                seen.set()

        async with (
            Bus.open(
                url=url,
                user=AGENT,
                password=passwords["NATS_PASSWORD_DEPLOY_VALIDATOR"],
                inbox_prefix="_INBOX_ops_deploy-validator",
                replicas=3,
            ) as agent_bus,
            agent.serve(agent_bus),
        ):
            finding = Finding(category="observation", content="5xx up", confidence=0.8)
            await service.publish(finding, agent=SERVICE, session=session_id)
            await agent.publish(finding, session=session_id)
            with anyio.fail_after(10):
                await seen.wait()
        last = await service.js.get_last_msg(
            "SWARMBUS_EVENTS", f"agent.finding.reported.{session_id}.{AGENT}"
        )
        assert service.accept(last.subject, last.data).source.agent == AGENT


def route_connect(port: int, password: str | None) -> bytes:
    """Connect to a route port as a server would (CONNECT, PING); the first reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"INFO ")
        connect: dict[str, Any] = {"verbose": False, "name": "intruder", "cluster": "swarmbus"}
        if password is not None:
            connect |= {"user": "route", "pass": password}
        sock.sendall(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        return stream.readline()


@pytest.mark.slow
def test_cluster_routes_refuse_unauthenticated_servers(
    tmp_path: Path, passwords: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempt 10: the deploy cluster forms over authenticated routes, and a server
    without the route password cannot join it."""
    cluster, route_ports = deploy_nodes(tmp_path / "cluster", monkeypatch)
    with cluster:  # started: the three nodes elected a JetStream meta leader
        for port in route_ports:
            assert route_connect(port, None) == b"-ERR 'Authorization Violation'\r\n"
            assert route_connect(port, "wrong") == b"-ERR 'Authorization Violation'\r\n"
        assert route_connect(route_ports[0], passwords["NATS_PASSWORD_ROUTE"]) == b"PONG\r\n"
        # a whole nats-server routed to node 1 without credentials is refused
        node = cluster.nodes[0]
        mark = len(node.log)
        intruder = NatsServer(
            tmp_path / "intruder",
            name="intruder",
            cluster=("swarmbus", free_port(), [route_url(route_ports[0], None)]),
        )
        with intruder:
            node.wait_for_log("authentication error", timeout=10, after=mark)
            remote = intruder.wait_for_log("Authorization Violation", timeout=10)
        assert "route" in remote.lower()
        assert not any("intruder" in line for line in node.log[mark:])


# --- the single server from deploy/nats/single.conf: quotas and JetStream grants -------

INTAKE = "consensus-SWARMBUS_CONSENSUS__-f1d71ec8"  # `swarmbus consensus`' durable
INBOXES = {SERVICE: "_INBOX_swarmbus_consensus", AGENT: "_INBOX_ops_deploy-validator"}
PASSWORD_OF = {SERVICE: "NATS_PASSWORD_CONSENSUS", AGENT: "NATS_PASSWORD_DEPLOY_VALIDATOR"}


@pytest.fixture
def deploy_single(tmp_path: Path, passwords: dict[str, str]) -> Iterator[NatsServer]:
    server = NatsServer(
        tmp_path / "single", config_file=NATS_CONF / "single.conf", extra_args=["--http_port", "-1"]
    )
    with server:
        yield server


def deploy_user(server: NatsServer, passwords: dict[str, str], user: str) -> Any:
    return Bus.open(
        url=server.url,
        user=user,
        password=passwords[PASSWORD_OF[user]],
        inbox_prefix=INBOXES[user],
    )


async def test_account_quotas_apply_to_every_user(
    deploy_single: NatsServer, passwords: dict[str, str]
) -> None:
    """Attempt 9: the SWARMBUS account's JetStream and connection limits."""
    async with deploy_user(deploy_single, passwords, SERVICE) as service:
        limits = (await service.js.account_info()).limits
    assert (limits.max_memory, limits.max_storage) == (1024**3, 20 * 1024**3)
    assert (limits.max_streams, limits.max_consumers) == (64, 20000)


async def test_agent_cannot_pull_ack_or_reconfigure_the_consensus_intake(
    deploy_single: NatsServer, passwords: dict[str, str], session_id: str
) -> None:
    """Attempt 7 (password config): the consensus service's intake consumer and named
    consumer creates (which update an existing consumer) are refused to agents."""
    from swarmbus import ConsensusService

    async with (
        deploy_user(deploy_single, passwords, SERVICE) as service,
        ConsensusService(service, board_bucket=None),
    ):
        info = await service.js.consumer_info("SWARMBUS_EVENTS", INTAKE)
        assert info.name == INTAKE  # the name auth.conf denies is the service's
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        agent = await nats.connect(
            deploy_single.url,
            user=AGENT,
            password=passwords[PASSWORD_OF[AGENT]],
            inbox_prefix=INBOXES[AGENT],
            error_cb=on_error,
        )
        # the ephemeral create with the intake's name in its body updates the intake
        hijack = {k: v for k, v in info.config.as_dict().items() if k != "durable_name"}
        hijack |= {"ack_wait": 3600 * 10**9, "filter_subjects": ["agent.nothing.>"]}
        try:
            for subject in (
                f"$JS.API.CONSUMER.MSG.NEXT.SWARMBUS_EVENTS.{INTAKE}",
                f"$JS.API.CONSUMER.DURABLE.CREATE.SWARMBUS_EVENTS.{INTAKE}",
                f"$JS.ACK.SWARMBUS_EVENTS.{INTAKE}.1.1.1.1.0",
                f"$JS.API.CONSUMER.CREATE.SWARMBUS_EVENTS.{INTAKE}",
                "$JS.API.CONSUMER.CREATE.SWARMBUS_TASKS.q.swarmbus.task.>",
                "$JS.API.CONSUMER.CREATE.SWARMBUS_EVENTS",
                "$JS.API.CONSUMER.CREATE.SWARMBUS_TASKS",
            ):
                refusal = f'permissions violation for publish to "{subject.lower()}"'
                payload = {"stream_name": subject.split(".")[4], "config": hijack}
                await agent.publish(subject, json.dumps(payload).encode())
                with anyio.fail_after(5):
                    while not any(refusal in error for error in errors):
                        await agent.flush()
        finally:
            await agent.close()
        after = await service.js.consumer_info("SWARMBUS_EVENTS", INTAKE)
        assert after.config == info.config
