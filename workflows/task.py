"""TaskWorkflow: plan → route → fan out to expert nodes → aggregate → record."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    is_cancelled_exception,
)

from workflows.fanout import FanOut, failure_reason
from workflows.task_log import TaskLog, task_error

with workflow.unsafe.imports_passed_through():
    from activities.recording import RecordingActivities
    from activities.routing import RoutingActivities
    from xpando.contracts import (
        AggregateInput,
        AggregateResult,
        Contribution,
        ContributionStatus,
        ExpertOutcomeInput,
        FinishInput,
        FinishResult,
        KnowledgeReuse,
        PlanInput,
        PlanResult,
        PlanRouteInput,
        PlanRouteResult,
        RecordInput,
        RouteCandidate,
        RouteInput,
        RouteResult,
        TaskError,
        TaskEvents,
        TaskEventsInput,
        TaskInput,
        TaskProgress,
        TaskResult,
        TaskStage,
    )
    from xpando.db.errors import REFUSAL_TYPES
    from xpando.temporal import DOMAIN, NODES, STATUS

# Core steps are short and need no other queue: local activities on the core worker.
CORE_STEP_TIMEOUT = timedelta(seconds=30)
CORE_STEP_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=5)
# Recording must not be lost: retry until it lands (the writes are idempotent upserts).
RECORD_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=30)
)
# Reporting an ask's outcome to the circuit breakers is advisory: a few quick tries, then move on.
OUTCOME_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=3)
STANDBYS = 2
# With no live expert (a network starting, a region being rolled), a task routes again after
# EXPERT_WAIT_FIRST, doubling up to EXPERT_WAIT_MAX, until TaskInput.wait_for_experts_s (default
# DEFAULT_WAIT_FOR_EXPERTS) has passed: a timer per try, about a dozen tries in two minutes.
DEFAULT_WAIT_FOR_EXPERTS = timedelta(seconds=120)
EXPERT_WAIT_FIRST = timedelta(seconds=1)
EXPERT_WAIT_MAX = timedelta(seconds=15)
KNOWLEDGE_CONTEXT_ITEMS = 3


# Not sandboxed: this is the network's hot path, and the sandbox costs each run a re-import of
# this module and a sandboxed code execution per payload converted (over a fifth of the core
# worker's CPU per task). The module imports only deterministic code (contracts, helpers, all
# passed through anyway); tests/test_replay.py replays committed histories to keep it honest.
#
# Fewer commands, events and core steps per task: plan and route run as one local activity,
# aggregate and record (which publishes the knowledge item) as another; successful asks' outcomes
# go to the breakers with the record; search attributes are upserted only when they change.
@workflow.defn(sandboxed=False)
class TaskWorkflow:
    def __init__(self) -> None:
        self._task_id = ""
        self._stage = TaskStage.QUEUED
        self._domain: str | None = None
        self._error: str | None = None
        self._status = ""  # XpandoStatus as last set
        self._listed_domain: str | None = None  # XpandoDomain as last set
        self._fan_outs: list[FanOut] = []  # the panel, and the wider one if it was widened
        self._succeeded: list[Contribution] = []  # asks whose outcome goes with the record
        self._log = TaskLog()  # what the events query reads

    @workflow.run
    async def run(self, input: TaskInput) -> TaskResult:
        """The task (``_answer``), told in its event log; recorded as cancelled when it is."""
        self._task_id = input.task_id
        self._domain = input.domain
        started = workflow.info().typed_search_attributes  # the API and CLI set both
        self._status = started.get(STATUS) or ""
        self._listed_domain = started.get(DOMAIN)
        try:
            result = await self._answer(input)
        except (asyncio.CancelledError, FailureError) as err:
            if workflow.cancellation_reason() is not None and is_cancelled_exception(err):
                await self._record_cancelled(input)
            elif isinstance(err, FailureError):
                self._failed(err)
            raise
        self._log.result(result)
        return result

    async def _answer(self, input: TaskInput) -> TaskResult:
        """Plan, route, ask the experts, aggregate, record."""
        self._set_stage(TaskStage.PLANNING)
        plan, route = await self._plan_and_route(input)
        if plan.reuse is not None:
            return await self._answer_from_knowledge(input, plan.reuse)
        assert route is not None  # plan_route routes whenever stored knowledge does not answer
        self._list_route(route)

        self._set_stage(TaskStage.ANSWERING, route)  # announced with the routing decision
        contributions = await self._fan_out(input, plan, route)
        if _confirming(input, plan) and not any(
            c.status == ContributionStatus.OK for c in contributions
        ):
            contributions = await self._widen(input, plan, contributions)
        if all(c.status == ContributionStatus.FAILED for c in contributions):
            tried = ", ".join(f"{c.node_id} [{c.provider}] ({c.error})" for c in contributions)
            await self._fail(
                input, f"every expert failed: {tried}", contributions, type="AllExpertsFailed"
            )

        self._set_stage(TaskStage.AGGREGATING)
        aggregated = await self._finish(input, route, contributions)
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
            strategy=aggregated.strategy,
            routing=route.report,
        )

    @workflow.query
    def progress(self) -> TaskProgress:
        return TaskProgress(
            task_id=self._task_id,
            stage=self._stage,
            domain=self._domain,
            chosen=self._chosen,
            answered=sum(f.answered for f in self._fan_outs),
            failed=sum(f.failed for f in self._fan_outs),
            error=self._error,
        )

    @workflow.query
    def events(self, since: TaskEventsInput) -> TaskEvents:
        return self._log.since(since.after)

    # --- steps ----------------------------------------------------------------------------------

    async def _plan_and_route(self, input: TaskInput) -> tuple[PlanResult, RouteResult | None]:
        """Embed the prompt, look for reusable knowledge and, unless it answers the task, pick
        the experts (one local activity). A known related item lowers ``k`` (see _widen). With
        no live expert, wait for one (stage ``waiting_for_experts``), then fail with the reason."""
        limit = (
            DEFAULT_WAIT_FOR_EXPERTS
            if input.wait_for_experts_s is None
            else timedelta(seconds=input.wait_for_experts_s)
        )
        waited, pause = timedelta(0), EXPERT_WAIT_FIRST
        while True:
            try:
                both: PlanRouteResult = await workflow.execute_local_activity_method(
                    RoutingActivities.plan_route,
                    PlanRouteInput(
                        plan=PlanInput(
                            task_id=input.task_id,
                            prompt=input.prompt,
                            domain=input.domain,
                            max_context=KNOWLEDGE_CONTEXT_ITEMS,
                            fresh=input.fresh,
                        ),
                        route=self._route_input(input, k=input.k),
                    ),
                    start_to_close_timeout=CORE_STEP_TIMEOUT,
                    retry_policy=CORE_STEP_RETRY,
                )
                return both.plan, both.route
            except (ActivityError, ApplicationError) as err:
                if _failure_type(err) != "NoExpertsAvailable":
                    raise
                if waited >= limit:
                    reason = failure_reason(err)
                    if waited:
                        reason += f" (waited {waited.total_seconds():g} s for one)"
                    await self._fail(input, reason, [], type="NoExpertsAvailable")
                    raise
            self._set_stage(TaskStage.WAITING_FOR_EXPERTS)
            pause = min(pause, limit - waited)
            await workflow.sleep(pause)
            waited += pause
            pause = min(pause * 2, EXPERT_WAIT_MAX)
            self._set_stage(TaskStage.PLANNING)

    def _list_route(self, route: RouteResult) -> None:
        """Make the task findable by its domain and its experts."""
        self._domain = route.domain
        listed = self._domain or "general"
        updates: list[SearchAttributeUpdate[Any]] = []
        if listed != self._listed_domain:
            self._listed_domain = listed
            updates.append(DOMAIN.value_set(listed))
        updates.append(NODES.value_set([c.node_id for c in route.chosen]))
        workflow.upsert_search_attributes(updates)

    async def _fan_out(
        self, input: TaskInput, plan: PlanResult, route: RouteResult
    ) -> list[Contribution]:
        """Ask the routed experts (see FanOut), the plan's knowledge as their context."""
        fan_out = FanOut.for_task(
            input,
            route,
            plan.context,
            reroute=partial(self._reroute, input),
            report=self._report,
            arrived=self._log.contribution,
        )
        self._fan_outs.append(fan_out)
        contributions = await fan_out.run()  # cancelled: it cancels its asks, then re-raises
        if len(self._chosen) > len(route.chosen):  # standbys (or an earlier panel) took part
            workflow.upsert_search_attributes([NODES.value_set(self._chosen)])
        return contributions

    async def _widen(
        self, input: TaskInput, plan: PlanResult, contributions: list[Contribution]
    ) -> list[Contribution]:
        """A related item is known, so one expert was asked first, with it as context; it had no
        answer: ask the rest of the panel (not the ones asked)."""
        asked = [c.node_id for c in contributions]
        try:
            route = await self._route(input, k=max(1, input.k - len(asked)), exclude=asked)
        except (ActivityError, ApplicationError) as err:
            if is_cancelled_exception(err):
                raise
            return contributions  # nobody else to ask: aggregate what we have
        more = await self._fan_out(input, plan, route)
        return sorted([*contributions, *more], key=lambda c: c.node_id)

    async def _finish(
        self, input: TaskInput, route: RouteResult, contributions: list[Contribution]
    ) -> AggregateResult:
        """Aggregate, record and publish what was learned, in one local activity; the task's
        domain, when it had none, is the winning expert's."""
        finished: FinishResult = await self._unless_refused(
            RecordingActivities.finish,
            FinishInput(
                aggregate=AggregateInput(
                    task_id=input.task_id,
                    prompt=input.prompt,
                    contributions=contributions,
                    strategy=input.strategy,
                ),
                record=self._record_input(
                    input,
                    status=TaskStage.COMPLETED,
                    outcomes=[self._outcome(c) for c in self._succeeded],
                ),
                domains={c.node_id: c.domains for c in [*route.chosen, *route.standbys]},
                name_domain=input.domain is None,
            ),
            start_to_close_timeout=CORE_STEP_TIMEOUT,
            retry_policy=RECORD_RETRY,
        )
        self._domain = finished.domain
        return finished.aggregated

    async def _answer_from_knowledge(self, input: TaskInput, reuse: KnowledgeReuse) -> TaskResult:
        """A confident match in stored knowledge answers the task: no experts, no provider cost."""
        self._set_stage(TaskStage.RECORDING)
        self._domain = input.domain or reuse.domain
        await self._record(
            self._record_input(
                input,
                status=TaskStage.COMPLETED,
                answer=reuse.answer,
                confidence=reuse.confidence,
                reused_knowledge_id=reuse.knowledge_id,
            )
        )
        self._set_stage(TaskStage.COMPLETED)
        return TaskResult(
            task_id=input.task_id,
            prompt=input.prompt,
            answer=reuse.answer,
            confidence=reuse.confidence,
            domain=self._domain,
            contributions=[],
            completed_at=workflow.now(),
            reused=reuse,
        )

    async def _fail(
        self, input: TaskInput, reason: str, contributions: list[Contribution], *, type: str
    ) -> None:
        self._error = reason
        await self._record(
            self._record_input(
                input, status=TaskStage.FAILED, error=reason, contributions=contributions
            )
        )
        self._set_stage(TaskStage.FAILED)
        raise ApplicationError(reason, type=type, non_retryable=True)

    async def _record_cancelled(self, input: TaskInput) -> None:
        """Record the task as cancelled, with every contribution that came in (the asks the
        fan-out cancelled among them), and announce it."""
        asked = [c for fan_out in self._fan_outs for c in fan_out.contributions]
        contributions = sorted(asked, key=lambda c: c.node_id)
        answered = [c.node_id for c in contributions if c.status != ContributionStatus.FAILED]
        reason = workflow.cancellation_reason() or "cancelled"
        self._error = (
            f"cancelled ({reason}) with {len(answered)} of {len(contributions)} experts "
            f"asked answered: {', '.join(answered) or 'none'}"
        )
        try:
            await self._record(
                self._record_input(
                    input,
                    status=TaskStage.CANCELLED,
                    error=self._error,
                    contributions=contributions,
                    outcomes=[self._outcome(c) for c in self._succeeded],
                )
            )
        except ApplicationError as err:  # the database refused it: the cancellation stands
            workflow.logger.warning("the cancelled task was not recorded: %s", err.message)
        self._set_stage(TaskStage.CANCELLED)
        self._log.error(TaskError(type="Cancelled", message=self._error))

    def _failed(self, err: BaseException) -> None:
        """The task fails with ``err``: say so (progress, XpandoStatus, the event log)."""
        error = task_error(err)
        self._error = self._error or error.message
        self._set_stage(TaskStage.FAILED)
        self._log.error(error)

    # --- what the fan-out is given --------------------------------------------------------------

    async def _reroute(self, input: TaskInput, exclude: list[str]) -> list[RouteCandidate]:
        """More standbys: route again without the nodes already asked (none if none is left)."""
        try:
            route = await self._route(input, k=1, exclude=exclude)
        except (ActivityError, ApplicationError) as err:  # a local activity raises the latter
            workflow.logger.info("no more standbys: %s", failure_reason(err))
            return []
        return [*route.chosen, *route.standbys]

    async def _report(self, contribution: Contribution) -> None:
        """Count an ask's outcome for the circuit breakers (advisory: never fails the task). One
        that ended well is counted by the record step, with the others."""
        if contribution.status != ContributionStatus.FAILED:
            self._succeeded.append(contribution)
            return
        try:
            await workflow.execute_local_activity_method(
                RoutingActivities.report_outcome,
                self._outcome(contribution),
                start_to_close_timeout=CORE_STEP_TIMEOUT,
                retry_policy=OUTCOME_RETRY,
            )
        except (ActivityError, ApplicationError) as err:
            workflow.logger.warning("could not report an expert outcome: %s", failure_reason(err))

    # --- helpers --------------------------------------------------------------------------------

    @property
    def _chosen(self) -> list[str]:
        """Every expert asked so far, in the order they were."""
        return [node_id for fan_out in self._fan_outs for node_id in fan_out.asked]

    def _record_input(self, input: TaskInput, *, status: TaskStage, **fields: Any) -> RecordInput:
        """What the database keeps; submitted at the workflow's StartTime, as visibility has it."""
        return RecordInput(
            task_id=input.task_id,
            prompt=input.prompt,
            domain=self._domain,
            status=status,
            owner=input.owner,
            key_id=input.key_id,
            submitted_at=workflow.info().workflow_start_time,
            started_at=workflow.info().start_time,
            **fields,
        )

    def _route_input(self, input: TaskInput, *, k: int, exclude: Sequence[str] = ()) -> RouteInput:
        return RouteInput(
            task_id=input.task_id,
            prompt=input.prompt,
            k=k,
            standbys=STANDBYS,
            domain=input.domain,
            regions=input.regions,
            exclude=list(exclude),
        )

    async def _route(self, input: TaskInput, *, k: int, exclude: Sequence[str] = ()) -> RouteResult:
        """One routing decision (a local activity on the core worker); raises when no expert
        is available."""
        route: RouteResult = await workflow.execute_local_activity_method(
            RoutingActivities.route,
            self._route_input(input, k=k, exclude=exclude),
            start_to_close_timeout=CORE_STEP_TIMEOUT,
            retry_policy=CORE_STEP_RETRY,
        )
        return route

    async def _record(self, record: RecordInput) -> None:
        await self._unless_refused(
            RecordingActivities.record,
            record,
            start_to_close_timeout=CORE_STEP_TIMEOUT,
            retry_policy=RECORD_RETRY,
        )

    async def _unless_refused(self, step: Any, arg: Any, **options: Any) -> Any:
        """A recording step, retried until it lands; a database refusal ends the task ``failed``
        at once. A cancellation waits for it and the task ends as recorded: a record is one
        transaction (task, contributions, reputations, rewards), and its answers are paid for."""
        writing = workflow.start_local_activity_method(step, arg, **options)
        try:
            try:
                return await asyncio.shield(writing)
            except asyncio.CancelledError:
                return await writing
        except (ActivityError, ApplicationError) as err:
            if _failure_type(err) not in REFUSAL_TYPES:
                raise
            reason = f"the task could not be recorded: {failure_reason(err)}"
            if self._error:  # it was failing already: keep why
                reason = f"{self._error}; {reason}"
            self._error = reason
            self._set_stage(TaskStage.FAILED)
            raise ApplicationError(reason, type="RecordRefused", non_retryable=True) from err

    def _outcome(self, contribution: Contribution) -> ExpertOutcomeInput:
        info = workflow.info()
        return ExpertOutcomeInput(
            event_id=f"{info.workflow_id}:{info.run_id}:{contribution.node_id}",
            task_id=self._task_id,
            node_id=contribution.node_id,
            provider=contribution.provider,
            region=contribution.region,
            ok=contribution.status != ContributionStatus.FAILED,
            error_type=contribution.error_type,
            error=contribution.error,
        )

    def _set_stage(self, stage: TaskStage, route: RouteResult | None = None) -> None:
        """The stage the progress query shows, announced in the event log the first time the
        task enters it (waiting for experts goes back and forth to planning); XpandoStatus
        (and, once the task is over, its final XpandoDomain) upserted only when they change."""
        self._stage = stage
        self._log.stage(stage, route.report if route is not None else None)
        status = {
            TaskStage.COMPLETED: "completed",
            TaskStage.FAILED: "failed",
            TaskStage.CANCELLED: "cancelled",
            TaskStage.WAITING_FOR_EXPERTS: "waiting",
        }.get(stage, "running")
        if status == self._status:
            return
        self._status = status
        updates: list[SearchAttributeUpdate[Any]] = [STATUS.value_set(status)]
        listed = self._domain or "general"
        if stage.ended and listed != self._listed_domain:
            self._listed_domain = listed
            updates.append(DOMAIN.value_set(listed))
        workflow.upsert_search_attributes(updates)


def _confirming(input: TaskInput, plan: PlanResult) -> bool:
    """A related item is known: plan_route asked fewer experts first (see _widen)."""
    return plan.suggested_k is not None and plan.suggested_k < input.k


def _failure_type(err: BaseException) -> str | None:
    """The type of the first ApplicationError in the chain (a local activity's may be ``err``)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError):
            return cause.type
        cause = cause.__cause__
    return None
