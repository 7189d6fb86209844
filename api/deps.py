"""Typed dependencies: settings, the Temporal client, a database session, who is calling, and
what their key's limits allow.

Every route but the probes, the OpenAPI documents and signed node registration needs an API key
with a scope: a route says which with :func:`require`, and its router's :class:`AuthRoute` checks
the key before the request's body is read, so a caller without a valid key learns nothing about
the body and costs no parsing. The caller's :class:`~xpando.auth.keys.Principal` is what the
dependency returns and is also ``request.state.principal``. The key's requests per minute are
counted right after it is checked (429 ``rate_limited``); a route that starts a task asks
:class:`TaskLimits` first (``xpando/auth/limits.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Annotated, Any, cast

import structlog
from fastapi import Depends, FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi.utils import create_model_field
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from api.errors import ApiError, error_response, responses
from api.schemas import ErrorBody
from xpando.auth import store
from xpando.auth.keys import Principal, Scope
from xpando.auth.limits import BUDGET_EXCEEDED, Admission, Limiter, LimitExceeded
from xpando.db import SessionFactory
from xpando.logs import get_logger
from xpando.routing.registry import NodeRegistry
from xpando.settings import Settings
from xpando.temporal import NodeLiveness

log = get_logger(__name__)


def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


def get_temporal(request: Request) -> Client:
    return cast(Client, request.app.state.temporal)


def get_liveness(request: Request) -> NodeLiveness:
    return cast(NodeLiveness, request.app.state.liveness)


def get_registry(request: Request) -> NodeRegistry:
    return cast(NodeRegistry, request.app.state.registry)


def get_sessions(request: Request) -> SessionFactory:
    return cast(SessionFactory, request.app.state.sessions)


def get_limiter(request: Request) -> Limiter:
    return cast(Limiter, request.app.state.limiter)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessions = cast(SessionFactory, request.app.state.sessions)
    async with sessions() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
TemporalClientDep = Annotated[Client, Depends(get_temporal)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
# For a route that streams: a session of its own, only while it needs one.
SessionFactoryDep = Annotated[SessionFactory, Depends(get_sessions)]
LivenessDep = Annotated[NodeLiveness, Depends(get_liveness)]
RegistryDep = Annotated[NodeRegistry, Depends(get_registry)]


# --- who is calling ------------------------------------------------------------------------------

BEARER = HTTPBearer(
    scheme_name="ApiKey",
    bearerFormat="xpd_<key id>_<secret>",
    description="An API key: `Authorization: Bearer xpd_…`. Create one with `xpando keys create "
    "--name NAME --scope SCOPE` or `POST /v1/keys`; `xpando dev` keeps an admin key in "
    "`<data_dir>/dev-api-key`.",
    auto_error=False,  # refused by require(), with the API's error body
)


def _challenge(error: str | None = None, scope: str | None = None) -> dict[str, str]:
    """``WWW-Authenticate`` of a refusal (RFC 6750)."""
    parts = ['Bearer realm="xpando"']
    if error:
        parts.append(f'error="{error}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return {"WWW-Authenticate": ", ".join(parts)}


async def _authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise ApiError(
            401,
            "unauthenticated",
            "this route needs an API key: send 'Authorization: Bearer xpd_…'",
            headers=_challenge(),
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "unauthenticated",
            "the Authorization header must be 'Bearer <API key>'",
            headers=_challenge("invalid_request"),
        )
    try:  # a session of its own, released before the route takes one
        return await store.verified.authenticate(
            sessions=get_sessions(request),
            key=token.strip(),
            ttl_s=get_settings(request).key_cache_s,
        )
    except store.Unauthenticated as err:
        raise ApiError(
            401, "unauthenticated", str(err), headers=_challenge("invalid_token")
        ) from None


async def authorize(request: Request, scope: Scope, *, count: bool = True) -> Principal:
    """The caller's principal, which must hold ``scope`` (or ``admin``): 401 without a valid
    key, 403 without the scope. Sets ``request.state.principal``. The request is counted
    against the key's requests per minute (once a request, whatever its route) unless
    ``count`` is False: then the route's :class:`TaskLimits` counts it with the task, in one
    call (``request.state.uncounted``)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        principal = await _authenticate(request)
        request.state.principal = principal
        request.state.uncounted = not count
        if count:
            try:
                await get_limiter(request).check_request(principal)
            except LimitExceeded as err:
                raise refused(principal, err) from None
    if not principal.allows(scope):
        held = ", ".join(sorted(principal.scopes))
        raise ApiError(
            403,
            "forbidden",
            f"this route needs an API key with scope {scope.value!r} (or 'admin'); key "
            f"{principal.key_id} ({principal.name}) has: {held}",
            headers=_challenge("insufficient_scope", scope.value),
        )
    return principal


