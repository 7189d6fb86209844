"""Query functions (keyword-only), called from activities and API routes, never from workflows.

Writes are upserts on business keys (node id; task id; task id + node id), so a retried
activity or a re-registering node never creates a second row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, and_, case, func, literal, null, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.contracts import NodeProfile, RecordInput, RecordResult
from xpando.db import ledger
from xpando.db.models import Breaker, Contribution, ExpertOutcome, Knowledge, Node, Task


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything xpando stores is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def _upsert(
    session: AsyncSession,
    model: type[SQLModel],
    values: dict[str, Any] | list[dict[str, Any]],
    *,
    keys: Sequence[str],
    update: Sequence[str],
) -> None:
    """Insert or update one row, or many rows of the same shape (one executemany)."""
    if not values:
        return
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    columns = values[0] if isinstance(values, list) else values
    shape = (model.__name__, dialect, tuple(columns), tuple(keys), tuple(update))
    stmt = _UPSERTS.get(shape)
    if stmt is None:
        # Built once per shape and run with the values as parameters: building the
        # ``excluded`` columns of an upsert costs more than running it.
        table: Any = model.__table__  # type: ignore[attr-defined]
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        base = insert(table)
        if update:
            excluded = base.excluded
            stmt = base.on_conflict_do_update(
                index_elements=list(keys), set_={name: excluded[name] for name in update}
            )
        else:
            stmt = base.on_conflict_do_nothing(index_elements=list(keys))
        _UPSERTS[shape] = stmt
    await session.exec(stmt, params=values)


_UPSERTS: dict[tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], Any] = {}


# --- nodes ---------------------------------------------------------------------------------------


def node_columns(profile: NodeProfile, now: datetime) -> dict[str, Any]:
    """A node row's columns from its profile, active and stamped ``now`` (without wallet and
    key: the signed path takes both from the request's key)."""
    return {
        "node_id": profile.node_id,
        "region": profile.region,
        "provider": profile.provider,
        "model": profile.model,
        "task_queue": profile.task_queue,
        "capacity": profile.capacity,
        "domains": [d.model_dump() for d in profile.domains],
        "price_input_per_mtok": profile.price_input_per_mtok,
        "price_output_per_mtok": profile.price_output_per_mtok,
        "status": "active",
        "registered_at": now,
        "updated_at": now,
        "changed_at": now,
    }


async def upsert_node(
    *, session: AsyncSession, profile: NodeProfile, now: datetime
) -> tuple[bool, datetime]:
    """Register or update a node without a signature check; returns (created, registered_at).

    The network's registration path is ``xpando/routing/registry.py`` (signed requests); this
    direct write is for operators' tooling, tests and benchmarks."""
    existing = await session.get(Node, profile.node_id)
    values = {**node_columns(profile, now), "wallet": profile.wallet}
    await _upsert(
        session,
        Node,
        values,
        keys=["node_id"],
        update=[
            "region",
            "provider",
            "model",
            "task_queue",
            "capacity",
            "domains",
            "wallet",
            "price_input_per_mtok",
            "price_output_per_mtok",
            "status",
            "updated_at",
            "changed_at",
        ],
    )
    await session.commit()
    if existing is not None:
        return False, as_utc(existing.registered_at) or now
    return True, now


async def list_nodes(
    *,
    session: AsyncSession,
    regions: Sequence[str] = (),
    limit: int | None = None,
    status: str | None = None,
) -> list[Node]:
    """Nodes in id order; ``status``: only ``active`` or only ``deregistered`` ones."""
    stmt = select(Node).order_by(col(Node.node_id))
    if status == "active":
        stmt = stmt.where(or_(col(Node.status).is_(None), col(Node.status) == "active"))
    elif status is not None:
        stmt = stmt.where(col(Node.status) == status)
    if regions:
        stmt = stmt.where(col(Node.region).in_(list(regions)))
    if limit is not None:
        stmt = stmt.limit(limit)
    return list((await session.exec(stmt)).all())


async def get_node(*, session: AsyncSession, node_id: str) -> Node | None:
    return await session.get(Node, node_id)


# --- tasks ---------------------------------------------------------------------------------------


