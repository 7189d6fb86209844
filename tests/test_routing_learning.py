"""Routing that learns from scored contributions (``xpando/routing/index.py``, learned fit).

The experiments are ``bench/learning.py``'s, on the committed labelled set
(``tests/data/routing_learning.jsonl``), with the real embedder, the real ``Router.route`` and
the real record step over SQLite; the experts are simulated (an expert answers its own domain
well, any other at quality 0.05). The learned state's rebuild and sharing run on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from temporalio.client import Client
from temporalio.worker import Worker

from activities.recording import RecordingActivities
from bench.learning import (
    Simulation,
    fairness,
    gini,
    honest,
    learning_curve,
    learning_set,
    liar,
)
from tests.conftest import wait_live
from tests.fakes.networks import register_fake_nodes
from tests.test_quorum_and_reputation import PROMPT, Experts
from tests.test_routing import _scored
from workers.core import build_core_worker
from workflows.task import TaskWorkflow
from xpando import temporal
from xpando.breakers import BreakerBook
from xpando.contracts import (
    NodeDomain,
    NodeProfile,
    RecordInput,
    RouteInput,
    TaskInput,
    TaskResult,
    TaskStage,
    node_task_queue,
)
from xpando.db import SessionFactory, create_engine, init_db, queries, session_factory
from xpando.db.models import NodeTopic
from xpando.db.nodes import ReputationParams
from xpando.embedding import embedder_from_settings
from xpando.routing.index import CachedEmbedder, RoutingIndex, cached_embedder
from xpando.settings import Settings


@pytest.fixture(scope="module")
def embedder() -> CachedEmbedder:
    embedder = cached_embedder(embedder_from_settings(Settings(_env_file=None)))
    _, prompts = learning_set()
    embedder.embed([p.text for p in prompts])
    return embedder


@pytest.fixture
async def sim(tmp_path: Path, embedder: CachedEmbedder) -> AsyncIterator[Simulation]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'sim.db'}")
    await init_db(engine)
    domains, _ = learning_set()
    try:
        yield Simulation(session_factory(engine), embedder, domains)
    finally:
        await engine.dispose()


async def test_held_out_accuracy_rises_with_traffic(sim: Simulation) -> None:
    _, prompts = learning_set()
    curve = await learning_curve(sim, prompts, marks=(100, 300))
    print(f"\nheld-out accuracy of the top expert by warm-up tasks: {curve}")
    (_, before), (_, mid), (_, after) = curve
    assert before < 0.9  # the declared fit alone misroutes these prompts
    assert after >= 0.95 and after > mid >= before


async def test_a_liar_loses_the_topic_it_lies_about_and_keeps_the_one_it_knows(
    sim: Simulation,
) -> None:
    _, prompts = learning_set()
    f = await liar(sim, prompts)
    print(f"\n{f}")
    assert f.python_first >= 0.3  # trusted for what it declares at first
    assert f.python_after <= 0.05  # until its answers there are scored low
    assert f.solana_after >= 0.9 * f.solana_first  # its real domain is not held against it
    assert f.newcomer >= 0.05  # an honest new node still gets exploration's share


async def test_equals_share_the_work_and_a_better_node_earns_more(
    tmp_path: Path, embedder: CachedEmbedder
) -> None:
    domains, prompts = learning_set()
    shares = []
    for better in (None, 0.95):
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / f'fair-{better}.db'}")
        await init_db(engine)
        try:
            sim = Simulation(session_factory(engine), embedder, domains)
            shares.append(await fairness(sim, prompts, tasks=300, better=better))
        finally:
            await engine.dispose()
    equal, skewed = shares
    print(f"\nequal: {sorted(equal.values())}, one better: {skewed.most_common()}")
    assert sum(equal.values()) == 900 and gini(list(equal.values())) <= 0.3
    assert skewed.most_common(1)[0][0] == "python-0"


async def test_the_routing_block_explains_the_blend(sim: Simulation) -> None:
    _, prompts = learning_set()
    python = [p for p in prompts if p.domain == "python" and p.split == "warmup"]
    await sim.add([honest(f"python-{i}", "python", i) for i in range(3)])
    for p in python[:12]:
        await sim.task(p)
    await sim.drain()
    route = await sim.router.route(
        RouteInput(task_id="explain-1", prompt=python[0].text, k=3, standbys=1)
    )
    assert route.report is not None and "learned" in route.report.formula
    kappa = sim.config.prior_weight
    learned = [c for c in route.report.candidates if c.learned_fit is not None]
    assert learned, "the top candidates have answered near this prompt"
    for c in learned:
        assert c.learned_fit is not None
        w = c.evidence / (c.evidence + kappa)
        assert c.evidence > 0 and 0 <= c.declared_fit <= 1
        assert c.fit == pytest.approx(
            c.declared_fit + w * (c.learned_fit - c.declared_fit), abs=1e-5
        )


async def test_learned_state_is_rebuilt_after_a_restart_and_shared_by_core_workers(
    any_engine: AsyncEngine, embedder: CachedEmbedder
) -> None:
    sessions = session_factory(any_engine)
    domains, prompts = learning_set()
    async with sessions() as s:
        for i, name in enumerate(("python", "solana")):
            d = domains[name]
            await queries.upsert_node(
                session=s,
                profile=NodeProfile(
                    node_id=f"{name}-node",
                    region="eu-west",
                    provider=("openai", "gemini")[i],
                    model="m",
                    domains=[NodeDomain(name=name, description=d["description"])],
                ),
                now=datetime.now(UTC),
            )
    first = RoutingIndex(sessions, embedder, refresh_every_s=0.0)  # core worker 1
    second = RoutingIndex(sessions, embedder, refresh_every_s=0.0)  # core worker 2
    await first.refresh(force=True)
    await second.refresh(force=True)
    recording = RecordingActivities(
        sessions=sessions,
        breaker_book=BreakerBook(sessions),
        reputation=ReputationParams(),
        routing=first,
    )
    python = [p for p in prompts if p.domain == "python"][:20]
    for i, p in enumerate(python):
        record = RecordInput(
            task_id=f"learn-{i}",
            prompt=p.text,
            domain="python",
            status=TaskStage.COMPLETED,
            contributions=[_scored("python-node", 0.9), _scored("solana-node", 0.05)],
        )
        await recording.record(record)
        await recording.record(record)  # a retried record counts nothing twice
    probe = embedder.embed([python[0].text])[0]
    await first.refresh(force=True)
    await second.refresh(force=True)
    restarted = RoutingIndex(sessions, embedder, refresh_every_s=0.0)  # core worker 1, again
    await restarted.refresh(force=True)
    views = [
        [index.terms(probe).of(index._slot[n]) for n in ("python-node", "solana-node")]
        for index in (first, second, restarted)
    ]
    (_, python_learned, python_evidence, _, _), (_, solana_learned, _, _, _) = views[0]
    assert python_evidence > 0
    assert python_learned == pytest.approx(0.9) and solana_learned == pytest.approx(0.05)
    flat = [[term for node in view for term in node] for view in views]
    assert flat[1] == pytest.approx(flat[0]) and flat[2] == pytest.approx(flat[0])
    assert first.learned.entries == restarted.learned.entries
    assert first.learned.topics == restarted.learned.topics
    async with sessions() as s:
        rows = (await s.exec(select(NodeTopic))).all()
    assert sum(r.n for r in rows if r.node_id == "python-node") == len(python)  # once each


async def test_two_core_workers_share_what_routing_learned_and_a_restart_keeps_it(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    """TaskWorkflow on the real dev server with two core workers on one queue and database:
    a node whose answers are scored low is no longer chosen whichever worker routes, and a
    core worker started afterwards routes on the same learned state."""
    good_a, good_b, bad = (f"{n}-{uuid.uuid4().hex[:6]}" for n in ("good-a", "good-b", "bad"))
    experts = Experts(bad=frozenset({bad}))
    await register_fake_nodes(sessions, [good_a, good_b, bad], provider="scripted", model="m")
    chosen: list[list[str]] = []

    async def run() -> TaskResult:
        task_id = f"task-{uuid.uuid4().hex[:10]}"
        result = await client.execute_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt=PROMPT, k=2, fresh=True),
            id=task_id,
            task_queue=settings.core_task_queue,
        )
        chosen.append([c.node_id for c in result.contributions])
        await asyncio.sleep(0.6)  # a routing index refresh period
        return result

    async with AsyncExitStack() as stack:
        for node_id in (good_a, good_b, bad):
            worker = Worker(
                client, task_queue=node_task_queue(node_id), activities=[experts.activity]
            )
            await stack.enter_async_context(worker)
        other = await temporal.connect(settings)  # the second worker's process has its own
        async with (
            build_core_worker(client, sessions=sessions, settings=settings),
            build_core_worker(other, sessions=sessions, settings=settings),
        ):
            await wait_live(client, *(node_task_queue(n) for n in (good_a, good_b, bad)))
            while not any(bad in c for c in chosen):  # until the bad node has been asked
                await run()
                assert len(chosen) < 8, chosen
            for _ in range(6):
                await run()
        # each worker's index may route once on what it held before the bad answer's record
        assert all(bad not in c for c in chosen[-3:]), chosen
        # a core worker started now rebuilds the learned state from the database
        async with build_core_worker(client, sessions=sessions, settings=settings):
            result = await run()
    assert bad not in chosen[-1]
    assert result.routing is not None
    terms = {c.node_id: c for c in result.routing.candidates}
    bad_fit = terms[bad].learned_fit
    assert terms[bad].evidence >= 1 and bad_fit is not None
    assert bad_fit < 0.3 < terms[bad].declared_fit
    good = terms[good_a].learned_fit
    assert good is not None and good > 0.5


async def test_a_few_lucky_answers_do_not_outweigh_many_good_ones(
    any_engine: AsyncEngine, embedder: CachedEmbedder
) -> None:
    sessions = session_factory(any_engine)
    domains, prompts = learning_set()
    d = domains["python"]
    async with sessions() as s:
        for node_id in ("lucky", "steady", "fresh"):
            await queries.upsert_node(
                session=s,
                profile=NodeProfile(
                    node_id=node_id,
                    region="eu-west",
                    provider="p",
                    model="m",
                    domains=[NodeDomain(name="python", description=d["description"])],
                ),
                now=datetime.now(UTC),
            )
    index = RoutingIndex(sessions, embedder, refresh_every_s=0.0)
    await index.refresh(force=True)
    prompt = next(p for p in prompts if p.domain == "python")
    vector = embedder.embed([prompt.text])[0]
    async with sessions() as s:
        for i in range(30):
            answers = [("steady", 0.85), *([("lucky", 1.0)] if i < 2 else [])]
            await index.learn(s, task_id=f"t-{i}", vector=vector, qualities=answers, now=_now())
        await s.commit()
    await index.refresh(force=True)
    ranked, _ = index.rank(vector)
    order = [r.node.node_id for r in ranked]
    by_node = {r.node.node_id: r for r in ranked}
    assert order == ["steady", "lucky", "fresh"], order
    assert by_node["lucky"].learned == pytest.approx(1.0) and by_node["lucky"].evidence == 2
    assert by_node["fresh"].learned is None and by_node["fresh"].fit == by_node["fresh"].declared


def _now() -> datetime:
    return datetime.now(UTC)
