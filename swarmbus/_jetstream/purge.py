"""Purging KV keys by pattern: one stream purge, no per-key delete markers.

For retention (a blackboard's completed sessions): ``NatsStore.delete`` leaves a
marker per key; a purge of the bucket's stream by subject removes every entry of
every matching key at once.
"""

from __future__ import annotations

from swarmbus._jetstream.errors import nats_errors
from swarmbus._jetstream.store import NatsStore

__all__ = ["purge_keys"]


async def purge_keys(store: NatsStore, keys: str) -> None:
    """Remove every entry of the keys matching ``keys`` (e.g. ``"INC-1.>"``)."""
    kv = store.kv
    subject = f"{kv._pre}{keys}"
    with nats_errors(f"cannot purge {subject}"):
        await kv._js.purge_stream(kv._stream, subject=subject)
