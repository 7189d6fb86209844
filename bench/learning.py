"""Routing that learns from scored contributions: learning curve, a liar node, fairness.

``python -m bench.learning [--seed 16]`` runs the real routing and recording code over a fresh
SQLite database with the real embedder — ``Router.route`` for each task, then the ``record``
activity's code (``RecordingActivities.record``: the task, its contributions, reputation and the
learned per-topic state in one transaction), then the index's refresh — with simulated experts:
an expert asked about a domain it really knows answers with quality ``skill`` (plus noise), about
any other domain with quality 0.05 (the Mother Core scores an off-topic or "no relevant passage"
answer about that low). Tasks run ``--in-flight`` at a time: a task's record lands when that many
newer tasks have been routed, and each node's used activity slots (the asks not yet recorded) are
what its worker heartbeat reports to routing.

1. **Learning curve** (``tests/data/routing_learning.jsonl``: the four default domains, 420
   warm-up prompts and 80 held-out paraphrases of other wordings; 3 honest nodes per domain,
   k=3): accuracy of the top expert on the held-out prompts before warm-up and after 100 and 300
   warm-up tasks (held-out prompts are routed, never recorded).
2. **Liar**: the same network plus a node that declares ``python`` and ``solana`` but knows only
   ``solana``. Its share of Python tasks in the first 20 and of 100 after 200; its share of
   Solana tasks before and after; then an honest new ``python`` node joins: its share of the
   next 100 Python tasks (exploration gives new nodes a slot in ``XPANDO_ROUTING_EXPLORATION``
   of tasks).
3. **Fairness**: 10 equally good ``python`` nodes (skill 0.8), 300 tasks, k=3, 10 in flight: Gini
   of their asks; then one of them clearly better (0.95): its share and the others'.

4. **No harm on unrelated prompts**: the 8-domain set ``tests/data/routing_labelled.jsonl`` (80
   wholly different prompts), every other one held out: held-out accuracy before and after 300
   warm-up tasks on the other 40.

Routing speed at 10,000 and 100,000 nodes with learned state for every node:
``python -m bench.routing --learned``. Prints every figure; nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from temporalio.client import Client

from activities.recording import RecordingActivities
from xpando.breakers import BreakerBook
from xpando.contracts import (
    Contribution,
    ContributionStatus,
    NodeDomain,
    NodeProfile,
    RecordInput,
    RouteInput,
    TaskStage,
)
from xpando.db import SessionFactory, create_engine, init_db, queries, session_factory
from xpando.db.nodes import ReputationParams
from xpando.embedding import Embedder, embedder_from_settings
from xpando.logs import configure_logging
from xpando.routing.index import RoutingConfig, RoutingIndex, cached_embedder
from xpando.routing.router import Router
from xpando.settings import Settings
from xpando.temporal import NodeLiveness, WorkerBeat

LEARNING = Path(__file__).parents[1] / "tests" / "data" / "routing_learning.jsonl"
LABELLED = Path(__file__).parents[1] / "tests" / "data" / "routing_labelled.jsonl"
OFF_TOPIC_QUALITY = 0.05
REGIONS = ("eu-west", "us-east")
PROVIDERS = ("openai", "anthropic", "gemini")


@dataclass(frozen=True)
class Prompt:
    text: str
    domain: str
    split: str = "warmup"


def learning_set(path: Path = LEARNING) -> tuple[dict[str, dict[str, Any]], list[Prompt]]:
    """The labelled set: domain rows by name, and prompts (with their split)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    domains = {r["name"]: r for r in rows if r["kind"] == "domain"}
    prompts = [
        Prompt(r["prompt"], r["domain"], r.get("split", "warmup"))
        for r in rows
        if r["kind"] == "prompt"
    ]
    return domains, prompts


@dataclass(frozen=True)
class SimNode:
    """A simulated expert: what it declares, and how well it really answers each domain."""

    node_id: str
    declares: tuple[str, ...]
    skill: dict[str, float]
    region: str = "eu-west"
    provider: str = "openai"
    capacity: int = 4


