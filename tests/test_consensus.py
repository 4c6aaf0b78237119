"""Consensus: tally rules (pure), the client and the service on a real server, HA."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.js.api import DeliverPolicy

import swarmbus
from swarmbus import (
    AlreadyVotedError,
    Ballot,
    Blackboard,
    Bus,
    Consensus,
    ConsensusService,
    Decision,
    DecisionMessage,
    DecisionTimeoutError,
    ErrorOccurredMessage,
    InvalidMessageError,
    Message,
    MessageTooLargeError,
    NotEligibleError,
    NotFoundError,
    Proposal,
    ProposalClosedError,
    Snapshot,
    Tally,
    TaskQueue,
    Vote,
    decode,
    tally_outcome,
)
from swarmbus._consensus import (
    Outcome,
    ProposalRecord,
    Quorum,
    decision_message_id,
    decision_of,
    early_outcome,
    final_outcome,
    proposal_key,
)
from swarmbus._messages import new_id, now

ROOT = Path(__file__).resolve().parents[1]
VOTERS = [f"ops/voter-{i}" for i in range(5)]

# --- tally rules (pure) -------------------------------------------------------------------------


def _brute_force(quorum: Quorum, threshold: float | None, tally: Tally) -> Outcome | None:
    outcomes = set()
    m = tally.missing
    for y, n, a in itertools.product(range(m + 1), repeat=3):
        if y + n + a <= m:
            final = Tally(
                tally.eligible,
                tally.votes_for + y,
                tally.votes_against + n,
                tally.abstentions + a,
            )
            outcomes.add(final_outcome(quorum, threshold, final))
    return outcomes.pop() if len(outcomes) == 1 else None


RULES: list[tuple[Quorum, float | None]] = [
    ("majority", None),
    ("unanimous", None),
    ("threshold", 0.0),
    ("threshold", 0.5),
    ("threshold", 0.7),
    ("threshold", 1.0),
]


@pytest.mark.parametrize(("quorum", "threshold"), RULES)
def test_early_outcome_is_exactly_when_no_missing_vote_can_change_it(
    quorum: Quorum, threshold: float | None
) -> None:
    for eligible in range(1, 7):
        for y, n, a in itertools.product(range(eligible + 1), repeat=3):
            if y + n + a <= eligible:
                tally = Tally(eligible, y, n, a)
                assert early_outcome(quorum, threshold, tally) == _brute_force(
                    quorum, threshold, tally
                ), tally


def test_the_seed_example_is_approved() -> None:
    # 2 yes, 0 no, 1 abstention of 3 voters
    assert final_outcome("majority", None, Tally(3, 2, 0, 1)) == "approved"


@pytest.mark.parametrize(
    ("quorum", "threshold", "tally", "closed", "expected"),
    [
        ("majority", None, Tally(5, 3, 0, 0), False, "approved"),  # early: 3 of 5 say yes
        ("majority", None, Tally(5, 2, 2, 0), False, None),
        ("majority", None, Tally(4, 2, 2, 0), False, "rejected"),  # a tie is rejected
        ("majority", None, Tally(5, 2, 0, 0), True, "no_quorum"),  # 2 of 5 is not > half
        ("majority", None, Tally(5, 1, 0, 2), True, "approved"),  # abstentions make quorum
        ("majority", None, Tally(5, 0, 0, 3), True, "rejected"),  # all abstain: not yes > no
        ("unanimous", None, Tally(5, 4, 1, 0), False, "rejected"),
        ("unanimous", None, Tally(5, 1, 0, 0), False, None),
        ("unanimous", None, Tally(5, 4, 0, 0), True, "no_quorum"),
        ("unanimous", None, Tally(5, 3, 0, 2), False, "approved"),
        ("unanimous", None, Tally(2, 0, 0, 2), False, "rejected"),
        ("threshold", 0.7, Tally(10, 7, 3, 0), True, "approved"),
        ("threshold", 0.7, Tally(10, 6, 4, 0), True, "rejected"),
        ("threshold", 0.7, Tally(10, 7, 3, 0), False, "approved"),  # 7 >= 0.7 * 10 always
        ("threshold", 0.7, Tally(10, 4, 1, 3), True, "approved"),  # 4 >= 0.7 * 5
        ("threshold", 0.7, Tally(10, 4, 1, 0), True, "no_quorum"),
    ],
)
def test_tally_outcome_by_hand(
    quorum: Quorum, threshold: float | None, tally: Tally, closed: bool, expected: Outcome | None
) -> None:
    assert tally_outcome(quorum, threshold, tally, closed=closed) == expected


def test_threshold_without_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        final_outcome("threshold", None, Tally(3, 3))


# --- on a real server ---------------------------------------------------------------------------


@pytest.fixture
def bucket(unique: str) -> str:
    return f"CONS_{unique}"


@pytest.fixture
async def consensus(bus: Bus, bucket: str) -> Consensus:
    return await Consensus.open(bus, bucket=bucket)


@pytest.fixture
async def service(bus: Bus, bucket: str, session_id: str) -> AsyncIterator[ConsensusService]:
    """A service replica; run in a task of its own (fixture setup and teardown are not)."""
    started: asyncio.Future[ConsensusService] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def run() -> None:
        async with ConsensusService(bus, bucket=bucket, session=session_id) as svc:
            started.set_result(svc)
            await stop.wait()

    task = asyncio.create_task(run())
    yield await asyncio.wait_for(asyncio.shield(started), 10)
    stop.set()
    await task


async def _propose(consensus: Consensus, session: str, pid: str, **fields: object) -> None:
    fields.setdefault("voters", VOTERS)
    await consensus.propose(
        Proposal(proposal_id=pid, action="rollback", **fields),  # type: ignore[arg-type]
        agent=VOTERS[0],
        session=session,
    )


async def _cast(consensus: Consensus, pid: str, *votes: str) -> None:
    """Votes in VOTERS order; ``-`` skips a voter."""
    for voter, vote in zip(VOTERS, votes, strict=False):
        if vote != "-":
            body = Vote(proposal_id=pid, vote=vote, reason="test")  # type: ignore[arg-type]
            await consensus.vote(body, agent=voter)


async def test_majority_decides_early_and_publishes_once(
    bus: Bus, consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    events: list[DecisionMessage] = []
    got = anyio.Event()

    async def on_msg(message: Message) -> None:
        assert isinstance(message, DecisionMessage)
        events.append(message)
        got.set()

    await bus.subscribe(f"agent.action.decided.{session_id}.>", on_msg, receiver="test/obs")
    await _propose(consensus, session_id, "p1", timeout=60)
    await _cast(consensus, "p1", "yes", "abstain", "yes", "yes")
    with anyio.fail_after(5):
        decision = await consensus.wait_for_decision("p1", timeout=5)
        await got.wait()
    assert (decision.outcome, decision.decision, decision.closed_by) == (
        "approved",
        "rollback",
        "early",
    )
    assert (decision.votes_for, decision.votes_against, decision.abstentions) == (3, 0, 1)
    assert decision.eligible == 5
    assert [b.voter for b in decision.votes] == VOTERS[:4]
    assert events[0].decision == decision
    assert events[0].source.agent == "swarmbus/consensus"
    record = await consensus.get("p1")
    assert record.decision == decision
    assert record.tally() == Tally(5, 3, 0, 1)


async def test_majority_rejects_early_on_enough_no(
    consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    await _propose(consensus, session_id, "p-no", timeout=60)
    await _cast(consensus, "p-no", "no", "yes", "no", "no")
    decision = await consensus.wait_for_decision("p-no", timeout=5)
    assert (decision.outcome, decision.decision) == ("rejected", "rejected")
    assert (decision.votes_for, decision.votes_against) == (1, 3)


async def test_unanimous_rejected_by_one_no_and_approved_with_abstentions(
    consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    await _propose(consensus, session_id, "u-no", quorum="unanimous", timeout=60)
    await _cast(consensus, "u-no", "yes", "no")
    decision = await consensus.wait_for_decision("u-no", timeout=5)
    assert (decision.outcome, decision.votes_for, decision.votes_against) == ("rejected", 1, 1)

    await _propose(consensus, session_id, "u-yes", quorum="unanimous", timeout=60)
    await _cast(consensus, "u-yes", "yes", "abstain", "yes", "yes")
    assert (await consensus.get("u-yes")).decision is None  # one member still missing
    await consensus.vote(Vote(proposal_id="u-yes", vote="abstain"), agent=VOTERS[4])
    decision = await consensus.wait_for_decision("u-yes", timeout=5)
    assert (decision.outcome, decision.abstentions, decision.votes_for) == ("approved", 2, 3)


async def test_threshold_counts_yes_among_yes_and_no(
    consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    await _propose(consensus, session_id, "t1", quorum="threshold", threshold=0.75, timeout=60)
    await _cast(consensus, "t1", "yes", "abstain", "yes")
    assert (await consensus.get("t1")).decision is None  # 2 missing no's would make it 2/4
    await _cast(consensus, "t1", "-", "-", "-", "yes")
    decision = await consensus.wait_for_decision("t1", timeout=5)  # 3/4 even if the last says no
    assert (decision.outcome, decision.closed_by) == ("approved", "early")
    assert (decision.votes_for, decision.votes_against, decision.abstentions) == (3, 0, 1)

    await _propose(consensus, session_id, "t2", quorum="threshold", threshold=0.8, timeout=60)
    await _cast(consensus, "t2", "yes", "no", "no")  # 3 of 5 at best: < 0.8
    decision = await consensus.wait_for_decision("t2", timeout=5)
    assert (decision.outcome, decision.closed_by) == ("rejected", "early")


async def test_timeout_with_quorum_tallies_what_was_cast(
    consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    await _propose(consensus, session_id, "to-q", timeout=1)
    await _cast(consensus, "to-q", "yes", "no", "yes")
    assert (await consensus.get("to-q")).decision is None  # 2 missing could still tie
    decision = await consensus.wait_for_decision("to-q", timeout=5)
    assert (decision.outcome, decision.closed_by) == ("approved", "timeout")
    assert (decision.votes_for, decision.votes_against, decision.eligible) == (2, 1, 5)


async def test_timeout_without_quorum_is_no_quorum(
    consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    await _propose(consensus, session_id, "to-nq", timeout=1)
    await _cast(consensus, "to-nq", "yes", "yes")
    decision = await consensus.wait_for_decision("to-nq", timeout=5)
    assert (decision.outcome, decision.decision, decision.closed_by) == (
        "no_quorum",
        "no_quorum",
        "timeout",
    )
    with pytest.raises(ProposalClosedError) as closed:
        await consensus.vote(Vote(proposal_id="to-nq", vote="yes"), agent=VOTERS[2])
    assert closed.value.outcome == "no_quorum"


async def test_illegal_votes_are_typed_errors_and_change_nothing(
    consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    with pytest.raises(NotFoundError):
        await consensus.vote(Vote(proposal_id="nope", vote="yes"), agent=VOTERS[0])
    await _propose(consensus, session_id, "ill", timeout=60)
    await _cast(consensus, "ill", "yes")
    before = await consensus.get("ill")
    with pytest.raises(NotEligibleError):
        await consensus.vote(Vote(proposal_id="ill", vote="yes"), agent="intruder/x")
    with pytest.raises(AlreadyVotedError):
        await consensus.vote(Vote(proposal_id="ill", vote="no"), agent=VOTERS[0])
    assert await consensus.get("ill") == before
    await _cast(consensus, "ill", "-", "yes", "yes")
    decided = await consensus.wait_for_decision("ill", timeout=5)
    with pytest.raises(ProposalClosedError):
        await consensus.vote(Vote(proposal_id="ill", vote="no"), agent=VOTERS[4])
    record = await consensus.get("ill")
    assert record.decision == decided
    assert len(record.votes) == 3


async def test_bad_proposals_are_refused(consensus: Consensus, session_id: str) -> None:
    await _propose(consensus, session_id, "dup")
    with pytest.raises(Exception, match="exists"):
        await _propose(consensus, session_id, "dup")
    with pytest.raises(InvalidMessageError, match="threshold"):
        await _propose(consensus, session_id, "thr", quorum="threshold")
    with pytest.raises(InvalidMessageError) as none:
        await _propose(consensus, f"{session_id}-empty", "empty", voters=[])
    assert none.value.code == "no_voters"


async def test_session_members_are_the_default_electorate(
    consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    for voter in VOTERS[:3]:
        await consensus.join(session_id, voter)
    assert await consensus.members(session_id) == VOTERS[:3]
    await _propose(consensus, session_id, "mem", voters=[], timeout=60)
    record = await consensus.get("mem")
    assert record.electorate == VOTERS[:3]
    with pytest.raises(NotEligibleError):
        await consensus.vote(Vote(proposal_id="mem", vote="yes"), agent=VOTERS[3])
    await _cast(consensus, "mem", "yes", "yes")
    assert (await consensus.wait_for_decision("mem", timeout=5)).outcome == "approved"


async def test_wait_for_decision_times_out(consensus: Consensus, session_id: str) -> None:
    await _propose(consensus, session_id, "slow")
    with pytest.raises(DecisionTimeoutError):
        await consensus.wait_for_decision("slow", timeout=0.3)
    with pytest.raises(NotFoundError):
        await consensus.wait_for_decision("missing", timeout=0.3)


async def test_wire_only_clients_are_ingested(
    bus: Bus, consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    errors: list[ErrorOccurredMessage] = []
    got_error = anyio.Event()

    async def on_error(message: Message) -> None:
        assert isinstance(message, ErrorOccurredMessage)
        errors.append(message)
        got_error.set()

    await bus.subscribe(f"agent.error.occurred.{session_id}.>", on_error, receiver="test/obs")
    proposal = Proposal(proposal_id="wire", action="restart", voters=VOTERS[:3], timeout=60)
    await bus.publish(proposal, agent=VOTERS[0], session=session_id)
    await bus.publish(Vote(proposal_id="wire", vote="yes"), agent="intruder/x", session=session_id)
    with anyio.fail_after(5):
        await got_error.wait()
    assert "may not vote" in errors[0].error_occurred.reason  # so the proposal is recorded
    for voter in VOTERS[:2]:
        await bus.publish(Vote(proposal_id="wire", vote="yes"), agent=voter, session=session_id)
    decision = await consensus.wait_for_decision("wire", timeout=5)
    assert (decision.outcome, decision.votes_for, decision.eligible) == ("approved", 2, 3)


async def test_open_proposals_survive_a_service_restart(
    bus: Bus, bucket: str, session_id: str
) -> None:
    consensus = await Consensus.open(bus, bucket=bucket, settle=False)  # the service settles
    async with ConsensusService(bus, bucket=bucket, session=session_id):
        await _propose(consensus, session_id, "restart", timeout=1.5)
        await _cast(consensus, "restart", "yes", "yes")
    assert (await consensus.get("restart")).decision is None
    async with ConsensusService(bus, bucket=bucket, session=session_id) as second:
        decision = await consensus.wait_for_decision("restart", timeout=5)
    assert (decision.outcome, decision.closed_by) == ("no_quorum", "timeout")
    assert second.decided == 1


async def test_a_service_scoped_to_one_session_leaves_other_sessions_alone(
    bus: Bus, bucket: str, session_id: str
) -> None:
    consensus = await Consensus.open(bus, bucket=bucket, settle=False)
    other = f"{session_id}-other"
    await _propose(consensus, other, "elsewhere", timeout=1)
    await _propose(consensus, session_id, "here", timeout=1)
    async with ConsensusService(bus, bucket=bucket, session=session_id) as scoped:
        decision = await consensus.wait_for_decision("here", timeout=10)
    assert decision.closed_by == "timeout"
    assert scoped.decided == 1
    assert (await consensus.get("elsewhere")).decision is None


async def test_two_replicas_decide_each_proposal_once(
    bus: Bus, consensus: Consensus, bucket: str, session_id: str
) -> None:
    async with (
        ConsensusService(bus, bucket=bucket, session=session_id) as one,
        ConsensusService(bus, bucket=bucket, session=session_id) as two,
    ):
        for i in range(20):
            await _propose(consensus, session_id, f"r{i}", timeout=60)
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(_cast_tolerant, consensus, f"r{i}", ["yes"] * 5)
        for i in range(20):
            await consensus.wait_for_decision(f"r{i}", timeout=5)
    # The client decides too (the vote that makes the outcome certain): once in all.
    assert one.decided + two.decided + consensus.decided == 20


async def _cast_tolerant(consensus: Consensus, pid: str, votes: list[str]) -> None:
    """Vote like a real client: a vote that arrives after an early decision is refused."""
    for voter, vote in zip(VOTERS, votes, strict=True):
        try:
            await consensus.vote(Vote(proposal_id=pid, vote=vote), agent=voter)  # type: ignore[arg-type]
        except ProposalClosedError:
            return


# --- HA under a crash ---------------------------------------------------------------------------


@pytest.fixture
def replicas(nats_url: str, bucket: str, session_id: str) -> Iterator[list[subprocess.Popen[str]]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": nats_url}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swarmbus._cli",
                "consensus",
                "--bucket",
                bucket,
                "--session",
                session_id,
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert "ready" in proc.stdout.readline()
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _votes_for(i: int) -> list[str]:
    return [("yes", "no", "abstain", "yes")[(i + 3 * k + k * k) % 4] for k in range(5)]


def _quorum_for(i: int) -> dict[str, object]:
    return [
        {"quorum": "majority"},
        {"quorum": "unanimous"},
        {"quorum": "threshold", "threshold": 0.6},
    ][i % 3]


@pytest.mark.fault
@pytest.mark.slow
async def test_200_proposals_5_voters_two_replicas_one_killed(
    bus: Bus,
    consensus: Consensus,
    session_id: str,
    replicas: list[subprocess.Popen[str]],
) -> None:
    n = 200
    limiter = anyio.Semaphore(64)
    cast = 0
    killed = False

    async def run(i: int) -> None:
        nonlocal cast, killed
        async with limiter:
            await _propose(consensus, session_id, f"ha{i}", timeout=60, **_quorum_for(i))
            for voter, vote in zip(VOTERS, _votes_for(i), strict=True):
                try:
                    await consensus.vote(Vote(proposal_id=f"ha{i}", vote=vote), agent=voter)  # type: ignore[arg-type]
                except ProposalClosedError:
                    break
                cast += 1
                if cast >= 400 and not killed:
                    killed = True
                    os.kill(replicas[0].pid, signal.SIGKILL)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(run, i)
    assert killed

    # Every decision event stored in the stream, read back from its start.
    seen: Counter[str] = Counter()
    sub = await bus.js.subscribe(
        f"agent.action.decided.{session_id}.>",
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    with anyio.fail_after(30):
        while len(seen) < n:
            msg = await sub.next_msg(timeout=30)
            message = decode(msg.data)
            assert isinstance(message, DecisionMessage)
            seen[message.decision.proposal_id] += 1
    await sub.unsubscribe()

    for i in range(n):
        record = await consensus.get(f"ha{i}")
        decision = record.decision
        assert isinstance(decision, Decision)
        quorum = _quorum_for(i)
        full = Tally.of(_votes_for(i), 5)
        expected = final_outcome(quorum["quorum"], quorum.get("threshold"), full)  # type: ignore[arg-type]
        assert decision.outcome == expected, (i, _votes_for(i), decision)
        assert decision.votes == record.votes
        assert Tally.of((b.vote for b in decision.votes), 5) == Tally(
            5, decision.votes_for, decision.votes_against, decision.abstentions
        )
    info = await bus.js.stream_info(
        "SWARMBUS_EVENTS", subjects_filter=f"agent.action.decided.{session_id}.>"
    )
    assert sum((info.state.subjects or {}).values()) == n
    assert set(seen.values()) == {1}


def test_cli_service_stops_cleanly_on_sigterm(nats_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": nats_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmbus._cli", "consensus", "--session", "S-cli"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "ready" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.fault
async def test_a_decision_recorded_but_never_published_is_published_once(
    bus: Bus, consensus: Consensus, bucket: str, session_id: str
) -> None:
    """A replica that died between its CAS and its publish: the others publish for it."""
    consensus = await Consensus.open(bus, bucket=bucket, settle=False)  # nobody settles it
    await _propose(consensus, session_id, "orphan", timeout=60)
    await _cast(consensus, "orphan", "yes", "yes", "yes")
    record, revision = await consensus.book.read("orphan")
    decision = decision_of(record, closed=False, at=now())
    assert decision is not None
    orphan = msgspec.structs.replace(record, decision=decision)
    await consensus.store.update(
        proposal_key("orphan"), msgspec.json.encode(orphan), revision=revision
    )

    events: list[DecisionMessage] = []
    got = anyio.Event()

    async def on_msg(message: Message) -> None:
        assert isinstance(message, DecisionMessage)
        events.append(message)
        got.set()

    await bus.subscribe(f"agent.action.decided.{session_id}.>", on_msg, receiver="test/obs")
    async with (
        ConsensusService(bus, bucket=bucket, session=session_id, republish_after=0.2) as one,
        ConsensusService(bus, bucket=bucket, session=session_id, republish_after=0.2) as two,
    ):
        with anyio.fail_after(5):
            await got.wait()
            watcher = await (await bus.js.key_value(bucket)).watch(proposal_key("orphan"))
            async for entry in watcher:
                if entry is not None and msgspec.json.decode(entry.value)["published"]:
                    break
            await watcher.stop()  # type: ignore[no-untyped-call]
    assert one.decided + two.decided == 0
    assert events[0].decision == decision
    assert events[0].id == decision_message_id("orphan")
    info = await bus.js.stream_info(
        "SWARMBUS_EVENTS", subjects_filter=f"agent.action.decided.{session_id}.>"
    )
    assert sum((info.state.subjects or {}).values()) == 1


async def test_proposal_and_decision_are_recorded_on_the_blackboard(
    bus: Bus, consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    board = await Blackboard.open(bus, session_id)
    await _propose(consensus, session_id, "rb-1", timeout=60, target="checkout")
    pending = await board.get_action("rb-1")
    assert (pending.action, pending.status, pending.target) == (
        "rollback",
        "awaiting_approval",
        "checkout",
    )
    await _cast(consensus, "rb-1", "yes", "no", "yes", "yes")
    await consensus.wait_for_decision("rb-1", timeout=5)
    with anyio.fail_after(5):
        async for item in board.watch():
            records = item.actions_taken if isinstance(item, Snapshot) else [item.value]
            if any(getattr(r, "status", "") == "approved" for r in records):
                break
    action = await board.get_action("rb-1")
    assert action.status == "approved"
    assert action.history[-1].agent == "swarmbus/consensus"
    assert "3 for, 1 against" in action.history[-1].reason


async def test_task_approval_waits_on_the_consensus_decision(
    bus: Bus, consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:
        gated, refused = [
            await queue.create(
                "remediate", agent=VOTERS[0], requires_approval=True, approvers=VOTERS
            )
            for _ in range(2)
        ]
        assert await queue.claim(agent="ops/worker", types=["remediate"]) is None
        for task in (gated, refused):
            await consensus.propose_task_approval(
                task.id, agent=VOTERS[0], session=session_id, voters=VOTERS, timeout=60
            )
        await _cast(consensus, f"approve-{gated.id}", "yes", "yes", "yes")
        await _cast(consensus, f"approve-{refused.id}", "no", "no", "no")
        for pid in (f"approve-{gated.id}", f"approve-{refused.id}"):
            await consensus.wait_for_decision(pid, timeout=5)
        claim = await queue.claim(agent="ops/worker", types=["remediate"], timeout=5)
        assert claim is not None
        assert claim.task.id == gated.id
        assert (await queue.get(gated.id)).approved_by == "swarmbus/consensus"
        with anyio.fail_after(5):
            while (await queue.get(refused.id)).status != "failed":
                await anyio.wait_all_tasks_blocked()
        assert (await queue.get(refused.id)).approval == "rejected"
        assert await queue.claim(agent="ops/worker", types=["remediate"]) is None


MALLORY = "ops/mallory"


async def _applied(consensus: Consensus, pid: str) -> ProposalRecord:
    """The record of ``pid`` once its decision is published and applied."""

    def done(record: ProposalRecord) -> bool:
        return record.published and not record.effects_pending

    with anyio.fail_after(10):
        return await consensus._watch_until(pid, done)


async def test_an_agent_cannot_approve_another_agents_gated_task(
    bus: Bus, consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    for agent in [*VOTERS, MALLORY]:
        await consensus.join(session_id, agent)
    async with TaskQueue(bus, session_id) as queue:
        task = await queue.create("remediate", agent=VOTERS[0], requires_approval=True)
        forged = Proposal(
            proposal_id="grab", action="approve_task", target=task.id, voters=[MALLORY]
        )
        with pytest.raises(InvalidMessageError) as refused:
            await consensus.propose(forged, agent=MALLORY, session=session_id)
        assert refused.value.code == "not_approver"
        # What the service records from MALLORY's own proposal event (no client check):
        await consensus.book.record_proposal(
            forged, agent=MALLORY, session=session_id, message_id=new_id(), at=now()
        )
        await consensus.vote(Vote(proposal_id="grab", vote="yes"), agent=MALLORY)
        record = await _applied(consensus, "grab")
        assert record.decision is not None
        assert record.decision.outcome == "approved"
        assert (await queue.get(task.id)).approval == "required"
        assert await queue.claim(agent=MALLORY, types=["remediate"]) is None


async def test_the_approvers_a_task_names_approve_it(
    bus: Bus, consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    async with TaskQueue(bus, session_id) as queue:
        task = await queue.create(
            "remediate", agent=VOTERS[0], requires_approval=True, approvers=VOTERS
        )
        with pytest.raises(InvalidMessageError, match="approvers"):
            await consensus.propose_task_approval(
                task.id, agent=VOTERS[0], session=session_id, voters=[VOTERS[0]]
            )
        record = await consensus.propose_task_approval(
            task.id, agent=VOTERS[0], session=session_id, timeout=60
        )
        assert record.electorate == sorted(VOTERS)
        await _cast(consensus, record.proposal_id, "yes", "yes", "yes")
        await _applied(consensus, record.proposal_id)
        assert (await queue.get(task.id)).approval == "approved"


async def test_a_squatted_approval_id_does_not_stop_the_owners_approval(
    bus: Bus, consensus: Consensus, service: ConsensusService, session_id: str
) -> None:
    for agent in VOTERS:
        await consensus.join(session_id, agent)
    async with TaskQueue(bus, session_id) as queue:
        task = await queue.create("remediate", agent=VOTERS[0], requires_approval=True)
        squat = Proposal(
            proposal_id=f"approve-{task.id}",
            action="approve_task",
            target=task.id,
            voters=[MALLORY],
        )
        await consensus.book.record_proposal(
            squat, agent=MALLORY, session=session_id, message_id=new_id(), at=now()
        )
        record = await consensus.propose_task_approval(
            task.id, agent=VOTERS[0], session=session_id, timeout=60
        )
        assert record.proposal_id.startswith(f"approve-{task.id}-")
        assert record.electorate == sorted(VOTERS)
        await _cast(consensus, record.proposal_id, "yes", "yes", "yes")
        await _applied(consensus, record.proposal_id)
        assert (await queue.get(task.id)).approval == "approved"
        claim = await queue.claim(agent=VOTERS[1], types=["remediate"], timeout=5)
        assert claim is not None
        assert claim.task.id == task.id


async def test_a_published_decision_expires_after_the_retention(
    bus: Bus, consensus: Consensus, service: ConsensusService, session_id: str, bucket: str
) -> None:
    """The record's last write (decision published) carries the server-side TTL."""
    from swarmbus._consensus import DEFAULT_RETENTION, proposal_key

    await _propose(consensus, session_id, "p-ttl", timeout=60)
    kv = await bus.js.key_value(bucket)
    watcher = await kv.watch(proposal_key("p-ttl"))
    await _cast(consensus, "p-ttl", "yes", "yes", "yes")
    with anyio.fail_after(10):
        async for entry in watcher:
            if entry is not None and entry.value and msgspec.json.decode(entry.value)["published"]:
                break
    await watcher.stop()
    stored = await bus.js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{proposal_key('p-ttl')}")
    assert (stored.headers or {}).get("Nats-TTL") == str(int(DEFAULT_RETENTION))
    for bad in (0, 59.0, 1e10, float("inf")):  # under an hour, or past the server's range
        with pytest.raises(swarmbus.InvalidTTLError):
            ConsensusService(bus, bucket=bucket, retention=bad)


