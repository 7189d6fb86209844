"""The HTTP API in process (httpx over ASGI), against the real dev server and workers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from api.main import create_app
from tests.conftest import api_client, offline_network, wait_for
from xpando.db import SessionFactory, create_engine
from xpando.settings import Settings


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings) as http:
        yield http


def _error(resp: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = resp.json()["error"]
    return body


@pytest.mark.parametrize(
    ("body", "field", "detail_code"),
    [
        ({"prompt": ""}, "prompt", "string_too_short"),
        ({"prompt": "   "}, "prompt", "string_too_short"),
        ({"prompt": "x" * 8001}, "prompt", "string_too_long"),
        ({"prompt": "hello", "temperature": 2}, "temperature", "extra_forbidden"),
        ({"prompt": "hello", "k": 0}, "k", "greater_than_equal"),
        ({"prompt": "hello", "k": 10}, "k", "less_than_equal"),
        ({"prompt": "hello", "k": "three"}, "k", "number_type"),
        ({"prompt": "hello", "k": "3"}, "k", "number_type"),
        ({"prompt": "hello", "k": 2.5}, "k", "int_from_float"),
        ({"prompt": "hello", "fresh": 0}, "fresh", "bool_type"),
        ({"prompt": "hello", "regions": ["EU West!"]}, "regions.0", "string_pattern_mismatch"),
        ({}, "prompt", "missing"),
    ],
)
async def test_bad_task_requests_get_422_with_a_stable_code(
    api: httpx.AsyncClient, body: dict[str, Any], field: str, detail_code: str
) -> None:
    resp = await api.post("/v1/tasks", json=body)
    assert resp.status_code == 422
    error = _error(resp)
    assert error["code"] == "validation_error"
    assert {"field": field, "code": detail_code} in [
        {"field": d["field"], "code": d["code"]} for d in error["details"]
    ]


async def test_malformed_json_is_a_422_not_a_500(api: httpx.AsyncClient) -> None:
    resp = await api.post(
        "/v1/tasks", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422 and _error(resp)["code"] == "validation_error"


async def test_unknown_task_is_404_with_code(api: httpx.AsyncClient) -> None:
    resp = await api.get("/v1/tasks/task-does-not-exist")
    assert resp.status_code == 404 and _error(resp)["code"] == "task_not_found"


async def test_bad_idempotency_key_is_400(api: httpx.AsyncClient) -> None:
    resp = await api.post("/v1/tasks", json={"prompt": "hi"}, headers={"Idempotency-Key": "a b"})
    assert resp.status_code == 400 and _error(resp)["code"] == "invalid_idempotency_key"


async def test_healthz_reports_temporal_and_database(api: httpx.AsyncClient) -> None:
    resp = await api.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "temporal": "ok", "database": "ok"}


async def test_healthz_is_503_naming_the_database_when_it_is_unreachable(
    settings: Settings,
) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        good = app.state.engine
        app.state.engine = create_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                resp = await http.get("/healthz")
                ready = await http.get("/readyz")
        finally:
            await app.state.engine.dispose()
            app.state.engine = good
    assert resp.status_code == 503
    body = resp.json()
    assert body["status"] == "unhealthy" and body["temporal"] == "ok"
    assert body["database"].startswith("error:")
    assert ready.status_code == 503
    assert ready.json()["missing"] == ["database", "experts"]


async def test_readyz_is_ready_only_while_an_expert_is_live(
    api: httpx.AsyncClient,
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    corpus_dir: Path,
) -> None:
    before = await api.get("/readyz")
    assert before.status_code == 503
    body = before.json()
    assert body["status"] == "not_ready" and body["missing"] == ["experts"]
    assert body["temporal"] == "ok" and body["database"] == "ok"
    assert "no expert node is registered" in body["experts"]
    # Liveness does not wait for experts: the process is fine, it just has no one to ask.
    assert (await api.get("/healthz")).status_code == 200

    async with offline_network(client, settings, sessions, corpus_dir, [("cooking", "eu-west")]):
        ready = await api.get("/readyz")
        assert ready.status_code == 200, ready.json()
        assert ready.json() == {
            "status": "ready",
            "missing": [],
            "temporal": "ok",
            "database": "ok",
            "experts": "ok",
        }

    # The only node stopped: registered still, but no longer polling its queue.
    async def not_ready() -> bool:
        return (await api.get("/readyz")).status_code == 503

    await wait_for(not_ready, timeout=30, every=0.5)
    assert "none of the 1 registered expert nodes" in (await api.get("/readyz")).json()["experts"]


async def test_405_names_every_method_of_the_path(api: httpx.AsyncClient) -> None:
    resp = await api.request("PUT", "/v1/nodes")
    assert resp.status_code == 405 and _error(resp)["code"] == "method_not_allowed"
    assert set(resp.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST"}


async def test_epoch_numbers_are_bounded(api: httpx.AsyncClient) -> None:
    # Past the last second a datetime holds: refused by the path's bound, not a 500.
    resp = await api.post(f"/v1/payouts/epochs/{2**40}/settle")
    assert resp.status_code == 422 and _error(resp)["code"] == "validation_error"
    # Within the bound but ending after the year 9999 with hourly epochs: not ended, said so.
    resp = await api.post("/v1/payouts/epochs/253402300798/settle")
    assert resp.status_code == 409 and "after the year 9999" in _error(resp)["message"]


async def test_the_smallest_positive_deadline_is_accepted(api: httpx.AsyncClient) -> None:
    resp = await api.post("/v1/tasks", json={"prompt": "hello", "deadline_s": 5e-324})
    assert resp.status_code == 202, resp.json()


async def test_submit_poll_and_idempotency_over_http(
    api: httpx.AsyncClient,
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    corpus_dir: Path,
) -> None:
    nodes = [("cooking", "eu-west"), ("gardening", "us-east")]
    async with offline_network(client, settings, sessions, corpus_dir, nodes):
        nodes = (await api.get("/v1/nodes")).json()
        assert nodes["count"] == 2 and all(n["live"] for n in nodes["nodes"])
        assert {n["region"] for n in nodes["nodes"]} == {"eu-west", "us-east"}

        key = f"req-{uuid.uuid4().hex[:8]}"
        body = {"prompt": "How should I water tomato plants?", "k": 2}
        first = await api.post("/v1/tasks", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 202
        accepted = first.json()
        task_id = accepted["task_id"]
        assert accepted["links"]["self"].endswith(f"/v1/tasks/{task_id}")
        assert f"/workflows/{task_id}" in accepted["links"]["ui"]

        async def done() -> bool:
            status: str = (await api.get(f"/v1/tasks/{task_id}")).json()["status"]
            return status != "running"

        await wait_for(done, timeout=30)
        view = (await api.get(f"/v1/tasks/{task_id}")).json()
        assert view["status"] == "completed" and view["domain"] == "gardening"
        assert "tomato" in view["answer"].lower()
        assert 0 < view["confidence"] <= 1
        assert len(view["contributions"]) == 2
        for c in view["contributions"]:
            assert {"node_id", "region", "provider", "model", "latency_ms", "status"} <= set(c)
            assert c["input_tokens"] > 0 and c["output_tokens"] > 0

        # The same key and body: the same task, not a second one.
        again = await api.post("/v1/tasks", json=body, headers={"Idempotency-Key": key})
        assert again.status_code == 202 and again.json()["task_id"] == task_id
        # The same key with another body: a conflict, nothing started.
        other = await api.post(
            "/v1/tasks", json={"prompt": "something else"}, headers={"Idempotency-Key": key}
        )
        assert other.status_code == 409 and _error(other)["code"] == "idempotency_key_reused"
