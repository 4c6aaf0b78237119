"""Verified replies: a requester knows which agent answered (issue 19, attempt 6).

An agent that may read a capability's requests used to answer them first, in another
agent's name, and the requester took the forged result. Now the answer goes to the
requester's reply subject plus the responder's id, a token the deploy permissions bind
to the responder; the requester checks it (and ``to``, ``request_id``, the session)
and drops and reports anything else. Attacks run under both deploy configs: the
password users of deploy/nats/auth.conf and the JWT roles of ``swarmbus creds``.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import swarmbus
from swarmbus import (
    Agent,
    Bus,
    ErrorOccurredMessage,
    NatsServer,
    PermissionDeniedError,
    RequestMessage,
    RequestTimeoutError,
)
from swarmbus import _request_server as request_server
from swarmbus._cli import main
from swarmbus._creds import CredsStore, inbox_prefix
from swarmbus._messages import Response, encode, envelope_for

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nats"
CAPABILITY = "check_deployment"
REAL = {"version": "v1.2.3"}
FORGED = {"version": "forged"}
WAIT = 10

pytestmark = pytest.mark.xdist_group("replies")


class Seen:
    """Strings that arrive from callbacks, and a wait for one (no polling)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._changed = anyio.Event()

    def add(self, item: str) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, wanted: Callable[[list[str]], bool]) -> None:
        while not wanted(self.items):
            await self._changed.wait()


# --- the two deploy configs ------------------------------------------------------------


@dataclass
class Deployment:
    """A server under one deploy config, and how each role connects to it."""

    server: NatsServer
    responder: str
    attacker: str
    victim: str
    options: Callable[[str], dict[str, Any]]

    def bus(self, user: str) -> Any:
        return Bus.open(url=self.server.url, **self.options(user))

    async def raw(self, user: str, refusals: Seen) -> NatsClient:
        """A plain nats-py connection as ``user``; the server's refusals go to ``refusals``."""

        async def on_error(exc: Exception) -> None:
            refusals.add(str(exc).lower())

        options = self.options(user)
        return await nats.connect(
            self.server.url,
            user=options.get("user"),
            password=options.get("password"),
            user_credentials=options.get("creds_file"),
            inbox_prefix=options["inbox_prefix"],
            error_cb=on_error,
        )


PASSWORD_ENV = {
    "ops/deploy-validator": "NATS_PASSWORD_DEPLOY_VALIDATOR",
    "security/incident-response-lead": "NATS_PASSWORD_INCIDENT_LEAD",
    "swarmbus/consensus": "NATS_PASSWORD_CONSENSUS",
    "observer": "NATS_PASSWORD_OBSERVER",
    "demo": "NATS_PASSWORD_DEMO",
}


@pytest.fixture(scope="module")
def password_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """deploy/nats/single.conf (auth.conf's users): every agent may read ``any``
    requests, so the attacker is just another agent."""
    passwords = {user: secrets.token_hex(12) for user in PASSWORD_ENV}
    server = NatsServer(
        tmp_path_factory.mktemp("replies-password"),
        config_file=DEPLOY / "single.conf",
        extra_args=["--http_port", "-1"],
    )
    with pytest.MonkeyPatch.context() as mp:
        for user, env in PASSWORD_ENV.items():
            mp.setenv(env, passwords[user])
        server.start()
    try:
        yield Deployment(
            server,
            responder="ops/deploy-validator",
            attacker="security/incident-response-lead",
            victim="swarmbus/consensus",
            options=lambda user: {
                "user": user,
                "password": passwords[user],
                "inbox_prefix": f"_INBOX_{user.replace('/', '_')}",
            },
        )
    finally:
        server.stop()


@pytest.fixture(scope="module")
def jwt_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """deploy/nats/single-jwt.conf with ``swarmbus creds`` users: the attacker was given
    the capability (``--capability``), so it reads the requests the victim sends."""
    root = tmp_path_factory.mktemp("replies-jwt")
    conf = root / "nats"
    shutil.copytree(DEPLOY, conf, ignore=shutil.ignore_patterns("creds"))
    store = conf / "creds"

    def creds(*args: str) -> None:
        assert main(["creds", "--dir", str(store), *args]) == 0

    creds("init", "--resolver", "full")
    creds("add", "swarmbus/consensus", "--role", "service")
    creds("add", "ops/deploy-validator", "--capability", CAPABILITY)
    creds("add", "ops/mallory", "--capability", CAPABILITY)
    creds("add", "ops/victim")
    users = CredsStore(store).users()
    server = NatsServer(
        root / "data", config_file=conf / "single-jwt.conf", extra_args=["--http_port", "-1"]
    )
    with server:
        yield Deployment(
            server,
            responder="ops/deploy-validator",
            attacker="ops/mallory",
            victim="ops/victim",
            options=lambda user: {
                "creds_file": str(users[user].creds_file),
                "inbox_prefix": inbox_prefix(user),
            },
        )


