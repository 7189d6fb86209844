"""Routing's learned state (keyword-only queries; the record step writes, routing indexes read).

* ``routing_topics``: topic regions, each the prompt vector of the task that opened it; insert
  only (a retried record inserts nothing twice: the id derives from the task id).
* ``node_topics``: per node and topic, the count and quality sum of its scored contributions,
  moved by one atomic ``n = n + 1, quality_sum = quality_sum + q`` upsert per contribution, in the
  record's transaction and only for the contributions whose reputation event is new, so a
  retried record counts nothing twice and concurrent core workers lose no update.

Both tables are read incrementally by time (``created_at`` / ``updated_at``) with keyset paging,
like the node rows, so every core worker holds the same state and a restarted one rebuilds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.db.models import NodeTopic, Topic


def _insert(session: AsyncSession) -> Any:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


async def add_topic(
    *, session: AsyncSession, topic_id: str, embedder: str, vector: bytes, now: datetime
) -> None:
    """Insert a topic region (nothing when it exists: a retried record)."""
    table: Any = Topic.__table__  # type: ignore[attr-defined]
    await session.exec(
        _insert(session)(table)
        .values(topic_id=topic_id, embedder=embedder, vector=vector, created_at=now)
        .on_conflict_do_nothing(index_elements=["topic_id"])
    )


async def credit_topic(
    *,
    session: AsyncSession,
    topic_id: str,
    qualities: Sequence[tuple[str, float]],
    now: datetime,
) -> None:
    """Add one scored contribution per (node id, quality) to the node's stats in ``topic_id``
    (one executemany of an atomic increment)."""
    if not qualities:
        return
    table: Any = NodeTopic.__table__  # type: ignore[attr-defined]
    base = _insert(session)(table)
    stmt = base.on_conflict_do_update(
        index_elements=["node_id", "topic_id"],
        set_={
            "n": table.c.n + 1.0,
            "quality_sum": table.c.quality_sum + base.excluded.quality_sum,
            "updated_at": base.excluded.updated_at,
        },
    )
    await session.exec(
        stmt,
        params=[
            {
                "node_id": node_id,
                "topic_id": topic_id,
                "n": 1.0,
                "quality_sum": q,
                "updated_at": now,
            }
            for node_id, q in qualities
        ],
    )


async def topics_since(
    *, session: AsyncSession, since: datetime | None, after_id: str = "", limit: int = 5000
) -> list[Topic]:
    """Topics created after (``since``, ``after_id``) in (created_at, topic_id) order."""
    stmt = select(Topic).order_by(col(Topic.created_at), col(Topic.topic_id))
    if since is not None:
        stmt = stmt.where(
            or_(
                col(Topic.created_at) > since,
                and_(col(Topic.created_at) == since, col(Topic.topic_id) > after_id),
            )
        )
    return list((await session.exec(stmt.limit(limit))).all())


async def node_topics_since(
    *,
    session: AsyncSession,
    since: datetime | None,
    after: tuple[str, str] = ("", ""),
    limit: int = 5000,
) -> list[tuple[str, str, float, float, datetime]]:
    """Node-topic stats changed after (``since``, ``after``) in (updated_at, node_id, topic_id)
    order (keyset paging: many rows share one timestamp), as plain (node_id, topic_id, n,
    quality_sum, updated_at) tuples: a refresh may read many, and ORM objects cost several times
    more to build on the event loop."""
    at = col(NodeTopic.updated_at)
    node, topic = col(NodeTopic.node_id), col(NodeTopic.topic_id)
    columns: list[Any] = [node, topic, col(NodeTopic.n), col(NodeTopic.quality_sum), at]
    stmt = select(*columns).order_by(at, node, topic)
    if since is not None:
        stmt = stmt.where(
            or_(
                at > since,
                and_(
                    at == since,
                    or_(node > after[0], and_(node == after[0], topic > after[1])),
                ),
            )
        )
    rows = (await session.exec(stmt.limit(limit))).all()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