class Require:
    """The dependency :func:`require` returns (its ``scope`` is what :class:`AuthRoute` reads)."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def __call__(self, request: Request) -> Principal:
        return await authorize(request, self.scope)


def require(scope: Scope) -> Require:
    """A dependency that returns the caller's :class:`Principal` holding ``scope``:
    ``principal: Annotated[Principal, Depends(require(Scope.TASKS_WRITE))]``, or
    ``dependencies=[Depends(require(...))]`` when the route does not need the principal."""
    return Require(scope)


def _depends_on(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


def required_scope(dependant: Dependant) -> Scope | None:
    """The scope a route's dependencies require, if any."""
    for dep in dependant.dependencies:
        if isinstance(dep.call, Require):
            return dep.call.scope
        found = required_scope(dep)
        if found is not None:
            return found
    return None


class AuthRoute(APIRoute):
    """A route that checks the API key (when it requires a scope) before FastAPI reads and
    parses the body, and names the scope in its OpenAPI entry."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        scope = required_scope(self.dependant)
        if scope is not None:
            note = f"Needs an API key with scope `{scope.value}` (or `admin`)."
            self.description = f"{self.description}\n\n{note}" if self.description else note
            # The bearer scheme, declared here rather than as a dependency: FastAPI's handling
            # of a security dependency cost every request about 0.3 ms of CPU, for a header
            # that authorize() reads anyway (install_security_scheme adds the scheme).
            self.openapi_extra = {
                **(self.openapi_extra or {}),
                "x-required-scope": scope.value,
                "security": [{BEARER.scheme_name: []}],
            }
            if 429 not in self.responses:  # every key has its requests per minute
                self.responses = {
                    **self.responses,
                    429: responses(429)[429],
                }
                self.response_fields[429] = create_model_field(
                    name=f"Response_429_{self.unique_id}", type_=ErrorBody, mode="serialization"
                )

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        scope = required_scope(self.dependant)
        if scope is None:
            return handler
        # A route that starts tasks counts the request with the task (one Redis call).
        deferred = _depends_on(self.dependant, task_limits)

        async def authorized(request: Request) -> Response:
            principal = await authorize(request, scope, count=not deferred)
            try:
                with structlog.contextvars.bound_contextvars(
                    principal=principal.name, key_id=principal.key_id
                ):
                    return await handler(request)
            finally:
                if getattr(request.state, "uncounted", False):  # it ended before the task
                    with contextlib.suppress(LimitExceeded):
                        await get_limiter(request).check_request(principal)

        return authorized


def install_security_scheme(app: FastAPI) -> None:
    """Name the API key's bearer scheme in the OpenAPI document's components, which every
    :class:`AuthRoute` with a scope lists as its ``security``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes[BEARER.scheme_name] = BEARER.model.model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


def get_principal(request: Request) -> Principal | None:
    """The caller, as its route's :func:`require` checked it (None on an open route)."""
    principal = getattr(request.state, "principal", None)
    return principal if isinstance(principal, Principal) else None


def may_see(principal: Principal | None, owner: str | None) -> bool:
    """A task is its owner's, and every admin's."""
    return principal is None or principal.is_admin or principal.name == owner


def owner_filter(principal: Principal | None) -> str | None:
    """The owner whose tasks the caller may list (None: every task)."""
    return None if principal is None or principal.is_admin else principal.name


PrincipalDep = Annotated[Principal | None, Depends(get_principal)]
PayoutApprover = Annotated[Principal, Depends(require(Scope.PAYOUTS_APPROVE))]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]


# --- limits --------------------------------------------------------------------------------------


def refused(principal: Principal | None, err: LimitExceeded) -> ApiError:
    """The answer to a request the key's limits refuse: 402 for its budget, 429 otherwise,
    with ``Retry-After`` when waiting lifts the refusal."""
    headers = None
    if err.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(err.retry_after_s)))}
    log.info("refused by a limit", code=err.code, key_id=principal and principal.key_id)
    status = 402 if err.code == BUDGET_EXCEEDED else 429
    return ApiError(status, err.code, err.message, err.details, headers=headers)


