"""Read-only figures the dashboard shows (keyword-only queries, as everywhere in ``xpando.db``):
what the network did lately, per minute and per hour; each node's recent contributions and
earnings; knowledge per domain; the payout epochs.

Times come back in UTC. The figures are computed in Python from the rows of a bounded window
(an hour of tasks, a day of contributions): the same code on SQLite and PostgreSQL, and cheap at
the sizes a dashboard looks at.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.db import ledger
from xpando.db.ledger_models import Accrual, Payout, PayoutEpoch
from xpando.db.models import Contribution, Knowledge, Task
from xpando.db.queries import as_utc


@dataclass(frozen=True)
class Minute:
    at: datetime  # the minute's start (UTC)
    tasks: int  # tasks recorded in it (any outcome)
    p50_ms: float | None  # median submit-to-record time of its completed tasks


@dataclass(frozen=True)
class Hour:
    at: datetime  # the hour's start (UTC)
    cost_usd: float  # provider cost of the contributions recorded in it
    completed: int  # tasks completed in it
    reused: int  # of which answered from stored knowledge (no expert asked)

    @property
    def reuse_rate(self) -> float | None:
        return self.reused / self.completed if self.completed else None


@dataclass(frozen=True)
class Activity:
    minutes: list[Minute]  # oldest first
    hours: list[Hour]  # oldest first


def _floor(at: datetime, step: timedelta) -> datetime:
    seconds = step.total_seconds()
    return datetime.fromtimestamp(at.timestamp() // seconds * seconds, at.tzinfo)


async def activity(
    *, session: AsyncSession, now: datetime, minutes: int = 60, hours: int = 24
) -> Activity:
    """Tasks per minute and their median latency over the last ``minutes``; provider cost,
    completions and knowledge reuse per hour over the last ``hours``."""
    minute, hour = timedelta(minutes=1), timedelta(hours=1)
    first_minute = _floor(now, minute) - (minutes - 1) * minute
    first_hour = _floor(now, hour) - (hours - 1) * hour
    tasks = (
        await session.exec(
            select(Task.task_id, Task.status, Task.submitted_at, Task.completed_at).where(
                col(Task.completed_at) >= first_hour
            )
        )
    ).all()
    contributed = (
        await session.exec(
            select(Contribution.task_id, Contribution.cost_usd, Contribution.created_at).where(
                col(Contribution.created_at) >= first_hour
            )
        )
    ).all()
    per_minute: dict[datetime, list[float]] = defaultdict(list)
    counted: dict[datetime, int] = defaultdict(int)
    completed: dict[datetime, int] = defaultdict(int)
    reused: dict[datetime, int] = defaultdict(int)
    asked = {task_id for task_id, _, _ in contributed}
    for task_id, status, submitted_at, completed_at in tasks:
        done = as_utc(completed_at)
        assert done is not None  # selected on it
        if status == "completed":
            completed[_floor(done, hour)] += 1
            reused[_floor(done, hour)] += task_id not in asked
        if done >= first_minute:
            counted[_floor(done, minute)] += 1
            started = as_utc(submitted_at)
            if status == "completed" and started is not None:
                per_minute[_floor(done, minute)].append((done - started).total_seconds() * 1000)
    cost: dict[datetime, float] = defaultdict(float)
    for _, cost_usd, created_at in contributed:
        at = as_utc(created_at)
        assert at is not None
        cost[_floor(at, hour)] += cost_usd or 0.0
    return Activity(
        minutes=[
            Minute(
                at=at,
                tasks=counted[at],
                p50_ms=statistics.median(per_minute[at]) if per_minute[at] else None,
            )
            for at in (first_minute + i * minute for i in range(minutes))
        ],
        hours=[
            Hour(at=at, cost_usd=cost[at], completed=completed[at], reused=reused[at])
            for at in (first_hour + i * hour for i in range(hours))
        ],
    )


async def node_contributions(
    *, session: AsyncSession, node_id: str, limit: int = 20
) -> list[Contribution]:
    """The node's latest recorded contributions, newest first."""
    rows = await session.exec(
        select(Contribution)
        .where(Contribution.node_id == node_id)
        .order_by(col(Contribution.created_at).desc(), col(Contribution.id).desc())
        .limit(limit)
    )
    return list(rows.all())


@dataclass(frozen=True)
class NodeEarnings:
    paid: int = 0  # XPD base units landed on chain
    pending: int = 0  # accruals not yet settled in an epoch


