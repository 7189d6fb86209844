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

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import bindparam, delete, func, or_, update
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


def _dialect(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else "sqlite"


def _load_columns() -> tuple[Any, Any, Any]:
    """A key's running tasks, what they hold and what it spent on a day (parameters
    ``key_id`` and ``day``), as three scalar subqueries."""
    key: Any = bindparam("key_id")
    day: Any = bindparam("day")
    held = (col(Task.key_id) == key, col(Task.hold_usd).is_not(None))
    return (
        select(func.count()).where(*held).scalar_subquery(),
        select(func.coalesce(func.sum(Task.hold_usd), 0.0)).where(*held).scalar_subquery(),
        func.coalesce(
            select(KeySpend.spent_usd)
            .where(col(KeySpend.key_id) == key, col(KeySpend.day) == day)
            .scalar_subquery(),
            0.0,
        ),
    )


def _hold_statement(dialect: str) -> Any:
    """The insert of a held task's row (``ON CONFLICT DO NOTHING``). On SQLite it returns the
    key's load too: a subquery of ``RETURNING`` sees the row just written, and the insert holds
    the database's write lock, so the count is exact in one round trip."""
    stmt = _STATEMENTS.get(("hold", dialect))
    if stmt is None:
        table: Any = Task.__table__  # type: ignore[attr-defined]
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        returned = (table.c.task_id,) if dialect == "postgresql" else _load_columns()
        stmt = _STATEMENTS[("hold", dialect)] = (
            insert(table)
            .values(
                task_id=bindparam("task_id"),
                prompt=bindparam("prompt"),
                domain=bindparam("domain"),
                status=QUEUED,
                answer="",
                confidence=0.0,
                created_at=bindparam("now"),
                key_id=bindparam("key_id"),
                hold_usd=bindparam("hold_usd"),
            )
            .on_conflict_do_nothing(index_elements=["task_id"])
            .returning(*returned)
        )
    return stmt


# Statements built once (per dialect) and run with parameters: building one costs more than
# running it.
_STATEMENTS: dict[tuple[str, str], Any] = {}


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

    The caller commits to admit the task or rolls back to refuse it. Two admissions of one key
    never both count without the other: on SQLite the insert takes the database's write lock;
    on PostgreSQL the key's row is locked first (``FOR UPDATE``)."""
    dialect = _dialect(session)
    params = {
        "task_id": task_id,
        "prompt": prompt,
        "domain": domain,
        "now": now,
        "key_id": key_id,
        "hold_usd": hold_usd,
        "day": day_of(now),
    }
    if dialect == "postgresql":
        await session.exec(select(ApiKey.key_id).where(ApiKey.key_id == key_id).with_for_update())
    row = (await session.exec(_hold_statement(dialect), params=params)).first()
    if row is None:
        return None
    if dialect == "postgresql":
        return await key_load(session=session, key_id=key_id, now=now)
    return KeyLoad(running=int(row[0]), held_usd=float(row[1] or 0), spent_usd=float(row[2] or 0))


async def key_load(*, session: AsyncSession, key_id: str, now: datetime) -> KeyLoad:
    stmt = _STATEMENTS.get(("load", ""))
    if stmt is None:
        stmt = _STATEMENTS[("load", "")] = select(*_load_columns())
    row = (await session.exec(stmt, params={"key_id": key_id, "day": day_of(now)})).one()
    return KeyLoad(running=int(row[0]), held_usd=float(row[1] or 0), spent_usd=float(row[2] or 0))


async def held_tasks(
    *, session: AsyncSession, key_id: str, created_before: datetime, limit: int
) -> list[str]:
    """The key's oldest ``limit`` tasks holding part of its budget, submitted before
    ``created_before``."""
    rows = await session.exec(
        select(Task.task_id)
        .where(
            Task.key_id == key_id,
            col(Task.hold_usd).is_not(None),
            col(Task.created_at) < created_before,
        )
        .order_by(col(Task.created_at))
        .limit(limit)
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


@dataclass(frozen=True, slots=True)
class Charge:
    """A task's charge: its key, what its contributions cost in all, and what was added now
    (0 when a retried record had charged it all before)."""

    key_id: str
    total_usd: float
    added_usd: float


async def charge_task(*, session: AsyncSession, task_id: str, now: datetime) -> Charge | None:
    """Charge the task's key what the task's recorded contributions cost, once: sets
    ``charged_usd`` to their sum, adds what was not charged before to the key's spend of the
    day, and lifts the hold. ``None``: no key submitted the task. Runs in the caller's
    transaction, after the contributions are written; does not commit."""
    dialect = _dialect(session)
    read, lift, add = _charge_statements(dialect)
    task = (await session.exec(read, params={"task_id": task_id})).first()
    if task is None or task[0] is None:
        return None
    key_id, charged, total = task[0], task[1], float(task[2] or 0.0)
    added = round(total - (charged or 0.0), 10)
    await session.exec(lift, params={"charged_task": task_id, "total": total})
    if added or charged is None:
        await session.exec(
            add,
            params={
                "key_id": key_id,
                "day": day_of(now),
                "added": added,
                "tasks": 1 if charged is None else 0,
                "now": now,
            },
        )
    return Charge(key_id=key_id, total_usd=total, added_usd=added)


def _charge_statements(dialect: str) -> tuple[Any, Any, Any]:
    """The task's key, what it was charged and what its contributions cost; setting its charge
    and lifting its hold; adding to the key's spend of a day. Built once per dialect: the
    record step runs them for every task."""
    found = _STATEMENTS.get(("charge", dialect))
    if found is not None:
        return cast(tuple[Any, Any, Any], found)
    task_id: Any = bindparam("task_id")
    cost = (
        select(func.coalesce(func.sum(Contribution.cost_usd), 0.0))
        .where(col(Contribution.task_id) == task_id)
        .scalar_subquery()
    )
    read = select(Task.key_id, Task.charged_usd, cost).where(col(Task.task_id) == task_id)
    tasks: Any = Task.__table__  # type: ignore[attr-defined]
    lift = (  # an update reserves its columns' names for its own parameters
        update(tasks)
        .where(tasks.c.task_id == bindparam("charged_task"))
        .values(charged_usd=bindparam("total"), hold_usd=None)
    )
    spends: Any = KeySpend.__table__  # type: ignore[attr-defined]
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    add = insert(spends).values(
        key_id=bindparam("key_id"),
        day=bindparam("day"),
        spent_usd=bindparam("added"),
        tasks=bindparam("tasks"),
        updated_at=bindparam("now"),
    )
    add = add.on_conflict_do_update(
        index_elements=["key_id", "day"],
        set_={
            "spent_usd": spends.c.spent_usd + add.excluded.spent_usd,
            "tasks": spends.c.tasks + add.excluded.tasks,
            "updated_at": add.excluded.updated_at,
        },
    )
    _STATEMENTS[("charge", dialect)] = (read, lift, add)
    return read, lift, add


async def spent_on(*, session: AsyncSession, key_id: str, day: str) -> KeySpend | None:
    return await session.get(KeySpend, (key_id, day))


async def price_levels(*, session: AsyncSession) -> list[tuple[str, float, float, int]]:
    """Every (region, input price, output price) of the registered nodes, with how many nodes
    have it: a few rows however many nodes there are (nodes of one model share a price)."""
    result = await session.exec(
        select(Node.region, Node.price_input_per_mtok, Node.price_output_per_mtok, func.count())
        .where(or_(col(Node.status).is_(None), col(Node.status) == "active"))
        .group_by(col(Node.region), col(Node.price_input_per_mtok), col(Node.price_output_per_mtok))
    )
    return [(region, pin or 0.0, pout or 0.0, int(n)) for region, pin, pout, n in result.all()]
