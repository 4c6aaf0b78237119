"""Where coordination state lives: one ``StateStore`` factory for every component.

``Settings.backend`` (``SWARM_BACKEND``) picks the store behind the seam:

=========  ====================================  ==========================
backend    a bucket is                            client (one per bus)
=========  ====================================  ==========================
nats       a JetStream KV bucket (``NatsStore``)   the bus's connection
redis      keys under ``key_prefix`` (``RedisStore``)  redis-py, ``REDIS_URL``
postgres   rows of ``swarm_state`` (``PostgresStore``)  psycopg pool, ``DATABASE_URL``
=========  ====================================  ==========================

Events and requests stay on NATS whatever the backend; task dispatch is a JetStream
work queue on ``nats`` only (on Redis / PostgreSQL the task records on the store are
the whole queue: ``swarmbus._tasks.store_queue``). A component asks
``await open_store(bus, bucket, ...)``; the Redis client or PostgreSQL pool is opened on
the first such call for that bus and closed with the bus (``close_stores``). The bus
is only duck-typed here (``settings`` and ``key_value``), so this module does not
import ``_bus``.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from swarmbus._config import Settings
from swarmbus._jetstream.store import NatsStore
from swarmbus._state import StateStore

__all__ = ["StateBackend", "close_stores", "open_store", "state_backend"]


class _BusLike(Protocol):
    settings: Settings

    async def key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        ttl: float | None = None,
        max_value_size: int | None = None,
        limit_marker_ttl: float | None = None,
        description: str = "",
    ) -> Any: ...  # a nats-py KeyValue (this module does not import nats)


class StateBackend:
    """The state-store clients of one bus: a Redis client or a PostgreSQL pool."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: Any = None
        self._pool: Any = None

    async def store(self, bus: _BusLike, bucket: str, **kv_options: Any) -> StateStore:
        """The store of ``bucket``; ``kv_options`` configure a new NATS KV bucket only."""
        backend = self.settings.backend
        if backend == "redis":
            from swarmbus._redis_store import RedisStore

            if self._redis is None:
                assert self.settings.redis_url is not None  # Settings checks it
                self._redis = RedisStore.from_url(self.settings.redis_url, bucket).client
            return RedisStore(self._redis, bucket, key_prefix=self.settings.key_prefix)
        if backend == "postgres":
            from swarmbus._postgres_store import PostgresStore, open_pool

            if self._pool is None:
                assert self.settings.database_url is not None  # Settings checks it
                self._pool = await open_pool(self.settings.database_url)
            return PostgresStore(self._pool, bucket)
        return NatsStore(await bus.key_value(bucket, **kv_options))

    async def aclose(self) -> None:
        """Close the Redis client / PostgreSQL pool (the stores made here stop working)."""
        redis, self._redis = self._redis, None
        pool, self._pool = self._pool, None
        if redis is not None:
            await redis.aclose()
        if pool is not None:
            await pool.close()


_BACKENDS: weakref.WeakKeyDictionary[Any, StateBackend] = weakref.WeakKeyDictionary()


def state_backend(bus: _BusLike) -> StateBackend:
    """The bus's ``StateBackend`` (made on first use from ``bus.settings``)."""
    backend = _BACKENDS.get(bus)
    if backend is None:
        backend = _BACKENDS[bus] = StateBackend(bus.settings)
    return backend


async def open_store(bus: _BusLike, bucket: str, **kv_options: Any) -> StateStore:
    """The ``StateStore`` of ``bucket`` on the backend ``bus.settings`` configures.

    ``kv_options`` (``history``, ``ttl``, ``description``, ...) are those of
    ``Bus.key_value`` and only apply on NATS.
    """
    return await state_backend(bus).store(bus, bucket, **kv_options)


async def close_stores(bus: object) -> None:
    """Close the Redis client / PostgreSQL pool ``bus`` opened, if any (``Bus.close``)."""
    backend = _BACKENDS.pop(bus, None)
    if backend is not None:
        await backend.aclose()