async def test_a_bucket_without_message_ttls_keeps_its_decisions(
    bus: Bus, session_id: str, unique: str
) -> None:
    """A consensus bucket made by another tool (no per-message TTLs): decisions are
    still published and marked so, kept forever instead of failing the write."""
    from nats.js.api import StreamConfig

    from swarmbus._consensus import proposal_key

    bucket = f"NOTTL_{unique}"
    await bus.js.add_stream(
        StreamConfig(
            name=f"KV_{bucket}",
            subjects=[f"$KV.{bucket}.>"],
            max_msgs_per_subject=1,
            allow_direct=True,
            allow_rollup_hdrs=True,
            deny_delete=True,
        )
    )
    consensus = await Consensus.open(bus, bucket=bucket)
    async with ConsensusService(bus, bucket=bucket, session=session_id):
        kv = await bus.js.key_value(bucket)
        watcher = await kv.watch(proposal_key("p-nottl"))
        await _propose(consensus, session_id, "p-nottl", timeout=60)
        await _cast(consensus, "p-nottl", "yes", "yes", "yes")
        with anyio.fail_after(10):
            async for entry in watcher:
                published = entry is not None and entry.value
                if published and msgspec.json.decode(entry.value)["published"]:
                    break
        await watcher.stop()
    stored = await bus.js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{proposal_key('p-nottl')}")
    assert "Nats-TTL" not in (stored.headers or {})


