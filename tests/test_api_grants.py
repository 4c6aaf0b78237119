"""Request/reply paths other than capability requests, against a hostile agent.

Under both deploy configs (password users of deploy/nats/auth.conf, JWT roles of
`swarmbus creds`): the runtime API `swarmbus.api.<domain>.<verb>.<session>.<agent>`
served by `swarmbus up` (as the service account), and the reply subject of any request
as a way to make a responder publish where the requester may not (NATS
`allow_responses` lets a responder publish once to the reply subject of a message it
received, whatever its own grants: a "confused deputy"). The attacker is
ops/deploy-validator, the victim security/incident-response-lead. Consensus proposals
and votes via the service are events (not requests): tests/test_auth.py and
tests/test_hostile.py cover their forgery.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from swarmbus import (
    Agent,
    Bus,
    Consensus,
    FindingMessage,
    PermissionDeniedError,
    Proposal,
    RequestMessage,
    Settings,
    Vote,
)
from swarmbus._consensus import CONSENSUS_BUCKET
from swarmbus._messages import Request, encode, envelope_for
from swarmbus._runtime.supervisor import RuntimeConfig, running
from swarmbus._subjects import safe_token
from tests.test_grants import (
    ATTACKER,
    EVENTS,
    SERVICE,
    VICTIM,
    Deploy,
    deploy,
    jwt_deploy,
    password_deploy,
    refused,
)

__all__ = ["deploy", "jwt_deploy", "password_deploy"]  # fixtures used by name

pytestmark = pytest.mark.xdist_group("grants")
WAIT = 10.0
CAPABILITY = "check_deployment"


@contextlib.asynccontextmanager
async def runtime(deploy: Deploy) -> AsyncIterator[None]:
    """`swarmbus up` (provisioning, consensus and the API) as the service account."""
    settings = Settings(url=deploy.server.url, **deploy.options(SERVICE))
    config = RuntimeConfig(settings=settings, http=None, services=frozenset({"consensus", "api"}))
    async with running(config):
        yield


async def call(nc: NatsClient, op: str, session: str, agent: str, body: object) -> Any:
    msg = await nc.request(
        f"swarmbus.api.{op}.{session}.{agent}", json.dumps(body).encode(), timeout=WAIT
    )
    return json.loads(msg.data)


async def sub_refused(nc: NatsClient, errors: list[str], subject: str) -> None:
    """Subscribe to ``subject`` and wait for the server's permissions refusal."""
    await nc.subscribe(subject)
    refusal = f'permissions violation for subscription to "{subject.lower()}"'
    with anyio.fail_after(5):
        while not any(refusal in error.lower() for error in errors):
            await nc.flush()


async def test_an_agent_uses_the_runtime_api_as_itself(deploy: Deploy, session_id: str) -> None:
    errors: list[str] = []
    async with runtime(deploy):
        nc = await deploy.raw(VICTIM, errors)
        try:
            board = await call(nc, "board.get", session_id, VICTIM, {})
            assert board["ok"], board
            lock = await call(nc, "lock.acquire", session_id, VICTIM, {"resource": session_id})
            assert lock["result"]["held"], lock
        finally:
            await nc.drain()
    assert errors == []


async def test_an_agent_cannot_call_the_runtime_api_as_another(
    deploy: Deploy, session_id: str
) -> None:
    errors: list[str] = []
    resource = {"resource": session_id}
    async with runtime(deploy):
        victim = await deploy.raw(VICTIM, errors)
        attacker_errors: list[str] = []
        attacker = await deploy.raw(ATTACKER, attacker_errors)
        try:
            held = await call(victim, "lock.acquire", session_id, VICTIM, resource)
            assert held["result"]["held"], held
            subject = f"swarmbus.api.lock.release.{session_id}.{VICTIM}"
            await refused(attacker, attacker_errors, subject, json.dumps(resource).encode())
            again = await call(victim, "lock.acquire", session_id, VICTIM, resource)
            assert again["result"]["token"] == held["result"]["token"]  # still the victim's
        finally:
            await attacker.drain()
            await victim.drain()
    assert errors == []


