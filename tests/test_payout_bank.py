"""The bank invariant, over many epochs of random worker kills and RPC faults.

Chain: solana-py's AsyncClient against the loopback JSON-RPC endpoint serving LiteSVM, which
randomly answers 429, times out, drops sent transactions, loses the response of a transfer
that landed, and expires blockhashes before transactions land. The treasury holds less than
the epochs will earn, so the last epochs run short and carry payouts over.

Kills here are in-process (the SIGKILL tests are ``test_payout_kill.py``): at a random step
boundary of ``pay_batch`` the activity worker "dies" — the activity raises, every other
activity on that worker stops at its next boundary, and the test tears the worker down
(cancelling whatever it was doing, wherever it was) and builds a new one with fresh clients.
The saga's workflow worker stays up.

At the end: the sum of on-chain transfers equals the sum of paid rows, each payout id landed at
most once, and accrued = paid + carried over.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta

from pydantic import SecretStr
from solders.keypair import Keypair
from temporalio.client import Client
from temporalio.worker import Worker

from tests.fakes.solana_rpc import LoopbackSolanaRpc, RpcFaults
from tests.payout_support import accrue, fresh_epoch, payout_settings, register_nodes, totals
from workers.payouts import build_payout_activities, payout_activity_methods
from workflows.payout import PayoutSagaWorkflow
from xpando.chain import ChainHandle, RpcChain, SvmLedger, bootstrap_treasury, parse_transfer
from xpando.contracts_payouts import PayoutSagaInput, PayoutStage, epoch_workflow_id
from xpando.db import SessionFactory
from xpando.economy.payments import PayoutHooks
from xpando.settings import Settings

EPOCHS = 8
NODES = 6
EMISSION = 1_000_000
SEED = 20240611
KILL_RATE = 0.12
MAX_KILLS = 12


class SimulatedCrash(Exception):
    pass


class Chaos(PayoutHooks):
    """Kills the worker at a random boundary; a dead worker's activities stop at theirs."""

    def __init__(self, rng: random.Random, budget: list[int]) -> None:
        self.rng = rng
        self.budget = budget
        self.dead = asyncio.Event()

    async def at(self, boundary: str, payout_ids: Sequence[str]) -> None:
        if self.dead.is_set():
            raise SimulatedCrash("this worker is dead")
        if boundary != "start" and self.budget[0] > 0 and self.rng.random() < KILL_RATE:
            self.budget[0] -= 1
            self.dead.set()
            raise SimulatedCrash(f"worker killed at {boundary}")


async def test_many_epochs_under_kills_and_rpc_faults_keep_the_books_balanced(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    rng = random.Random(SEED)
    svm = SvmLedger(None)
    treasury = Keypair()
    supply = EMISSION * (EPOCHS - 2) + EMISSION // 3  # runs short in the last epochs
    mint = bootstrap_treasury(svm, treasury, decimals=6, supply=supply)
    faults = RpcFaults(
        # Each kind at least once, then at random.
        script=[
            ("sendTransaction", "lost_response"),
            ("getSignatureStatuses", "429"),
            ("sendTransaction", "expire_and_drop"),
            ("getSignatureStatuses", "timeout"),
            ("sendTransaction", "drop"),
        ],
        rate=0.06,
        kinds=("429", "timeout"),
        send_kinds=("drop", "lost_response", "expire_and_drop"),
        seed=SEED,
    )
    nodes = await register_nodes(sessions, NODES, without_wallet=1)
    first = fresh_epoch()
    budget = [MAX_KILLS]
    kills = 0
    results = []
    with LoopbackSolanaRpc(svm, faults, timeout_sleep_s=0.35) as rpc:
        s = payout_settings(
            settings,
            payout_emission=EMISSION,
            payout_batch_size=2,
            payout_concurrency=2,
            chain="rpc",
            chain_rpc_url=rpc.url,
            chain_mint=str(mint),
            chain_treasury_key=SecretStr(treasury.to_json()),
            chain_rpc_timeout_s=0.25,
        )

        def activity_worker() -> tuple[Worker, Chaos, ChainHandle]:
            chaos = Chaos(rng, budget)
            handle = ChainHandle(s)
            acts = build_payout_activities(sessions=sessions, settings=s, chain=handle, hooks=chaos)
            worker = Worker(
                client,
                task_queue=s.core_task_queue,
                activities=payout_activity_methods(acts),
                graceful_shutdown_timeout=timedelta(0),
            )
            return worker, chaos, handle

        async with Worker(client, task_queue=s.core_task_queue, workflows=[PayoutSagaWorkflow]):
            worker, chaos, handle = activity_worker()
            running = asyncio.create_task(worker.run())
            for epoch in range(first, first + EPOCHS):
                scores = {n.node_id: round(rng.uniform(0.05, 1.0), 3) for n in nodes}
                await accrue(sessions, epoch, scores)
                saga = asyncio.ensure_future(
                    client.execute_workflow(
                        PayoutSagaWorkflow.run,
                        PayoutSagaInput(epoch=epoch),
                        id=epoch_workflow_id(epoch),
                        task_queue=s.core_task_queue,
                    )
                )
                while not saga.done():
                    died = asyncio.ensure_future(chaos.dead.wait())
                    await asyncio.wait({saga, died}, return_when=asyncio.FIRST_COMPLETED)
                    if chaos.dead.is_set():  # tear the dead worker down, start a new one
                        kills += 1
                        await worker.shutdown()
                        await running
                        await handle.close()
                        worker, chaos, handle = activity_worker()
                        running = asyncio.create_task(worker.run())
                    died.cancel()
                results.append(saga.result())
            await worker.shutdown()
            await running
            await handle.close()

        chain = await RpcChain.connect(rpc.url, treasury=treasury, mint=mint)
        balance = await chain.treasury_balance()
        await chain.close()

    landed: Counter[str] = Counter()
    landed_amount = 0
    for t in svm.signatures_for(str(chain.treasury_token_account), limit=10**9):
        info = parse_transfer(t.tx)
        if t.err is None and info.memo and info.memo.startswith("xpd-"):
            landed[info.memo] += 1
            landed_amount += info.amount or 0
    books = await totals(sessions)
    print(
        f"\nbank run: {EPOCHS} epochs, {books['payouts']} payouts, "
        f"{books['paid_payouts']} paid ({books['paid']} base units), "
        f"{books['carried_over']} base units carried over, {sum(landed.values())} transfers "
        f"on chain, {kills} worker kills, RPC faults {dict(faults.counts)}, "
        f"requests {sum(rpc.requests.values())}"
    )
    assert all(r.stage == PayoutStage.SETTLED and r.reconciled for r in results)
    assert landed_amount == books["paid"]  # chain and ledger agree to the base unit
    assert max(landed.values()) == 1  # no payout id landed twice
    assert len(landed) == books["paid_payouts"]
    assert books["earned"] == EPOCHS * EMISSION  # everything accrued was split exactly
    assert books["earned"] == books["paid"] + books["carried_over"]  # nothing lost
    assert books["in_flight"] == 0
    assert balance == supply - books["paid"]
    assert books["carried_over"] > 0 and kills > 0
    assert set(faults.counts) >= {"429", "timeout", "drop", "lost_response", "expire_and_drop"}
