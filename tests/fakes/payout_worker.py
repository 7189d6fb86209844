"""The payout part of a core worker as its own OS process, which SIGKILLs itself at a step.

``python -m tests.fakes.payout_worker --kill-at after_send --payout xpd-7-node-b``

It runs what the core worker runs for payouts — ``PayoutSagaWorkflow`` and the real
``PayoutActivities`` with the real chain and database from ``XPANDO_*`` settings — on the core
task queue. When a step reaches the boundary (``after_sign``: signed bytes stored, nothing sent;
``after_send``: the chain accepted it, the ledger does not know; ``confirming``: polling for its
status; ``reconciling``: the chain scanned, the ledger not yet checked; ``finishing``: the
epoch's outcome not yet stored) for that payout (any, without ``--payout``), the process kills
itself with SIGKILL — no cleanup, no goodbye to Temporal, exactly like a crash or an OOM kill —
taking the saga's workflow worker with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta

from temporalio.worker import Worker

from workers.core import STICKY_QUEUE_TIMEOUT
from workers.payouts import build_payout_activities, payout_activity_methods
from workflows.payout import PayoutSagaWorkflow
from xpando import temporal
from xpando.chain import ChainHandle
from xpando.db import create_engine, session_factory
from xpando.economy.payments import (
    AFTER_SEND,
    AFTER_SIGN,
    CONFIRMING,
    FINISHING,
    RECONCILING,
    PayoutHooks,
)
from xpando.settings import Settings

KILL_POINTS = [AFTER_SIGN, AFTER_SEND, CONFIRMING, RECONCILING, FINISHING]


class KillAt(PayoutHooks):
    def __init__(self, boundary: str | None, payout_id: str | None) -> None:
        self.boundary = boundary
        self.payout_id = payout_id

    async def at(self, boundary: str, payout_ids: Sequence[str]) -> None:
        if boundary == self.boundary and (self.payout_id is None or self.payout_id in payout_ids):
            print(f"killed at {boundary} {self.payout_id or ''}".strip(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


async def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at", choices=KILL_POINTS)
    parser.add_argument("--payout")
    args = parser.parse_args(argv)
    settings = Settings()
    client = await temporal.connect(settings, attempts=20)
    engine = create_engine(settings.database_dsn)
    payouts = build_payout_activities(
        sessions=session_factory(engine),
        settings=settings,
        chain=ChainHandle(settings),
        hooks=KillAt(args.kill_at, args.payout),
    )
    worker = Worker(
        client,
        task_queue=settings.core_task_queue,
        workflows=[PayoutSagaWorkflow],
        activities=payout_activity_methods(payouts),
        graceful_shutdown_timeout=timedelta(seconds=1),
        sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,  # as the core worker's
    )
    print("polling", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
