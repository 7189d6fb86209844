"""Per-key limits against the API on the real dev server: requests and tasks per minute hold
across two API instances sharing Redis (and sharing the database without it); the concurrent
limit refuses the next task until one has ended, recorded or not; a key whose budget its
spend and the task's worst case would pass cannot start a provider task while another key
still can; and each key's recorded spend is what its tasks' recorded contributions cost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, func, select
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError

from api.main import create_app
from bench.loopback_providers import FakeProviders
from tests.conftest import IN_CI, bearer
from tests.fakes.networks import PRICES, LoopbackNode, loopback_network
from workers.core import build_core_worker
from xpando.auth import limits, spend, store
from xpando.auth.keys import KEY_RE, KeyLimits, Scope
from xpando.auth.limits import Prices, estimate_task_cost
from xpando.contracts import Contribution as ContributionModel
from xpando.contracts import (
    ContributionStatus,
    NodeProfile,
    RecordInput,
    TaskStage,
)
from xpando.db import SessionFactory, queries, session_factory
from xpando.db.models import Contribution, Task
from xpando.settings import Settings

REDIS_URL = os.environ.get("XPANDO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_url() -> str:
    """The local Redis; skipped with the reason when it is not there (a failure under CI)."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as err:
        if IN_CI:
            pytest.fail(f"Redis at {REDIS_URL} is unreachable under CI=true: {err!r}")
        pytest.skip(f"Redis at {REDIS_URL} is unreachable: {err!r}")
    return REDIS_URL


@pytest.fixture(params=["redis", "database"])
def shared(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The settings of API instances that share their per-minute counters: through Redis, or
    through the database (SQLite) when no Redis is configured."""
    if request.param == "redis":
        return settings.model_copy(update={"redis_url": request.getfixturevalue("redis_url")})
    return settings


@asynccontextmanager
async def replicas(settings: Settings, count: int = 2) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``count`` instances of the API (each its own app, lifespan and clients) over the same
    database: what several API processes behind a load balancer are."""
    async with AsyncExitStack() as stack:
        clients = []
        for i in range(count):
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            clients.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url=f"http://replica-{i}.test")
                )
            )
        yield clients


async def limited_key(
    sessions: SessionFactory, *scopes: str, name: str = "limited", **own: Any
) -> tuple[str, str]:
    """A key with its own limits (``own``): the key and its id."""
    async with sessions() as session:
        issued = await store.create_key(
            session=session, name=name, scopes=scopes or [Scope.ADMIN], limits=KeyLimits(**own)
        )
    return issued.key, issued.row.key_id


def _code(resp: httpx.Response) -> str:
    code: str = resp.json()["error"]["code"]
    return code


async def _submit(http: httpx.AsyncClient, key: str, **body: Any) -> httpx.Response:
    return await http.post(
        "/v1/tasks", json={"prompt": "How do stars shine?", **body}, headers=bearer(key)
    )


async def _terminate(client: Client, *task_ids: str) -> None:
    for task_id in task_ids:
        with contextlib.suppress(RPCError):  # ended already
            await client.get_workflow_handle(task_id).terminate("test over")


# --- per minute ----------------------------------------------------------------------------------


async def test_requests_over_the_per_minute_limit_are_refused_by_every_instance(
    shared: Settings, sessions: SessionFactory
) -> None:
    key, key_id = await limited_key(sessions, Scope.NODES_READ, requests_per_minute=4)
    other, _ = await limited_key(sessions, Scope.NODES_READ, requests_per_minute=4)
    async with replicas(shared) as (one, two):
        for i in range(4):  # two on each instance
            served = await (one, two)[i % 2].get("/v1/nodes", headers=bearer(key))
            assert served.status_code == 200, served.text
        # Each instance has served two: counted apart, either would serve two more.
        for api in (two, one):
            refused = await api.get("/v1/nodes", headers=bearer(key))
            assert refused.status_code == 429, refused.text
            assert _code(refused) == "rate_limited" and key_id in refused.json()["error"]["message"]
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Another key has a count of its own.
        assert (await one.get("/v1/nodes", headers=bearer(other))).status_code == 200