def honest(node_id: str, domain: str, i: int, skill: float = 0.8) -> SimNode:
    return SimNode(
        node_id,
        (domain,),
        {domain: skill},
        region=REGIONS[i % len(REGIONS)],
        provider=PROVIDERS[i % len(PROVIDERS)],
    )


@dataclass
class Simulation:
    """Routing and recording over one database, with simulated experts (see the module doc)."""

    sessions: SessionFactory
    embedder: Embedder
    domains: dict[str, dict[str, Any]]
    config: RoutingConfig = field(default_factory=RoutingConfig)
    seed: int = 16
    noise: float = 0.05
    k: int = 3
    in_flight: int = 10

    def __post_init__(self) -> None:
        self.index = RoutingIndex(
            self.sessions, self.embedder, config=self.config, refresh_every_s=0.0
        )
        self.liveness = NodeLiveness(cast(Client, None), max_age_s=90, sweep_s=3600)
        self.router = Router(
            sessions=self.sessions,
            index=self.index,
            breaker_book=BreakerBook(self.sessions),
            liveness=self.liveness,
        )
        self.recording = RecordingActivities(
            sessions=self.sessions,
            breaker_book=BreakerBook(self.sessions),
            reputation=ReputationParams(),
            routing=self.index,
        )
        self.nodes: dict[str, SimNode] = {}
        self.asks: Counter[str] = Counter()
        self.rng = random.Random(self.seed)
        self._pending: deque[tuple[str, Prompt, list[str]]] = deque()
        self._busy: Counter[str] = Counter()
        self._tasks = 0
        self._beat = 0.0

    async def add(self, nodes: Sequence[SimNode]) -> None:
        async with self.sessions() as session:
            for n in nodes:
                domains = [
                    NodeDomain(
                        name=d,
                        description=self.domains[d]["description"],
                        keywords=self.domains[d].get("keywords", [])[:40],
                    )
                    for d in n.declares
                ]
                profile = NodeProfile(
                    node_id=n.node_id,
                    region=n.region,
                    provider=n.provider,
                    model="sim",
                    domains=domains,
                    capacity=n.capacity,
                )
                await queries.upsert_node(session=session, profile=profile, now=datetime.now(UTC))
                self.nodes[n.node_id] = n
        await self.index.refresh(force=True)
        self._heartbeat()

    def _heartbeat(self) -> None:
        """Every node's worker heartbeat: its slots in use are its asks not yet recorded."""
        self._beat += 1.0
        self.liveness.observe(
            {
                f"node.{n.node_id}": WorkerBeat(
                    running=True,
                    stopped=False,
                    at=self._beat,
                    used_slots=min(self._busy[n.node_id], n.capacity),
                    free_slots=max(n.capacity - self._busy[n.node_id], 0),
                )
                for n in self.nodes.values()
            }
        )

    async def route(self, prompt: Prompt, *, task_id: str | None = None) -> list[str]:
        self._tasks += 1
        route = await self.router.route(
            RouteInput(
                task_id=task_id or f"sim-{self.seed}-{self._tasks}",
                prompt=prompt.text,
                k=self.k,
                standbys=0,
            )
        )
        return [c.node_id for c in route.chosen]

    async def top_domain(self, prompt: Prompt) -> str:
        """The declared first domain of the top expert (routed, not recorded)."""
        chosen = await self.route(prompt)
        return self.nodes[chosen[0]].declares[0] if chosen else ""

    async def task(self, prompt: Prompt) -> list[str]:
        """Route a task and ask its experts; its record lands ``in_flight`` tasks later."""
        task_id = f"sim-{self.seed}-{self._tasks + 1}"
        chosen = await self.route(prompt, task_id=task_id)
        self.asks.update(chosen)
        self._busy.update(chosen)
        self._pending.append((task_id, prompt, chosen))
        while len(self._pending) >= self.in_flight:
            await self._record(*self._pending.popleft())
        self._heartbeat()
        return chosen

    async def drain(self) -> None:
        while self._pending:
            await self._record(*self._pending.popleft())
        self._heartbeat()

    def quality(self, node_id: str, domain: str) -> float:
        skill = self.nodes[node_id].skill.get(domain)
        if skill is None:
            return OFF_TOPIC_QUALITY
        return max(0.0, min(1.0, self.rng.gauss(skill, self.noise)))

    async def _record(self, task_id: str, prompt: Prompt, chosen: list[str]) -> None:
        contributions = [
            Contribution(
                node_id=node_id,
                region=self.nodes[node_id].region,
                provider=self.nodes[node_id].provider,
                model="sim",
                status=ContributionStatus.OK,
                answer="simulated",
                quality=round(self.quality(node_id, prompt.domain), 4),
            )
            for node_id in chosen
        ]
        await self.recording.record(
            RecordInput(
                task_id=task_id,
                prompt=prompt.text,
                domain=prompt.domain,
                status=TaskStage.COMPLETED,
                contributions=contributions,
            )
        )
        for node_id in chosen:
            self._busy[node_id] -= 1
        await self.index.refresh(force=True)

    async def accuracy(self, prompts: Sequence[Prompt]) -> float:
        hits = 0
        for p in prompts:
            hits += await self.top_domain(p) == p.domain
        return hits / len(prompts)