async def record_task(
    *, session: AsyncSession, record: RecordInput, now: datetime, commit: bool = True
) -> RecordResult:
    """Write a task and its contributions, once (a retried record changes nothing).

    Knowledge items are written by the domain's KnowledgeWorkflow, not here; a task answered
    from knowledge counts one more use of that item.
    """
    done = record.status.ended
    already = False
    if record.reused_knowledge_id:  # a use is counted once: was this record written before?
        previous = await session.get(Task, record.task_id)
        already = previous is not None and previous.status == record.status.value
    await _upsert(
        session,
        Task,
        {
            "task_id": record.task_id,
            "prompt": record.prompt,
            "domain": record.domain,
            "status": record.status.value,
            "answer": record.answer,
            "confidence": record.confidence,
            "error": record.error,
            "created_at": now,
            "completed_at": now if done else None,
            "owner": record.owner,
            "submitted_at": record.submitted_at,
            "key_id": record.key_id,  # written once: a row made at submit has it already
        },
        keys=["task_id"],
        # owner and submission time too: a task held in the database has a row from submit
        # (its key's budget hold, xpando/auth/spend.py) without them.
        update=[
            "domain",
            "status",
            "answer",
            "confidence",
            "error",
            "completed_at",
            "owner",
            "submitted_at",
        ],
    )
    await _upsert(
        session,
        Contribution,
        [
            {
                "task_id": record.task_id,
                "node_id": c.node_id,
                "region": c.region,
                "provider": c.provider,
                "model": c.model,
                "status": c.status.value,
                "answer": c.answer,
                "citations": [x.model_dump() for x in c.citations],
                "relevance": c.relevance,
                "quality": c.quality,
                "quality_reason": c.quality_reason,
                "latency_ms": c.latency_ms,
                "input_tokens": c.input_tokens,
                "output_tokens": c.output_tokens,
                "finish_reason": c.finish_reason,
                "error": c.error,
                "attempts": c.attempts,
                "cost_usd": c.cost_usd,
                "request_id": c.request_id,
                "error_type": c.error_type,
                "created_at": now,
            }
            for c in record.contributions
        ],
        keys=["task_id", "node_id"],
        update=[
            "status",
            "answer",
            "citations",
            "relevance",
            "quality",
            "quality_reason",
            "latency_ms",
            "input_tokens",
            "output_tokens",
            "finish_reason",
            "error",
            "attempts",
            "cost_usd",
            "request_id",
            "error_type",
        ],
    )
    if record.reused_knowledge_id:
        item = await session.get(Knowledge, record.reused_knowledge_id)
        if item is not None and not already:
            item.uses += 1
            session.add(item)
    await ledger.accrue(session=session, record=record, now=now)
    if commit:
        await session.commit()
    return RecordResult(
        task_id=record.task_id,
        contributions_written=len(record.contributions),
        knowledge_id=record.reused_knowledge_id,
    )


async def get_task(
    *, session: AsyncSession, task_id: str
) -> tuple[Task, list[Contribution]] | None:
    task = await session.get(Task, task_id)
    if task is None:
        return None
    rows = await session.exec(
        select(Contribution)
        .where(Contribution.task_id == task_id)
        .order_by(col(Contribution.node_id))
    )
    return task, list(rows.all())


async def list_tasks(
    *,
    session: AsyncSession,
    limit: int,
    before: tuple[datetime, str] | None = None,
    since: datetime | None = None,
    statuses: Sequence[str] | None = None,
    domain: str | None = None,
    node: str | None = None,
    owner: str | None = None,
) -> list[Task]:
    """Recorded tasks, newest first by (submitted_at, task_id), strictly after the keyset
    ``before`` (the last row of the previous page): rows recorded meanwhile never shift a page.
    ``statuses`` None: any; ``domain`` "general" also matches tasks recorded without one;
    ``node``: tasks it contributed to. Rows without a submission time are not listed."""
    submitted = col(Task.submitted_at)
    stmt = select(Task).where(submitted.is_not(None))
    if before is not None:
        at, task_id = before
        stmt = stmt.where(or_(submitted < at, and_(submitted == at, col(Task.task_id) < task_id)))
    if since is not None:
        stmt = stmt.where(submitted >= since)
    if statuses is not None:
        stmt = stmt.where(col(Task.status).in_(list(statuses)))
    if domain is not None:
        named = col(Task.domain) == domain
        stmt = stmt.where(or_(named, col(Task.domain).is_(None)) if domain == "general" else named)
    if node is not None:
        stmt = stmt.where(
            select(Contribution.id)
            .where(Contribution.task_id == Task.task_id, Contribution.node_id == node)
            .exists()
        )
    if owner is not None:
        stmt = stmt.where(col(Task.owner) == owner)
    stmt = stmt.order_by(submitted.desc(), col(Task.task_id).desc()).limit(limit)
    return list((await session.exec(stmt)).all())


async def recorded_tasks(*, session: AsyncSession, task_ids: Sequence[str]) -> dict[str, Task]:
    """The recorded rows of these tasks (those that have one), by task id. A ``queued`` row is
    the admission's (``xpando/auth/spend.py``, written at submit): not a record."""
    if not task_ids:
        return {}
    rows = await session.exec(
        select(Task).where(col(Task.task_id).in_(list(task_ids)), col(Task.status) != "queued")
    )
    return {t.task_id: t for t in rows.all()}


