"""The 3-node cluster from deploy/nats/, on free 127.0.0.1 ports (shared by tests).

Each node runs a temp copy of deploy/nats with only its route listen port rewritten;
everything else (route authorization, JetStream, users) is the deploy config as it is.
No ``--cluster``/``--routes`` flags: they would replace the config's route credentials.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from swarmbus import NatsCluster, NatsServer
from swarmbus._server import free_port

NATS_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nats"
PASSWORD_VAR = re.compile(r"\$(NATS_PASSWORD_[A-Z_]+)")
ROUTE_USER = "route"
ROUTE_LISTEN = "listen: 0.0.0.0:6222"


def deploy_passwords(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fresh passwords for every ``$NATS_PASSWORD_*`` of auth.conf and cluster.conf, in
    the environment the servers read them from."""
    text = (NATS_CONF / "auth.conf").read_text() + (NATS_CONF / "cluster.conf").read_text()
    values = {name: secrets.token_hex(12) for name in sorted(set(PASSWORD_VAR.findall(text)))}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def route_url(port: int, password: str | None) -> str:
    """A route URL to a node on 127.0.0.1, with the route credentials if given."""
    auth = f"{ROUTE_USER}:{password}@" if password is not None else ""
    return f"nats://{auth}127.0.0.1:{port}"


def deploy_nodes(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[NatsCluster, list[int]]:
    """deploy/nats/nats-{1,2,3}.conf on free ports (not started) and their route ports.

    The route password must be in the environment (``deploy_passwords``); the route URLs
    (``$NATS_ROUTE_URL_<n>``) go there too, with it, as docker-compose.yml builds them.
    """
    route_ports = [free_port() for _ in range(3)]
    password = os.environ["NATS_PASSWORD_ROUTE"]
    nodes = []
    for i, port in enumerate(route_ports, start=1):
        monkeypatch.setenv(f"NATS_ROUTE_URL_{i}", route_url(port, password))
        conf = base_dir / f"n{i}" / "nats"
        shutil.copytree(NATS_CONF, conf, ignore=shutil.ignore_patterns("creds"))
        cluster_conf = conf / "cluster.conf"
        text = cluster_conf.read_text()
        assert ROUTE_LISTEN in text
        cluster_conf.write_text(text.replace(ROUTE_LISTEN, f"listen: 127.0.0.1:{port}"))
        nodes.append(
            NatsServer(
                base_dir / f"n{i}" / "data",
                name=f"nats-{i}",  # as nats-<i>.conf names it (tests find nodes by name)
                config_file=conf / f"nats-{i}.conf",
                extra_args=["--http_port", "-1"],
            )
        )
    cluster = NatsCluster(base_dir / "unused", size=0)
    cluster.nodes = nodes
    return cluster, route_ports


@contextmanager
def deploy_cluster(base_dir: Path) -> Iterator[NatsCluster]:
    """The deploy cluster, started (authenticated routes, a JetStream meta leader); the
    passwords must be in the environment (``deploy_passwords``)."""
    with pytest.MonkeyPatch.context() as mp:  # the route URLs, for restarts too
        cluster, _ = deploy_nodes(base_dir, mp)
        with cluster:
            yield cluster
