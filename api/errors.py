"""Errors come back as JSON ``{"error": {"code", "message", "details"}}`` with a stable code
(:class:`api.schemas.ErrorBody`), and each route declares the error statuses it can answer."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from temporalio.service import RPCError, RPCStatusCode

from api.schemas import ErrorBody, ErrorDetail, ErrorInfo
from xpando.contracts import INVALID_TEXT
from xpando.embedding_providers import EmbeddingUnavailable

# What each error status means on this API, as the OpenAPI document describes it.
ERROR_DESCRIPTIONS = {
    400: "Bad request: a body that cannot be read, or a malformed header",
    401: "Unauthenticated: no valid API key (missing, malformed, unknown, revoked or expired); "
    "for node registration, a signature that does not verify or a stale timestamp",
    403: "Forbidden: the API key lacks the scope this route needs; for node registration, a "
    "request signed by another key than the node's",
    402: "Over the API key's daily spend budget (budget_exceeded): this task's worst-case cost "
    "would pass it; it renews at 00:00 UTC",
    404: "Not found",
    409: "Conflicts with the current state",
    410: "Gone: kept no longer (past the retention of Temporal's history)",
    413: "The request body is larger than XPANDO_API_MAX_BODY_BYTES",
    422: "Invalid request: a field, parameter or body is out of its bounds",
    429: "Over one of the API key's limits: requests per minute (rate_limited), tasks per minute "
    "(task_rate_limited), tasks running at once (concurrency_limited); Retry-After says when "
    "a per-minute limit lifts",
    503: "A backing service (Temporal, an embedder) is unavailable; retry later",
}

# What an error of each status looks like (a route may show its own, see ``responses``).
ERROR_EXAMPLES: dict[int, tuple[str, str]] = {
    400: ("bad_request", "the request cannot be read"),
    401: ("unauthenticated", "this route needs an API key: send 'Authorization: Bearer xpd_…'"),
    403: ("forbidden", "this route needs an API key with scope 'tasks:read' (or 'admin')"),
    404: ("not_found", "no such resource"),
    409: ("conflict", "the request conflicts with the current state"),
    402: ("budget_exceeded", "this task's worst-case cost would pass the key's daily budget"),
    410: ("gone", "kept no longer"),
    413: ("body_too_large", "the request body is larger than 262144 bytes"),
    429: ("rate_limited", "over the key's requests per minute; retry after Retry-After"),
    422: ("validation_error", "invalid request: limit: Input should be less than or equal to 100"),
    503: ("temporal_unavailable", "Temporal is unavailable (connection refused); retry later"),
}

# Temporal answers these when it cannot be reached or does not answer in time.
TEMPORAL_DOWN = frozenset({RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED})


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers


def responses(
    *statuses: int,
    examples: dict[int, tuple[str, str]] | None = None,
    streaming: bool = False,
) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each error status with the error model and an example
    (``examples``: this route's own (code, message) for some statuses). ``streaming``: the
    route's own responses are not JSON (FastAPI would file the error model under their media
    type), its errors still are."""
    mine = {**ERROR_EXAMPLES, **(examples or {})}
    declared: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        content: dict[str, Any] = {"example": _body(*mine[status])}
        entry: dict[str, Any] = {"description": ERROR_DESCRIPTIONS[status]}
        if streaming:
            content["schema"] = {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}
        else:
            entry["model"] = ErrorBody
        entry["content"] = {"application/json": content}
        declared[status] = entry
    return declared


def _allowed(app: FastAPI, path: str) -> str:
    """Every method the API serves at ``path``. Starlette's own 405 names only the methods of the
    first route whose path matched (``GET`` for ``/v1/nodes``, which also takes ``POST``)."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")  # Starlette answers HEAD wherever it answers GET
    return ", ".join(sorted(methods))


def _body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    info = ErrorInfo(
        code=code, message=message, details=[ErrorDetail.model_validate(d) for d in details or []]
    )
    return ErrorBody(error=info).model_dump()


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(_body(code, message, details), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            exc.status, exc.code, exc.message, details=exc.details, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                "code": err.get("type", "invalid"),
                "message": err.get("msg", ""),
            }
            for err in exc.errors()
        ]
        summary = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details)
        # Text a database or provider cannot take has a code of its own, so a client can tell
        # "fix your encoding" from "fix your request".
        code = "validation_error"
        if details and all(d["code"] == INVALID_TEXT for d in details):
            code = INVALID_TEXT
        return JSONResponse(_body(code, f"invalid request: {summary}", details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "bad_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "body_too_large",  # api.deps.BodyLimit, from inside a route reading its body
        }.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed(app, request.url.path) or headers.get("Allow", "")
        return JSONResponse(
            _body(code, str(exc.detail)), status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(RPCError)
    async def _temporal(_: Request, exc: RPCError) -> JSONResponse:
        if exc.status not in TEMPORAL_DOWN:
            raise exc  # a bug, not an outage: the server error it is
        return JSONResponse(
            _body("temporal_unavailable", f"Temporal is unavailable ({exc.message}); retry later"),
            status_code=503,
        )

    @app.exception_handler(EmbeddingUnavailable)
    async def _embedder(_: Request, exc: EmbeddingUnavailable) -> JSONResponse:
        return JSONResponse(_body("embedding_unavailable", str(exc)), status_code=503)
