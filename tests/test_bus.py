"""Bus and agent runtime on a real nats-server: typed delivery, bad input, requests."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.js.errors
import pydantic
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import swarmbus
from swarmbus import Agent, Bus, Finding, FindingMessage, RequestMessage
from swarmbus._bus import (
    CODE_HEADER,
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    MSG_ID_HEADER,
    ORIGINAL_SUBJECT_HEADER,
)
from swarmbus._jetstream.acks import StoredPublisher
from swarmbus._jetstream.delivery import PullConsumer, PullOptions
from swarmbus._messages import envelope_for

WAIT = 10
FINDING = Finding(category="observation", content="disk 91% full", confidence=0.9)


@pytest.fixture
async def raw(nats_url: str) -> AsyncIterator[NatsClient]:
    """A plain nats-py client, as an external service in any language would use."""
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


def finding_json(session: str, agent: str, **overrides: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": f"ext-{session}-{overrides.pop('n', 0)}",
        "timestamp": "2025-01-02T10:30:00Z",
        "source": {"agent": agent, "session": session},
        "type": "finding",
        "finding": {
            "category": "observation",
            "content": "deployment v1.2.3 at 10:15 UTC",
            "confidence": 0.8,
            "evidence": [{"source": "prometheus", "query": "rate(errors[5m])", "result": "0.05"}],
        },
    }
    message.update(overrides)
    return message


async def collect(
    nc: NatsClient, subject: str
) -> tuple[anyio.abc.ObjectReceiveStream[Msg], Callable[[], Awaitable[None]]]:
    send, receive = anyio.create_memory_object_stream[Msg](100)

    async def cb(msg: Msg) -> None:
        await send.send(msg)

    sub = await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return receive, sub.unsubscribe


async def test_external_publisher_finding_reaches_typed_handler(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    received: list[FindingMessage] = []
    got = anyio.Event()
    agent = Agent(f"test/reader-{unique}")

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        received.append(message)
        got.set()

    async with agent.serve(bus):
        # An external service: plain JSON on the contract subject, JetStream publish.
        js = raw.jetstream()
        await js.publish(
            f"agent.finding.reported.{session_id}.ext/publisher",
            json.dumps(finding_json(session_id, "ext/publisher")).encode(),
        )
        with anyio.fail_after(WAIT):
            await got.wait()
    assert len(received) == 1
    assert isinstance(received[0].finding, Finding)
    assert received[0].finding.evidence[0].source == "prometheus"
    assert received[0].source.agent == "ext/publisher"


BAD_INPUTS: dict[str, tuple[Callable[[str], tuple[str, bytes]], str]] = {
    "not json": (lambda s: (f"agent.finding.reported.{s}.ext/x", b"\xff not json"), "not_json"),
    "not an envelope": (
        lambda s: (f"agent.finding.reported.{s}.ext/x", b'{"hello": "world"}'),
        "not_envelope",
    ),
    "schema invalid": (
        lambda s: (
            f"agent.finding.reported.{s}.ext/x",
            json.dumps(
                finding_json(
                    s,
                    "ext/x",
                    finding={"category": "observation", "content": "x", "confidence": 1.7},
                )
            ).encode(),
        ),
        "schema",
    ),
    "source mismatch": (
        lambda s: (
            f"agent.finding.reported.{s}.ext/x",
            json.dumps(finding_json(s, "ext/impostor")).encode(),
        ),
        "source_mismatch",
    ),
    "wrong subject": (
        lambda s: (
            f"agent.finding.reported.{s}.ext/x",
            json.dumps(
                {
                    **finding_json(s, "ext/x"),
                    "type": "vote",
                    "vote": {"proposal_id": "p", "vote": "yes"},
                }
            ).encode(),
        ),
        "wrong_subject",
    ),
    "over size": (
        lambda s: (
            f"agent.finding.reported.{s}.ext/x",
            json.dumps(finding_json(s, "ext/x", padding="x" * 5000)).encode(),
        ),
        "too_large",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
async def test_bad_input_is_reported_dead_lettered_and_worker_keeps_running(
    nats_url: str, raw: NatsClient, session_id: str, unique: str, kind: str
) -> None:
    make, code = BAD_INPUTS[kind]
    agent = Agent(f"test/guard-{unique}")
    good = anyio.Event()
    handled: list[str] = []

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        handled.append(message.id)
        good.set()

    errors, stop_errors = await collect(raw, f"agent.error.occurred.{session_id}.{agent.id}")
    js = raw.jetstream()
    async with Bus.open(url=nats_url, max_message_bytes=4096) as bus, agent.serve(bus):
        subject, data = make(session_id)
        await js.publish(subject, data)
        with anyio.fail_after(WAIT):
            error_msg = await errors.receive()
        error = swarmbus.decode(error_msg.data)
        assert isinstance(error, swarmbus.ErrorOccurredMessage)
        assert error.error_occurred.code == code
        assert error.error_occurred.subject == subject
        assert error.error_occurred.dead_letter
        assert error.error_occurred.reason

        # The dead letter once stored (the error event may arrive before the stream
        # has stored it: neither write is waited for).
        stored = await js.subscribe(
            f"swarmbus.dead.{session_id}.{agent.id}",
            stream=DEAD_LETTER_STREAM,
            ordered_consumer=True,
        )
        dead = await stored.next_msg(timeout=WAIT)
        await stored.unsubscribe()
        assert dead.data == data
        assert dead.headers is not None
        assert dead.headers[CODE_HEADER] == code
        assert dead.headers[ORIGINAL_SUBJECT_HEADER] == subject

        # The worker is still alive and handles the next good message.
        await js.publish(subject, json.dumps(finding_json(session_id, "ext/x", n=1)).encode())
        with anyio.fail_after(WAIT):
            await good.wait()
    await stop_errors()
    assert handled == [f"ext-{session_id}-1"]


async def test_handler_exception_is_reported_and_next_message_handled(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    agent = Agent(f"test/flaky-{unique}")
    seen: list[str] = []
    second = anyio.Event()

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        seen.append(message.finding.content)
        if message.finding.content == "boom":
            raise RuntimeError("handler bug")
        second.set()

    errors, stop_errors = await collect(raw, f"agent.error.occurred.{session_id}.{agent.id}")
    async with agent.serve(bus):
        for content in ("boom", "fine"):
            await bus.publish(
                Finding(category="observation", content=content, confidence=0.5),
                agent="test/publisher",
                session=session_id,
            )
        with anyio.fail_after(WAIT):
            error_msg = await errors.receive()
            await second.wait()
    await stop_errors()
    error = swarmbus.decode(error_msg.data)
    assert isinstance(error, swarmbus.ErrorOccurredMessage)
    assert error.error_occurred.code == "handler_error"
    assert "handler bug" in error.error_occurred.reason
    assert seen == ["boom", "fine"]


async def test_handler_that_cannot_reach_nats_is_retried_not_dead_lettered(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    """A transient failure (ConnectionError: a failover, an outage) redelivers the message;
    only the last delivery dead-letters it."""
    agent = Agent(f"test/offline-{unique}")
    attempts: list[int] = []
    done = anyio.Event()

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        attempts.append(len(attempts) + 1)
        if message.finding.content == "outage" and len(attempts) < 3:
            raise swarmbus.ConnectionError("KV unreachable")
        done.set()

    errors, stop_errors = await collect(raw, f"agent.error.occurred.{session_id}.{agent.id}")
    async with agent.serve(bus):
        await bus.publish(
            Finding(category="observation", content="outage", confidence=0.5),
            agent="test/publisher",
            session=session_id,
        )
        with anyio.fail_after(WAIT):
            await done.wait()
    await stop_errors()
    assert attempts == [1, 2, 3]
    with pytest.raises(anyio.WouldBlock):
        errors.receive_nowait()  # no error event, nothing dead-lettered


async def test_publish_refuses_bad_input_before_sending(bus: Bus, session_id: str) -> None:
    with pytest.raises(swarmbus.InvalidIdentifierError):
        await bus.publish(
            Finding(category="observation", content="x", confidence=0.5),
            agent="not an agent",
            session=session_id,
        )
    with pytest.raises(swarmbus.InvalidIdentifierError):
        await bus.publish(
            Finding(category="observation", content="x", confidence=0.5),
            agent="ops/a",
            session="bad.session",
        )
    with pytest.raises(swarmbus.InvalidMessageError):
        await bus.publish(
            Finding(category="observation", content="x", confidence=1.5),
            agent="ops/a",
            session=session_id,
        )


async def test_request_any_and_to_one_agent(bus: Bus, session_id: str, unique: str) -> None:
    a = Agent(f"test/a-{unique}")
    b = Agent(f"test/b-{unique}")
    asker = Agent(f"test/asker-{unique}")
    for agent in (a, b):

        def make(agent: Agent) -> Callable[[RequestMessage], Awaitable[dict[str, Any]]]:
            async def check(request: RequestMessage) -> dict[str, Any]:
                return {"by": agent.id, "echo": request.request.parameters}

            return check

        agent.on_request(f"check_{unique}")(make(agent))

    async with a.serve(bus), b.serve(bus), asker.serve(bus):
        response = await asker.request(f"check_{unique}", {"x": 1}, session=session_id)
        assert response.response.status == "success"
        assert response.response.result["by"] in {a.id, b.id}
        assert response.response.result["echo"] == {"x": 1}
        for target in (a, b):
            for _ in range(3):
                response = await asker.request(f"check_{unique}", session=session_id, to=target.id)
                assert response.response.result["by"] == target.id
                assert response.source.agent == target.id


async def test_request_no_responder_and_timeout_are_distinct(
    bus: Bus, session_id: str, unique: str
) -> None:
    slow = Agent(f"test/slow-{unique}")
    release = anyio.Event()

    @slow.on_request(f"slow_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        await release.wait()
        return {}

    with pytest.raises(swarmbus.NoResponderError):
        await bus.request(f"nobody_{unique}", agent="test/asker", session=session_id)
    async with slow.serve(bus):
        with pytest.raises(swarmbus.RequestTimeoutError):
            await bus.request(f"slow_{unique}", agent="test/asker", session=session_id, timeout=0.3)
        release.set()


async def test_request_cancelled_by_its_caller_stays_cancelled(
    bus: Bus, session_id: str, unique: str
) -> None:
    """The refusal guard of a request must not swallow or convert the caller's cancel."""
    slow = Agent(f"test/slow-{unique}")
    release = anyio.Event()

    @slow.on_request(f"slow_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        await release.wait()
        return {}

    async with slow.serve(bus):
        with anyio.move_on_after(0.3) as scope:
            await bus.request(
                f"slow_{unique}", agent="test/asker", session=session_id, timeout=WAIT
            )
        assert scope.cancelled_caught
        assert bus._refusals._waiting == {}  # the request's registration is gone
        release.set()
        # The task is not left with a pending cancellation: the next request completes.
        with anyio.fail_after(WAIT):
            response = await bus.request(f"slow_{unique}", agent="test/asker", session=session_id)
        assert response.response.status == "success"


@pytest.mark.parametrize(
    ("capability", "to"), [("bad capability", "any"), ("ok", "not an agent id!")]
)
async def test_request_with_an_invalid_route_is_refused_every_time(
    bus: Bus, session_id: str, capability: str, to: str
) -> None:
    """Route validation is cached per route; a failure must not be."""
    for _ in range(2):
        with pytest.raises(swarmbus.SwarmbusError):
            await bus.request(capability, agent="test/asker", session=session_id, to=to)


async def test_failing_request_handler_answers_failure(
    bus: Bus, session_id: str, unique: str
) -> None:
    agent = Agent(f"test/broken-{unique}")

    @agent.on_request(f"broken_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        raise ValueError("cannot do that")

    async with agent.serve(bus):
        response = await bus.request(f"broken_{unique}", agent="test/asker", session=session_id)
    assert response.response.status == "failure"
    assert "cannot do that" in response.response.result["error"]


async def test_two_instances_of_one_agent_share_the_work(
    nats_url: str, session_id: str, unique: str
) -> None:
    agent_id = f"test/worker-{unique}"
    handled: list[str] = []
    all_done = anyio.Event()
    total = 30

    def instance() -> Agent:
        agent = Agent(agent_id)

        @agent.on_finding(session=session_id)
        async def on_finding(message: FindingMessage) -> None:
            handled.append(message.id)
            if len(handled) >= total:
                all_done.set()

        return agent

    async with (
        Bus.open(url=nats_url) as bus1,
        Bus.open(url=nats_url) as bus2,
        instance().serve(bus1),
        instance().serve(bus2),
    ):
        sent = [
            (
                await bus1.publish(
                    Finding(category="observation", content=str(i), confidence=0.5),
                    agent="test/publisher",
                    session=session_id,
                )
            ).id
            for i in range(total)
        ]
        with anyio.fail_after(WAIT):
            await all_done.wait()
    assert sorted(handled) == sorted(sent)


async def test_concurrency_limit_holds(bus: Bus, session_id: str, unique: str) -> None:
    agent = Agent(f"test/limited-{unique}", max_concurrency=2)
    release = anyio.Event()
    started = 0
    two_started = anyio.Event()
    done: list[str] = []

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        nonlocal started
        started += 1
        if started == 2:
            two_started.set()
        await release.wait()
        done.append(message.id)

    async with agent.serve(bus):
        for i in range(6):
            await bus.publish(
                Finding(category="observation", content=str(i), confidence=0.5),
                agent="test/publisher",
                session=session_id,
            )
        with anyio.fail_after(WAIT):
            await two_started.wait()
        # The consumer holds a slot before it fetches: with both slots busy nothing
        # more has been delivered, so the server still has 4 undelivered messages.
        durable = next(
            c.name
            for c in await bus.js.consumers_info("SWARMBUS_EVENTS")
            if c.name.startswith(swarmbus._subjects.safe_token(agent.id))
        )
        info = await bus.js.consumer_info("SWARMBUS_EVENTS", durable)
        assert info.num_ack_pending == 2
        assert info.num_pending == 4
        assert started == 2
        release.set()
        with anyio.fail_after(WAIT):
            while len(done) < 6:
                await anyio.wait_all_tasks_blocked()
    assert len(done) == 6


async def test_drain_lets_in_flight_handler_finish_and_acks(
    bus: Bus, session_id: str, unique: str
) -> None:
    agent = Agent(f"test/drainer-{unique}")
    entered = anyio.Event()
    release = anyio.Event()
    finished: list[str] = []

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        entered.set()
        await release.wait()
        finished.append(message.id)

    async with anyio.create_task_group() as tg:
        stopped = anyio.Event()

        async def serve() -> None:
            async with agent.serve(bus):
                await stopped.wait()

        tg.start_soon(serve)
        with anyio.fail_after(WAIT):
            while agent._bus is None:
                await anyio.wait_all_tasks_blocked()
        sent = await bus.publish(
            Finding(category="observation", content="slow", confidence=0.5),
            agent="test/publisher",
            session=session_id,
        )
        with anyio.fail_after(WAIT):
            await entered.wait()
        stopped.set()  # begin draining while the handler is in flight
        release.set()
    assert finished == [sent.id]
    durable = swarmbus._subjects.safe_token(agent.id)
    info = await bus.js.consumer_info("SWARMBUS_EVENTS", durable)
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0


async def test_draining_agent_takes_no_new_message_once_a_slot_frees(
    bus: Bus, session_id: str, unique: str
) -> None:
    agent = Agent(f"test/drainer2-{unique}", max_concurrency=1)
    entered = anyio.Event()
    release = anyio.Event()
    handled: list[str] = []

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        handled.append(message.id)
        entered.set()
        await release.wait()

    def finding(content: str) -> Finding:
        return Finding(category="observation", content=content, confidence=0.5)

    async with anyio.create_task_group() as tg:
        stopped = anyio.Event()

        async def serve() -> None:
            async with agent.serve(bus):
                await stopped.wait()

        tg.start_soon(serve)
        with anyio.fail_after(WAIT):
            while agent._bus is None:
                await anyio.wait_all_tasks_blocked()
        first = await bus.publish(finding("first"), agent="test/publisher", session=session_id)
        with anyio.fail_after(WAIT):
            await entered.wait()
        # The only slot is busy: the second message waits on the server.
        await bus.publish(finding("second"), agent="test/publisher", session=session_id)
        stopped.set()  # begin draining...
        await anyio.wait_all_tasks_blocked()
        release.set()  # ...then free the slot: the consumer must not take the second
    assert handled == [first.id]
    durable = swarmbus._subjects.safe_token(agent.id)
    info = await bus.js.consumer_info("SWARMBUS_EVENTS", durable)
    # The second is left for the next instance (the first's ack may still be in flight:
    # acks are not confirmed, so num_ack_pending can still count it).
    assert info.num_pending == 1


async def test_blocked_request_handlers_do_not_hold_up_the_others(
    bus: Bus, session_id: str, unique: str
) -> None:
    """One drain task serves a burst of requests (swarmbus._request_server), but a
    handler that blocks never holds up the next request while a slot is free; and the
    parked drain leaves with ``serve``, without waiting for ``drain_timeout``."""
    agent = Agent(f"test/blocking-{unique}", max_concurrency=3)
    release = anyio.Event()
    blocked = 0
    two_blocked = anyio.Event()

    @agent.on_request(f"work_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        nonlocal blocked
        if request.request.parameters.get("block"):
            blocked += 1
            if blocked == 2:
                two_blocked.set()
            await release.wait()
        return {"n": request.request.parameters["n"]}

    async def ask(n: int, block: bool, answers: list[int]) -> None:
        params = {"n": n, "block": block}
        answer = await bus.request(f"work_{unique}", params, agent="test/asker", session=session_id)
        answers.append(answer.response.result["n"])

    answers: list[int] = []
    with anyio.fail_after(WAIT):
        async with agent.serve(bus, drain_timeout=60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, 1, True, answers)
                tg.start_soon(ask, 2, True, answers)
                await two_blocked.wait()
                await ask(3, False, answers)  # answered while 1 and 2 still block
                assert answers == [3]
                release.set()
            for n in range(4, 10):  # the parked drain takes them, one at a time
                await ask(n, False, answers)
    assert sorted(answers) == list(range(1, 10))


async def test_request_handler_returning_non_json_answers_failure_and_keeps_serving(
    bus: Bus, session_id: str, unique: str
) -> None:
    agent = Agent(f"test/odd-{unique}")

    @agent.on_request(f"odd_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        if request.request.parameters.get("bad"):
            return {"x": object()}
        return {"ok": True}

    async with agent.serve(bus):
        bad = await bus.request(
            f"odd_{unique}", {"bad": True}, agent="test/asker", session=session_id
        )
        assert bad.response.status == "failure"
        good = await bus.request(f"odd_{unique}", agent="test/asker", session=session_id)
        assert good.response.result == {"ok": True}


@pytest.mark.parametrize(
    ("reply", "count"),
    [
        ("$JS.ACK.SWARMBUS_TASKS.c-q5.3.10.9.1764115200000000000.0", 3),
        ("$JS.ACK._.ACCHASH.SWARMBUS_TASKS.c-q5.4.10.9.1764115200000000000.0.x1", 4),
        ("_INBOX.abc.1", 1),
        ("", 1),
    ],
)
def test_delivery_count_is_read_off_the_ack_subject(reply: str, count: int) -> None:
    from nats.aio.msg import Msg as NatsMsg

    from swarmbus._jetstream.reads import deliveries

    msg = NatsMsg(None, subject="swarmbus.task.s.t.5.x", reply=reply)  # type: ignore[arg-type]
    assert deliveries(msg) == count
    if count > 1:
        assert msg.metadata.num_delivered == count  # what nats-py itself reads


async def test_connect_validates_overrides_of_given_settings(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(pydantic.ValidationError, match="request_timeout"):
        await Bus.connect(swarmbus.Settings(url=nats_url), request_timeout=-1)
    # An override left as None means "not given", as for Settings.from_env.
    monkeypatch.setenv("SWARMBUS_REQUEST_TIMEOUT", "2")
    async with Bus.open(url=nats_url, request_timeout=None) as bus:
        assert bus.settings.request_timeout == 2


@pytest.mark.parametrize("wait", [True, False])
async def test_message_under_the_limit_but_over_max_payload_with_headers_is_too_large(
    nats_url: str, session_id: str, wait: bool
) -> None:
    """The server counts headers against max_payload and closes a connection over it."""
    async with Bus.open(url=nats_url, retry_for=1) as bus:
        assert bus.max_message_bytes == bus.nc.max_payload
        empty = Finding(category="observation", content="", confidence=0.5)
        overhead = len(swarmbus.encode(envelope_for(empty, agent="test/big", session=session_id)))
        content = "x" * (bus.max_message_bytes - overhead - 10)  # the envelope fits
        with pytest.raises(swarmbus.InvalidMessageError) as raised:
            await bus.publish(
                Finding(category="observation", content=content, confidence=0.5),
                agent="test/big",
                session=session_id,
                wait=wait,
            )
        assert raised.value.code == "too_large"
        await bus.nc.flush(timeout=5)  # the connection survived
        assert bus.nc.is_connected


async def test_bad_input_too_big_to_dead_letter_is_still_reported(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    """Its dead letter (the bytes plus reason headers) would exceed max_payload, which the
    server answers by closing the worker's connection: reported without a dead letter."""
    agent = Agent(f"test/guard-{unique}")
    good = anyio.Event()

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        good.set()

    errors, stop_errors = await collect(raw, f"agent.error.occurred.{session_id}.{agent.id}")
    js = raw.jetstream()
    subject = f"agent.finding.reported.{session_id}.ext/x"
    async with agent.serve(bus):
        await js.publish(subject, b"x" * (raw.max_payload - 100))
        with anyio.fail_after(WAIT):
            error_msg = await errors.receive()
        error = swarmbus.decode(error_msg.data)
        assert isinstance(error, swarmbus.ErrorOccurredMessage)
        assert error.error_occurred.code == "not_json"
        assert not error.error_occurred.dead_letter
        await js.publish(subject, json.dumps(finding_json(session_id, "ext/x", n=1)).encode())
        with anyio.fail_after(WAIT):
            await good.wait()
        assert bus.nc.is_connected
    await stop_errors()


@pytest.mark.parametrize("prefix", ["_INBOX_ops_x.>", "a b", "_INBOX..x", "x.*"])
async def test_invalid_inbox_prefix_is_a_settings_error(nats_url: str, prefix: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="inbox_prefix"):
        await Bus.connect(url=nats_url, inbox_prefix=prefix)


@pytest.mark.parametrize("field", ["tls_ca_file", "tls_cert_file"])
async def test_unreadable_tls_file_is_a_connection_error_naming_it(
    nats_url: str, tmp_path: Path, field: str
) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(swarmbus.ConnectionError, match=str(missing)):
        await Bus.connect(url=nats_url, **{field: str(missing)})


async def test_tls_key_without_certificate_is_a_settings_error(
    nats_url: str, tmp_path: Path
) -> None:
    """Ignoring it would connect without the client certificate the user asked for."""
    with pytest.raises(pydantic.ValidationError, match="tls_cert_file"):
        await Bus.connect(url=nats_url, tls_key_file=str(tmp_path / "client.key"))


async def test_connect_without_url_names_the_embedded_fallback_that_exists() -> None:
    """The error points at swarmbus.connect() (README: it starts an embedded server)."""
    with pytest.raises(swarmbus.ConnectionError) as info:
        await Bus.connect(swarmbus.Settings())
    named = re.findall(r"swarmbus\.(\w+)\(", str(info.value))
    assert named == ["connect"], str(info.value)


async def test_connect_applies_overrides_to_given_settings(nats_url: str) -> None:
    async with swarmbus.connect(swarmbus.Settings(url=nats_url), request_timeout=2) as bus:
        assert bus.settings.request_timeout == 2


async def test_consumer_stops_with_an_error_once_its_connection_is_closed(
    nats_url: str, session_id: str, unique: str
) -> None:
    """Not a loop retrying a closed connection every 2 s forever."""
    bus = await Bus.connect(url=nats_url)
    failed: list[swarmbus.ConnectionError] = []

    async def handler(message: swarmbus.Message) -> None:
        pass

    async def consume(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            await bus.consume(
                f"closed-{unique}",
                [f"agent.*.*.{session_id}.>"],
                handler,
                receiver=f"test/closed-{unique}",
                limiter=anyio.Semaphore(4),
                stop=anyio.Event(),
                task_status=task_status,
            )
        except swarmbus.ConnectionError as exc:
            failed.append(exc)

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(consume)
                await bus.nc.close()  # as after a fatal server error
    finally:
        await bus.close()
    assert failed


async def test_request_handler_result_over_max_payload_answers_failure(
    nats_url: str, session_id: str, unique: str
) -> None:
    """The server closes a connection that publishes over max_payload: the responder's."""
    agent = Agent(f"test/verbose-{unique}")

    @agent.on_request(f"dump_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        return {"dump": "x" * (responder.nc.max_payload - 100)}

    async with (
        Bus.open(url=nats_url) as responder,
        Bus.open(url=nats_url) as asker,
        agent.serve(responder),
    ):
        response = await asker.request(
            f"dump_{unique}", agent="test/asker", session=session_id, timeout=5
        )
        assert response.response.status == "failure"
        assert "too_large" in response.response.result["error"]
        assert responder.nc.is_connected


async def test_a_handler_failing_on_error_events_makes_no_report_loop(
    nats_url: str, raw: NatsClient, session_id: str, unique: str
) -> None:
    """A failure on an error event is dead-lettered but not announced by another error
    event: that event would reach the same failing handler again (a broken-pipe printer
    once filled both streams this way)."""
    agent = Agent(f"test/loop-{unique}")

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        raise RuntimeError("finding handler broke")

    @agent.on_event("error", session=session_id, ignore_own=False)
    async def on_error(message: swarmbus.ErrorOccurredMessage) -> None:
        raise RuntimeError("error printer broke")

    dead, stop_dead = await collect(raw, f"swarmbus.dead.{session_id}.>")
    js = raw.jetstream()
    async with Bus.open(url=nats_url) as bus, agent.serve(bus):
        await bus.publish(
            Finding(category="observation", content="x", confidence=0.5),
            agent="ext/writer",
            session=session_id,
        )
        with anyio.fail_after(WAIT):
            while True:  # the error handler's own failure was dead-lettered
                msg = await dead.receive()
                original = (msg.headers or {}).get(ORIGINAL_SUBJECT_HEADER, "")
                if original.startswith("agent.error.occurred."):
                    break
    # Closing the bus drained its outbox: a further report would be stored by now.
    await stop_dead()
    info = await js.stream_info(
        "SWARMBUS_EVENTS", subjects_filter=f"agent.error.occurred.{session_id}.>"
    )
    assert sum((info.state.subjects or {}).values()) == 1


# --- the event path's own publisher and pulls (issue 18) ---------------------------------


async def test_an_event_whose_ack_is_lost_is_retried_and_stored_once(
    nats_url: str, session_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt is stored but its ack lost (a failover): the retry carries the
    same Nats-Msg-Id, so the stream answers it from its duplicate window."""
    request = StoredPublisher._request
    lost: list[str] = []

    async def ack_lost(self: StoredPublisher, *args: Any) -> Msg:
        reply = await request(self, *args)
        if not lost:
            lost.append(reply.subject)
            raise TimeoutError
        return reply

    monkeypatch.setattr(StoredPublisher, "_request", ack_lost)
    async with Bus.open(url=nats_url, retry_for=5) as bus:
        sent = await bus.publish(FINDING, agent="test/pub", session=session_id)
        assert lost  # the first ack was lost
        subject = f"agent.finding.reported.{session_id}.test/pub"
        info = await bus.js.stream_info(EVENTS_STREAM, subjects_filter=subject)
        assert info.state.subjects == {subject: 1}
        stored = await bus.js.get_last_msg(EVENTS_STREAM, subject)
        assert stored.headers
        assert stored.headers[MSG_ID_HEADER] == sent.id


async def test_an_event_no_stream_stores_is_retried_then_refused(
    nats_url: str, unique: str
) -> None:
    async with Bus.open(url=nats_url, retry_for=1.0) as bus:
        started = anyio.current_time()
        with pytest.raises(nats.js.errors.NoStreamResponseError):  # as bus.js.publish
            await bus._stored.publish(f"nowhere.{unique}", b"x", {MSG_ID_HEADER: unique})
        assert 0.5 <= anyio.current_time() - started < 5


async def test_a_long_pull_keeps_its_room_open_and_never_takes_more(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    """A long pull for 3 returns at its first message; the next two come on the same
    request (no pull per message), and no more than the 3 asked for are delivered."""
    durable = f"room-{unique}"
    options = PullOptions(ack_wait=30, max_deliver=5, deliver_new=True, expires=30)
    pull = PullConsumer(bus.js, bus.nc, EVENTS_STREAM, durable, options, bus._permission_guard)
    await pull.create([f"agent.finding.reported.{session_id}.>"])
    requests: list[Msg] = []

    async def count(msg: Msg) -> None:
        requests.append(msg)

    await raw.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}", cb=count)
    await raw.flush()
    try:
        with anyio.fail_after(WAIT):
            await bus.publish(FINDING, agent="test/pub", session=session_id)
            got = await pull.pull(3)
            assert len(got) == 1  # at once: the rest of its room stays open
            for _ in range(4):
                await bus.publish(FINDING, agent="test/pub", session=session_id)
            while len(got) < 3:
                got += await pull.pull(3 - len(got))
            await bus.nc.flush()
            await raw.flush()
            assert len(requests) == 1
            info = await bus.js.consumer_info(EVENTS_STREAM, durable)
            assert (info.num_ack_pending, info.num_pending) == (3, 2)
            got += await pull.pull(2)  # used up: a new pull
            await bus.nc.flush()
            await raw.flush()
            assert len(requests) == 2
            for msg in got:
                await msg.ack()
    finally:
        await pull.close()
        await pull.delete()


async def test_handled_events_are_acked_in_batches_while_serving(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    """Acks of handled messages go out together, soon, and not only when serving ends."""
    agent = Agent(f"test/acks-{unique}")
    total = 20
    handled: list[str] = []
    acks: list[Msg] = []
    all_acked = anyio.Event()

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        handled.append(message.id)

    async def count(msg: Msg) -> None:
        acks.append(msg)
        if len(acks) == total:
            all_acked.set()

    durable = swarmbus._subjects.safe_token(agent.id)
    await raw.subscribe(f"$JS.ACK.{EVENTS_STREAM}.{durable}.>", cb=count)
    await raw.flush()
    async with agent.serve(bus):
        for _ in range(total):
            await bus.publish(FINDING, agent="test/pub", session=session_id)
        with anyio.fail_after(WAIT):
            await all_acked.wait()  # while still serving
        info = await bus.js.consumer_info(EVENTS_STREAM, durable)
        assert info.num_ack_pending == 0
    assert len(handled) == total
    assert all(not msg.data for msg in acks)  # plain acks (+ACK has an empty payload)
