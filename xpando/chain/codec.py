"""Values, errors and the payout transaction's codec: build, sign-free parse, classify."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from solders.account import Account
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction
from spl.memo.constants import MEMO_PROGRAM_ID
from spl.memo.instructions import create_memo
from spl.memo.models import MemoParams
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
    transfer_checked,
)
from spl.token.models import TransferCheckedParams

SYSTEM_PROGRAM = Pubkey.from_string("11111111111111111111111111111111")
MINT_SIZE = 82
TOKEN_ACCOUNT_SIZE = 165
SIGNATURES_PAGE = 1000  # signatures per page of a treasury history scan

_TRANSFER = 3
_TRANSFER_CHECKED = 12


# --- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blockhash:
    blockhash: str
    last_valid_block_height: int


@dataclass(frozen=True)
class SignatureStatus:
    signature: str
    slot: int
    err: Any  # None on success, else the chain's error in RPC JSON form
    confirmation: str  # processed | confirmed | finalized

    @property
    def ok(self) -> bool:
        return self.err is None


@dataclass(frozen=True)
class TransferInfo:
    """What a payout transaction says, read back from its bytes."""

    memo: str | None
    amount: int | None
    source: str | None
    dest: str | None
    mint: str | None
    authority: str | None


@dataclass(frozen=True)
class OnChainTransfer:
    signature: str
    slot: int
    err: Any
    block_time: int | None
    transfer: TransferInfo


@dataclass(frozen=True)
class ChainInfo:
    kind: str
    mint: str
    treasury: str
    treasury_token_account: str
    decimals: int
    balance: int
    created: bool = False


# --- errors ---------------------------------------------------------------------------------------


class ChainError(Exception):
    """Base of everything the chain can refuse or fail with."""

    retryable = False


class ChainNotInitialized(ChainError):
    pass


class ChainUnavailable(ChainError):
    """Timeout, rate limit, connection refused: try again later (the request may have landed)."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TransactionRejected(ChainError):
    """The chain refused the transaction before it landed (it will not land as sent)."""

    def __init__(self, err: Any, message: str | None = None) -> None:
        super().__init__(message or f"transaction rejected: {json.dumps(err)}")
        self.err = err

    @property
    def blockhash_expired(self) -> bool:
        return bool(self.err == "BlockhashNotFound")

    @property
    def already_processed(self) -> bool:
        return bool(self.err == "AlreadyProcessed")


def error_json(err: Any) -> Any:
    """A solders ``TransactionErrorType`` in the JSON form Solana's RPC uses."""
    if err is None:
        return None
    name = type(err).__name__
    if name == "TransactionErrorFieldless":
        return str(err).rsplit(".", 1)[-1]
    if name == "TransactionErrorInstructionError":
        inner = err.err
        inner_name = type(inner).__name__
        if inner_name == "InstructionErrorCustom":
            detail: Any = {"Custom": inner.code}
        elif inner_name == "InstructionErrorFieldless":
            detail = str(inner).rsplit(".", 1)[-1]
        elif inner_name == "InstructionErrorBorshIO":
            detail = {"BorshIoError": str(getattr(inner, "value", inner))}
        else:
            detail = str(inner)
        return {"InstructionError": [err.index, detail]}
    if name == "TransactionErrorDuplicateInstruction":
        return {"DuplicateInstruction": err.index}
    if name == "TransactionErrorInsufficientFundsForRent":
        return {"InsufficientFundsForRent": {"account_index": err.account_index}}
    if name == "TransactionErrorProgramExecutionTemporarilyRestricted":
        return {"ProgramExecutionTemporarilyRestricted": {"account_index": err.account_index}}
    return str(err)


# SPL Token program error codes (token/program/src/error.rs).
_TOKEN_ERRORS = {
    1: "insufficient_treasury",  # InsufficientFunds
    3: "recipient_invalid",  # MintMismatch
    4: "recipient_invalid",  # OwnerMismatch
    17: "recipient_frozen",  # AccountFrozen
}
# Instruction order in a payout transaction.
_IX_CREATE_ACCOUNT, _IX_TRANSFER, _IX_MEMO = 0, 1, 2


