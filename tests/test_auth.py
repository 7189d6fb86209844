"""API keys and scopes, against the API on the real dev server: no key is a 401 on every
protected route (found by walking the OpenAPI document) while probes, docs and signed node
registration stay open; a key without the route's scope is a 403; a revoked or expired key is a
401; only a digest is stored; a key never reaches the logs, a workflow payload or a search
attribute; and a body over the limit is a 413 before it is read."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from temporalio.client import Client

from api.main import create_app
from tests.conftest import bearer, free_port, issue_admin_key, issue_key
from xpando.auth import store
from xpando.auth.keys import KEY_RE, Scope, dev_key_path
from xpando.db import SessionFactory, session_factory
from xpando.db.models import ApiKey
from xpando.settings import Settings

# Open without a key: liveness and readiness probes, the API's own documents, and signed node
# registration (a node proves its ed25519 key instead).
OPEN = {
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("post", "/v1/nodes"),
    ("delete", "/v1/nodes/{node_id}"),
}
DOCS = ("/docs", "/redoc", "/openapi.json")


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client without a key: each request says which key it sends."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://xpando.test") as client:
        yield client


def _error(resp: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = resp.json()["error"]
    return error


def _operations(openapi: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, operations in openapi["paths"].items()
        for method, operation in operations.items()
    ]


def _concrete(path: str) -> str:
    """The path with each parameter filled in with "1" (valid or not: the key comes first)."""
    return "/".join("1" if p.startswith("{") else p for p in path.split("/"))


async def test_every_protected_route_needs_a_key_and_says_so(http: httpx.AsyncClient) -> None:
    openapi = (await http.get("/openapi.json")).json()
    scheme = openapi["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    operations = _operations(openapi)
    protected = [(m, p, op) for m, p, op in operations if (m, p) not in OPEN]
    assert {(m, p) for m, p, _ in operations} >= OPEN
    assert len(protected) >= 12  # tasks, nodes, knowledge, payouts, earnings, keys
    unknown = bearer(f"xpd_{'0' * 12}_{'A' * 43}")
    malformed = {"Authorization": "Bearer not-a-key"}
    for method, path, operation in protected:
        # Declared: the bearer scheme, the scope it needs, and both refusals.
        assert operation["security"] == [{"ApiKey": []}], (method, path)
        assert operation["x-required-scope"] in {s.value for s in Scope}, (method, path)
        assert {"401", "403"} <= set(operation["responses"]), (method, path)
        url = _concrete(path)
        # A body is sent where one belongs, and still the key is checked first.
        body: dict[str, Any] | None = {} if method in ("post", "put", "patch") else None
        for headers in ({}, malformed, unknown, {"Authorization": "Basic dXNlcjpwdw=="}):
            resp = await http.request(method.upper(), url, json=body, headers=headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert _error(resp)["code"] == "unauthenticated"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # The probes, the documents and node registration answer without a key.
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 503  # no expert: open, and not ready
    for doc in DOCS:
        assert (await http.get(doc)).status_code == 200, doc
    unsigned = await http.post("/v1/nodes", json={})
    assert unsigned.status_code == 422 and _error(unsigned)["code"] == "validation_error"


async def test_a_key_without_the_routes_scope_is_forbidden(
    http: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    reader = bearer(await issue_key(sessions, Scope.TASKS_READ, name="reader"))
    admin = bearer(await issue_key(sessions, Scope.ADMIN, name="root"))
    # Its own scope: through to the route (which finds no such task).
    found = await http.get("/v1/tasks/task-nope", headers=reader)
    assert found.status_code == 404 and _error(found)["code"] == "task_not_found"
    # Another scope: refused before the body is looked at, naming the scope it needs.
    for method, url, needed in [
        ("POST", "/v1/tasks", "tasks:write"),
        ("GET", "/v1/nodes", "nodes:read"),
        ("GET", "/v1/knowledge?q=eggs", "knowledge:read"),
        ("GET", "/v1/payouts", "payouts:read"),
        ("POST", "/v1/payouts/epochs/1/settle", "payouts:approve"),
        ("GET", "/v1/keys", "admin"),
    ]:
        resp = await http.request(method, url, json={"prompt": "hi"}, headers=reader)
        assert resp.status_code == 403, (url, resp.text)
        error = _error(resp)
        assert error["code"] == "forbidden" and f"scope '{needed}'" in error["message"]
        assert "tasks:read" in error["message"]  # what the key does hold
        assert f'scope="{needed}"' in resp.headers["WWW-Authenticate"]
    # admin holds every scope.
    assert (await http.get("/v1/nodes", headers=admin)).status_code == 200
    assert (await http.get("/v1/keys", headers=admin)).status_code == 200


async def test_keys_are_shown_once_and_a_revoked_or_expired_key_is_refused(
    http: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    admin = bearer(await issue_key(sessions, name="root"))
    created = await http.post(
        "/v1/keys",
        json={"name": "alice", "scopes": ["tasks:read", "nodes:read"], "expires_in_s": 3600},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    view = created.json()
    key = view["key"]
    found = KEY_RE.match(key)
    assert found is not None and found["key_id"] == view["key_id"]
    assert view["status"] == "active" and view["created_by"] == "root"
    expires = datetime.fromisoformat(view["expires_at"]) - datetime.now(UTC)
    assert timedelta(minutes=59) < expires <= timedelta(hours=1)
    alice = bearer(key)
    assert (await http.get("/v1/nodes", headers=alice)).status_code == 200

    # Listed with its id, name and scopes, never its secret or digest.
    listed = (await http.get("/v1/keys", headers=admin)).json()
    assert [k["name"] for k in listed["keys"]] == ["root", "alice"]
    assert key not in str(listed) and hashlib.sha256(key.encode()).hexdigest() not in str(listed)

    # The same id with another secret is not the key.
    forged = bearer(f"xpd_{view['key_id']}_{'B' * 43}")
    refused = await http.get("/v1/nodes", headers=forged)
    assert refused.status_code == 401 and _error(refused)["message"] == "unknown API key"

    revoked = await http.delete(f"/v1/keys/{view['key_id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    after = await http.get("/v1/nodes", headers=alice)
    assert after.status_code == 401 and _error(after)["code"] == "unauthenticated"
    assert "revoked" in _error(after)["message"]
    assert 'error="invalid_token"' in after.headers["WWW-Authenticate"]
    again = await http.delete(f"/v1/keys/{view['key_id']}", headers=admin)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]  # once revoked, stays so
    missing = await http.delete("/v1/keys/0123456789ab", headers=admin)
    assert missing.status_code == 404 and _error(missing)["code"] == "key_not_found"

    # A key whose expiry has passed (issued a minute ago, valid for a second).
    async with sessions() as session:
        a_minute_ago = datetime.now(UTC) - timedelta(minutes=1)
        old = await store.create_key(
            session=session,
            name="temp",
            scopes=[Scope.NODES_READ],
            expires_at=a_minute_ago + timedelta(seconds=1),
            now=a_minute_ago,
        )
    expired = await http.get("/v1/nodes", headers=bearer(old.key))
    assert expired.status_code == 401 and "expired" in _error(expired)["message"]
    statuses = {
        k["name"]: k["status"] for k in (await http.get("/v1/keys", headers=admin)).json()["keys"]
    }
    assert statuses == {"root": "active", "alice": "revoked", "temp": "expired"}


async def test_keys_on_sqlite_and_postgresql_store_only_a_digest(any_engine: AsyncEngine) -> None:
    sessions = session_factory(any_engine)
    in_a_day = datetime.now(UTC) + timedelta(days=1)
    key = await issue_key(sessions, Scope.PAYOUTS_APPROVE, Scope.TASKS_READ, name="alice")
    other = await issue_key(sessions, Scope.NODES_READ, name="bob", expires_at=in_a_day)
    async with sessions() as session:
        rows = {r.name: r for r in (await session.exec(select(ApiKey))).all()}
        principal = await store.authenticate(session=session, key=key)
        later = await store.authenticate(session=session, key=other)
        listed = await store.list_keys(session=session)
    found = KEY_RE.fullmatch(key)
    assert found is not None
    row = rows["alice"]
    assert found["secret"] not in row.model_dump_json()
    assert row.digest == hashlib.sha256(key.encode()).hexdigest()
    assert row.key_id == found["key_id"] and row.scopes == ["tasks:read", "payouts:approve"]
    assert principal.name == "alice" and not principal.is_admin
    assert principal.scopes == frozenset({"tasks:read", "payouts:approve"})
    assert later.name == "bob" and [r.name for r in listed] == ["alice", "bob"]
    # The expiry is kept to the second, time zone and all: a day on, bob's key has expired.
    async with sessions() as session:
        with pytest.raises(store.Unauthenticated, match="expired"):
            await store.authenticate(session=session, key=other, now=in_a_day)
        await store.revoke_key(session=session, key_id=found["key_id"])
        with pytest.raises(store.Unauthenticated, match="revoked"):
            await store.authenticate(session=session, key=key)


async def test_the_dev_key_is_made_once_kept_0600_and_replaced_when_revoked(
    settings: Settings, sessions: SessionFactory
) -> None:
    key, created = await store.ensure_dev_key(sessions=sessions, data_dir=settings.data_dir)
    path = dev_key_path(settings.data_dir)
    assert created and path.read_text().strip() == key
    assert path.stat().st_mode & 0o777 == 0o600
    same, created_again = await store.ensure_dev_key(sessions=sessions, data_dir=settings.data_dir)
    assert (same, created_again) == (key, False)
    found = KEY_RE.match(key)
    assert found is not None
    async with sessions() as session:
        await store.revoke_key(session=session, key_id=found["key_id"])
    new, replaced = await store.ensure_dev_key(sessions=sessions, data_dir=settings.data_dir)
    assert replaced and new != key and path.read_text().strip() == new
    assert path.stat().st_mode & 0o777 == 0o600


async def test_a_body_over_the_limit_is_refused_before_it_is_read(
    settings: Settings, sessions: SessionFactory
) -> None:
    limit = 64 * 1024
    app = create_app(settings.model_copy(update={"api_max_body_bytes": limit}))
    writer = bearer(await issue_key(sessions, Scope.TASKS_WRITE, name="writer"))
    pulled = 0
    chunk = b" " * 4096  # JSON whitespace: a valid start of a body, whatever its length

    async def body(chunks: int) -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(chunks):
            pulled += 1
            yield chunk

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://xpando.test") as http:
            # Content-Length over the limit: refused without reading a byte, key or not.
            for headers in (writer, {}):
                pulled = 0
                resp = await http.post(
                    "/v1/tasks",
                    content=body(256),  # 1 MiB
                    headers={**headers, "Content-Length": str(256 * 4096)},
                )
                assert resp.status_code == 413, resp.text
                assert _error(resp)["code"] == "body_too_large" and pulled == 0
            # Streamed (chunked, no length): refused once what arrived passes the limit.
            pulled = 0
            resp = await http.post("/v1/tasks", content=body(256), headers=writer)
            assert resp.status_code == 413 and _error(resp)["code"] == "body_too_large"
            assert pulled == limit // len(chunk) + 1
            # Under the limit the body is read and judged as usual.
            pulled = 0
            resp = await http.post("/v1/tasks", content=body(4), headers=writer)
            assert resp.status_code == 422 and pulled == 4
            # Without a key, not even a streamed body is read.
            pulled = 0
            resp = await http.post("/v1/tasks", content=body(256))
            assert resp.status_code == 401 and pulled == 0


async def test_a_key_never_reaches_the_logs_a_payload_or_a_search_attribute(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    """The API process itself (``xpando api``, access log on, DEBUG), its whole output read."""
    port = free_port()
    key = await issue_admin_key(settings, name="operator")
    found = KEY_RE.match(key)
    assert found is not None
    env = {
        **os.environ,
        "XPANDO_DATA_DIR": str(settings.data_dir),
        "XPANDO_DATABASE_URL": settings.database_dsn,
        "XPANDO_TEMPORAL_ADDRESS": settings.temporal_target,
        "XPANDO_CORE_TASK_QUEUE": settings.core_task_queue,
        "XPANDO_API_PORT": str(port),
        "XPANDO_LOG_LEVEL": "DEBUG",
        "XPANDO_LOG_FORMAT": "json",
    }
    output = tmp_path / "api.log"
    with output.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "api", env=env, stdout=sink, stderr=sink
        )
    base = f"http://127.0.0.1:{port}"
    secrets = [key, found["secret"]]
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            for _ in range(600):
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.returncode is None, output.read_text()[-3000:]
                await asyncio.sleep(0.1)
            auth = bearer(key)
            submitted = await http.post("/v1/tasks", json={"prompt": "who am I?"}, headers=auth)
            assert submitted.status_code == 202, submitted.text
            task_id = submitted.json()["task_id"]
            assert (await http.get(f"/v1/tasks/{task_id}", headers=auth)).status_code == 200
            wrong = bearer(f"xpd_{found['key_id']}_{'C' * 43}")
            assert (await http.get("/v1/nodes", headers=wrong)).status_code == 401
            # A client that puts its key in the URL: the access log line shows only its id.
            assert (await http.get(f"/v1/nodes?key={key}", headers=auth)).status_code == 200
            # A key the API issues is in its response, and nowhere else.
            issued = await http.post(
                "/v1/keys", json={"name": "bob", "scopes": ["tasks:read"]}, headers=auth
            )
            assert issued.status_code == 201
            bob = KEY_RE.match(issued.json()["key"])
            assert bob is not None
            secrets += [bob[0], bob["secret"]]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    logs = output.read_text()
    # The logs are there (so their silence about keys means something) ...
    assert 'POST /v1/tasks HTTP/1.1\\" 202' in logs  # uvicorn's access log, as JSON
    assert '"principal": "operator"' in logs and f'"task_id": "{task_id}"' in logs
    assert f"xpd_{found['key_id']}_[redacted]" in logs
    # ... and no key is in them.
    for secret in secrets:
        assert secret not in logs
    # Nor in what Temporal keeps of the task: its input, memo and search attributes.
    handle = client.get_workflow_handle(task_id)
    history = b"".join(e.SerializeToString() for e in (await handle.fetch_history()).events)
    description = (await handle.describe()).raw_description.SerializeToString()
    await handle.terminate("no core worker in this test")
    assert b"who am I?" in history
    for secret in secrets:
        assert secret.encode() not in history and secret.encode() not in description
