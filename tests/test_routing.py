"""Routing decisions through the ``route`` activity's code (``Router.route``) over a real
database, the real embedder and a routing index loaded from it.

Liveness: these tests register nodes without running 24 workers, so they hand the real
``NodeLiveness`` a heartbeat sweep that reports every node worker running (``observe``, the method
a real ``ListWorkers`` sweep ends in); the workflow tests cover liveness from real workers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from workers.wiring import build_knowledge_index
from xpando.breakers import BreakerBook
from xpando.contracts import (
    Contribution,
    ContributionStatus,
    NodeDomain,
    NodeProfile,
    RecordInput,
    RouteInput,
    RouteOutcome,
    RouteResult,
    TaskStage,
)
from xpando.db import SessionFactory, queries, session_factory
from xpando.db import nodes as node_queries
from xpando.embedding import HashingEmbedder
from xpando.routing.index import RoutingConfig, RoutingIndex, explores
from xpando.routing.router import Router
from xpando.settings import Settings
from xpando.temporal import NodeLiveness, WorkerBeat

LABELLED = Path(__file__).parent / "data" / "routing_labelled.jsonl"
PROVIDERS = ("openai", "anthropic", "gemini")
REGIONS = ("eu-west", "us-east")
ACCURACY_FLOOR = 0.85  # top expert in the labelled domain (measured: 0.93)
PANEL_FLOOR = 0.8  # all k=3 experts in the labelled domain


def _labelled() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "domain"], [r for r in rows if r["kind"] == "prompt"]


def _live(client: Client, queues: list[str], *, stopped: tuple[str, ...] = ()) -> NodeLiveness:
    liveness = NodeLiveness(client, max_age_s=90, sweep_s=3600)
    now = time.time()
    liveness.observe(
        {
            q: WorkerBeat(running=q not in stopped, stopped=q in stopped, at=now)
            for q in [*queues, *stopped]
        }
    )
    return liveness


async def _register(sessions: SessionFactory, profiles: list[NodeProfile]) -> None:
    async with sessions() as s:
        for p in profiles:
            await queries.upsert_node(session=s, profile=p, now=datetime.now(UTC))


def _core(
    sessions: SessionFactory,
    settings: Settings,
    liveness: NodeLiveness,
    config: RoutingConfig | None = None,
) -> Router:
    knowledge = build_knowledge_index(sessions, settings)
    return Router(
        sessions=sessions,
        index=RoutingIndex(
            sessions, knowledge.embedder, config=config or RoutingConfig.from_settings(settings)
        ),
        breaker_book=BreakerBook(sessions),
        liveness=liveness,
    )


async def _route(core: Router, prompt: str, **kw: Any) -> RouteResult:
    values: dict[str, Any] = {"task_id": f"t-{uuid.uuid4().hex[:8]}", "k": 3, "standbys": 2}
    values.update(kw)
    return await core.route(RouteInput(prompt=prompt, **values))


async def test_routing_picks_the_domain_experts_on_a_labelled_set(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    domains, prompts = _labelled()
    profiles = [
        NodeProfile(
            node_id=f"{d['name']}-{i}",
            region=REGIONS[i % 2],
            provider=PROVIDERS[i],
            model="m",
            domains=[
                NodeDomain(name=d["name"], description=d["description"], keywords=d["keywords"])
            ],
        )
        for d in domains
        for i in range(3)
    ]
    await _register(sessions, profiles)
    core = _core(sessions, settings, _live(client, [p.task_queue for p in profiles]))
    top_hits = panel_hits = 0
    misses = []
    for row in prompts:
        route = await _route(core, row["prompt"], task_id=f"t-{uuid.uuid4().hex[:8]}")
        chosen = [c.domains[0] for c in route.chosen]
        top_hits += chosen[0] == row["domain"]
        panel_hits += all(d == row["domain"] for d in chosen)
        if chosen[0] != row["domain"]:
            misses.append(f"{row['domain']} -> {chosen[0]}: {row['prompt']}")
        assert route.domain == chosen[0]
    accuracy, panel = top_hits / len(prompts), panel_hits / len(prompts)
    print(f"\nrouting accuracy on {len(prompts)} labelled prompts over {len(domains)} domains:")
    print(f"  top expert in the right domain: {accuracy:.3f}; all 3 experts: {panel:.3f}")
    print("  misses:\n    " + "\n    ".join(misses))
    assert accuracy >= ACCURACY_FLOOR
    assert panel >= PANEL_FLOOR


async def test_every_decision_is_explained_and_regions_are_honoured(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    cooking = "Cooking at home: recipes, baking bread, boiling eggs and pasta"
    profiles = [
        NodeProfile(
            node_id=f"cook-{i}",
            region=REGIONS[i % 2],
            provider=PROVIDERS[i % 3],
            model="m",
            domains=[NodeDomain(name="cooking", description=cooking)],
            price_input_per_mtok=3.0 * i,
            price_output_per_mtok=15.0 * i,
        )
        for i in range(5)
    ] + [
        NodeProfile(
            node_id="stars",
            region="eu-west",
            provider="openai",
            model="m",
            domains=[NodeDomain(name="astronomy", description="planets, stars and telescopes")],
        )
    ]
    await _register(sessions, profiles)
    async with sessions() as s:  # cook-1's breaker is open
        await queries.record_expert_outcome(
            session=s,
            event_id="e1",
            task_id="t0",
            node_id="cook-1",
            provider="anthropic",
            region="us-east",
            ok=False,
            error_type="ProviderServerError",
            error="boom",
            effects=[("node:cook-1", "node", 1)],
            healthy=[],
            cooldown_s=60,
            now=datetime.now(UTC),
        )
    queues = [p.task_queue for p in profiles if p.node_id != "cook-2"]
    core = _core(sessions, settings, _live(client, queues, stopped=("node.cook-2",)))

    route = await _route(core, "How long do I boil an egg?", k=2, standbys=1)
    report = route.report
    assert report is not None and "fit ** 4" in report.formula
    assert report.considered == 6
    by_node = {c.node_id: c for c in report.candidates}
    outcomes = Counter(c.outcome for c in report.candidates)
    assert outcomes[RouteOutcome.CHOSEN] == 2 and outcomes[RouteOutcome.STANDBY] == 1
    assert by_node["cook-1"].outcome == RouteOutcome.SKIPPED
    assert by_node["cook-1"].reason == "circuit breaker open" and by_node["cook-1"].health == 0
    assert by_node["cook-2"].reason.startswith("not live")
    for c in report.candidates:  # every term is there, and the score is their product
        assert 0 <= c.fit <= 1 and c.reputation == 0.5 and c.price >= 1
        expected = c.fit**4 * max(c.reputation, 0.05) * c.health * c.diversity / c.price
        assert c.score == pytest.approx(expected, rel=1e-4)
    # Price divides: the free cook-0 ranks above the dearer cook-3 and cook-4 (same fit).
    assert by_node["cook-0"].price == 1.0 and by_node["cook-4"].price > by_node["cook-3"].price > 1
    assert route.chosen[0].node_id == "cook-0"
    # Diversity: two experts of different regions when the fits are equal.
    assert len({c.region for c in route.chosen}) == 2
    assert all(c.domains == ["cooking"] for c in route.chosen)

    east = await _route(core, "How long do I boil an egg?", k=3, regions=["us-east"])
    assert {c.region for c in [*east.chosen, *east.standbys]} == {"us-east"}
    assert east.report is not None and east.report.considered == 2  # cook-1, cook-3
    assert [c.node_id for c in east.chosen] == ["cook-3"]  # cook-1's breaker is open
    with pytest.raises(ApplicationError) as info:
        await _route(core, "How long do I boil an egg?", regions=["ap-south"])
    assert info.value.type == "NoExpertsAvailable"


async def test_reputation_and_exploration_in_the_score(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    profiles = [
        NodeProfile(
            node_id=name,
            region="eu-west",
            provider=provider,
            model="m",
            domains=[NodeDomain(name="cooking", description="recipes, baking and boiling eggs")],
        )
        for name, provider in (("veteran", "openai"), ("steady", "anthropic"), ("rookie", "gemini"))
    ]
    await _register(sessions, profiles)
    async with sessions() as s:  # veteran and steady have a record; rookie has none
        for i in range(6):
            record = RecordInput(
                task_id=f"past-{i}",
                prompt="p",
                domain="cooking",
                status=TaskStage.COMPLETED,
                contributions=[
                    _scored("veteran", 0.9),
                    _scored("steady", 0.6),
                ],
            )
            await node_queries.apply_reputation(
                session=s,
                record=record,
                params=node_queries.ReputationParams(),
                now=datetime.now(UTC),
            )
    queues = [p.task_queue for p in profiles]
    no_explore = RoutingConfig(exploration=0.0)
    core = _core(sessions, settings, _live(client, queues), config=no_explore)
    route = await _route(core, "How do I boil an egg?", k=2, standbys=1)
    assert [c.node_id for c in route.chosen] == ["veteran", "steady"]  # by reputation
    assert route.chosen[0].reputation is not None and route.chosen[0].reputation > 0.8
    assert [c.node_id for c in route.standbys] == ["rookie"]

    always = RoutingConfig(exploration=1.0)
    core = _core(sessions, settings, _live(client, queues), config=always)
    route = await _route(core, "How do I boil an egg?", k=2, standbys=1)
    assert [c.node_id for c in route.chosen] == ["veteran", "rookie"]
    assert route.chosen[1].explore and route.report is not None
    assert route.report.candidates[1].reason == "exploration"
    assert [c.node_id for c in route.standbys] == ["steady"]
    k1 = await _route(core, "How do I boil an egg?", k=1, standbys=1)
    assert [c.node_id for c in k1.chosen] == ["veteran"]  # a lone expert is never a trial

    # The share of tasks that explore is bounded by the setting.
    share = sum(explores(f"task-{i}", 0.1) for i in range(2000)) / 2000
    assert 0.08 <= share <= 0.12


def _scored(node_id: str, quality: float) -> Contribution:
    return Contribution(
        node_id=node_id,
        region="eu-west",
        provider="p",
        model="m",
        status=ContributionStatus.OK,
        answer="a",
        quality=quality,
    )


async def test_reputation_moves_once_per_task_and_node(any_engine: AsyncEngine) -> None:
    sessions = session_factory(any_engine)
    async with sessions() as s:
        for node_id in ("good", "bad"):
            await queries.upsert_node(
                session=s,
                profile=NodeProfile(node_id=node_id, region="eu", provider="p", model="m"),
                now=datetime.now(UTC),
            )
    params = node_queries.ReputationParams(prior=0.5, alpha=0.1)
    history: dict[str, list[float]] = {"good": [], "bad": []}
    for i in range(12):
        record = RecordInput(
            task_id=f"task-{i}",
            prompt="p",
            domain=None,
            status=TaskStage.COMPLETED,
            contributions=[
                _scored("good", 0.9),
                _scored("bad", 0.1),
                _scored("bad", 0.1).model_copy(update={"node_id": "gone"}),  # no such node
            ],
        )
        for _ in range(2):  # a retried record must not move anything twice
            async with sessions() as s:
                await node_queries.apply_reputation(
                    session=s, record=record, params=params, now=datetime.now(UTC)
                )
        async with sessions() as s:
            for node_id in history:
                row = await queries.get_node(session=s, node_id=node_id)
                assert row is not None and row.reputation is not None
                history[node_id].append(row.reputation)
                assert row.reputation_n == i + 1
    assert history["good"][0] == pytest.approx(0.7)  # (prior + 0.9) / 2
    assert history["bad"][0] == pytest.approx(0.3)
    assert all(b > a for a, b in zip(history["good"], history["good"][1:], strict=False))
    assert all(b < a for a, b in zip(history["bad"], history["bad"][1:], strict=False))
    assert history["good"][-1] > 0.85 and history["bad"][-1] < 0.15


async def test_the_index_refreshes_incrementally(tmp_path: Path, any_engine: AsyncEngine) -> None:
    sessions = session_factory(any_engine)
    embedder = HashingEmbedder()
    index = RoutingIndex(sessions, embedder, refresh_every_s=0.0)
    profile = NodeProfile(
        node_id="n1",
        region="eu",
        provider="p",
        model="m",
        domains=[NodeDomain(name="cooking", description="eggs and bread")],
    )
    await _register(sessions, [profile])
    await index.refresh()
    vec = embedder.embed(["boil eggs"])[0]
    assert [s.node.node_id for s in index.rank(vec)[0]] == ["n1"]
    await _register(
        sessions,
        [
            profile.model_copy(update={"region": "us"}),
            profile.model_copy(update={"node_id": "n2"}),
        ],
    )
    await index.refresh()
    ranked, considered = index.rank(vec, regions=["us"])
    assert considered == 1 and ranked[0].node.node_id == "n1"
    assert len(index) == 2 and index.distinct_domains == 1  # one text, embedded once
