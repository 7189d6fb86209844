"""Consensus aggregation on fixed inputs (routing: tests/test_routing.py)."""

from __future__ import annotations

from xpando.contracts import Contribution, ContributionStatus
from xpando.mother import aggregate


def _c(
    node_id: str, status: ContributionStatus, answer: str = "", relevance: float = 0.0
) -> Contribution:
    return Contribution(
        node_id=node_id,
        region="eu",
        provider="offline",
        model="m",
        status=status,
        answer=answer,
        relevance=relevance,
    )


def test_consensus_prefers_the_answer_others_agree_with() -> None:
    result = aggregate.consensus(
        [
            _c("n1", ContributionStatus.OK, "boil the egg for six minutes", 0.7),
            _c("n2", ContributionStatus.OK, "six minutes in boiling water for a soft egg", 0.7),
            _c("n3", ContributionStatus.OK, "bake bread at high oven heat", 0.75),
        ]
    )
    by = {c.node_id: c for c in result.contributions}
    assert result.answer in {
        "boil the egg for six minutes",
        "six minutes in boiling water for a soft egg",
    }
    assert by["n3"].quality < min(by["n1"].quality, by["n2"].quality)
    assert 0 < result.confidence <= 1


def test_failed_and_empty_contributions_score_zero() -> None:
    result = aggregate.consensus(
        [
            _c("n1", ContributionStatus.OK, "answer", 0.9),
            _c("n2", ContributionStatus.NO_ANSWER, "nothing found", 0.1),
            _c("n3", ContributionStatus.FAILED),
        ]
    )
    by = {c.node_id: c for c in result.contributions}
    assert by["n2"].quality == 0 and by["n3"].quality == 0 and by["n1"].quality > 0
    assert result.answer == "answer"


def test_no_relevant_answer_is_said_plainly_with_zero_confidence() -> None:
    result = aggregate.consensus([_c("n1", ContributionStatus.NO_ANSWER, "nothing", 0.1)])
    assert result.answer == aggregate.NO_ANSWER_TEXT and result.confidence == 0
