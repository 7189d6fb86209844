"""Routing at 10,000 and 100,000 nodes, and a full TaskWorkflow against a bare Temporal workflow.

``python -m bench.routing [--nodes 10000] [--big 100000] [--decisions 2000] [--tasks 200]``
starts a Temporal dev server in this process (loopback only) and a fresh SQLite database, then:

1. **Registration**: ``--nodes`` nodes over the 50 domains of ``workloads/routing_domains.jsonl``
   and 5 regions, each with its own ed25519 keypair, register through the real path —
   ``POST /v1/nodes`` of the FastAPI app in process (httpx over ASGI): request validation,
   signature and timestamp verification, nonce insert, domain embedding (once per distinct text),
   the node upsert — 16 requests in flight. Signing is the nodes' work and is timed apart.
2. **Routing at ``--nodes``**: the ``route`` activity's code (``Router.route``: prompt
   vector from the embedding cache ``plan`` filled, index refresh check, the breaker query,
   ranking, liveness and breaker checks of the top candidates, diversity, standbys,
   exploration, the explanation) for ``--decisions`` prompts, k=5 plus 2 standbys, a third of
   them limited to one or two regions: p50 and p99. Liveness comes from a heartbeat sweep that
   reports every node's worker running (``NodeLiveness.observe``; 10,000 real workers do not fit
   this machine — ``--fleet`` measures real ones). Also: how often the best expert is of the
   prompt's domain, the routing index's memory (tracemalloc of a fresh load) and load time, and
   what embedding one prompt costs (paid once per task, by ``plan``).
   With ``--learned`` (the default; ``--no-learned`` skips it), every node first gets learned
   state — scored contributions in 3 of the ``--topics`` topic regions of its domain (region
   vectors: the domain's prompts' embeddings, jittered), written straight into ``routing_topics``
   and ``node_topics`` — so each decision also blends in the learned fit of every node near the
   prompt (``xpando/routing/learned.py``).
3. **Routing at ``--big``**: the other nodes are bulk-inserted into the database (not through the
   API: that would take minutes and measure the same path as step 1), the index loads them, and
   the same decisions run again.
4. **Fleet** (``--fleet N``, default 1,000): N real node workers in this process
   (``workers/nodes.py``, as ``xpando worker nodes`` runs them): memory per node, and one
   ``ListWorkers`` liveness sweep over all of them.
5. **Workflows**: a full ``TaskWorkflow`` (k=5, instant providers: 10 simulated nodes in this
   process, a real core worker, fresh knowledge) against ``BareWorkflow`` (``bench/_bare.py``:
   five parallel activities on a node queue, then one more) on the same dev server: ``--tasks``
   of each with 50 in flight (throughput) and ``--sequential`` of each one at a time (p50), in
   ``--rounds`` alternating rounds (medians), and the ratios (goals: throughput ≥ 1.0, latency
   ≤ 1.0). TaskWorkflow runs unsandboxed, as the core worker runs it; the bare workflow runs
   in the SDK's default sandbox. Also the CPU each workflow costs while 50 are in flight, in
   this process and in the dev server (read from /proc): on a 2-core machine their sum is what
   throughput divides. And the CPU of embedding one new prompt, the largest part of the task's
   own work that the bare shape does not do.

Prints every figure; nothing is asserted (timings are not tests).
"""

from __future__ import annotations

import os

from bench._stats import pct

# Before NumPy loads: BLAS threads fight each other on small matrices (see xpando/embedding.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from solders.keypair import Keypair
from sqlalchemy import insert
from temporalio.client import Client
from temporalio.worker import Worker

from api.main import create_app
from bench._bare import BareInput, BareWorkflow, bare_answer, bare_record
from cli.devserver import start_local_env
from workers.core import build_core_worker
from workers.nodes import FleetSpec, fleet_nodes, fleet_worker, register_fleet, rss_bytes
from workers.wiring import build_knowledge_index, build_routing_index
from workflows.task import TaskWorkflow
from xpando import temporal
from xpando.breakers import BreakerBook
from xpando.contracts import NodeAction, NodeDomain, NodeProfile, RouteInput, TaskInput
from xpando.db import create_engine, init_db, session_factory
from xpando.db.models import Node, NodeTopic, Topic
from xpando.embedding import embedder_from_settings
from xpando.identity import sign_request, verify_request
from xpando.logs import configure_logging
from xpando.routing.index import RoutingIndex
from xpando.routing.router import Router
from xpando.settings import Settings
from xpando.temporal import NodeLiveness, WorkerBeat

