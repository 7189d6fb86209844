"""The first routing policy and consensus aggregation, on fixed inputs."""

from __future__ import annotations

from activities import aggregate, routing
from xpando.contracts import Contribution, ContributionStatus


def _card(
    node_id: str, keywords: str, *, provider: str = "offline", region: str = "eu"
) -> routing.NodeCard:
    domains = [{"name": node_id.split("-")[0], "description": "", "keywords": keywords.split()}]
    return routing.NodeCard(
        node_id=node_id,
        region=region,
        provider=provider,
        model="m",
        task_queue=f"node.{node_id}",
        domains=(node_id.split("-")[0],),
        terms=routing.node_terms(domains),
    )


NODES = [
    _card("cooking-1", "bread pasta egg boil oven"),
    _card("astronomy-1", "planet star moon telescope orbit"),
    _card("gardening-1", "tomato soil compost prune water"),
]


def test_domain_expert_ranks_first() -> None:
    ranked = routing.score_nodes("how long to boil an egg", NODES)
    assert ranked[0].node.node_id == "cooking-1" and ranked[0].fit > 0
    assert all(s.fit == 0 for s in ranked[1:])
    ranked = routing.score_nodes("which planet has the most moons", NODES)
    assert ranked[0].node.node_id == "astronomy-1"


def test_named_domain_wins_over_word_overlap() -> None:
    ranked = routing.score_nodes("water the tomato", NODES, domain="cooking")
    assert ranked[0].node.node_id == "cooking-1"


def test_selection_prefers_diverse_provider_region_pairs() -> None:
    nodes = [
        _card("a-1", "bread", provider="p1", region="eu"),
        _card("a-2", "bread", provider="p1", region="eu"),
        _card("a-3", "bread", provider="p2", region="us"),
    ]
    chosen, standbys = routing.select(routing.score_nodes("bread", nodes), k=2, standbys=1)
    assert {c.node.provider for c in chosen} == {"p1", "p2"}
    assert len(standbys) == 1 and standbys[0].node.node_id not in {c.node.node_id for c in chosen}


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
