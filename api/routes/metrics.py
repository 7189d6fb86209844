"""``/metrics``: the API process's Prometheus metrics (README, "Observability").

Like the probes it needs no API key: Prometheus scrapes it from inside the cluster, and it holds
no prompt, answer, key or id — only counts and latencies under bounded labels. Keep it off the
public ingress (the k8s and Fly files route only ``/v1``, the docs and the probes outward).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
    app.add_middleware(RequestMetrics)


class RequestMetrics:
    """Plain ASGI middleware (no per-request task or body buffering, unlike ``@middleware``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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


def _route_template(scope: Scope) -> str:
    """The path template of the route that took the request (``/v1/tasks/{task_id}``; the
    router records it in the scope), or ``unmatched``."""
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched")) if route is not None else "unmatched"
