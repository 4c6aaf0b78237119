"""The public wire contract (CONTRACT.md) as an external service sees it.

Each test plays a service in another language: a plain nats-py connection publishing
raw JSON bytes on the contract subjects and reading raw messages, against a real
nats-server, or the generated ``schemas/`` files.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import swarmbus
from swarmbus import Agent, Bus, Finding, FindingMessage
from swarmbus._bus import CODE_HEADER, DEAD_LETTER_STREAM

WAIT = 10
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


@pytest.fixture
async def raw(nats_url: str) -> AsyncIterator[NatsClient]:
    """A plain nats-py client: no swarmbus helpers on the external side."""
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return loaded


def finding(session: str, agent: str, **overrides: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": f"ext-{session}",
        "timestamp": "2025-01-02T10:30:00Z",
        "source": {"agent": agent, "session": session},
        "type": "finding",
        "finding": {"category": "observation", "content": "fine", "confidence": 0.8},
    }
    message.update(overrides)
    return message


async def subscription(
    nc: NatsClient, subject: str
) -> tuple[anyio.abc.ObjectReceiveStream[Msg], Any]:
    send, receive = anyio.create_memory_object_stream[Msg](100)

    async def cb(msg: Msg) -> None:
        await send.send(msg)

    sub = await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return receive, sub


async def test_deeply_nested_json_is_rejected_and_the_worker_keeps_running(
    nats_url: str, raw: NatsClient, session_id: str, unique: str
) -> None:
    """A 2 KB envelope nested 1,000 levels deep (here in an unknown field) made msgspec
    raise RecursionError, which escaped ``accept`` and killed the agent's consumer."""
    agent = Agent(f"test/deep-{unique}")
    handled: list[str] = []
    good = anyio.Event()

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        handled.append(message.id)
        good.set()

    subject = f"agent.finding.reported.{session_id}.ext/go"
    deep = json.dumps(finding(session_id, "ext/go", id="deep"))[:-1] + ', "x": '
    data = (deep + "[" * 1000 + "]" * 1000 + "}").encode()
    errors, sub = await subscription(raw, f"agent.error.occurred.{session_id}.{agent.id}")
    js = raw.jetstream()
    async with Bus.open(url=nats_url) as bus, agent.serve(bus):
        await js.publish(subject, data)
        with anyio.fail_after(WAIT):
            error = swarmbus.decode((await errors.receive()).data)
        assert isinstance(error, swarmbus.ErrorOccurredMessage)
        assert error.error_occurred.code == "too_large"
        assert "nested" in error.error_occurred.reason
        # Once stored (the error event can arrive first: neither write is waited for).
        stored = await js.subscribe(
            f"swarmbus.dead.{session_id}.{agent.id}",
            stream=DEAD_LETTER_STREAM,
            ordered_consumer=True,
        )
        dead = await stored.next_msg(timeout=WAIT)
        await stored.unsubscribe()
        assert dead.data == data
        assert dead.headers is not None
        assert dead.headers[CODE_HEADER] == "too_large"

        await js.publish(subject, json.dumps(finding(session_id, "ext/go", id="good")).encode())
        with anyio.fail_after(WAIT):
            await good.wait()
    await sub.unsubscribe()
    assert handled == ["good"]


def test_deep_nesting_after_a_schema_error_is_an_invalid_message() -> None:
    """The same recursion, hit while classifying an envelope that already failed its schema."""
    data = json.dumps(finding("S", "ext/go", id=1))[:-1] + ', "x": ' + "[" * 1000 + "]" * 1000
    with pytest.raises(swarmbus.InvalidMessageError) as info:
        swarmbus.decode((data + "}").encode())
    assert info.value.code == "too_large"


