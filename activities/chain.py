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

Both are driven by the same payout activities (``activities/payouts.py``). A payout is one
transaction: create the recipient's associated token account if missing (paid by the
treasury), ``TransferChecked`` from the treasury's token account, and a memo carrying the
payout id — so every transfer on chain names the ledger row that ordered it.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import functools
import json
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from solders.account import Account
from solders.hash import Hash
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import CreateAccountParams, create_account
from solders.transaction import VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata
from spl.memo.constants import MEMO_PROGRAM_ID
from spl.memo.instructions import create_memo
from spl.memo.models import MemoParams
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
    initialize_mint2,
    mint_to_checked,
    transfer_checked,
)
from spl.token.models import InitializeMint2Params, MintToCheckedParams, TransferCheckedParams

from xpando.keys import load_keypair, load_or_create_keypair, parse_keypair, treasury_key_path
from xpando.settings import Settings

SYSTEM_PROGRAM = Pubkey.from_string("11111111111111111111111111111111")
BLOCKHASH_TTL_S = 60.0  # the embedded chain's blockhash lifetime (mainnet: ~60-90 s)
MINT_SIZE = 82
TOKEN_ACCOUNT_SIZE = 165
TREASURY_SOL = 1_000 * 10**9  # lamports the embedded treasury gets for fees and account rent
SEND_CONCURRENCY = 8  # RPC sends in flight per batch
SIGNATURES_PAGE = 1000
READ_ATTEMPTS = 5  # attempts of one read inside a long scan (reconciliation)

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


# --- the embedded ledger --------------------------------------------------------------------------


@dataclass
class Landed:
    signature: str
    slot: int
    err: Any
    tx: bytes
    block_time: int
    accounts: list[str] = field(default_factory=list)


def _is_writable(tx: VersionedTransaction, index: int) -> bool:
    """Whether the message may write account ``index`` (from its header; no lookup tables)."""
    header = tx.message.header
    keys = len(tx.message.account_keys)
    signed = header.num_required_signatures
    if index < signed:
        return index < signed - header.num_readonly_signed_accounts
    return index < keys - header.num_readonly_unsigned_accounts


def _encode_account(account: Account) -> list[Any]:
    return [
        account.lamports,
        str(account.owner),
        base64.b64encode(bytes(account.data)).decode(),
        account.executable,
        account.rent_epoch,
    ]


def _decode_account(value: list[Any]) -> Account:
    lamports, owner, data, executable, rent_epoch = value
    return Account(
        lamports=lamports,
        data=base64.b64decode(data),
        owner=Pubkey.from_string(owner),
        executable=executable,
        rent_epoch=rent_epoch,
    )