@pytest.fixture(params=["password", "jwt"])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    fixture: Deployment = request.getfixturevalue(f"{request.param}_deployment")
    return fixture


@pytest.fixture
async def provisioned(deployment: Deployment) -> AsyncIterator[Deployment]:
    """The service account has provisioned the streams (agents may not)."""
    service = "swarmbus/consensus"
    async with Bus.open(url=deployment.server.url, **deployment.options(service)):
        yield deployment


def forged_answer(msg: Msg, agent: str, result: dict[str, Any]) -> bytes:
    """A success response to the request in ``msg``, in ``agent``'s name."""
    request = swarmbus.decode(msg.data)
    body = Response(request_id=request.id, status="success", result=result)
    return encode(envelope_for(body, agent=agent, session=request.source.session))


async def error_codes(
    nc: NatsClient, session: str, agent: str, subjects: Seen | None = None
) -> tuple[Seen, Any]:
    """The codes of the ``agent.error.occurred`` events ``agent`` publishes in ``session``
    (and the subjects they report about, into ``subjects``)."""
    codes = Seen()

    async def on_msg(msg: Msg) -> None:
        event = swarmbus.decode(msg.data)
        assert isinstance(event, ErrorOccurredMessage)
        codes.add(event.error_occurred.code)
        if subjects is not None:
            subjects.add(event.error_occurred.subject)

    sub = await nc.subscribe(f"agent.error.occurred.{session}.{agent}", cb=on_msg)
    await nc.flush()
    return codes, sub


def refused(action: str, subject: str) -> Callable[[list[str]], bool]:
    """Whether the server refused ``action`` ("publish", "subscription") to ``subject``."""
    wanted = f'permissions violation for {action} to "{subject}"'.lower()
    return lambda errors: any(wanted in error for error in errors)


# --- the attack of the issue, under both deploy configs ----------------------------------


async def test_forged_answers_are_refused_and_the_real_responder_answers(
    provisioned: Deployment, session_id: str
) -> None:
    """The attacker reads every ``any`` request (no queue group) and answers each first,
    three ways, all in the real responder's name: on the plain reply subject (its
    one ``allow_responses`` reply), with the responder's id as the last token (the
    server refuses it) and with its own id as the last token. Every one of the
    victim's 20 requests is answered by the real responder; the forgeries are
    reported as the victim's ``agent.error.occurred``."""
    d = provisioned
    responder = Agent(d.responder)

    refusals, attacked = Seen(), Seen()
    reported = Seen()  # the reply subjects of the victim's error events

    @responder.on_request(CAPABILITY)
    async def check(request: RequestMessage) -> dict[str, Any]:
        # The attacker answers first (as it did 19 times in 20 in the issue), and the
        # victim has seen its answers.
        await reported.wait_for(lambda subjects: sum(request.id in s for s in subjects) == 2)
        return REAL

    attacker = await d.raw(d.attacker, refusals)

    async def forge(msg: Msg) -> None:
        answer = forged_answer(msg, d.responder, FORGED)
        await attacker.publish(msg.reply, answer)
        await attacker.publish(f"{msg.reply}.{d.responder}", answer)
        await attacker.publish(f"{msg.reply}.{d.attacker}", answer)
        attacked.add(msg.reply)

    await attacker.subscribe(f"swarmbus.request.{CAPABILITY}.any.*.*", cb=forge)
    await attacker.flush()
    try:
        async with (
            d.bus(d.responder) as rbus,
            responder.serve(rbus),
            d.bus(d.victim) as victim,
        ):
            codes, sub = await error_codes(victim.nc, session_id, d.victim, reported)
            answers = []
            with anyio.fail_after(WAIT):
                for i in range(20):
                    answer = await victim.request(
                        CAPABILITY, {"i": i}, agent=d.victim, session=session_id
                    )
                    answers.append((answer.source.agent, answer.response.result))
                await attacked.wait_for(lambda replies: len(replies) == 20)
                # The answer with the responder's id never left the attacker's connection.
                for reply in attacked.items:
                    await refusals.wait_for(refused("publish", f"{reply}.{d.responder}"))
            await sub.unsubscribe()
    finally:
        await attacker.close()
    assert answers == [(d.responder, REAL)] * 20
    # Two forgeries reached the victim per request; each was dropped and reported.
    assert sorted(codes.items) == ["source_mismatch"] * 20 + ["wrong_responder"] * 20