@pytest.mark.parametrize(
    "subject",
    ["swarmbus.api.>", "swarmbus.api.*.*.*.security/incident-response-lead"],
)
async def test_an_agent_cannot_read_or_answer_runtime_api_requests(
    deploy: Deploy, subject: str
) -> None:
    errors: list[str] = []
    attacker = await deploy.raw(ATTACKER, errors)
    try:
        await sub_refused(attacker, errors, subject)
    finally:
        await attacker.close()


async def test_an_agent_cannot_read_or_write_another_agents_inbox(deploy: Deploy) -> None:
    errors: list[str] = []
    attacker = await deploy.raw(ATTACKER, errors)
    inbox = deploy.options(VICTIM)["inbox_prefix"]
    try:
        await sub_refused(attacker, errors, f"{inbox}.>")
        await refused(attacker, errors, f"{inbox}.abc.1", b'{"ok": true, "result": {"held": true}}')
    finally:
        await attacker.close()


async def event_consumer_exists(bus: Bus, durable: str) -> bool:
    try:
        await bus.js.consumer_info(EVENTS, durable)
    except nats.js.errors.NotFoundError:
        return False
    return True


def victim_agent(session_id: str) -> Agent:
    """The victim, with a durable consumer (an event handler) and a capability."""
    victim = Agent(VICTIM)

    @victim.on_finding(session=session_id)
    async def on_finding(message: FindingMessage) -> None:
        pass

    @victim.on_request(CAPABILITY)
    async def check(request: RequestMessage) -> dict[str, Any]:
        return {"healthy": True}

    return victim


async def kv_value(bus: Bus, bucket: str, key: str) -> bytes | None:
    kv = await bus.js.key_value(bucket)
    try:
        return (await kv.get(key)).value
    except nats.js.errors.KeyNotFoundError:
        return None


async def test_the_runtime_does_not_answer_onto_a_subject_the_requester_chose(
    deploy: Deploy, session_id: str
) -> None:
    """An API request whose reply subject is a consensus record's KV key: the runtime
    (which may write every bucket) would overwrite it with its answer."""
    errors: list[str] = []
    key = f"p.{session_id}"
    async with runtime(deploy), deploy.bus(VICTIM) as bus:
        attacker = await deploy.raw(ATTACKER, errors)
        try:
            # answered at once and in order (no await before the answer is sent)
            subject = f"swarmbus.api.presence.heartbeat.{session_id}.{ATTACKER}"
            await attacker.publish(subject, b"{}", reply=f"$KV.{CONSENSUS_BUCKET}.{key}")
            answer = json.loads((await attacker.request(subject, b"{}", timeout=WAIT)).data)
            assert answer["error"]["code"] == "not_found"
            assert await kv_value(bus, CONSENSUS_BUCKET, key) is None
        finally:
            await attacker.close()
    assert errors == []


async def test_a_capability_responder_does_not_answer_onto_a_subject_the_requester_chose(
    deploy: Deploy, session_id: str
) -> None:
    """A request to the victim whose reply subject is a consensus record's KV key: the
    victim's grants refuse that write, but NATS lets a responder publish once to any
    reply subject it received (``allow_responses``); swarmbus answers only inboxes."""
    errors: list[str] = []
    async with runtime(deploy), deploy.bus(VICTIM) as bus, victim_agent(session_id).serve(bus):
        async with deploy.bus(ATTACKER) as attacker_bus:
            # a genuine request first: the victim answers (on a verified subject)
            reply = await attacker_bus.request(
                CAPABILITY, {}, agent=ATTACKER, session=session_id, to=VICTIM
            )
            assert reply.source.agent == VICTIM
            assert reply.response.status == "success"
        raw = await deploy.raw(ATTACKER, errors)
        try:
            request = encode(
                envelope_for(
                    Request(to=VICTIM, capability=CAPABILITY, parameters={}),
                    agent=ATTACKER,
                    session=session_id,
                )
            )
            subject = f"swarmbus.request.{CAPABILITY}.{VICTIM}.{session_id}.{ATTACKER}"
            key = f"p.{session_id}"
            reports = await bus.nc.subscribe(f"agent.error.occurred.{session_id}.{VICTIM}")
            await raw.publish(subject, request, reply=f"$KV.{CONSENSUS_BUCKET}.{key}")
            # the victim reports the refused reply subject (after any answer it sent)
            report = await reports.next_msg(timeout=WAIT)
            occurred = json.loads(report.data)["error.occurred"]
            assert occurred["code"] == "wrong_subject"
            assert "no inbox" in occurred["reason"]
            assert await kv_value(bus, CONSENSUS_BUCKET, key) is None
        finally:
            await raw.close()


