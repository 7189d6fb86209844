"""One ``configure_logging()`` per entry point: structlog for our code and the stdlib's records."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace
from temporalio import activity

from xpando.auth.keys import redact
from xpando.settings import Settings


def _drop_color_message(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # uvicorn duplicates the message with ANSI colours in an extra field
    event_dict.pop("color_message", None)
    return event_dict


def _redact_api_keys(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # xpando never logs a key; this keeps one out of the logs when a client puts it where it
    # does not belong, such as a URL (uvicorn's access log prints the whole path and query).
    for name, value in event_dict.items():
        if isinstance(value, str):
            event_dict[name] = redact(value)
    return event_dict


def _add_trace_context(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The active span's trace (so a log line leads to its trace) and, in an activity, the
    workflow it serves; a line that names them itself keeps its own."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    if "workflow_id" not in event_dict and activity.in_activity():
        workflow_id = activity.info().workflow_id
        if workflow_id:
            event_dict["workflow_id"] = workflow_id
    return event_dict


def configure_logging(settings: Settings, *, component: str | None = None) -> None:
    """Render structlog and standard-library records (temporalio's, uvicorn's) the same way.

    JSON lines when stdout is not a TTY (or ``log_format=json``), a console renderer otherwise.
    Time is ISO 8601 UTC. Context bound with ``structlog.contextvars`` (task_id, workflow_id,
    node_id) appears on every line; so do the active span's ``trace_id`` and, inside an
    activity, its ``workflow_id``.
    """
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        _add_trace_context,
        _drop_color_message,
        structlog.processors.StackInfoRenderer(),
    ]
    if component:
        structlog.contextvars.bind_contextvars(component=component)
    renderer: structlog.typing.Processor
    if use_json:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    shared.append(_redact_api_keys)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    # The configured level is a floor for every record, also from libraries that set their own
    # logger to DEBUG (bm25s does while it builds an index).
    handler.setLevel(settings.log_level)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # Chatty third-party loggers stay at WARNING unless we debug.
    if settings.log_level != "DEBUG":
        for name in ("httpx", "httpcore", "aiosqlite", "sqlalchemy.engine", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
