"""Fuzz (issue 19): 10,000 malformed items, live agents, a task queue and consensus.

Malformed items go to every subject family (events, requests, task dispatches) and
every bucket (tasks, locks, consensus, board, queries): random bytes, truncated JSON,
wrong types, bad headers, invalid ids, oversized data, spoofed sources, deep nesting.
Every hundredth item a good one is interleaved (a finding to the agents, a request, a
task, a lock; a proposal and its vote now and then), and each must be handled within
5 s of being sent. Nothing may exit; memory and the dead-letter stream stay bounded.

``SWARMBUS_FUZZ_ITEMS`` runs fewer items while working on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

from swarmbus import (
    Agent,
    Blackboard,
    Bus,
    Consensus,
    ConsensusService,
    DecisionMessage,
    Finding,
    FindingMessage,
    Lock,
    LockLostError,
    Message,
    NatsServer,
    Proposal,
    RequestMessage,
    Task,
    TaskQueue,
    Vote,
    encode,
)
from swarmbus._bus import DEAD_LETTER_STREAM
from swarmbus._jetstream.headers import MSG_ID, TASK_REVISION
from swarmbus._locks import LOCKS_BUCKET
from swarmbus._messages import envelope_for
from swarmbus._observe._deadletters import dead_letters, render_dead_letters
from swarmbus._query_ledger import QUERIES_BUCKET, QueryLedger
from swarmbus._subjects import lock_key
from swarmbus._tasks import TASKS_BUCKET

pytestmark = pytest.mark.slow

ITEMS = int(os.environ.get("SWARMBUS_FUZZ_ITEMS", "10000"))
GOOD_EVERY = 100
LATENCY = 5.0
MAX_BYTES = 32 * 1024
"""The bus's message size limit in this test (oversized items are just above it)."""
DEAD_LETTER_MAX_BYTES = 4 * 1024 * 1024
RSS_GROWTH = 256 * 1024 * 1024
TYPE = "fuzz"
ALICE, BOB, CAROL = "fuzz/alice", "fuzz/bob", "fuzz/carol"
BUCKETS = (TASKS_BUCKET, LOCKS_BUCKET, "SWARMBUS_CONSENSUS", "SWARMBUS_BOARD", QUERIES_BUCKET)


