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

import asyncio
import base64
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from solders.pubkey import Pubkey
from temporalio import activity
from temporalio.exceptions import ApplicationError

from xpando import rewards
from xpando.chain import (
    READ_ATTEMPTS,
    Chain,
    ChainError,
    ChainHandle,
    ChainNotInitialized,
    ChainUnavailable,
    OnChainTransfer,
    SignatureStatus,
    TransactionRejected,
    failure_reason,
    signature_of,
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
    PayoutFailure,
    PayoutStage,
    ReconcileInput,
    ReconcileResult,
    ReserveInput,
    ReserveResult,
)
from xpando.db import SessionFactory, ledger
from xpando.db.ledger_models import Payout
from xpando.logs import get_logger
from xpando.settings import Settings

log = get_logger(__name__)

HEARTBEAT_EVERY_S = 1.0
MAX_SIGNING_ROUNDS = 8  # re-signs within one attempt before handing back to Temporal's retry
MAX_POLL_BACKOFF_S = 5.0
COMMITMENT_RANK = {"processed": 0, "confirmed": 1, "finalized": 2}
RECONCILE_LOOKBACK = timedelta(minutes=5)  # chain clocks vs ours


@dataclass(frozen=True)
class PayoutConfig:
    epoch_s: int = 3600
    emission: int = 1_000_000_000
    approval_threshold: int = 10_000_000_000
    approval_timeout_s: float = 86400.0
    concurrency: int = 4
    batch_size: int = 50
    weights: rewards.RewardWeights = field(default_factory=rewards.RewardWeights)
    commitment: str = "confirmed"
    poll_s: float = 0.4  # between status polls while confirming
    rebroadcast_s: float = 2.0  # send the same bytes again while unconfirmed and valid

    @classmethod
    def from_settings(cls, settings: Settings) -> PayoutConfig:
        return cls(
            epoch_s=settings.payout_epoch_s,
            emission=settings.payout_emission,
            approval_threshold=settings.payout_approval_threshold,
            approval_timeout_s=settings.payout_approval_timeout_s,
            concurrency=settings.payout_concurrency,
            batch_size=settings.payout_batch_size,
            weights=rewards.RewardWeights(
                reputation_weight=settings.payout_reputation_weight,
                price_weight=settings.payout_price_weight,
            ),
            commitment=settings.chain_commitment,
            poll_s=0.0 if settings.chain == "embedded" else 0.4,
        )


# Step boundaries where tests inject faults (kill the worker, drain the treasury, ...).
START, AFTER_SIGN, AFTER_SEND, CONFIRMING = "start", "after_sign", "after_send", "confirming"


