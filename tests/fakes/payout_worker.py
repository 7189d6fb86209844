"""A payout activity worker as its own OS process, which SIGKILLs itself at a step boundary.

``python -m tests.fakes.payout_worker --kill-at after_send --payout xpd-7-node-b``

It is the real ``PayoutActivities`` with the real chain and database from ``XPANDO_*``
settings, polling the core task queue. When ``pay_batch`` reaches the boundary for that payout
(``after_sign``: signed bytes stored, nothing sent; ``after_send``: the chain accepted it, the
ledger does not know; ``confirming``: polling for its status) the process kills itself with
SIGKILL — no cleanup, no goodbye to Temporal, exactly like a crash or an OOM kill.
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

from workers.payouts import build_payout_activities, payout_activity_methods
from xpando import temporal
from xpando.chain import ChainHandle
from xpando.db import create_engine, session_factory
from xpando.economy.payments import PayoutHooks
from xpando.settings import Settings


class KillAt(PayoutHooks):
    def __init__(self, boundary: str | None, payout_id: str | None) -> None:
        self.boundary = boundary
        self.payout_id = payout_id

    async def at(self, boundary: str, payout_ids: Sequence[str]) -> None:
        if boundary == self.boundary and self.payout_id in payout_ids:
            print(f"killed at {boundary} {self.payout_id}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


async def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at", choices=["after_sign", "after_send", "confirming"])
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
        activities=payout_activity_methods(payouts),
        graceful_shutdown_timeout=timedelta(seconds=1),
    )
    print("polling", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
