"""The database side of a key's running tasks and provider spend (keyword-only functions, called
by the API's limiter, ``xpando/auth/limits.py``, and by the record step).

A task submitted with a key gets its ``tasks`` row at submit, before its workflow starts: the
key's id and ``hold_usd``, the task's worst-case cost. While the hold is there the task counts as
running for the key, and its worst case counts against the key's daily budget. The record step
(``charge_task``, in the transaction that writes the contributions) sets ``charged_usd`` to the
sum of the task's recorded contributions' ``cost_usd``, adds what it had not charged yet to the
key's spend of the day (``key_spend``) and lifts the hold: a retried record charges nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.contracts import TaskStage
from xpando.db.models import ApiKey, Contribution, KeySpend, Node, Task

QUEUED = TaskStage.QUEUED.value


def day_of(when: datetime) -> str:
    """The UTC day a charge counts on (``YYYY-MM-DD``)."""
    return when.astimezone(UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class KeyLoad:
    """A key's tasks still running (each holding its worst case) and its spend today."""

    running: int
    held_usd: float
    spent_usd: float


def _insert(session: AsyncSession) -> Any:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


async def hold_task(
    *,
    session: AsyncSession,
    key_id: str,
    task_id: str,
    prompt: str,
    domain: str | None,
    hold_usd: float,
    now: datetime,
) -> KeyLoad | None:
    """Write the task's row with its key and hold, and return the key's load with it; ``None``
    when the task has a row already (the same task submitted again: no second hold).

    The caller commits to admit the task or rolls back to refuse it. The first statement writes
    the key's row (``last_task_at``): it takes the key's row lock on PostgreSQL and the write
    lock on SQLite, so two admissions of one key never both count without the other."""
    await session.exec(
        update(ApiKey.__table__)  # type: ignore[attr-defined]
        .where(ApiKey.__table__.c.key_id == key_id)  # type: ignore[attr-defined]
        .values(last_task_at=now)
    )
    table: Any = Task.__table__  # type: ignore[attr-defined]
    inserted = await session.exec(
        _insert(session)(table)
        .values(
            task_id=task_id,
            prompt=prompt,
            domain=domain,
            status=QUEUED,
            answer="",
            confidence=0.0,
            created_at=now,
            key_id=key_id,
            hold_usd=hold_usd,
        )
        .on_conflict_do_nothing(index_elements=["task_id"])
        .returning(table.c.task_id)
    )
    if inserted.first() is None:
        return None
    return await key_load(session=session, key_id=key_id, now=now)


async def key_load(*, session: AsyncSession, key_id: str, now: datetime) -> KeyLoad:
    spent = (
        select(KeySpend.spent_usd)
        .where(KeySpend.key_id == key_id, KeySpend.day == day_of(now))
        .scalar_subquery()
    )
    row = (
        await session.exec(
            select(
                func.count(),
                func.coalesce(func.sum(Task.hold_usd), 0.0),
                func.coalesce(spent, 0.0),
            ).where(Task.key_id == key_id, col(Task.hold_usd).is_not(None))
        )
    ).one()
    return KeyLoad(running=int(row[0]), held_usd=float(row[1] or 0), spent_usd=float(row[2] or 0))


async def held_tasks(*, session: AsyncSession, key_id: str, created_before: datetime) -> list[str]:
    """The key's tasks holding part of its budget, submitted before ``created_before``."""
    rows = await session.exec(
        select(Task.task_id).where(
            Task.key_id == key_id,
            col(Task.hold_usd).is_not(None),
            col(Task.created_at) < created_before,
        )
    )
    return list(rows.all())


async def release_holds(*, session: AsyncSession, ended: Mapping[str, str | None]) -> None:
    """Lift the holds of tasks whose workflow ended without being recorded (terminated, timed
    out): their row keeps the workflow's final status. A task Temporal does not know (``None``:
    its workflow never started) loses its row. Commits."""
    for task_id, status in ended.items():
        if status is None:
            await session.exec(
                delete(Task.__table__).where(  # type: ignore[attr-defined]
                    Task.__table__.c.task_id == task_id,  # type: ignore[attr-defined]
                    Task.__table__.c.status == QUEUED,  # type: ignore[attr-defined]
                    Task.__table__.c.hold_usd.is_not(None),  # type: ignore[attr-defined]
                )
            )
            continue
        c = Task.__table__.c  # type: ignore[attr-defined]
        await session.exec(
            update(Task.__table__)  # type: ignore[attr-defined]
            .where(c.task_id == task_id, c.hold_usd.is_not(None))
            .values(
                hold_usd=None,
                status=func.coalesce(func.nullif(c.status, QUEUED), status),
            )
        )
    await session.commit()


async def charge_task(*, session: AsyncSession, task_id: str, now: datetime) -> float | None:
    """Charge the task's key what the task's recorded contributions cost, once: sets
    ``charged_usd`` to their sum, adds what was not charged before to the key's spend of the
    day, and lifts the hold. Returns the amount added now (``None``: no key submitted the task).
    Runs in the caller's transaction, after the contributions are written; does not commit."""
    task = (
        await session.exec(select(Task.key_id, Task.charged_usd).where(Task.task_id == task_id))
    ).first()
    if task is None or task[0] is None:
        return None
    key_id, charged = task[0], task[1]
    total = (
        await session.exec(
            select(func.coalesce(func.sum(Contribution.cost_usd), 0.0)).where(
                Contribution.task_id == task_id
            )
        )
    ).one() or 0.0
    added = round(total - (charged or 0.0), 10)
    c = Task.__table__.c  # type: ignore[attr-defined]
    await session.exec(
        update(Task.__table__)  # type: ignore[attr-defined]
        .where(c.task_id == task_id)
        .values(charged_usd=total, hold_usd=None)
    )
    if added or charged is None:
        table: Any = KeySpend.__table__  # type: ignore[attr-defined]
        stmt = _insert(session)(table).values(
            key_id=key_id,
            day=day_of(now),
            spent_usd=added,
            tasks=1 if charged is None else 0,
            updated_at=now,
        )
        await session.exec(
            stmt.on_conflict_do_update(
                index_elements=["key_id", "day"],
                set_={
                    "spent_usd": table.c.spent_usd + stmt.excluded.spent_usd,
                    "tasks": table.c.tasks + stmt.excluded.tasks,
                    "updated_at": stmt.excluded.updated_at,
                },
            )
        )
    return added


async def spent_on(*, session: AsyncSession, key_id: str, day: str) -> KeySpend | None:
    return await session.get(KeySpend, (key_id, day))


async def price_levels(*, session: AsyncSession) -> Sequence[tuple[str, float, float, int]]:
    """Every (region, input price, output price) of the registered nodes, with how many nodes
    have it: a few rows however many nodes there are (nodes of one model share a price)."""
    result = await session.exec(
        select(
            Node.region,
            func.coalesce(Node.price_input_per_mtok, 0.0),
            func.coalesce(Node.price_output_per_mtok, 0.0),
            func.count(),
        )
        .where(or_(col(Node.status).is_(None), col(Node.status) == "active"))
        .group_by(
            Node.region,
            func.coalesce(Node.price_input_per_mtok, 0.0),
            func.coalesce(Node.price_output_per_mtok, 0.0),
        )
    )
    return result.all()
