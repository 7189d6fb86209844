"""Contracts of ``PayoutSagaWorkflow`` and the payout activities (plain JSON, no secrets).

Amounts are integer base units of XPD (``10**decimals`` per XPD), never floats.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from xpando.contracts import CleanText, Contract


class PayoutStage(StrEnum):
    STARTING = "starting"
    CLOSING = "closing"
    RESERVING = "reserving"
    AWAITING_APPROVAL = "awaiting_approval"
    PAYING = "paying"
    COMPENSATING = "compensating"
    RECONCILING = "reconciling"
    SETTLED = "settled"
    EXPIRED = "expired"  # the approval did not come in time: everything carried over
    FAILED = "failed"
    SCHEDULED = "scheduled"  # a Schedule tick that started the due epochs' sagas


def epoch_workflow_id(epoch: int) -> str:
    return f"payout-epoch-{epoch}"


class PayoutSagaInput(Contract):
    """``epoch`` settles that epoch; ``None`` (a Schedule tick) starts a saga for each due one."""

    epoch: int | None = Field(None, ge=0)


class PayoutSagaResult(Contract):
    epoch: int | None
    stage: PayoutStage
    payouts: int = 0
    paid: int = 0
    paid_amount: int = 0
    carried_over: int = 0
    carried_amount: int = 0
    approver: str | None = None
    reconciled: bool | None = None
    started: list[int] = Field(default_factory=list)  # ticks: the epochs whose sagas started


class PayoutProgress(Contract):
    epoch: int | None
    stage: PayoutStage
    payouts: int = 0
    total: int = 0
    approval_required: bool = False
    approval_deadline: datetime | None = None
    approver: str | None = None
    batches: int = 0
    batches_done: int = 0
    paid: int = 0
    failed: int = 0
    carried_over: int = 0


class ApproveInput(Contract):
    approver: CleanText = Field(min_length=1, max_length=64, description="Who approves the payouts")
    note: CleanText = Field("", max_length=500)


class ApproveResult(Contract):
    epoch: int
    approver: str
    approved_at: datetime


# --- activities ----------------------------------------------------------------------------------


class DueEpochsInput(Contract):
    pass


class DueEpochsResult(Contract):
    current_epoch: int
    epochs: list[int] = Field(default_factory=list)


class CloseEpochInput(Contract):
    epoch: int = Field(ge=0)
    workflow_id: str


class EpochPlan(Contract):
    epoch: int
    payouts: int  # rows, in payout-id order; batches page through them
    payable: int  # base units owed to nodes with a usable wallet
    total: int
    carried_over: int = 0  # base units carried over at close (no wallet, invalid address)
    approval_required: bool = False
    approval_timeout_s: float = 86400.0
    approver: str | None = None  # already approved (a resumed saga)
    batch_size: int = Field(50, ge=1)
    concurrency: int = Field(4, ge=1)


class ReserveInput(Contract):
    epoch: int


class ReserveResult(Contract):
    reserved: int
    available: int
    excluded: list[str] = Field(default_factory=list)  # carried over: the treasury is short
    excluded_amount: int = 0


class ApprovalRecord(Contract):
    epoch: int
    approver: str
    approved_at: datetime
    note: str = ""


class PayBatchInput(Contract):
    epoch: int
    batch: int = Field(ge=0)
    batch_size: int = Field(ge=1)


class PayoutFailure(Contract):
    payout_id: str
    reason: str


class PayBatchResult(Contract):
    paid: int = 0
    paid_amount: int = 0
    failed: list[PayoutFailure] = Field(default_factory=list)
    skipped: int = 0  # already final, or carried over before paying
    resigned: int = 0  # signed again after the previous blockhash expired unlanded
    resent: int = 0  # stored bytes sent again


class CompensateInput(Contract):
    epoch: int
    reason: str
    payout_ids: list[str] | None = None  # None: every unfinished payout of the epoch


class CompensateResult(Contract):
    carried: int = 0
    carried_amount: int = 0
    landed: int = 0  # found on chain after all: recorded as paid, not carried


class ReconcileInput(Contract):
    epoch: int


class ReconcileResult(Contract):
    epoch: int
    ok: bool
    paid_rows: int = 0
    transfers: int = 0  # memo'd transfers of this epoch found on chain
    finalized: int = 0
    missing: list[str] = Field(default_factory=list)  # paid rows without their transfer
    mismatched: list[str] = Field(default_factory=list)  # wrong amount, recipient or memo
    unexpected: list[str] = Field(default_factory=list)  # transfers without a paid row
    duplicates: list[str] = Field(default_factory=list)  # payout ids that landed twice


class FinishEpochInput(Contract):
    epoch: int
    stage: PayoutStage
    reconciled: bool | None = None
    error: str | None = None


class FinishEpochResult(Contract):
    epoch: int
    payouts: int = 0
    paid: int = 0
    paid_amount: int = 0
    carried_over: int = 0
    carried_amount: int = 0
