"""``/metrics``: the API process's Prometheus metrics (README, "Observability").

It needs a key with ``metrics:read`` (give Prometheus one with only that scope, as its
``authorization`` credentials): every route but the probes and the docs does. It holds no
prompt, answer, key or id — only counts and latencies under bounded labels. The workers' own
metrics ports (``XPANDO_METRICS_PORT``) are for the cluster network only.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from api.deps import AuthRoute, require
from api.errors import responses
from xpando import metrics, telemetry
from xpando.auth.keys import Scope

router = APIRouter(
    tags=["metrics"],
    route_class=AuthRoute,
    dependencies=[Depends(require(Scope.METRICS_READ))],
)

# Not counted: the scrape itself and the probes (they would dominate the request figures).
UNCOUNTED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# A plain ``def``: FastAPI runs it in its thread pool, so reading the Temporal SDK's metrics
# from its loopback exporter never blocks the event loop.
@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {}}},
        **responses(401, 403),
    },
)
def prometheus_metrics() -> Response:
    """Prometheus text exposition: xpando's metrics and the Temporal SDK client's."""
    return Response(telemetry.exposition(), media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI) -> None:
    """Count every request by method, route template (never the raw path: task ids stay out
    of labels) and status, and time it by route."""
    app.add_middleware(RequestMetrics)


class RequestMetrics:
    """Plain ASGI middleware (no per-request task or body buffering, unlike ``@middleware``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = _route_template(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            metrics.HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
            metrics.HTTP_DURATION.labels(route=route).observe(time.perf_counter() - started)


def _route_template(scope: AsgiScope) -> str:
    """The path template of the route that took the request (``/v1/tasks/{task_id}``; the
    router records it in the scope), or ``unmatched``."""
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched")) if route is not None else "unmatched"