def failure_reason(err: Any) -> str:
    """Why a payout transaction failed, as a short stable code for the ledger."""
    if err in ("InsufficientFundsForFee", "InsufficientFundsForRent") or (
        isinstance(err, dict) and "InsufficientFundsForRent" in err
    ):
        return "insufficient_fees"
    if isinstance(err, dict) and "InstructionError" in err:
        index, detail = err["InstructionError"]
        if index == _IX_CREATE_ACCOUNT:
            return "recipient_invalid"
        if index == _IX_TRANSFER and isinstance(detail, dict) and "Custom" in detail:
            return _TOKEN_ERRORS.get(int(detail["Custom"]), f"token_error_{detail['Custom']}")
        if index == _IX_TRANSFER and detail in ("InvalidAccountData", "UninitializedAccount"):
            return "recipient_invalid"
        return f"instruction_{index}_failed"
    return f"rejected_{err}" if isinstance(err, str) else "rejected"


# --- transactions ---------------------------------------------------------------------------------


def token_account(owner: Pubkey, mint: Pubkey) -> Pubkey:
    return get_associated_token_address(owner, mint)


def payout_transaction(
    *,
    treasury: Keypair,
    mint: Pubkey,
    decimals: int,
    wallet: Pubkey,
    amount: int,
    memo: str,
    blockhash: str,
    treasury_token_account: Pubkey | None = None,
) -> bytes:
    """The signed bytes of one payout: create-ATA-if-missing, TransferChecked, memo."""
    owner = treasury.pubkey()
    source = treasury_token_account or token_account(owner, mint)
    instructions = [
        create_idempotent_associated_token_account(owner, wallet, mint),
        transfer_checked(
            TransferCheckedParams(
                program_id=TOKEN_PROGRAM_ID,
                source=source,
                mint=mint,
                dest=token_account(wallet, mint),
                owner=owner,
                amount=amount,
                decimals=decimals,
            )
        ),
        create_memo(MemoParams(program_id=MEMO_PROGRAM_ID, signer=owner, message=memo.encode())),
    ]
    message = MessageV0.try_compile(owner, instructions, [], Hash.from_string(blockhash))
    return bytes(VersionedTransaction(message, [treasury]))


def signature_of(raw: bytes) -> str:
    return str(VersionedTransaction.from_bytes(raw).signatures[0])


def blockhash_of(raw: bytes) -> str:
    return str(VersionedTransaction.from_bytes(raw).message.recent_blockhash)


def parse_transfer(raw: bytes) -> TransferInfo:
    """The memo and the (first) token transfer in a transaction's bytes."""
    tx = VersionedTransaction.from_bytes(raw)
    keys = [str(k) for k in tx.message.account_keys]
    memo: str | None = None
    amount = source = dest = mint = authority = None
    for ix in tx.message.instructions:
        program = keys[ix.program_id_index]
        accounts = [keys[i] for i in bytes(ix.accounts)]
        data = bytes(ix.data)
        if program == str(MEMO_PROGRAM_ID) and memo is None:
            memo = data.decode("utf-8", errors="replace")
        elif program == str(TOKEN_PROGRAM_ID) and amount is None and data:
            if data[0] == _TRANSFER_CHECKED and len(data) >= 10 and len(accounts) >= 4:
                amount = int.from_bytes(data[1:9], "little")
                source, mint, dest, authority = accounts[:4]
            elif data[0] == _TRANSFER and len(data) >= 9 and len(accounts) >= 3:
                amount = int.from_bytes(data[1:9], "little")
                source, dest, authority = accounts[:3]
    return TransferInfo(
        memo=memo, amount=amount, source=source, dest=dest, mint=mint, authority=authority
    )


def token_amount(account: Account | None) -> int | None:
    """The balance of an SPL token account (None if it is not one)."""
    if account is None or account.owner != TOKEN_PROGRAM_ID:
        return None
    data = bytes(account.data)
    if len(data) != TOKEN_ACCOUNT_SIZE:
        return None
    return int.from_bytes(data[64:72], "little")
