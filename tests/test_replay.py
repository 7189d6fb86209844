"""Replay recorded histories against today's workflow code: a non-deterministic change fails CI.

One history per behaviour. Before the first release there are no running histories to protect:
after an intended change, re-record them all on the new code with

    XPANDO_RECORD_HISTORIES=1 pytest tests/test_task_workflow.py tests/test_provider_failover.py \
        tests/test_quorum_and_reputation.py tests/test_knowledge.py tests/test_node_identity.py \
        tests/test_payout_saga.py tests/test_payout_schedule.py -k "domain_expert or \
        slow_expert_is_hedged or quorum_is_reached or paraphrase or cancelled_task or \
        continues_as_new or registration_goes_through or approval_through or runs_dry or \
        tick_settles"

(the tests that write them: grep for XPANDO_RECORD_HISTORIES).
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


def test_every_behaviour_has_one_recorded_history() -> None:
    assert {p.stem for p in HISTORIES} == {
        "task_workflow",  # planned, routed, three experts asked, aggregated and recorded
        "task_workflow_failover",  # a slow expert hedged, its standby answering first
        "task_workflow_quorum",  # a quorum reached, the straggler cancelled
        "task_workflow_reused",  # answered from stored knowledge
        "task_workflow_cancelled",  # cancelled with one expert answered, two cancelled
        "knowledge_workflow",  # consolidations, then continue-as-new
        "node_registration_signed",  # a node worker's signed registration
        "payout_saga_workflow",  # an approval update, paid batches, reconciliation
        "payout_saga_compensation",  # transfers refused mid-epoch, carried over
        "payout_saga_tick",  # a Schedule tick starting one saga per due epoch
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
