"""Issuing, listing, revoking and checking API keys in the database (keyword-only functions,
called by the API, the ``xpando keys`` commands and ``xpando dev``)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.auth.keys import (
    LIMIT_NAMES,
    NAME_PATTERN,
    KeyLimits,
    Principal,
    Scope,
    dev_key_path,
    digest,
    key_id_of,
    matches,
    new_key,
    read_key_file,
    write_key_file,
)
from xpando.db import SessionFactory
from xpando.db.models import ApiKey
from xpando.db.queries import as_utc

DEV_KEY_NAME = "dev"
KeyStatus = Literal["active", "revoked", "expired"]
# Compared against when no row has the presented key id, so that an unknown id takes as long
# to refuse as a wrong secret.
_NO_DIGEST = "0" * 64


class Unauthenticated(Exception):
    """No valid key: the message says why (missing, malformed, unknown, revoked, expired)."""


@dataclass(frozen=True, slots=True)
class IssuedKey:
    row: ApiKey
    key: str  # shown once, never stored


def status(row: ApiKey, now: datetime | None = None) -> KeyStatus:
    """``active``, ``revoked`` or ``expired``."""
    now = now or datetime.now(UTC)
    if row.revoked_at is not None:
        return "revoked"
    expires = as_utc(row.expires_at)
    if expires is not None and expires <= now:
        return "expired"
    return "active"


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes in a stable order; ValueError naming an unknown one, or none at all."""
    wanted = set(scopes)
    unknown = sorted(wanted - set(Scope))
    if unknown:
        known = ", ".join(s.value for s in Scope)
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are: {known}")
    if not wanted:
        raise ValueError("a key needs at least one scope")
    return [s.value for s in Scope if s.value in wanted]


async def create_key(
    *,
    session: AsyncSession,
    name: str,
    scopes: Iterable[str],
    expires_at: datetime | None = None,
    created_by: str | None = None,
    now: datetime | None = None,
    limits: KeyLimits | None = None,
) -> IssuedKey:
    """Issue a key; its secret is in the result only. ``limits``: its own, where they differ
    from the deployment's defaults. ValueError for a bad name, scope, expiry or limit."""
    now = now or datetime.now(UTC)
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            f"invalid name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    ordered = check_scopes(scopes)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ValueError("the expiry needs a time zone (e.g. 2030-01-01T00:00:00Z)")
        expires_at = expires_at.astimezone(UTC)
        if expires_at <= now:
            raise ValueError(f"the expiry {expires_at.isoformat()} is not in the future")
    own = limits or KeyLimits()
    for limit in LIMIT_NAMES:
        value = getattr(own, limit)
        if value is not None and value < 0:
            raise ValueError(f"{limit} must be 0 (no limit) or more, not {value}")
    issued = new_key()
    row = ApiKey(
        key_id=issued.key_id,
        name=name,
        scopes=ordered,
        digest=issued.digest,
        created_by=created_by,
        created_at=now,
        expires_at=expires_at,
        requests_per_minute=own.requests_per_minute,
        tasks_per_minute=own.tasks_per_minute,
        concurrent_tasks=own.concurrent_tasks,
        budget_usd_per_day=own.budget_usd_per_day,
    )
    session.add(row)
    await session.commit()
    return IssuedKey(row=row, key=issued.key)


async def list_keys(*, session: AsyncSession) -> list[ApiKey]:
    rows = await session.exec(select(ApiKey).order_by(col(ApiKey.created_at), col(ApiKey.key_id)))
    return list(rows.all())


async def get_key(*, session: AsyncSession, key_id: str) -> ApiKey | None:
    return await session.get(ApiKey, key_id)


