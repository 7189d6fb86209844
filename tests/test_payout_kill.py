"""Kill the payout worker at each step boundary, restart it: exactly one transfer per payout.

"Kill" is real here: the activity worker is its own OS process (``tests/fakes/payout_worker``)
that SIGKILLs itself when ``pay_batch`` reaches the boundary — after the signed transaction is
stored but before it is sent; after the chain accepted it but before the ledger recorded it;
while polling for its confirmation. Temporal notices through the missed heartbeats and retries
the batch on the next worker process. The saga's workflow worker runs in the test process and
is not killed (a killed workflow worker only replays history; Temporal covers that).

On the embedded chain each process opens the chain from the journal in the data folder, so
this also shows that chain state survives the crash of the process that wrote it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from solders.keypair import Keypair
from temporalio.client import Client
from temporalio.worker import Worker

from tests.fakes.solana_rpc import LoopbackSolanaRpc, RpcFaults
from tests.payout_support import accrue, fresh_epoch, payout_settings, register_nodes
from workers.payouts import build_payout_activities, payout_activity_methods
from workflows.payout import PayoutSagaWorkflow
from xpando.chain import (
    Chain,
    ChainHandle,
    LiteSvmChain,
    RpcChain,
    SvmLedger,
    bootstrap_treasury,
    init_embedded_chain,
    ledger_path,
    parse_transfer,
)
from xpando.contracts_payouts import PayoutSagaInput, PayoutStage, epoch_workflow_id
from xpando.db import SessionFactory, ledger
from xpando.keys import load_keypair, treasury_key_path
from xpando.settings import Settings

ROOT = Path(__file__).parent.parent
BOUNDARIES = ["after_sign", "after_send", "confirming"]


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as the ``XPANDO_*`` environment of a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XPANDO_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        env[f"XPANDO_{name.upper()}"] = str(value)
    env["XPANDO_LOG_FORMAT"] = "json"
    return env


@pytest.fixture(params=["embedded", "rpc"])
async def kill_env(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[tuple[Settings, SvmLedger, dict[str, Any]]]:
    """Settings for one batch per payout, one at a time, and the chain they point to."""
    base = payout_settings(settings, payout_batch_size=1, payout_concurrency=1)
    if request.param == "embedded":
        init_embedded_chain(base)
        svm = SvmLedger(ledger_path(base.data_dir))
        yield base, svm, {"treasury": load_keypair(treasury_key_path(base.data_dir))}
        svm.close()
        return
    svm = SvmLedger(None)
    treasury = Keypair()
    mint = bootstrap_treasury(svm, treasury, decimals=6, supply=10**12)
    faults = RpcFaults(unseen_polls=2)  # confirmation takes a few polls: there is a "during"
    with LoopbackSolanaRpc(svm, faults) as rpc:
        s = base.model_copy(
            update={
                "chain": "rpc",
                "chain_rpc_url": rpc.url,
                "chain_mint": str(mint),
                "chain_treasury_key": SecretStr(treasury.to_json()),
                "chain_rpc_timeout_s": 2.0,
            }
        )
        yield s, svm, {"treasury": treasury, "mint": mint, "url": rpc.url}


async def _open(settings: Settings, svm: SvmLedger, extra: dict[str, Any]) -> Chain:
    if settings.chain == "embedded":
        return LiteSvmChain(svm, treasury=extra["treasury"])
    return await RpcChain.connect(extra["url"], treasury=extra["treasury"], mint=extra["mint"])


async def test_killing_the_worker_at_every_boundary_still_pays_each_node_exactly_once(
    client: Client,
    kill_env: tuple[Settings, SvmLedger, dict[str, Any]],
    sessions: SessionFactory,
) -> None:
    s, svm, extra = kill_env
    nodes = await register_nodes(sessions, 3)
    epoch = fresh_epoch()
    await accrue(sessions, epoch, {n.node_id: 0.3 + 0.2 * i for i, n in enumerate(nodes)})
    ids = sorted(ledger.payout_id(epoch, n.node_id) for n in nodes)
    env = settings_env(s)

    outputs: list[str] = []
    async with Worker(client, task_queue=s.core_task_queue, workflows=[PayoutSagaWorkflow]):
        handle = await client.start_workflow(
            PayoutSagaWorkflow.run,
            PayoutSagaInput(epoch=epoch),
            id=epoch_workflow_id(epoch),
            task_queue=s.core_task_queue,
        )
        # Payout i is the one in flight when worker process i dies at boundary i.
        for boundary, payout in zip(BOUNDARIES, ids, strict=True):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.fakes.payout_worker",
                "--kill-at",
                boundary,
                "--payout",
                payout,
                env=env,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                raw, _ = await asyncio.wait_for(proc.communicate(), timeout=90)
            finally:
                if proc.returncode is None:
                    proc.kill()
            out = raw.decode()
            assert proc.returncode == -signal.SIGKILL, out
            outputs.append(out)
        # The last restart is a plain worker (in process); it finishes the epoch.
        payouts = build_payout_activities(sessions=sessions, settings=s, chain=ChainHandle(s))
        async with Worker(
            client, task_queue=s.core_task_queue, activities=payout_activity_methods(payouts)
        ):
            result = await handle.result()

    assert [o.strip().splitlines()[-1] for o in outputs] == [
        f"killed at {b} {p}" for b, p in zip(BOUNDARIES, ids, strict=True)
    ]
    assert result.stage == PayoutStage.SETTLED and result.reconciled
    assert result.paid == 3
    async with sessions() as session:
        rows = {
            p.payout_id: p for p in (await ledger.list_payouts(session=session, epoch=epoch))[0]
        }
    chain = await _open(s, svm, extra)
    try:
        landed: Counter[str] = Counter()
        amounts: dict[str, int] = {}
        for t in await chain.treasury_transfers(since=None):
            if t.err is None and t.transfer.memo in rows:
                landed[t.transfer.memo] += 1
                amounts[t.transfer.memo] = t.transfer.amount or 0
    finally:
        if s.chain == "rpc":
            await chain.close()
    assert landed == {pid: 1 for pid in ids}  # exactly one transfer per payout
    assert amounts == {pid: rows[pid].amount for pid in ids}
    for pid in ids:
        # Killed after signing: the retry re-sent the stored bytes, it did not sign again.
        assert rows[pid].signatures == [rows[pid].signature], pid
        sent = svm.landed(rows[pid].signature or "")
        assert sent is not None and parse_transfer(sent.tx).memo == pid, pid
