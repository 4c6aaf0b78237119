"""The request hot path's use of nats-py (``swarmbus._jetstream.hotpath``, issue 18).

Messages taken in the connection's read loop must never end that loop (it is the
connection's only reader), work left for later runs in the subscription's task in
arrival order, and nats-py's pending counts stay right. ``publish_nowait`` sends what
``Client.publish`` would, and declines what it cannot send so the caller falls back.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable

import anyio
import anyio.lowlevel
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from swarmbus._jetstream.hotpath import InlineDelivery, Later, publish_nowait

WAIT = 5


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def test_a_take_that_raises_drops_that_message_and_the_connection_reads_on(
    nc: NatsClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    taken: list[bytes] = []
    got_last = anyio.Event()

    def take(msg: Msg) -> Later | None:
        if msg.data == b"boom":
            raise RuntimeError("a bug in take")
        taken.append(msg.data)
        if msg.data == b"last":
            got_last.set()
        return None

    subject = f"hot.{unique}"
    sub = await InlineDelivery(take).subscribe(nc, subject)
    await nc.flush()
    with caplog.at_level(logging.ERROR, logger="swarmbus"):
        for data in (b"first", b"boom", b"last"):
            await nc.publish(subject, data)
        with anyio.fail_after(WAIT):
            await got_last.wait()
    assert taken == [b"first", b"last"]
    assert nc.is_connected
    assert "a bug in take" in caplog.text
    # Nothing was left counted as queued (nats-py would call the subscription slow).
    assert sub.pending_bytes == 0
    assert sub.pending_msgs == 0


async def test_work_left_by_take_runs_later_in_arrival_order(nc: NatsClient, unique: str) -> None:
    order: list[str] = []
    done = anyio.Event()

    async def later(data: bytes) -> None:
        await anyio.lowlevel.checkpoint()  # awaiting work, in the subscription's task
        order.append(f"later {data.decode()}")
        if data == b"9":
            done.set()

    def take(msg: Msg) -> Later | None:
        if int(msg.data) % 3 == 0:
            data = msg.data

            def work() -> Awaitable[None]:
                return later(data)

            return work
        order.append(f"taken {msg.data.decode()}")
        return None

    subject = f"hot.{unique}"
    sub = await InlineDelivery(take).subscribe(nc, subject)
    await nc.flush()
    for i in range(10):
        await nc.publish(subject, str(i).encode())
    with anyio.fail_after(WAIT):
        await done.wait()
    assert [o for o in order if o.startswith("later")] == [f"later {i}" for i in (0, 3, 6, 9)]
    assert sorted(o for o in order if o.startswith("taken")) == sorted(
        f"taken {i}" for i in range(10) if i % 3
    )
    assert sub.pending_bytes == 0
    assert sub.pending_msgs == 0


async def test_publish_nowait_sends_what_publish_would(nc: NatsClient, unique: str) -> None:
    got: list[tuple[str, bytes, str]] = []
    arrived = anyio.Event()

    async def on_msg(msg: Msg) -> None:
        got.append((msg.subject, msg.data, msg.reply))
        if len(got) == 2:
            arrived.set()

    await nc.subscribe(f"hot.{unique}.>", cb=on_msg)
    await nc.flush()
    assert publish_nowait(nc, f"hot.{unique}.a", b"one", f"reply.{unique}")
    assert publish_nowait(nc, f"hot.{unique}.b", b"")
    with anyio.fail_after(WAIT):
        await arrived.wait()
    assert got == [(f"hot.{unique}.a", b"one", f"reply.{unique}"), (f"hot.{unique}.b", b"", "")]
    assert nc.stats["out_msgs"] >= 2


async def test_publish_nowait_declines_what_publish_must_handle(nats_url: str, unique: str) -> None:
    """Too large for the server, or no live connection: False, nothing queued, so the
    caller's ``Client.publish`` raises (or buffers across a reconnect)."""
    nc = await nats.connect(nats_url)
    try:
        pending = nc._pending_data_size
        assert not publish_nowait(nc, f"hot.{unique}", b"x" * (nc.max_payload + 1))
        assert nc._pending_data_size == pending
    finally:
        await nc.close()
    assert not publish_nowait(nc, f"hot.{unique}", b"late")
    with pytest.raises(nats.errors.ConnectionClosedError):
        await nc.publish(f"hot.{unique}", b"late")