async def test_a_forged_responder_token_is_refused_by_the_server(
    provisioned: Deployment, session_id: str
) -> None:
    """A publish on another requester's reply subject with someone else's id as the
    last token is refused by the server, whatever the subject: only the agent itself
    publishes ``swarmbus.reply.*.*.*.<its id>``, and only the requester reads its own."""
    d = provisioned
    refusals = Seen()
    attacker = await d.raw(d.attacker, refusals)
    forged = f"swarmbus.reply.{d.victim}.abc.req-1.{d.responder}"
    try:
        await attacker.publish(forged, b"{}")
        await attacker.subscribe(f"swarmbus.reply.{d.victim}.>")
        await attacker.flush()
        with anyio.fail_after(WAIT):
            await refusals.wait_for(refused("publish", forged))
            await refusals.wait_for(refused("subscription", f"swarmbus.reply.{d.victim}.>"))
        # Its own id is its to use.
        await attacker.publish(f"swarmbus.reply.{d.victim}.abc.req-1.{d.attacker}", b"{}")
        await attacker.flush()
    finally:
        await attacker.close()
    assert len(refusals.items) == 2


async def test_an_agent_cannot_ask_for_replies_as_another(
    provisioned: Deployment, session_id: str
) -> None:
    """Requesting as another agent is refused before anything is sent: this user may
    read neither the other's replies nor publish its requests."""
    d = provisioned
    async with d.bus(d.attacker) as bus:
        with anyio.fail_after(3), pytest.raises(PermissionDeniedError, match="request"):
            await bus.request(CAPABILITY, agent=d.victim, session=session_id)


# --- the requester's checks, on the plain test server ------------------------------------


