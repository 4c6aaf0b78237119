"""The seed's consensus block as a file: a proposal, its rules, votes and a result.

The seed writes voting as YAML (``consensus: type: voting, quorum, threshold, timeout:
5m, proposal, votes, result``). ``load_consensus`` reads it into a ``ConsensusSpec``
that turns into the wire's ``Proposal`` and ``Vote`` bodies, so a team can keep a vote's
rules in a file, replay a recorded vote, or check a recorded result against its votes.

Votes are the words ``yes``, ``no``, ``abstain``: the file is read with YAML 1.2
booleans (``_yaml``), and a ``True``/``False`` from another YAML 1.1 loader maps back
to ``yes``/``no``. ``timeout`` takes durations (``5m``) or seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

import pydantic
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from swarmbus import _subjects as subjects
from swarmbus._durations import parse_duration
from swarmbus._errors import SpecError
from swarmbus._messages import Proposal, Vote
from swarmbus._yaml import load_yaml

QUORUMS = ("majority", "unanimous", "threshold")


def _one_choice(value: object) -> object:
    if isinstance(value, str) and "|" in value:
        raise ValueError(f"pick one of {', '.join(QUORUMS)} (the seed's line lists the choices)")
    return value


def _vote_word(value: object) -> object:
    # A YAML 1.1 loader (PyYAML's safe_load) reads the seed's ``vote: yes`` as True.
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VoteSpec(_Model):
    """One recorded vote: the seed's ``{agent, vote, confidence, reason}``."""

    agent: Annotated[str, BeforeValidator(subjects.validate_agent_id)]
    vote: Annotated[Literal["yes", "no", "abstain"], BeforeValidator(_vote_word)]
    confidence: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    reason: str = ""


class ProposalSpec(BaseModel):
    """What is put to the vote: ``action`` and any parameters (``version: v1.2.3``)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    action: str
    target: str = ""


class ResultSpec(_Model):
    """A recorded outcome; checked against the votes when both are given."""

    decision: str
    votes_for: int = 0
    votes_against: int = 0
    abstentions: int = 0


class ConsensusSpec(_Model):
    """A vote's rules, its proposal and optionally its votes and result."""

    type: Literal["voting"] = "voting"
    quorum: Annotated[
        Literal["majority", "unanimous", "threshold"], BeforeValidator(_one_choice)
    ] = "majority"
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    timeout: Annotated[float, BeforeValidator(parse_duration)] = 300.0
    voters: list[Annotated[str, BeforeValidator(subjects.validate_agent_id)]] = []
    proposal: ProposalSpec
    votes: list[VoteSpec] = []
    result: ResultSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.quorum == "threshold" and self.threshold is None:
            raise ValueError("quorum: threshold needs a threshold (0.0-1.0)")
        if self.result is not None and self.votes:
            tally = {w: sum(v.vote == w for v in self.votes) for w in ("yes", "no", "abstain")}
            recorded = (self.result.votes_for, self.result.votes_against, self.result.abstentions)
            if recorded != (tally["yes"], tally["no"], tally["abstain"]):
                raise ValueError(
                    f"result counts {recorded} disagree with the votes "
                    f"({tally['yes']} yes, {tally['no']} no, {tally['abstain']} abstain)"
                )
        return self

    def to_proposal(self, proposal_id: str) -> Proposal:
        """The wire's Proposal body for this vote."""
        parameters: dict[str, Any] = dict(self.proposal.model_extra or {})
        return Proposal(
            proposal_id=proposal_id,
            action=self.proposal.action,
            target=self.proposal.target,
            parameters=parameters,
            quorum=self.quorum,
            threshold=self.threshold if self.quorum == "threshold" else None,
            timeout=self.timeout,
            voters=list(self.voters),
        )

    def to_votes(self, proposal_id: str) -> list[tuple[str, Vote]]:
        """``(voter, Vote body)`` for every recorded vote."""
        return [
            (
                v.agent,
                Vote(
                    proposal_id=proposal_id, vote=v.vote, confidence=v.confidence, reason=v.reason
                ),
            )
            for v in self.votes
        ]


class _ConsensusFile(_Model):
    consensus: ConsensusSpec


def _problems(exc: pydantic.ValidationError) -> list[tuple[str, str]]:
    out = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "required field is missing"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        out.append((path, message))
    return out


def parse_consensus(data: object, *, source: str = "<consensus>") -> ConsensusSpec:
    """Validate a loaded YAML document (``{consensus: {...}}``).

    Raises:
        SpecError: naming each bad field (``consensus.quorum: pick one of ...``).
    """
    try:
        return _ConsensusFile.model_validate(data).consensus
    except pydantic.ValidationError as exc:
        raise SpecError(source, _problems(exc)) from None


def load_consensus(path: str | Path) -> ConsensusSpec:
    """Read and validate a consensus YAML file (the seed's ``consensus:`` block).

    Raises:
        SpecError: the file is missing, not YAML, or not a valid consensus block.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = load_yaml(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(source, [("(file)", str(exc))]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [("(file)", f"not valid YAML: {exc}")]) from None
    return parse_consensus(data, source=source)
