"""TaskWorkflow: plan → route → fan out to expert nodes → aggregate → record."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.core import CoreActivities
    from activities.node import NodeActivities
    from xpando import temporal as sa
    from xpando.contracts import (
        AggregateInput,
        AggregateResult,
        AnswerInput,
        AnswerResult,
        Contribution,
        ContributionStatus,
        PlanInput,
        PlanResult,
        RecordInput,
        RouteCandidate,
        RouteInput,
        RouteResult,
        TaskInput,
        TaskProgress,
        TaskResult,
        TaskStage,
    )

# Core steps are short and need no other queue: local activities on the core worker.
CORE_STEP_TIMEOUT = timedelta(seconds=30)
CORE_STEP_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=5)
# Recording must not be lost: retry until it lands (the writes are idempotent upserts).
RECORD_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=30)
)

# Experts run on their own node's task queue.
ANSWER_START_TO_CLOSE = timedelta(seconds=60)
ANSWER_SCHEDULE_TO_CLOSE = timedelta(minutes=3)
ANSWER_HEARTBEAT = timedelta(seconds=5)
ANSWER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=4,
    non_retryable_error_types=["WrongNode"],
)
STANDBYS = 2
KNOWLEDGE_CONTEXT_ITEMS = 3


@workflow.defn
class TaskWorkflow:
    def __init__(self) -> None:
        self._task_id = ""
        self._stage = TaskStage.QUEUED
        self._domain: str | None = None
        self._chosen: list[str] = []
        self._answered = 0
        self._failed = 0
        self._error: str | None = None
        self._status = ""

    @workflow.run
    async def run(self, input: TaskInput) -> TaskResult:
        self._task_id = input.task_id
        self._domain = input.domain
        self._set_stage(TaskStage.PLANNING)

        plan: PlanResult = await workflow.execute_local_activity_method(
            CoreActivities.plan,
            PlanInput(
                task_id=input.task_id,
                prompt=input.prompt,
                domain=input.domain,
                max_context=KNOWLEDGE_CONTEXT_ITEMS,
            ),
            start_to_close_timeout=CORE_STEP_TIMEOUT,
            retry_policy=CORE_STEP_RETRY,
        )

        self._set_stage(TaskStage.ROUTING)
        try:
            route: RouteResult = await workflow.execute_local_activity_method(
                CoreActivities.route,
                RouteInput(
                    task_id=input.task_id,
                    prompt=input.prompt,
                    k=input.k,
                    standbys=STANDBYS,
                    domain=input.domain,
                    regions=input.regions,
                ),
                start_to_close_timeout=CORE_STEP_TIMEOUT,
                retry_policy=CORE_STEP_RETRY,
            )
        except ActivityError as err:
            await self._fail(input, _reason(err), [], type="NoExpertsAvailable")
            raise AssertionError("unreachable") from err
        self._domain = route.domain
        self._chosen = [c.node_id for c in route.chosen]
        workflow.upsert_search_attributes(
            [
                sa.DOMAIN.value_set(self._domain or "general"),
                sa.NODES.value_set(self._chosen),
            ]
        )

        self._set_stage(TaskStage.ANSWERING)
        contributions = await self._fan_out(input, route, plan)

        if not any(c.status != ContributionStatus.FAILED for c in contributions):
            tried = ", ".join(f"{c.node_id} ({c.error})" for c in contributions)
            await self._fail(
                input, f"every expert failed: {tried}", contributions, type="AllExpertsFailed"
            )

        self._set_stage(TaskStage.AGGREGATING)
        aggregated: AggregateResult = await workflow.execute_local_activity_method(
            CoreActivities.aggregate,
            AggregateInput(task_id=input.task_id, prompt=input.prompt, contributions=contributions),
            start_to_close_timeout=CORE_STEP_TIMEOUT,
            retry_policy=CORE_STEP_RETRY,
        )

        if input.domain is None:
            # The task's domain is the domain of the expert whose answer won.
            domains = {c.node_id: c.domains for c in [*route.chosen, *route.standbys]}
            winner = max(
                (c for c in aggregated.contributions if c.status == ContributionStatus.OK),
                key=lambda c: c.quality,
                default=None,
            )
            if winner is not None and domains.get(winner.node_id):
                self._domain = domains[winner.node_id][0]
                workflow.upsert_search_attributes([sa.DOMAIN.value_set(self._domain)])

        self._set_stage(TaskStage.RECORDING)
        await self._record(
            RecordInput(
                task_id=input.task_id,
                prompt=input.prompt,
                domain=self._domain,
                status=TaskStage.COMPLETED,
                answer=aggregated.answer,
                confidence=aggregated.confidence,
                contributions=aggregated.contributions,
            )
        )
        self._set_stage(TaskStage.COMPLETED)
        return TaskResult(
            task_id=input.task_id,
            prompt=input.prompt,
            answer=aggregated.answer,
            confidence=aggregated.confidence,
            domain=self._domain,
            contributions=aggregated.contributions,
            knowledge_used=[k.knowledge_id for k in plan.context],
            completed_at=workflow.now(),
        )

    @workflow.query
    def progress(self) -> TaskProgress:
        return TaskProgress(
            task_id=self._task_id,
            stage=self._stage,
            domain=self._domain,
            chosen=list(self._chosen),
            answered=self._answered,
            failed=self._failed,
            error=self._error,
        )

    # --- steps ----------------------------------------------------------------------------------

    async def _fan_out(
        self, input: TaskInput, route: RouteResult, plan: PlanResult
    ) -> list[Contribution]:
        """Ask every chosen expert in parallel; an expert that fails is replaced by a standby."""
        standbys = list(route.standbys)
        results: list[Contribution] = []

        async def slot(candidate: RouteCandidate) -> None:
            current: RouteCandidate | None = candidate
            while current is not None:
                contribution = await self._ask(input, current, plan)
                results.append(contribution)
                if contribution.status == ContributionStatus.FAILED:
                    self._failed += 1
                    current = standbys.pop(0) if standbys else None
                    if current is not None:
                        self._chosen.append(current.node_id)
                else:
                    self._answered += 1
                    current = None

        await asyncio.gather(*(slot(c) for c in route.chosen))
        return sorted(results, key=lambda c: c.node_id)

    async def _ask(
        self, input: TaskInput, candidate: RouteCandidate, plan: PlanResult
    ) -> Contribution:
        started = workflow.now()
        try:
            answer: AnswerResult = await workflow.execute_activity_method(
                NodeActivities.answer,
                AnswerInput(
                    task_id=input.task_id,
                    prompt=input.prompt,
                    node_id=candidate.node_id,
                    context=plan.context,
                ),
                task_queue=candidate.task_queue,
                start_to_close_timeout=ANSWER_START_TO_CLOSE,
                schedule_to_close_timeout=ANSWER_SCHEDULE_TO_CLOSE,
                heartbeat_timeout=ANSWER_HEARTBEAT,
                retry_policy=ANSWER_RETRY,
                summary=f"answer on {candidate.node_id}",
            )
        except ActivityError as err:
            elapsed = workflow.now() - started
            return Contribution(
                node_id=candidate.node_id,
                region=candidate.region,
                provider=candidate.provider,
                model=candidate.model,
                status=ContributionStatus.FAILED,
                latency_ms=int(elapsed.total_seconds() * 1000),
                error=_reason(err),
            )
        return Contribution(
            node_id=answer.node_id,
            region=answer.region,
            provider=answer.provider,
            model=answer.model,
            status=answer.status,
            answer=answer.answer,
            citations=answer.citations,
            relevance=answer.relevance,
            latency_ms=answer.latency_ms,
            input_tokens=answer.input_tokens,
            output_tokens=answer.output_tokens,
            finish_reason=answer.finish_reason,
            attempts=answer.attempt,
        )

    async def _record(self, record: RecordInput) -> None:
        await workflow.execute_local_activity_method(
            CoreActivities.record,
            record,
            start_to_close_timeout=CORE_STEP_TIMEOUT,
            retry_policy=RECORD_RETRY,
        )

    async def _fail(
        self, input: TaskInput, reason: str, contributions: list[Contribution], *, type: str
    ) -> None:
        self._error = reason
        await self._record(
            RecordInput(
                task_id=input.task_id,
                prompt=input.prompt,
                domain=self._domain,
                status=TaskStage.FAILED,
                error=reason,
                contributions=contributions,
            )
        )
        self._set_stage(TaskStage.FAILED)
        raise ApplicationError(reason, type=type, non_retryable=True)

    def _set_stage(self, stage: TaskStage) -> None:
        self._stage = stage
        status = {
            TaskStage.COMPLETED: "completed",
            TaskStage.FAILED: "failed",
        }.get(stage, "running")
        if status != self._status:
            self._status = status
            workflow.upsert_search_attributes([sa.STATUS.value_set(status)])


def _reason(err: BaseException) -> str:
    cause: BaseException | None = err
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, ApplicationError) and cause.type:
        return f"{cause.type}: {cause.message}"
    return str(cause or err)
