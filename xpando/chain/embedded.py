"""``XPANDO_CHAIN=embedded``: LiteSVM in process, behind the :class:`SvmLedger` journal."""

from __future__ import annotations

import asyncio
import fcntl
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from solders.keypair import Keypair
from solders.pubkey import Pubkey

from xpando.chain.base import Chain
from xpando.chain.codec import (
    Blockhash,
    ChainError,
    ChainInfo,
    ChainNotInitialized,
    OnChainTransfer,
    SignatureStatus,
    parse_transfer,
)
from xpando.chain.journal import Landed, SvmLedger, bootstrap_treasury
from xpando.keys import load_or_create_keypair, parse_keypair, treasury_key_path
from xpando.settings import Settings


def _landed_transfer(landed: Landed) -> OnChainTransfer:
    return OnChainTransfer(
        signature=landed.signature,
        slot=landed.slot,
        err=landed.err,
        block_time=landed.block_time,
        transfer=parse_transfer(landed.tx),
    )


class LiteSvmChain(Chain):
    """The embedded chain: an :class:`SvmLedger` journaled under the data folder."""

    kind = "embedded"

    def __init__(self, ledger: SvmLedger, *, treasury: Keypair) -> None:
        meta = ledger.read_meta()
        if "mint" not in meta:
            raise ChainNotInitialized("the embedded chain has no XPD mint: run `xpando chain init`")
        if meta.get("treasury") != str(treasury.pubkey()):
            raise ChainNotInitialized(
                f"the treasury key does not match the chain's treasury {meta.get('treasury')}"
            )
        super().__init__(
            treasury=treasury, mint=Pubkey.from_string(meta["mint"]), decimals=meta["decimals"]
        )
        self.ledger = ledger

    async def latest_blockhash(self) -> Blockhash:
        return await asyncio.to_thread(self.ledger.latest_blockhash)

    async def block_height(self) -> int:
        return await asyncio.to_thread(self.ledger.block_height)

    async def send(self, raw: bytes) -> str:
        return await asyncio.to_thread(self.ledger.send, raw)

    async def send_many(self, raws: Sequence[bytes]) -> list[str | ChainError]:
        def run() -> list[str | ChainError]:
            out: list[str | ChainError] = []
            for raw in raws:
                try:
                    out.append(self.ledger.send(raw))
                except ChainError as err:
                    out.append(err)
            return out

        return await asyncio.to_thread(run)

    async def statuses(self, signatures: Sequence[str]) -> list[SignatureStatus | None]:
        found = await asyncio.to_thread(self.ledger.statuses, signatures)
        return [
            None if x is None else SignatureStatus(x.signature, x.slot, x.err, "finalized")
            for x in found
        ]

    async def transaction(self, signature: str) -> OnChainTransfer | None:
        landed = await asyncio.to_thread(self.ledger.landed, signature)
        return None if landed is None else _landed_transfer(landed)

    async def treasury_transfers(
        self, *, since: datetime | None, memo_contains: str | None = None
    ) -> list[OnChainTransfer]:
        cutoff = since.timestamp() if since else None
        found = await asyncio.to_thread(
            self.ledger.signatures_for, str(self.treasury_token_account), limit=10**9
        )
        return [
            _landed_transfer(x)
            for x in found
            if x.err is None and (cutoff is None or x.block_time >= cutoff - 1)
        ]

    async def token_balance(self, account: Pubkey) -> int | None:
        return await asyncio.to_thread(self.ledger.token_balance, account)

    async def close(self) -> None:
        self.ledger.close()


def ledger_path(data_dir: Path) -> Path:
    return data_dir / "chain" / "ledger.jsonl"


def init_embedded_chain(settings: Settings) -> ChainInfo:
    """Create (once) the embedded chain: treasury key, XPD mint, treasury token account, supply."""
    treasury = (
        parse_keypair(settings.chain_treasury_key.get_secret_value())
        if settings.chain_treasury_key is not None
        else load_or_create_keypair(treasury_key_path(settings.data_dir))
    )
    ledger = SvmLedger(ledger_path(settings.data_dir))
    try:
        created = False
        lock = ledger._lock_fd
        assert lock is not None
        # Hold the file lock across check-and-create so two `chain init`s make one mint.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ledger._catch_up()
            existing = dict(ledger.meta)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        if "mint" not in existing:
            mint = bootstrap_treasury(
                ledger,
                treasury,
                decimals=settings.chain_decimals,
                supply=settings.chain_initial_supply,
            )
            ledger.set_meta(
                mint=str(mint),
                treasury=str(treasury.pubkey()),
                decimals=settings.chain_decimals,
                created_at=datetime.now(UTC).isoformat(),
            )
            created = True
        chain = LiteSvmChain(ledger, treasury=treasury)
        return ChainInfo(
            kind=chain.kind,
            mint=str(chain.mint),
            treasury=str(treasury.pubkey()),
            treasury_token_account=str(chain.treasury_token_account),
            decimals=chain.decimals,
            balance=ledger.token_balance(chain.treasury_token_account) or 0,
            created=created,
        )
    finally:
        ledger.close()
