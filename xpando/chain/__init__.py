"""The chain XPD is paid on: one ``Chain`` interface, two implementations.

``LiteSvmChain`` (the default, ``XPANDO_CHAIN=embedded``)
    LiteSVM from ``solders``, in process, with the real SPL Token, Associated Token and Memo
    programs. LiteSVM keeps nothing on disk, so :class:`SvmLedger` adds what a validator's RPC
    node would remember and persists it in ``<data_dir>/chain/ledger.jsonl``, an append-only
    journal: the post-transaction state of every account a transaction wrote, each landed
    signature with its status and bytes, and every blockhash expiry. Opening the chain replays
    the journal into a fresh LiteSVM (``set_account``); blockhashes are reproduced exactly
    (LiteSVM derives each one from the previous), so a transaction signed before a restart is
    still valid after it until its blockhash expires. Every operation takes an exclusive
    ``flock`` and first applies what other processes appended, so a CLI and a worker (or two
    workers) share one chain safely. A record is one ``write(2)``: a killed process loses at
    most the transaction it was executing, never half of one. The journal is not compacted.

    Block height is the blockhash generation: a blockhash is valid while it is the latest one
    (LiteSVM accepts only that) and its ``last_valid_block_height`` is its generation. A
    blockhash expires ``BLOCKHASH_TTL_S`` after it was first handed out, or when a test says so.

``RpcChain`` (``XPANDO_CHAIN=rpc``)
    solana-py's ``AsyncClient`` against ``XPANDO_CHAIN_RPC_URL`` (devnet, mainnet, a local
    validator), with transport retries off: Temporal's retry policy is the one retry loop.
    HTTP 429 and timeouts become :class:`ChainUnavailable` (retryable); preflight failures
    become :class:`TransactionRejected` with the chain's error.

Both are driven by the same payout activities (``activities/payouts.py``). The package:
``codec`` (values, errors, the payout transaction), ``journal`` (:class:`SvmLedger`), ``base``
(the :class:`Chain` interface), ``embedded`` and ``rpc`` (the two implementations); this module
opens the one the settings choose. A payout is one
transaction: create the recipient's associated token account if missing (paid by the
treasury), ``TransferChecked`` from the treasury's token account, and a memo carrying the
payout id — so every transfer on chain names the ledger row that ordered it.
"""

from __future__ import annotations

import asyncio

from solders.keypair import Keypair
from solders.pubkey import Pubkey

from xpando.chain.base import SEND_CONCURRENCY, Chain
from xpando.chain.codec import (
    MINT_SIZE,
    SIGNATURES_PAGE,
    SYSTEM_PROGRAM,
    TOKEN_ACCOUNT_SIZE,
    Blockhash,
    ChainError,
    ChainInfo,
    ChainNotInitialized,
    ChainUnavailable,
    OnChainTransfer,
    SignatureStatus,
    TransactionRejected,
    TransferInfo,
    blockhash_of,
    error_json,
    failure_reason,
    parse_transfer,
    payout_transaction,
    signature_of,
    token_account,
    token_amount,
)
from xpando.chain.embedded import LiteSvmChain, init_embedded_chain, ledger_path
from xpando.chain.journal import (
    BLOCKHASH_TTL_S,
    TREASURY_SOL,
    Landed,
    SvmLedger,
    bootstrap_treasury,
)
from xpando.chain.rpc import READ_ATTEMPTS, RpcChain
from xpando.keys import load_keypair, parse_keypair, treasury_key_path
from xpando.settings import Settings