@pytest.fixture
async def raw(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.close()


async def test_an_answer_to_another_request_id_is_refused(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    """A responder in its own name (right token) answering with another request's id is
    dropped and reported; the request takes the next, right, answer. With only the
    wrong one, the request times out saying what it refused."""
    responder = f"test/responder-{unique}"
    asker = f"test/asker-{unique}"
    replay = {"on": True}

    async def answer(msg: Msg) -> None:
        request = swarmbus.decode(msg.data)
        for request_id in ("other-request", request.id) if replay["on"] else ("other",):
            body = Response(request_id=request_id, status="success", result={"id": request_id})
            reply = envelope_for(body, agent=responder, session=request.source.session)
            await raw.publish(f"{msg.reply}.{responder}", encode(reply))

    await raw.subscribe(f"swarmbus.request.c_{unique}.{responder}.*.*", cb=answer)
    await raw.flush()
    codes, sub = await error_codes(raw, session_id, asker)
    with anyio.fail_after(WAIT):
        response = await bus.request(f"c_{unique}", agent=asker, session=session_id, to=responder)
        assert response.response.result == {"id": response.response.request_id}
        await codes.wait_for(lambda c: "wrong_request" in c)
        replay["on"] = False
        with pytest.raises(RequestTimeoutError) as timed_out:
            await bus.request(
                f"c_{unique}", agent=asker, session=session_id, to=responder, timeout=0.5
            )
    await sub.unsubscribe()
    assert [r.split(":")[0] for r in timed_out.value.refused] == ["wrong_request"]
    assert "refused" in str(timed_out.value)


async def test_an_answer_by_another_agent_than_to_is_refused(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    """With no permissions in the way, an eavesdropper answers a request addressed to
    one agent, honestly in its own name: not the agent asked, so dropped; the real
    answer is taken. For ``to: any`` the same answer is accepted: its author is
    verified, and any agent may answer."""
    real = Agent(f"test/real-{unique}")
    eavesdropper = f"test/eve-{unique}"

    @real.on_request(f"c_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        await anyio.sleep(0.05)  # the eavesdropper answers first
        return REAL

    async def eavesdrop(msg: Msg) -> None:
        answer = forged_answer(msg, eavesdropper, FORGED)
        await raw.publish(f"{msg.reply}.{eavesdropper}", answer)

    await raw.subscribe(f"swarmbus.request.c_{unique}.>", cb=eavesdrop)
    await raw.flush()
    async with real.serve(bus):
        with anyio.fail_after(WAIT):
            to_one = await bus.request(
                f"c_{unique}", agent="test/asker", session=session_id, to=real.id
            )
            to_any = await bus.request(f"c_{unique}", agent="test/asker", session=session_id)
    assert (to_one.source.agent, to_one.response.result) == (real.id, REAL)
    assert (to_any.source.agent, to_any.response.result) == (eavesdropper, FORGED)


async def test_a_plain_inbox_request_is_answered_on_the_inbox(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    """A client that does not verify replies (a Go or Node service, ``nc.request``) is
    answered on its plain reply inbox, as before."""
    agent = Agent(f"test/responder-{unique}")

    @agent.on_request(f"c_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        return REAL

    envelope = {
        "id": f"req-{unique}",
        "timestamp": "2025-01-02T10:30:00Z",
        "source": {"agent": "ext/go", "session": session_id},
        "type": "request",
        "request": {"to": "any", "capability": f"c_{unique}", "parameters": {}},
    }
    async with agent.serve(bus):
        with anyio.fail_after(WAIT):
            msg = await raw.request(
                f"swarmbus.request.c_{unique}.any.{session_id}.ext/go",
                json.dumps(envelope).encode(),
                timeout=WAIT,
            )
    answer = swarmbus.decode(msg.data)
    assert isinstance(answer, swarmbus.ResponseMessage)
    assert answer.source.agent == agent.id
    assert answer.response.request_id == f"req-{unique}"
    assert answer.response.result == REAL


async def test_a_request_naming_another_requesters_replies_is_refused(
    bus: Bus, raw: NatsClient, session_id: str, unique: str
) -> None:
    """A request whose verified reply subject names another agent than its source (a
    reflection: answers sent to someone who did not ask) is refused as bad input;
    nothing is published there."""
    agent = Agent(f"test/responder-{unique}")
    handled = []

    @agent.on_request(f"c_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        handled.append(request.id)
        return REAL

    envelope = {
        "id": f"req-{unique}",
        "timestamp": "2025-01-02T10:30:00Z",
        "source": {"agent": "ext/mallory", "session": session_id},
        "type": "request",
        "request": {"to": "any", "capability": f"c_{unique}", "parameters": {}},
    }
    victim_replies = await raw.subscribe("swarmbus.reply.ext/victim.>")
    codes, sub = await error_codes(raw, session_id, agent.id)
    subject = f"swarmbus.request.c_{unique}.any.{session_id}.ext/mallory"
    async with agent.serve(bus):
        await raw.publish(
            subject, json.dumps(envelope).encode(), reply="swarmbus.reply.ext/victim.inbox.r"
        )
        with anyio.fail_after(WAIT):
            await codes.wait_for(lambda c: "wrong_subject" in c)
            # A second request, answered on a plain inbox: any answer to the first
            # would have reached this connection before it.
            envelope["id"] = f"req2-{unique}"
            await raw.request(subject, json.dumps(envelope).encode(), timeout=WAIT)
    await sub.unsubscribe()
    assert victim_replies.pending_msgs == 0
    assert handled == [f"req2-{unique}"]


async def test_a_refused_request_fails_at_once(tmp_path: Path, session_id: str) -> None:
    """A user that may read its replies but not publish the request is told so by the
    server's asynchronous refusal, well before the request's timeout."""
    conf = tmp_path / "auth.conf"
    conf.write_text(
        'authorization { users = [{ user: "ops/x", password: "p", permissions: {\n'
        '  publish: { allow: ["_INBOX.>", "$JS.API.>"] },\n'
        '  subscribe: { allow: ["swarmbus.reply.ops/x.>", "_INBOX.>"] } } }] }\n'
    )
    with NatsServer(tmp_path / "data", config_file=conf) as server:
        settings = swarmbus.Settings(url=server.url, user="ops/x", password="p")
        bus = await Bus.connect(settings, provision=False)
        try:
            with anyio.fail_after(3), pytest.raises(PermissionDeniedError, match="request c"):
                await bus.request("c", agent="ops/x", session=session_id, timeout=30)
            assert bus._refusals._waiting == {}
        finally:
            await bus.close()


async def test_a_full_request_queue_answers_overloaded_at_once(
    bus: Bus, session_id: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A responder holds at most ``MAX_QUEUED`` requests waiting for a handler slot;
    one more is answered at once with ``overloaded``, nothing is dropped silently."""
    monkeypatch.setattr(request_server, "MAX_QUEUED", 2)
    agent = Agent(f"test/responder-{unique}", max_concurrency=1)
    started, release, answered = anyio.Event(), anyio.Event(), [anyio.Event()]
    statuses: list[str] = []

    @agent.on_request(f"c_{unique}")
    async def handle(request: RequestMessage) -> dict[str, Any]:
        started.set()
        await release.wait()
        return REAL

    async def ask() -> None:
        answer = await bus.request(
            f"c_{unique}", {}, agent="test/asker", session=session_id, timeout=WAIT
        )
        result = answer.response.result or {}
        statuses.append(result.get("error", answer.response.status))
        answered[0].set()

    async with agent.serve(bus), anyio.create_task_group() as tg:
        tg.start_soon(ask)
        with anyio.fail_after(WAIT):
            await started.wait()  # one runs; two may wait, two are refused
            for _ in range(4):
                tg.start_soon(ask)
            while statuses.count("overloaded") < 2:
                answered[0] = anyio.Event()
                await answered[0].wait()
            assert len(statuses) == 2  # the others still wait for the handler
            release.set()
    assert sorted(statuses) == ["overloaded", "overloaded", "success", "success", "success"]
