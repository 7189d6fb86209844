"""Schemathesis against the running API (uvicorn on loopback with a core worker, the real dev
server and a SQLite database), calling with an admin key: with every check on, no response it
provokes is a server error, has a status the OpenAPI document does not declare for its route, or
breaks its declared schema; a 405 names the allowed methods; a route that declares the bearer
scheme refuses a request without a key or with a wrong one (``ignored_auth``)."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from pydantic import SecretStr
from schemathesis import engine
from schemathesis.engine import Status, events

from tests.conftest import free_port, issue_admin_key, served_api
from xpando.settings import Settings

# Bounded so the whole run stays well under a minute on two cores: the coverage phase's
# boundary and negative cases per operation, then this many generated ones.
MAX_EXAMPLES = 15


def _config(key: str) -> schemathesis.Config:
    """Every check and phase but the stateful one, calling with ``key`` (the ApiKey scheme)."""
    return schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"ApiKey": {"bearer": key}}},
            "checks": {"enabled": True},
            "phases": {"stateful": {"enabled": False}},
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
            "request-timeout": 20.0,
            "operations": [
                # No expert node runs here, so readiness answers its declared 503 (asserted
                # below).
                {
                    "include-path": "/readyz",
                    "checks": {
                        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", 503]}
                    },
                }
            ],
        }
    )


@pytest.fixture
def api(temporal_target: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The API served by uvicorn on a free loopback port with a core worker: its base URL and
    an admin key."""
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
        # Payloads encrypted, so that /codec decodes and encodes instead of answering codec_off.
        payload_key=SecretStr(f"k1:{base64.b64encode(os.urandom(32)).decode()}"),
    )
    key = asyncio.run(issue_admin_key(app_settings))
    with served_api(app_settings) as url:
        yield url, key


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


def test_every_response_is_declared_and_conforms(api: tuple[str, str]) -> None:
    api_url, key = api
    ready = httpx.get(f"{api_url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["missing"] == ["experts"]
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json", config=_config(key))
    failures = _failures(schema)
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