class SvmLedger:
    """LiteSVM plus what an RPC node remembers (signatures, statuses, block heights), optionally
    persisted to an append-only journal shared by every process that opens it.

    Synchronous and thread-safe; the async chains and the loopback RPC server wrap it.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        blockhash_ttl_s: float | None = BLOCKHASH_TTL_S,
    ) -> None:
        self._svm = LiteSVM()
        self._mutex = threading.RLock()
        self._landed: dict[str, Landed] = {}
        self._by_account: dict[str, list[str]] = {}
        self._generation = 0
        self._generation_at = time.time()
        self._slot = 0
        self._ttl = blockhash_ttl_s
        self.meta: dict[str, Any] = {}
        self._path = path
        self._lock_fd: int | None = None
        self._append_fd: int | None = None
        self._read: Any = None
        self._offset = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            self._append_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._read = path.open("rb")
            with self._op():
                pass

    # -- journal ---------------------------------------------------------------------------------

    @contextmanager
    def _op(self) -> Iterator[None]:
        """One operation: thread lock, file lock, catch up with other processes, expire."""
        with self._mutex:
            if self._lock_fd is None:
                self._maybe_expire()
                yield
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._catch_up()
                self._maybe_expire()
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        assert self._read is not None and self._path is not None
        size = os.fstat(self._read.fileno()).st_size
        if size <= self._offset:
            return
        self._read.seek(self._offset)
        chunk = self._read.read(size - self._offset)
        end = chunk.rfind(b"\n") + 1
        if end < len(chunk):
            # A torn last record (its writer died mid-write): it never happened.
            os.truncate(self._path, self._offset + end)
            chunk = chunk[:end]
        for line in chunk.splitlines():
            if line.strip():
                self._apply(json.loads(line))
        self._offset += end

    def _append(self, record: dict[str, Any]) -> None:
        if self._append_fd is None:
            return
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        os.write(self._append_fd, data)
        self._offset += len(data)

    def _apply(self, record: dict[str, Any]) -> None:
        kind = record["t"]
        if kind == "meta":
            self.meta.update(record["meta"])
        elif kind == "acct":
            self._set_accounts(record["accounts"])
        elif kind == "tx":
            self._set_accounts(record["accounts"])
            self._remember(
                Landed(
                    signature=record["sig"],
                    slot=record["slot"],
                    err=record["err"],
                    tx=base64.b64decode(record["tx"]),
                    block_time=record["time"],
                    accounts=record["keys"],
                )
            )
        elif kind == "bh":
            while self._generation < record["gen"]:
                self._svm.expire_blockhash()
                self._generation += 1
            self._generation_at = record["time"]

    def _set_accounts(self, accounts: dict[str, list[Any]]) -> None:
        for address, value in accounts.items():
            self._svm.set_account(Pubkey.from_string(address), _decode_account(value))

    def _remember(self, landed: Landed) -> None:
        self._landed[landed.signature] = landed
        self._slot = max(self._slot, landed.slot)
        for key in landed.accounts:
            self._by_account.setdefault(key, []).append(landed.signature)

    def _snapshot(self, keys: Sequence[Pubkey]) -> dict[str, list[Any]]:
        """The state of these accounts now; an account that no longer exists is recorded as
        empty (zero lamports, no data), so a replay does not bring it back."""
        out: dict[str, list[Any]] = {}
        for key in keys:
            account = self._svm.get_account(key)
            if account is None or account.lamports == 0:
                out[str(key)] = [0, str(SYSTEM_PROGRAM), "", False, 0]
            elif not account.executable:
                out[str(key)] = _encode_account(account)
        return out

    def _maybe_expire(self) -> None:
        if self._ttl is not None and time.time() - self._generation_at > self._ttl:
            self._expire()

    def _expire(self) -> None:
        self._svm.expire_blockhash()
        self._generation += 1
        self._generation_at = time.time()
        self._append({"t": "bh", "gen": self._generation, "time": self._generation_at})

    # -- chain operations ------------------------------------------------------------------------

    def latest_blockhash(self) -> Blockhash:
        with self._op():
            return Blockhash(str(self._svm.latest_blockhash()), self._generation)

    def block_height(self) -> int:
        with self._op():
            return self._generation

    @property
    def slot(self) -> int:
        return self._slot

    def expire_blockhash(self) -> None:
        with self._op():
            self._expire()

    def send(self, raw: bytes, *, preflight: bool = False) -> str:
        """Execute a transaction. Raises :class:`TransactionRejected` if it did not land;
        returns the signature if it landed (successfully or with an error, fee charged)."""
        try:
            tx = VersionedTransaction.from_bytes(raw)
        except ValueError as err:
            raise TransactionRejected(
                "InvalidTransaction", f"malformed transaction: {err}"
            ) from err
        sig = str(tx.signatures[0])
        with self._op():
            if sig in self._landed:
                raise TransactionRejected("AlreadyProcessed")
            if preflight:
                simulated = self._svm.simulate_transaction(tx)
                if isinstance(simulated, FailedTransactionMetadata):
                    raise TransactionRejected(error_json(simulated.err()))
            result = self._svm.send_transaction(tx)
            failure = None
            if isinstance(result, FailedTransactionMetadata):
                failure = error_json(result.err())
                if self._svm.get_transaction(tx.signatures[0]) is None:
                    raise TransactionRejected(failure)  # not executed: no fee, no record
            keys = list(tx.message.account_keys)
            writable = [k for i, k in enumerate(keys) if _is_writable(tx, i)]
            landed = Landed(
                signature=sig,
                slot=self._slot + 1,
                err=failure,
                tx=raw,
                block_time=int(time.time()),
                accounts=[str(k) for k in keys],
            )
            self._remember(landed)
            self._append(
                {
                    "t": "tx",
                    "sig": sig,
                    "slot": landed.slot,
                    "err": failure,
                    "tx": base64.b64encode(raw).decode(),
                    "time": landed.block_time,
                    "keys": landed.accounts,
                    "accounts": self._snapshot(writable),
                }
            )
            return sig

    def landed(self, signature: str) -> Landed | None:
        with self._op():
            return self._landed.get(signature)

    def statuses(self, signatures: Sequence[str]) -> list[Landed | None]:
        with self._op():
            return [self._landed.get(s) for s in signatures]

    def signatures_for(
        self, address: str, *, before: str | None = None, limit: int = SIGNATURES_PAGE
    ) -> list[Landed]:
        """Transactions that touched ``address``, newest first (like getSignaturesForAddress)."""
        with self._op():
            sigs = self._by_account.get(address, [])
            end = len(sigs)
            if before is not None:
                end = sigs.index(before) if before in sigs else 0
            return [self._landed[s] for s in reversed(sigs[max(0, end - limit) : end])]

    def account(self, address: Pubkey) -> Account | None:
        with self._op():
            return self._svm.get_account(address)

    def token_balance(self, address: Pubkey) -> int | None:
        return token_amount(self.account(address))

    def balance(self, address: Pubkey) -> int:
        with self._op():
            return int(self._svm.get_balance(address) or 0)

    def minimum_balance(self, size: int) -> int:
        with self._op():
            return int(self._svm.minimum_balance_for_rent_exemption(size))

    def airdrop(self, address: Pubkey, lamports: int) -> None:
        with self._op():
            self._svm.airdrop(address, lamports)
            self._append({"t": "acct", "accounts": self._snapshot([address])})

    def set_account(self, address: Pubkey, account: Account) -> None:
        """Overwrite an account (tests: a frozen recipient, a drained treasury)."""
        with self._op():
            self._svm.set_account(address, account)
            self._append({"t": "acct", "accounts": {str(address): _encode_account(account)}})

    def set_meta(self, **meta: Any) -> None:
        with self._op():
            self.meta.update(meta)
            self._append({"t": "meta", "meta": meta})

    def read_meta(self) -> dict[str, Any]:
        with self._op():
            return dict(self.meta)

    def close(self) -> None:
        for fd in (self._append_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        if self._read is not None:
            self._read.close()
        self._append_fd = self._lock_fd = None
        self._read = None


def bootstrap_treasury(
    ledger: SvmLedger, treasury: Keypair, *, decimals: int, supply: int
) -> Pubkey:
    """Fund the treasury with SOL, create the XPD mint (authority: the treasury), the treasury's
    token account, and mint ``supply`` base units into it — all with real SPL instructions."""
    ledger.airdrop(treasury.pubkey(), TREASURY_SOL)
    mint = Keypair()
    owner = treasury.pubkey()
    ata = token_account(owner, mint.pubkey())
    instructions = [
        create_account(
            CreateAccountParams(
                from_pubkey=owner,
                to_pubkey=mint.pubkey(),
                lamports=ledger.minimum_balance(MINT_SIZE),
                space=MINT_SIZE,
                owner=TOKEN_PROGRAM_ID,
            )
        ),
        initialize_mint2(
            InitializeMint2Params(
                decimals=decimals,
                program_id=TOKEN_PROGRAM_ID,
                mint=mint.pubkey(),
                mint_authority=owner,
                freeze_authority=owner,
            )
        ),
        create_idempotent_associated_token_account(owner, owner, mint.pubkey()),
    ]
    if supply:
        instructions.append(
            mint_to_checked(
                MintToCheckedParams(
                    program_id=TOKEN_PROGRAM_ID,
                    mint=mint.pubkey(),
                    dest=ata,
                    mint_authority=owner,
                    amount=supply,
                    decimals=decimals,
                )
            )
        )
    message = MessageV0.try_compile(
        owner, instructions, [], Hash.from_string(ledger.latest_blockhash().blockhash)
    )
    ledger.send(bytes(VersionedTransaction(message, [treasury, mint])), preflight=True)
    return mint.pubkey()


# --- the interface -------------------------------------------------------------------------------


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


# --- opening and initializing ---------------------------------------------------------------------


def ledger_path(data_dir: Path) -> Path:
    return data_dir / "chain" / "ledger.jsonl"


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