async def test_a_malformed_record_does_not_stop_the_service(
    consensus: Consensus, bucket: str, session_id: str
) -> None:
    await consensus.store.put(proposal_key("junk"), b"not a proposal record")
    async with ConsensusService(bus=consensus.bus, bucket=bucket, session=session_id):
        await _propose(consensus, session_id, "after-junk", voters=VOTERS[:1], timeout=60)
        await _cast(consensus, "after-junk", "yes")
        decision = await consensus.wait_for_decision("after-junk", timeout=5)
    assert decision.outcome == "approved"
    with pytest.raises(swarmbus.SwarmbusError, match="junk"):
        await consensus.get("junk")


async def test_a_record_that_cannot_be_tallied_does_not_stop_the_service(
    consensus: Consensus, bucket: str, session_id: str
) -> None:
    # Decodable, but written by something else: a threshold quorum without a threshold.
    at = now()
    bad = ProposalRecord(
        proposal=Proposal(proposal_id="no-t", action="x", quorum="threshold", voters=VOTERS),
        session=session_id,
        proposer=VOTERS[0],
        message_id="m-no-t",
        created_at=at,
        deadline=at,
        electorate=VOTERS,
        votes=[Ballot(voter=voter, vote="yes") for voter in VOTERS[:3]],
    )
    await consensus.store.put(proposal_key("no-t"), msgspec.json.encode(bad))
    async with ConsensusService(bus=consensus.bus, bucket=bucket, session=session_id):
        await _propose(consensus, session_id, "after-no-t", voters=VOTERS[:1], timeout=60)
        await _cast(consensus, "after-no-t", "yes")
        decision = await consensus.wait_for_decision("after-no-t", timeout=5)
    assert decision.outcome == "approved"
    with pytest.raises(swarmbus.SwarmbusError, match="without a threshold"):
        await consensus.get("no-t")