async def test_tasks_over_the_per_minute_limit_are_refused_by_every_instance(
    shared: Settings, sessions: SessionFactory, client: Client
) -> None:
    key, _ = await limited_key(sessions, Scope.TASKS_WRITE, tasks_per_minute=2)
    started: list[str] = []
    try:
        async with replicas(shared) as (one, two):
            for api in (one, two):
                accepted = await _submit(api, key)
                assert accepted.status_code == 202, accepted.text
                started.append(accepted.json()["task_id"])
            refused = await _submit(one, key)
            assert refused.status_code == 429 and _code(refused) == "task_rate_limited"
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
    finally:
        await _terminate(client, *started)


async def test_task_submissions_count_as_requests_refused_or_not(
    shared: Settings, sessions: SessionFactory, client: Client
) -> None:
    """A task submission is one of the key's requests, counted with the task (one Redis call
    with Redis), and one that fails before its task is admitted (a bad body) counts too."""
    key, key_id = await limited_key(sessions, Scope.TASKS_WRITE, requests_per_minute=3)
    started: list[str] = []
    try:
        async with replicas(shared) as (one, two):
            accepted = await _submit(one, key)
            assert accepted.status_code == 202, accepted.text
            started.append(accepted.json()["task_id"])
            bad = await two.post("/v1/tasks", json={"prompt": ""}, headers=bearer(key))
            assert bad.status_code == 422
            accepted = await _submit(two, key)
            assert accepted.status_code == 202, accepted.text
            started.append(accepted.json()["task_id"])
            for api in (one, two):  # the fourth request of the minute, wherever it lands
                refused = await _submit(api, key)
                assert refused.status_code == 429 and _code(refused) == "rate_limited"
                assert key_id in refused.json()["error"]["message"]
                assert 1 <= int(refused.headers["Retry-After"]) <= 60
    finally:
        await _terminate(client, *started)


# --- running tasks -------------------------------------------------------------------------------


async def test_the_concurrent_limit_refuses_the_next_task_until_one_has_ended(
    shared: Settings, sessions: SessionFactory, client: Client
) -> None:
    # No expert anywhere and no wait for one: once a core worker runs, a task fails at once.
    settings = shared.model_copy(update={"task_wait_for_experts_s": 0})
    key, _ = await limited_key(sessions, Scope.TASKS_WRITE, concurrent_tasks=2)
    repeat = {**bearer(key), "Idempotency-Key": f"repeat-{uuid.uuid4().hex}"}
    started: list[str] = []
    try:
        async with replicas(settings, 1) as (api,):
            for headers in (repeat, bearer(key)):
                accepted = await api.post("/v1/tasks", json={"prompt": "Q?"}, headers=headers)
                assert accepted.status_code == 202, accepted.text
                started.append(accepted.json()["task_id"])
            # The same task submitted again takes no second slot; a third task has none.
            again = await api.post("/v1/tasks", json={"prompt": "Q?"}, headers=repeat)
            assert again.status_code == 202 and again.json()["task_id"] == started[0]
            refused = await _submit(api, key)
            assert refused.status_code == 429 and _code(refused) == "concurrency_limited"
            assert "2 tasks running" in refused.json()["error"]["message"]

            # A core worker takes the two tasks: they fail (no expert) and are recorded.
            async with build_core_worker(client, sessions=sessions, settings=settings):
                for task_id in started:
                    with pytest.raises(WorkflowFailureError):
                        await client.get_workflow_handle(task_id).result()
            accepted = await _submit(api, key)
            assert accepted.status_code == 202, accepted.text
            started.append(accepted.json()["task_id"])
    finally:
        await _terminate(client, *started)


