"""Tables of the XPD ledger: accruals, epochs, payouts. Amounts are integer base units.

Traceability runs task → accrual (task id + node id) → payout (``xpd-<epoch>-<node>``, also
the on-chain memo) → transaction signature; a carried-over payout names the payout that took
its amount over (``carried_into``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from xpando.db.models import _ts


def _amount(*, nullable: bool = False) -> Any:
    return Field(default=None if nullable else 0, sa_column=Column(BigInteger, nullable=nullable))


class Accrual(SQLModel, table=True):
    """One scored contribution's claim on its epoch's emission (written with the task)."""

    __tablename__ = "accruals"
    __table_args__ = (UniqueConstraint("task_id", "node_id", name="uq_accrual_task_node"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(index=True, max_length=128)
    node_id: str = Field(index=True, max_length=64)
    quality_ppm: int = 0
    earned_at: datetime = _ts(index=True)
    settled_epoch: int | None = Field(default=None, index=True)
    payout_id: str | None = Field(default=None, index=True, max_length=160)


class PayoutEpoch(SQLModel, table=True):
    """One epoch's settlement: what was closed, reserved, approved, paid and carried over."""

    __tablename__ = "payout_epochs"

    epoch: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    workflow_id: str = Field(max_length=160)
    status: str = Field(index=True, max_length=24)
    starts_at: datetime = _ts()
    ends_at: datetime = _ts()
    emission: int = _amount()
    points: int = _amount()
    accruals: int = 0
    payouts: int = 0
    total: int = _amount()  # sum of the epoch's payouts (its shares plus carried-in amounts)
    payable: int = _amount()  # of which to nodes with a usable wallet
    reserved: int | None = _amount(nullable=True)
    released: int = _amount()
    paid: int = _amount()
    carried_over: int = _amount()
    approval_required: bool = False
    approver: str | None = Field(default=None, max_length=64)
    approved_at: datetime | None = _ts(nullable=True)
    reconciled: bool | None = None
    reconcile_report: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    closed_at: datetime = _ts()
    settled_at: datetime | None = _ts(nullable=True)
    updated_at: datetime = _ts()


class Payout(SQLModel, table=True):
    """One node's payout for one epoch, and the transaction that pays it.

    States: prepared → signed → sent → confirmed → finalized; failed (the chain refused it);
    carried_over (not paid in this epoch; ``reason`` says why, the amount moves on).
    The signed bytes are stored before they are sent; ``signatures`` lists every signature ever
    signed for this payout (only the last can still land).
    """

    __tablename__ = "payouts"
    __table_args__ = (UniqueConstraint("epoch", "node_id", name="uq_payout_epoch_node"),)

    payout_id: str = Field(primary_key=True, max_length=160)
    epoch: int = Field(index=True)
    node_id: str = Field(index=True, max_length=64)
    wallet: str | None = Field(default=None, max_length=64)
    points: int = _amount()
    earned: int = _amount()  # this epoch's share
    carried_in: int = _amount()  # from earlier carried-over payouts of the node
    amount: int = _amount()  # earned + carried_in: what this payout transfers
    status: str = Field(index=True, max_length=16)
    reason: str | None = Field(default=None, max_length=64)
    carried_into: str | None = Field(default=None, index=True, max_length=160)
    signature: str | None = Field(default=None, index=True, max_length=100)
    tx: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # base64
    blockhash: str | None = Field(default=None, max_length=64)
    last_valid_height: int | None = _amount(nullable=True)
    attempts: int = 0  # times signed
    signatures: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    slot: int | None = _amount(nullable=True)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    signed_at: datetime | None = _ts(nullable=True)
    sent_at: datetime | None = _ts(nullable=True)
    confirmed_at: datetime | None = _ts(nullable=True)