async def registration_limit(request: Request) -> None:
    """Signed node registration needs no API key: each client address has its registrations
    per minute (429 ``registration_rate_limited``)."""
    address = request.client.host if request.client is not None else "unknown"
    try:
        await get_limiter(request).check_registration(
            address, get_settings(request).limit_registrations_per_minute
        )
    except LimitExceeded as err:
        raise refused(None, err) from None


class TaskLimits:
    """What a route asks before it starts a task for the caller's key: :meth:`admit` raises the
    refusal (429 ``task_rate_limited`` or ``concurrency_limited``, 402 ``budget_exceeded``) or
    holds the task's worst-case cost, its row naming the key. Without a principal (a route
    served without keys) it admits everything."""

    def __init__(self, request: Request, principal: Principal | None) -> None:
        self._request = request
        self._principal = principal
        self.admission: Admission | None = None

    async def admit(
        self, *, task_id: str, prompt: str, k: int, regions: Sequence[str], domain: str | None
    ) -> None:
        if self._principal is None:
            return
        client = get_temporal(self._request)
        state = self._request.state
        count_request = bool(getattr(state, "uncounted", False))
        state.uncounted = False  # counted by admit_task, refused or not
        try:
            self.admission = await get_limiter(self._request).admit_task(
                self._principal,
                count_request=count_request,
                task_id=task_id,
                prompt=prompt,
                k=k,
                regions=regions,
                domain=domain,
                ended=lambda task_ids: _ended(client, task_ids),
            )
        except LimitExceeded as err:
            raise refused(self._principal, err) from None

    async def undo(self) -> None:
        """This request did not start the task (the route failed after :meth:`admit`, or the
        task was submitted before): give its hold back unless the task's workflow is running
        (when Temporal cannot say, the next refusal of the key finds out)."""
        if self.admission is None or not self.admission.held:
            return
        ended = await _ended(get_temporal(self._request), [self.admission.task_id])
        if ended:
            await get_limiter(self._request).release(ended, self.admission)


async def _ended(client: Client, task_ids: Sequence[str]) -> Mapping[str, str | None]:
    """Of ``task_ids``, those whose workflow is not running: its final status, or None when
    Temporal has no such workflow. One Temporal cannot describe now counts as running."""

    async def ended(task_id: str) -> tuple[str, str | None] | None:
        try:
            described = await client.get_workflow_handle(task_id).describe()
        except RPCError as err:
            return (task_id, None) if err.status == RPCStatusCode.NOT_FOUND else None
        if described.status in (None, WorkflowExecutionStatus.RUNNING):
            return None
        return task_id, described.status.name.lower()

    found = await asyncio.gather(*(ended(task_id) for task_id in task_ids))
    return dict(f for f in found if f is not None)


async def task_limits(
    request: Request,
    principal: Annotated[Principal, Depends(require(Scope.TASKS_WRITE))],
) -> AsyncIterator[TaskLimits]:
    limits = TaskLimits(request, principal)
    try:
        yield limits
    except Exception:
        try:
            await limits.undo()
        except Exception as err:  # the route's own error is the one to answer with
            log.warning("could not give a failed submission's hold back", error=repr(err))
        raise


TaskLimitsDep = Annotated[TaskLimits, Depends(task_limits)]


class BodyTooLarge(StarletteHTTPException):
    """An HTTP exception so that FastAPI passes it on from a route reading its body (it turns
    any other error there into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than {limit} bytes (XPANDO_API_MAX_BODY_BYTES)",
            headers={"Connection": "close"},
        )


class BodyLimit:
    """Refuses a request body over ``limit`` bytes before it is read: at once when its
    Content-Length says so, and, for a streamed (chunked) body, as soon as what arrived passes
    the limit — the route never sees more than ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.limit:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)  # the route's exception handler answers
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)  # read outside a route, e.g. a middleware

    async def _refuse(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        refusal = BodyTooLarge(self.limit)
        response = error_response(
            413, "body_too_large", refusal.detail, headers=dict(refusal.headers or {})
        )
        await response(scope, receive, send)


def _content_length(scope: AsgiScope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses it before we see it
    return None
