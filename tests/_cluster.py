"""The 3-node cluster from deploy/nats/, on free 127.0.0.1 ports (shared by tests)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from swarmbus import NatsCluster

NATS_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nats"
PASSWORD_VAR = re.compile(r"\$(NATS_PASSWORD_[A-Z_]+)")


def deploy_passwords(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fresh passwords for every ``$NATS_PASSWORD_*`` of auth.conf, in the environment
    the servers read them from."""
    names = set(PASSWORD_VAR.findall((NATS_CONF / "auth.conf").read_text()))
    values = {name: secrets.token_hex(12) for name in sorted(names)}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@contextmanager
def deploy_cluster(base_dir: Path) -> Iterator[NatsCluster]:
    """deploy/nats/nats-{1,2,3}.conf with ports and store dirs rewritten (the passwords
    must be in the environment)."""
    cluster = NatsCluster(
        base_dir,
        config_files=[NATS_CONF / f"nats-{i}.conf" for i in (1, 2, 3)],
        extra_args=["--http_port", "-1"],
    )
    with cluster:
        yield cluster
