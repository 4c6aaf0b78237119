"""Locks: a lease per resource with a server-side TTL, owner-only release, fencing tokens."""

import secrets
import threading

import anyio

import swarmbus
from swarmbus import Lock, LockLostError, lock_holder

RESOURCE = f"file:/src/main-{secrets.token_hex(3)}.py"


class StaleLockError(Exception):
    def __init__(self, token: int, highest: int) -> None:
        super().__init__(f"fencing token {token} is older than {highest}")


class FencedFile:
    """A protected resource: it keeps the highest token it accepted and refuses lower ones."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.highest_token = 0
        self.data = b""

    def write(self, data: bytes, token: int) -> None:
        with self._mutex:  # or one SQL statement / a CAS in the store
            if token < self.highest_token:
                raise StaleLockError(token, self.highest_token)
            self.highest_token = token
            self._store(data)

    def _store(self, data: bytes) -> None:
        self.data = data


async def main() -> None:
    resource = FencedFile()
    async with swarmbus.connect() as bus:
        lock = Lock(bus, RESOURCE, "ops/release-manager", ttl=30, timeout=10)
        async with lock as lease:  # LockTimeoutError if not acquired in 10 s
            resource.write(b"v1", token=lease.token)
            await lock.refresh()  # extend the TTL during long work (same token)
            print("held by", (await lock_holder(bus, RESOURCE)).owner)

            other = Lock(bus, RESOURCE, "ops/deploy-validator")
            print("other acquire while held:", await other.acquire())  # one try: None

        lease = await other.acquire(timeout=10)  # wait up to 10 s for a release or an expiry
        assert lease is not None
        print("tokens increase:", lease.token > resource.highest_token)
        resource.write(b"v2", token=lease.token)
        try:
            resource.write(b"late", token=lease.token - 1)  # a stalled former holder
        except StaleLockError as exc:
            print("refused:", exc)
        await other.release()
        try:
            await other.release()  # the lease is no longer ours
        except LockLostError:
            print("second release: LockLostError")
        print("holder now:", await lock_holder(bus, RESOURCE))


anyio.run(main)
