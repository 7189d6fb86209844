"""Worker Versioning: a run stays on the build that started it while new runs go to the new one.

Two core workers of one deployment (named after their task queue) poll the same queue as
versions A and B. A task started on A waits for an expert; B is rolled out (made current) while
it waits; when an expert appears, the waiting run still finishes on A — its history says which
build completed each workflow task — and a task started after the rollout runs on B."""

from __future__ import annotations

import uuid

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from tests.conftest import wait_for
from tests.test_task_workflow import _register_fake_nodes
from workers.core import build_core_worker
from workflows.task import TaskWorkflow
from xpando.contracts import (
    AnswerInput,
    Contribution,
    ContributionStatus,
    TaskInput,
    TaskResult,
    TaskStage,
    node_task_queue,
)
from xpando.db import SessionFactory
from xpando.settings import Settings


@activity.defn(name="answer")
async def answer(input: AnswerInput) -> Contribution:
    return Contribution(
        node_id=input.node_id,
        region="eu-west",
        provider="fake",
        model="fake-1",
        status=ContributionStatus.OK,
        answer="Yeast makes the dough rise.",
        relevance=0.9,
    )


async def _builds(handle: WorkflowHandle[TaskWorkflow, TaskResult]) -> set[str]:
    """The build ids that completed the run's workflow tasks."""
    history = await handle.fetch_history()
    return {
        event.workflow_task_completed_event_attributes.deployment_version.build_id
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    }


async def test_a_pinned_run_finishes_on_its_build_while_new_runs_go_to_the_rollout(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    queue = f"core-{uuid.uuid4().hex[:8]}"  # its own deployment: other tests keep theirs
    build_a = settings.model_copy(update={"core_task_queue": queue, "build_id": "A"})
    build_b = settings.model_copy(update={"core_task_queue": queue, "build_id": "B"})
    node = f"late-{uuid.uuid4().hex[:8]}"
    await _register_fake_nodes(sessions, [node], ["bread"])

    def task(task_id: str) -> TaskInput:
        return TaskInput(task_id=task_id, prompt="bread", k=1, wait_for_experts_s=120, fresh=True)

    async with build_core_worker(client, sessions=sessions, settings=build_a):
        first = await client.start_workflow(
            TaskWorkflow.run, task("task-a-" + node), id="task-a-" + node, task_queue=queue
        )

        async def waiting() -> bool:
            progress = await first.query(TaskWorkflow.progress)
            return progress.stage == TaskStage.WAITING_FOR_EXPERTS

        await wait_for(waiting, timeout=15)
        async with (
            build_core_worker(client, sessions=sessions, settings=build_b),  # the rollout
            Worker(client, task_queue=node_task_queue(node), activities=[answer]),
        ):
            done = await first.result()
            second = await client.start_workflow(
                TaskWorkflow.run, task("task-b-" + node), id="task-b-" + node, task_queue=queue
            )
            later = await second.result()

    assert done.contributions[0].status == ContributionStatus.OK
    assert later.contributions[0].status == ContributionStatus.OK
    assert await _builds(first) == {"A"}  # pinned: never replayed on B
    assert await _builds(second) == {"B"}