async def revoke_key(
    *, session: AsyncSession, key_id: str, now: datetime | None = None
) -> ApiKey | None:
    """Revoke a key (from its next request on); revoking it again changes nothing. ``None``:
    no such key."""
    row = await session.get(ApiKey, key_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = now or datetime.now(UTC)
        session.add(row)
        await session.commit()
        await session.refresh(row)
    verified.forget(key_id)
    return row


async def authenticate(
    *, session: AsyncSession, key: str, now: datetime | None = None
) -> Principal:
    """The principal of a valid key; :class:`Unauthenticated` with the reason otherwise."""
    principal, _ = await _authenticated(session=session, key=key, now=now)
    return principal


async def _authenticated(
    *, session: AsyncSession, key: str, now: datetime | None
) -> tuple[Principal, ApiKey]:
    key_id = key_id_of(key)
    if key_id is None:
        raise Unauthenticated("the API key is malformed (expected xpd_<id>_<secret>)")
    row = await session.get(ApiKey, key_id)
    if not matches(key, row.digest if row is not None else _NO_DIGEST) or row is None:
        raise Unauthenticated("unknown API key")
    # Only a caller who holds the key learns whether it was revoked or has expired.
    match status(row, now):
        case "revoked":
            raise Unauthenticated(f"API key {key_id} was revoked")
        case "expired":
            raise Unauthenticated(f"API key {key_id} has expired")
    principal = Principal(
        key_id=row.key_id, name=row.name, scopes=frozenset(row.scopes), limits=limits_of(row)
    )
    return principal, row


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    expires_at: datetime | None
    until: float  # time.monotonic() after which the key is read again


class VerifiedKeys:
    """Keys this process has checked, for a few seconds (``XPANDO_KEY_CACHE_S``): a request
    with one of them costs no database read. Held by the digest of the key (never the key); a
    revocation through this process forgets the key at once, one through another process or
    the CLI is seen when the entry runs out; an expiry is checked on every request."""

    MAX = 10_000  # the oldest entry makes room beyond this

    def __init__(self) -> None:
        self._entries: dict[str, _Verified] = {}

    async def authenticate(
        self, *, sessions: SessionFactory, key: str, ttl_s: float, now: datetime | None = None
    ) -> Principal:
        """As :func:`authenticate`, from this cache while the key's entry lasts."""
        held = digest(key)
        entry = self._entries.get(held)
        clock = time.monotonic()
        if entry is not None and entry.until > clock:
            expires = entry.expires_at
            if expires is None or expires > (now or datetime.now(UTC)):
                return entry.principal
        self._entries.pop(held, None)
        async with sessions() as session:
            principal, row = await _authenticated(session=session, key=key, now=now)
        if ttl_s > 0:
            if len(self._entries) >= self.MAX:
                del self._entries[next(iter(self._entries))]
            self._entries[held] = _Verified(principal, as_utc(row.expires_at), clock + ttl_s)
        return principal

    def forget(self, key_id: str) -> None:
        for held in [h for h, e in self._entries.items() if e.principal.key_id == key_id]:
            del self._entries[held]


verified = VerifiedKeys()


def limits_of(row: ApiKey) -> KeyLimits:
    """The key's own limits (None where it takes the deployment's default)."""
    return KeyLimits(
        requests_per_minute=row.requests_per_minute,
        tasks_per_minute=row.tasks_per_minute,
        concurrent_tasks=row.concurrent_tasks,
        budget_usd_per_day=row.budget_usd_per_day,
    )


async def ensure_dev_key(*, sessions: SessionFactory, data_dir: Path) -> tuple[str, bool]:
    """The admin key ``xpando dev`` prints and keeps at ``<data_dir>/dev-api-key`` (mode 0600):
    the one already there while it is valid, else a new one. Returns it and whether it is new."""
    path = dev_key_path(data_dir)
    key = read_key_file(path)
    async with sessions() as session:
        if key is not None:
            try:
                if (await authenticate(session=session, key=key)).is_admin:
                    return key, False
            except Unauthenticated:
                pass  # revoked, expired, or from another database: issue a new one
        issued = await create_key(
            session=session, name=DEV_KEY_NAME, scopes=[Scope.ADMIN], created_by="xpando dev"
        )
    write_key_file(path, issued.key)
    return issued.key, True
