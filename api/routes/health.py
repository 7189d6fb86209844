"""``/healthz``: is Temporal reachable, is the database reachable."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

from api.deps import TemporalClientDep
from api.schemas import Health
from xpando.db import ping

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 3.0


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(request: Request, client: TemporalClientDep) -> JSONResponse:
    async def temporal_ok() -> str:
        await client.workflow_service.get_system_info(GetSystemInfoRequest())
        return "ok"

    async def database_ok() -> str:
        await ping(request.app.state.engine)
        return "ok"

    results = await asyncio.gather(
        asyncio.wait_for(temporal_ok(), CHECK_TIMEOUT_S),
        asyncio.wait_for(database_ok(), CHECK_TIMEOUT_S),
        return_exceptions=True,
    )
    temporal, database = (
        r if isinstance(r, str) else f"error: {type(r).__name__}: {r}" for r in results
    )
    healthy = temporal == "ok" and database == "ok"
    body = Health(status="ok" if healthy else "unhealthy", temporal=temporal, database=database)
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)