def gini(values: Sequence[float]) -> float:
    """Gini coefficient (0: all equal, 1: one takes all)."""
    ordered = sorted(values)
    n, total = len(ordered), sum(ordered)
    if n == 0 or total == 0:
        return 0.0
    weighted = sum((i + 1) * v for i, v in enumerate(ordered))
    return (2 * weighted) / (n * total) - (n + 1) / n


# --- the three experiments (also run, on smaller sets, by tests/test_routing_learning.py) --------


async def learning_curve(
    sim: Simulation, prompts: Sequence[Prompt], *, marks: Sequence[int] = (100, 300)
) -> list[tuple[int, float]]:
    """Held-out accuracy of the top expert after 0 and each of ``marks`` warm-up tasks."""
    warmup = [p for p in prompts if p.split == "warmup"]
    held = [p for p in prompts if p.split == "heldout"]
    order = list(warmup)
    random.Random(sim.seed).shuffle(order)
    await sim.add([honest(f"{d}-{i}", d, i) for d in sim.domains for i in range(3)])
    curve = [(0, await sim.accuracy(held))]
    done = 0
    for mark in marks:
        while done < mark:
            await sim.task(order[done % len(order)])
            done += 1
        await sim.drain()
        curve.append((done, await sim.accuracy(held)))
    return curve


@dataclass(frozen=True)
class LiarFigures:
    python_first: float  # share of the first Python tasks that asked the liar
    python_after: float  # share after ``after`` Python tasks
    solana_first: float
    solana_after: float
    newcomer: float  # share of the Python tasks after it joined that asked the new honest node


async def liar(
    sim: Simulation,
    prompts: Sequence[Prompt],
    *,
    first: int = 20,
    after: int = 200,
    window: int = 100,
) -> LiarFigures:
    await sim.add([honest(f"{d}-{i}", d, i) for d in sim.domains for i in range(3)])
    await sim.add([SimNode("liar", ("python", "solana"), {"solana": 0.8}, provider="gemini")])
    python = [p for p in prompts if p.domain == "python"]
    solana = [p for p in prompts if p.domain == "solana"]
    rng = random.Random(sim.seed)

    async def share(pool: list[Prompt], count: int, node_id: str) -> float:
        asked = 0
        for _ in range(count):
            asked += node_id in await sim.task(rng.choice(pool))
        return asked / count

    solana_first = await share(solana, window, "liar")
    python_first = await share(python, first, "liar")
    for _ in range(after - first):
        await sim.task(rng.choice(python))
    python_after = await share(python, window, "liar")
    solana_after = await share(solana, window, "liar")
    await sim.drain()
    await sim.add([honest("python-new", "python", 5)])
    newcomer = await share(python, window, "python-new")
    return LiarFigures(python_first, python_after, solana_first, solana_after, newcomer)


