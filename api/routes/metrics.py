"""``/metrics``: the API process's Prometheus metrics (README, "Observability").

Like the probes it needs no API key: Prometheus scrapes it from inside the cluster, and it holds
no prompt, answer, key or id — only counts and latencies under bounded labels. Keep it off the
public ingress (the k8s and Fly files route only ``/v1``, the docs and the probes outward).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import Match

from xpando import metrics, telemetry

router = APIRouter(tags=["metrics"])

# Not counted: the scrape itself and the probes (they would dominate the request figures).
UNCOUNTED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# A plain ``def``: FastAPI runs it in its thread pool, so reading the Temporal SDK's metrics
# from its loopback exporter never blocks the event loop.
@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
)
def prometheus_metrics() -> Response:
    """Prometheus text exposition: xpando's metrics and the Temporal SDK client's."""
    return Response(telemetry.exposition(), media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI) -> None:
    """Count every request by method, route template (never the raw path: task ids stay out
    of labels) and status, and time it by route."""

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path in UNCOUNTED_PATHS:
            return await call_next(request)
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = _route_template(app, request)
            method = request.method if request.method in METHODS else "other"
            metrics.HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
            metrics.HTTP_DURATION.labels(route=route).observe(time.perf_counter() - started)


def _route_template(app: FastAPI, request: Request) -> str:
    """The matched route's path template (``/v1/tasks/{task_id}``), or ``unmatched``."""
    matched = request.scope.get("route")  # set by the router when a route took the request
    if matched is not None:
        return str(getattr(matched, "path", "unmatched"))
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "unmatched"))
    return "unmatched"
