"""The saga over RPC (solana-py's AsyncClient → a loopback JSON-RPC endpoint serving LiteSVM)
while the endpoint misbehaves: 429s and timeouts during confirmation, a transaction dropped in
flight, a response lost after the transfer landed, a blockhash that expires before landing.
Every time: exactly one transfer per payout lands."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from pydantic import SecretStr
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from tests.fakes.solana_rpc import LoopbackSolanaRpc, RpcFaults
from tests.payout_support import accrue, fresh_epoch, payout_settings, register_nodes, settle
from workers.core import build_core_worker
from workers.payouts import build_payout_activities
from xpando.chain import (
    ChainHandle,
    ChainNotInitialized,
    ChainUnavailable,
    RpcChain,
    SvmLedger,
    TransactionRejected,
    bootstrap_treasury,
)
from xpando.contracts_payouts import PayoutStage
from xpando.db import SessionFactory, ledger
from xpando.db.ledger_models import Payout
from xpando.economy.payments import chain_call
from xpando.settings import Settings

SUPPLY = 10**12


@dataclass
class RpcEnv:
    ledger: SvmLedger
    rpc: LoopbackSolanaRpc
    faults: RpcFaults
    treasury: Keypair
    mint: Pubkey
    settings: Settings

    async def chain(self) -> RpcChain:
        return await RpcChain.connect(self.rpc.url, treasury=self.treasury, mint=self.mint)

    def transfers(self, chain: RpcChain) -> Counter[str]:
        """Successful memo'd transfers out of the treasury, by memo (= payout id)."""
        from xpando.chain import parse_transfer

        found: Counter[str] = Counter()
        for landed in self.ledger.signatures_for(str(chain.treasury_token_account), limit=10**9):
            memo = parse_transfer(landed.tx).memo
            if landed.err is None and memo and memo.startswith("xpd-"):
                found[memo] += 1
        return found


def rpc_settings(settings: Settings, url: str, treasury: Keypair, mint: Pubkey) -> Settings:
    return payout_settings(
        settings,
        chain="rpc",
        chain_rpc_url=url,
        chain_mint=str(mint),
        chain_treasury_key=SecretStr(treasury.to_json()),
        chain_rpc_timeout_s=0.3,
    )


@pytest.fixture
async def rpc_env(settings: Settings) -> AsyncIterator[RpcEnv]:
    svm = SvmLedger(None)
    treasury = Keypair()
    mint = bootstrap_treasury(svm, treasury, decimals=6, supply=SUPPLY)
    faults = RpcFaults()
    with LoopbackSolanaRpc(svm, faults, timeout_sleep_s=0.5) as rpc:
        yield RpcEnv(
            svm, rpc, faults, treasury, mint, rpc_settings(settings, rpc.url, treasury, mint)
        )


async def _settle_over_rpc(
    client: Client, env: RpcEnv, sessions: SessionFactory, nodes: int
) -> tuple[list[Payout], Counter[str]]:
    registered = await register_nodes(sessions, nodes)
    epoch = fresh_epoch()
    await accrue(sessions, epoch, {n.node_id: 0.2 + 0.1 * i for i, n in enumerate(registered)})
    handle = ChainHandle(env.settings)
    payouts = build_payout_activities(sessions=sessions, settings=env.settings, chain=handle)
    async with build_core_worker(client, sessions=sessions, settings=env.settings, payouts=payouts):
        result = await settle(client, env.settings, epoch)
    await handle.close()
    assert result.stage == PayoutStage.SETTLED and result.reconciled
    assert result.paid == nodes and result.carried_over == 0
    async with sessions() as session:
        rows, _ = await ledger.list_payouts(session=session, epoch=epoch)
    chain = await env.chain()
    try:
        transfers = env.transfers(chain)
    finally:
        await chain.close()
    return rows, transfers


async def test_rate_limits_and_timeouts_during_confirmation_only_delay_it(
    client: Client, rpc_env: RpcEnv, sessions: SessionFactory
) -> None:
    rpc_env.faults.unseen_polls = 2  # landed transfers stay invisible for two polls
    rpc_env.faults.script += [
        ("getSignatureStatuses", "429"),
        ("getSignatureStatuses", "timeout"),
        ("getSignatureStatuses", "429"),
        ("getSignatureStatuses", "timeout"),
        ("getSignatureStatuses", "429"),
    ]
    rows, transfers = await _settle_over_rpc(client, rpc_env, sessions, nodes=4)
    assert rpc_env.faults.counts == {"429": 3, "timeout": 2}
    assert {p.payout_id: 1 for p in rows} == dict(transfers)  # each landed exactly once
    assert all(p.signatures == [p.signature] for p in rows)  # never needed a second signature


async def test_a_blockhash_that_expires_before_landing_is_signed_anew_and_lands_once(
    client: Client, rpc_env: RpcEnv, sessions: SessionFactory
) -> None:
    rpc_env.faults.script.append(("sendTransaction", "expire_and_drop"))
    rows, transfers = await _settle_over_rpc(client, rpc_env, sessions, nodes=3)
    assert rpc_env.faults.counts == {"expire_and_drop": 1}
    assert {p.payout_id: 1 for p in rows} == dict(transfers)
    resigned = [p for p in rows if len(p.signatures) > 1]
    assert resigned  # the dropped one (and any sent after the expiry) got a fresh blockhash
    for p in resigned:
        assert p.signature == p.signatures[-1] and p.attempts == len(p.signatures)
        assert rpc_env.ledger.statuses(p.signatures[:-1]) == [None] * (len(p.signatures) - 1)


async def test_a_dropped_send_is_rebroadcast_and_a_lost_response_is_not_paid_again(
    client: Client, rpc_env: RpcEnv, sessions: SessionFactory
) -> None:
    rpc_env.faults.script += [("sendTransaction", "drop"), ("sendTransaction", "lost_response")]
    rows, transfers = await _settle_over_rpc(client, rpc_env, sessions, nodes=3)
    assert rpc_env.faults.counts == {"drop": 1, "lost_response": 1}
    assert {p.payout_id: 1 for p in rows} == dict(transfers)
    assert all(p.signatures == [p.signature] for p in rows)  # same bytes, re-sent


async def test_what_the_chain_refuses_fails_a_step_at_once_an_unavailable_chain_is_retried() -> (
    None
):
    async def refused() -> None:
        raise TransactionRejected({"InstructionError": [0, {"Custom": 1}]})

    async def not_set_up() -> None:
        raise ChainNotInitialized("no treasury key: run `xpando chain init`")

    async def rate_limited() -> None:
        raise ChainUnavailable("RPC answered HTTP 429 (rate limited)", retry_after_s=3.0)

    failures: list[ApplicationError] = []
    for call in (refused, not_set_up, rate_limited):
        with pytest.raises(ApplicationError) as failed:
            await chain_call(call)
        failures.append(failed.value)
    assert [(f.type, f.non_retryable) for f in failures] == [
        ("TransactionRejected", True),
        ("ChainNotInitialized", True),
        ("ChainUnavailable", False),
    ]
    assert failures[2].next_retry_delay == timedelta(seconds=3)  # the RPC's Retry-After
