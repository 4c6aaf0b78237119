"""A network partition of the deploy cluster: one node in its own network namespace.

PITFALLS: a TCP proxy cannot partition a NATS cluster (route gossip connects the nodes
directly), so node 3 runs in its own network namespace, joined to the host by a veth
pair, and the partition blackholes the routes between the two sides. Every address is
on that veth pair, inside namespaces this test creates and deletes.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from swarmbus import Bus, Finding, NatsServer, PublishError
from swarmbus._server import find_binary, free_port

ROOT = Path(__file__).resolve().parents[1]
NATS_CONF = ROOT / "deploy" / "nats"
SERVICE = "swarmbus/consensus"
AGENT = "ops/deploy-validator"
EVENTS = "SWARMBUS_EVENTS"

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Net:
    """A network namespace and the veth pair that joins it to the host."""

    name: str
    host_ip: str
    ns_ip: str

    def cut(self) -> None:
        ip("route", "add", "blackhole", f"{self.ns_ip}/32")
        ip("route", "add", "blackhole", f"{self.host_ip}/32", netns=self.name)

    def heal(self) -> None:
        ip("route", "del", "blackhole", f"{self.ns_ip}/32")
        ip("route", "del", "blackhole", f"{self.host_ip}/32", netns=self.name)


@pytest.fixture
def netns(unique: str) -> Iterator[Net]:
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    name = f"swarmbus-{unique}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs CAP_NET_ADMIN): {made.stderr}")
    host_if, ns_if = f"sbh{unique[:8]}", f"sbn{unique[:8]}"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    net = Net(name, f"{subnet}.1", f"{subnet}.2")
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", name)
        ip("addr", "add", f"{net.host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{net.ns_ip}/30", "dev", ns_if, netns=name)
        ip("link", "set", ns_if, "up", netns=name)
        ip("link", "set", "lo", "up", netns=name)
        yield net
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def passwords(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        var: secrets.token_hex(12)
        for var in (
            "NATS_PASSWORD_DEPLOY_VALIDATOR",
            "NATS_PASSWORD_INCIDENT_LEAD",
            "NATS_PASSWORD_DEMO",
            "NATS_PASSWORD_CONSENSUS",
            "NATS_PASSWORD_OBSERVER",
            "NATS_PASSWORD_ROUTE",
        )
    }
    for var, value in values.items():
        monkeypatch.setenv(var, value)
    return values


@pytest.fixture
def split_cluster(
    tmp_path: Path, netns: Net, passwords: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[NatsServer]]:
    """deploy/nats/nats-{1,2,3}.conf: nodes 1, 2 on the host, node 3 in ``netns``."""
    in_netns = tmp_path / "nats-server-in-netns"
    in_netns.write_text(f'#!/bin/sh\nexec ip netns exec {netns.name} {find_binary()} "$@"\n')
    in_netns.chmod(0o755)
    hosts = [netns.host_ip, netns.host_ip, netns.ns_ip]
    route_ports = [free_port() for _ in hosts]
    route_auth = f"route:{passwords['NATS_PASSWORD_ROUTE']}@"
    routes = [f"nats://{route_auth}{h}:{p}" for h, p in zip(hosts, route_ports, strict=True)]
    for i, route in enumerate(routes, start=1):  # cluster.conf reads them ($NATS_ROUTE_URL_n)
        monkeypatch.setenv(f"NATS_ROUTE_URL_{i}", route)
    nodes = [
        NatsServer(
            tmp_path / f"n{i + 1}",
            host=hosts[i],
            port=free_port(),
            name=f"nats-{i + 1}",
            cluster=("swarmbus", route_ports[i], [r for j, r in enumerate(routes) if j != i]),
            config_file=NATS_CONF / f"nats-{i + 1}.conf",
            extra_args=["--http_port", "-1"],
            binary=in_netns if i == 2 else None,
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_for_log("metadata leader")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def stored_on(node: NatsServer, seq: int, timeout: float) -> None:
    """Wait until ``node`` itself stores the event stream up to ``seq`` (polls /jsz)."""
    with anyio.fail_after(timeout):
        while True:
            if await anyio.to_thread.run_sync(last_seq, node) >= seq:
                return
            await anyio.sleep(0.1)


def last_seq(node: NatsServer) -> int:
    """The event stream's last sequence as stored on ``node`` itself (monitoring /jsz)."""
    line = node.wait_for_log("Starting http monitor on")
    url = f"http://{line.rsplit(' ', 1)[1]}/jsz?streams=true"
    with urllib.request.urlopen(url, timeout=2) as reply:
        jsz: dict[str, Any] = json.load(reply)
    for account in jsz.get("account_details", []):
        for stream in account.get("stream_detail", []):
            if stream["name"] == EVENTS:
                return int(stream["state"]["last_seq"])
    return 0


MINORITY_PUBLISH = """
import sys, anyio
from swarmbus import Bus, Finding, SwarmbusError

async def main(url, password, session):
    async with Bus.open(url=url, user="ops/deploy-validator", password=password,
                        inbox_prefix="_INBOX_ops_deploy-validator", provision=False,
                        request_timeout=3) as bus:
        try:
            await bus.publish(Finding(category="observation", content="minority", confidence=1),
                              agent="ops/deploy-validator", session=session)
        except SwarmbusError as exc:
            print(f"REFUSED {type(exc).__name__}: {exc}")
        else:
            print("STORED")

anyio.run(main, *sys.argv[1:])
"""


async def test_minority_accepts_no_writes_and_cluster_converges(
    split_cluster: list[NatsServer], netns: Net, passwords: dict[str, str], session_id: str
) -> None:
    node1, node2, node3 = split_cluster
    finding = Finding(category="observation", content="before", confidence=1.0)
    async with Bus.open(
        url=f"{node1.url},{node2.url}",
        user=SERVICE,
        password=passwords["NATS_PASSWORD_CONSENSUS"],
        inbox_prefix="_INBOX_swarmbus_consensus",
        replicas=3,
        request_timeout=2,
    ) as bus:
        await bus.publish(finding, agent=SERVICE, session=session_id)
        await stored_on(node3, 1, timeout=10)

        netns.cut()
        minority = await anyio.run_process(
            [
                "ip", "netns", "exec", netns.name, sys.executable, "-c", MINORITY_PUBLISH,
                node3.url, passwords["NATS_PASSWORD_DEPLOY_VALIDATOR"], session_id,
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert minority.stdout.decode().startswith("REFUSED PublishError"), minority.stdout

        # the majority (nodes 1 and 2) keeps accepting writes, after a re-election
        # if node 3 led the stream
        with anyio.fail_after(30):
            for n in range(5):
                while True:
                    try:
                        await bus.publish(
                            finding, agent=SERVICE, session=session_id, id=f"{session_id}-{n}"
                        )
                        break
                    except PublishError:
                        continue
        info = await bus.js.stream_info(EVENTS)
        assert info.state.last_seq == 6  # 1 before the cut + 5 by the majority

        netns.heal()
        await stored_on(node3, info.state.last_seq, timeout=60)
        await bus.publish(finding, agent=SERVICE, session=session_id, id=f"{session_id}-after")
        await stored_on(node3, info.state.last_seq + 1, timeout=10)