async def test_error_event_about_a_long_id_is_a_valid_envelope(
    nats_url: str, raw: NatsClient, session_id: str, unique: str
) -> None:
    """A 128-character id is valid, but the error event's id was ``error:<id>:<agent>``:
    over 128 characters, so every receiver (and the schema) refused the report."""
    agent = Agent(f"test/failing-{unique}")

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        raise RuntimeError("handler bug")

    long_id = "x" * 128
    errors, sub = await subscription(raw, f"agent.error.occurred.{session_id}.{agent.id}")
    async with Bus.open(url=nats_url) as bus, agent.serve(bus):
        await raw.jetstream().publish(
            f"agent.finding.reported.{session_id}.ext/go",
            json.dumps(finding(session_id, "ext/go", id=long_id)).encode(),
        )
        with anyio.fail_after(WAIT):
            data = (await errors.receive()).data
    await sub.unsubscribe()
    jsonschema.validate(json.loads(data), schema("error.occurred"))
    error = swarmbus.decode(data)
    assert isinstance(error, swarmbus.ErrorOccurredMessage)
    assert error.error_occurred.message_id == long_id


@pytest.mark.parametrize(("agent", "session"), [("ops/x\n", "S-1"), ("ops/x", "S-1\n")])
async def test_identifier_with_a_trailing_newline_is_refused(
    bus: Bus, agent: str, session: str
) -> None:
    """Python's ``$`` matches before a final newline: ``ops/x\\n`` passed as an agent id,
    and publishing it failed in nats-py (ConnectionError) instead of being refused."""
    with pytest.raises(swarmbus.InvalidIdentifierError):
        await bus.publish(
            Finding(category="observation", content="x", confidence=0.5),
            agent=agent,
            session=session,
        )
    with pytest.raises(swarmbus.InvalidIdentifierError):
        Agent(agent).on_finding(session=session)


async def test_envelope_with_a_newline_in_its_source_fails_its_schema(
    nats_url: str, raw: NatsClient, session_id: str, unique: str
) -> None:
    """An external envelope whose source agent ends in a newline is a schema error."""
    data = json.dumps(finding(session_id, "ext/go\n")).encode()
    # (Python's jsonschema checks patterns with re.search too, so it cannot show this;
    # the schema's "$" means end of text in ECMA-262 and RE2.)
    with pytest.raises(swarmbus.InvalidMessageError) as info:
        swarmbus.decode(data)
    assert info.value.code == "schema"

    agent = Agent(f"test/strict-{unique}")

    @agent.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        pass

    errors, sub = await subscription(raw, f"agent.error.occurred.{session_id}.{agent.id}")
    async with Bus.open(url=nats_url) as bus, agent.serve(bus):
        await raw.jetstream().publish(f"agent.finding.reported.{session_id}.ext/go", data)
        with anyio.fail_after(WAIT):
            error = swarmbus.decode((await errors.receive()).data)
    await sub.unsubscribe()
    assert isinstance(error, swarmbus.ErrorOccurredMessage)
    assert error.error_occurred.code == "schema"


@pytest.mark.parametrize("timestamp", ["2025-01-02t10:30:00z", "2025-01-02T10:30:00.123456789Z"])
def test_rfc3339_timestamps_pass_the_schema_and_the_decoder(timestamp: str) -> None:
    """RFC 3339 (5.6) allows a lower-case ``t``; the schema's pattern refused it while
    the decoder accepted it. Go's time.RFC3339Nano writes nine fraction digits."""
    message = finding("S-1", "ext/go", timestamp=timestamp)
    jsonschema.validate(message, schema("envelope"), format_checker=jsonschema.FormatChecker())
    jsonschema.validate(message, schema("finding"))
    swarmbus.decode(json.dumps(message).encode())


async def test_publish_refuses_an_id_the_contract_refuses(bus: Bus, session_id: str) -> None:
    """An explicit envelope id over 128 characters was sent, then refused by every receiver."""
    with pytest.raises(swarmbus.InvalidMessageError):
        await bus.publish(
            Finding(category="observation", content="x", confidence=0.5),
            agent="ops/a",
            session=session_id,
            id="x" * 129,
        )


