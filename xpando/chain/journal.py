"""The embedded chain's journal: LiteSVM plus what a validator's RPC node would remember,
persisted in an append-only file (see :mod:`xpando.chain`)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solders.account import Account
from solders.hash import Hash
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, create_account
from solders.transaction import VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    initialize_mint2,
    mint_to_checked,
)
from spl.token.models import InitializeMint2Params, MintToCheckedParams

from xpando.chain.codec import (
    MINT_SIZE,
    SIGNATURES_PAGE,
    SYSTEM_PROGRAM,
    Blockhash,
    TransactionRejected,
    error_json,
    token_account,
    token_amount,
)

BLOCKHASH_TTL_S = 60.0  # the embedded chain's blockhash lifetime (mainnet: ~60-90 s)
TREASURY_SOL = 1_000 * 10**9  # lamports the embedded treasury gets for fees and account rent


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