async def earnings_by_node(*, session: AsyncSession) -> dict[str, NodeEarnings]:
    """Every node's paid amount and unsettled accruals, in two grouped reads."""
    paid = await session.exec(
        select(Payout.node_id, func.coalesce(func.sum(Payout.amount), 0))
        .where(col(Payout.status).in_(ledger.PAID))
        .group_by(col(Payout.node_id))
    )
    pending = await session.exec(
        select(Accrual.node_id, func.count())
        .where(col(Accrual.settled_epoch).is_(None))
        .group_by(col(Accrual.node_id))
    )
    found: dict[str, NodeEarnings] = {}
    for node_id, amount in paid.all():
        found[node_id] = NodeEarnings(paid=int(amount))
    for node_id, count in pending.all():
        found[node_id] = NodeEarnings(paid=found.get(node_id, NodeEarnings()).paid, pending=count)
    return found


@dataclass(frozen=True)
class DomainKnowledge:
    domain: str  # "general" for items without one
    items: int = 0  # active items
    uses: int = 0  # tasks answered from them
    completed: int = 0  # tasks of the domain completed
    reused: int = 0  # of which answered from knowledge (no expert asked)
    experts_asked: int = 0  # contributions of the domain's other completed tasks

    @property
    def reuse_rate(self) -> float | None:
        return self.reused / self.completed if self.completed else None

    @property
    def calls_saved(self) -> float:
        """Provider calls the reused tasks did not make: as many as an answered task of the
        domain asked on average."""
        answered = self.completed - self.reused
        return self.reused * (self.experts_asked / answered) if answered else 0.0


async def knowledge_by_domain(*, session: AsyncSession) -> list[DomainKnowledge]:
    """Per domain: active items and their uses, completed tasks and how many reused knowledge."""
    domain = func.coalesce(col(Knowledge.domain), "general")
    items = await session.exec(
        select(domain, func.count(), func.coalesce(func.sum(Knowledge.uses), 0))
        .where(Knowledge.status == "active")
        .group_by(domain)
    )
    task_domain = func.coalesce(col(Task.domain), "general")
    asked = (
        select(func.count())
        .where(Contribution.task_id == Task.task_id)
        .correlate(Task)
        .scalar_subquery()
    )
    tasks = await session.exec(select(task_domain, asked).where(Task.status == "completed"))
    found: dict[str, DomainKnowledge] = {}
    for name, count, uses in items.all():
        found[name] = DomainKnowledge(domain=name, items=int(count), uses=int(uses))
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, experts in tasks.all():
        totals[name][0] += 1
        totals[name][1] += experts == 0
        totals[name][2] += int(experts)
    for name, (done, reused, experts) in totals.items():
        known = found.get(name, DomainKnowledge(domain=name))
        found[name] = DomainKnowledge(
            domain=name,
            items=known.items,
            uses=known.uses,
            completed=done,
            reused=reused,
            experts_asked=experts,
        )
    return sorted(found.values(), key=lambda d: d.domain)


async def recent_knowledge(
    *, session: AsyncSession, domain: str, limit: int = 20
) -> list[Knowledge]:
    """A domain's active items, most recently updated first ("general": items without one)."""
    named = (
        col(Knowledge.domain).is_(None) if domain == "general" else col(Knowledge.domain) == domain
    )
    rows = await session.exec(
        select(Knowledge)
        .where(named, Knowledge.status == "active")
        .order_by(col(Knowledge.updated_at).desc())
        .limit(limit)
    )
    return list(rows.all())


async def list_epochs(*, session: AsyncSession, limit: int = 20) -> list[PayoutEpoch]:
    """Closed epochs, newest first."""
    rows = await session.exec(
        select(PayoutEpoch).order_by(col(PayoutEpoch.epoch).desc()).limit(limit)
    )
    return list(rows.all())


@dataclass(frozen=True)
class Counters:
    """The few figures every page's header keeps live."""

    tasks_last_hour: int = 0
    completed_last_hour: int = 0
    knowledge_items: int = 0


async def counters(*, session: AsyncSession, now: datetime) -> Counters:
    since = now - timedelta(hours=1)
    recorded = (
        await session.exec(
            select(Task.status, func.count())
            .where(col(Task.completed_at) >= since)
            .group_by(col(Task.status))
        )
    ).all()
    items = (
        await session.exec(
            select(func.count()).select_from(Knowledge).where(Knowledge.status == "active")
        )
    ).one()
    return Counters(
        tasks_last_hour=sum(int(n) for _, n in recorded),
        completed_last_hour=sum(int(n) for s, n in recorded if s == "completed"),
        knowledge_items=int(items),
    )
