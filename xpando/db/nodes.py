"""Node identity, routing and reputation queries (keyword-only; activities and API routes).

Every write is guarded so that a retried or concurrent call cannot apply it twice:

* a signed request inserts its (public key, nonce) first: a conflict is a replay;
* the first signed request binds a node id to its key (``INSERT … ON CONFLICT DO UPDATE … WHERE
  nodes.public_key IS NULL OR nodes.public_key = excluded.public_key``, one statement, so two
  keys racing for one id cannot both win);
* a reputation update inserts (task id, node id) into ``reputation_events`` first and moves the
  reputation only when that insert happened, in one UPDATE (no lost updates between core
  workers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Float,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    or_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.contracts import ContributionStatus, NodeAction, RecordInput, SignedNodeRequest
from xpando.db.models import Breaker, DomainVector, Node, NodeNonce, ReputationEvent
from xpando.db.queries import as_utc, node_columns

ACTIVE, DEREGISTERED = "active", "deregistered"


def _insert(session: AsyncSession) -> Any:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


class NonceReused(Exception):
    """The (key, nonce) pair was used before; ``same_request``: by this very request (a retry)."""

    def __init__(self, *, same_request: bool) -> None:
        super().__init__("nonce reused")
        self.same_request = same_request


class KeyMismatch(Exception):
    """The node id is bound to another public key."""

    def __init__(self, bound_key: str | None) -> None:
        super().__init__(f"node is bound to {bound_key}")
        self.bound_key = bound_key


class NodeNotFound(Exception):
    pass


@dataclass(frozen=True)
class Applied:
    node_id: str
    created: bool
    registered_at: datetime


async def apply_signed_request(
    *,
    session: AsyncSession,
    request: SignedNodeRequest,
    digest: str,
    nonce_expires_at: datetime,
    now: datetime,
) -> Applied:
    """Apply an already verified request in one transaction: consume its nonce, then register,
    update or deregister the node under its key. Raises :class:`NonceReused`,
    :class:`KeyMismatch` or :class:`NodeNotFound` (and writes nothing)."""
    insert = _insert(session)
    nonce_table: Any = NodeNonce.__table__  # type: ignore[attr-defined]
    consumed = await session.exec(
        insert(nonce_table)
        .values(
            public_key=request.public_key,
            nonce=request.nonce,
            digest=digest,
            node_id=request.node_id,
            expires_at=nonce_expires_at,
        )
        .on_conflict_do_nothing(index_elements=["public_key", "nonce"])
    )
    if consumed.rowcount == 0:
        seen = (
            await session.exec(
                select(NodeNonce.digest).where(
                    NodeNonce.public_key == request.public_key, NodeNonce.nonce == request.nonce
                )
            )
        ).first()
        await session.rollback()
        raise NonceReused(same_request=seen == digest)
    table: Any = Node.__table__  # type: ignore[attr-defined]
    c = table.c
    bound = or_(c.public_key.is_(None), c.public_key == request.public_key)
    if request.action == NodeAction.DEREGISTER:
        row = (
            await session.exec(
                update(table)
                .where(c.node_id == request.node_id, bound)
                .values(
                    status=DEREGISTERED,
                    deregistered_at=now,
                    public_key=request.public_key,
                    updated_at=now,
                    changed_at=now,
                )
                .returning(c.registered_at)
            )
        ).first()
        if row is None:
            await _refuse(session, request.node_id)
        await session.commit()
        assert row is not None
        return Applied(request.node_id, False, as_utc(row[0]) or now)

    profile = request.profile
    assert profile is not None  # verify_request refuses a register request without one
    values = {
        **node_columns(profile, now),
        "status": ACTIVE,
        "wallet": request.public_key,
        "public_key": request.public_key,
        "deregistered_at": None,
    }
    row = (await session.exec(_register_statement(session), params=values)).first()
    if row is None:  # the row exists under another key: the update's WHERE refused it
        await _refuse(session, request.node_id)
    await session.commit()
    assert row is not None
    registered_at = as_utc(row[0]) or now
    # An insert keeps this request's registered_at; an update keeps the first registration's.
    return Applied(request.node_id, registered_at == as_utc(now), registered_at)


_REGISTER_COLUMNS = (
    "node_id",
    "region",
    "provider",
    "model",
    "task_queue",
    "capacity",
    "domains",
    "wallet",
    "public_key",
    "status",
    "deregistered_at",
    "price_input_per_mtok",
    "price_output_per_mtok",
    "registered_at",
    "updated_at",
    "changed_at",
)
_STATEMENTS: dict[tuple[str, str], Any] = {}


def _register_statement(session: AsyncSession) -> Any:
    """The node upsert under its key, built once per dialect (building the ``excluded``
    columns costs more than running it): insert, or update unless bound to another key."""
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    stmt = _STATEMENTS.get(("register", dialect))
    if stmt is None:
        table: Any = Node.__table__  # type: ignore[attr-defined]
        base = _insert(session)(table)
        excluded = base.excluded
        stmt = base.on_conflict_do_update(
            index_elements=["node_id"],
            set_={
                k: excluded[k] for k in _REGISTER_COLUMNS if k not in ("node_id", "registered_at")
            },
            where=or_(table.c.public_key.is_(None), table.c.public_key == excluded.public_key),
        ).returning(table.c.registered_at)
        _STATEMENTS[("register", dialect)] = stmt
    return stmt


async def _refuse(session: AsyncSession, node_id: str) -> None:
    """Roll back and raise why the node's row was not written (unknown id, or another key)."""
    await session.rollback()
    existing = await session.get(Node, node_id)
    if existing is None:
        raise NodeNotFound(node_id)
    raise KeyMismatch(existing.public_key)


