"""A node worker process killed mid-answer and started again: the task completes, once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client

from tests.conftest import wait_for, wait_live
from workers.core import build_core_worker
from workers.node import NodeSpec, build_node, build_node_worker, register
from workflows.task import TaskWorkflow
from xpando.contracts import ContributionStatus, TaskInput, node_task_queue
from xpando.db import SessionFactory, queries
from xpando.settings import Settings


@contextmanager
def node_process(
    settings: Settings, node_id: str, corpus: Path, *, latency_ms: int
) -> Iterator[subprocess.Popen[bytes]]:
    """``xpando worker node`` as its own OS process, as operators run it."""
    env = {
        **os.environ,
        "XPANDO_TEMPORAL_ADDRESS": settings.temporal_target,
        "XPANDO_CORE_TASK_QUEUE": settings.core_task_queue,
        "XPANDO_DATA_DIR": str(settings.data_dir),
        "XPANDO_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "worker",
            "node",
            "--node-id",
            node_id,
            "--region",
            "eu-west",
            "--corpus",
            str(corpus),
            "--simulated-latency-ms",
            str(latency_ms),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_task_survives_a_node_worker_killed_mid_answer(
    client: Client, settings: Settings, sessions: SessionFactory, corpus_dir: Path
) -> None:
    slow = f"restart-{uuid.uuid4().hex[:6]}"
    helper = NodeSpec(
        node_id=f"steady-{uuid.uuid4().hex[:6]}",
        region="us-east",
        domain="gardening",
        corpus=corpus_dir / "gardening.jsonl",
    )
    profile, provider = build_node(helper, data_dir=settings.data_dir)
    cooking = corpus_dir / "cooking.jsonl"
    task_id = f"task-restart-{uuid.uuid4().hex[:8]}"
    async with (
        build_core_worker(client, sessions=sessions, settings=settings),
        build_node_worker(client, profile=profile, provider=provider),
    ):
        await register(client, profile, core_task_queue=settings.core_task_queue)
        with node_process(settings, slow, cooking, latency_ms=60_000) as first:

            async def registered() -> bool:
                async with sessions() as s:
                    return await queries.get_node(session=s, node_id=slow) is not None

            await wait_for(registered, timeout=60)
            await wait_live(client, node_task_queue(slow), profile.task_queue)
            handle = await client.start_workflow(
                TaskWorkflow.run,
                TaskInput(task_id=task_id, prompt="How many minutes to boil an egg?", k=2),
                id=task_id,
                task_queue=settings.core_task_queue,
            )

            async def answering_on_slow_node() -> bool:
                desc = await handle.describe()
                return any(
                    a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                    and slow in a.last_worker_identity
                    for a in desc.raw_description.pending_activities
                )

            await wait_for(answering_on_slow_node, timeout=30)
            first.send_signal(signal.SIGKILL)  # a crash: no graceful shutdown, no goodbye
            first.wait(10)

        with node_process(settings, slow, cooking, latency_ms=0):
            result = await handle.result()

    by_node = {c.node_id: c for c in result.contributions}
    assert set(by_node) == {slow, helper.node_id}
    assert by_node[slow].status == ContributionStatus.OK
    assert by_node[slow].attempts >= 2  # retried on the restarted worker
    assert "cook/eggs" in [c.source for c in by_node[slow].citations]
    async with sessions() as s:
        found = await queries.get_task(session=s, task_id=task_id)
        count = await queries.count_contributions(session=s, task_id=task_id)
    assert found is not None and found[0].status == "completed"
    assert count == 2  # one row per node: no duplicates from the retry