async def test_a_task_that_ended_unrecorded_gives_its_slot_back(
    shared: Settings, sessions: SessionFactory, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = shared
    # Holds are checked against Temporal once they are this old (30 s outside tests).
    monkeypatch.setattr(limits, "RECONCILE_AFTER", timedelta(0))
    key, _ = await limited_key(sessions, Scope.TASKS_WRITE, concurrent_tasks=1)
    started: list[str] = []
    try:
        async with replicas(settings, 1) as (api,):
            first = await _submit(api, key)
            assert first.status_code == 202
            started.append(first.json()["task_id"])
            assert (await _submit(api, key)).status_code == 429
            # An operator terminates it: no record step runs, and no slot stays taken.
            await client.get_workflow_handle(started[0]).terminate("operator")
            second = await _submit(api, key)
            assert second.status_code == 202, second.text
            started.append(second.json()["task_id"])
        async with sessions() as session:
            row = await session.get(Task, started[0])
        if settings.redis_url:  # held in Redis: the database never had the task
            assert row is None
        else:
            assert row is not None and row.status == "terminated" and row.hold_usd is None
    finally:
        await _terminate(client, *started)


async def test_with_redis_down_tasks_are_held_in_the_database(
    settings: Settings, sessions: SessionFactory, client: Client
) -> None:
    """An outage of Redis does not take task submission down: holds go to the database, and the
    key's running tasks are still limited there."""
    with socket.socket() as closed:  # a loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        down = settings.model_copy(
            update={"redis_url": f"redis://127.0.0.1:{closed.getsockname()[1]}/0"}
        )
    key, key_id = await limited_key(sessions, Scope.TASKS_WRITE, concurrent_tasks=1)
    started: list[str] = []
    try:
        async with replicas(down, 1) as (api,):
            accepted = await _submit(api, key)
            assert accepted.status_code == 202, accepted.text
            started.append(accepted.json()["task_id"])
            refused = await _submit(api, key)
            assert refused.status_code == 429 and _code(refused) == "concurrency_limited"
        async with sessions() as session:
            row = await session.get(Task, started[0])
        assert row is not None and row.key_id == key_id and row.hold_usd is not None
    finally:
        await _terminate(client, *started)


# --- spend ---------------------------------------------------------------------------------------


def priced_network(
    client: Client, settings: Settings, sessions: SessionFactory, fake: FakeProviders, count: int
) -> AbstractAsyncContextManager[dict[str, NodeProfile]]:
    """A core worker and ``count`` OpenAI-compatible nodes on the loopback server, registered
    with their prices (what the API's estimate reads) and live."""
    nodes = [LoopbackNode(f"priced-{i}", model="loopback-model", priced=True) for i in range(count)]
    return loopback_network(client, settings, sessions, fake, nodes)


async def _charged(sessions: SessionFactory, task_ids: list[str]) -> float:
    """What the recorded contributions of ``task_ids`` cost."""
    async with sessions() as session:
        total = (
            await session.exec(
                select(func.coalesce(func.sum(Contribution.cost_usd), 0.0)).where(
                    col(Contribution.task_id).in_(task_ids)
                )
            )
        ).one()
    return float(total or 0.0)


