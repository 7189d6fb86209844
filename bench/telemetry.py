"""Tracing and metrics on vs off: task throughput in one run, and their ratio (goal >= 0.95).

``python -m bench.telemetry [--tasks 100] [--concurrency 10] [--rounds 5]`` starts, in this
process, a Temporal dev server (loopback), the loopback provider server of the tests
(``bench/loopback_providers.py``), an OTLP sink (a loopback HTTP server that takes
``POST /v1/traces`` and drops it, standing in for a collector) and, per run, the API (over
ASGI), a core worker and three openai-compatible expert nodes (the official openai SDK). Each
run submits N tasks over HTTP (k=3, fresh: every task asks all three experts), ``--concurrency``
at a time, and counts completed tasks per second. Runs alternate ``off``, ``on``, ``off``, ...
(``--rounds`` of each), every run with a fresh core queue, nodes and database:

* **off** - what ``OTEL_TRACES_EXPORTER`` unset and no ``XPANDO_METRICS_PORT`` give: no
  tracing interceptor, no instrumentation, the SDK's default runtime (xpando's counters are
  always recorded, as in production);
* **on** - ``OTEL_TRACES_EXPORTER=otlp`` (batch span processor, protobuf over HTTP to the sink)
  with FastAPI, httpx/httpx2 and Temporal tracing, the worker metrics port with the Temporal SDK's
  Prometheus exporter, and both the worker's port and the API's ``/metrics`` scraped every
  second.

It prints each run's throughput, p50/p95 latency and this process's CPU time per task (every
thread: Python, the Temporal SDK's core, the exporter; the dev server is another process), then
on/off as the ratio of the medians. On a machine shared with other work the CPU time per task
is the steadier figure: throughput here is bound by this process's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.runtime import Runtime

from api.main import create_app
from bench._stats import p50, p95
from bench.loopback_providers import FakeProviders
from cli.devserver import start_local_env
from workers.core import build_core_worker
from workers.node import build_node_worker, register
from workflows.task import TaskWorkflow
from xpando import telemetry, temporal
from xpando.auth.keys import Scope
from xpando.auth.store import create_key
from xpando.contracts import NodeDomain, NodeProfile, TaskResult
from xpando.db import create_engine, init_db, session_factory
from xpando.logs import configure_logging
from xpando.providers.base import Pricing, ProviderConfig
from xpando.providers.registry import make_provider
from xpando.settings import Settings
from xpando.temporal import NodeLiveness

NODES = 3
K = 3
WARMUP = 5
SCRAPE_EVERY_S = 1.0
PROMPTS = [
    "Why does bread dough rise?",
    "How long should a soft boiled egg cook?",
    "What makes a sauce thicken with a roux?",
    "How do I keep pasta from sticking together?",
    "Why rinse rice before cooking it?",
]


class _Sink(BaseHTTPRequestHandler):
    """Takes an OTLP/HTTP export and answers 200 with an empty ExportTraceServiceResponse."""

    spans_bytes = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        _Sink.spans_bytes += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@contextmanager
def otlp_sink() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@dataclass
class RunResult:
    mode: str
    completed: int
    failed: int
    seconds: float
    latencies: list[float]
    scrapes: int
    cpu_s: float  # this process's CPU time (every thread) over the timed tasks

    @property
    def cpu_ms_per_task(self) -> float:
        return 1000 * self.cpu_s / self.completed if self.completed else 0.0

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float:
        return p50(self.latencies)

    @property
    def p95(self) -> float:
        return p95(self.latencies)


async def run_once(
    target: str,
    *,
    on: bool,
    tasks: int,
    concurrency: int,
    fake: FakeProviders,
    sink: str,
    data: Path,
    trace: bool = True,
    measure: bool = True,
) -> RunResult:
    run = uuid.uuid4().hex[:6]
    metrics_port = _free_port() if on and measure else 0
    settings = Settings(
        _env_file=None,
        data_dir=data / run,
        database_url=f"sqlite+aiosqlite:///{data / f'{run}.db'}",
        temporal_address=target,
        core_task_queue=f"bench-telemetry-{run}",
        log_level="WARNING",
        embedder="hashing",  # the Mother Core's CPU work stays out of the figures
        otel_traces_exporter="otlp" if on and trace else "none",
        otel_exporter_otlp_endpoint=sink,
        metrics_port=metrics_port,
        payout_schedule_s=0,
    )
    telemetry.configure_tracing(settings, component="bench")  # only when otlp is asked for
    telemetry.serve_worker_metrics(settings)  # only with a metrics port
    # Off: the SDK's default runtime (no Prometheus exporter); on: the one that exports.
    runtime = temporal.metrics_runtime() if metrics_port else Runtime.default()
    client = await temporal.connect(settings, runtime=runtime)
    engine = create_engine(settings.database_dsn)
    await init_db(engine)
    sessions = session_factory(engine)
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(
                build_core_worker(client, sessions=sessions, settings=settings)
            )
            profiles = []
            for i in range(NODES):
                node_id = f"llm-{i}-{run}"
                profile = NodeProfile(
                    node_id=node_id,
                    region=("eu-west", "us-east", "ap-southeast")[i % 3],
                    provider="openai-compatible",
                    model="bench-model",
                    domains=[NodeDomain(name="cooking", keywords=["bread", "egg", "sauce"])],
                )
                provider = make_provider(
                    ProviderConfig(
                        provider="openai-compatible",
                        model="bench-model",
                        api_key=SecretStr("bench-key"),
                        base_url=fake.base_url("openai-compatible", node_id),
                        timeout_s=10,
                        pricing=Pricing(1.0, 4.0),
                    )
                )
                await stack.enter_async_context(
                    build_node_worker(client, profile=profile, provider=provider)
                )
                await register(client, profile, core_task_queue=settings.core_task_queue)
                profiles.append(profile)
            liveness = NodeLiveness(client, max_age_s=90, cache_s=0)
            for _ in range(300):
                if all([await liveness.is_live(p.task_queue) for p in profiles]):
                    break
                await asyncio.sleep(0.1)
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            async with app.state.sessions() as session:
                issued = await create_key(session=session, name="bench", scopes=[Scope.ADMIN])
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url="http://b",
                    headers={"Authorization": f"Bearer {issued.key}"},
                )
            )
            return await _drive(
                client,
                http,
                mode="on" if on else "off",
                tasks=tasks,
                concurrency=concurrency,
                metrics_url=f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None,
            )
    finally:
        await engine.dispose()
        telemetry.shutdown_tracing()


async def _drive(
    client: Client,
    http: httpx.AsyncClient,
    *,
    mode: str,
    tasks: int,
    concurrency: int,
    metrics_url: str | None,
) -> RunResult:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    completed = failed = 0

    async def one(n: int, timed: bool) -> None:
        nonlocal completed, failed
        async with gate:
            started = time.perf_counter()
            try:
                resp = await http.post(
                    "/v1/tasks", json={"prompt": PROMPTS[n % len(PROMPTS)], "k": K, "fresh": True}
                )
                resp.raise_for_status()
                handle = client.get_workflow_handle_for(TaskWorkflow.run, resp.json()["task_id"])
                result: TaskResult = await handle.result()
            except Exception:  # counted: a failed task is a figure, not a crash
                failed += timed
                return
            if timed and len(result.contributions) == K:
                latencies.append(time.perf_counter() - started)
                completed += 1

    await asyncio.gather(*(one(n, False) for n in range(WARMUP)))
    scrapes = 0
    stop = asyncio.Event()

    async def scrape() -> None:  # what Prometheus does to this process while it works
        nonlocal scrapes
        while not stop.is_set():
            if metrics_url is not None:
                await asyncio.to_thread(lambda: urllib.request.urlopen(metrics_url).read())
                (await http.get("/metrics")).raise_for_status()
                scrapes += 1
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SCRAPE_EVERY_S)

    scraper = asyncio.create_task(scrape())
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(n, True) for n in range(tasks)))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    stop.set()
    await scraper
    return RunResult(mode, completed, failed, seconds, latencies, scrapes, cpu)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _line(r: RunResult) -> str:
    return (
        f"{r.mode:<4} {r.throughput:6.2f} tasks/s ({r.completed} in {r.seconds:.1f} s, "
        f"failed {r.failed}); p50 {r.p50 * 1000:.0f} ms, p95 {r.p95 * 1000:.0f} ms; "
        f"CPU {r.cpu_ms_per_task:.1f} ms/task"
        + (f"; {r.scrapes} scrapes" if r.mode == "on" else "")
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each mode, alternated")
    parser.add_argument("--latency-ms", type=int, default=50, help="each provider call")
    parser.add_argument(
        "--on",
        choices=["both", "tracing", "metrics"],
        default="both",
        help="what the 'on' runs turn on (default both)",
    )
    parser.add_argument(
        "--sample",
        type=float,
        default=None,
        help="on runs trace this share of tasks (OTEL_TRACES_SAMPLER=parentbased_traceidratio, "
        "which the OpenTelemetry SDK reads); default every task",
    )
    args = parser.parse_args()
    if args.sample is not None:
        os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        os.environ["OTEL_TRACES_SAMPLER_ARG"] = str(args.sample)
    configure_logging(Settings(_env_file=None, log_level="ERROR"))
    data = Path(tempfile.mkdtemp(prefix="xpando-bench-telemetry-"))
    env = await start_local_env()
    target = env.client.service_client.config.target_host
    results: list[RunResult] = []
    print(
        f"{args.tasks} tasks per run over HTTP, k={K} ({NODES} openai-compatible nodes, "
        f"{args.latency_ms} ms per provider call), {args.concurrency} at a time; "
        f"{args.rounds} rounds of off/on ({args.on} on"
        + (f", {args.sample:.0%} of tasks traced)" if args.sample is not None else ")"),
        flush=True,
    )
    try:
        with FakeProviders(seed=5, latency_s=args.latency_ms / 1000) as fake, otlp_sink() as sink:
            for _ in range(args.rounds):
                for on in (False, True):
                    result = await run_once(
                        target,
                        on=on,
                        tasks=args.tasks,
                        concurrency=args.concurrency,
                        fake=fake,
                        sink=sink,
                        data=data,
                        trace=args.on in ("both", "tracing"),
                        measure=args.on in ("both", "metrics"),
                    )
                    results.append(result)
                    print(_line(result), flush=True)
    finally:
        await env.shutdown()
        shutil.rmtree(data, ignore_errors=True)
    off_tps = statistics.median(r.throughput for r in results if r.mode == "off")
    on_tps = statistics.median(r.throughput for r in results if r.mode == "on")
    cpu_off = statistics.median(r.cpu_ms_per_task for r in results if r.mode == "off")
    cpu_on = statistics.median(r.cpu_ms_per_task for r in results if r.mode == "on")
    print(
        f"median throughput: off {off_tps:.2f} tasks/s, on {on_tps:.2f} tasks/s; "
        f"on/off ratio {on_tps / off_tps:.3f} (goal >= 0.95)\n"
        f"median CPU of this process per task: off {cpu_off:.1f} ms, on {cpu_on:.1f} ms "
        f"(off/on {cpu_off / cpu_on:.3f}); OTLP bytes exported {_Sink.spans_bytes}"
    )


if __name__ == "__main__":
    asyncio.run(main())
