"""Traces and metrics as an operator sees them.

* One task submitted over HTTP is one trace: the API's request span, the workflow start and run,
  every expert's ``answer`` activity on its node, the provider SDK's HTTP call inside each (whose
  ``traceparent`` reaches the provider), and the ``finish`` step that records the task. The
  spans go to the OpenTelemetry SDK's in-memory exporter; the network is real (dev server, core
  and node workers, the openai SDK against the loopback provider of ``bench/``).
* ``/metrics`` of the API, and the metrics port of a core worker run as its own process, parse
  as Prometheus text and move as a task runs; the activities that know a task's outcome, an
  expert's tokens and cost record them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from api.main import create_app
from bench.loopback_providers import FakeProviders
from cli.devserver import dev_server_tracing_env, start_dev_command
from tests.conftest import bearer, free_port, issue_key, wait_for, wait_live
from tests.fakes.networks import LoopbackNode, loopback_network
from workers.node import NodeSpec, build_node, build_node_worker, register
from workflows.task import TaskWorkflow
from xpando import telemetry, temporal
from xpando.contracts import NodeProfile, TaskInput, TaskResult
from xpando.db import SessionFactory
from xpando.logs import _add_trace_context
from xpando.providers.base import Pricing
from xpando.settings import Settings

PROMPT = "Why does bread dough rise?"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, into memory; off again (instrumentation removed) after it."""
    assert not telemetry.tracing_enabled(), "another test left tracing on"
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing(Settings(_env_file=None), component="test", exporter=exporter)
    try:
        yield exporter
    finally:
        telemetry.shutdown_tracing()


@asynccontextmanager
async def sdk_network(
    client: Client, settings: Settings, sessions: SessionFactory, fake: FakeProviders, count: int
) -> AsyncIterator[list[NodeProfile]]:
    """A core worker plus ``count`` openai-compatible nodes (the official openai SDK against
    the loopback provider), registered through the core and polling."""
    nodes = [
        LoopbackNode(
            f"llm-{i}",
            keywords=("bread", "dough", "rise", "yeast"),
            region=("eu-west", "us-east")[i % 2],
            pricing=Pricing(input_per_mtok=2.0, output_per_mtok=8.0),
            model="loopback-model",
        )
        for i in range(count)
    ]
    async with loopback_network(client, settings, sessions, fake, nodes) as profiles:
        yield list(profiles.values())


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        above = by_id[parent.span_id]
        names.append(above.name)
        parent = above.parent
    return names


async def test_one_task_over_http_is_one_trace_down_to_the_provider_call(
    spans: InMemorySpanExporter, settings: Settings, sessions: SessionFactory
) -> None:
    client = await temporal.connect(settings)  # after tracing is on: it carries the interceptor
    with FakeProviders(seed=3) as fake:
        async with sdk_network(client, settings, sessions, fake, count=2) as nodes:
            app = create_app(settings)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                key = await issue_key(app.state.sessions)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://t", headers=bearer(key)
                ) as http:
                    resp = await http.post(
                        "/v1/tasks", json={"prompt": PROMPT, "k": 2, "fresh": True}
                    )
                    assert resp.status_code == 202, resp.text
                    task_id = resp.json()["task_id"]
                    result: TaskResult = await client.get_workflow_handle_for(
                        TaskWorkflow.run, task_id
                    ).result()
        calls = fake.calls()
    assert sorted(c.node_id for c in result.contributions) == sorted(n.node_id for n in nodes)

    finished = spans.get_finished_spans()
    request = [s for s in finished if s.kind == SpanKind.SERVER and s.name == "POST /v1/tasks"]
    assert len(request) == 1, [s.name for s in finished]
    trace_id = request[0].context.trace_id
    trace = [s for s in finished if s.context.trace_id == trace_id]
    names = [s.name for s in trace]
    by_id = {s.context.span_id: s for s in trace}

    # The request started the workflow, which ran on the core worker ...
    assert "StartWorkflow:TaskWorkflow" in names
    assert "RunWorkflow:TaskWorkflow" in names
    assert "RunActivity:plan_route" in names
    # ... every expert answered in its own activity, on its own node's queue ...
    answers = [s for s in trace if s.name == "RunActivity:answer"]
    assert len(answers) == 2
    # ... each through the SDK's HTTP call to the provider, inside that activity ...
    provider_calls = [
        s for s in trace if s.kind == SpanKind.CLIENT and "/chat/completions" in str(_url(s))
    ]
    assert len(provider_calls) == 2, names
    for call in provider_calls:
        assert "RunActivity:answer" in _ancestors(call, by_id)
        assert "POST /v1/tasks" in _ancestors(call, by_id)
    # ... and the record step closed it.
    assert "RunActivity:finish" in names
    # Nothing of this workflow went to another trace.
    of_task = [s for s in finished if (s.attributes or {}).get("temporalWorkflowID") == task_id]
    assert of_task and {s.context.trace_id for s in of_task} == {trace_id}
    # The provider received the trace context: its own spans would join this trace.
    assert len(calls) == 2
    assert all(c.traceparent and f"{trace_id:032x}" in c.traceparent for c in calls)

    # Registration is traced too: the node's signed request, the core's workflow and activity.
    registrations = [s for s in finished if s.name == "RunActivity:register_node"]
    assert len(registrations) == 2
    for reg in registrations:
        same = {s.name for s in finished if s.context.trace_id == reg.context.trace_id}
        assert {
            "StartWorkflow:NodeRegistrationWorkflow",
            "RunWorkflow:NodeRegistrationWorkflow",
        } <= same


