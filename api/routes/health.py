"""Probes: ``/healthz`` (liveness: Temporal and the database answer) and ``/readyz`` (readiness:
those two and at least one live expert node, so a task submitted now has someone to answer it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from api.deps import LivenessDep, TemporalClientDep
from api.schemas import Health, Readiness
from xpando.db import SessionFactory, ping, queries
from xpando.temporal import NodeLiveness

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 3.0
# Liveness is asked of this many registered nodes at a time, stopping at the first live one: a
# large network is not described queue by queue on every probe.
LIVENESS_BATCH = 64


async def _check(probe: Callable[[], Awaitable[str]]) -> str:
    """``"ok"`` (or what the probe found), or ``"error: …"`` naming what went wrong."""
    try:
        return await asyncio.wait_for(probe(), CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"error: no answer within {CHECK_TIMEOUT_S:g}s"
    except Exception as err:  # a probe reports every failure rather than raising it
        return f"error: {type(err).__name__}: {err}"


def _temporal(client: Client) -> Callable[[], Awaitable[str]]:
    async def probe() -> str:
        await client.workflow_service.get_system_info(GetSystemInfoRequest())
        return "ok"

    return probe


def _database(request: Request) -> Callable[[], Awaitable[str]]:
    async def probe() -> str:
        await ping(request.app.state.engine)
        return "ok"

    return probe


def _experts(sessions: SessionFactory, liveness: NodeLiveness) -> Callable[[], Awaitable[str]]:
    async def probe() -> str:
        async with sessions() as session:
            nodes = await queries.list_nodes(session=session, status="active")
        if not nodes:
            return "missing: no expert node is registered"
        queues = [n.task_queue for n in nodes]
        for start in range(0, len(queues), LIVENESS_BATCH):
            batch = await liveness.are_live(queues[start : start + LIVENESS_BATCH])
            if any(batch.values()):
                return "ok"
        return f"missing: none of the {len(nodes)} registered expert nodes is polling its queue"

    return probe


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "Temporal or the database does not answer"}},
)
async def healthz(request: Request, client: TemporalClientDep) -> JSONResponse:
    """Liveness: 200 when Temporal and the database answer, 503 naming the one that does not."""
    temporal, database = await asyncio.gather(_check(_temporal(client)), _check(_database(request)))
    healthy = temporal == "ok" and database == "ok"
    body = Health(status="ok" if healthy else "unhealthy", temporal=temporal, database=database)
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "Not ready: `missing` names Temporal, the database or the experts",
        }
    },
)
async def readyz(
    request: Request, client: TemporalClientDep, liveness: LivenessDep
) -> JSONResponse:
    """Readiness: 200 when Temporal and the database answer and at least one registered expert
    node is live (polling its task queue); 503 otherwise, naming what is missing."""
    temporal, database = await asyncio.gather(_check(_temporal(client)), _check(_database(request)))
    if temporal == "ok" and database == "ok":
        experts = await _check(_experts(request.app.state.sessions, liveness))
    else:
        experts = "unknown: needs Temporal and the database"
    checks = {"temporal": temporal, "database": database, "experts": experts}
    missing = [name for name, verdict in checks.items() if verdict != "ok"]
    body = Readiness(status="not_ready" if missing else "ready", missing=missing, **checks)
    return JSONResponse(body.model_dump(), status_code=503 if missing else 200)