async def purge_nonces(*, session: AsyncSession, now: datetime) -> int:
    """Forget nonces whose requests would be refused as stale anyway."""
    result = await session.exec(delete(NodeNonce).where(col(NodeNonce.expires_at) < now))
    await session.commit()
    return int(result.rowcount or 0)


# --- domain embeddings ---------------------------------------------------------------------------


async def domain_vectors(*, session: AsyncSession, keys: Sequence[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    unique = sorted(set(keys))
    for start in range(0, len(unique), 500):
        rows = await session.exec(
            select(DomainVector).where(col(DomainVector.key).in_(unique[start : start + 500]))
        )
        out.update({r.key: r.vector for r in rows.all()})
    return out


async def store_domain_vectors(
    *, session: AsyncSession, embedder: str, vectors: dict[str, bytes], now: datetime
) -> None:
    if not vectors:
        return
    table: Any = DomainVector.__table__  # type: ignore[attr-defined]
    rows = [
        {"key": k, "embedder": embedder, "vector": v, "created_at": now} for k, v in vectors.items()
    ]
    await session.exec(
        _insert(session)(table).values(rows).on_conflict_do_nothing(index_elements=["key"])
    )
    await session.commit()


# --- the routing index's incremental refresh -----------------------------------------------------


async def nodes_page(*, session: AsyncSession, after_id: str = "", limit: int = 5000) -> list[Node]:
    """All nodes in node-id order, a page at a time (the routing index's first load)."""
    stmt = select(Node).where(col(Node.node_id) > after_id).order_by(col(Node.node_id))
    return list((await session.exec(stmt.limit(limit))).all())


async def nodes_changed_since(
    *, session: AsyncSession, since: datetime, after_id: str = "", limit: int = 5000
) -> list[Node]:
    """Nodes changed after (``since``, ``after_id``) in (changed_at, node_id) order (keyset
    pagination: many nodes can share one timestamp)."""
    stmt = (
        select(Node)
        .where(
            or_(
                col(Node.changed_at) > since,
                and_(col(Node.changed_at) == since, col(Node.node_id) > after_id),
            )
        )
        .order_by(col(Node.changed_at), col(Node.node_id))
    )
    return list((await session.exec(stmt.limit(limit))).all())


# --- reputation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReputationParams:
    """r ← r + a·(q - r), a = max(alpha, 1 / (n + 2)); r starts at ``prior`` (n = 0)."""

    prior: float = 0.5
    alpha: float = 0.1


REPUTATION_COUNTS = (ContributionStatus.OK, ContributionStatus.NO_ANSWER)


async def apply_reputation(
    *,
    session: AsyncSession,
    record: RecordInput,
    params: ReputationParams,
    now: datetime,
    commit: bool = True,
) -> list[str]:
    """Move each answering node's reputation toward its contribution's quality, once per task +
    node. Failed asks (outages, cancelled stragglers, hedges that lost) leave it alone: those are
    health, which the circuit breakers track. Returns the node ids updated now.

    Two statements whatever the number of contributions: the events are inserted at once
    (``ON CONFLICT DO NOTHING … RETURNING`` names the ones that are new), then one UPDATE runs
    for each new one (an executemany)."""
    counted = _counted(record.contributions)
    if not counted:
        return []
    events, moves = _reputation_statements(session, params)
    rows = [
        {
            "task_id": record.task_id,
            "node_id": c.node_id,
            "quality": max(0.0, min(1.0, c.quality)),
            "created_at": now,
        }
        for c in counted
    ]
    inserted = await session.exec(events, params=rows)  # compiled once, executemany
    new = {row[0] for row in inserted.all()}
    updated = [r["node_id"] for r in rows if r["node_id"] in new]
    if updated:
        await session.exec(
            moves,
            params=[
                {"node": r["node_id"], "quality": r["quality"], "now": now}
                for r in rows
                if r["node_id"] in new
            ],
        )
    if commit:
        await session.commit()
    return updated


def _reputation_statements(session: AsyncSession, params: ReputationParams) -> tuple[Any, Any]:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    key = (f"reputation:{params.prior}:{params.alpha}", dialect)
    cached = _STATEMENTS.get(key)
    if cached is None:
        table: Any = Node.__table__  # type: ignore[attr-defined]
        c = table.c
        n = func.coalesce(c.reputation_n, 0)
        r = func.coalesce(c.reputation, params.prior)
        step = cast(literal(1.0), Float) / cast(n + 2, Float)
        alpha = case((step > params.alpha, step), else_=literal(params.alpha, Float))
        events: Any = ReputationEvent.__table__  # type: ignore[attr-defined]
        insert_events = (
            _insert(session)(events)
            .on_conflict_do_nothing(index_elements=["task_id", "node_id"])
            .returning(events.c.node_id)
        )
        move = (
            update(table)
            .where(c.node_id == bindparam("node"))
            .values(
                reputation=r + alpha * (bindparam("quality", type_=Float) - r),
                reputation_n=n + 1,
                changed_at=bindparam("now", type_=DateTime(timezone=True)),
            )
        )
        cached = _STATEMENTS[key] = (insert_events, move)
    return cached


def _counted(contributions: Iterable[Any]) -> list[Any]:
    seen: set[str] = set()
    out = []
    for c in contributions:
        if c.status in REPUTATION_COUNTS and c.node_id not in seen:
            seen.add(c.node_id)
            out.append(c)
    return out


async def troubled_breakers(*, session: AsyncSession) -> dict[str, Breaker]:
    """Breakers that are open, or closed with failures counted: the ones routing looks at
    (skipped when open; a lower health while failures are counted)."""
    rows = await session.exec(
        select(Breaker).where(
            or_(col(Breaker.state) == "open", col(Breaker.consecutive_failures) > 0)
        )
    )
    return {b.key: b for b in rows.all()}
