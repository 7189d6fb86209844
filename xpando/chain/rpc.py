"""``XPANDO_CHAIN=rpc``: solana-py's ``AsyncClient`` against a Solana RPC endpoint."""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID

from xpando.chain.base import Chain
from xpando.chain.codec import (
    MINT_SIZE,
    SIGNATURES_PAGE,
    Blockhash,
    ChainNotInitialized,
    ChainUnavailable,
    OnChainTransfer,
    SignatureStatus,
    TransactionRejected,
    error_json,
    parse_transfer,
)

READ_ATTEMPTS = 5  # attempts of one read inside a long scan (reconciliation)


# --- RPC ------------------------------------------------------------------------------------------


class RpcChain(Chain):
    """Solana JSON-RPC through solana-py's ``AsyncClient`` (no transport retries of its own)."""

    kind = "rpc"

    def __init__(
        self,
        url: str,
        *,
        treasury: Keypair,
        mint: Pubkey,
        decimals: int,
        commitment: str = "confirmed",
        timeout_s: float = 10.0,
    ) -> None:
        from solana.rpc.async_api import AsyncClient
        from solana.rpc.commitment import Commitment

        super().__init__(treasury=treasury, mint=mint, decimals=decimals)
        self.url = url
        self.commitment = Commitment(commitment)
        self._client = AsyncClient(
            url,
            commitment=self.commitment,
            timeout=timeout_s,
            max_transport_retries=0,
            http2=False,
        )

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        treasury: Keypair,
        mint: Pubkey,
        commitment: str = "confirmed",
        timeout_s: float = 10.0,
    ) -> RpcChain:
        """Read the mint's decimals from the chain (and fail clearly if it is not a mint)."""
        probe = cls(url, treasury=treasury, mint=mint, decimals=0, timeout_s=timeout_s)
        try:
            resp = await probe._call(probe._client.get_account_info(mint))
            account = resp.value
            data = bytes(account.data) if account is not None else b""
            if account is None or account.owner != TOKEN_PROGRAM_ID or len(data) != MINT_SIZE:
                raise ChainNotInitialized(f"{mint} is not an SPL token mint on {url}")
            decimals = data[44]
        finally:
            await probe.close()
        return cls(
            url,
            treasury=treasury,
            mint=mint,
            decimals=decimals,
            commitment=commitment,
            timeout_s=timeout_s,
        )

    async def _call(self, coro: Any) -> Any:
        import httpx2
        from solana.exceptions import SolanaRpcException
        from solana.rpc.core import RPCException

        try:
            return await coro
        except SolanaRpcException as err:
            cause = err.__cause__
            if isinstance(cause, httpx2.HTTPStatusError):
                status = cause.response.status_code
                retry_after = cause.response.headers.get("retry-after")
                raise ChainUnavailable(
                    f"RPC answered HTTP {status}" + (" (rate limited)" if status == 429 else ""),
                    retry_after_s=float(retry_after) if retry_after else None,
                ) from err
            if isinstance(cause, httpx2.TimeoutException):
                raise ChainUnavailable("RPC request timed out") from err
            raise ChainUnavailable(f"RPC unreachable: {cause!r}") from err
        except RPCException as err:
            detail = err.args[0] if err.args else None
            data = getattr(detail, "data", None)
            if data is not None and hasattr(data, "err"):
                raise TransactionRejected(
                    error_json(data.err), getattr(detail, "message", None)
                ) from err
            raise ChainUnavailable(f"RPC error: {getattr(detail, 'message', detail)}") from err

    async def latest_blockhash(self) -> Blockhash:
        resp = await self._call(self._client.get_latest_blockhash(self.commitment))
        return Blockhash(str(resp.value.blockhash), int(resp.value.last_valid_block_height))

    async def block_height(self) -> int:
        resp = await self._call(self._client.get_block_height(self.commitment))
        return int(resp.value)

    async def send(self, raw: bytes) -> str:
        from solana.rpc.models import TxOpts

        opts = TxOpts(
            skip_confirmation=True, skip_preflight=False, preflight_commitment=self.commitment
        )
        resp = await self._call(self._client.send_raw_transaction(raw, opts))
        return str(resp.value)

    async def statuses(self, signatures: Sequence[str]) -> list[SignatureStatus | None]:
        out: list[SignatureStatus | None] = []
        for start in range(0, len(signatures), 256):  # the RPC's limit per call
            page = [Signature.from_string(s) for s in signatures[start : start + 256]]
            resp = await self._call(
                self._client.get_signature_statuses(page, search_transaction_history=True)
            )
            for sig, status in zip(page, resp.value, strict=True):
                if status is None:
                    out.append(None)
                    continue
                level = status.confirmation_status
                name = str(level).rsplit(".", 1)[-1].lower() if level is not None else "processed"
                out.append(
                    SignatureStatus(str(sig), int(status.slot), error_json(status.err), name)
                )
        return out

    async def transaction(self, signature: str) -> OnChainTransfer | None:
        resp = await self._call(
            self._client.get_transaction(
                Signature.from_string(signature),
                encoding="base64",
                commitment=self.commitment,
                max_supported_transaction_version=0,
            )
        )
        found = resp.value
        if found is None:
            return None
        tx = found.transaction.transaction
        raw = bytes(tx) if isinstance(tx, VersionedTransaction) else base64.b64decode(tx)
        meta = found.transaction.meta
        return OnChainTransfer(
            signature=signature,
            slot=int(found.slot),
            err=error_json(meta.err) if meta is not None else None,
            block_time=found.block_time,
            transfer=parse_transfer(raw),
        )

    async def treasury_transfers(
        self, *, since: datetime | None, memo_contains: str | None = None
    ) -> list[OnChainTransfer]:
        cutoff = since.timestamp() if since else None
        before: Signature | None = None
        sigs: list[str] = []

        async def listing(before: Signature | None) -> Any:
            return await self._call(
                self._client.get_signatures_for_address(
                    self.treasury_token_account,
                    before=before,
                    limit=SIGNATURES_PAGE,
                    commitment=self.commitment,
                )
            )

        while True:
            resp = await self._retrying(functools.partial(listing, before))
            page = resp.value
            done = not page
            for item in page:
                if (
                    cutoff is not None
                    and item.block_time is not None
                    and item.block_time < cutoff - 1
                ):
                    done = True
                    break
                if item.err is not None:
                    continue  # a failed transaction moved nothing
                if memo_contains and item.memo is not None and memo_contains not in item.memo:
                    continue
                sigs.append(str(item.signature))
            if done or len(page) < SIGNATURES_PAGE:
                break
            before = page[-1].signature
        found: list[OnChainTransfer] = []
        for sig in sigs:
            t = await self._retrying(functools.partial(self.transaction, sig))
            if t is not None and t.err is None:
                found.append(t)
        return found

    async def _retrying(
        self, call: Callable[[], Awaitable[Any]], attempts: int = READ_ATTEMPTS
    ) -> Any:
        """A read repeated over transient failures (a long scan should not fail on one 429)."""
        for attempt in range(attempts):
            try:
                return await call()
            except ChainUnavailable as err:
                if attempt + 1 == attempts:
                    raise
                await asyncio.sleep(max(err.retry_after_s or 0.0, min(2.0, 0.2 * 2**attempt)))
        raise AssertionError("unreachable")

    async def token_balance(self, account: Pubkey) -> int | None:
        try:
            resp = await self._call(
                self._client.get_token_account_balance(account, self.commitment)
            )
        except ChainUnavailable as err:
            if "could not find account" in str(err) or "not a Token account" in str(err):
                return None
            raise
        return int(resp.value.amount)

    async def close(self) -> None:
        await self._client.close()
