"""Provisioning: every stream, bucket and queue consumer agents use, made by the service.

Under the deploy auth configs (``deploy/nats``) agents may not create streams, buckets
or task-queue consumers (each create can also reconfigure what exists). The service
account makes them before agents need them: ``swarmbus consensus`` (the compose
service) and ``swarmbus up`` (its ``consensus`` service) run ``provisioning``.

=========================  ====================================================
what                       made
=========================  ====================================================
``SWARMBUS_EVENTS``,       at every connect (``Bus.ensure_streams``)
``SWARMBUS_DEAD``
``SWARMBUS_TASKS``,        at start, with the configs the components use when
``swarmbus-tasks``,        they open them (``TaskQueue``, ``Consensus``,
``SWARMBUS_CONSENSUS``,    ``Blackboard``, ``QueryLedger``, ``Lock``); a bucket
``SWARMBUS_BOARD``,        made by an older swarmbus is updated to refuse rollup
``SWARMBUS_QUERIES``,      headers
``SWARMBUS_LOCKS``
task-queue consumers       when a queue's first dispatch is published, again
                           after the consumer expired (idle for
                           ``task_consumer_inactive_threshold``), and for
                           queues with dispatches pending, every minute
                           (``QueueProvisioner``)
=========================  ====================================================

Buckets follow ``SWARM_BACKEND`` as their components do: on Redis or PostgreSQL every
bucket, the task records included, is on that store, and there is no task stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Final

import anyio

from swarmbus import _subjects as subjects
from swarmbus._backends import open_store
from swarmbus._blackboard import Blackboard
from swarmbus._bus import Bus
from swarmbus._consensus import Consensus
from swarmbus._jetstream.workqueue import QueueProvisioner
from swarmbus._locks import LOCKS_BUCKET
from swarmbus._query_ledger import QueryLedger
from swarmbus._runtime.api_server import RUNTIME_AGENT
from swarmbus._tasks import MAX_PRIORITY, MIN_PRIORITY, TASKS_STREAM, TaskQueue

__all__ = ["provision", "provisioning"]

SESSION: Final = "provisioning"
"""A session id to open session-scoped components with (nothing is written in it)."""


async def provision(bus: Bus) -> None:
    """Create every stream and bucket agents use (idempotent)."""
    await bus.ensure_streams()
    queue = TaskQueue(bus, SESSION)
    await queue.open()
    await queue.close()
    await Consensus.open(bus)
    await Blackboard.open(bus, SESSION)
    await QueryLedger.open(bus, SESSION, agent=RUNTIME_AGENT)
    await open_store(bus, LOCKS_BUCKET, history=1, description="swarmbus locks")


@contextlib.asynccontextmanager
async def provisioning(bus: Bus) -> AsyncIterator[None]:
    """``provision``, then create each task queue's consumer while the block runs.

    On Redis or PostgreSQL (``SWARM_BACKEND``) tasks have no stream and no consumers:
    only ``provision`` runs.
    """
    await provision(bus)
    if bus.settings.backend != "nats":
        yield
        return
    queues = QueueProvisioner(
        bus.nc,
        bus.js,
        TASKS_STREAM,
        subjects.TASK_WILDCARD,
        range(MIN_PRIORITY, MAX_PRIORITY + 1),
        inactive_threshold=bus.settings.task_consumer_inactive_threshold,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(queues.run)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