async def task_nodes(*, session: AsyncSession, task_ids: Sequence[str]) -> dict[str, list[str]]:
    """The nodes that contributed to each of these tasks, in node id order."""
    if not task_ids:
        return {}
    rows = await session.exec(
        select(Contribution.task_id, Contribution.node_id)
        .where(col(Contribution.task_id).in_(list(task_ids)))
        .order_by(col(Contribution.task_id), col(Contribution.node_id))
    )
    nodes: dict[str, list[str]] = {}
    for task_id, node_id in rows.all():
        nodes.setdefault(task_id, []).append(node_id)
    return nodes


async def count_contributions(*, session: AsyncSession, task_id: str) -> int:
    result = await session.exec(
        select(func.count()).select_from(Contribution).where(Contribution.task_id == task_id)
    )
    return int(result.one())


# --- knowledge -----------------------------------------------------------------------------------


async def get_knowledge(*, session: AsyncSession, knowledge_id: str) -> Knowledge | None:
    return await session.get(Knowledge, knowledge_id)


async def knowledge_changed_since(
    *,
    session: AsyncSession,
    since: datetime | None,
    after_id: str = "",
    limit: int = 5000,
) -> list[Knowledge]:
    """Items written after (``since``, ``after_id``) in (updated_at, knowledge_id) order: keyset
    pagination for incremental index refreshes (many items can share one timestamp)."""
    stmt = select(Knowledge).order_by(col(Knowledge.updated_at), col(Knowledge.knowledge_id))
    if since is not None:
        stmt = stmt.where(
            or_(
                col(Knowledge.updated_at) > since,
                and_(col(Knowledge.updated_at) == since, col(Knowledge.knowledge_id) > after_id),
            )
        )
    return list((await session.exec(stmt.limit(limit))).all())


async def count_knowledge(
    *, session: AsyncSession, domain: str | None, status: str = "active"
) -> int:
    stmt = select(func.count()).select_from(Knowledge).where(Knowledge.status == status)
    if domain is not None:
        stmt = stmt.where(Knowledge.domain == domain)
    return int((await session.exec(stmt)).one())


async def active_knowledge_page(
    *, session: AsyncSession, domain: str, after: str | None, limit: int = 2000
) -> list[Knowledge]:
    """Active items of a domain in knowledge-id order (keyset pagination)."""
    stmt = select(Knowledge).where(Knowledge.domain == domain, Knowledge.status == "active")
    if after is not None:
        stmt = stmt.where(col(Knowledge.knowledge_id) > after)
    stmt = stmt.order_by(col(Knowledge.knowledge_id)).limit(limit)
    return list((await session.exec(stmt)).all())


# --- circuit breakers ----------------------------------------------------------------------------
# The policy is in xpando/breakers.py; these are its atomic writes. Each statement is one
# UPDATE whose CASE expressions decide the transition, so concurrent reports from several core
# workers never lose a count, on SQLite and PostgreSQL alike.


def _at(value: datetime) -> Any:
    return literal(value, DateTime(timezone=True))


async def get_breakers(*, session: AsyncSession, keys: Sequence[str]) -> dict[str, Breaker]:
    if not keys:
        return {}
    rows = await session.exec(select(Breaker).where(col(Breaker.key).in_(list(keys))))
    return {b.key: b for b in rows.all()}


async def open_breakers(*, session: AsyncSession) -> dict[str, Breaker]:
    """Breakers that are open or half-open (the only ones routing has to look at)."""
    rows = await session.exec(select(Breaker).where(Breaker.state == "open"))
    return {b.key: b for b in rows.all()}