@pytest.mark.parametrize(
    "body",
    [{"to": "any", "capability": "delete"}, {"to": "ops/someone-else", "capability": "check"}],
)
async def test_request_whose_body_disagrees_with_its_subject_is_rejected(
    nats_url: str, raw: NatsClient, session_id: str, unique: str, body: dict[str, str]
) -> None:
    """A request on ``swarmbus.request.check.any...`` whose body says capability ``delete``
    (or another target) reached the ``check`` handler, which saw the body's values."""
    agent = Agent(f"test/responder-{unique}")
    handled: list[str] = []

    @agent.on_request("check")
    async def check(request: swarmbus.RequestMessage) -> dict[str, Any]:
        handled.append(request.request.capability)
        return {}

    envelope = {
        "id": f"req-{unique}",
        "timestamp": "2025-01-02T10:30:00Z",
        "source": {"agent": "ext/go", "session": session_id},
        "type": "request",
        "request": body,
    }
    subject = f"swarmbus.request.check.any.{session_id}.ext/go"
    errors, sub = await subscription(raw, f"agent.error.occurred.{session_id}.{agent.id}")
    async with Bus.open(url=nats_url) as bus, agent.serve(bus):
        await raw.publish(subject, json.dumps(envelope).encode())
        with anyio.fail_after(WAIT):
            error = swarmbus.decode((await errors.receive()).data)
    await sub.unsubscribe()
    assert isinstance(error, swarmbus.ErrorOccurredMessage)
    assert error.error_occurred.code == "wrong_subject"
    assert handled == []


async def test_envelope_on_a_malformed_event_subject_is_rejected(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    """``agent.>`` also matches subjects that are not ``agent.<domain>.<event>.<session>.
    <agent>``; a message there skipped every subject check and reached the handler."""
    receiver = f"test/monitor-{unique}"
    handled: list[str] = []
    seen = anyio.Event()

    async def handler(message: swarmbus.Message) -> None:
        handled.append(message.id)
        if message.id == "good":
            seen.set()

    # The subject is not an event subject, so it names no session: "unknown".
    errors, sub = await subscription(raw, f"agent.error.occurred.unknown.{receiver}")
    monitor = await bus.subscribe(
        f"agent.finding.reported.{session_id}.>", handler, receiver=receiver
    )
    await raw.publish(
        f"agent.finding.reported.{session_id}.ext.go",
        json.dumps(finding(session_id, "ext", id="bad")).encode(),
    )
    with anyio.fail_after(WAIT):
        error = swarmbus.decode((await errors.receive()).data)
    await raw.publish(
        f"agent.finding.reported.{session_id}.ext",
        json.dumps(finding(session_id, "ext", id="good")).encode(),
    )
    with anyio.fail_after(WAIT):
        await seen.wait()
    await monitor.unsubscribe()
    await sub.unsubscribe()
    assert isinstance(error, swarmbus.ErrorOccurredMessage)
    assert error.error_occurred.code == "wrong_subject"
    assert handled == ["good"]


@pytest.mark.parametrize(
    ("limit", "size"),
    [(1000, 2000), (4 * 1024 * 1024, 1536 * 1024)],
    ids=["over max_message_bytes", "over the server's max_payload"],
)
async def test_publishing_an_oversized_message_raises_message_too_large(
    nats_url: str, session_id: str, limit: int, size: int
) -> None:
    """Over ``max_message_bytes`` publish raised a plain InvalidMessageError, and over the
    server's max_payload (1 MiB) a ConnectionError, which handlers retry as an outage."""
    async with Bus.open(url=nats_url, max_message_bytes=limit) as bus:
        for wait in (True, False):
            with pytest.raises(swarmbus.MessageTooLargeError) as info:
                await bus.publish(
                    Finding(category="observation", content="x" * size, confidence=0.5),
                    agent="ops/a",
                    session=session_id,
                    wait=wait,
                )
            assert info.value.code == "too_large"
