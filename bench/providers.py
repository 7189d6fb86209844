"""Provider failures: tasks through OpenAI, Anthropic and Gemini nodes with one provider failing.

``python -m bench.providers [--tasks 60] [--fail-rate 0.3] [--failing openai]`` starts, in this
process, a Temporal dev server (loopback), the loopback provider server of the tests
(``bench/loopback_providers.py``, which speaks the three wire formats to the official SDKs), a core
worker and six SDK-backed expert nodes — two per provider, all in one region so that k=3 routing
asks one node of each provider. It drives N tasks (``--concurrency`` at a time) twice, each time
with a fresh database and fresh node ids (so no breaker state carries over):

* **no faults** — every call answers after ``--latency-ms``;
* **faults** — ``--failing`` answers HTTP 500 to ``--fail-rate`` of its calls (seeded).

Everything else is production behaviour: the workflow's own retry policy (1 s first backoff),
hedge deadline and standbys, and the default breaker settings (the Mother Core uses the lexical
``hashing`` embedder so that its CPU work does not drown the provider figures). It prints, per
run, completed and failed tasks, HTTP calls per provider, extra calls per task (calls beyond one
per asked expert), the answering experts' providers, p50/p95 task latency, the breakers left
open — and the fault run's ratios against the no-fault run. ``--fail-rate 1`` is a provider
that is down: its breakers open and the other providers answer.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from temporalio.client import Client

from bench._stats import p50, p95
from bench.loopback_providers import FakeProviders, Fault
from cli.devserver import start_local_env
from workers.core import build_core_worker
from workers.node import build_node_worker, register
from workflows.task import TaskWorkflow
from xpando.contracts import ContributionStatus, NodeDomain, NodeProfile, TaskInput, TaskResult
from xpando.db import create_engine, init_db, queries, session_factory
from xpando.logs import configure_logging
from xpando.providers.base import Pricing, ProviderConfig
from xpando.providers.registry import make_provider
from xpando.settings import Settings
from xpando.temporal import NodeLiveness

PROVIDERS = ("openai", "anthropic", "gemini")
NODES_PER_PROVIDER = 2
K = 3
PROMPTS = [
    "Why does bread dough rise?",
    "How long should a soft boiled egg cook?",
    "What makes a sauce thicken with a roux?",
    "How do I keep pasta from sticking together?",
    "Why rinse rice before cooking it?",
]


@dataclass
class RunResult:
    completed: int
    failed: int
    latencies: list[float]
    calls: Counter[str]
    answered_by: Counter[str]
    open_breakers: list[str]
    cost_usd: float

    @property
    def p50(self) -> float:
        return p50(self.latencies)

    @property
    def p95(self) -> float:
        return p95(self.latencies)


async def run_once(
    client: Client,
    *,
    tasks: int,
    concurrency: int,
    latency_s: float,
    failing: str | None,
    fail_rate: float,
    seed: int,
    data: Path,
) -> RunResult:
    run = uuid.uuid4().hex[:6]
    settings = Settings(
        _env_file=None,
        data_dir=data / run,
        database_url=f"sqlite+aiosqlite:///{data / f'{run}.db'}",
        core_task_queue=f"bench-core-{run}",
        log_level="WARNING",
        # the lexical embedder keeps the Mother Core's CPU work (MiniLM on 2 cores) out of the
        # provider figures; both runs use the same
        embedder="hashing",
    )
    engine = create_engine(settings.database_dsn)
    await init_db(engine)
    sessions = session_factory(engine)
    with FakeProviders(seed=seed, latency_s=latency_s) as fake:
        if failing:
            fake.fail(failing, Fault.SERVER_ERROR, rate=fail_rate)
        workers: list[Any] = [build_core_worker(client, sessions=sessions, settings=settings)]
        profiles: list[NodeProfile] = []
        for provider in PROVIDERS:
            for i in range(1, NODES_PER_PROVIDER + 1):
                node_id = f"{provider}-{i}-{run}"
                profile = NodeProfile(
                    node_id=node_id,
                    region="eu-west",
                    provider=provider,
                    model=f"{provider}-bench",
                    domains=[NodeDomain(name="cooking", keywords=["bread", "egg", "sauce"])],
                )
                model = make_provider(
                    ProviderConfig(
                        provider=provider,
                        model=profile.model,
                        api_key=SecretStr("bench-key"),
                        base_url=fake.base_url(provider, node_id),
                        timeout_s=10,
                        pricing=Pricing(1.0, 4.0),
                    )
                )
                profiles.append(profile)
                workers.append(build_node_worker(client, profile=profile, provider=model))
        for w in workers:
            await w.__aenter__()
        try:
            for p in profiles:
                await register(client, p, core_task_queue=settings.core_task_queue)
            liveness = NodeLiveness(client, max_age_s=90, cache_s=0)
            for _ in range(300):
                if all([await liveness.is_live(p.task_queue) for p in profiles]):
                    break
                await asyncio.sleep(0.1)
            fake.reset_calls()

            gate = asyncio.Semaphore(concurrency)
            latencies: list[float] = []
            answered_by: Counter[str] = Counter()
            completed = failed = 0
            cost = 0.0

            async def one(n: int) -> None:
                nonlocal completed, failed, cost
                task_id = f"task-{run}-{n}"
                async with gate:
                    started = time.perf_counter()
                    try:
                        result: TaskResult = await client.execute_workflow(
                            TaskWorkflow.run,
                            TaskInput(
                                task_id=task_id, prompt=PROMPTS[n % len(PROMPTS)], k=K, fresh=True
                            ),
                            id=task_id,
                            task_queue=settings.core_task_queue,
                        )
                    except Exception:  # counted: a failed task is a figure, not a crash
                        failed += 1
                        return
                    latencies.append(time.perf_counter() - started)
                completed += 1
                cost += sum(c.cost_usd for c in result.contributions)
                for c in result.contributions:
                    if c.status == ContributionStatus.OK:
                        answered_by[c.provider] += 1

            await asyncio.gather(*(one(n) for n in range(tasks)))
            calls = Counter(c.provider for c in fake.calls())
            async with sessions() as s:
                open_rows = await queries.open_breakers(session=s)
            return RunResult(
                completed=completed,
                failed=failed,
                latencies=latencies,
                calls=calls,
                answered_by=answered_by,
                open_breakers=sorted(k.replace(f"-{run}", "") for k in open_rows),
                cost_usd=cost,
            )
        finally:
            for w in reversed(workers):
                await w.__aexit__(None, None, None)
            await engine.dispose()


def _line(name: str, r: RunResult, tasks: int) -> str:
    total = sum(r.calls.values())
    extra = (total - K * tasks) / max(1, tasks)
    calls = ", ".join(f"{p} {r.calls.get(p, 0)}" for p in PROVIDERS)
    answered = ", ".join(f"{p} {r.answered_by.get(p, 0)}" for p in PROVIDERS)
    return (
        f"{name:<9} completed {r.completed}/{tasks}, failed {r.failed}; HTTP calls {total} "
        f"({calls}); extra calls/task {extra:.2f}; answers by {answered}; "
        f"p50 {r.p50 * 1000:.0f} ms, p95 {r.p95 * 1000:.0f} ms; cost ${r.cost_usd:.6f}; "
        f"open breakers {r.open_breakers or 'none'}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--fail-rate", type=float, default=0.3)
    parser.add_argument("--failing", choices=PROVIDERS, default="openai")
    parser.add_argument("--latency-ms", type=int, default=100, help="each provider call")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    configure_logging(Settings(_env_file=None, log_level="ERROR"))
    data = Path(tempfile.mkdtemp(prefix="xpando-bench-providers-"))
    env = await start_local_env()
    try:
        common = {
            "tasks": args.tasks,
            "concurrency": args.concurrency,
            "latency_s": args.latency_ms / 1000,
            "fail_rate": args.fail_rate,
            "seed": args.seed,
            "data": data,
        }
        print(
            f"{args.tasks} tasks, k={K}, {args.concurrency} at a time, "
            f"{NODES_PER_PROVIDER} nodes per provider, {args.latency_ms} ms per call; "
            f"fault run: {args.failing} answers 500 to {args.fail_rate:.0%} of calls",
            flush=True,
        )
        clean = await run_once(env.client, failing=None, **common)
        print(_line("no faults", clean, args.tasks), flush=True)
        faulty = await run_once(env.client, failing=args.failing, **common)
        print(_line("faults", faulty, args.tasks), flush=True)
    finally:
        await env.shutdown()
        shutil.rmtree(data, ignore_errors=True)
    extra = sum(faulty.calls.values()) / max(1, sum(clean.calls.values()))
    print(
        f"faults vs no faults: completed {faulty.completed} vs {clean.completed}; "
        f"HTTP calls x{extra:.2f}; p50 x{faulty.p50 / max(1e-9, clean.p50):.2f}, "
        f"p95 x{faulty.p95 / max(1e-9, clean.p95):.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
