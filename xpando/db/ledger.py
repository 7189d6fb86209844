"""Queries of the XPD ledger (keyword-only; called from activities and API routes).

Every write is guarded so that a retried or duplicated activity cannot apply it twice:
accruals are unique per task + node; closing an epoch inserts its row (primary key) and claims
accruals and carried-over payouts with ``WHERE … IS NULL`` updates whose row counts are checked;
a payout's signature is replaced only by compare-and-set on the previous signature. The reward
formula lives in :mod:`xpando.economy.rewards`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, String, bindparam, func, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from xpando.contracts import ContributionStatus, RecordInput
from xpando.db.ledger_models import Accrual, Payout, PayoutEpoch
from xpando.db.models import Node
from xpando.economy import rewards
from xpando.keys import is_valid_address

PREPARED, SIGNED, SENT = "prepared", "signed", "sent"
CONFIRMED, FINALIZED, FAILED, CARRIED_OVER = "confirmed", "finalized", "failed", "carried_over"
PAID = (CONFIRMED, FINALIZED)
IN_FLIGHT = (SIGNED, SENT)
OPEN_EPOCH = ("closed", "awaiting_approval", "paying")


CHUNK = 500  # ids per IN (...) list


def _update(model: Any) -> Any:
    """An ORM UPDATE that does not re-evaluate its criteria against every object in the
    session (which makes closing a 1,000-node epoch quadratic)."""
    return update(model).execution_options(synchronize_session=False)


class LedgerConflict(Exception):
    """A concurrent writer got there first; the transaction was rolled back (retry it)."""


def payout_id(epoch: int, node_id: str) -> str:
    return f"xpd-{epoch}-{node_id}"


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything the ledger stores is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _insert(session: AsyncSession) -> Any:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


# --- accruals ------------------------------------------------------------------------------------


async def accrue(*, session: AsyncSession, record: RecordInput, now: datetime) -> int:
    """Accrue each scored contribution of a recorded task (no commit: the caller's transaction).

    Idempotent: one accrual per task + node; a repeated record changes nothing."""
    rows = [
        {
            "task_id": record.task_id,
            "node_id": c.node_id,
            "quality_ppm": rewards.quality_ppm(c.quality),
            "earned_at": now,
        }
        for c in record.contributions
        if c.status == ContributionStatus.OK and rewards.quality_ppm(c.quality) > 0
    ]
    if not rows:
        return 0
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    stmt = _ACCRUE.get(dialect)
    if stmt is None:  # built once: an executemany of it compiles nothing per task
        table: Any = Accrual.__table__  # type: ignore[attr-defined]
        stmt = _ACCRUE[dialect] = _insert(session)(table).on_conflict_do_nothing(
            index_elements=["task_id", "node_id"]
        )
    await session.exec(stmt, params=rows)
    return len(rows)


_ACCRUE: dict[str, Any] = {}


async def due_epochs(*, session: AsyncSession, current_epoch: int, epoch_s: int) -> list[int]:
    """Ended epochs that should be settled: those with unsettled accruals (and no settlement
    yet), plus the last ended epoch when carried-over amounts are waiting for one."""
    rows = await session.exec(select(Accrual.earned_at).where(col(Accrual.settled_epoch).is_(None)))
    epochs = {rewards.epoch_of(utc(t).timestamp(), epoch_s) for t in rows.all()}
    waiting = await session.exec(
        select(func.count())
        .select_from(Payout)
        .where(Payout.status == CARRIED_OVER, col(Payout.carried_into).is_(None))
    )
    if int(waiting.one()) > 0:
        epochs.add(current_epoch - 1)
    epochs = {e for e in epochs if 0 <= e < current_epoch}
    if not epochs:
        return []
    settled = await session.exec(
        select(PayoutEpoch.epoch).where(col(PayoutEpoch.epoch).in_(sorted(epochs)))
    )
    return sorted(epochs - set(settled.all()))


# --- closing an epoch ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CloseParams:
    epoch_s: int
    emission: int
    approval_threshold: int
    weights: rewards.RewardWeights


async def get_epoch(*, session: AsyncSession, epoch: int) -> PayoutEpoch | None:
    return await session.get(PayoutEpoch, epoch)


async def close_epoch(
    *, session: AsyncSession, epoch: int, workflow_id: str, params: CloseParams, now: datetime
) -> PayoutEpoch:
    """Close an ended epoch: split its emission, create its payouts, claim its accruals and the
    nodes' carried-over amounts. Returns the existing row if the epoch is already closed."""
    existing = await session.get(PayoutEpoch, epoch)
    if existing is not None:
        return existing
    start, end = rewards.epoch_bounds(epoch, params.epoch_s)
    starts_at = datetime.fromtimestamp(start, UTC)
    ends_at = datetime.fromtimestamp(end, UTC)

    # This epoch's accruals, plus stragglers of epochs that were closed before they arrived.
    candidates = list(
        (
            await session.exec(
                select(Accrual).where(
                    col(Accrual.settled_epoch).is_(None), col(Accrual.earned_at) < ends_at
                )
            )
        ).all()
    )
    epoch_of = {
        a.id: rewards.epoch_of(utc(a.earned_at).timestamp(), params.epoch_s) for a in candidates
    }
    earlier = sorted({e for e in epoch_of.values() if e != epoch})
    closed_earlier: set[int] = set()
    if earlier:
        closed_earlier = set(
            (
                await session.exec(
                    select(PayoutEpoch.epoch).where(col(PayoutEpoch.epoch).in_(earlier))
                )
            ).all()
        )
    taken = [a for a in candidates if epoch_of[a.id] == epoch or epoch_of[a.id] in closed_earlier]

    quality: dict[str, int] = defaultdict(int)
    for a in taken:
        quality[a.node_id] += a.quality_ppm
    carried = list(
        (
            await session.exec(
                select(Payout)
                .where(Payout.status == CARRIED_OVER, col(Payout.carried_into).is_(None))
                .where(Payout.epoch < epoch)
            )
        ).all()
    )
    carried_by_node: dict[str, list[Payout]] = defaultdict(list)
    for p in carried:
        carried_by_node[p.node_id].append(p)

    node_ids = sorted(set(quality) | set(carried_by_node))
    nodes = {
        n.node_id: n
        for n in (await session.exec(select(Node).where(col(Node.node_id).in_(node_ids)))).all()
    }
    # Reputation and price are neutral until nodes carry them (see xpando.economy.rewards).
    factor = rewards.multiplier(params.weights, reputation=1.0, price=0.0)
    points = {node: rewards.node_points(q, factor) for node, q in quality.items()}
    emission = params.emission if sum(points.values()) > 0 else 0
    shares = rewards.split(emission, points)

    payouts: list[Payout] = []
    for node in node_ids:
        carried_in = sum(p.amount for p in carried_by_node.get(node, []))
        earned = shares.get(node, 0)
        amount = earned + carried_in
        if amount <= 0:
            continue
        wallet = nodes[node].wallet if node in nodes else None
        status, reason = PREPARED, None
        if not wallet:
            status, reason = CARRIED_OVER, "no_wallet"
        elif not is_valid_address(wallet):
            status, reason = CARRIED_OVER, "invalid_recipient"
        payouts.append(
            Payout(
                payout_id=payout_id(epoch, node),
                epoch=epoch,
                node_id=node,
                wallet=wallet,
                points=points.get(node, 0),
                earned=earned,
                carried_in=carried_in,
                amount=amount,
                status=status,
                reason=reason,
                signatures=[],
                created_at=now,
                updated_at=now,
            )
        )
    ids = {p.node_id: p.payout_id for p in payouts}
    payable = sum(p.amount for p in payouts if p.status == PREPARED)
    row = PayoutEpoch(
        epoch=epoch,
        workflow_id=workflow_id,
        status="closed",
        starts_at=starts_at,
        ends_at=ends_at,
        emission=emission,
        points=sum(points.values()),
        accruals=len(taken),
        payouts=len(payouts),
        total=sum(p.amount for p in payouts),
        payable=payable,
        carried_over=sum(p.amount for p in payouts if p.status == CARRIED_OVER),
        approval_required=payable > params.approval_threshold,
        reconcile_report={},
        closed_at=now,
        updated_at=now,
    )
    session.add(row)
    session.add_all(payouts)
    await session.flush()
    for node, rows in carried_by_node.items():
        if node not in ids:
            continue
        result = await session.exec(
            _update(Payout)
            .where(col(Payout.payout_id).in_([p.payout_id for p in rows]))
            .where(col(Payout.carried_into).is_(None))
            .values(carried_into=ids[node], updated_at=now)
        )
        if result.rowcount != len(rows):
            await session.rollback()
            raise LedgerConflict(f"carried-over payouts of {node} were claimed concurrently")
    # Claim the accruals (all or nothing), then name the payout each one went into.
    accrual_ids = [a.id for a in taken if a.id is not None]
    claimed = 0
    for start in range(0, len(accrual_ids), CHUNK):
        chunk = accrual_ids[start : start + CHUNK]
        result = await session.exec(
            _update(Accrual)
            .where(col(Accrual.id).in_(chunk), col(Accrual.settled_epoch).is_(None))
            .values(settled_epoch=epoch)
        )
        claimed += result.rowcount
    if claimed != len(accrual_ids):
        await session.rollback()
        raise LedgerConflict(f"accruals of epoch {epoch} were settled concurrently")
    named = [{"b_id": a.id, "b_payout": ids.get(a.node_id)} for a in taken if ids.get(a.node_id)]
    if named:
        table = Accrual.__table__  # type: ignore[attr-defined]
        await session.exec(
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values(payout_id=bindparam("b_payout")),
            params=named,
        )
    await session.commit()
    return row


async def set_epoch_status(
    *, session: AsyncSession, epoch: int, status: str, now: datetime, **values: Any
) -> PayoutEpoch:
    row = await session.get(PayoutEpoch, epoch)
    if row is None:
        raise KeyError(epoch)
    row.status = status
    row.updated_at = now
    for key, value in values.items():
        setattr(row, key, value)
    session.add(row)
    await session.commit()
    return row


# --- reservation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reservation:
    reserved: int
    available: int
    excluded: list[str]
    excluded_amount: int


async def paid_amount(*, session: AsyncSession, epoch: int) -> int:
    result = await session.exec(
        select(func.coalesce(func.sum(Payout.amount), 0)).where(
            Payout.epoch == epoch, col(Payout.status).in_(PAID)
        )
    )
    return int(result.one())


async def reserve(
    *, session: AsyncSession, epoch: int, treasury_balance: int, now: datetime
) -> Reservation:
    """Reserve the epoch's payable total against the treasury, less what other open epochs
    still hold. What does not fit is carried over (reason ``insufficient_treasury``).
    Idempotent: an epoch reserves once."""
    row = await session.get(PayoutEpoch, epoch)
    if row is None:
        raise KeyError(epoch)
    if row.reserved is not None:
        return Reservation(row.reserved, treasury_balance, [], 0)
    others = (
        await session.exec(
            select(PayoutEpoch).where(
                col(PayoutEpoch.status).in_(OPEN_EPOCH),
                col(PayoutEpoch.reserved).is_not(None),
                PayoutEpoch.epoch != epoch,
            )
        )
    ).all()
    held = 0
    for other in others:
        paid = await paid_amount(session=session, epoch=other.epoch)
        held += max(0, (other.reserved or 0) - other.released - paid)
    available = max(0, treasury_balance - held)
    rows = (
        await session.exec(
            select(Payout)
            .where(Payout.epoch == epoch, Payout.status == PREPARED)
            .order_by(col(Payout.payout_id))
        )
    ).all()
    reserved = 0
    excluded: list[Payout] = []
    for p in rows:
        if reserved + p.amount <= available:
            reserved += p.amount
        else:
            excluded.append(p)
    for p in excluded:
        p.status, p.reason, p.updated_at = CARRIED_OVER, "insufficient_treasury", now
        session.add(p)
    row.reserved = reserved
    row.carried_over += sum(p.amount for p in excluded)
    row.updated_at = now
    session.add(row)
    await session.commit()
    return Reservation(
        reserved, available, [p.payout_id for p in excluded], sum(p.amount for p in excluded)
    )


# --- paying --------------------------------------------------------------------------------------


async def batch(*, session: AsyncSession, epoch: int, index: int, size: int) -> list[Payout]:
    """The ``index``-th page of an epoch's payouts (in payout-id order; the set is fixed at
    close, so pages are stable across retries)."""
    rows = await session.exec(
        select(Payout)
        .where(Payout.epoch == epoch)
        .order_by(col(Payout.payout_id))
        .offset(index * size)
        .limit(size)
    )
    return list(rows.all())


async def get_payouts(*, session: AsyncSession, ids: Sequence[str]) -> list[Payout]:
    rows = await session.exec(
        select(Payout).where(col(Payout.payout_id).in_(list(ids))).order_by(col(Payout.payout_id))
    )
    return list(rows.all())


@dataclass(frozen=True)
class Signed:
    payout_id: str
    previous: str | None  # the signature this one replaces (compare-and-set)
    signature: str
    tx_b64: str
    blockhash: str
    last_valid_height: int
    signatures: list[str]


def _payouts() -> Any:
    return Payout.__table__  # type: ignore[attr-defined]


def _unfinished(t: Any) -> Any:
    # Not IN (...): an expanding parameter cannot be used in an executemany.
    return or_(t.c.status == PREPARED, t.c.status == SIGNED, t.c.status == SENT)


async def store_signed(
    *, session: AsyncSession, signed: Sequence[Signed], now: datetime
) -> set[str]:
    """Store signed transactions before they are sent, one statement and one commit for the
    batch. Compare-and-set on the previous signature: a payout another attempt re-signed
    meanwhile is left alone. Returns the ids that were stored."""
    if not signed:
        return set()
    t = _payouts()
    await session.exec(
        update(t)
        .where(
            t.c.payout_id == bindparam("b_id"),
            func.coalesce(t.c.signature, "")
            == func.coalesce(bindparam("b_prev", type_=String), ""),
            _unfinished(t),
        )
        .values(
            status=SIGNED,
            signature=bindparam("b_sig"),
            tx=bindparam("b_tx"),
            blockhash=bindparam("b_bh"),
            last_valid_height=bindparam("b_lvh"),
            signatures=bindparam("b_sigs", type_=JSON),
            attempts=t.c.attempts + 1,
            signed_at=now,
            updated_at=now,
        ),
        params=[
            {
                "b_id": s.payout_id,
                "b_prev": s.previous,
                "b_sig": s.signature,
                "b_tx": s.tx_b64,
                "b_bh": s.blockhash,
                "b_lvh": s.last_valid_height,
                "b_sigs": s.signatures,
            }
            for s in signed
        ],
    )
    rows = await session.exec(
        select(t.c.payout_id, t.c.signature).where(t.c.payout_id.in_([s.payout_id for s in signed]))
    )
    current = {pid: sig for pid, sig in rows.all()}
    await session.commit()
    return {s.payout_id for s in signed if current.get(s.payout_id) == s.signature}


async def mark_sent(
    *, session: AsyncSession, sent: Sequence[tuple[str, str]], now: datetime
) -> None:
    if not sent:
        return
    t = _payouts()
    await session.exec(
        update(t)
        .where(
            t.c.payout_id == bindparam("b_id"),
            t.c.signature == bindparam("b_sig"),
            t.c.status == SIGNED,
        )
        .values(status=SENT, sent_at=now, updated_at=now),
        params=[{"b_id": pid, "b_sig": sig} for pid, sig in sent],
    )
    await session.commit()


async def mark_landed(
    *,
    session: AsyncSession,
    landed: Sequence[tuple[str, str, int, str]],
    now: datetime,
) -> None:
    """(payout id, signature, slot, confirmed|finalized) for transfers that landed."""
    if not landed:
        return
    t = _payouts()
    await session.exec(
        update(t)
        .where(t.c.payout_id == bindparam("b_id"), _unfinished(t))
        .values(
            status=bindparam("b_status"),
            signature=bindparam("b_sig"),
            slot=bindparam("b_slot"),
            confirmed_at=now,
            updated_at=now,
            reason=None,
        ),
        params=[
            {"b_id": pid, "b_sig": sig, "b_slot": slot, "b_status": status}
            for pid, sig, slot, status in landed
        ],
    )
    await session.commit()


async def mark_failed(
    *, session: AsyncSession, failed: Sequence[tuple[str, str, str]], now: datetime
) -> None:
    """(payout id, reason, error) for payouts the chain definitively refused."""
    if not failed:
        return
    t = _payouts()
    await session.exec(
        update(t)
        .where(t.c.payout_id == bindparam("b_id"), _unfinished(t))
        .values(
            status=FAILED, reason=bindparam("b_reason"), error=bindparam("b_error"), updated_at=now
        ),
        params=[
            {"b_id": pid, "b_reason": reason, "b_error": error} for pid, reason, error in failed
        ],
    )
    await session.commit()


async def finalize(*, session: AsyncSession, ids: Sequence[str], now: datetime) -> None:
    if ids:
        await session.exec(
            _update(Payout)
            .where(col(Payout.payout_id).in_(list(ids)), col(Payout.status) == CONFIRMED)
            .values(status=FINALIZED, updated_at=now)
        )
        await session.commit()


# --- compensation --------------------------------------------------------------------------------


async def unfinished(*, session: AsyncSession, epoch: int) -> list[Payout]:
    rows = await session.exec(
        select(Payout)
        .where(
            Payout.epoch == epoch,
            col(Payout.status).in_((PREPARED, SIGNED, SENT, FAILED)),
        )
        .order_by(col(Payout.payout_id))
    )
    return list(rows.all())


async def carry_over(
    *,
    session: AsyncSession,
    epoch: int,
    carry: Sequence[tuple[str, str, str | None]],
    now: datetime,
) -> int:
    """Carry payouts to the next epoch: (payout id, reason, signature it was proven not to
    land with — or None for a payout never signed). Releases their reservation. Returns the
    amount carried."""
    amount = 0
    for pid, reason, signature in carry:
        row = await session.get(Payout, pid)
        if row is None or row.status not in (PREPARED, SIGNED, SENT, FAILED):
            continue
        if row.signature != signature:
            continue  # re-signed meanwhile: not proven
        if not (row.status == FAILED and row.reason):
            row.reason = reason  # a failed payout keeps the chain's reason
        row.status = CARRIED_OVER
        row.updated_at = now
        session.add(row)
        amount += row.amount
    epoch_row = await session.get(PayoutEpoch, epoch)
    if epoch_row is not None and amount:
        if epoch_row.reserved is not None:
            epoch_row.released += amount
        epoch_row.carried_over += amount
        epoch_row.updated_at = now
        session.add(epoch_row)
    await session.commit()
    return amount


async def summarize(*, session: AsyncSession, epoch: int) -> dict[str, int]:
    rows = await session.exec(
        select(Payout.status, func.count(), func.coalesce(func.sum(Payout.amount), 0))
        .where(Payout.epoch == epoch)
        .group_by(col(Payout.status))
    )
    out: dict[str, int] = {}
    for status, count, amount in rows.all():
        out[f"{status}_count"] = int(count)
        out[f"{status}_amount"] = int(amount)
    return out


async def paid_rows(*, session: AsyncSession, epoch: int) -> list[Payout]:
    rows = await session.exec(
        select(Payout).where(Payout.epoch == epoch, col(Payout.status).in_(PAID))
    )
    return list(rows.all())


async def rows_by_id(*, session: AsyncSession, ids: Sequence[str]) -> dict[str, Payout]:
    if not ids:
        return {}
    rows = await session.exec(select(Payout).where(col(Payout.payout_id).in_(list(ids))))
    return {p.payout_id: p for p in rows.all()}


# --- reading -------------------------------------------------------------------------------------


async def list_payouts(
    *,
    session: AsyncSession,
    node_id: str | None = None,
    epoch: int | None = None,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Payout], int]:
    where = []
    if node_id is not None:
        where.append(Payout.node_id == node_id)
    if epoch is not None:
        where.append(Payout.epoch == epoch)
    if status is not None:
        where.append(Payout.status == status)
    total = await session.exec(select(func.count()).select_from(Payout).where(*where))
    rows = await session.exec(
        select(Payout)
        .where(*where)
        .order_by(col(Payout.epoch).desc(), col(Payout.node_id))
        .offset(offset)
        .limit(limit)
    )
    return list(rows.all()), int(total.one())


