"""Replay recorded histories against today's workflow code: a non-deterministic change fails CI.

Re-record after an intended, patched change with
``XPANDO_RECORD_HISTORIES=1 pytest tests/test_task_workflow.py -k domain_expert``
(and keep the old file too, so both code paths stay covered: e.g. ``task_workflow_v2.json``
is a run from before the ``lean-task`` patch, ``task_workflow_v2_lean.json`` one with it).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

# This module defines a workflow, so the sandbox re-imports it: pass heavy modules through.
with workflow.unsafe.imports_passed_through():
    from workers.core import WORKFLOWS
    from xpando.contracts import TaskInput

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def _load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem, path.read_text())


def test_every_workflow_has_a_recorded_history() -> None:
    assert {p.stem for p in HISTORIES} >= {
        "task_workflow",
        "task_workflow_v2",
        "task_workflow_reused",
        "task_workflow_failover",  # a hedged expert, its standby, breaker reports
        "node_registration_workflow",
        "node_registration_signed",
        "task_workflow_quorum",
        "knowledge_workflow",
        "payout_saga_workflow",  # an approval update, paid batches, reconciliation
        "payout_saga_compensation",  # transfers refused mid-epoch, carried over
        "payout_saga_tick",  # a Schedule tick starting one saga per due epoch
        # the lean-task / knowledge-lean patches (the files above keep the older paths)
        "task_workflow_v2_lean",
        "task_workflow_reused_lean",
        "task_workflow_failover_lean",
        "task_workflow_quorum_lean",
        "knowledge_workflow_lean",
    }


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays_on_current_code(path: Path) -> None:
    replayer = Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(_load(path), raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure


@workflow.defn(name="TaskWorkflow")
class ReorderedTaskWorkflow:
    """A careless edit: waits before planning. Replay must catch it."""

    @workflow.run
    async def run(self, input: TaskInput) -> None:
        await workflow.sleep(timedelta(seconds=1))


async def test_replay_catches_a_non_deterministic_change() -> None:
    replayer = Replayer(workflows=[ReorderedTaskWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(
        _load(Path(__file__).parent / "histories" / "task_workflow.json"),
        raise_on_replay_failure=False,
    )
    assert result.replay_failure is not None
    assert "nondetermin" in str(result.replay_failure).lower()
