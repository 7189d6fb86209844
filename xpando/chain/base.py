"""The one interface the payout activities drive: :class:`Chain`."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime

from solders.keypair import Keypair
from solders.pubkey import Pubkey

from xpando.chain.codec import (
    Blockhash,
    ChainError,
    ChainInfo,
    OnChainTransfer,
    SignatureStatus,
    payout_transaction,
    token_account,
)

# --- the interface -------------------------------------------------------------------------------

SEND_CONCURRENCY = 8  # sends in flight per batch


class Chain(ABC):
    """What the payout activities need from a chain. All amounts are integer base units."""

    kind: str

    def __init__(self, *, treasury: Keypair, mint: Pubkey, decimals: int) -> None:
        self.treasury = treasury
        self.mint = mint
        self.decimals = decimals
        self.treasury_token_account = token_account(treasury.pubkey(), mint)

    def build_payout(self, *, wallet: Pubkey, amount: int, memo: str, blockhash: str) -> bytes:
        return payout_transaction(
            treasury=self.treasury,
            mint=self.mint,
            decimals=self.decimals,
            wallet=wallet,
            amount=amount,
            memo=memo,
            blockhash=blockhash,
            treasury_token_account=self.treasury_token_account,
        )

    def recipient_account(self, wallet: Pubkey) -> str:
        return str(token_account(wallet, self.mint))

    @abstractmethod
    async def latest_blockhash(self) -> Blockhash: ...

    @abstractmethod
    async def block_height(self) -> int: ...

    @abstractmethod
    async def send(self, raw: bytes) -> str:
        """Submit signed bytes; the signature, or TransactionRejected / ChainUnavailable."""

    async def send_many(self, raws: Sequence[bytes]) -> list[str | ChainError]:
        gate = asyncio.Semaphore(SEND_CONCURRENCY)

        async def one(raw: bytes) -> str | ChainError:
            async with gate:
                try:
                    return await self.send(raw)
                except ChainError as err:
                    return err

        return list(await asyncio.gather(*(one(r) for r in raws)))

    @abstractmethod
    async def statuses(self, signatures: Sequence[str]) -> list[SignatureStatus | None]: ...

    @abstractmethod
    async def transaction(self, signature: str) -> OnChainTransfer | None: ...

    @abstractmethod
    async def treasury_transfers(
        self, *, since: datetime | None, memo_contains: str | None = None
    ) -> list[OnChainTransfer]:
        """Successful transactions that touched the treasury's token account (newest first),
        landed at or after ``since``; with ``memo_contains``, those whose memo may contain it
        (a hint: the RPC's signature listing carries memos, so others need not be fetched)."""

    @abstractmethod
    async def token_balance(self, account: Pubkey) -> int | None: ...

    async def treasury_balance(self) -> int:
        return await self.token_balance(self.treasury_token_account) or 0

    async def info(self) -> ChainInfo:
        return ChainInfo(
            kind=self.kind,
            mint=str(self.mint),
            treasury=str(self.treasury.pubkey()),
            treasury_token_account=str(self.treasury_token_account),
            decimals=self.decimals,
            balance=await self.treasury_balance(),
        )

    async def close(self) -> None:  # noqa: B027  (optional hook)
        pass