class PayoutHooks:
    """Called at each step boundary of ``pay_batch``; production uses this no-op."""

    async def at(self, boundary: str, payout_ids: Sequence[str]) -> None:
        return None


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
        try:
            return await self._chain.get()
        except ChainNotInitialized as err:
            raise ApplicationError(
                str(err), type="ChainNotInitialized", non_retryable=True
            ) from err

    def _current_epoch(self) -> int:
        return rewards.epoch_of(self._clock().timestamp(), self._config.epoch_s)

    # --- activities -----------------------------------------------------------------------------

    @activity.defn(name="payout_due_epochs")
    async def due_epochs(self, input: DueEpochsInput) -> DueEpochsResult:
        current = self._current_epoch()
        async with self._sessions() as session:
            epochs = await ledger.due_epochs(
                session=session, current_epoch=current, epoch_s=self._config.epoch_s
            )
        return DueEpochsResult(current_epoch=current, epochs=epochs)

    @activity.defn(name="payout_close_epoch")
    async def close_epoch(self, input: CloseEpochInput) -> EpochPlan:
        """Close the epoch (once): split its emission, create its payout rows."""
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
        chain = await self._get_chain()
        balance = await _chain_call(chain.treasury_balance)
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
        chain = await self._get_chain()
        async with _heartbeating():
            return await _BatchPayment(self, chain, input).run()

    @activity.defn(name="payout_compensate")
    async def compensate(self, input: CompensateInput) -> CompensateResult:
        """Carry over what cannot be paid and release its reservation — but only what the chain
        proves will not land; a payout whose transaction may still land is waited for."""
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
            statuses = await _statuses(chain, [s for r in signed for s in r.signatures])
            height = await _chain_call(chain.block_height)
        for r in rows:
            if r.status == ledger.PREPARED:
                carry.append((r.payout_id, input.reason, None))
            elif r.status == ledger.FAILED:
                carry.append((r.payout_id, r.reason or input.reason, r.signature))
            elif r.status in ledger.IN_FLIGHT:
                found = [statuses[s] for s in r.signatures if statuses.get(s) is not None]
                ok = [s for s in found if s is not None and s.ok]
                if ok:
                    landed.append((r.payout_id, ok[0].signature, ok[0].slot, _paid_state(ok[0])))
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
        chain = await self._get_chain()
        async with self._sessions() as session:
            epoch = await ledger.get_epoch(session=session, epoch=input.epoch)
            paid = await ledger.paid_rows(session=session, epoch=input.epoch)
        since = ledger.utc(epoch.closed_at) - RECONCILE_LOOKBACK if epoch is not None else None
        prefix = f"xpd-{input.epoch}-"
        transfers: list[OnChainTransfer] = await _chain_call(
            lambda: chain.treasury_transfers(since=since, memo_contains=prefix)
        )
        ours = [
            t
            for t in transfers
            if t.err is None and t.transfer.memo and t.transfer.memo.startswith(prefix)
        ]
        by_sig = {t.signature: t for t in ours}
        memo_count: dict[str, int] = {}
        for t in ours:
            memo = t.transfer.memo or ""
            memo_count[memo] = memo_count.get(memo, 0) + 1
        missing: list[str] = []
        mismatched: list[str] = []
        for row in paid:
            found = by_sig.get(row.signature or "") or await _chain_call(
                functools.partial(_fetch, chain, row.signature or "")
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
            statuses = await _statuses(chain, [r.signature or "" for r in confirmed])
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
        async with self._sessions() as session:
            summary = await ledger.summarize(session=session, epoch=input.epoch)
            paid = summary.get("confirmed_count", 0) + summary.get("finalized_count", 0)
            paid_amount = summary.get("confirmed_amount", 0) + summary.get("finalized_amount", 0)
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
        return FinishEpochResult(
            epoch=input.epoch,
            payouts=sum(v for k, v in summary.items() if k.endswith("_count")),
            paid=paid,
            paid_amount=paid_amount,
            carried_over=summary.get("carried_over_count", 0),
            carried_amount=summary.get("carried_over_amount", 0),
        )


# --- one batch ---------------------------------------------------------------------------------


class _BatchPayment:
    """The state machine of one ``pay_batch`` attempt over one page of payouts."""

    def __init__(self, owner: PayoutActivities, chain: Chain, input: PayBatchInput) -> None:
        self.o = owner
        self.chain = chain
        self.input = input
        self.cfg = owner._config
        self.rows: dict[str, Payout] = {}
        self.result = PayBatchResult()
        self.failed: list[PayoutFailure] = []
        self.paid = 0
        self.paid_amount = 0
        self.resigned = 0
        self.resent = 0
        self.contended = 0

    async def run(self) -> PayBatchResult:
        await self.o._hooks.at(START, [])
        async with self.o._sessions() as session:
            page = await ledger.batch(
                session=session,
                epoch=self.input.epoch,
                index=self.input.batch,
                size=self.input.batch_size,
            )
        skipped = 0
        for r in page:
            if r.status == ledger.FAILED:
                self.failed.append(
                    PayoutFailure(payout_id=r.payout_id, reason=r.reason or "failed")
                )
            elif r.status in (ledger.PREPARED, *ledger.IN_FLIGHT) and r.wallet:
                self.rows[r.payout_id] = r
            else:
                skipped += 1
        to_sign = await self._resolve(list(self.rows.values()))
        for _ in range(MAX_SIGNING_ROUNDS):
            if not self.rows:
                break
            await self._sign(to_sign)
            to_sign = await self._confirm()
        if self.rows:
            raise ApplicationError(
                f"{len(self.rows)} payouts still unconfirmed after {MAX_SIGNING_ROUNDS} rounds",
                type="PayoutsUnconfirmed",
            )
        if self.contended:
            raise ApplicationError(
                f"{self.contended} payouts were re-signed by another attempt; re-reading",
                type="PayoutContended",
            )
        return PayBatchResult(
            paid=self.paid,
            paid_amount=self.paid_amount,
            failed=self.failed,
            skipped=skipped,
            resigned=self.resigned,
            resent=self.resent,
        )

    # -- steps -------------------------------------------------------------------------------------

    async def _resolve(self, rows: list[Payout]) -> list[Payout]:
        """Status first: settle what already landed; return the rows that need (re)signing and
        send the stored bytes of the rest again."""
        signed = [r for r in rows if r.signatures]
        to_sign = [r for r in rows if not r.signatures]
        if not signed:
            return to_sign
        statuses = await _statuses(self.chain, [s for r in signed for s in r.signatures])
        await self._settle(signed, statuses)
        unknown = [r for r in signed if r.payout_id in self.rows and not self._pending(r, statuses)]
        if unknown:
            height = await _chain_call(self.chain.block_height)
            resend = [r for r in unknown if not _expired(r, height)]
            to_sign += [r for r in unknown if _expired(r, height)]
            if resend:
                self.resent += len(resend)
                await self._send(resend)
        return to_sign

    def _pending(self, row: Payout, statuses: dict[str, SignatureStatus | None]) -> bool:
        """Landed, but not yet at the configured commitment."""
        return any(statuses.get(s) is not None for s in row.signatures)

    async def _settle(
        self, rows: list[Payout], statuses: dict[str, SignatureStatus | None]
    ) -> None:
        """Record every row whose transaction landed (ok at commitment, or failed)."""
        want = COMMITMENT_RANK.get(self.cfg.commitment, 1)
        landed: list[tuple[str, str, int, str]] = []
        failed: list[tuple[str, str, str]] = []
        for r in rows:
            found = [st for s in r.signatures if (st := statuses.get(s)) is not None]
            ok = [st for st in found if st.ok]
            if ok and COMMITMENT_RANK.get(ok[0].confirmation, 0) >= want:
                landed.append((r.payout_id, ok[0].signature, ok[0].slot, _paid_state(ok[0])))
            elif found and not ok:
                reason = failure_reason(found[-1].err)
                failed.append((r.payout_id, reason, str(found[-1].err)))
        if not (landed or failed):
            return
        async with self.o._sessions() as session:
            if landed:
                await ledger.mark_landed(session=session, landed=landed, now=self.o._clock())
            if failed:
                await ledger.mark_failed(session=session, failed=failed, now=self.o._clock())
        for pid, *_ in landed:
            row = self.rows.pop(pid)
            self.paid += 1
            self.paid_amount += row.amount
        for pid, reason, _ in failed:
            self.rows.pop(pid)
            self.failed.append(PayoutFailure(payout_id=pid, reason=reason))

    async def _sign(self, rows: list[Payout]) -> None:
        """Sign with a fresh blockhash and store the bytes (compare-and-set) before any send."""
        rows = [r for r in rows if r.payout_id in self.rows]
        if not rows:
            return
        blockhash = await _chain_call(self.chain.latest_blockhash)
        signed: list[ledger.Signed] = []
        for r in rows:
            raw = self.chain.build_payout(
                wallet=Pubkey.from_string(r.wallet or ""),
                amount=r.amount,
                memo=r.payout_id,
                blockhash=blockhash.blockhash,
            )
            sig = signature_of(raw)
            signed.append(
                ledger.Signed(
                    payout_id=r.payout_id,
                    previous=r.signature,
                    signature=sig,
                    tx_b64=base64.b64encode(raw).decode(),
                    blockhash=blockhash.blockhash,
                    last_valid_height=blockhash.last_valid_block_height,
                    signatures=[*r.signatures, sig],
                )
            )
        async with self.o._sessions() as session:
            stored = await ledger.store_signed(session=session, signed=signed, now=self.o._clock())
        for s in signed:
            row = self.rows[s.payout_id]
            if s.payout_id not in stored:
                self.rows.pop(s.payout_id)  # another attempt re-signed it: leave it to that one
                self.contended += 1
                continue
            if row.signatures:
                self.resigned += 1
            row.signature, row.tx = s.signature, s.tx_b64
            row.blockhash, row.last_valid_height = s.blockhash, s.last_valid_height
            row.signatures = s.signatures
            row.status = ledger.SIGNED
        ready = [self.rows[s.payout_id] for s in signed if s.payout_id in self.rows]
        await self.o._hooks.at(AFTER_SIGN, [r.payout_id for r in ready])
        await self._send(ready)

    async def _send(self, rows: list[Payout]) -> None:
        if not rows:
            return
        results = await self.chain.send_many([base64.b64decode(r.tx or "") for r in rows])
        sent: list[tuple[str, str]] = []
        rejected: list[tuple[str, str, str]] = []
        for r, res in zip(rows, results, strict=True):
            if isinstance(res, str) or (
                isinstance(res, TransactionRejected) and res.already_processed
            ):
                sent.append((r.payout_id, r.signature or ""))
            elif isinstance(res, TransactionRejected) and not res.blockhash_expired:
                # Preflight refused it: this transaction did not and will not land.
                rejected.append((r.payout_id, failure_reason(res.err), str(res.err)))
            # Expired blockhash or chain unavailable: the confirm loop decides.
        await self.o._hooks.at(AFTER_SEND, [pid for pid, _ in sent])
        async with self.o._sessions() as session:
            if sent:
                await ledger.mark_sent(session=session, sent=sent, now=self.o._clock())
            if rejected:
                await ledger.mark_failed(session=session, failed=rejected, now=self.o._clock())
        for pid, reason, _ in rejected:
            self.rows.pop(pid, None)
            self.failed.append(PayoutFailure(payout_id=pid, reason=reason))
        for pid, _ in sent:
            if pid in self.rows:
                self.rows[pid].status = ledger.SENT

    async def _confirm(self) -> list[Payout]:
        """Poll until every row landed or its blockhash expired; returns the expired ones."""
        last_send = time.monotonic()
        backoff = self.cfg.poll_s or 0.05
        while self.rows:
            await self.o._hooks.at(CONFIRMING, list(self.rows))
            rows = list(self.rows.values())
            try:
                statuses = await _statuses(self.chain, [s for r in rows for s in r.signatures])
            except ApplicationError as err:
                if err.type != "ChainUnavailable":
                    raise
                # Rate limited or timed out: back off (honouring Retry-After) and poll again.
                hint = err.next_retry_delay.total_seconds() if err.next_retry_delay else 0.0
                log.warning("status poll failed; retrying", error=err.message)
                await asyncio.sleep(min(max(backoff, hint), MAX_POLL_BACKOFF_S))
                backoff *= 1.5
                continue
            backoff = self.cfg.poll_s or 0.05
            await self._settle(rows, statuses)
            unknown = [
                r for r in rows if r.payout_id in self.rows and not self._pending(r, statuses)
            ]
            if unknown:
                try:
                    height = await self.chain.block_height()
                except ChainUnavailable:
                    await asyncio.sleep(self.cfg.poll_s or 0.05)
                    continue
                expired = [r for r in unknown if _expired(r, height)]
                if expired:
                    return expired
                if time.monotonic() - last_send > self.cfg.rebroadcast_s:
                    self.resent += len(unknown)
                    await self._send(unknown)
                    last_send = time.monotonic()
            if self.rows:
                await asyncio.sleep(self.cfg.poll_s or 0.01)
        return []


# --- helpers -------------------------------------------------------------------------------------


def _expired(row: Payout, height: int) -> bool:
    """The row's transaction can no longer land: its blockhash is past its last valid height."""
    return row.last_valid_height is None or height > row.last_valid_height


def _paid_state(status: SignatureStatus) -> str:
    return ledger.FINALIZED if status.confirmation == "finalized" else ledger.CONFIRMED


async def _chain_call(fn: Callable[[], Awaitable[Any]]) -> Any:
    """A chain call whose failure becomes a Temporal ApplicationError with a type."""
    try:
        return await fn()
    except ChainUnavailable as err:
        raise ApplicationError(
            str(err),
            type="ChainUnavailable",
            next_retry_delay=(timedelta(seconds=err.retry_after_s) if err.retry_after_s else None),
        ) from err
    except ChainNotInitialized as err:
        raise ApplicationError(str(err), type="ChainNotInitialized", non_retryable=True) from err
    except ChainError as err:
        raise ApplicationError(str(err), type="ChainError") from err


async def _fetch(chain: Chain, signature: str) -> OnChainTransfer | None:
    """One transaction, read again over a few transient failures."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return await chain.transaction(signature)
        except ChainUnavailable:
            if attempt + 1 == READ_ATTEMPTS:
                raise
            await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
    return None


async def _statuses(chain: Chain, signatures: Sequence[str]) -> dict[str, SignatureStatus | None]:
    if not signatures:
        return {}
    found = await _chain_call(lambda: chain.statuses(list(signatures)))
    return dict(zip(signatures, found, strict=True))


@asynccontextmanager
async def _heartbeating() -> Any:
    """Heartbeat every second while the body runs, so a dead worker is noticed quickly and a
    slow RPC call does not look like one."""

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
