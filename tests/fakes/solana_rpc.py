"""A Solana JSON-RPC endpoint on loopback that serves LiteSVM, with fault injection.

It speaks the wire format of a real validator's RPC (the methods xpando uses), so tests drive
the real solana-py ``AsyncClient`` — its request serialization, its solders response parsing,
its error types — and xpando's confirmation loop over it. The chain behind it is the same
:class:`xpando.chain.SvmLedger` the embedded chain uses (real SPL Token, Associated Token and
Memo programs), kept in memory: it outlives the workers that talk to it, as a real cluster does.

Faults (``RpcFaults``) are scripted (``script.append(("sendTransaction", "lost_response"))``) or
random (``rate`` with a seed). Kinds:

- ``429``: HTTP 429 Too Many Requests with ``Retry-After``.
- ``timeout``: the answer comes after ``timeout_sleep_s`` (longer than the client waits).
- ``drop`` (sendTransaction): answers with the signature but never executes it (lost in flight).
- ``lost_response`` (sendTransaction): executes it, then answers HTTP 503 — the client cannot
  tell that it landed (the double-payment trap).
- ``expire_and_drop`` (sendTransaction): drops it and expires the blockhash, so it can never land.

``unseen_polls`` makes a landed signature show as ``null`` for its first N status polls, so a
confirmation loop really waits.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from solders.pubkey import Pubkey

from xpando.chain import (
    Landed,
    SvmLedger,
    TransactionRejected,
    parse_transfer,
    signature_of,
)

SEND_KINDS = ("drop", "lost_response", "expire_and_drop")


@dataclass
class RpcFaults:
    script: list[tuple[str, str]] = field(default_factory=list)
    rate: float = 0.0
    kinds: tuple[str, ...] = ("429", "timeout")
    send_kinds: tuple[str, ...] = ()
    seed: int = 0
    unseen_polls: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    _rng: random.Random = field(init=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock)
    _polls: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def pick(self, method: str) -> str | None:
        with self._mutex:
            for i, (m, kind) in enumerate(self.script):
                if m == method:
                    del self.script[i]
                    self.counts[kind] += 1
                    return kind
            if self.rate and self._rng.random() < self.rate:
                kinds = list(self.kinds)
                if method == "sendTransaction":
                    kinds += list(self.send_kinds)
                kind = self._rng.choice(kinds)
                self.counts[kind] += 1
                return kind
            return None

    def seen(self, signature: str) -> bool:
        with self._mutex:
            self._polls[signature] += 1
            return self._polls[signature] > self.unseen_polls


class _RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class LoopbackSolanaRpc:
    def __init__(
        self,
        ledger: SvmLedger,
        faults: RpcFaults | None = None,
        *,
        timeout_sleep_s: float = 1.0,
    ) -> None:
        self.ledger = ledger
        self.faults = faults or RpcFaults()
        self.timeout_sleep_s = timeout_sleep_s
        self.requests: Counter[str] = Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LoopbackSolanaRpc:
        rpc = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status, headers, payload = rpc.handle(body)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LoopbackSolanaRpc:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- dispatch ----------------------------------------------------------------------------------

    def handle(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        request = json.loads(body)
        method = request.get("method", "")
        params = request.get("params") or []
        self.requests[method] += 1
        fault = self.faults.pick(method)
        if fault == "429":
            return 429, {"retry-after": "0"}, b'{"error": "Too many requests"}'
        if fault == "timeout":
            time.sleep(self.timeout_sleep_s)
        try:
            if method == "sendTransaction":
                result = self._send(params, fault)
                if fault == "lost_response":
                    return 503, {}, b'{"error": "upstream unavailable"}'
            else:
                handler = getattr(self, f"_{method}", None)
                if handler is None:
                    raise _RpcError(-32601, f"Method not found: {method}")
                result = handler(params)
            reply: dict[str, Any] = {"jsonrpc": "2.0", "result": result, "id": request.get("id")}
        except _RpcError as err:
            reply = _error(request, err.code, err.message, err.data)
        return 200, {}, json.dumps(reply).encode()

    def _context(self) -> dict[str, Any]:
        return {"slot": self.ledger.slot}

    # -- methods ---------------------------------------------------------------------------------

    def _getHealth(self, params: list[Any]) -> str:
        return "ok"

    def _getLatestBlockhash(self, params: list[Any]) -> dict[str, Any]:
        bh = self.ledger.latest_blockhash()
        return {
            "context": self._context(),
            "value": {
                "blockhash": bh.blockhash,
                "lastValidBlockHeight": bh.last_valid_block_height,
            },
        }

    def _getBlockHeight(self, params: list[Any]) -> int:
        return self.ledger.block_height()

    def _send(self, params: list[Any], fault: str | None) -> str:
        raw = base64.b64decode(params[0])
        options = params[1] if len(params) > 1 else {}
        signature = signature_of(raw)
        if fault in ("drop", "expire_and_drop"):
            if fault == "expire_and_drop":
                self.ledger.expire_blockhash()
            return signature
        try:
            return self.ledger.send(raw, preflight=not options.get("skipPreflight", False))
        except TransactionRejected as err:
            if err.err == "InvalidTransaction":
                raise _RpcError(-32602, str(err)) from err
            raise _RpcError(
                -32002,
                f"Transaction simulation failed: {err.err}",
                {
                    "err": err.err,
                    "logs": [],
                    "accounts": None,
                    "unitsConsumed": 0,
                    "returnData": None,
                    "innerInstructions": None,
                },
            ) from err

    def _getSignatureStatuses(self, params: list[Any]) -> dict[str, Any]:
        found = self.ledger.statuses(params[0])
        value = [
            None if x is None or not self.faults.seen(x.signature) else _status(x) for x in found
        ]
        return {"context": self._context(), "value": value}

    def _getTransaction(self, params: list[Any]) -> dict[str, Any] | None:
        landed = self.ledger.landed(params[0])
        if landed is None:
            return None
        return {
            "slot": landed.slot,
            "blockTime": landed.block_time,
            "transaction": [base64.b64encode(landed.tx).decode(), "base64"],
            "meta": {
                "err": landed.err,
                "status": {"Ok": None} if landed.err is None else {"Err": landed.err},
                "fee": 5000,
                "preBalances": [],
                "postBalances": [],
                "innerInstructions": [],
                "logMessages": [],
                "preTokenBalances": [],
                "postTokenBalances": [],
                "rewards": [],
                "loadedAddresses": {"writable": [], "readonly": []},
                "computeUnitsConsumed": 0,
            },
            "version": 0,
        }

    def _getSignaturesForAddress(self, params: list[Any]) -> list[dict[str, Any]]:
        options = params[1] if len(params) > 1 else {}
        found = self.ledger.signatures_for(
            params[0], before=options.get("before"), limit=int(options.get("limit") or 1000)
        )
        return [
            {
                "signature": x.signature,
                "slot": x.slot,
                "err": x.err,
                "memo": _memo(x),
                "blockTime": x.block_time,
                "confirmationStatus": "finalized",
            }
            for x in found
        ]

    def _getTokenAccountBalance(self, params: list[Any]) -> dict[str, Any]:
        amount = self.ledger.token_balance(Pubkey.from_string(params[0]))
        if amount is None:
            raise _RpcError(-32602, "Invalid param: could not find account")
        return {
            "context": self._context(),
            "value": {
                "amount": str(amount),
                "decimals": 0,
                "uiAmount": float(amount),
                "uiAmountString": str(amount),
            },
        }

    def _getAccountInfo(self, params: list[Any]) -> dict[str, Any]:
        account = self.ledger.account(Pubkey.from_string(params[0]))
        if account is None:
            return {"context": self._context(), "value": None}
        data = bytes(account.data)
        return {
            "context": self._context(),
            "value": {
                "data": [base64.b64encode(data).decode(), "base64"],
                "executable": account.executable,
                "lamports": account.lamports,
                "owner": str(account.owner),
                "rentEpoch": 0,
                "space": len(data),
            },
        }

    def _getBalance(self, params: list[Any]) -> dict[str, Any]:
        return {
            "context": self._context(),
            "value": self.ledger.balance(Pubkey.from_string(params[0])),
        }


def _memo(landed: Landed) -> str | None:
    """The memo as a validator lists it with a signature: ``[<length>] <text>``."""
    memo = parse_transfer(landed.tx).memo
    return None if memo is None else f"[{len(memo.encode())}] {memo}"


def _status(landed: Landed) -> dict[str, Any]:
    return {
        "slot": landed.slot,
        "confirmations": None,
        "err": landed.err,
        "status": {"Ok": None} if landed.err is None else {"Err": landed.err},
        "confirmationStatus": "finalized",
    }


def _error(request: dict[str, Any], code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": request.get("id")}
