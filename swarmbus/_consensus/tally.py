"""Tallying votes (pure): the voting rules of ``swarmbus._consensus`` as functions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, TypeAlias

__all__ = ["Outcome", "Quorum", "Tally", "early_outcome", "final_outcome", "tally_outcome"]

Outcome: TypeAlias = Literal["approved", "rejected", "no_quorum"]
Quorum: TypeAlias = Literal["majority", "unanimous", "threshold"]


@dataclass(frozen=True)
class Tally:
    """Vote counts against the size of the electorate."""

    eligible: int
    votes_for: int = 0
    votes_against: int = 0
    abstentions: int = 0

    @property
    def cast(self) -> int:
        """Ballots cast, abstentions included."""
        return self.votes_for + self.votes_against + self.abstentions

    @property
    def missing(self) -> int:
        """Members who have not voted yet."""
        return self.eligible - self.cast

    @classmethod
    def of(cls, votes: Iterable[str], eligible: int) -> Tally:
        """Count ``yes`` / ``no`` / ``abstain`` values."""
        values = list(votes)
        return cls(eligible, values.count("yes"), values.count("no"), values.count("abstain"))


def final_outcome(quorum: Quorum, threshold: float | None, tally: Tally) -> Outcome:
    """The outcome if the proposal closed now with these votes."""
    yes, no = tally.votes_for, tally.votes_against
    if quorum == "unanimous":
        if no:
            return "rejected"
        if tally.missing > 0:
            return "no_quorum"
        return "approved" if yes else "rejected"
    if 2 * tally.cast <= tally.eligible:
        return "no_quorum"
    if quorum == "majority":
        approved = yes > no
    else:
        if threshold is None:
            raise ValueError("a threshold quorum needs a threshold")
        approved = yes > 0 and yes >= Fraction(str(threshold)) * (yes + no)
    return "approved" if approved else "rejected"


def early_outcome(quorum: Quorum, threshold: float | None, tally: Tally) -> Outcome | None:
    """The outcome if no way the missing votes could go can change it, else None.

    Every rule is monotone (more yes only helps approval, more no only helps
    rejection, more ballots only help the quorum), so it is enough to look at the
    three extremes: all missing vote yes, all vote no, nobody votes any more.
    """
    m = tally.missing
    extremes = {
        final_outcome(quorum, threshold, tally),
        final_outcome(
            quorum,
            threshold,
            Tally(tally.eligible, tally.votes_for + m, tally.votes_against, tally.abstentions),
        ),
        final_outcome(
            quorum,
            threshold,
            Tally(tally.eligible, tally.votes_for, tally.votes_against + m, tally.abstentions),
        ),
    }
    return extremes.pop() if len(extremes) == 1 else None


def tally_outcome(
    quorum: Quorum, threshold: float | None, tally: Tally, *, closed: bool
) -> Outcome | None:
    """The outcome now: final if ``closed`` (deadline passed), else only if certain."""
    if closed:
        return final_outcome(quorum, threshold, tally)
    return early_outcome(quorum, threshold, tally)
