"""API start-to-202 with API keys and limits on (Redis backend) against the same route without.

``python -m bench.api [--requests 25] [--rounds 24] [--nodes 200] [--redis URL | --no-redis]
[--postgres URL] [--http]``
starts a Temporal dev server in this process (loopback only), a fresh database with
``--nodes`` registered nodes (prices set, what the cost estimate reads) and two apps from
``create_app`` on the same database, dev server and Redis (default ``redis://127.0.0.1:6379/0``):

- **on**, as served: the bearer key is checked (a database read the first time, then from the
  replica's cache of checked keys, ``XPANDO_KEY_CACHE_S``), the task's worst case is estimated
  from the node prices, and one Redis script counts the request and the task in their minute
  and holds the worst case against the key's running tasks and budget
  (``xpando/auth/holds.py``; ``--no-redis``: the per-minute counters and the hold in the
  database, the hold as the task's row), then ``start_workflow``. The key's limits are high
  enough that nothing is refused: every check runs, none says no.
- **off**: the same app with ``POST /v1/tasks`` served by the same endpoint as a plain route, no
  key and no limits (``TaskLimits`` without a principal).

Each arm is called over ASGI (httpx in process, so the HTTP stack is not in either figure; with
``--http`` over loopback HTTP, uvicorn serving both apps in this process) one request at a
time, ``--requests`` per round, in ``--rounds`` alternating rounds after a warm-up (short
rounds: the load of a shared machine drifts little within a pair). With ``--postgres`` the
database is PostgreSQL (a database made for the run and dropped after). No worker runs, so
started workflows wait on their queue. Between rounds the key's holds are lifted, as the
record step lifts them when tasks end, so the key's running tasks stay what one round
submitted. Prints p50 and p99 of each arm and their ratios (goal: on <= 1.1 x off), the
CPU this process spends a request in each arm (what other processes on the machine do not
move), and what each check costs alone; asserts nothing (timings are not tests).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from sqlalchemy import make_url, text, update
from sqlalchemy.ext.asyncio import create_async_engine

from api.deps import TaskLimits, task_limits
from api.main import create_app
from api.routes import tasks
from api.schemas import TaskAccepted
from bench._stats import pct
from cli.devserver import start_local_env
from xpando.auth import spend, store
from xpando.auth.keys import KeyLimits, Principal, Scope
from xpando.auth.limits import Limiter
from xpando.contracts import NodeDomain, NodeProfile
from xpando.db import SessionFactory, queries
from xpando.db.models import Task, utcnow
from xpando.logs import configure_logging
from xpando.settings import Settings

HIGH = 1_000_000  # every limit checked, none reached
PROMPT = "How does a Temporal workflow survive a worker crash?"


def without_keys_and_limits(app: FastAPI) -> FastAPI:
    """``app`` with ``POST /v1/tasks`` served by the same endpoint without a key or limits: a
    plain route just ahead of the served one (the first route that matches serves the request;
    in the same place, so that finding it costs both arms the same)."""
    plain = APIRoute(
        "/v1/tasks",
        tasks.submit_task,
        methods=["POST"],
        status_code=202,
        response_model=TaskAccepted,
        dependency_overrides_provider=app,
    )
    served = next(  # the router that serves it (FastAPI keeps an included router whole)
        i
        for i, route in enumerate(app.router.routes)
        if tasks.router in (route, getattr(route, "original_router", None))
    )
    app.router.routes.insert(served, plain)

    def no_limits(request: Request) -> TaskLimits:
        return TaskLimits(request, None)

    app.dependency_overrides[task_limits] = no_limits
    return app


async def _register_nodes(sessions: SessionFactory, count: int) -> None:
    async with sessions() as session:
        for i in range(count):
            await queries.upsert_node(
                session=session,
                profile=NodeProfile(
                    node_id=f"bench-{i:04d}",
                    region=("eu-west", "us-east")[i % 2],
                    provider="openai",
                    model="m",
                    domains=[NodeDomain(name="temporal")],
                    price_input_per_mtok=float(i % 5),
                    price_output_per_mtok=float(i % 20),
                ),
                now=utcnow(),
            )


async def _fresh_database(server: str) -> str:
    """A new, empty database on the PostgreSQL server ``server`` (its URL)."""
    name = f"xpando_bench_api_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return str(make_url(server).set(database=name).render_as_string(hide_password=False))


async def _drop_database(server: str, url: str) -> None:
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}"'))
    finally:
        await admin.dispose()


@asynccontextmanager
async def _served(app: FastAPI) -> AsyncIterator[str]:
    """``app`` served by uvicorn on a free loopback port, in this event loop: its base URL."""
    sock = socket.socket()
    # Accepted connections inherit it: without it, every request here waited about 40 ms on a
    # delayed ACK, which would hide what the arms cost.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


async def _timed(call: Callable[[], Awaitable[object]], n: int) -> float:
    """Median seconds of ``call`` over ``n`` runs."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=25, help="per arm and round")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--no-redis",
        action="store_true",
        help="count the limits and hold the tasks in the database (no XPANDO_REDIS_URL)",
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="call both apps over HTTP (uvicorn on loopback, in this process) instead of ASGI",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="a PostgreSQL server (postgresql+asyncpg://user@host:port/db) to run on, in a "
        "database of its own made for the run, instead of a SQLite file",
    )
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="xpando-bench-api-"))
    database_url = f"sqlite+aiosqlite:///{data / 'xpando.db'}"
    if args.postgres:
        database_url = await _fresh_database(args.postgres)
    env = await start_local_env()
    settings = Settings(
        _env_file=None,
        data_dir=data,
        temporal_address=env.client.service_client.config.target_host,
        database_url=database_url,
        core_task_queue=f"bench-api-{uuid.uuid4().hex[:8]}",
        redis_url=None if args.no_redis else args.redis,
        log_level="ERROR",
    )
    configure_logging(settings)
    on_app, off_app = create_app(settings), without_keys_and_limits(create_app(settings))
    try:
        async with (
            on_app.router.lifespan_context(on_app),
            off_app.router.lifespan_context(off_app),
            AsyncExitStack() as stack,
        ):
            sessions: SessionFactory = on_app.state.sessions
            limiter: Limiter = on_app.state.limiter
            await _register_nodes(sessions, args.nodes)
            own = KeyLimits(
                requests_per_minute=HIGH,
                tasks_per_minute=HIGH,
                concurrent_tasks=HIGH,
                budget_usd_per_day=float(HIGH),
            )
            async with sessions() as session:
                issued = await store.create_key(
                    session=session, name="bench", scopes=[Scope.TASKS_WRITE], limits=own
                )
            key_id = issued.row.key_id
            if args.http:
                on_url, off_url = (
                    await stack.enter_async_context(_served(on_app)),
                    await stack.enter_async_context(_served(off_app)),
                )
                on = httpx.AsyncClient(
                    base_url=on_url, headers={"Authorization": f"Bearer {issued.key}"}
                )
                off = httpx.AsyncClient(base_url=off_url)
            else:
                on = httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=on_app),
                    base_url="http://on.bench",
                    headers={"Authorization": f"Bearer {issued.key}"},
                )
                off = httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=off_app), base_url="http://off.bench"
                )
            body = {"prompt": PROMPT, "k": 3}

            async def submit(http: httpx.AsyncClient) -> float:
                t = time.perf_counter()
                resp = await http.post("/v1/tasks", json=body)
                elapsed = time.perf_counter() - t
                if resp.status_code != 202:
                    raise RuntimeError(f"{resp.status_code}: {resp.text}")
                return elapsed

            async def round_of(http: httpx.AsyncClient) -> tuple[list[float], float]:
                """Wall seconds of each request, and this process's CPU seconds a request."""
                cpu = time.process_time()
                got = [await submit(http) for _ in range(args.requests)]
                return got, (time.process_time() - cpu) / args.requests

            async def lift_holds() -> None:
                if limiter.holds is not None:
                    day = spend.day_of(utcnow())
                    held = await limiter.holds.held(key_id=key_id)
                    await limiter.holds.release(key_id=key_id, task_ids=held, day=day)
                async with sessions() as session:
                    await session.exec(
                        update(Task.__table__)  # type: ignore[attr-defined]
                        .where(Task.__table__.c.key_id == key_id)  # type: ignore[attr-defined]
                        .values(hold_usd=None)
                    )
                    await session.commit()

            async with on, off:
                for _ in range(args.warmup):
                    await submit(on)
                    await submit(off)
                await lift_holds()
                times: dict[str, list[float]] = {"on": [], "off": []}
                round_p50: dict[str, list[float]] = {"on": [], "off": []}
                cpu: dict[str, list[float]] = {"on": [], "off": []}
                for r in range(args.rounds):
                    # Alternate which arm goes first, so neither always follows the other.
                    order = (("on", on), ("off", off)) if r % 2 == 0 else (("off", off), ("on", on))
                    for name, http in order:
                        got, cpu_s = await round_of(http)
                        times[name] += got
                        round_p50[name].append(statistics.median(got))
                        cpu[name].append(cpu_s)
                    await lift_holds()

                # What each check costs alone (medians of 200 calls).
                principal = Principal(
                    key_id=key_id, name="bench", scopes=frozenset({Scope.TASKS_WRITE}), limits=own
                )

                async def authenticate() -> None:
                    async with sessions() as session:
                        await store.authenticate(session=session, key=issued.key)

                async def cached() -> None:
                    await store.verified.authenticate(
                        sessions=sessions, key=issued.key, ttl_s=settings.key_cache_s
                    )

                async def admit() -> None:
                    await limiter.admit_task(
                        principal, task_id=f"part-{uuid.uuid4().hex}", prompt=PROMPT, k=3
                    )

                held = "Redis script" if limiter.holds else "database transaction"
                parts = {
                    "key check, first time (database read)": await _timed(authenticate, 200),
                    "key check, cached": await _timed(cached, 200),
                    "requests per minute (Redis)": await _timed(
                        lambda: limiter.check_request(principal), 200
                    ),
                    f"task admission (estimate + {held})": await _timed(admit, 200),
                }
                await lift_holds()
    finally:
        await env.shutdown()
        shutil.rmtree(data, ignore_errors=True)
        if args.postgres:
            await _drop_database(args.postgres, database_url)

    print(
        f"POST /v1/tasks start-to-202, {args.rounds} alternating rounds of {args.requests} "
        f"requests per arm (after {args.warmup} warm-up each), {args.nodes} nodes, "
        f"limits counted in {limiter.counter.backend}, "
        f"{'PostgreSQL' if args.postgres else 'SQLite'} database, "
        f"{'HTTP over loopback' if args.http else 'in-process ASGI'}:"
    )
    for name, label in (("off", "keys and limits off"), ("on", "keys and limits on")):
        values = times[name]
        print(
            f"  {label:<20} p50 {pct(values, 0.5) * 1000:6.2f} ms   "
            f"p99 {pct(values, 0.99) * 1000:6.2f} ms   "
            f"(median of round p50s {statistics.median(round_p50[name]) * 1000:.2f} ms; "
            f"CPU of this process {statistics.median(cpu[name]) * 1000:.2f} ms a request)"
        )
    p50 = pct(times["on"], 0.5) / pct(times["off"], 0.5)
    p99 = pct(times["on"], 0.99) / pct(times["off"], 0.99)
    rounds = statistics.median(
        a / b for a, b in zip(round_p50["on"], round_p50["off"], strict=True)
    )
    cpu_ratio = statistics.median(cpu["on"]) / statistics.median(cpu["off"])
    print(
        f"  on / off: p50 x{p50:.3f}, p99 x{p99:.3f}, per-round p50 (median) x{rounds:.3f} "
        f"(goal <= 1.1); CPU a request x{cpu_ratio:.3f}"
    )
    print("  each check alone (median):")
    for label, seconds in parts.items():
        print(f"    {label:<58} {seconds * 1000:6.3f} ms")


if __name__ == "__main__":
    asyncio.run(main())