async def record_expert_outcome(
    *,
    session: AsyncSession,
    event_id: str,
    task_id: str,
    node_id: str,
    provider: str,
    region: str,
    ok: bool,
    error_type: str | None,
    error: str | None,
    effects: Sequence[tuple[str, str, int]],
    healthy: Sequence[str],
    cooldown_s: float,
    now: datetime,
) -> bool:
    """Log one ask's outcome and apply it to breakers, once per ``event_id``.

    ``effects`` are the breakers the outcome counts against as (key, scope, threshold): each
    gets one more consecutive failure and opens at ``threshold`` (a failure while half-open
    re-opens it for another cool-down). ``healthy`` are the breakers it closes (a success).
    Returns False when ``event_id`` was already recorded (a retried report changes nothing).
    """
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    logged = await session.exec(
        insert(ExpertOutcome.__table__)  # type: ignore[attr-defined]
        .values(
            event_id=event_id,
            task_id=task_id,
            node_id=node_id,
            provider=provider,
            region=region,
            ok=ok,
            error_type=error_type,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["event_id"])
    )
    if logged.rowcount == 0:
        await session.commit()
        return False
    table: Any = Breaker.__table__  # type: ignore[attr-defined]
    c = table.c
    for key, scope, _ in effects:
        await session.exec(
            insert(table)
            .values(key=key, scope=scope, state="closed", consecutive_failures=0, updated_at=now)
            .on_conflict_do_nothing(index_elements=["key"])
        )
    until = now + timedelta(seconds=cooldown_s)
    for key, _, threshold in effects:
        half_open = and_(c.state == "open", c.open_until <= _at(now))
        opening = and_(c.state == "closed", c.consecutive_failures + 1 >= threshold)
        trip = or_(opening, half_open)
        await session.exec(
            update(table)
            .where(c.key == key)
            .values(
                consecutive_failures=c.consecutive_failures + 1,
                state=case((trip, "open"), else_=c.state),
                opened_at=case((trip, _at(now)), else_=c.opened_at),
                open_until=case((trip, _at(until)), else_=c.open_until),
                probe_until=case((trip, null()), else_=c.probe_until),
                probe_task=case((trip, null()), else_=c.probe_task),
                last_error=(error or error_type or "failed")[:2000],
                updated_at=now,
            )
        )
    await _close_breakers(session, healthy, now)
    await session.commit()
    return True


async def _close_breakers(session: AsyncSession, keys: Sequence[str], now: datetime) -> bool:
    """A success: close these breakers and clear their failure counts. Only rows with something
    to clear are written; returns whether any was."""
    if not keys:
        return False
    c = Breaker.__table__.c  # type: ignore[attr-defined]
    closed = await session.exec(
        update(Breaker.__table__)  # type: ignore[attr-defined]
        .where(col(c.key).in_(list(keys)), or_(c.state != "closed", c.consecutive_failures > 0))
        .values(
            consecutive_failures=0,
            state="closed",
            open_until=None,
            probe_until=None,
            probe_task=None,
            updated_at=now,
        )
    )
    return bool(closed.rowcount)


async def record_expert_successes(
    *,
    session: AsyncSession,
    outcomes: Sequence[dict[str, Any]],
    healthy: Sequence[str],
    now: datetime,
    commit: bool = True,
) -> tuple[list[str], bool]:
    """Log asks that ended well and close the breakers they vouch for, in two statements
    whatever their number: the outcome rows are inserted at once (``ON CONFLICT DO NOTHING …
    RETURNING`` names the new ones: a retried record counts nothing twice), then one UPDATE
    closes ``healthy`` (the node and provider breakers they vouch for; a record's outcomes are
    written together, so a retry has none new and closes nothing). Returns the event ids logged
    now and whether any breaker changed. Commits unless told not to."""
    if not outcomes:
        return [], False
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    stmt = _SUCCESSES.get(dialect)
    if stmt is None:  # built once: an executemany of it compiles nothing per task
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        table: Any = ExpertOutcome.__table__  # type: ignore[attr-defined]
        stmt = _SUCCESSES[dialect] = (
            insert(table)
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(table.c.event_id)
        )
    rows = [{**o, "ok": True, "created_at": now} for o in outcomes]
    inserted = await session.exec(stmt, params=rows)
    new = [row[0] for row in inserted.all()]
    changed = await _close_breakers(session, healthy, now) if new else False
    if commit:
        await session.commit()
    return new, changed


_SUCCESSES: dict[str, Any] = {}


async def claim_probe(
    *, session: AsyncSession, key: str, task_id: str, now: datetime, lease_s: float
) -> bool:
    """Take the one probe of a half-open breaker for ``task_id`` (atomic: of all the routers
    that try at once, exactly one gets it). A lease that ran out (its task never reported) can
    be taken again; the same task may re-claim its own (a retried route)."""
    c = Breaker.__table__.c  # type: ignore[attr-defined]
    result = await session.exec(
        update(Breaker.__table__)  # type: ignore[attr-defined]
        .where(
            c.key == key,
            c.state == "open",
            c.open_until <= _at(now),
            or_(c.probe_until.is_(None), c.probe_until <= _at(now), c.probe_task == task_id),
        )
        .values(probe_until=now + timedelta(seconds=lease_s), probe_task=task_id, updated_at=now)
    )
    await session.commit()
    return bool(result.rowcount == 1)


async def release_probe(*, session: AsyncSession, key: str, task_id: str) -> None:
    """Give back a probe this task claimed but will not use."""
    c = Breaker.__table__.c  # type: ignore[attr-defined]
    await session.exec(
        update(Breaker.__table__)  # type: ignore[attr-defined]
        .where(c.key == key, c.probe_task == task_id)
        .values(probe_until=None, probe_task=None)
    )
    await session.commit()