@pytest.mark.parametrize("via_service", [False, True])
async def test_a_timeout_past_the_calendar_is_a_schema_error(
    bus: Bus, bucket: str, session_id: str, via_service: bool
) -> None:
    consensus = await Consensus.open(bus, bucket=bucket, via_service=via_service)
    with pytest.raises(InvalidMessageError, match="timeout"):
        await _propose(consensus, session_id, "forever", timeout=1e12)
    with pytest.raises(NotFoundError):
        await consensus.get("forever")


async def test_a_proposal_or_vote_too_large_for_the_server_is_a_clear_error(
    consensus: Consensus, session_id: str
) -> None:
    huge = "x" * (consensus.bus.nc.max_payload + 1)
    with pytest.raises(MessageTooLargeError):
        await consensus.propose(
            Proposal(proposal_id="too-big", action="rollback", target=huge, voters=VOTERS),
            agent=VOTERS[0],
            session=session_id,
        )
    await consensus.propose(
        Proposal(proposal_id="fits", action="rollback", voters=VOTERS),
        agent=VOTERS[0],
        session=session_id,
    )
    with pytest.raises(MessageTooLargeError):
        await consensus.vote(Vote(proposal_id="fits", vote="yes", reason=huge), agent=VOTERS[1])
    assert (await consensus.get("fits")).votes == []


