"""Traces and metrics endpoints of one process, set up once per entry point.

**Traces** (OpenTelemetry): ``configure_tracing`` reads ``OTEL_TRACES_EXPORTER`` (``otlp``,
``console``, ``none``; through :class:`~xpando.settings.Settings`) and, unless it is ``none``
(the default), builds a tracer provider whose spans go there, instruments ``httpx`` and
``httpx2`` (the provider SDKs' and solana-py's HTTP clients: each provider call is a span and
carries the trace to the provider) and hands every Temporal client temporalio's
``TracingInterceptor`` (:func:`client_interceptors`), whose workers then continue the trace
in workflows and activities. The API adds FastAPI's instrumentation (:func:`instrument_app`).
Off, nothing is installed: no interceptor, no patched HTTP client, no span objects.

The OpenTelemetry SDK reads its other standard variables itself (``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``, ...).

**Metrics** (Prometheus): xpando's own series are defined in :mod:`xpando.metrics`; the
Temporal SDK's runtime metrics come from the Rust core's Prometheus exporter, bound to a
loopback port this module chooses (:func:`temporal_telemetry`) and appended to the same
exposition (:func:`exposition`), so a process has one scrape endpoint: the API's ``/metrics``
or a worker's ``XPANDO_METRICS_PORT`` (:func:`serve_worker_metrics`).
"""

from __future__ import annotations

import functools
import inspect
import socket
import threading
import urllib.request
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from temporalio.runtime import PrometheusConfig, TelemetryConfig

from xpando import __version__
from xpando.logs import get_logger
from xpando.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer
    from temporalio.client import Interceptor

log = get_logger(__name__)

T = TypeVar("T")

# Probes and scrapes are not traced: they would drown the traces that matter.
UNTRACED_URLS = "healthz,readyz,metrics"
# The Temporal SDK's exporter answers on loopback; a scrape waits this long for it.
SDK_SCRAPE_TIMEOUT_S = 2.0


# --- traces ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tracing:
    provider: TracerProvider
    tracer: Tracer
    interceptor: Interceptor


_tracing: _Tracing | None = None


def configure_tracing(
    settings: Settings, *, component: str, exporter: SpanExporter | None = None
) -> bool:
    """Turn tracing on for this process when ``OTEL_TRACES_EXPORTER`` asks for it (or when
    ``exporter`` is given: tests pass an in-memory one). Returns whether tracing is on. A
    second call keeps the first configuration."""
    global _tracing
    if _tracing is not None:
        return True
    names = settings.traces_exporters
    if exporter is None and not names:
        return False
    from opentelemetry.instrumentation.httpx import (
        HTTPX2ClientInstrumentor,
        HTTPXClientInstrumentor,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )
    from temporalio.contrib.opentelemetry import TracingInterceptor

    resource = Resource.create(
        {
            "service.name": settings.otel_service_name or f"xpando-{component}",
            "service.version": __version__,
        }
    )
    provider = TracerProvider(resource=resource)
    if exporter is not None:  # in-process: every span is there when its call returns
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = settings.otel_exporter_otlp_endpoint
            provider.add_span_processor(
                BatchSpanProcessor(
                    OTLPSpanExporter(
                        endpoint=f"{endpoint.rstrip('/')}/v1/traces" if endpoint else None
                    )
                )
            )
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    HTTPX2ClientInstrumentor().instrument(tracer_provider=provider)
    tracer = provider.get_tracer("xpando", __version__)
    _tracing = _Tracing(
        provider=provider,
        tracer=tracer,
        interceptor=TracingInterceptor(provider.get_tracer("temporalio")),
    )
    log.info("tracing on", exporters=names or ["in-process"], component=component)
    return True


def shutdown_tracing() -> None:
    """Flush the spans still queued and take the instrumentation off (process exit, tests)."""
    global _tracing
    if _tracing is None:
        return
    from opentelemetry.instrumentation.httpx import (
        HTTPX2ClientInstrumentor,
        HTTPXClientInstrumentor,
    )

    HTTPXClientInstrumentor().uninstrument()
    HTTPX2ClientInstrumentor().uninstrument()
    _tracing.provider.shutdown()
    _tracing = None


def tracing_enabled() -> bool:
    return _tracing is not None


