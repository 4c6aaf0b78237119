"""Take a lock on a state store, say so, and hang until killed (tests/test_backends.py).

python -m tests._store_holder <backend> <nats url> <store url> <bucket> <key>
"""

from __future__ import annotations

import sys

import anyio

from swarmbus import Bus
from swarmbus._backends import open_store


async def main(backend: str, nats_url: str, url: str, bucket: str, key: str) -> None:
    options = {"redis": {"redis_url": url}, "postgres": {"database_url": url}}.get(backend, {})
    async with Bus.open(url=nats_url, backend=backend, **options) as bus:
        store = await open_store(bus, bucket, history=1, limit_marker_ttl=60)
        token = await store.create(key, b"holder", ttl=1)
        print(f"held {token}", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:6])