async def test_an_agent_cannot_propose_or_vote_via_the_service_as_another(
    deploy: Deploy, session_id: str
) -> None:
    """The consensus service's request paths (via_service) are events on the agent's own
    subjects: a proposal or vote in another's name, and any write of a record or another
    agent's membership, are refused by the server; the victim's own vote counts."""
    pid = f"p-{session_id}"
    async with runtime(deploy), deploy.bus(VICTIM) as victim, deploy.bus(ATTACKER) as attacker:
        ours = await Consensus.open(victim, via_service=True)
        await ours.join(session_id, VICTIM)
        await ours.propose(
            Proposal(proposal_id=pid, action="rollback", voters=[VICTIM]),
            agent=VICTIM,
            session=session_id,
        )
        for body in (
            Vote(proposal_id=pid, vote="no"),
            Proposal(proposal_id=f"{pid}-2", action="rollback", voters=[VICTIM]),
        ):
            with anyio.fail_after(5), pytest.raises(PermissionDeniedError):
                await attacker.publish(body, agent=VICTIM, session=session_id)
        errors: list[str] = []
        raw = await deploy.raw(ATTACKER, errors)
        try:
            for key in (f"p.{safe_token(pid)}", f"m.{session_id}.{VICTIM}"):
                await refused(raw, errors, f"$KV.{CONSENSUS_BUCKET}.{key}", b"{}")
        finally:
            await raw.close()
        record = await ours.vote(Vote(proposal_id=pid, vote="yes"), agent=VICTIM)
        assert [(b.voter, b.vote) for b in record.votes] == [(VICTIM, "yes")]


async def test_the_runtime_api_creates_tasks_and_proposals_under_the_deploy_configs(
    deploy: Deploy, session_id: str
) -> None:
    errors: list[str] = []
    async with runtime(deploy):
        nc = await deploy.raw(VICTIM, errors)
        try:
            task = await call(nc, "task.create", session_id, VICTIM, {"type": "triage"})
            assert task["ok"], task
            proposal = {
                "proposal": {
                    "proposal_id": f"p-{session_id}",
                    "action": "rollback",
                    "voters": [VICTIM],
                }
            }
            created = await call(nc, "proposal.create", session_id, VICTIM, proposal)
            assert created["ok"], created
            claimed = await call(nc, "task.claim", session_id, VICTIM, {"types": ["triage"]})
            assert claimed["ok"], claimed
            assert claimed["result"]["task"]["assigned_to"] == VICTIM
            done = await call(
                nc,
                "task.complete",
                session_id,
                VICTIM,
                {"task_id": claimed["result"]["task"]["id"], "result": {}},
            )
            assert done["ok"], done
            hypothesis = {"description": "a bad deploy", "confidence": 0.6}
            posted = await call(nc, "hypothesis.post", session_id, VICTIM, hypothesis)
            assert posted["ok"], posted
            vote = {"vote": {"proposal_id": f"p-{session_id}", "vote": "yes"}}
            voted = await call(nc, "vote.cast", session_id, VICTIM, vote)
            assert voted["ok"], voted
        finally:
            await nc.drain()