DOMAINS = Path(__file__).parent / "workloads" / "routing_domains.jsonl"
REGIONS = ("eu-west", "us-east", "us-west", "ap-south", "sa-east")
PROVIDERS = ("openai", "anthropic", "gemini", "offline", "openai-compatible")
K, STANDBYS = 5, 2


def _domains() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DOMAINS.read_text().splitlines() if line.strip()]


def _profile(i: int, domain: dict[str, Any], wallet: str | None = None) -> NodeProfile:
    return NodeProfile(
        node_id=f"n{i:06d}",
        # domain i % 50; region and provider vary within each domain's nodes
        region=REGIONS[(i // 50) % len(REGIONS)],
        provider=PROVIDERS[(i // 250) % len(PROVIDERS)],
        model="m",
        domains=[NodeDomain(name=domain["name"], description=domain["description"])],
        capacity=4,
        price_input_per_mtok=float((i * 7) % 5),
        price_output_per_mtok=float((i * 11) % 20),
        wallet=wallet,
    )


async def register_over_http(settings: Settings, count: int) -> dict[str, float]:
    domains = _domains()
    started = time.perf_counter()
    requests = []
    for i in range(count):
        key = Keypair()
        profile = _profile(i, domains[i % len(domains)])
        requests.append(
            sign_request(key, action=NodeAction.REGISTER, node_id=profile.node_id, profile=profile)
        )
    signed_s = time.perf_counter() - started
    t = time.perf_counter()
    for r in requests[:2000]:
        verify_request(r, now=time.time(), max_skew_s=300)
    verify_us = (time.perf_counter() - t) / min(2000, count) * 1e6
    app = create_app(settings)
    failures = 0
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            gate = asyncio.Semaphore(16)

            async def post(body: dict[str, Any]) -> None:
                nonlocal failures
                async with gate:
                    resp = await http.post("/v1/nodes", json=body)
                    failures += resp.status_code != 201

            bodies = [r.model_dump(mode="json") for r in requests]
            t = time.perf_counter()
            await asyncio.gather(*(post(b) for b in bodies))
            register_s = time.perf_counter() - t
    return {
        "sign_s": signed_s,
        "verify_us": verify_us,
        "register_s": register_s,
        "failures": failures,
    }


async def bulk_insert(settings: Settings, start: int, stop: int) -> float:
    """Nodes ``start`` … ``stop - 1`` written straight into the table (same profiles)."""
    domains = _domains()
    engine = create_engine(settings.database_dsn)
    now = datetime.now(UTC)
    t = time.perf_counter()
    try:
        async with engine.begin() as conn:
            batch: list[dict[str, Any]] = []
            for i in range(start, stop):
                p = _profile(i, domains[i % len(domains)])
                batch.append(
                    {
                        "node_id": p.node_id,
                        "region": p.region,
                        "provider": p.provider,
                        "model": p.model,
                        "task_queue": p.task_queue,
                        "capacity": p.capacity,
                        "domains": [d.model_dump() for d in p.domains],
                        "status": "active",
                        "price_input_per_mtok": p.price_input_per_mtok,
                        "price_output_per_mtok": p.price_output_per_mtok,
                        "registered_at": now,
                        "updated_at": now,
                        "changed_at": now,
                    }
                )
                if len(batch) == 5000:
                    await conn.execute(insert(Node), batch)
                    batch = []
            if batch:
                await conn.execute(insert(Node), batch)
    finally:
        await engine.dispose()
    return time.perf_counter() - t


async def bulk_learned(settings: Settings, start: int, stop: int, *, topics: int) -> float:
    """Learned state for nodes ``start`` … ``stop - 1``: the topic regions (once, ``topics`` of
    them spread over the 50 domains), then 3 regions of its own domain per node, each with
    5-30 scored contributions of quality 0.5-0.95."""
    domains = _domains()
    per_domain = max(1, topics // len(domains))
    embedder = embedder_from_settings(settings)
    engine = create_engine(settings.database_dsn)
    now = datetime.now(UTC)
    rng = np.random.default_rng(start)
    t = time.perf_counter()
    try:
        async with engine.begin() as conn:
            if start == 0:
                rows = []
                for d, domain in enumerate(domains):
                    base = embedder.embed(domain["prompts"]).mean(axis=0)
                    for j in range(per_domain):
                        vec = base + rng.normal(0, 0.03, base.shape)
                        vec = (vec / np.linalg.norm(vec)).astype(np.float32)
                        rows.append(
                            {
                                "topic_id": f"bench-{d}-{j}",
                                "embedder": embedder.name,
                                "vector": vec.tobytes(),
                                "created_at": now,
                            }
                        )
                await conn.execute(insert(Topic), rows)
            batch: list[dict[str, Any]] = []
            for i in range(start, stop):
                d = i % len(domains)
                for j in rng.choice(per_domain, size=min(3, per_domain), replace=False):
                    n = float(rng.integers(5, 31))
                    batch.append(
                        {
                            "node_id": f"n{i:06d}",
                            "topic_id": f"bench-{d}-{j}",
                            "n": n,
                            "quality_sum": n * float(rng.uniform(0.5, 0.95)),
                            "updated_at": now,
                        }
                    )
                if len(batch) >= 5000:
                    await conn.execute(insert(NodeTopic), batch)
                    batch = []
            if batch:
                await conn.execute(insert(NodeTopic), batch)
    finally:
        await engine.dispose()
    return time.perf_counter() - t


async def routing_speed(
    client: Client, settings: Settings, decisions: int
) -> dict[str, float | int]:
    engine = create_engine(settings.database_dsn)
    sessions = session_factory(engine)
    try:
        # Memory of a fresh load (tracemalloc sees NumPy's buffers too), then a timed load.
        embedder_from_settings(settings).embed(["load the model before measuring"])
        tracemalloc.start()
        probe = build_routing_index(sessions, settings)
        await probe.refresh(force=True)
        retained, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        arrays = probe.nbytes()
        del probe
        index: RoutingIndex = build_routing_index(sessions, settings)
        t = time.perf_counter()
        await index.refresh(force=True)
        load_s = time.perf_counter() - t
        nodes = len(index)

        liveness = NodeLiveness(client, max_age_s=90, sweep_s=3600)
        now = time.time()
        liveness.observe(
            {
                f"node.n{i:06d}": WorkerBeat(running=True, stopped=False, at=now, free_slots=4)
                for i in range(nodes)
            }
        )
        knowledge = build_knowledge_index(sessions, settings)
        router = Router(
            sessions=sessions, index=index, breaker_book=BreakerBook(sessions), liveness=liveness
        )
        rows = _domains()
        prompts = [(p, d["name"]) for d in rows for p in d["prompts"]]
        embedder = knowledge.embedder
        inner = getattr(embedder, "inner", embedder)  # past the prompt cache
        t = time.perf_counter()
        for text, _ in prompts[:20]:
            inner.embed([text])
        embed_ms = (time.perf_counter() - t) / 20 * 1000
        embedder.embed([p for p, _ in prompts])  # what plan leaves in the cache
        rng = random.Random(7)
        latencies: list[float] = []
        hits = 0
        for i in range(decisions):
            prompt, domain = prompts[i % len(prompts)]
            regions: list[str] = []
            if i % 3 == 0:
                regions = rng.sample(REGIONS, rng.choice((1, 2)))
            started = time.perf_counter()
            route = await router.route(
                RouteInput(
                    task_id=f"bench-{i}",
                    prompt=prompt,
                    k=K,
                    standbys=STANDBYS,
                    regions=regions,
                )
            )
            latencies.append((time.perf_counter() - started) * 1000)
            hits += route.chosen[0].domains == [domain]
        return {
            "nodes": nodes,
            "topics": index.learned.topics,
            "learned_entries": index.learned.entries,
            "distinct_domains": index.distinct_domains,
            "p50_ms": statistics.median(latencies),
            "p99_ms": pct(latencies, 0.99),
            "max_ms": max(latencies),
            "top_in_domain": hits / decisions,
            "load_s": load_s,
            "memory_mb": retained / 2**20,
            "peak_mb": peak / 2**20,
            "arrays_mb": arrays / 2**20,
            "embed_ms": embed_ms,
        }
    finally:
        await engine.dispose()


async def fleet(client: Client, settings: Settings, count: int) -> dict[str, float]:
    # The fleet's own connection, with worker heartbeats every second (as `xpando worker nodes`
    # sends them every XPANDO_NODE_HEARTBEAT_S), so the sweep below has them to list.
    beating = await temporal.connect(settings, runtime=temporal.heartbeat_runtime(1.0))
    spec = FleetSpec(count=count, prefix=f"f{uuid.uuid4().hex[:4]}", regions=REGIONS)
    before = rss_bytes()
    nodes = fleet_nodes(spec, data_dir=settings.data_dir, keys=False)
    workers = [fleet_worker(beating, n) for n in nodes]
    runs = [asyncio.create_task(w.run()) for w in workers]
    await asyncio.sleep(4)
    after = rss_bytes()
    liveness = NodeLiveness(client, max_age_s=90, sweep_s=5)
    t = time.perf_counter()
    seen = await liveness.sweep()
    sweep_ms = (time.perf_counter() - t) * 1000
    stopping = time.perf_counter()
    await asyncio.gather(*(w.shutdown() for w in workers))
    await asyncio.gather(*runs, return_exceptions=True)
    return {
        "nodes": count,
        "kb_per_node": (after - before) / count / 1024,
        "rss_mb": after / 2**20,
        "sweep_ms": sweep_ms,
        "seen": seen,
        "stop_s": time.perf_counter() - stopping,
    }


async def workflows(
    client: Client,
    settings: Settings,
    tasks: int,
    sequential: int,
    in_flight: int,
    rounds: int = 3,
) -> dict[str, dict[str, float]]:
    engine = create_engine(settings.database_dsn)
    await init_db(engine)
    sessions = session_factory(engine)
    spec = FleetSpec(count=10, prefix=f"wf{uuid.uuid4().hex[:4]}", regions=REGIONS[:2])
    nodes = fleet_nodes(spec, data_dir=settings.data_dir, keys=False)
    node_workers = [fleet_worker(client, n) for n in nodes]
    bare_queue, bare_nodes = f"bare-{uuid.uuid4().hex[:6]}", f"bare-node-{uuid.uuid4().hex[:6]}"
    core = build_core_worker(client, sessions=sessions, settings=settings)
    bare = Worker(client, task_queue=bare_queue, workflows=[BareWorkflow], activities=[bare_record])
    bare_node = Worker(client, task_queue=bare_nodes, activities=[bare_answer])
    runs = [asyncio.create_task(w.run()) for w in [core, bare, bare_node, *node_workers]]
    try:
        await register_fleet(client, nodes, core_task_queue=settings.core_task_queue)
        prompt_no = 0

        async def full() -> None:
            nonlocal prompt_no
            prompt_no += 1
            task_id = f"task-{uuid.uuid4().hex[:10]}"
            await client.execute_workflow(
                TaskWorkflow.run,
                TaskInput(
                    task_id=task_id,
                    prompt=f"How do I set a retry policy on activity number {prompt_no}?",
                    k=K,
                    fresh=True,
                ),
                id=task_id,
                task_queue=settings.core_task_queue,
                search_attributes=temporal.initial_task_attributes(None),  # as the API starts it
            )

        async def baseline() -> None:
            await client.execute_workflow(
                BareWorkflow.run,
                BareInput(prompt="How do I set a retry policy?", node_queue=bare_nodes),
                id=f"bare-{uuid.uuid4().hex[:10]}",
                task_queue=bare_queue,
            )

        for run in (full, baseline):  # warm up (imports, first queries, embedder)
            for _ in range(3):
                await run()
        out: dict[str, dict[str, float]] = {}
        # Rounds alternate (task, bare, task, bare, ...): the machine's drift hits both alike;
        # each figure is the median over the rounds.
        rounds_of: dict[str, list[dict[str, float]]] = {"task": [], "bare": []}
        for _ in range(rounds):
            for name, run in (("task", full), ("bare", baseline)):
                rounds_of[name].append(
                    await _measure(run, tasks=tasks, sequential=sequential, in_flight=in_flight)
                )
        for name, measured in rounds_of.items():
            out[name] = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
        # Work the bare shape does not do, priced apart: embedding one new prompt (plan).
        embedder = embedder_from_settings(settings)
        cpu = time.process_time()
        for i in range(20):
            embedder.embed([f"How do I set a retry policy on activity number {i}?"])
        out["task"]["embed_cpu_ms"] = (time.process_time() - cpu) / 20 * 1000
        return out
    finally:
        for w in [core, bare, bare_node, *node_workers]:
            await w.shutdown()
        await asyncio.gather(*runs, return_exceptions=True)
        await engine.dispose()


async def _measure(
    run: Callable[[], Awaitable[None]], *, tasks: int, sequential: int, in_flight: int
) -> dict[str, float]:
    one_by_one = []
    for _ in range(sequential):
        t = time.perf_counter()
        await run()
        one_by_one.append((time.perf_counter() - t) * 1000)
    gate = asyncio.Semaphore(in_flight)

    async def limited() -> None:
        async with gate:
            await run()

    own, server = _cpu_seconds()
    t = time.perf_counter()
    await asyncio.gather(*(limited() for _ in range(tasks)))
    wall = time.perf_counter() - t
    own_after, server_after = _cpu_seconds()
    return {
        "p50_ms": statistics.median(one_by_one),
        "per_s": tasks / wall,
        # CPU per workflow while 50 are in flight: this process (client, workers, activities)
        # and the dev server; on a machine this small their sum is what throughput divides.
        "own_cpu_ms": (own_after - own) / tasks * 1000,
        "server_cpu_ms": (server_after - server) / tasks * 1000,
    }


def _cpu_seconds() -> tuple[float, float]:
    """CPU time used so far by this process, and by its child processes that are still running
    (the dev server), from /proc; the latter is NaN where there is no /proc."""
    times = os.times()
    own = times.user + times.system
    children = 0.0
    try:
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid():  # ppid; then utime and stime (fields 14 and 15)
                children += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, ValueError):
        return own, float("nan")
    return own, children


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000, help="0 skips the big run")
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument(
        "--learned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give every node learned state before measuring decisions",
    )
    parser.add_argument("--topics", type=int, default=2000, help="topic regions (--learned)")
    parser.add_argument("--fleet", type=int, default=1000, help="0 skips the fleet")
    parser.add_argument("--tasks", type=int, default=200, help="0 skips the workflow ratio")
    parser.add_argument("--sequential", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="alternating task/bare rounds")
    parser.add_argument("--in-flight", type=int, default=50)
    args = parser.parse_args()
    # every node registers from this one address: the per-address limit would refuse most
    base = Settings(_env_file=None, log_level="WARNING", limit_registrations_per_minute=0)
    configure_logging(base)
    data = Path(tempfile.mkdtemp(prefix="xpando-bench-routing-"))
    env = await start_local_env()
    try:
        target = env.client.service_client.config.target_host
        settings = base.model_copy(
            update={
                "data_dir": data,
                "temporal_address": target,
                "database_url": f"sqlite+aiosqlite:///{data / 'routing.db'}",
                "core_task_queue": f"xpando-core-{uuid.uuid4().hex[:6]}",
            }
        )
        engine = create_engine(settings.database_dsn)
        await init_db(engine)
        await engine.dispose()

        if args.nodes:
            await _routing_runs(env.client, settings, args)
        if args.fleet:
            f = await fleet(env.client, settings, args.fleet)
            print(
                f"fleet: {f['nodes']:,.0f} node workers in one process: "
                f"{f['kb_per_node']:.0f} KB per node (RSS {f['rss_mb']:.0f} MB); one ListWorkers "
                f"sweep saw {f['seen']:.0f} node queues in {f['sweep_ms']:.0f} ms; "
                f"stopping them all took {f['stop_s']:.1f} s",
                flush=True,
            )
        if args.tasks:
            wf_settings = settings.model_copy(
                update={
                    "database_url": f"sqlite+aiosqlite:///{data / 'workflows.db'}",
                    "core_task_queue": f"xpando-core-{uuid.uuid4().hex[:6]}",
                }
            )
            r = await workflows(
                env.client,
                wf_settings,
                args.tasks,
                args.sequential,
                args.in_flight,
                rounds=args.rounds,
            )
            task, bare = r["task"], r["bare"]
            print(
                f"TaskWorkflow (k={K}, instant providers): {task['per_s']:.1f} workflows/s with "
                f"{args.in_flight} in flight, p50 {task['p50_ms']:.0f} ms one at a time; CPU per "
                f"workflow: this process {task['own_cpu_ms']:.0f} ms, dev server "
                f"{task['server_cpu_ms']:.0f} ms"
            )
            print(
                "bare workflow (5 parallel activities + 1, default sandbox): "
                f"{bare['per_s']:.1f} workflows/s, "
                f"p50 {bare['p50_ms']:.0f} ms; CPU per workflow: this process "
                f"{bare['own_cpu_ms']:.0f} ms, dev server {bare['server_cpu_ms']:.0f} ms"
            )
            print(
                f"  of the difference, embedding the prompt (MiniLM, once per task) costs "
                f"{task['embed_cpu_ms']:.1f} ms of CPU"
            )
            print(
                f"ratio TaskWorkflow / bare: throughput {task['per_s'] / bare['per_s']:.2f} "
                f"(goal >= 1.0), p50 latency {task['p50_ms'] / bare['p50_ms']:.2f} "
                "(goal <= 1.0)"
            )
    finally:
        await env.shutdown()
        shutil.rmtree(data, ignore_errors=True)


async def _routing_runs(client: Client, settings: Settings, args: argparse.Namespace) -> None:
    reg = await register_over_http(settings, args.nodes)
    print(
        f"registration of {args.nodes:,} nodes over POST /v1/nodes (signature check, nonce, "
        f"embedding, upsert; 16 in flight): {reg['register_s']:.1f} s "
        f"({args.nodes / reg['register_s']:.0f}/s; goal <= 60 s), {reg['failures']:.0f} "
        f"refused; signing them (the nodes' side) {reg['sign_s']:.1f} s; one signature "
        f"check {reg['verify_us']:.0f} us",
        flush=True,
    )
    if args.learned:
        learned_s = await bulk_learned(settings, 0, args.nodes, topics=args.topics)
        print(f"learned state for {args.nodes:,} nodes written in {learned_s:.1f} s", flush=True)
    small = await routing_speed(client, settings, args.decisions)
    _print_routing(small)
    if args.big > args.nodes:
        insert_s = await bulk_insert(settings, args.nodes, args.big)
        print(f"bulk-inserted {args.big - args.nodes:,} more nodes in {insert_s:.1f} s")
        if args.learned:
            learned_s = await bulk_learned(settings, args.nodes, args.big, topics=args.topics)
            print(f"  and their learned state in {learned_s:.1f} s", flush=True)
        big = await routing_speed(client, settings, args.decisions)
        _print_routing(big, goal_p50=5.0, goal_p99=None)


def _print_routing(
    r: dict[str, float | int], *, goal_p50: float = 2.0, goal_p99: float | None = 10.0
) -> None:
    goals = f"goal p50 <= {goal_p50:g} ms" + (f", p99 <= {goal_p99:g} ms" if goal_p99 else "")
    print(
        f"routing at {r['nodes']:,} nodes ({r['distinct_domains']} distinct domain texts): "
        f"one decision p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max "
        f"{r['max_ms']:.1f} ms ({goals}); best expert in the prompt's domain "
        f"{r['top_in_domain']:.1%}; learned state: {r['learned_entries']:,} node-topic "
        f"entries over {r['topics']:,} topic regions",
        flush=True,
    )
    print(
        f"  routing index: {r['memory_mb']:.1f} MB retained after a fresh load (peak "
        f"{r['peak_mb']:.0f} MB while loading; goal <= 200 MB), arrays {r['arrays_mb']:.1f} MB, "
        f"load {r['load_s']:.1f} s; embedding one prompt (once per task, in plan) "
        f"{r['embed_ms']:.1f} ms",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