def _rss() -> int:
    """Resident memory of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class Malformed:
    """Generates the bad items: (subject, data, headers), a family at a time."""

    def __init__(self, rng: random.Random, session: str) -> None:
        self.rng = rng
        self.session = session
        self.sent = 0
        finding = envelope_for(
            Finding(category="observation", content="x", confidence=0.5),
            agent=ALICE,
            session=session,
        )
        self.templates: list[dict[str, Any]] = [
            json.loads(encode(finding)),
            json.loads(msgspec.json.encode(Task(id="t", type=TYPE, session=session))),
            {"owner": ALICE, "ttl": 30},
            {"id": "x", "proposal": {"proposal_id": "p", "action": "a"}, "session": session},
        ]

    # --- payloads ----------------------------------------------------------------------

    def payload(self) -> bytes:
        rng = self.rng
        template = rng.choice(self.templates)
        kind = rng.randrange(8)
        if kind == 0:
            return rng.randbytes(rng.randrange(0, 200))
        if kind == 1:
            data = json.dumps(template).encode()
            return data[: rng.randrange(0, len(data))]
        if kind == 2:
            return json.dumps(self._wrong_types(template)).encode()
        if kind == 3:
            return b"x" * (MAX_BYTES + 1 + rng.randrange(100)) if rng.random() < 0.2 else b"{}"
        if kind == 4:
            depth = rng.randrange(100, 5000)
            return b"[" * depth + b"]" * depth
        if kind == 5:
            return json.dumps(rng.choice([None, 1, "s", [], [1, 2], True, 1e308])).encode()
        if kind == 6:
            bad = dict(template, id=rng.choice(["", "*", ">", "ü", "..", "$KV", "a\tb", "x" * 300]))
            return json.dumps(bad).encode()
        return json.dumps(template).encode()  # valid JSON: wrong place, wrong source

    def _wrong_types(self, template: dict[str, Any]) -> dict[str, Any]:
        rng = self.rng
        bad = dict(template)
        key = rng.choice(list(bad))
        bad[key] = rng.choice([None, -1, 10**30, "", [], {}, "🙃", 1.5, True])
        return bad

    def headers(self) -> dict[str, str] | None:
        rng = self.rng
        if rng.random() < 0.6:
            return None
        return {
            rng.choice([TASK_REVISION, MSG_ID, "traceparent", "Swarmbus-Code"]): rng.choice(
                ["abc", "-1", "99999999999999999999999", "", "1.5", "\u0667", " 7", "x" * 500]
            )
        }

    def bad_token(self) -> str:
        return self.rng.choice(["ü", "$KV", "--", "x" * 200, "a-b", "0", "_"])

    # --- subjects ------------------------------------------------------------------------

    def item(self) -> tuple[str, bytes, dict[str, str] | None]:
        rng = self.rng
        s = self.session
        family = rng.randrange(7)
        if family == 0:  # events the agents and the consensus service consume
            domain, event = rng.choice(
                [
                    ("finding", "reported"),
                    ("action", "proposed"),
                    ("action", "voted"),
                    ("action", "decided"),
                    ("task", "completed"),
                    ("session", "started"),
                    ("error", "occurred"),
                ]
            )
            agent = rng.choice([ALICE, BOB, "mallory"])
            subject = f"agent.{domain}.{event}.{s}.{agent}"
        elif family == 1:  # requests to a capability the agents serve
            subject = f"swarmbus.request.echo.{rng.choice(['any', BOB])}.{s}.mallory"
        elif family == 2:  # task dispatches
            prio = rng.choice(["5", "1", "10", "0", "x"])
            subject = f"swarmbus.task.{s}.{TYPE}.{prio}.{rng.choice(['t', self.bad_token()])}"
        elif family == 3:  # dead letters (what `swarmbus dead` and the web view read)
            subject = f"swarmbus.dead.{s}.{rng.choice([ALICE, 'mallory'])}"
        else:  # a key of a bucket
            bucket = rng.choice(BUCKETS)
            key = rng.choice([f"{s}.{rng.randrange(50)}", f"p.{rng.randrange(50)}", "ZnV6eg"])
            if bucket == LOCKS_BUCKET and rng.random() < 0.5:  # a lock the good ones take
                key = lock_key(f"fuzz-{s}-{rng.randrange(ITEMS // GOOD_EVERY + 2)}")
            subject = f"$KV.{bucket}.{key}"
        self.sent += 1
        return subject, self.payload(), self.headers()


class Good:
    """The good traffic interleaved with the bad, and when each item was handled."""

    def __init__(self, bus: Bus, session: str, queue: TaskQueue) -> None:
        self.bus = bus
        self.session = session
        self.queue = queue
        self.sent: dict[str, float] = {}
        self.handled: dict[str, float] = {}
        self.changed = anyio.Event()
        self.n = 0

    def done(self, key: str) -> None:
        self.handled.setdefault(key, time.monotonic())
        self.changed.set()

    # --- handlers -------------------------------------------------------------------------

    async def on_finding(self, message: FindingMessage) -> None:
        self.done(f"finding:{message.finding.content}")

    async def on_task(self, task: Task) -> dict[str, Any]:
        self.done(f"task:{task.parameters.target}")
        return {}

    async def on_request(self, request: RequestMessage) -> dict[str, Any]:
        return dict(request.request.parameters)

    # --- senders ---------------------------------------------------------------------------

    async def send(self, tg: anyio.abc.TaskGroup) -> None:
        """One round of good items (a proposal and vote every tenth round)."""
        self.n += 1
        n, s = self.n, self.session
        self.sent[f"finding:{n}"] = self.sent[f"task:{n}"] = time.monotonic()
        await self.bus.publish(
            Finding(category="observation", content=str(n), confidence=0.5), agent=ALICE, session=s
        )
        await self.queue.create(TYPE, agent=CAROL, target=str(n))
        tg.start_soon(self._request, n)
        tg.start_soon(self._lock, n)
        if n % 10 == 1:
            tg.start_soon(self._vote, n)

    async def _request(self, n: int) -> None:
        key = f"request:{n}"
        self.sent[key] = time.monotonic()
        response = await self.bus.request(
            "echo", {"n": n}, agent=CAROL, session=self.session, timeout=LATENCY
        )
        assert response.response.result == {"n": n}
        self.done(key)

    async def _lock(self, n: int) -> None:
        key = f"lock:{n}"
        self.sent[key] = time.monotonic()
        lock = Lock(self.bus, f"fuzz-{self.session}-{n}", CAROL, ttl=10)
        assert await lock.acquire(timeout=LATENCY) is not None
        self.done(key)
        with contextlib.suppress(LockLostError):  # garbage may land on it while held
            await lock.release()

    async def _vote(self, n: int) -> None:
        key = f"decision:{n}"
        self.sent[key] = time.monotonic()
        pid = f"fuzz-{n}"
        proposal = Proposal(proposal_id=pid, action="restart", voters=[BOB], timeout=60)
        await self.bus.publish(proposal, agent=ALICE, session=self.session)
        await self.bus.publish(Vote(proposal_id=pid, vote="yes"), agent=BOB, session=self.session)

    async def on_decision(self, message: Message) -> None:
        if isinstance(message, DecisionMessage) and message.decision.outcome == "approved":
            self.done(f"decision:{message.decision.proposal_id.removeprefix('fuzz-')}")

    async def all_handled(self) -> None:
        with anyio.fail_after(LATENCY * 2):
            while missing := set(self.sent) - set(self.handled):
                del missing
                self.changed = anyio.Event()
                await self.changed.wait()

    def latencies(self) -> dict[str, float]:
        return {key: self.handled[key] - sent for key, sent in self.sent.items()}


@pytest.fixture
async def fuzz_bus(fresh_server: NatsServer) -> AsyncIterator[Bus]:
    async with Bus.open(
        url=fresh_server.url,
        max_message_bytes=MAX_BYTES,
        dead_letter_max_bytes=DEAD_LETTER_MAX_BYTES,
    ) as bus:
        yield bus


def _agents(good: Good) -> list[Agent]:
    alice, bob = Agent(ALICE), Agent(BOB)
    for agent in (alice, bob):
        agent.on_finding(ignore_own=False)(good.on_finding)
        agent.on_request("echo")(good.on_request)
    return [alice, bob]


async def _work(queue: TaskQueue, good: Good, stop: anyio.Event, exited: list[str]) -> None:
    try:
        await queue.work(good.on_task, agent=CAROL, types=[TYPE], stop=stop, concurrency=16)
    finally:
        if not stop.is_set():
            exited.append("worker")


async def _flood(bus: Bus, bad: Malformed, good: Good) -> None:
    """Send the bad items, a round of good ones every GOOD_EVERY."""
    async with anyio.create_task_group() as senders:
        for i in range(ITEMS):
            subject, data, headers = bad.item()
            await bus.nc.publish(subject, data, headers=headers)
            if i % GOOD_EVERY == 0:
                await bus.nc.flush()
                await good.send(senders)
        await good.send(senders)


async def test_malformed_items_stop_nothing_and_good_work_goes_on(
    fuzz_bus: Bus, session_id: str
) -> None:
    bus = fuzz_bus
    bad = Malformed(random.Random(19), session_id)
    await Consensus.open(bus)  # its bucket exists: garbage lands there
    await Blackboard.open(bus, session_id)  # its bucket exists: garbage lands there
    await QueryLedger.open(bus, session_id, agent=CAROL)  # so does this one
    rss_before = _rss()
    exited: list[str] = []
    async with (
        TaskQueue(bus, session_id, ack_wait=1.0) as queue,
        ConsensusService(bus, session=session_id),
        contextlib.AsyncExitStack() as agents,
    ):
        good = Good(bus, session_id, queue)
        await bus.subscribe(
            f"agent.action.decided.{session_id}.>", good.on_decision, receiver="fuzz/observer"
        )
        for agent in _agents(good):
            await agents.enter_async_context(agent.serve(bus))
        await good._lock(0)  # provisions the lock bucket
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_work, queue, good, stop, exited)
            await _flood(bus, bad, good)
            await good.all_handled()
            stop.set()
    assert exited == []
    slow = {key: latency for key, latency in good.latencies().items() if latency > LATENCY}
    assert slow == {}
    assert len(good.handled) >= 4 * (ITEMS // GOOD_EVERY)
    assert _rss() - rss_before < RSS_GROWTH
    info = await bus.js.stream_info(DEAD_LETTER_STREAM)
    letters = await dead_letters(bus, session=session_id)  # `swarmbus dead` reads them all
    assert render_dead_letters(letters)
    assert {letter.code for letter in letters} >= {"not_json", "schema", "bad_id"}
    print(
        f"fuzz: {bad.sent} bad, {len(good.handled)} good, max latency "
        f"{max(good.latencies().values()):.2f}s, {info.state.messages} dead letters "
        f"({info.state.bytes} bytes, last seq {info.state.last_seq}), "
        f"rss +{(_rss() - rss_before) >> 20} MB"
    )
    assert info.state.bytes <= DEAD_LETTER_MAX_BYTES
    assert info.state.last_seq <= bad.sent  # at most once per bad item, not per receiver