def _url(span: ReadableSpan) -> object:
    attributes = span.attributes or {}
    return attributes.get("url.full") or attributes.get("http.url")


async def test_log_lines_carry_the_trace_of_the_active_span(
    spans: InMemorySpanExporter,
) -> None:
    with telemetry.span("payout.batch", epoch=7):
        inside = dict(_add_trace_context(None, "info", {"event": "paid"}))
    outside = dict(_add_trace_context(None, "info", {"event": "idle"}))
    (span,) = [s for s in spans.get_finished_spans() if s.name == "payout.batch"]
    assert inside["trace_id"] == f"{span.context.trace_id:032x}"
    assert inside["span_id"] == f"{span.context.span_id:016x}"
    assert "trace_id" not in outside


def _scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition (raises if it does not parse)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def test_api_metrics_parse_and_move_and_activities_record_what_they_know(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    def counted(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    answers_before = counted(
        "xpando_expert_answers_total", provider="openai-compatible", status="ok"
    )
    tokens_before = counted(
        "xpando_provider_tokens_total",
        provider="openai-compatible",
        model="loopback-model",
        direction="output",
    )
    cost_before = counted(
        "xpando_provider_cost_usd_total", provider="openai-compatible", model="loopback-model"
    )
    with FakeProviders(seed=4) as fake:
        async with sdk_network(client, settings, sessions, fake, count=2):
            app = create_app(settings)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                key = await issue_key(app.state.sessions)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://t", headers=bearer(key)
                ) as http:
                    before = _scrape((await http.get("/metrics")).text)
                    resp = await http.post(
                        "/v1/tasks", json={"prompt": PROMPT, "k": 2, "fresh": True}
                    )
                    assert resp.status_code == 202, resp.text
                    task_id = resp.json()["task_id"]
                    result: TaskResult = await client.get_workflow_handle_for(
                        TaskWorkflow.run, task_id
                    ).result()
                    await http.get(f"/v1/tasks/{task_id}")
                    scraped = await http.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    after = _scrape(scraped.text)

    # The API counts what it started and the requests it served, by route template (the task
    # id is in no label).
    assert _value(after, "xpando_tasks_submitted_total") == (
        _value(before, "xpando_tasks_submitted_total") + 1
    )
    route = "/v1/tasks/{task_id}"
    assert _value(after, "xpando_http_requests_total", route=route, status="200") == (
        _value(before, "xpando_http_requests_total", route=route, status="200") + 1
    )
    assert task_id not in scraped.text

    # Node activities recorded their answers, tokens and cost ...
    assert (
        counted("xpando_expert_answers_total", provider="openai-compatible", status="ok")
        == answers_before + 2
    )
    output_tokens = sum(c.output_tokens for c in result.contributions)
    assert output_tokens > 0
    assert (
        counted(
            "xpando_provider_tokens_total",
            provider="openai-compatible",
            model="loopback-model",
            direction="output",
        )
        == tokens_before + output_tokens
    )
    cost = sum(c.cost_usd for c in result.contributions)
    assert counted(
        "xpando_provider_cost_usd_total", provider="openai-compatible", model="loopback-model"
    ) == pytest.approx(cost_before + cost)


async def test_a_core_worker_serves_metrics_that_move_as_a_task_runs(
    client: Client, settings: Settings, tmp_path: Path, corpus_dir: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XPANDO_TEMPORAL_ADDRESS": settings.temporal_target,
        "XPANDO_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'core.db'}",
        "XPANDO_DATA_DIR": str(tmp_path / "core-data"),
        "XPANDO_CORE_TASK_QUEUE": settings.core_task_queue,
        "XPANDO_METRICS_PORT": str(port),
        "XPANDO_EMBEDDER": "hashing",
        "XPANDO_PAYOUT_SCHEDULE_S": "0",
        "XPANDO_LOG_LEVEL": "WARNING",
        "OTEL_TRACES_EXPORTER": "none",
    }
    core = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "worker", "core", env=env, cwd=ROOT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:

            async def serving() -> bool:
                assert core.returncode is None, "the core worker exited"
                try:
                    return (await http.get(url)).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(serving, timeout=60)
            before = _scrape((await http.get(url)).text)
            spec = NodeSpec(
                node_id=f"cooking-{uuid.uuid4().hex[:8]}",
                region="eu-west",
                domain="cooking",
                corpus=corpus_dir / "cooking.jsonl",
            )
            profile, provider = build_node(spec, data_dir=settings.data_dir)
            async with build_node_worker(client, profile=profile, provider=provider):
                await register(client, profile, core_task_queue=settings.core_task_queue)
                await wait_live(client, profile.task_queue)
                task_id = f"task-{uuid.uuid4().hex[:10]}"
                await client.execute_workflow(
                    TaskWorkflow.run,
                    TaskInput(task_id=task_id, prompt="How long does a soft boiled egg take?", k=1),
                    id=task_id,
                    task_queue=settings.core_task_queue,
                )
            text = (await http.get(url)).text
    finally:
        os.killpg(core.pid, signal.SIGTERM)
        await asyncio.wait_for(core.wait(), 30)
    after = _scrape(text)
    # xpando's own: the task's outcome and latency (recorded by its last step), its routing
    # decision and what stored knowledge decided ...
    assert _value(after, "xpando_tasks_total", outcome="completed") == (
        _value(before, "xpando_tasks_total", outcome="completed") + 1
    )
    assert _value(after, "xpando_task_duration_seconds_count", outcome="completed") == (
        _value(before, "xpando_task_duration_seconds_count", outcome="completed") + 1
    )
    assert _value(after, "xpando_routing_decision_seconds_count", outcome="routed") >= 1
    assert _value(after, "xpando_knowledge_plans_total") == (
        _value(before, "xpando_knowledge_plans_total") + 1
    )
    # ... and the Temporal SDK's runtime metrics on the same port: this worker completed the
    # node's registration and the task.
    assert _value(after, "temporal_workflow_completed_total") >= 2
    assert _value(after, "temporal_workflow_completed_total") > _value(
        before, "temporal_workflow_completed_total"
    )


async def test_payout_chain_calls_are_spans_while_tracing(
    spans: InMemorySpanExporter, settings: Settings, sessions: SessionFactory
) -> None:
    from workers.payouts import build_payout_activities
    from xpando.chain import init_chain

    await init_chain(settings)  # the embedded chain: the treasury, its mint, its funds
    payouts = build_payout_activities(sessions=sessions, settings=settings)
    with telemetry.span("payout.batch", epoch=1, batch=0):
        chain = await payouts._get_chain()
        balance = await chain.treasury_balance()
    assert balance == settings.chain_initial_supply
    finished = {s.name: s for s in spans.get_finished_spans()}
    call, batch = finished["chain.treasury_balance"], finished["payout.batch"]
    assert call.parent is not None and call.parent.span_id == batch.context.span_id


@pytest.mark.parametrize("exporter", ["console", "otlp"])
async def test_xpando_dev_starts_its_temporal_server_whatever_tracing_is_asked(
    exporter: str,
) -> None:
    """The dev server reads OTEL_TRACES_EXPORTER itself and dies at start on ``console``: it is
    given only ``otlp``, pointed at the collector's gRPC port beside xpando's HTTP one."""
    settings = Settings(
        _env_file=None,
        otel_traces_exporter=exporter,
        otel_exporter_otlp_endpoint="http://127.0.0.1:4318",
    )
    env = dev_server_tracing_env({**os.environ, "OTEL_TRACES_EXPORTER": exporter}, settings)
    if exporter == "otlp":
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4317"
        assert env["OTEL_SERVICE_NAME"] == "temporal-dev-server"
    else:
        assert "OTEL_TRACES_EXPORTER" not in env
    port = free_port()
    cmd = start_dev_command(
        ip="127.0.0.1", port=port, ui_port=free_port(), namespace="default", db_file=None
    )
    server = await asyncio.create_subprocess_exec(
        *cmd, "--headless", env=env, stdout=asyncio.subprocess.DEVNULL
    )
    try:

        async def serving() -> bool:
            assert server.returncode is None, f"the dev server exited ({server.returncode})"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_for(serving, timeout=30)
        await asyncio.sleep(0.5)  # a server that fails on its exporter exits right after start
        assert server.returncode is None
    finally:
        if server.returncode is None:
            server.terminate()
        await asyncio.wait_for(server.wait(), 30)
