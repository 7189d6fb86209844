"""Builds the FastAPI app: one Temporal client and one database engine for its lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import dashboard, errors
from api.deps import BodyLimit, install_security_scheme
from api.routes import codec, health, keys, knowledge, metrics, nodes, payouts, tasks
from workers.wiring import build_knowledge_index, build_liveness, build_registry
from xpando import __version__, telemetry, temporal
from xpando.auth.limits import limiter_from_settings
from xpando.db import create_engine, init_db, session_factory
from xpando.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        telemetry.want_sdk_metrics()  # /metrics shows the Temporal client's metrics too
        client = await temporal.connect(settings, attempts=60)
        engine = create_engine(settings.database_dsn)
        await init_db(engine)
        app.state.settings = settings
        app.state.temporal = client
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.liveness = build_liveness(client, settings)
        app.state.knowledge = build_knowledge_index(app.state.sessions, settings)
        app.state.registry = build_registry(app.state.sessions, settings)
        app.state.limiter = limiter_from_settings(settings, app.state.sessions)
        try:
            yield
        finally:
            await dashboard.aclose(app)
            await app.state.limiter.aclose()
            await engine.dispose()

    app = FastAPI(
        title="xpando",
        version=__version__,
        description="Submit tasks to a network of AI experts; read their aggregated answers.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)
    metrics.install(app)
    codec.install(app, settings)
    telemetry.instrument_app(app)
    app.include_router(health.router)
    app.include_router(tasks.router)
    app.include_router(nodes.router)
    app.include_router(payouts.router)
    app.include_router(payouts.earnings_router)
    app.include_router(knowledge.router)
    app.include_router(keys.router)
    app.include_router(metrics.router)
    app.include_router(codec.router)
    dashboard.install(app)
    install_security_scheme(app)
    return app
