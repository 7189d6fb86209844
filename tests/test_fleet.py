"""``xpando worker nodes``: many nodes in one process, each registered with its own signed identity,
each answering on its own queue (real dev server, core worker and database)."""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack

import pytest
from temporalio.client import Client

from cli.main import main
from tests.conftest import wait_live
from workers.core import build_core_worker
from workers.nodes import FleetSpec, fleet_nodes, fleet_worker, register_fleet
from workflows.task import TaskWorkflow
from xpando.contracts import ContributionStatus, TaskInput
from xpando.db import SessionFactory, queries
from xpando.settings import Settings


async def test_one_process_hosts_many_registered_nodes(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    spec = FleetSpec(
        count=24,
        prefix=f"sim{uuid.uuid4().hex[:6]}",
        regions=("eu-west", "us-east", "ap-south"),
        provider="instant",
        domains=("python", "temporal", "web-api", "solana"),
    )
    nodes = fleet_nodes(spec, data_dir=settings.data_dir)
    assert len({n.profile.wallet for n in nodes}) == 24  # one identity key per node
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            build_core_worker(client, sessions=sessions, settings=settings)
        )
        for node in nodes:
            await stack.enter_async_context(fleet_worker(client, node))
        assert await register_fleet(client, nodes, core_task_queue=settings.core_task_queue) == []
        await wait_live(client, *(n.profile.task_queue for n in nodes))
        task_id = f"task-{uuid.uuid4().hex[:8]}"
        result = await client.execute_workflow(
            TaskWorkflow.run,
            TaskInput(
                task_id=task_id,
                prompt="How do I set a retry policy on a Temporal activity?",
                k=3,
                regions=["us-east"],
                fresh=True,
            ),
            id=task_id,
            task_queue=settings.core_task_queue,
        )
    async with sessions() as s:
        rows = await queries.list_nodes(session=s)
    assert len(rows) == 24
    assert all(r.public_key == r.wallet and r.public_key for r in rows)
    assert {c.status for c in result.contributions} == {ContributionStatus.OK}
    assert {c.region for c in result.contributions} == {"us-east"}
    assert result.routing is not None
    chosen = [c for c in result.routing.candidates if c.outcome == "chosen"]
    assert chosen[0].domain == "temporal"  # the best fit is a temporal node


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "0"], "--count must be between 1 and 100000"),
        (["--count", "2", "--capacity", "0"], "--capacity must be >= 1"),
        (["--count", "2", "--provider", "offline", "--domains", "cooking"], "built-in domains"),
    ],
)
def test_bad_fleet_options_are_clear_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], settings: Settings
) -> None:
    assert main(["worker", "nodes", *argv]) == 2
    assert message in capsys.readouterr().err