@dataclass(frozen=True)
class Earnings:
    node_id: str
    wallet: str | None
    pending_accruals: int
    pending_quality_ppm: int
    earned: int
    paid: int
    carried_over: int
    in_flight: int
    payouts: list[Payout]


async def earnings(*, session: AsyncSession, node_id: str, limit: int = 50) -> Earnings | None:
    node = await session.get(Node, node_id)
    pending = (
        await session.exec(
            select(func.count(), func.coalesce(func.sum(Accrual.quality_ppm), 0)).where(
                Accrual.node_id == node_id, col(Accrual.settled_epoch).is_(None)
            )
        )
    ).one()
    totals = (
        await session.exec(
            select(Payout.status, Payout.carried_into, Payout.earned, Payout.amount).where(
                Payout.node_id == node_id
            )
        )
    ).all()
    if node is None and not totals and not pending[0]:
        return None
    rows, _ = await list_payouts(session=session, node_id=node_id, limit=limit)
    return Earnings(
        node_id=node_id,
        wallet=node.wallet if node is not None else None,
        pending_accruals=int(pending[0]),
        pending_quality_ppm=int(pending[1]),
        earned=sum(int(e) for _, _, e, _ in totals),
        paid=sum(int(a) for s, _, _, a in totals if s in PAID),
        carried_over=sum(int(a) for s, into, _, a in totals if s == CARRIED_OVER and into is None),
        in_flight=sum(int(a) for s, _, _, a in totals if s in (PREPARED, SIGNED, SENT, FAILED)),
        payouts=rows,
    )


async def ledger_totals(*, session: AsyncSession) -> dict[str, int]:
    """Bank-invariant figures: everything earned equals what was paid, what is carried over
    (and not yet taken over by a later payout) and what is still in flight."""
    rows = (
        await session.exec(select(Payout.status, Payout.carried_into, Payout.earned, Payout.amount))
    ).all()
    return {
        "earned": sum(int(e) for _, _, e, _ in rows),
        "paid": sum(int(a) for s, _, _, a in rows if s in PAID),
        "carried_over": sum(int(a) for s, into, _, a in rows if s == CARRIED_OVER and into is None),
        "in_flight": sum(int(a) for s, _, _, a in rows if s in (PREPARED, SIGNED, SENT, FAILED)),
        "payouts": len(rows),
        "paid_payouts": sum(1 for s, _, _, _ in rows if s in PAID),
    }
