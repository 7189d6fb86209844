"""Schemathesis against the running API (uvicorn on loopback with a core worker, the real dev
server and a SQLite database): with every check on, no response it provokes is a server error,
has a status the OpenAPI document does not declare for its route, or breaks its declared schema;
a 405 names the allowed methods."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from schemathesis import engine
from schemathesis.engine import Status, events

from api.main import create_app
from tests.conftest import free_port
from workers.core import build_core_worker
from xpando import temporal
from xpando.chain import init_chain
from xpando.db import create_engine, init_db, session_factory
from xpando.settings import Settings

# Bounded so the whole run stays well under a minute on two cores: the coverage phase's
# boundary and negative cases per operation, then this many generated ones.
MAX_EXAMPLES = 15

CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {"enabled": True},
        "phases": {"stateful": {"enabled": False}},
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
        "request-timeout": 20.0,
        "operations": [
            # No expert node runs here, so readiness answers its declared 503 (asserted below).
            {
                "include-path": "/readyz",
                "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", 503]}},
            }
        ],
    }
)


async def _serve(server: uvicorn.Server, settings: Settings) -> None:
    """The API with a core worker beside it, as in a running network: tasks and sagas it starts
    make progress, and the queries and updates it sends them are answered."""
    await init_chain(settings)  # the embedded chain the payout sagas pay on
    client = await temporal.connect(settings)
    engine = create_engine(settings.database_dsn)
    await init_db(engine)
    try:
        async with build_core_worker(client, sessions=session_factory(engine), settings=settings):
            await server.serve()
    finally:
        await engine.dispose()


@pytest.fixture
def api_url(temporal_target: str, tmp_path: Path) -> Iterator[str]:
    """The API served by uvicorn on a free loopback port; its base URL."""
    app_settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        temporal_address=temporal_target,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'xpando.db'}",
        core_task_queue=f"xpando-core-{uuid.uuid4().hex[:8]}",
        api_host="127.0.0.1",
        api_port=free_port(),
        log_format="console",
        log_level="WARNING",
        # No expert runs here: tasks fail at once rather than wait for one, so a stream of
        # their events (GET /v1/tasks/{id}/events) ends instead of outliving the request timeout.
        task_wait_for_experts_s=0,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(app_settings),
            host=app_settings.api_host,
            port=app_settings.api_port,
            log_config=None,
            access_log=False,
        )
    )
    # Its own thread and event loop: schemathesis calls it synchronously, as any client would.
    thread = threading.Thread(
        target=asyncio.run, args=(_serve(server, app_settings),), name="api", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "the API did not start"
        assert time.monotonic() < deadline, "the API did not start within 60 s"
        time.sleep(0.05)
    try:
        yield f"http://{app_settings.api_host}:{app_settings.api_port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _failures(schema: schemathesis.BaseSchema) -> list[str]:
    """Run every phase but the stateful one, as ``schemathesis run`` would; one line a failure."""
    found: list[str] = []
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        found.append(
                            f"{event.recorder.label} [{check.name}] {failure.title}: "
                            f"{failure.message}\n    {check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            found.append(f"error: {event}")
    return sorted(set(found))


def test_every_response_is_declared_and_conforms(api_url: str) -> None:
    ready = httpx.get(f"{api_url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["missing"] == ["experts"]
    failures = _failures(schemathesis.openapi.from_url(f"{api_url}/openapi.json", config=CONFIG))
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
