"""Who is looking at the dashboard: an API key kept in a session cookie.

Signing in posts a key (typed, or taken from the ``#key=`` fragment of the link ``xpando dev``
prints: a fragment never reaches a server, so no access log holds it) to ``/signin``; a valid
key is kept in the ``xpando_session`` cookie — HttpOnly (no script reads it), SameSite=Strict
(no other site's page sends it), Secure over https — and every page checks it again with
:func:`xpando.auth.store.authenticate`, so a revoked key signs its holder out at once.

Forms are CSRF-safe twice over: besides SameSite, each carries a token that only a holder of the
session can compute, an HMAC of a fixed label keyed by the session's key. Before signing in,
the sign-in form carries a random token that must match its own cookie (double submit), so no
other site can sign a browser in under a key of its choosing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import cast

from fastapi import Request, Response

from xpando.auth import store
from xpando.auth.keys import Principal, Scope
from xpando.auth.limits import Limiter, LimitExceeded
from xpando.db import SessionFactory

SESSION_COOKIE = "xpando_session"
SIGNIN_COOKIE = "xpando_signin"  # the sign-in form's double-submit token
CSRF_FIELD = "csrf"
_CSRF_LABEL = b"xpando dashboard form"


class SignInRequired(Exception):
    """No valid session: the page redirects to ``/signin``."""


class Forbidden(Exception):
    """The session's key lacks the scope the page needs: a 403 page."""

    def __init__(self, principal: Principal, scope: Scope) -> None:
        super().__init__(f"this page needs a key with scope {scope.value!r} (or 'admin')")
        self.principal = principal
        self.scope = scope


class Refused(Exception):
    """A form or a limit said no: a page with the status and the reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Viewer:
    """The signed-in key's principal, and the token its forms carry."""

    principal: Principal
    csrf: str

    def allows(self, scope: Scope) -> bool:
        return self.principal.allows(scope)


def csrf_token(key: str) -> str:
    return hmac.new(key.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session(request: Request, response: Response, key: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        key,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/",
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/signin")


def clear_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


def signin_token(request: Request) -> str:
    """The sign-in form's token: the browser's own if it has one (see :func:`keep_signin_token`)."""
    return request.cookies.get(SIGNIN_COOKIE) or secrets.token_urlsafe(24)


def keep_signin_token(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        SIGNIN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/signin",
        max_age=3600,
    )


def check_signin_token(request: Request, sent: str) -> None:
    expected = request.cookies.get(SIGNIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), sent.encode()):
        raise Refused(403, "the sign-in form has expired; reload the page and sign in again")


async def principal_of(request: Request, key: str) -> Principal | None:
    sessions = cast(SessionFactory, request.app.state.sessions)
    async with sessions() as session:
        try:
            return await store.authenticate(session=session, key=key)
        except store.Unauthenticated:
            return None


async def viewer(request: Request, scope: Scope | None = None) -> Viewer:
    """The signed-in viewer, who must hold ``scope``; counts the request against the key's
    requests per minute, as the API does."""
    key = request.cookies.get(SESSION_COOKIE)
    principal = await principal_of(request, key) if key else None
    if key is None or principal is None:
        raise SignInRequired()
    try:
        await cast(Limiter, request.app.state.limiter).check_request(principal)
    except LimitExceeded as err:
        raise Refused(429, err.message) from None
    if scope is not None and not principal.allows(scope):
        raise Forbidden(principal, scope)
    return Viewer(principal=principal, csrf=csrf_token(key))


async def form_viewer(request: Request, scope: Scope | None, sent_csrf: str) -> Viewer:
    """As :func:`viewer`, for a form post: its CSRF token must be the session's."""
    found = await viewer(request)
    if not hmac.compare_digest(found.csrf.encode(), sent_csrf.encode()):
        raise Refused(403, "the form's CSRF token does not match your session; reload the page")
    if scope is not None and not found.allows(scope):
        raise Forbidden(found.principal, scope)
    return found
