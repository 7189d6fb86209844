"""TaskWorkflow on the real dev server with real core and node workers (in process)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.worker import Worker

from tests.conftest import offline_network, wait_for
from tests.fakes.experts import HangingPanel
from tests.fakes.networks import answered, fake_network, register_fake_nodes
from workers.core import build_core_worker
from workflows.task import TaskWorkflow
from xpando.contracts import (
    AnswerInput,
    Contribution,
    ContributionStatus,
    NodeDomain,
    NodeProfile,
    TaskEventsInput,
    TaskEventType,
    TaskInput,
    TaskResult,
    TaskStage,
    node_task_queue,
)
from xpando.db import SessionFactory, queries
from xpando.settings import Settings

HISTORY_DIR = Path(__file__).parent / "histories"


def _ids(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def network(
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    corpus_dir: Path,
    nodes: list[tuple[str, str]],
) -> AbstractAsyncContextManager[list[NodeProfile]]:
    return offline_network(client, settings, sessions, corpus_dir, nodes)


async def _run(
    client: Client, settings: Settings, prompt: str, k: int = 3, **kw: object
) -> TaskResult:
    task_id = _ids("task")
    return await client.execute_workflow(
        TaskWorkflow.run,
        TaskInput(task_id=task_id, prompt=prompt, k=k, **kw),
        id=task_id,
        task_queue=settings.core_task_queue,
    )


async def test_task_is_answered_by_the_domain_expert_and_recorded(
    client: Client, settings: Settings, sessions: SessionFactory, corpus_dir: Path
) -> None:
    nodes = [("cooking", "us-east"), ("astronomy", "eu-west"), ("gardening", "eu-west")]
    async with network(client, settings, sessions, corpus_dir, nodes) as profiles:
        task_id = _ids("task")
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt="How many minutes to boil a soft egg?", k=3),
            id=task_id,
            task_queue=settings.core_task_queue,
        )
        result = await handle.result()
        if os.environ.get("XPANDO_RECORD_HISTORIES"):
            history = await handle.fetch_history()
            (HISTORY_DIR / "task_workflow.json").write_text(history.to_json())

    cooking = profiles[0].node_id
    by_node = {c.node_id: c for c in result.contributions}
    assert set(by_node) == {p.node_id for p in profiles}
    assert by_node[cooking].status == ContributionStatus.OK
    assert by_node[cooking].citations[0].source == "cook/eggs"
    assert all(by_node[p.node_id].status == ContributionStatus.NO_ANSWER for p in profiles[1:])
    assert result.answer == by_node[cooking].answer and "six minutes" in result.answer
    assert result.domain == "cooking" and 0 < result.confidence <= 1
    assert by_node[cooking].quality > max(by_node[p.node_id].quality for p in profiles[1:])
    assert by_node[cooking].region == "us-east" and by_node[cooking].provider == "offline"

    async with sessions() as s:
        found = await queries.get_task(session=s, task_id=task_id)
    assert found is not None
    task, rows = found
    assert task.status == "completed" and task.answer == result.answer
    assert sorted(r.node_id for r in rows) == sorted(by_node)

    # Findable by its search attributes (visibility is eventually consistent).
    query = f'WorkflowId="{task_id}" AND XpandoStatus="completed" AND XpandoDomain="cooking"'

    async def listed() -> bool:
        return [w.id async for w in client.list_workflows(query)] == [task_id]

    await wait_for(listed, timeout=15)


async def test_region_constraint_is_honoured(
    client: Client, settings: Settings, sessions: SessionFactory, corpus_dir: Path
) -> None:
    nodes = [("cooking", "us-east"), ("cooking", "eu-west"), ("gardening", "eu-west")]
    async with network(client, settings, sessions, corpus_dir, nodes):
        result = await _run(
            client, settings, "How do I knead bread dough?", k=3, regions=["eu-west"]
        )
    assert {c.region for c in result.contributions} == {"eu-west"}
    assert len(result.contributions) == 2


def _flaky_answer(
    fail_nodes: set[str], delay_s: float = 0.0
) -> Callable[[AnswerInput], Awaitable[Contribution]]:
    @activity.defn(name="answer")
    async def answer(input: AnswerInput) -> Contribution:
        if delay_s:
            await asyncio.sleep(delay_s)
        if input.node_id in fail_nodes:
            raise ApplicationError("provider refused", type="ProviderRefused", non_retryable=True)
        return answered(input.node_id, f"bread needs yeast ({input.node_id})")

    return answer


async def _register_fake_nodes(
    sessions: SessionFactory, node_ids: list[str], fit: list[str]
) -> None:
    """Baking nodes, each fitting the prompt through its own keywords."""
    domains = [NodeDomain(name="baking", keywords=[keyword]) for keyword in fit]
    await register_fake_nodes(sessions, node_ids, domains)


async def test_failed_expert_is_replaced_by_a_standby(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    bad, good = _ids("bad"), _ids("good")
    # The failing node fits the prompt best, so it is chosen; the other is its standby.
    await _register_fake_nodes(sessions, [bad, good], ["bread yeast", "yeast"])
    answer = _flaky_answer({bad})
    async with fake_network(client, settings, sessions, [bad, good], answer):
        result = await _run(client, settings, "why does bread need yeast", k=1)
    by_node = {c.node_id: c for c in result.contributions}
    assert by_node[bad].status == ContributionStatus.FAILED
    assert "ProviderRefused" in (by_node[bad].error or "")
    assert by_node[good].status == ContributionStatus.OK
    assert result.answer == f"bread needs yeast ({good})"


async def test_task_fails_clearly_when_every_expert_fails(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    nodes = [_ids("bad"), _ids("bad")]
    await _register_fake_nodes(sessions, nodes, ["bread", "yeast"])
    answer = _flaky_answer(set(nodes))
    async with fake_network(client, settings, sessions, nodes, answer):
        task_id = _ids("task")
        with pytest.raises(WorkflowFailureError) as info:
            await client.execute_workflow(
                TaskWorkflow.run,
                TaskInput(task_id=task_id, prompt="why does bread need yeast", k=2),
                id=task_id,
                task_queue=settings.core_task_queue,
            )
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "AllExpertsFailed"
    assert all(n in cause.message for n in nodes)  # the error names what was tried
    async with sessions() as s:
        found = await queries.get_task(session=s, task_id=task_id)
    assert found is not None and found[0].status == "failed"
    assert sorted(r.node_id for r in found[1]) == sorted(nodes)


async def test_no_live_node_fails_with_a_typed_error_after_the_wait(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    # Registered, but no worker polls its queue: it must not be routed to.
    await _register_fake_nodes(sessions, [_ids("ghost")], ["bread"])
    task_id = _ids("task")
    async with build_core_worker(client, sessions=sessions, settings=settings):
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(
                task_id=task_id, prompt="why does bread need yeast", k=1, wait_for_experts_s=2
            ),
            id=task_id,
            task_queue=settings.core_task_queue,
        )

        async def waiting() -> bool:
            stage = (await handle.query(TaskWorkflow.progress)).stage
            return stage == TaskStage.WAITING_FOR_EXPERTS

        await wait_for(waiting, timeout=10, every=0.05)
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "NoExpertsAvailable"
    assert "waited 2 s" in cause.message
    async with sessions() as s:  # the failure is recorded, with what was wrong
        found = await queries.get_task(session=s, task_id=task_id)
    assert found is not None and found[0].status == "failed"
    assert "no live expert" in (found[0].error or "")


async def test_a_task_waits_for_an_expert_and_completes_when_one_starts(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    """A network still starting (or a node a few seconds late): the task is durable, so it
    waits in ``waiting_for_experts`` (listed as XpandoStatus="waiting") and routes once a node's
    worker polls, instead of failing."""
    node = _ids("late")
    await _register_fake_nodes(sessions, [node], ["bread"])
    task_id = _ids("task")
    async with build_core_worker(client, sessions=sessions, settings=settings):
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt="bread", k=1, wait_for_experts_s=60),
            id=task_id,
            task_queue=settings.core_task_queue,
        )

        async def listed_waiting() -> bool:
            query = f'WorkflowId="{task_id}" AND XpandoStatus="waiting"'
            return [w.id async for w in client.list_workflows(query)] == [task_id]

        await wait_for(listed_waiting, timeout=15)
        async with Worker(
            client, task_queue=node_task_queue(node), activities=[_flaky_answer(set())]
        ):
            result = await handle.result()
    assert [c.node_id for c in result.contributions] == [node]
    assert result.contributions[0].status == ContributionStatus.OK


async def test_progress_query_shows_the_stage_while_experts_work(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    node = _ids("slow")
    await _register_fake_nodes(sessions, [node], ["bread"])
    answer = _flaky_answer(set(), delay_s=1.5)
    async with fake_network(client, settings, sessions, [node], answer):
        task_id = _ids("task")
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt="bread", k=1),
            id=task_id,
            task_queue=settings.core_task_queue,
        )

        async def answering() -> bool:
            return (await handle.query(TaskWorkflow.progress)).stage == TaskStage.ANSWERING

        await wait_for(answering, timeout=10, every=0.05)
        progress = await handle.query(TaskWorkflow.progress)
        assert progress.chosen == [node]
        await handle.result()
        assert (await handle.query(TaskWorkflow.progress)).stage == TaskStage.COMPLETED


async def test_a_cancelled_task_stops_its_experts_and_is_recorded_with_who_answered(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    quick, slow = _ids("quick"), [_ids("hung"), _ids("hung")]
    nodes = [quick, *slow]
    await _register_fake_nodes(sessions, nodes, ["bread", "yeast", "dough"])
    panel = HangingPanel({quick})
    async with fake_network(client, settings, sessions, nodes, panel.answer):
        task_id = _ids("task")
        handle = await client.start_workflow(
            TaskWorkflow.run,
            TaskInput(task_id=task_id, prompt="why does bread need yeast", k=3),
            id=task_id,
            task_queue=settings.core_task_queue,
        )

        async def one_answered() -> bool:
            return (await handle.query(TaskWorkflow.progress)).answered == 1

        await wait_for(one_answered, timeout=15, every=0.05)
        await handle.cancel(reason="by the test")
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()

        # The hung experts' calls are cancelled too (at their next heartbeat), not abandoned.
        async def both_stopped() -> bool:
            return sorted(panel.cancelled) == sorted(slow)

        await wait_for(both_stopped, timeout=20)
        log = await handle.query(TaskWorkflow.events, TaskEventsInput())
        if os.environ.get("XPANDO_RECORD_HISTORIES"):
            history = await handle.fetch_history()
            (HISTORY_DIR / "task_workflow_cancelled.json").write_text(history.to_json())
    assert isinstance(info.value.cause, CancelledError)

    async with sessions() as s:
        found = await queries.get_task(session=s, task_id=task_id)
    assert found is not None
    task, rows = found
    assert task.status == "cancelled" and task.completed_at is not None
    assert task.error is not None and "by the test" in task.error and quick in task.error
    by_node = {r.node_id: r for r in rows}
    assert set(by_node) == set(nodes)
    assert by_node[quick].status == "ok"
    assert all(by_node[n].status == "failed" and by_node[n].error_type == "Cancelled" for n in slow)

    # The event log tells the same story and ends with the cancellation.
    types = [e.type for e in log.events]
    assert log.ended and [e.id for e in log.events] == list(range(1, len(log.events) + 1))
    arrived = [e.contribution.node_id for e in log.events if e.contribution is not None]
    assert arrived[0] == quick and sorted(arrived) == sorted(nodes)
    assert log.events[-2].stage == TaskStage.CANCELLED
    assert types[-1] == TaskEventType.ERROR and log.events[-1].error is not None
    assert log.events[-1].error.type == "Cancelled"