@pytest.mark.parametrize("kind", ["proposal", "vote"])
async def test_via_service_a_record_too_large_for_the_server_is_a_clear_error(
    nats_url: str, bucket: str, session_id: str, kind: str
) -> None:
    # The event fits, the record it would make does not: the service can only refuse
    # it, and the client waited for its whole timeout ("is a ConsensusService running?").
    async with Bus.open(url=nats_url, request_timeout=1.0, retry_for=1.0) as bus:
        consensus = await Consensus.open(bus, bucket=bucket, board_bucket=None, via_service=True)
        half = "x" * (bus.nc.max_payload // 2 + 1)
        async with ConsensusService(bus, bucket=bucket, session=session_id, board_bucket=None):
            if kind == "proposal":  # the record holds the voters twice
                voters = [f"ops/{i:07}-{half[:110]}" for i in range(len(half) // 120)]
                with anyio.fail_after(2), pytest.raises(MessageTooLargeError):
                    await _propose(consensus, session_id, "big", voters=voters)
            else:
                await _propose(consensus, session_id, "big", timeout=60)
                # A record holds each reason twice once decided: two thirds fit, four don't.
                third = "x" * (bus.nc.max_payload // 3)
                vote = Vote(proposal_id="big", vote="yes", reason=third)
                await consensus.vote(vote, agent=VOTERS[0])
                with anyio.fail_after(2), pytest.raises(MessageTooLargeError):
                    await consensus.vote(vote, agent=VOTERS[1])


# --- deciding without a service, exactly once (issue 20) ----------------------------------------


class _Decisions:
    """Live ``decided`` events of a session, as a subscriber sees them."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.changed = anyio.Event()

    async def on_msg(self, message: Message) -> None:
        assert isinstance(message, DecisionMessage)
        self.ids.append(message.decision.proposal_id)
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, count: int) -> None:
        with anyio.fail_after(20):
            while len(self.ids) < count:
                await self.changed.wait()


async def test_clients_decide_without_a_service_once_each(
    bus: Bus, bucket: str, session_id: str
) -> None:
    seen = _Decisions()
    await bus.subscribe(f"agent.action.decided.{session_id}.>", seen.on_msg, receiver="test/obs")
    clients = [await Consensus.open(bus, bucket=bucket) for _ in range(3)]
    for i in range(10):
        await _propose(clients[0], session_id, f"c{i}", timeout=60)

    async def cast(client: Consensus, voter: str, pid: str) -> None:
        with contextlib.suppress(ProposalClosedError):
            await client.vote(Vote(proposal_id=pid, vote="yes"), agent=voter)

    async with anyio.create_task_group() as tg:  # voters race on three clients
        for i in range(10):
            for k, voter in enumerate(VOTERS):
                tg.start_soon(cast, clients[k % 3], voter, f"c{i}")
    await seen.until(10)
    for i in range(10):
        assert (await clients[1].get(f"c{i}")).decision is not None
    # every vote (and so every winner's publish) has returned: the stream holds them all
    assert sum(c.decided for c in clients) == 10
    assert Counter(seen.ids) == {f"c{i}": 1 for i in range(10)}
    info = await bus.js.stream_info(
        "SWARMBUS_EVENTS", subjects_filter=f"agent.action.decided.{session_id}.>"
    )
    assert sum((info.state.subjects or {}).values()) == 10


async def test_two_replicas_and_a_client_publish_each_decision_once(
    bus: Bus, bucket: str, session_id: str
) -> None:
    """Live subscribers see one ``decided`` event per proposal (the CAS winner's)."""
    seen = _Decisions()
    await bus.subscribe(f"agent.action.decided.{session_id}.>", seen.on_msg, receiver="test/obs")
    consensus = await Consensus.open(bus, bucket=bucket)
    async with (
        ConsensusService(bus, bucket=bucket, session=session_id) as one,
        ConsensusService(bus, bucket=bucket, session=session_id) as two,
    ):
        for i in range(30):
            await _propose(consensus, session_id, f"d{i}", timeout=60)
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(_cast_tolerant, consensus, f"d{i}", ["yes"] * 5)
        await seen.until(30)
        for i in range(30):
            await consensus.wait_for_decision(f"d{i}", timeout=5)
    assert one.decided + two.decided + consensus.decided == 30
    assert Counter(seen.ids) == {f"d{i}": 1 for i in range(30)}


async def test_a_deadline_is_settled_by_a_waiting_client(
    bus: Bus, bucket: str, session_id: str
) -> None:
    consensus = await Consensus.open(bus, bucket=bucket)
    await _propose(consensus, session_id, "late", timeout=1)
    await _cast(consensus, "late", "yes", "yes", "-", "-", "-")
    decision = await consensus.wait_for_decision("late", timeout=10)
    assert (decision.outcome, decision.closed_by) == ("no_quorum", "timeout")


async def test_an_oversized_proposal_is_refused_whole_before_anything_is_written(
    bus: Bus, consensus: Consensus, session_id: str
) -> None:
    board = await Blackboard.open(bus, session_id)
    limit = consensus.book.max_proposal_bytes
    big = Proposal(
        proposal_id="huge",
        action="patch",
        parameters={"diff": "x" * 300_000},  # under 1 MiB, over the proposal limit
        voters=VOTERS,
    )
    with pytest.raises(MessageTooLargeError, match=f"limit is {limit} bytes"):
        await consensus.propose(big, agent=VOTERS[0], session=session_id)
    with pytest.raises(NotFoundError):
        await consensus.get("huge")
    with pytest.raises(NotFoundError):
        await board.get_action("huge")


async def test_waits_and_votes_leave_no_watch_consumers(
    bus: Bus, consensus: Consensus, bucket: str, session_id: str
) -> None:
    await _propose(consensus, session_id, "w1", timeout=60)
    with pytest.raises(DecisionTimeoutError):
        await consensus.wait_for_decision("w1", timeout=0.2)
    await _cast(consensus, "w1", "yes", "yes", "yes")
    await consensus.wait_for_decision("w1", timeout=5)
    info = await bus.js.stream_info(f"KV_{bucket}")
    assert info.state.consumer_count == 0


async def test_two_service_processes_publish_each_decision_once_to_live_subscribers(
    bus: Bus, bucket: str, session_id: str, replicas: list[subprocess.Popen[str]]
) -> None:
    """Two ``swarmbus consensus`` replicas race on every proposal: one event each."""
    seen = _Decisions()
    await bus.subscribe(f"agent.action.decided.{session_id}.>", seen.on_msg, receiver="test/obs")
    consensus = await Consensus.open(bus, bucket=bucket, settle=False)  # the replicas decide
    for i in range(40):
        await _propose(consensus, session_id, f"s{i}", timeout=60)
    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(_cast_tolerant, consensus, f"s{i}", ["yes"] * 5)
    await seen.until(40)
    finished: set[str] = set()  # records marked published and applied: nobody publishes more
    with anyio.fail_after(20):
        async with consensus.store.watch("p.") as entries:
            async for entry in entries:
                if entry is not None and entry.value:
                    record = msgspec.json.decode(entry.value, type=ProposalRecord)
                    if record.published and not record.effects_pending:
                        finished.add(record.proposal_id)
                if len(finished) == 40:
                    break
    assert Counter(seen.ids) == {f"s{i}": 1 for i in range(40)}
