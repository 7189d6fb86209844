"""Mother Core knowledge reuse: provider calls saved, false reuse, and search speed at 100k items.

``python -m bench.knowledge [--tasks N] [--items 100000]`` runs, on a real Temporal dev server
started in this process (loopback only), the committed workload
``bench/workloads/knowledge_500.jsonl`` (500 questions, 60% of them repeats or hand-written
paraphrases of earlier ones; see its README) through ``TaskWorkflow`` twice, one task at a time
in file order:

* **reuse off** — every task with ``fresh: true`` (the experts are always asked);
* **reuse on** — the default.

Each time: a core worker and four offline expert nodes (the ``python``, ``temporal``,
``web-api`` and ``solana`` docstring corpora), k=3, a fresh database. It prints provider calls
(expert ``answer`` calls, counted at the provider), tokens and a nominal cost (the offline
expert is free; tokens are priced at ``NOMINAL_USD_PER_1M`` to show what they would cost on a
hosted model), reuse counts, and **false reuse**: a task answered from an item that came from a
question of another workload group.

Then it measures knowledge search at ``--items`` stored items (default 100,000): the 500
questions' real embeddings plus noisy copies of them (renormalised), written to SQLite, loaded
into the index, and searched with the workload's questions: p50/p99 of one search (vector
already embedded), of embed + search, the index load time and its memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert
from temporalio.client import Client

from cli.devserver import start_local_env
from workers.core import build_core_worker
from workers.node import NodeSpec, build_node, build_node_worker, register
from workers.wiring import build_knowledge_index
from workflows.task import TaskWorkflow
from xpando.contracts import TaskInput, TaskResult
from xpando.corpus import DEV_DOMAINS, ensure_domain_corpus
from xpando.db import create_engine, init_db, session_factory
from xpando.db.models import Knowledge
from xpando.embedding import get_embedder
from xpando.logs import configure_logging
from xpando.providers.base import Provider, ProviderReply, ProviderRequest
from xpando.settings import Settings
from xpando.temporal import NodeLiveness

WORKLOAD = Path(__file__).parent / "workloads" / "knowledge_500.jsonl"
NOMINAL_USD_PER_1M = (0.15, 0.60)  # input, output: a small hosted model's list price
K = 3


@dataclass
class Counting:
    """Wraps a provider and counts its calls and tokens."""

    inner: Provider
    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    name: str = field(init=False)
    model: str = field(init=False)

    def __post_init__(self) -> None:
        self.name, self.model = self.inner.name, self.inner.model

    async def answer(self, request: ProviderRequest) -> ProviderReply:
        self.calls += 1
        reply = await self.inner.answer(request)
        self.tokens_in += reply.input_tokens
        self.tokens_out += reply.output_tokens
        return reply


async def run_workload(
    client: Client,
    rows: list[dict[str, Any]],
    *,
    reuse: bool,
    data: Path,
    confirm_similarity: float | None = None,
) -> dict[str, Any]:
    queue = f"bench-core-{uuid.uuid4().hex[:6]}"
    settings = Settings(
        _env_file=None,
        data_dir=data,
        temporal_address=client.service_client.config.target_host,
        database_url=f"sqlite+aiosqlite:///{data / f'bench-{queue}.db'}",
        core_task_queue=queue,
        log_level="WARNING",
    )
    if confirm_similarity is not None:
        settings = settings.model_copy(update={"knowledge_confirm_similarity": confirm_similarity})
    engine = create_engine(settings.database_dsn)
    await init_db(engine)
    sessions = session_factory(engine)
    counters: list[Counting] = []
    profiles = []
    workers = [build_core_worker(client, sessions=sessions, settings=settings)]
    for domain in DEV_DOMAINS:
        spec = NodeSpec(
            node_id=f"{domain}-{queue}",
            region="eu-west",
            domain=domain,
            corpus=ensure_domain_corpus(domain, data / "corpora"),
        )
        profile, provider = build_node(spec, data_dir=data)
        counting = Counting(provider)
        counters.append(counting)
        profiles.append(profile)
        workers.append(build_node_worker(client, profile=profile, provider=counting))
    for w in workers:
        await w.__aenter__()
    try:
        for p in profiles:
            await register(client, p, core_task_queue=queue)
        liveness = NodeLiveness(client, max_age_s=90, cache_s=0)
        for _ in range(300):
            if all([await liveness.is_live(p.task_queue) for p in profiles]):
                break
            await asyncio.sleep(0.1)

        source_group: dict[str, str] = {}
        reused = false_reuse = failed = answered = 0
        false_examples: list[tuple[str, str]] = []
        latencies: list[float] = []
        for row in rows:
            task_id = f"task-{queue}-{row['n']}"
            started = time.perf_counter()
            try:
                result: TaskResult = await client.execute_workflow(
                    TaskWorkflow.run,
                    TaskInput(task_id=task_id, prompt=row["question"], k=K, fresh=not reuse),
                    id=task_id,
                    task_queue=queue,
                )
            except Exception:  # counted, not fatal to the benchmark
                failed += 1
                continue
            latencies.append(time.perf_counter() - started)
            answered += result.confidence > 0
            source_group[task_id] = row["group"]
            if result.reused is not None:
                reused += 1
                origin = result.reused.knowledge_id.removeprefix("kn-")
                if source_group.get(origin) != row["group"]:
                    false_reuse += 1
                    false_examples.append((row["question"], result.reused.question))
        calls = sum(c.calls for c in counters)
        tin, tout = sum(c.tokens_in for c in counters), sum(c.tokens_out for c in counters)
        return {
            "tasks": len(rows),
            "failed": failed,
            "answered": answered,
            "provider_calls": calls,
            "tokens_in": tin,
            "tokens_out": tout,
            "nominal_cost_usd": tin / 1e6 * NOMINAL_USD_PER_1M[0]
            + tout / 1e6 * NOMINAL_USD_PER_1M[1],
            "reused": reused,
            "false_reuse": false_reuse,
            "false_examples": false_examples[:10],
            "p50_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        }
    finally:
        for w in reversed(workers):
            await w.__aexit__(None, None, None)
        await engine.dispose()


async def search_speed(rows: list[dict[str, Any]], items: int, data: Path) -> dict[str, Any]:
    embedder = get_embedder("auto")
    questions = [r["question"] for r in rows]
    base = embedder.embed(questions)
    rng = np.random.default_rng(7)
    engine = create_engine(f"sqlite+aiosqlite:///{data / 'search.db'}")
    await init_db(engine)
    sessions = session_factory(engine)
    now = datetime.now(UTC)
    domains = list(DEV_DOMAINS)
    started = time.perf_counter()
    async with engine.begin() as conn:
        batch: list[dict[str, Any]] = []
        for i in range(items):
            vec = base[i % len(base)] + rng.normal(0, 0.35, (base.shape[1],)).astype(np.float32)
            vec /= np.linalg.norm(vec)
            batch.append(
                {
                    "knowledge_id": f"kn-bench-{i}",
                    "task_id": f"task-bench-{i}",
                    "question": questions[i % len(questions)],
                    "answer": "stored answer",
                    "domain": domains[i % len(domains)],
                    "confidence": 0.8,
                    "nodes": [],
                    "provenance": [],
                    "support": 1,
                    "status": "active",
                    "embedding": vec.astype(np.float32).tobytes(),
                    "embedder": embedder.name,
                    "uses": 0,
                    "confirmed_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            if len(batch) == 5000:
                await conn.execute(insert(Knowledge), batch)
                batch = []
        if batch:
            await conn.execute(insert(Knowledge), batch)
    write_s = time.perf_counter() - started
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    index = build_knowledge_index(
        sessions,
        Settings(_env_file=None, data_dir=data),
    )
    started = time.perf_counter()
    await index.refresh(force=True)
    load_s = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    search_ms, full_ms = [], []
    for i, q in enumerate(questions):
        t0 = time.perf_counter()
        index.search_vector(base[i], k=5)
        search_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        await index.search(q, k=5)
        full_ms.append((time.perf_counter() - t0) * 1000)
    await engine.dispose()
    search_ms.sort()
    full_ms.sort()
    return {
        "items": len(index),
        "write_s": write_s,
        "load_s": load_s,
        "index_mb": index._vecs.nbytes / 2**20,
        "rss_growth_mb": (rss_after - rss_before) / 1024,
        "search_p50_ms": search_ms[len(search_ms) // 2],
        "search_p99_ms": search_ms[int(len(search_ms) * 0.99)],
        "embed_search_p50_ms": full_ms[len(full_ms) // 2],
        "embed_search_p99_ms": full_ms[int(len(full_ms) * 0.99)],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500, help="first N workload lines")
    parser.add_argument("--items", type=int, default=100_000, help="items for the search test")
    parser.add_argument("--skip-workload", action="store_true")
    parser.add_argument(
        "--confirm-similarity",
        type=float,
        default=None,
        help="override XPANDO_KNOWLEDGE_CONFIRM_SIMILARITY (0 disables single-expert confirmation)",
    )
    args = parser.parse_args()
    configure_logging(Settings(_env_file=None, log_level="WARNING"))
    rows = [json.loads(line) for line in WORKLOAD.read_text().splitlines()][: args.tasks]
    kinds = Counter(r["kind"] for r in rows)
    data = Path(tempfile.mkdtemp(prefix="xpando-bench-knowledge-"))
    try:
        if not args.skip_workload:
            env = await start_local_env()
            try:
                print(f"workload: {len(rows)} tasks {dict(kinds)}, k={K}", flush=True)
                off = await run_workload(env.client, rows, reuse=False, data=data)
                print(f"reuse off: {_fmt(off)}", flush=True)
                on = await run_workload(
                    env.client,
                    rows,
                    reuse=True,
                    data=data,
                    confirm_similarity=args.confirm_similarity,
                )
                print(f"reuse on:  {_fmt(on)}", flush=True)
            finally:
                await env.shutdown()
            saved = 1 - on["provider_calls"] / max(1, off["provider_calls"])
            false_rate = on["false_reuse"] / max(1, on["reused"])
            repeats = kinds["repeat"] + kinds["paraphrase"]
            print(
                f"provider calls: {on['provider_calls']} vs {off['provider_calls']} "
                f"({saved:.1%} fewer; goal >= 50%); nominal cost ${on['nominal_cost_usd']:.4f} "
                f"vs ${off['nominal_cost_usd']:.4f}"
            )
            print(
                f"reused {on['reused']} of {repeats} repeats/paraphrases "
                f"({on['reused'] / max(1, repeats):.1%}); false reuse {on['false_reuse']} "
                f"({false_rate:.1%} of reused; goal <= 2%)"
            )
            for asked, source in on["false_examples"]:
                print(f"  false reuse: {asked!r} answered from {source!r}")
            print(
                f"task p50: reuse on {on['p50_ms']:.0f} ms, reuse off {off['p50_ms']:.0f} ms "
                f"(ratio {on['p50_ms'] / max(1e-9, off['p50_ms']):.2f})"
            )
        speed = await search_speed(rows, args.items, data)
        print(
            f"knowledge search at {speed['items']:,} items: p50 {speed['search_p50_ms']:.2f} ms, "
            f"p99 {speed['search_p99_ms']:.2f} ms (vector search); embed+search p50 "
            f"{speed['embed_search_p50_ms']:.2f} ms, p99 {speed['embed_search_p99_ms']:.2f} ms; "
            f"index load {speed['load_s']:.1f} s, matrix {speed['index_mb']:.0f} MB, "
            f"RSS +{speed['rss_growth_mb']:.0f} MB (write {speed['write_s']:.1f} s)"
        )
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _fmt(r: dict[str, Any]) -> str:
    return (
        f"calls={r['provider_calls']} tokens={r['tokens_in']}+{r['tokens_out']} "
        f"reused={r['reused']} false={r['false_reuse']} failed={r['failed']} "
        f"answered={r['answered']}/{r['tasks']} "
        f"p50={r['p50_ms']:.0f}ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
