"""PayoutSagaWorkflow: settle one epoch's XPD payouts, paying every node exactly once.

One workflow per epoch, id ``payout-epoch-<n>`` (so settling twice is one saga):

1. close the epoch (split its emission, create the payout rows) and reserve the payable total
   from the treasury ledger — what the treasury cannot cover is carried over at once;
2. above the approval threshold, wait for the ``approve`` update (it carries the approver);
   if none comes in time, compensate: release the reservation, carry everything over;
3. pay in batches, at most ``concurrency`` in flight (``pay_batch`` is exactly-once per
   payout, see ``activities/payouts.py``);
4. compensate what could not be paid (insufficient treasury, frozen or invalid recipient):
   release its reservation, carry it to the next epoch with the reason;
5. reconcile chain against ledger; a mismatch fails the saga loudly.

Anything unexpected (including cancellation) runs the compensation for every unfinished payout
before the error propagates; compensation waits out transactions that might still land.

With ``epoch=None`` (what the Temporal Schedule starts) it is a tick: it starts
``payout-epoch-<n>`` for every ended epoch that is due and returns.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.payouts import PayoutActivities
    from xpando.contracts_payouts import (
        ApprovalRecord,
        ApproveInput,
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
        PayoutProgress,
        PayoutSagaInput,
        PayoutSagaResult,
        PayoutStage,
        ReconcileInput,
        ReconcileResult,
        ReserveInput,
        ReserveResult,
        epoch_workflow_id,
    )
    from xpando.db.errors import REFUSAL_TYPES

# A worker that dies during a step is noticed in seconds, never when a minutes-long timeout
# expires. Steps whose work grows with the epoch or waits on the chain (finding the due epochs,
# closing, reserving, paying, compensating, reconciling) heartbeat every second while they run
# (``payout_step``): they get STEP_HEARTBEAT, and a start-to-close timeout that only bounds a
# live worker that hangs. The two short ledger writes (an approval, an epoch's outcome) do not
# heartbeat: their start-to-close timeout is short instead.
STEP_HEARTBEAT = timedelta(seconds=5)
LEDGER_TIMEOUT = timedelta(seconds=10)
SCAN_TIMEOUT = timedelta(minutes=5)  # ledger scans and the reconciliation's chain scan
PAY_BATCH_TIMEOUT = timedelta(minutes=10)
COMPENSATE_TIMEOUT = timedelta(minutes=2)
# What no retry can fix fails the step at once (raised non-retryable with these types by the
# activities; listed here too, so the policy reads whole): an epoch not ended or settled by
# another saga, a chain not set up, a transaction the chain refused, a value the database
# refuses. A chain that is unavailable, a concurrent writer, or a dead worker is retried until
# the step lands: every write is idempotent.
BUSINESS_ERRORS = [
    "EpochNotEnded",
    "EpochAlreadySettling",
    "ChainNotInitialized",
    "TransactionRejected",
    *REFUSAL_TYPES,
]
LEDGER_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=BUSINESS_ERRORS,
)
PAY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=BUSINESS_ERRORS,
)
# Compensation waits (by retrying) until in-flight transactions have landed or expired.
COMPENSATE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=BUSINESS_ERRORS,
)


@workflow.defn
class PayoutSagaWorkflow:
    def __init__(self) -> None:
        self._epoch: int | None = None
        self._stage = PayoutStage.STARTING
        self._plan: EpochPlan | None = None
        self._approver: str | None = None
        self._approved_at: datetime | None = None
        self._approval_note = ""
        self._deadline: datetime | None = None
        self._batches = 0
        self._batches_done = 0
        self._paid = 0
        self._failed = 0
        self._carried = 0

    @workflow.run
    async def run(self, input: PayoutSagaInput) -> PayoutSagaResult:
        if input.epoch is None:
            return await self._tick()
        epoch = self._epoch = input.epoch

        self._stage = PayoutStage.CLOSING
        plan: EpochPlan = await workflow.execute_activity_method(
            PayoutActivities.close_epoch,
            CloseEpochInput(epoch=epoch, workflow_id=workflow.info().workflow_id),
            start_to_close_timeout=SCAN_TIMEOUT,
            heartbeat_timeout=STEP_HEARTBEAT,
            retry_policy=LEDGER_RETRY,
        )
        self._plan = plan
        self._approver = plan.approver
        reconciled: bool | None = None
        try:
            if plan.payable > 0:
                self._stage = PayoutStage.RESERVING
                reserved: ReserveResult = await workflow.execute_activity_method(
                    PayoutActivities.reserve,
                    ReserveInput(epoch=epoch),
                    start_to_close_timeout=SCAN_TIMEOUT,
                    heartbeat_timeout=STEP_HEARTBEAT,
                    retry_policy=LEDGER_RETRY,
                )
                self._carried += len(reserved.excluded)
                needs_approval = plan.approval_required and self._approver is None
                if needs_approval and not await self._await_approval(plan):
                    await self._compensate(epoch, "approval_timeout", None)
                    return await self._finish(PayoutStage.EXPIRED)
                self._stage = PayoutStage.PAYING
                failures = await self._pay(plan)
                if failures:
                    self._stage = PayoutStage.COMPENSATING
                    for reason, ids in sorted(failures.items()):
                        await self._compensate(epoch, reason, ids)
            self._stage = PayoutStage.RECONCILING
            report: ReconcileResult = await workflow.execute_activity_method(
                PayoutActivities.reconcile,
                ReconcileInput(epoch=epoch),
                start_to_close_timeout=SCAN_TIMEOUT,
                heartbeat_timeout=STEP_HEARTBEAT,
                retry_policy=LEDGER_RETRY,
            )
            reconciled = report.ok
        except (Exception, asyncio.CancelledError) as err:  # cancellation is not an Exception
            # (Not BaseException: the SDK evicts a cached workflow by raising one, which must
            # pass through untouched.)
            self._stage = PayoutStage.COMPENSATING
            await asyncio.shield(
                asyncio.ensure_future(self._compensate(epoch, "saga_aborted", None))
            )
            await asyncio.shield(
                asyncio.ensure_future(self._finish(PayoutStage.FAILED, error=str(err)))
            )
            raise
        if not reconciled:
            await self._finish(PayoutStage.FAILED, reconciled=False)
            raise ApplicationError(
                f"epoch {epoch}: chain and ledger disagree: {report.model_dump_json()}",
                type="ReconciliationMismatch",
                non_retryable=True,
            )
        return await self._finish(PayoutStage.SETTLED, reconciled=True)

    # --- queries and updates ----------------------------------------------------------------------

    @workflow.query
    def progress(self) -> PayoutProgress:
        plan = self._plan
        return PayoutProgress(
            epoch=self._epoch,
            stage=self._stage,
            payouts=plan.payouts if plan else 0,
            total=plan.total if plan else 0,
            approval_required=plan.approval_required if plan else False,
            approval_deadline=self._deadline,
            approver=self._approver,
            batches=self._batches,
            batches_done=self._batches_done,
            paid=self._paid,
            failed=self._failed,
            carried_over=self._carried,
        )

    @workflow.update
    async def approve(self, input: ApproveInput) -> ApproveResult:
        self._approver = input.approver
        self._approval_note = input.note
        self._approved_at = workflow.now()
        assert self._epoch is not None
        return ApproveResult(
            epoch=self._epoch, approver=input.approver, approved_at=self._approved_at
        )

    @approve.validator
    def _validate_approve(self, input: ApproveInput) -> None:
        if self._stage != PayoutStage.AWAITING_APPROVAL or self._approver is not None:
            raise ApplicationError(
                f"epoch {self._epoch} is not awaiting approval (stage {self._stage.value})",
                type="NotAwaitingApproval",
            )

    # --- steps ------------------------------------------------------------------------------------

    async def _tick(self) -> PayoutSagaResult:
        self._stage = PayoutStage.SCHEDULED
        due: DueEpochsResult = await workflow.execute_activity_method(
            PayoutActivities.due_epochs,
            DueEpochsInput(),
            start_to_close_timeout=SCAN_TIMEOUT,
            heartbeat_timeout=STEP_HEARTBEAT,
            retry_policy=LEDGER_RETRY,
        )
        started: list[int] = []
        for epoch in due.epochs:
            try:
                await workflow.start_child_workflow(
                    PayoutSagaWorkflow.run,
                    PayoutSagaInput(epoch=epoch),
                    id=epoch_workflow_id(epoch),
                    parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                )
                started.append(epoch)
            except WorkflowAlreadyStartedError:
                workflow.logger.info("epoch %s is already being settled", epoch)
        return PayoutSagaResult(epoch=None, stage=PayoutStage.SCHEDULED, started=started)

    async def _await_approval(self, plan: EpochPlan) -> bool:
        self._stage = PayoutStage.AWAITING_APPROVAL
        timeout = timedelta(seconds=plan.approval_timeout_s)
        self._deadline = workflow.now() + timeout
        try:
            await workflow.wait_condition(lambda: self._approver is not None, timeout=timeout)
        except TimeoutError:
            return False
        assert self._approver is not None and self._epoch is not None
        await workflow.execute_activity_method(
            PayoutActivities.record_approval,
            ApprovalRecord(
                epoch=self._epoch,
                approver=self._approver,
                approved_at=self._approved_at or workflow.now(),
                note=self._approval_note,
            ),
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=LEDGER_RETRY,
        )
        return True

    async def _pay(self, plan: EpochPlan) -> dict[str, list[str]]:
        """Every batch, at most ``plan.concurrency`` at once; returns failures by reason."""
        assert self._epoch is not None
        epoch = self._epoch
        self._batches = -(-plan.payouts // plan.batch_size)
        gate = asyncio.Semaphore(plan.concurrency)
        failures: dict[str, list[str]] = {}

        async def one(index: int) -> None:
            async with gate:
                result: PayBatchResult = await workflow.execute_activity_method(
                    PayoutActivities.pay_batch,
                    PayBatchInput(epoch=epoch, batch=index, batch_size=plan.batch_size),
                    start_to_close_timeout=PAY_BATCH_TIMEOUT,
                    heartbeat_timeout=STEP_HEARTBEAT,
                    retry_policy=PAY_RETRY,
                    summary=f"pay batch {index + 1}/{self._batches} of epoch {epoch}",
                )
            self._batches_done += 1
            self._paid += result.paid
            self._failed += len(result.failed)
            for f in result.failed:
                failures.setdefault(f.reason, []).append(f.payout_id)

        await asyncio.gather(*(one(i) for i in range(self._batches)))
        return failures

    async def _compensate(self, epoch: int, reason: str, ids: list[str] | None) -> None:
        result: CompensateResult = await workflow.execute_activity_method(
            PayoutActivities.compensate,
            CompensateInput(epoch=epoch, reason=reason, payout_ids=ids),
            start_to_close_timeout=COMPENSATE_TIMEOUT,
            heartbeat_timeout=STEP_HEARTBEAT,
            retry_policy=COMPENSATE_RETRY,
        )
        self._carried += result.carried
        self._paid += result.landed

    async def _finish(
        self, stage: PayoutStage, *, reconciled: bool | None = None, error: str | None = None
    ) -> PayoutSagaResult:
        assert self._epoch is not None
        done: FinishEpochResult = await workflow.execute_activity_method(
            PayoutActivities.finish,
            FinishEpochInput(epoch=self._epoch, stage=stage, reconciled=reconciled, error=error),
            start_to_close_timeout=LEDGER_TIMEOUT,
            retry_policy=LEDGER_RETRY,
        )
        self._stage = stage
        return PayoutSagaResult(
            epoch=self._epoch,
            stage=stage,
            payouts=done.payouts,
            paid=done.paid,
            paid_amount=done.paid_amount,
            carried_over=done.carried_over,
            carried_amount=done.carried_amount,
            approver=self._approver,
            reconciled=reconciled,
        )