def client_interceptors() -> list[Interceptor]:
    """What every Temporal client of this process is given (its workers inherit it)."""
    return [_tracing.interceptor] if _tracing is not None else []


def instrument_app(app: FastAPI) -> None:
    """Trace the API's requests (a no-op while tracing is off)."""
    if _tracing is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_tracing.provider,
        excluded_urls=UNTRACED_URLS,
        exclude_spans=["receive", "send"],  # one span per request, not one per ASGI message
    )


def span(name: str, **attributes: str | int | float | bool) -> AbstractContextManager[Any]:
    """A span around a block (nothing at all while tracing is off)."""
    if _tracing is None:
        return nullcontext()
    return _tracing.tracer.start_as_current_span(name, attributes=attributes)


def traced(target: T, prefix: str) -> T:
    """``target`` with each of its coroutine methods called in a span ``<prefix>.<method>``
    (``target`` itself while tracing is off)."""
    if _tracing is None:
        return target
    return cast(T, _TracedCalls(target, prefix, _tracing.tracer))


class _TracedCalls:
    def __init__(self, target: Any, prefix: str, tracer: Tracer) -> None:
        self._target = target
        self._prefix = prefix
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def call(*args: Any, **kwargs: Any) -> Any:
            with self._tracer.start_as_current_span(f"{self._prefix}.{name}"):
                return await attr(*args, **kwargs)

        return call


# --- metrics endpoints -------------------------------------------------------------------------


def exposition() -> bytes:
    """This process's metrics as Prometheus text: xpando's (and the Python process's) from
    ``prometheus_client``, then the Temporal SDK's as its exporter wrote them (their names are
    all ``temporal_*``, so the two never share a family; passing the SDK's text through
    unparsed keeps a scrape cheap)."""
    ours = generate_latest(REGISTRY)
    if _sdk_metrics_address is None:
        return ours
    try:
        url = f"http://{_sdk_metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=SDK_SCRAPE_TIMEOUT_S) as resp:
            sdk: bytes = resp.read()
    except OSError as err:  # the exporter starts with the runtime's first client
        log.debug("temporal sdk metrics unavailable", error=str(err))
        return ours
    return ours + sdk if sdk.endswith(b"\n") or not sdk else ours + sdk + b"\n"


class _MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        body = exposition()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # a scrape every few seconds is not news


_sdk_metrics_address: str | None = None  # where this process's SDK exporter listens, once bound
_sdk_metrics_wanted = False


def want_sdk_metrics() -> None:
    """The next Temporal runtime this process builds exports the SDK's metrics (the API and
    workers that serve metrics ask for it before they connect)."""
    global _sdk_metrics_wanted
    _sdk_metrics_wanted = True


def sdk_metrics_wanted() -> bool:
    return _sdk_metrics_wanted and _sdk_metrics_address is None


def temporal_telemetry() -> TelemetryConfig:
    """The telemetry of a new Temporal runtime: the SDK's Prometheus exporter (on a free
    loopback port, folded into this process's endpoint) for the first runtime built after
    :func:`want_sdk_metrics`; the SDK's defaults otherwise."""
    global _sdk_metrics_address
    if not sdk_metrics_wanted():
        return TelemetryConfig()
    address = f"127.0.0.1:{_free_port()}"
    _sdk_metrics_address = address
    return TelemetryConfig(
        metrics=PrometheusConfig(
            bind_address=address,
            counters_total_suffix=True,
            unit_suffix=True,
            durations_as_seconds=True,
        )
    )


class MetricsPortUnavailable(RuntimeError):
    """The worker's metrics port cannot be bound (in use, or not an address of this host)."""


def serve_worker_metrics(settings: Settings) -> int | None:
    """Serve this worker's metrics on ``XPANDO_METRICS_PORT`` (nothing when it is 0); returns
    the port. Call before connecting to Temporal so the SDK's metrics are included."""
    if not settings.metrics_port:
        return None
    host = settings.metrics_host
    server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
    try:
        server = server_class((host, settings.metrics_port), _MetricsHandler)
    except OSError as err:
        raise MetricsPortUnavailable(
            f"cannot serve metrics on {host}:{settings.metrics_port} ({err.strerror}); "
            "set XPANDO_METRICS_PORT to a free port (0: none)"
        ) from err
    want_sdk_metrics()
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics served", port=settings.metrics_port, path="/metrics")
    return settings.metrics_port


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
