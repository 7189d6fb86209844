"""Query functions (keyword-only), called from activities and API routes, never from workflows.

Writes are upserts on business keys (node id; task id; task id + node id), so a retried
activity or a re-registering node never creates a second row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.contracts import NodeProfile, RecordInput, RecordResult, TaskStage
from xpando.db import ledger
from xpando.db.models import Contribution, Knowledge, Node, Task


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything xpando stores is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def _upsert(
    session: AsyncSession,
    model: type[SQLModel],
    values: dict[str, Any],
    *,
    keys: Sequence[str],
    update: Sequence[str],
) -> None:
    table: Any = model.__table__  # type: ignore[attr-defined]
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table).values(**values)
    if update:
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys), set_={name: stmt.excluded[name] for name in update}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    await session.exec(stmt)


# --- nodes ---------------------------------------------------------------------------------------


async def upsert_node(
    *, session: AsyncSession, profile: NodeProfile, now: datetime
) -> tuple[bool, datetime]:
    """Register or update a node; returns (created, registered_at)."""
    existing = await session.get(Node, profile.node_id)
    values = {
        "node_id": profile.node_id,
        "region": profile.region,
        "provider": profile.provider,
        "model": profile.model,
        "task_queue": profile.task_queue,
        "capacity": profile.capacity,
        "domains": [d.model_dump() for d in profile.domains],
        "wallet": profile.wallet,
        "registered_at": now,
        "updated_at": now,
    }
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
            "updated_at",
        ],
    )
    await session.commit()
    if existing is not None:
        return False, as_utc(existing.registered_at) or now
    return True, now


async def list_nodes(
    *, session: AsyncSession, regions: Sequence[str] = (), limit: int | None = None
) -> list[Node]:
    stmt = select(Node).order_by(col(Node.node_id))
    if regions:
        stmt = stmt.where(col(Node.region).in_(list(regions)))
    if limit is not None:
        stmt = stmt.limit(limit)
    return list((await session.exec(stmt)).all())


async def get_node(*, session: AsyncSession, node_id: str) -> Node | None:
    return await session.get(Node, node_id)


# --- tasks ---------------------------------------------------------------------------------------


async def record_task(*, session: AsyncSession, record: RecordInput, now: datetime) -> RecordResult:
    """Write a task, its contributions and (when it completed) its knowledge item, once."""
    done = record.status in (TaskStage.COMPLETED, TaskStage.FAILED)
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
        },
        keys=["task_id"],
        update=["domain", "status", "answer", "confidence", "error", "completed_at"],
    )
    for c in record.contributions:
        await _upsert(
            session,
            Contribution,
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
                "latency_ms": c.latency_ms,
                "input_tokens": c.input_tokens,
                "output_tokens": c.output_tokens,
                "finish_reason": c.finish_reason,
                "error": c.error,
                "attempts": c.attempts,
                "created_at": now,
            },
            keys=["task_id", "node_id"],
            update=[
                "status",
                "answer",
                "citations",
                "relevance",
                "quality",
                "latency_ms",
                "input_tokens",
                "output_tokens",
                "finish_reason",
                "error",
                "attempts",
            ],
        )
    knowledge_id: str | None = None
    if record.status == TaskStage.COMPLETED and record.answer:
        knowledge_id = f"kn-{record.task_id}"
        await _upsert(
            session,
            Knowledge,
            {
                "knowledge_id": knowledge_id,
                "task_id": record.task_id,
                "question": record.prompt,
                "answer": record.answer,
                "domain": record.domain,
                "confidence": record.confidence,
                "nodes": sorted(c.node_id for c in record.contributions if c.status.value == "ok"),
                "created_at": now,
                "updated_at": now,
            },
            keys=["knowledge_id"],
            update=["answer", "confidence", "nodes", "updated_at"],
        )
    await ledger.accrue(session=session, record=record, now=now)
    await session.commit()
    return RecordResult(
        task_id=record.task_id,
        contributions_written=len(record.contributions),
        knowledge_id=knowledge_id,
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


async def count_contributions(*, session: AsyncSession, task_id: str) -> int:
    result = await session.exec(
        select(func.count()).select_from(Contribution).where(Contribution.task_id == task_id)
    )
    return int(result.one())


async def recent_knowledge(
    *, session: AsyncSession, domain: str | None, limit: int = 500
) -> list[Knowledge]:
    """The newest knowledge items (of a domain when given), for lexical matching in the core."""
    stmt = select(Knowledge).order_by(col(Knowledge.created_at).desc()).limit(limit)
    if domain:
        stmt = stmt.where(Knowledge.domain == domain)
    return list((await session.exec(stmt)).all())
