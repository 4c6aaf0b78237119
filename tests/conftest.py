"""Fixtures: a real nats-server per session (per xdist worker), fresh clusters for faults."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from swarmbus import Bus, NatsCluster, NatsServer
from tests._stores import PostgresServer, RedisServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream server on a random 127.0.0.1 port, shared by the session's tests."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    """A connected bus with the swarmbus streams provisioned."""
    async with Bus.open(url=nats_url) as bus:
        yield bus


@pytest.fixture
def unique() -> str:
    """A short unique token for session ids, agent ids, bucket and stream names."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def session_id(unique: str) -> str:
    return f"S-{unique}"


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A fresh 3-node JetStream cluster that a fault test may break."""
    with NatsCluster(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own (for restarts and kills)."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server on a random 127.0.0.1 port (started only if a test asks)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster on a random 127.0.0.1 port (started only if a test asks)."""
    with PostgresServer() as server:
        yield server
