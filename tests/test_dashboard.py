"""The dashboard as a browser's HTTP sees it (in process, over ASGI): signing in sets a strict
HttpOnly session cookie, forms without the session's CSRF token are refused, a key without a
view's scope gets a 403 page and no data, and the views show a real network's data."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.main import create_app
from tests.conftest import issue_key, offline_network, wait_for
from xpando.auth.keys import Scope
from xpando.db import SessionFactory, activity, session_factory
from xpando.db.ledger_models import Accrual, Payout
from xpando.db.models import Contribution, Knowledge, Task
from xpando.settings import Settings


@asynccontextmanager
async def browser(settings: Settings, *scopes: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A cookie-keeping client of the app in process and a key with ``scopes`` (admin when
    none), not signed in yet."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        key = await issue_key(app.state.sessions, *scopes, name=f"viewer-{uuid.uuid4().hex[:8]}")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://xpando.test") as http:
            yield http, key


def _field(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found, f"no {name} field in the page"
    return found.group(1)


async def sign_in(http: httpx.AsyncClient, key: str, next_path: str = "/") -> httpx.Response:
    form = await http.get("/signin", params={"next": next_path})
    assert form.status_code == 200
    return await http.post(
        "/signin", data={"csrf": _field(form.text, "csrf"), "next": next_path, "key": key}
    )


async def test_signing_in_sets_a_strict_httponly_session_cookie(settings: Settings) -> None:
    async with browser(settings) as (http, key):
        # Not signed in: every view sends the browser to the sign-in page, coming back after.
        for path in ("/", "/tasks", "/knowledge", "/economy"):
            resp = await http.get(path)
            assert resp.status_code == 303 and resp.headers["location"] == f"/signin?next={path}"
        bad = await sign_in(http, key[:-1] + ("A" if key[-1] != "A" else "B"))
        assert bad.status_code == 401 and "not valid" in bad.text
        assert "xpando_session" not in http.cookies

        signed = await sign_in(http, key, "/economy")
        assert signed.status_code == 303 and signed.headers["location"] == "/economy"
        cookie = next(
            c for c in signed.headers.get_list("set-cookie") if c.startswith("xpando_session=")
        )
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= flags
        assert "secure" not in flags  # served over http here; over https it is Secure
        page = await http.get("/")
        assert page.status_code == 200 and "<h1>Network</h1>" in page.text
        assert page.headers["content-type"].startswith("text/html")
        # The key itself is never written into a page.
        assert key not in page.text
        # Only pages of this site are a place to come back to.
        for elsewhere in ("//evil.example/", "/\t/evil.example/", "https://evil.example/"):
            again = await sign_in(http, key, elsewhere)
            assert again.headers["location"] == "/", elsewhere


async def test_forms_without_the_session_token_are_refused(settings: Settings) -> None:
    # Not an admin: the task list shows this key's own tasks only (the dev server is shared).
    async with browser(settings, Scope.TASKS_READ, Scope.TASKS_WRITE, Scope.NODES_READ) as (
        http,
        key,
    ):
        # Sign-in itself: a form posted from elsewhere has no token matching the browser's.
        forged = await http.post("/signin", data={"csrf": "x" * 32, "key": key, "next": "/"})
        assert forged.status_code == 403 and "xpando_session" not in http.cookies
        assert (await sign_in(http, key)).status_code == 303
        page = await http.get("/tasks")
        token = _field(page.text, "csrf")
        for sent in ("", "0" * len(token)):
            refused = await http.post("/tasks", data={"csrf": sent, "prompt": "hello"})
            assert refused.status_code == 403 and "CSRF" in refused.text
        listed = await http.get("/tasks")
        assert "No task matches." in listed.text  # nothing was started
        out = await http.post("/signout", data={"csrf": "nope"})
        assert out.status_code == 403
        out = await http.post("/signout", data={"csrf": token})
        assert out.status_code == 303
        assert (await http.get("/")).status_code == 303  # signed out


async def test_a_key_without_the_scope_gets_a_403_page_not_data(settings: Settings) -> None:
    async with browser(settings, Scope.METRICS_READ) as (http, key):
        assert (await sign_in(http, key)).status_code == 303
        for path, scope in (
            ("/", "nodes:read"),
            ("/tasks", "tasks:read"),
            ("/knowledge", "knowledge:read"),
            ("/economy", "payouts:read"),
        ):
            resp = await http.get(path)
            assert resp.status_code == 403, path
            assert resp.headers["content-type"].startswith("text/html")
            assert "403 Forbidden" in resp.text and scope in resp.text
            assert "data-part" not in resp.text  # no view was rendered
        assert "/economy" not in resp.text  # the menu offers no view the key cannot see
        resp = await http.post("/tasks", data={"csrf": "whatever", "prompt": "hi"})
        assert resp.status_code == 403
    # A key that may see some views lands on the first of them, and is refused the others.
    async with browser(settings, Scope.PAYOUTS_READ) as (http, key):
        assert (await sign_in(http, key)).headers["location"] == "/"
        home = await http.get("/")
        assert home.status_code == 303 and home.headers["location"] == "/economy"
        assert (await http.get("/economy")).status_code == 200
        assert (await http.get("/tasks")).status_code == 403


async def test_the_views_show_the_network(
    settings: Settings, client: Client, sessions: SessionFactory, corpus_dir: Path
) -> None:
    nodes = [("cooking", "eu-west"), ("gardening", "us-east")]
    async with (
        offline_network(client, settings, sessions, corpus_dir, nodes) as profiles,
        browser(settings) as (http, key),
    ):
        assert (await sign_in(http, key)).status_code == 303
        network = (await http.get("/")).text
        for p in profiles:
            assert p.node_id in network
        assert "<h2>eu-west" in network and "<h2>us-east" in network
        assert network.count('data-live="yes"') == 2

        form = await http.get("/tasks")
        asked = await http.post(
            "/tasks",
            data={
                "csrf": _field(form.text, "csrf"),
                "prompt": "How long does a soft boiled egg take?",
                "k": "2",
                "strategy": "best",
                "regions": "",
            },
        )
        assert asked.status_code == 303
        task_path, follow = asked.headers["location"].split("?")
        assert follow == "follow=1"  # its page fills in from the task's events
        task_id = task_path.rsplit("/", 1)[1]
        followed = await http.get(f"{task_path}?follow=1")
        assert f'data-stream="{task_path}/stream"' in followed.text

        async def done() -> bool:
            resp = await http.get(task_path)
            return 'id="task-answer"' in resp.text or 'id="task-error"' in resp.text

        await wait_for(done, timeout=60, every=0.5)
        page = (await http.get(task_path)).text
        assert "six minutes" in page
        assert "Temporal Web UI" in page and f"/workflows/{task_id}" in page
        assert "fit" in page and "score" in page  # the routing decision with its terms
        # A finished task's stream replays its events and ends.
        stream = await http.get(f"{task_path}/stream")
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "event: ops" in stream.text and stream.text.rstrip().endswith("data: {}")

        listed = (await http.get("/tasks?status=completed")).text
        assert task_id.removeprefix("task-")[:12] in listed
        assert "No task matches." in (await http.get("/tasks?status=failed")).text

        cooking = profiles[0].node_id
        node = (await http.get(f"/nodes/{cooking}")).text
        assert task_id.removeprefix("task-")[:12] in node and "<meter" in node

        core = (await http.get("/knowledge")).text
        assert "Knowledge per domain" in core

        async def stored() -> bool:  # the domain's KnowledgeWorkflow consolidates it
            return "soft boiled egg" in (await http.get("/knowledge?domain=cooking")).text

        await wait_for(stored, timeout=30, every=0.5)
        found = (await http.get("/knowledge?q=how+long+to+boil+an+egg")).text
        item = re.search(r'href="(/knowledge/[^"]+)"', found)
        assert item, found
        provenance = (await http.get(item.group(1))).text
        assert "Provenance" in provenance and task_id.removeprefix("task-")[:12] in provenance
        economy = await http.get("/economy")
        assert economy.status_code == 200 and "Treasury balance" in economy.text


async def test_the_figures_on_sqlite_and_postgresql(any_engine: AsyncEngine) -> None:
    """What the charts, the Mother Core and the earnings columns read, on both databases."""
    now = datetime(2026, 6, 1, 12, 30, 10, tzinfo=UTC)
    sessions = session_factory(any_engine)
    async with sessions() as session:
        for i, (domain, asked, latency_s) in enumerate(
            [("cooking", 2, 1.0), ("cooking", 0, 0.2), ("cooking", 2, 3.0), (None, 1, 2.0)]
        ):
            done = now - timedelta(minutes=i)
            session.add(
                Task(
                    task_id=f"t{i}",
                    prompt="q",
                    domain=domain,
                    status="completed",
                    created_at=done,
                    completed_at=done,
                    submitted_at=done - timedelta(seconds=latency_s),
                )
            )
            await session.flush()  # the task's row before its contributions
            for n in range(asked):
                session.add(
                    Contribution(
                        task_id=f"t{i}",
                        node_id=f"n{n}",
                        region="eu-west",
                        provider="openai",
                        model="m",
                        status="ok",
                        cost_usd=0.25,
                        created_at=done,
                    )
                )
        session.add(
            Knowledge(
                knowledge_id="k1",
                task_id="t0",
                question="q",
                answer="a",
                domain="cooking",
                uses=1,
                created_at=now,
                updated_at=now,
            )
        )
        for payout_id, node_id, amount, status in (
            ("p1", "n0", 700, "confirmed"),
            ("p2", "n1", 300, "failed"),
        ):
            session.add(
                Payout(
                    payout_id=payout_id,
                    epoch=1,
                    node_id=node_id,
                    amount=amount,
                    status=status,
                    created_at=now,
                    updated_at=now,
                )
            )
        session.add(Accrual(task_id="t2", node_id="n1", earned_at=now))
        await session.commit()

        seen = await activity.activity(session=session, now=now)
        assert [m.tasks for m in seen.minutes[-4:]] == [1, 1, 1, 1]
        assert seen.minutes[-1].p50_ms == 1000 and seen.minutes[-2].p50_ms == 200
        assert seen.hours[-1].completed == 4 and seen.hours[-1].reused == 1
        assert seen.hours[-1].cost_usd == 1.25 and seen.hours[-1].reuse_rate == 0.25
        domains = {d.domain: d for d in await activity.knowledge_by_domain(session=session)}
        cooking = domains["cooking"]
        assert (cooking.items, cooking.uses, cooking.completed, cooking.reused) == (1, 1, 3, 1)
        assert cooking.calls_saved == 2.0  # the other cooking tasks asked 2 experts each
        assert domains["general"].completed == 1 and domains["general"].items == 0
        earned = await activity.earnings_by_node(session=session)
        assert earned["n0"].paid == 700 and earned["n1"] == activity.NodeEarnings(0, 1)
        latest = await activity.recent_knowledge(session=session, domain="cooking")
        assert [k.knowledge_id for k in latest] == ["k1"]
        figures = await activity.counters(session=session, now=now)
        assert figures.completed_last_hour == 4 and figures.knowledge_items == 1
