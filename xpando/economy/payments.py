"""Paying an epoch on chain exactly once: the configuration, the state machine of one batch
(:class:`BatchPayment`) and the chain-call helpers the payout activities share. The protocol is
described in :mod:`activities.payouts`."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from solders.pubkey import Pubkey
from temporalio.exceptions import ApplicationError

from xpando.chain import (
    READ_ATTEMPTS,
    Chain,
    ChainError,
    ChainUnavailable,
    OnChainTransfer,
    SignatureStatus,
    TransactionRejected,
    failure_reason,
    signature_of,
)
from xpando.contracts_payouts import (
    PayBatchInput,
    PayBatchResult,
    PayoutFailure,
)
from xpando.db import SessionFactory, ledger
from xpando.db.errors import fail_fast
from xpando.db.ledger_models import Payout
from xpando.economy import rewards
from xpando.logs import get_logger
from xpando.settings import Settings
from xpando.temporal import heartbeating

log = get_logger(__name__)

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


# Step boundaries where tests inject faults (kill the worker, drain the treasury, ...): in
# ``pay_batch``, then in the saga's last two steps.
START, AFTER_SIGN, AFTER_SEND, CONFIRMING = "start", "after_sign", "after_send", "confirming"
RECONCILING, FINISHING = "reconciling", "finishing"


class PayoutHooks:
    """Called at each step boundary (above); production uses this no-op."""

    async def at(self, boundary: str, payout_ids: Sequence[str]) -> None:
        return None


# --- one batch ---------------------------------------------------------------------------------


class BatchPayment:
    """The state machine of one ``pay_batch`` attempt over one page of payouts."""

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        config: PayoutConfig,
        hooks: PayoutHooks,
        clock: Callable[[], datetime],
        chain: Chain,
        input: PayBatchInput,
    ) -> None:
        self.sessions = sessions
        self.hooks = hooks
        self.clock = clock
        self.chain = chain
        self.input = input
        self.cfg = config
        self.rows: dict[str, Payout] = {}
        self.result = PayBatchResult()
        self.failed: list[PayoutFailure] = []
        self.paid = 0
        self.paid_amount = 0
        self.resigned = 0
        self.resent = 0
        self.contended = 0

    async def run(self) -> PayBatchResult:
        await self.hooks.at(START, [])
        async with self.sessions() as session:
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
        statuses = await signature_statuses(self.chain, [s for r in signed for s in r.signatures])
        await self._settle(signed, statuses)
        unknown = [r for r in signed if r.payout_id in self.rows and not self._pending(r, statuses)]
        if unknown:
            height = await chain_call(self.chain.block_height)
            resend = [r for r in unknown if not past_valid_height(r, height)]
            to_sign += [r for r in unknown if past_valid_height(r, height)]
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
                landed.append((r.payout_id, ok[0].signature, ok[0].slot, paid_state(ok[0])))
            elif found and not ok:
                reason = failure_reason(found[-1].err)
                failed.append((r.payout_id, reason, str(found[-1].err)))
        if not (landed or failed):
            return
        async with self.sessions() as session:
            if landed:
                await ledger.mark_landed(session=session, landed=landed, now=self.clock())
            if failed:
                await ledger.mark_failed(session=session, failed=failed, now=self.clock())
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
        blockhash = await chain_call(self.chain.latest_blockhash)
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
        async with self.sessions() as session:
            stored = await ledger.store_signed(session=session, signed=signed, now=self.clock())
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
        await self.hooks.at(AFTER_SIGN, [r.payout_id for r in ready])
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
        await self.hooks.at(AFTER_SEND, [pid for pid, _ in sent])
        async with self.sessions() as session:
            if sent:
                await ledger.mark_sent(session=session, sent=sent, now=self.clock())
            if rejected:
                await ledger.mark_failed(session=session, failed=rejected, now=self.clock())
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
            await self.hooks.at(CONFIRMING, list(self.rows))
            rows = list(self.rows.values())
            try:
                statuses = await signature_statuses(
                    self.chain, [s for r in rows for s in r.signatures]
                )
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
                expired = [r for r in unknown if past_valid_height(r, height)]
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


def past_valid_height(row: Payout, height: int) -> bool:
    """The row's transaction can no longer land: its blockhash is past its last valid height."""
    return row.last_valid_height is None or height > row.last_valid_height


def paid_state(status: SignatureStatus) -> str:
    return ledger.FINALIZED if status.confirmation == "finalized" else ledger.CONFIRMED


async def chain_call(fn: Callable[[], Awaitable[Any]]) -> Any:
    """A chain call whose failure becomes a Temporal ApplicationError typed after it: an
    unavailable chain (timeout, rate limit, connection) is retried, honouring Retry-After; what
    the chain refuses or lacks (``ChainNotInitialized``, ``TransactionRejected``) is not, as no
    retry would change the answer."""
    try:
        return await fn()
    except ChainUnavailable as err:
        raise ApplicationError(
            str(err),
            type="ChainUnavailable",
            next_retry_delay=(timedelta(seconds=err.retry_after_s) if err.retry_after_s else None),
        ) from err
    except ChainError as err:
        raise ApplicationError(
            str(err), type=type(err).__name__, non_retryable=not err.retryable
        ) from err


async def fetch_transfer(chain: Chain, signature: str) -> OnChainTransfer | None:
    """One transaction, read again over a few transient failures."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return await chain.transaction(signature)
        except ChainUnavailable:
            if attempt + 1 == READ_ATTEMPTS:
                raise
            await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
    return None


async def signature_statuses(
    chain: Chain, signatures: Sequence[str]
) -> dict[str, SignatureStatus | None]:
    if not signatures:
        return {}
    found = await chain_call(lambda: chain.statuses(list(signatures)))
    return dict(zip(signatures, found, strict=True))


@asynccontextmanager
async def payout_step(what: str, *, heartbeat: bool = True) -> AsyncIterator[None]:
    """The body of a payout activity: it heartbeats while it runs (a step whose length grows
    with the epoch or waits on the chain; the saga gives it a short heartbeat timeout), and a
    value the database refuses fails it at once instead of on every retry
    (``xpando/db/errors.py``)."""
    async with AsyncExitStack() as stack:
        if heartbeat:
            await stack.enter_async_context(heartbeating())
        stack.enter_context(fail_fast(what))
        yield