__all__ = [
    "BLOCKHASH_TTL_S",
    "MINT_SIZE",
    "READ_ATTEMPTS",
    "SEND_CONCURRENCY",
    "SIGNATURES_PAGE",
    "SYSTEM_PROGRAM",
    "TOKEN_ACCOUNT_SIZE",
    "TREASURY_SOL",
    "Blockhash",
    "Chain",
    "ChainError",
    "ChainHandle",
    "ChainInfo",
    "ChainNotInitialized",
    "ChainUnavailable",
    "Landed",
    "LiteSvmChain",
    "OnChainTransfer",
    "RpcChain",
    "SignatureStatus",
    "SvmLedger",
    "TransactionRejected",
    "TransferInfo",
    "blockhash_of",
    "bootstrap_treasury",
    "error_json",
    "failure_reason",
    "init_chain",
    "init_embedded_chain",
    "ledger_path",
    "open_chain",
    "parse_transfer",
    "payout_transaction",
    "signature_of",
    "token_account",
    "token_amount",
]


# --- opening and initializing ---------------------------------------------------------------------


def _treasury_from_settings(settings: Settings) -> Keypair:
    if settings.chain_treasury_key is not None:
        return parse_keypair(settings.chain_treasury_key.get_secret_value())
    path = treasury_key_path(settings.data_dir)
    if not path.exists():
        raise ChainNotInitialized(f"no treasury key at {path}: run `xpando chain init`")
    return load_keypair(path)


async def open_chain(settings: Settings) -> Chain:
    """The chain the settings choose (ChainNotInitialized if it has not been set up)."""
    if settings.chain == "rpc":
        if not settings.chain_rpc_url:
            raise ChainNotInitialized("XPANDO_CHAIN=rpc needs XPANDO_CHAIN_RPC_URL")
        if not settings.chain_mint:
            raise ChainNotInitialized("XPANDO_CHAIN=rpc needs XPANDO_CHAIN_MINT (the XPD mint)")
        if settings.chain_treasury_key is None:
            raise ChainNotInitialized("XPANDO_CHAIN=rpc needs XPANDO_CHAIN_TREASURY_KEY")
        try:
            mint = Pubkey.from_string(settings.chain_mint)
        except ValueError as err:
            raise ChainNotInitialized(f"XPANDO_CHAIN_MINT is not an address: {err}") from err
        return await RpcChain.connect(
            settings.chain_rpc_url,
            treasury=_treasury_from_settings(settings),
            mint=mint,
            commitment=settings.chain_commitment,
            timeout_s=settings.chain_rpc_timeout_s,
        )
    path = ledger_path(settings.data_dir)
    if not path.exists():
        raise ChainNotInitialized(f"no embedded chain at {path}: run `xpando chain init`")
    treasury = _treasury_from_settings(settings)
    ledger = await asyncio.to_thread(SvmLedger, path)
    try:
        return LiteSvmChain(ledger, treasury=treasury)
    except ChainError:
        ledger.close()
        raise


async def init_chain(settings: Settings) -> ChainInfo:
    """``xpando chain init``: create the embedded chain, or check the RPC mint and treasury."""
    if settings.chain == "embedded":
        return await asyncio.to_thread(init_embedded_chain, settings)
    chain = await open_chain(settings)
    try:
        balance = await chain.token_balance(chain.treasury_token_account)
        if balance is None:
            raise ChainNotInitialized(
                f"the treasury {chain.treasury.pubkey()} has no token account for the mint "
                f"{chain.mint} ({chain.treasury_token_account}); create and fund it first"
            )
        return await chain.info()
    finally:
        await chain.close()


class ChainHandle:
    """Opens the chain on first use (so a core worker starts before `chain init` has run) and
    keeps it; ``reset()`` drops it so the next use opens it again."""

    def __init__(self, settings: Settings | None = None, *, chain: Chain | None = None) -> None:
        self._settings = settings
        self._chain = chain
        self._opening = asyncio.Lock()

    async def get(self) -> Chain:
        if self._chain is not None:
            return self._chain
        async with self._opening:
            if self._chain is None:
                assert self._settings is not None, "ChainHandle needs settings or a chain"
                self._chain = await open_chain(self._settings)
        return self._chain

    async def close(self) -> None:
        if self._chain is not None:
            await self._chain.close()
            self._chain = None
