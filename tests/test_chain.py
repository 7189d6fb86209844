"""The two chains behind one interface: LiteSVM embedded (journaled) and solana-py's AsyncClient
over a loopback JSON-RPC endpoint serving LiteSVM. Real SPL Token, ATA and Memo programs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from solders.keypair import Keypair

from tests.fakes.solana_rpc import LoopbackSolanaRpc, RpcFaults
from workers.node import with_wallet
from xpando.chain import (
    Chain,
    ChainUnavailable,
    LiteSvmChain,
    RpcChain,
    SvmLedger,
    TransactionRejected,
    bootstrap_treasury,
    failure_reason,
    init_embedded_chain,
    ledger_path,
    signature_of,
    token_account,
)
from xpando.contracts import NodeProfile
from xpando.keys import load_keypair, load_or_create_keypair, node_key_path, treasury_key_path
from xpando.settings import Settings

SUPPLY = 10**12


@pytest.fixture(params=["embedded", "rpc"])
async def any_chain(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[tuple[Chain, SvmLedger]]:
    """The same tests against both implementations."""
    if request.param == "embedded":
        s = settings.model_copy(update={"chain_initial_supply": SUPPLY})
        init_embedded_chain(s)
        ledger = SvmLedger(ledger_path(s.data_dir))
        chain: Chain = LiteSvmChain(ledger, treasury=load_keypair(treasury_key_path(s.data_dir)))
        yield chain, ledger
        await chain.close()
        return
    ledger = SvmLedger(None)
    treasury = Keypair()
    mint = bootstrap_treasury(ledger, treasury, decimals=6, supply=SUPPLY)
    with LoopbackSolanaRpc(ledger) as rpc:
        chain = await RpcChain.connect(rpc.url, treasury=treasury, mint=mint, timeout_s=2)
        yield chain, ledger
        await chain.close()


async def test_a_payout_transfer_lands_once_and_reads_back_with_its_memo(
    any_chain: tuple[Chain, SvmLedger],
) -> None:
    chain, _ = any_chain
    wallet = Keypair().pubkey()
    bh = await chain.latest_blockhash()
    raw = chain.build_payout(
        wallet=wallet, amount=1234, memo="xpd-7-node-a", blockhash=bh.blockhash
    )
    sig = await chain.send(raw)
    assert sig == signature_of(raw)

    with pytest.raises(TransactionRejected) as again:
        await chain.send(raw)  # the same bytes again: the chain executes a signature once
    assert again.value.already_processed

    [status, unknown] = await chain.statuses([sig, signature_of(_other_tx(chain, bh.blockhash))])
    assert status is not None and status.ok and unknown is None
    landed = await chain.transaction(sig)
    assert landed is not None and landed.err is None
    assert landed.transfer.memo == "xpd-7-node-a" and landed.transfer.amount == 1234
    assert landed.transfer.dest == str(token_account(wallet, chain.mint))
    assert await chain.token_balance(token_account(wallet, chain.mint)) == 1234
    assert await chain.treasury_balance() == SUPPLY - 1234
    memos = [t.transfer.memo for t in await chain.treasury_transfers(since=None)]
    assert memos.count("xpd-7-node-a") == 1


async def test_an_expired_blockhash_is_refused_and_visible_in_the_block_height(
    any_chain: tuple[Chain, SvmLedger],
) -> None:
    chain, ledger = any_chain
    bh = await chain.latest_blockhash()
    raw = chain.build_payout(
        wallet=Keypair().pubkey(), amount=5, memo="xpd-7-late", blockhash=bh.blockhash
    )
    ledger.expire_blockhash()
    assert await chain.block_height() > bh.last_valid_block_height
    with pytest.raises(TransactionRejected) as refused:
        await chain.send(raw)
    assert refused.value.blockhash_expired
    assert await chain.statuses([signature_of(raw)]) == [None]


async def test_an_overdraft_fails_with_insufficient_treasury_and_moves_nothing(
    any_chain: tuple[Chain, SvmLedger],
) -> None:
    chain, _ = any_chain
    wallet = Keypair().pubkey()
    bh = await chain.latest_blockhash()
    raw = chain.build_payout(
        wallet=wallet, amount=SUPPLY + 1, memo="xpd-7-too-much", blockhash=bh.blockhash
    )
    if chain.kind == "rpc":  # preflight refuses it: it never lands
        with pytest.raises(TransactionRejected) as refused:
            await chain.send(raw)
        assert failure_reason(refused.value.err) == "insufficient_treasury"
        assert await chain.statuses([signature_of(raw)]) == [None]
    else:  # LiteSVM executes it: it lands with the token program's error, fee paid
        sig = await chain.send(raw)
        [status] = await chain.statuses([sig])
        assert status is not None and not status.ok
        assert failure_reason(status.err) == "insufficient_treasury"
    assert await chain.treasury_balance() == SUPPLY
    assert await chain.token_balance(token_account(wallet, chain.mint)) in (None, 0)


def _other_tx(chain: Chain, blockhash: str) -> bytes:
    return chain.build_payout(wallet=Keypair().pubkey(), amount=1, memo="x", blockhash=blockhash)


async def test_rpc_rate_limits_and_timeouts_are_retryable_and_a_lost_response_still_landed() -> (
    None
):
    ledger = SvmLedger(None)
    treasury = Keypair()
    mint = bootstrap_treasury(ledger, treasury, decimals=6, supply=SUPPLY)
    faults = RpcFaults(
        script=[
            ("getSignatureStatuses", "429"),
            ("getSignatureStatuses", "timeout"),
            ("sendTransaction", "lost_response"),
        ]
    )
    with LoopbackSolanaRpc(ledger, faults, timeout_sleep_s=0.6) as rpc:
        chain = await RpcChain.connect(rpc.url, treasury=treasury, mint=mint, timeout_s=0.3)
        try:
            with pytest.raises(ChainUnavailable) as limited:
                await chain.statuses(["1" * 64])
            assert "429" in str(limited.value) and limited.value.retryable
            with pytest.raises(ChainUnavailable, match="timed out"):
                await chain.statuses(["1" * 64])
            bh = await chain.latest_blockhash()
            raw = chain.build_payout(
                wallet=Keypair().pubkey(), amount=9, memo="xpd-7-lost", blockhash=bh.blockhash
            )
            with pytest.raises(ChainUnavailable, match="503"):
                await chain.send(raw)
            # The client could not tell, but the transfer landed: status first tells.
            [status] = await chain.statuses([signature_of(raw)])
            assert status is not None and status.ok
        finally:
            await chain.close()
    assert faults.counts == {"429": 1, "timeout": 1, "lost_response": 1}


def _run_python(code: str, data_dir: Path) -> str:
    env = {**os.environ, "XPANDO_DATA_DIR": str(data_dir)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


async def test_the_embedded_chain_survives_restarts_and_is_shared_by_processes(
    settings: Settings,
) -> None:
    s = settings.model_copy(update={"chain_initial_supply": SUPPLY})
    first = init_embedded_chain(s)
    treasury = load_keypair(treasury_key_path(s.data_dir))
    ledger = SvmLedger(ledger_path(s.data_dir))
    chain = LiteSvmChain(ledger, treasury=treasury)
    wallet = Keypair().pubkey()
    bh = await chain.latest_blockhash()
    signed_before = chain.build_payout(
        wallet=wallet, amount=50, memo="xpd-1-before", blockhash=bh.blockhash
    )
    sent = chain.build_payout(wallet=wallet, amount=7, memo="xpd-1-sent", blockhash=bh.blockhash)
    await chain.send(sent)

    # Another process opens the same chain, sees the transfer, and makes one of its own.
    out = _run_python(
        f"""
        import asyncio
        from xpando.chain import open_chain, token_account
        from solders.pubkey import Pubkey
        from xpando.settings import Settings

        async def main():
            chain = await open_chain(Settings())
            wallet = Pubkey.from_string("{wallet}")
            seen = await chain.token_balance(token_account(wallet, chain.mint))
            bh = await chain.latest_blockhash()
            raw = chain.build_payout(wallet=wallet, amount=100, memo="xpd-1-other",
                                     blockhash=bh.blockhash)
            await chain.send(raw)
            print(seen)
            await chain.close()

        asyncio.run(main())
        """,
        s.data_dir,
    )
    assert out == "7"
    assert await chain.token_balance(token_account(wallet, chain.mint)) == 107
    await chain.close()

    # A restart: a fresh LiteSVM rebuilt from the journal.
    again = init_embedded_chain(s)
    assert (again.created, again.mint) == (False, first.mint)
    assert again.balance == SUPPLY - 107
    reopened = LiteSvmChain(SvmLedger(ledger_path(s.data_dir)), treasury=treasury)
    try:
        with pytest.raises(TransactionRejected) as dup:
            await reopened.send(sent)  # still executed at most once across restarts
        assert dup.value.already_processed
        # Bytes signed before the restart are still valid: the blockhash chain is reproduced.
        await reopened.send(signed_before)
        assert await reopened.token_balance(token_account(wallet, reopened.mint)) == 157
        [status] = await reopened.statuses([signature_of(sent)])
        assert status is not None and status.ok
    finally:
        await reopened.close()


def test_a_torn_journal_record_is_dropped(settings: Settings) -> None:
    init_embedded_chain(settings)
    path = ledger_path(settings.data_dir)
    whole = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(b'{"t":"acct","accounts":{"1111')  # a writer killed mid-record
    ledger = SvmLedger(path)
    try:
        assert "mint" in ledger.read_meta()
    finally:
        ledger.close()
    assert path.read_bytes() == whole


def test_chain_init_cli_creates_once_and_explains_a_missing_rpc_setup(tmp_path: Path) -> None:
    env = {**os.environ, "XPANDO_DATA_DIR": str(tmp_path / "data"), "XPANDO_LOG_FORMAT": "json"}
    run = [sys.executable, "-m", "cli", "chain", "init"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    second = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "embedded chain created" in first.stdout, first.stderr
    assert second.returncode == 0 and "embedded chain ready" in second.stdout
    mint = [line.split()[1] for line in first.stdout.splitlines() if "mint" in line]
    assert mint and mint[0] in second.stdout
    assert "1000000.000000 XPD" in second.stdout
    key = tmp_path / "data" / "keys" / "treasury.json"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(json.loads(key.read_text())) == 64

    rpc = subprocess.run(
        run, env={**env, "XPANDO_CHAIN": "rpc"}, capture_output=True, text=True, timeout=60
    )
    assert rpc.returncode == 2
    assert "XPANDO_CHAIN_RPC_URL" in rpc.stderr and "Traceback" not in rpc.stderr


def test_a_node_keypair_is_created_once_private_and_becomes_its_wallet(tmp_path: Path) -> None:
    path = node_key_path(tmp_path, "node-1")
    first = load_or_create_keypair(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(json.loads(path.read_text())) == 64  # Solana CLI format
    assert load_or_create_keypair(path).pubkey() == first.pubkey()
    profile = NodeProfile(node_id="node-1", region="eu-west", provider="offline", model="m")
    assert with_wallet(profile, data_dir=tmp_path).wallet == str(first.pubkey())
