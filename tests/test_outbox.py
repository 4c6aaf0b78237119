"""Background-confirmed publishes: re-sent until the stream has them, stored once."""

from __future__ import annotations

import logging

import anyio
import nats.aio.msg
import nats.errors
import pytest
from nats.js.api import StreamConfig

import swarmbus._jetstream.outbox
from swarmbus import Bus, Finding, NatsServer
from swarmbus._bus import EVENTS_STREAM
from swarmbus._jetstream.outbox import Outbox


async def test_unacknowledged_publish_is_resent_until_stored_once(bus: Bus, unique: str) -> None:
    outbox = Outbox(bus.nc, resend_after=0.2)
    subject = f"obx.{unique}.event"
    try:
        # No stream stores the subject yet: the server answers "no responders".
        await outbox.send(subject, b"payload", {"Nats-Msg-Id": f"m-{unique}"})
        assert outbox.pending == 1
        assert not await outbox.flush(timeout=0.5)
        await bus.ensure_stream(StreamConfig(name=f"OBX_{unique}", subjects=[f"obx.{unique}.>"]))
        assert await outbox.flush(timeout=10)
        assert outbox.pending == 0
        info = await bus.js.stream_info(f"OBX_{unique}")
        assert info.state.messages == 1
        stored = await bus.js.get_last_msg(f"OBX_{unique}", subject)
        assert stored.data == b"payload"
    finally:
        await outbox.close(timeout=1)
        await bus.js.delete_stream(f"OBX_{unique}")


async def test_bus_close_waits_for_background_publishes(nats_url: str, unique: str) -> None:
    async with Bus.open(url=nats_url) as bus:
        sent = [
            await bus.publish(
                Finding(category="observation", content=str(i), confidence=0.5),
                agent="test/outbox",
                session=f"S-{unique}",
                wait=False,
            )
            for i in range(200)
        ]
    async with Bus.open(url=nats_url) as reader:
        stored = await reader.js.get_last_msg(
            "SWARMBUS_EVENTS", f"agent.finding.reported.S-{unique}.test/outbox"
        )
        assert stored.headers is not None
        assert stored.headers["Nats-Msg-Id"] == sent[-1].id
        info = await reader.js.stream_info(
            "SWARMBUS_EVENTS", subjects_filter=f"agent.finding.reported.S-{unique}.>"
        )
        assert info.state.subjects is not None
        assert sum(info.state.subjects.values()) == 200


async def test_a_send_the_connection_refuses_is_raised_and_not_kept(bus: Bus, unique: str) -> None:
    outbox = Outbox(bus.nc)
    try:
        with pytest.raises(nats.errors.MaxPayloadError):
            await outbox.send(f"obx.{unique}.big", b"x" * (bus.nc.max_payload + 1), {})
        assert outbox.pending == 0  # not re-sent later behind the caller's back
        assert await outbox.flush(timeout=1)
    finally:
        await outbox.close(timeout=1)


async def test_close_wakes_a_send_waiting_for_room(
    bus: Bus, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(swarmbus._jetstream.outbox, "MAX_PENDING", 2)
    outbox = Outbox(bus.nc)
    subject = f"obx.{unique}.unstored"  # never acknowledged: no stream stores it
    for i in range(2):
        await outbox.send(subject, b"x", {"Nats-Msg-Id": f"m{i}-{unique}"})
    async with anyio.create_task_group() as tg:
        failed = anyio.Event()

        async def third() -> None:
            with pytest.raises(nats.errors.ConnectionClosedError):
                await outbox.send(subject, b"x", {"Nats-Msg-Id": f"m2-{unique}"})
            failed.set()

        tg.start_soon(third)
        await anyio.wait_all_tasks_blocked()
        await outbox.close(timeout=0.1)
        with anyio.fail_after(5):
            await failed.wait()


async def test_bus_close_after_its_connection_closed_reports_what_is_lost(
    nats_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await Bus.connect(url=nats_url)
    await bus.outbox.send(f"obx.{unique}.unstored", b"x", {"Nats-Msg-Id": f"m-{unique}"})
    resend = bus.outbox._task
    assert resend is not None
    await bus.nc.close()  # as after a fatal server error (e.g. an authorization violation)
    with caplog.at_level(logging.ERROR, logger="swarmbus.outbox"):
        await bus.close()
    assert "closing with 1 events unacknowledged" in caplog.text
    assert resend.done()  # no re-send loop left running


async def test_bus_close_waits_out_an_outage_as_long_as_retry_for(
    fresh_server: NatsServer, unique: str
) -> None:
    """Closing rides through what a waited-for publish rides through (a leader election)."""
    session = f"S-{unique}"
    async with Bus.open(url=fresh_server.url, request_timeout=0.2, retry_for=10) as bus:
        bus.outbox.resend_after = 0.2
        await bus.js.delete_stream(EVENTS_STREAM)  # no stream answers: an election, briefly
        sent = await bus.publish(
            Finding(category="observation", content="x", confidence=0.5),
            agent="test/outbox",
            session=session,
            wait=False,
        )

        async def stream_back() -> None:
            await anyio.sleep(1.0)  # the outage outlasts request_timeout
            async with Bus.open(url=fresh_server.url):  # provisions the stream again
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream_back)
            await bus.close()
    async with Bus.open(url=fresh_server.url) as reader:
        stored = await reader.js.get_last_msg(
            EVENTS_STREAM, f"agent.finding.reported.{session}.test/outbox"
        )
        assert stored.headers is not None
        assert stored.headers["Nats-Msg-Id"] == sent.id


async def test_a_temporarily_unavailable_ack_is_retried_not_dropped(bus: Bus, unique: str) -> None:
    # A stand-in for a stream during an election: it answers the first publish with
    # JetStream's 503 error ack and stores (acks) the re-send.
    subject = f"obx.{unique}.busy"
    received = 0

    async def answer(msg: nats.aio.msg.Msg) -> None:
        nonlocal received
        received += 1
        if received == 1:
            await msg.respond(
                b'{"error":{"code":503,"err_code":10008,'
                b'"description":"JetStream system temporarily unavailable"}}'
            )
        else:
            await msg.respond(b'{"stream":"X","seq":1}')

    sub = await bus.nc.subscribe(subject, cb=answer)
    outbox = Outbox(bus.nc, resend_after=0.2)
    try:
        await outbox.send(subject, b"payload", {"Nats-Msg-Id": f"m-{unique}"})
        assert await outbox.flush(timeout=10)
        assert received == 2
    finally:
        await outbox.close(timeout=1)
        await sub.unsubscribe()
