"""Payout activities: the side effects of ``PayoutSagaWorkflow`` (ledger and chain).

Exactly once, without a distributed transaction
    Each payout row is a small state machine whose state is on disk before each irreversible
    step, and every attempt starts by asking the chain what already happened:

    1. **status first**: for a row with signatures, ask the chain about every one of them.
       Landed successfully → ``confirmed``/``finalized``; landed with an error → ``failed``.
    2. **unknown signature, blockhash still valid** → send the *stored bytes* again (same
       signature: the chain executes a signature at most once).
    3. **unknown signature, blockhash expired** → the old transaction can never land, so sign
       anew with a fresh blockhash. The new bytes replace the old by compare-and-set on the old
       signature, so two racing attempts cannot both re-sign.
    4. **sign → store → send**: the signed bytes and signature are committed (``signed``) before
       the first send, so a crash after sending is found again by step 1.
    5. **confirm**: poll statuses (batched) until every transaction has landed at the configured
       commitment or its blockhash expired (→ step 3); rate limits and timeouts only delay it.

    The memo of every transfer is the payout id, so reconciliation can match chain to ledger.

Compensation never guesses: a signed payout is carried over only once the chain says its
transaction failed, or its blockhash expired with the signature unknown.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from solders.pubkey import Pubkey
from temporalio import activity
from temporalio.exceptions import ApplicationError

from xpando import metrics, telemetry
from xpando.chain import (
    Chain,
    ChainHandle,
    OnChainTransfer,
    SignatureStatus,
    failure_reason,
)
from xpando.contracts_payouts import (
    ApprovalRecord,
    ApproveResult,
    CloseEpochInput,
    CompensateInput,
    CompensateResult,
    DueEpochsInput,
    DueEpochsResult,
    EpochPlan,
    FinishEpochInput,
    FinishEpochResult,
    PayBatchInput,
    PayBatchResult,
    PayoutStage,
    ReconcileInput,
    ReconcileResult,
    ReserveInput,
    ReserveResult,
)
from xpando.db import SessionFactory, ledger
from xpando.economy import rewards
from xpando.economy.payments import (
    FINISHING,
    RECONCILE_LOOKBACK,
    RECONCILING,
    BatchPayment,
    PayoutConfig,
    PayoutHooks,
    chain_call,
    fetch_transfer,
    paid_state,
    payout_step,
    signature_statuses,
)
from xpando.logs import get_logger

log = get_logger(__name__)


class PayoutActivities:
    """Ledger and chain side effects of the payout saga. Receives its clients; never builds them."""

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        chain: ChainHandle,
        config: PayoutConfig,
        hooks: PayoutHooks | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._sessions = sessions
        self._chain = chain
        self._config = config
        self._hooks = hooks or PayoutHooks()
        self._clock = clock or (lambda: datetime.now(UTC))

    # --- helpers --------------------------------------------------------------------------------

    async def _get_chain(self) -> Chain:
        """The chain; while tracing is on, each of its calls is a span ``chain.<method>``."""
        chain: Chain = await chain_call(self._chain.get)
        return telemetry.traced(chain, "chain")

    def _current_epoch(self) -> int:
        return rewards.epoch_of(self._clock().timestamp(), self._config.epoch_s)

    # --- activities -----------------------------------------------------------------------------

    @activity.defn(name="payout_due_epochs")
    async def due_epochs(self, input: DueEpochsInput) -> DueEpochsResult:
        async with payout_step("find the epochs due"):
            current = self._current_epoch()
            async with self._sessions() as session:
                epochs = await ledger.due_epochs(
                    session=session, current_epoch=current, epoch_s=self._config.epoch_s
                )
            return DueEpochsResult(current_epoch=current, epochs=epochs)

    @activity.defn(name="payout_close_epoch")
    async def close_epoch(self, input: CloseEpochInput) -> EpochPlan:
        """Close the epoch (once): split its emission, create its payout rows."""
        async with payout_step(f"close epoch {input.epoch}"):
            cfg = self._config
            _, end = rewards.epoch_bounds(input.epoch, cfg.epoch_s)
            now = self._clock()
            if now.timestamp() < end:
                raise ApplicationError(
                    f"epoch {input.epoch} ends at {datetime.fromtimestamp(end, UTC).isoformat()}",
                    type="EpochNotEnded",
                    non_retryable=True,
                )
            params = ledger.CloseParams(
                epoch_s=cfg.epoch_s,
                emission=cfg.emission,
                approval_threshold=cfg.approval_threshold,
                weights=cfg.weights,
            )
            async with self._sessions() as session:
                try:
                    row = await ledger.close_epoch(
                        session=session,
                        epoch=input.epoch,
                        workflow_id=input.workflow_id,
                        params=params,
                        now=now,
                    )
                except ledger.LedgerConflict as err:
                    raise ApplicationError(str(err), type="LedgerConflict") from err
                if row.workflow_id != input.workflow_id:
                    raise ApplicationError(
                        f"epoch {input.epoch} is settled by {row.workflow_id}",
                        type="EpochAlreadySettling",
                        non_retryable=True,
                    )
                if row.approval_required and row.approver is None and row.status == "closed":
                    row = await ledger.set_epoch_status(
                        session=session, epoch=input.epoch, status="awaiting_approval", now=now
                    )
            log.info(
                "epoch closed",
                epoch=input.epoch,
                payouts=row.payouts,
                payable=row.payable,
                approval_required=row.approval_required,
            )
            return EpochPlan(
                epoch=row.epoch,
                payouts=row.payouts,
                payable=row.payable,
                total=row.total,
                carried_over=row.carried_over,
                approval_required=row.approval_required,
                approval_timeout_s=cfg.approval_timeout_s,
                approver=row.approver,
                batch_size=cfg.batch_size,
                concurrency=cfg.concurrency,
            )

    @activity.defn(name="payout_reserve")
    async def reserve(self, input: ReserveInput) -> ReserveResult:
        """Reserve the epoch's payable total against the treasury (what does not fit is
        carried over with reason ``insufficient_treasury``)."""
        async with payout_step(f"reserve epoch {input.epoch}"):
            chain = await self._get_chain()
            balance = await chain_call(chain.treasury_balance)
            metrics.TREASURY_BALANCE.set(balance)
            async with self._sessions() as session:
                result = await ledger.reserve(
                    session=session, epoch=input.epoch, treasury_balance=balance, now=self._clock()
                )
                row = await ledger.get_epoch(session=session, epoch=input.epoch)
                if row is not None and row.status == "closed":
                    await ledger.set_epoch_status(
                        session=session, epoch=input.epoch, status="paying", now=self._clock()
                    )
            if result.excluded:
                log.warning(
                    "treasury short: payouts carried over",
                    epoch=input.epoch,
                    carried=len(result.excluded),
                    available=result.available,
                )
            return ReserveResult(
                reserved=result.reserved,
                available=result.available,
                excluded=result.excluded,
                excluded_amount=result.excluded_amount,
            )

    @activity.defn(name="payout_record_approval")
    async def record_approval(self, input: ApprovalRecord) -> ApproveResult:
        async with payout_step(f"record the approval of epoch {input.epoch}", heartbeat=False):
            async with self._sessions() as session:
                await ledger.set_epoch_status(
                    session=session,
                    epoch=input.epoch,
                    status="paying",
                    now=self._clock(),
                    approver=input.approver,
                    approved_at=input.approved_at,
                )
            log.info("epoch approved", epoch=input.epoch, approver=input.approver)
            return ApproveResult(
                epoch=input.epoch, approver=input.approver, approved_at=input.approved_at
            )

    @activity.defn(name="payout_pay_batch")
    async def pay_batch(self, input: PayBatchInput) -> PayBatchResult:
        """Pay one page of the epoch's payouts, each exactly once (see the module docstring)."""
        async with payout_step(f"pay batch {input.batch} of epoch {input.epoch}"):
            chain = await self._get_chain()
            with telemetry.span("payout.batch", epoch=input.epoch, batch=input.batch):
                result = await BatchPayment(
                    sessions=self._sessions,
                    config=self._config,
                    hooks=self._hooks,
                    clock=self._clock,
                    chain=chain,
                    input=input,
                ).run()
        metrics.PAYOUTS.labels(status="paid").inc(result.paid)
        metrics.PAYOUT_AMOUNT.labels(status="paid").inc(result.paid_amount)
        metrics.PAYOUTS.labels(status="failed").inc(len(result.failed))
        return result

    @activity.defn(name="payout_compensate")
    async def compensate(self, input: CompensateInput) -> CompensateResult:
        """Carry over what cannot be paid and release its reservation — but only what the chain
        proves will not land; a payout whose transaction may still land is waited for."""
        async with payout_step(f"compensate epoch {input.epoch}"):
            async with self._sessions() as session:
                if input.payout_ids is None:
                    rows = await ledger.unfinished(session=session, epoch=input.epoch)
                else:
                    rows = await ledger.get_payouts(session=session, ids=input.payout_ids)
            carry: list[tuple[str, str, str | None]] = []
            landed: list[tuple[str, str, int, str]] = []
            waiting: list[str] = []
            signed = [r for r in rows if r.status in ledger.IN_FLIGHT]
            statuses: dict[str, SignatureStatus | None] = {}
            height = 0
            if signed:  # only these need the chain (an uninitialized chain can still compensate)
                chain = await self._get_chain()
                statuses = await signature_statuses(
                    chain, [s for r in signed for s in r.signatures]
                )
                height = await chain_call(chain.block_height)
            for r in rows:
                if r.status == ledger.PREPARED:
                    carry.append((r.payout_id, input.reason, None))
                elif r.status == ledger.FAILED:
                    carry.append((r.payout_id, r.reason or input.reason, r.signature))
                elif r.status in ledger.IN_FLIGHT:
                    found = [statuses[s] for s in r.signatures if statuses.get(s) is not None]
                    ok = [s for s in found if s is not None and s.ok]
                    if ok:
                        landed.append((r.payout_id, ok[0].signature, ok[0].slot, paid_state(ok[0])))
                    elif found:  # landed, and failed: nothing moved
                        reason = failure_reason(found[-1].err if found[-1] else None)
                        carry.append((r.payout_id, reason, r.signature))
                    elif r.last_valid_height is not None and height > r.last_valid_height:
                        carry.append((r.payout_id, input.reason, r.signature))
                    else:
                        waiting.append(r.payout_id)
            now = self._clock()
            async with self._sessions() as session:
                if landed:
                    await ledger.mark_landed(session=session, landed=landed, now=now)
                amount = await ledger.carry_over(
                    session=session, epoch=input.epoch, carry=carry, now=now
                )
            metrics.PAYOUTS.labels(status="carried_over").inc(len(carry))
            metrics.PAYOUT_AMOUNT.labels(status="carried_over").inc(amount)
            log.info(
                "compensated",
                epoch=input.epoch,
                reason=input.reason,
                carried=len(carry),
                landed=len(landed),
                waiting=len(waiting),
            )
            if waiting:
                raise ApplicationError(
                    f"{len(waiting)} payouts may still land; waiting for their blockhash to expire",
                    type="PayoutsInFlight",
                    next_retry_delay=timedelta(seconds=2),
                )
            return CompensateResult(carried=len(carry), carried_amount=amount, landed=len(landed))

    @activity.defn(name="payout_reconcile")
    async def reconcile(self, input: ReconcileInput) -> ReconcileResult:
        """Chain against ledger: every paid row has its transfer (amount, recipient, memo) and
        every memo'd transfer of the epoch has its paid row; nothing landed twice."""
        async with payout_step(f"reconcile epoch {input.epoch}"):
            chain = await self._get_chain()
            async with self._sessions() as session:
                epoch = await ledger.get_epoch(session=session, epoch=input.epoch)
                paid = await ledger.paid_rows(session=session, epoch=input.epoch)
            since = ledger.utc(epoch.closed_at) - RECONCILE_LOOKBACK if epoch is not None else None
            prefix = f"xpd-{input.epoch}-"
            transfers: list[OnChainTransfer] = await chain_call(
                lambda: chain.treasury_transfers(since=since, memo_contains=prefix)
            )
            ours = [
                t
                for t in transfers
                if t.err is None and t.transfer.memo and t.transfer.memo.startswith(prefix)
            ]
            await self._hooks.at(RECONCILING, [r.payout_id for r in paid])
            by_sig = {t.signature: t for t in ours}
            memo_count: dict[str, int] = {}
            for t in ours:
                memo = t.transfer.memo or ""
                memo_count[memo] = memo_count.get(memo, 0) + 1
            missing: list[str] = []
            mismatched: list[str] = []
            for row in paid:
                found = by_sig.get(row.signature or "") or await chain_call(
                    functools.partial(fetch_transfer, chain, row.signature or "")
                )
                if found is None or found.err is not None:
                    missing.append(row.payout_id)
                    continue
                t = found
                wallet = Pubkey.from_string(row.wallet) if row.wallet else None
                if (
                    t.transfer.memo != row.payout_id
                    or t.transfer.amount != row.amount
                    or wallet is None
                    or t.transfer.dest != chain.recipient_account(wallet)
                    or t.transfer.mint != str(chain.mint)
                ):
                    mismatched.append(row.payout_id)
            paid_sigs = {(r.payout_id, r.signature) for r in paid}
            unexpected = sorted(
                t.signature for t in ours if (t.transfer.memo, t.signature) not in paid_sigs
            )
            duplicates = sorted(m for m, n in memo_count.items() if n > 1)
            to_finalize: list[str] = []
            confirmed = [r for r in paid if r.status == ledger.CONFIRMED and r.signature]
            if confirmed:
                statuses = await signature_statuses(chain, [r.signature or "" for r in confirmed])
                to_finalize = [
                    r.payout_id
                    for r in confirmed
                    if (s := statuses.get(r.signature or "")) and s.confirmation == "finalized"
                ]
                async with self._sessions() as session:
                    await ledger.finalize(session=session, ids=to_finalize, now=self._clock())
            ok = not (missing or mismatched or unexpected or duplicates)
            result = ReconcileResult(
                epoch=input.epoch,
                ok=ok,
                paid_rows=len(paid),
                transfers=len(ours),
                finalized=len(to_finalize),
                missing=missing,
                mismatched=mismatched,
                unexpected=unexpected,
                duplicates=duplicates,
            )
            async with self._sessions() as session:
                await ledger.set_epoch_status(
                    session=session,
                    epoch=input.epoch,
                    status="reconciling" if ok else "reconcile_failed",
                    now=self._clock(),
                    reconciled=ok,
                    reconcile_report=result.model_dump(mode="json"),
                )
            (log.info if ok else log.error)(
                "reconciled", epoch=input.epoch, ok=ok, paid=len(paid), transfers=len(ours)
            )
            return result

    @activity.defn(name="payout_finish")
    async def finish(self, input: FinishEpochInput) -> FinishEpochResult:
        async with payout_step(f"finish epoch {input.epoch}", heartbeat=False):
            await self._hooks.at(FINISHING, [])
            async with self._sessions() as session:
                summary = await ledger.summarize(session=session, epoch=input.epoch)
                paid = summary.get("confirmed_count", 0) + summary.get("finalized_count", 0)
                paid_amount = summary.get("confirmed_amount", 0) + summary.get(
                    "finalized_amount", 0
                )
                status = {
                    PayoutStage.SETTLED: "settled",
                    PayoutStage.EXPIRED: "expired",
                }.get(input.stage, "failed")
                if input.reconciled is False:
                    status = "reconcile_failed"
                now = self._clock()
                values: dict[str, Any] = {
                    "paid": paid_amount,
                    "carried_over": summary.get("carried_over_amount", 0),
                    "settled_at": now,
                }
                if input.error:
                    values["error"] = input.error
                await ledger.set_epoch_status(
                    session=session, epoch=input.epoch, status=status, now=now, **values
                )
            metrics.PAYOUT_EPOCHS.labels(status=status).inc()
            metrics.PAYOUT_LAST_EPOCH.set(input.epoch)
            return FinishEpochResult(
                epoch=input.epoch,
                payouts=sum(v for k, v in summary.items() if k.endswith("_count")),
                paid=paid,
                paid_amount=paid_amount,
                carried_over=summary.get("carried_over_count", 0),
                carried_amount=summary.get("carried_over_amount", 0),
            )