async def test_a_key_whose_budget_is_spent_cannot_start_a_provider_task_another_key_can(
    shared: Settings, sessions: SessionFactory, client: Client
) -> None:
    settings = shared
    prompt = "Why does bread dough rise?"
    # The worst case of a one-expert task on these nodes: the budget of the key "thrifty" is
    # exactly that, so its first task fits and, once it has cost anything, no second one does.
    worst = estimate_task_cost(
        Prices(inputs=(PRICES.input_per_mtok,), outputs=(PRICES.output_per_mtok,)),
        prompt=prompt,
        k=1,
        output_tokens=settings.limit_estimate_output_tokens,
    )
    thrifty, thrifty_id = await limited_key(
        sessions, Scope.TASKS_WRITE, name="thrifty", budget_usd_per_day=worst
    )
    other, other_id = await limited_key(sessions, Scope.TASKS_WRITE, name="other")
    done: dict[str, list[str]] = {thrifty_id: [], other_id: []}
    with FakeProviders(seed=3) as fake:
        async with (
            priced_network(client, settings, sessions, fake, 2),
            replicas(settings, 1) as (api,),
        ):
            first = await _submit(api, thrifty, prompt=prompt, k=1, fresh=True)
            assert first.status_code == 202, first.text
            done[thrifty_id].append(first.json()["task_id"])
            await client.get_workflow_handle(done[thrifty_id][0]).result()

            refused = await _submit(api, thrifty, prompt=prompt, k=1, fresh=True)
            assert refused.status_code == 402, refused.text
            assert _code(refused) == "budget_exceeded"
            amounts = {d["field"]: d["message"] for d in refused.json()["error"]["details"]}
            assert float(amounts["estimate_usd"]) == pytest.approx(worst)
            assert float(amounts["spent_usd"]) > 0
            # Only tomorrow lifts it: Retry-After points at 00:00 UTC.
            now = datetime.now(UTC)
            midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
            assert abs(int(refused.headers["Retry-After"]) - (midnight - now).total_seconds()) < 60

            for n, k in enumerate((2, 1)):  # the other key, on its default budget, still can
                accepted = await _submit(api, other, prompt=f"{prompt} ({n})", k=k, fresh=True)
                assert accepted.status_code == 202, accepted.text
                done[other_id].append(accepted.json()["task_id"])
            for task_id in done[other_id]:
                await client.get_workflow_handle(task_id).result()

    day = spend.day_of(datetime.now(UTC))
    costs = {key_id: await _charged(sessions, task_ids) for key_id, task_ids in done.items()}
    async with sessions() as session:
        for key_id, task_ids in done.items():
            recorded = await spend.spent_on(session=session, key_id=key_id, day=day)
            assert recorded is not None and recorded.tasks == len(task_ids)
            assert recorded.spent_usd > 0
            assert recorded.spent_usd == pytest.approx(costs[key_id])
            for task_id in task_ids:
                row = await session.get(Task, task_id)
                assert row is not None and row.key_id == key_id and row.hold_usd is None
        # A record step run again (a retry) charges nothing twice.
        before = await spend.spent_on(session=session, key_id=thrifty_id, day=day)
        assert before is not None
        spent = before.spent_usd
        again = await spend.charge_task(
            session=session, task_id=done[thrifty_id][0], now=datetime.now(UTC)
        )
        await session.commit()
        after = await spend.spent_on(session=session, key_id=thrifty_id, day=day)
    assert (
        again is not None
        and again.added_usd == 0
        and after is not None
        and after.spent_usd == pytest.approx(spent)
    )


# --- limits set per key --------------------------------------------------------------------------


async def test_limits_given_to_xpando_keys_create_are_the_keys(
    settings: Settings, sessions: SessionFactory
) -> None:
    env = {
        **os.environ,
        "XPANDO_DATA_DIR": str(settings.data_dir),
        "XPANDO_DATABASE_URL": settings.database_dsn,
        "XPANDO_LOG_LEVEL": "ERROR",
    }
    args = "keys create --name ci --scope nodes:read --rpm 2 --concurrent 3 --budget-usd 0.5"
    created = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cli", *args.split()],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    found = KEY_RE.match(created.stdout.strip())
    assert found is not None
    assert "rpm=2 tpm=120 running=3 budget=$0.5/day" in created.stderr
    async with replicas(settings, 1) as (api,):
        key = bearer(created.stdout.strip())
        assert [(await api.get("/v1/nodes", headers=key)).status_code for _ in range(3)] == [
            200,
            200,
            429,
        ]
        admin, _ = await limited_key(sessions, Scope.ADMIN, name="root")
        listed = (await api.get("/v1/keys", headers=bearer(admin))).json()["keys"]
    shown = next(k for k in listed if k["key_id"] == found["key_id"])
    assert shown["limits"] == {
        "requests_per_minute": 2,
        "tasks_per_minute": 120,
        "concurrent_tasks": 3,
        "budget_usd_per_day": 0.5,
    }


