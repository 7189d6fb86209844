"""Kill the core worker at each payout step, restart it: each node is paid exactly once, and
the epoch finishes soon after the restart.

"Kill" is real here: the saga's workflow worker and its activities run in their own OS process
(``tests/fakes/payout_worker``) that SIGKILLs itself when a step reaches a boundary — after the
signed transaction is stored but before it is sent; after the chain accepted it but before the
ledger recorded it; while polling for its confirmation; while reconciling; while finishing.
Temporal notices through the missed heartbeats (or, for a short step, its short timeout) and
runs the step again on the next worker process.

How soon is the outcome a user sees: an epoch whose worker dies must finish well within a minute
of the restart, not when some step's minutes-long timeout expires. Each test waits at most
``RECOVERY_WAIT_S`` for it and prints how long it took.

On the embedded chain each process opens the chain from the journal in the data folder, so
this also shows that chain state survives the crash of the process that wrote it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from solders.keypair import Keypair
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from tests.fakes.payout_worker import KILL_POINTS
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
from xpando.contracts_payouts import (
    PayoutSagaInput,
    PayoutSagaResult,
    PayoutStage,
    epoch_workflow_id,
)
from xpando.db import SessionFactory, ledger
from xpando.keys import load_keypair, treasury_key_path
from xpando.settings import Settings

ROOT = Path(__file__).parent.parent
PAY_BOUNDARIES = ["after_sign", "after_send", "confirming"]  # inside pay_batch
# A worker process that is to die at a boundary gets there within this (it starts, takes over
# from the one killed before it, and runs up to the boundary).
KILLED_WITHIN_S = 90.0
# The epoch must finish within this of the restart: generous for a loaded machine, and well
# below the minutes a step's start-to-close timeout would cost if a dead worker were noticed
# only when it expires.
RECOVERY_WAIT_S = 90.0


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


async def run_until_killed(settings: Settings, boundary: str, payout: str | None) -> str:
    """Run the payout worker process until it kills itself at ``boundary``; its last line."""
    target = ["--payout", payout] if payout else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.payout_worker",
        "--kill-at",
        boundary,
        *target,
        env=settings_env(settings),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), timeout=KILLED_WITHIN_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = raw.decode()
    assert proc.returncode == -signal.SIGKILL, out
    return out.strip().splitlines()[-1]


@asynccontextmanager
async def restarted_worker(
    client: Client, settings: Settings, sessions: SessionFactory
) -> AsyncIterator[None]:
    """The restart: a plain worker (in this process) with the saga and its activities."""
    chain = ChainHandle(settings)
    payouts = build_payout_activities(sessions=sessions, settings=settings, chain=chain)
    try:
        async with Worker(
            client,
            task_queue=settings.core_task_queue,
            workflows=[PayoutSagaWorkflow],
            activities=payout_activity_methods(payouts),
        ):
            yield
    finally:
        await chain.close()


async def finish_after_restart(
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    handle: WorkflowHandle[Any, PayoutSagaResult],
    killed_at: str,
) -> PayoutSagaResult:
    """Restart the worker and wait (at most ``RECOVERY_WAIT_S``) for the epoch to finish."""
    restarted = time.monotonic()
    async with restarted_worker(client, settings, sessions):
        try:
            result = await asyncio.wait_for(handle.result(), timeout=RECOVERY_WAIT_S)
        except TimeoutError:
            raise AssertionError(
                f"killed at {killed_at}: the epoch did not finish within {RECOVERY_WAIT_S:.0f} s "
                "of the restart"
            ) from None
    took = time.monotonic() - restarted
    print(
        f"\nrecovery [{settings.chain}] killed at {killed_at}: "
        f"the epoch finished {took:.1f} s after the restart"
    )
    return result


async def assert_each_paid_exactly_once(
    kill_env: tuple[Settings, SvmLedger, dict[str, Any]],
    sessions: SessionFactory,
    epoch: int,
    ids: list[str],
) -> None:
    s, svm, extra = kill_env
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


async def start_epoch(
    client: Client, settings: Settings, sessions: SessionFactory, nodes: int
) -> tuple[int, list[str], WorkflowHandle[Any, PayoutSagaResult]]:
    """An ended epoch with ``nodes`` paid nodes, its saga started; its payout ids in order."""
    registered = await register_nodes(sessions, nodes)
    epoch = fresh_epoch()
    await accrue(sessions, epoch, {n.node_id: 0.3 + 0.2 * i for i, n in enumerate(registered)})
    ids = sorted(ledger.payout_id(epoch, n.node_id) for n in registered)
    handle = await client.start_workflow(
        PayoutSagaWorkflow.run,
        PayoutSagaInput(epoch=epoch),
        id=epoch_workflow_id(epoch),
        task_queue=settings.core_task_queue,
    )
    return epoch, ids, handle


async def test_killing_the_worker_at_every_boundary_still_pays_each_node_exactly_once(
    client: Client,
    kill_env: tuple[Settings, SvmLedger, dict[str, Any]],
    sessions: SessionFactory,
) -> None:
    s, _, _ = kill_env
    epoch, ids, handle = await start_epoch(client, s, sessions, len(PAY_BOUNDARIES))
    # Payout i is the one in flight when worker process i dies at boundary i; each process
    # takes over from the one killed before it.
    killed = [
        await run_until_killed(s, boundary, payout)
        for boundary, payout in zip(PAY_BOUNDARIES, ids, strict=True)
    ]
    assert killed == [f"killed at {b} {p}" for b, p in zip(PAY_BOUNDARIES, ids, strict=True)]
    result = await finish_after_restart(client, s, sessions, handle, "+".join(PAY_BOUNDARIES))
    assert result.stage == PayoutStage.SETTLED and result.reconciled
    assert result.paid == len(ids)
    await assert_each_paid_exactly_once(kill_env, sessions, epoch, ids)


# The embedded chain only: the three-kills test above already runs the pay steps on both
# chains, and the recovery measured here is the worker's and the workflow's, not the chain's.
@pytest.mark.parametrize("kill_env", ["embedded"], indirect=True)
@pytest.mark.parametrize("boundary", KILL_POINTS)
async def test_an_epoch_whose_worker_is_killed_at_any_step_finishes_soon_after_the_restart(
    client: Client,
    kill_env: tuple[Settings, SvmLedger, dict[str, Any]],
    sessions: SessionFactory,
    boundary: str,
) -> None:
    s, _, _ = kill_env
    epoch, ids, handle = await start_epoch(client, s, sessions, 2)
    # In pay_batch, the first payout's transfer is in flight; reconcile and finish are the epoch's.
    payout = ids[0] if boundary in PAY_BOUNDARIES else None
    killed = await run_until_killed(s, boundary, payout)
    assert killed == f"killed at {boundary} {payout or ''}".strip()
    result = await finish_after_restart(client, s, sessions, handle, boundary)
    assert result.stage == PayoutStage.SETTLED and result.reconciled
    assert result.paid == len(ids)
    await assert_each_paid_exactly_once(kill_env, sessions, epoch, ids)