async def fairness(
    sim: Simulation, prompts: Sequence[Prompt], *, tasks: int = 300, better: float | None = None
) -> Counter[str]:
    """Asks of 10 ``python`` nodes over ``tasks`` Python tasks; with ``better``, node
    ``python-0`` answers that well and the others 0.8."""
    nodes = [honest(f"python-{i}", "python", i) for i in range(10)]
    if better is not None:
        nodes[0] = honest("python-0", "python", 0, skill=better)
    await sim.add(nodes)
    python = [p for p in prompts if p.domain == "python"]
    rng = random.Random(sim.seed)
    for _ in range(tasks):
        await sim.task(rng.choice(python))
    await sim.drain()
    return Counter({n.node_id: sim.asks[n.node_id] for n in nodes})


# --- running it ----------------------------------------------------------------------------------


async def _fresh(
    data: Path, name: str, embedder: Embedder, domains: dict[str, dict[str, Any]], seed: int
) -> tuple[Simulation, Any]:
    engine = create_engine(f"sqlite+aiosqlite:///{data / (name + '.db')}")
    await init_db(engine)
    return Simulation(session_factory(engine), embedder, domains, seed=seed), engine


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    settings = Settings(_env_file=None, log_level="WARNING")
    configure_logging(settings)
    embedder = cached_embedder(embedder_from_settings(settings))
    domains, prompts = learning_set()
    embedder.embed([p.text for p in prompts])  # what plan leaves in the cache
    data = Path(tempfile.mkdtemp(prefix="xpando-bench-learning-"))
    try:
        t = time.perf_counter()
        sim, engine = await _fresh(data, "curve", embedder, domains, args.seed)
        curve = await learning_curve(sim, prompts)
        await engine.dispose()
        held = sum(p.split == "heldout" for p in prompts)
        print(
            f"learning curve ({held} held-out prompts, 4 domains, 3 honest nodes each, k=3): "
            + ", ".join(f"after {n} warm-up tasks {a:.1%}" for n, a in curve)
            + f" ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )

        sim, engine = await _fresh(data, "liar", embedder, domains, args.seed)
        f = await liar(sim, prompts)
        await engine.dispose()
        print(
            "liar (declares python and solana, knows solana only): asked in "
            f"{f.python_first:.0%} of the first 20 Python tasks, {f.python_after:.0%} of 100 "
            f"after 200; Solana tasks {f.solana_first:.0%} at first, {f.solana_after:.0%} after; "
            f"an honest new python node then asked in {f.newcomer:.0%} of 100 Python tasks",
            flush=True,
        )

        sim, engine = await _fresh(data, "fair", embedder, domains, args.seed)
        equal = await fairness(sim, prompts)
        await engine.dispose()
        sim, engine = await _fresh(data, "better", embedder, domains, args.seed)
        skewed = await fairness(sim, prompts, better=0.95)
        await engine.dispose()
        others = [v for n, v in skewed.items() if n != "python-0"]
        print(
            f"fairness (10 equal python nodes, 300 tasks, k=3, 10 in flight): Gini of asks "
            f"{gini(list(equal.values())):.2f} (asks {sorted(equal.values())}); with python-0 "
            f"clearly better (0.95 vs 0.8): it got {skewed['python-0']} asks, the others "
            f"{min(others)}-{max(others)}",
            flush=True,
        )

        labelled, rows = learning_set(LABELLED)
        split = [
            Prompt(p.text, p.domain, "heldout" if i % 2 else "warmup") for i, p in enumerate(rows)
        ]
        embedder.embed([p.text for p in split])
        sim, engine = await _fresh(data, "labelled", embedder, labelled, args.seed)
        unrelated = await learning_curve(sim, split, marks=(300,))
        await engine.dispose()
        print(
            "8-domain labelled set (40 held-out prompts unlike the 40 warm-up ones): "
            + ", ".join(f"after {n} warm-up tasks {a:.1%}" for n, a in unrelated),
            flush=True,
        )
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
