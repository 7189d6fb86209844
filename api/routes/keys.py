"""``/v1/keys``: issue, list and revoke API keys (scope ``admin``). ``xpando keys`` does the same
on the database directly, which is how the first key is made."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from api.deps import Admin, AuthRoute, SessionDep, SettingsDep, require
from api.errors import ApiError, responses
from api.schemas import KeyCreate, KeyCreated, KeyLimitsBody, KeyList, KeyView
from xpando.auth import store
from xpando.auth.keys import KeyLimits, Scope
from xpando.auth.limits import default_limits
from xpando.db.models import ApiKey
from xpando.db.queries import as_utc
from xpando.logs import get_logger

router = APIRouter(prefix="/v1/keys", tags=["keys"], route_class=AuthRoute)
log = get_logger(__name__)

KeyIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="The key's id")]


def view(row: ApiKey, defaults: KeyLimits, now: datetime | None = None) -> KeyView:
    return KeyView(
        key_id=row.key_id,
        name=row.name,
        scopes=[Scope(s) for s in row.scopes],
        status=store.status(row, now),
        created_by=row.created_by,
        created_at=as_utc(row.created_at) or datetime.now(UTC),
        expires_at=as_utc(row.expires_at),
        revoked_at=as_utc(row.revoked_at),
        limits=KeyLimitsBody.model_validate(asdict(store.limits_of(row).over(defaults))),
    )


@router.post(
    "",
    status_code=201,
    response_model=KeyCreated,
    responses=responses(401, 403, 413, 422),
)
async def create_key(
    body: KeyCreate, admin: Admin, session: SessionDep, settings: SettingsDep
) -> KeyCreated:
    """Issue a key. The response holds the key itself, this once: store it now."""
    now = datetime.now(UTC)
    expires_at = now + timedelta(seconds=body.expires_in_s) if body.expires_in_s else None
    issued = await store.create_key(  # the model checked the name and scopes as store does
        session=session,
        name=body.name,
        scopes=body.scopes,
        expires_at=expires_at,
        created_by=admin.name,
        now=now,
        limits=KeyLimits(**body.limits.model_dump()) if body.limits else None,
    )
    scopes = issued.row.scopes
    log.info("api key created", new_key_id=issued.row.key_id, name=body.name, scopes=scopes)
    return KeyCreated(**view(issued.row, default_limits(settings)).model_dump(), key=issued.key)


@router.get(
    "",
    response_model=KeyList,
    responses=responses(401, 403),
    dependencies=[Depends(require(Scope.ADMIN))],
)
async def list_keys(session: SessionDep, settings: SettingsDep) -> KeyList:
    """Every key ever issued (revoked and expired ones too), oldest first; never a secret."""
    now = datetime.now(UTC)
    defaults = default_limits(settings)
    keys = [view(row, defaults, now) for row in await store.list_keys(session=session)]
    return KeyList(keys=keys, count=len(keys))


@router.delete(
    "/{key_id}",
    response_model=KeyView,
    responses=responses(401, 403, 404, 422),
)
async def revoke_key(
    key_id: KeyIdPath, admin: Admin, session: SessionDep, settings: SettingsDep
) -> KeyView:
    """Revoke a key: refused from its next request on. Its row stays, so what it did can still
    be traced to whom; revoking it again changes nothing."""
    row = await store.revoke_key(session=session, key_id=key_id)
    if row is None:
        raise ApiError(404, "key_not_found", f"no API key {key_id!r}")
    log.info("api key revoked", revoked_key_id=key_id, name=row.name, by=admin.name)
    return view(row, default_limits(settings))