# --- the database side, on SQLite and PostgreSQL --------------------------------------------------


async def test_counters_holds_and_charges_on_both_databases(any_engine: AsyncEngine) -> None:
    sessions = session_factory(any_engine)
    counter = limits.DatabaseCounter(sessions)
    hits = [await counter.hit("k1:requests", limit=2) for _ in range(3)]
    assert [h.allowed for h in hits] == [True, True, False] and [h.count for h in hits] == [1, 2, 3]
    assert 0 < hits[2].retry_after_s <= limits.WINDOW_S
    assert (await counter.hit("k2:requests", limit=2)).allowed  # a count per bucket

    _, key_id = await limited_key(sessions, Scope.TASKS_WRITE)
    now = datetime.now(UTC)
    async with sessions() as session:
        loads = []
        for task_id, hold in (("t-1", 0.25), ("t-2", 0.5)):
            loads.append(
                await spend.hold_task(
                    session=session,
                    key_id=key_id,
                    task_id=task_id,
                    prompt="p",
                    domain=None,
                    hold_usd=hold,
                    now=now,
                )
            )
            await session.commit()
        again = await spend.hold_task(
            session=session,
            key_id=key_id,
            task_id="t-1",
            prompt="p",
            domain=None,
            hold_usd=9.0,
            now=now,
        )
        await session.rollback()
    assert loads == [spend.KeyLoad(1, 0.25, 0.0), spend.KeyLoad(2, 0.75, 0.0)] and again is None

    record = RecordInput(
        task_id="t-1",
        prompt="p",
        domain=None,
        status=TaskStage.COMPLETED,
        contributions=[
            ContributionModel(
                node_id=n,
                region="r",
                provider="openai",
                model="m",
                status=ContributionStatus.OK,
                cost_usd=c,
            )
            for n, c in (("n1", 0.01), ("n2", 0.02))
        ],
    )
    async with sessions() as session:
        await queries.record_task(session=session, record=record, now=now, commit=False)
        first = await spend.charge_task(session=session, task_id="t-1", now=now)
        await session.commit()
        second = await spend.charge_task(session=session, task_id="t-1", now=now)
        await session.commit()
        load = await spend.key_load(session=session, key_id=key_id, now=now)
        await spend.release_holds(session=session, ended={"t-2": "terminated"})
        after = await spend.key_load(session=session, key_id=key_id, now=now)
        ended = await session.get(Task, "t-2")
    async with sessions() as session:
        for i, (region, price_in, price_out) in enumerate(
            [("eu", 3.0, 15.0), ("eu", 3.0, 15.0), ("us", 1.0, 2.0), ("us", 0.0, 0.0)]
        ):
            profile = NodeProfile(
                node_id=f"n{i}",
                region=region,
                provider="openai",
                model="m",
                price_input_per_mtok=price_in,
                price_output_per_mtok=price_out,
            )
            await queries.upsert_node(session=session, profile=profile, now=now)
        levels = sorted(await spend.price_levels(session=session))
    assert levels == [("eu", 3.0, 15.0, 2), ("us", 0.0, 0.0, 1), ("us", 1.0, 2.0, 1)]
    assert first is not None and second is not None
    assert first.added_usd == pytest.approx(0.03) and second.added_usd == 0
    assert second.total_usd == pytest.approx(0.03) and first.key_id == key_id
    assert load.running == 1 and load.held_usd == 0.5 and load.spent_usd == pytest.approx(0.03)
    assert after.running == 0 and ended is not None and ended.status == "terminated"
