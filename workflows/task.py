"""TaskWorkflow: plan → route → fan out to expert nodes → aggregate → record."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    TimeoutError,
    TimeoutType,
)
from temporalio.exceptions import (
    CancelledError as TemporalCancelledError,
)

with workflow.unsafe.imports_passed_through():
    from activities.answering import AnsweringActivities
    from activities.knowledge import KnowledgeActivities
    from activities.recording import RecordingActivities
    from activities.routing import RoutingActivities
    from xpando import temporal as sa
    from xpando.contracts import (
        AggregateInput,
        AggregateResult,
        AnswerInput,
        AnswerPolicy,
        AnswerResult,
        Contribution,
        ContributionStatus,
        ExpertOutcomeInput,
        FinishInput,
        FinishResult,
        KnowledgeItemInput,
        KnowledgeReuse,
        PlanInput,
        PlanResult,
        PlanRouteInput,
        PlanRouteResult,
        RecordInput,
        RouteCandidate,
        RouteInput,
        RouteResult,
        TaskInput,
        TaskProgress,
        TaskResult,
        TaskStage,
    )
    from xpando.mother.aggregate import knowledge_item, winning_domain
    from xpando.providers.errors import usage_of

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
# An ask still in its node's queue after this fails (not retried: a retry would only queue it
# again) and the slot moves to a standby: the node stopped polling after the routing decision saw
# it live, or every slot of it is busy. Overridable per task (TaskInput.answer_policy).
ANSWER_SCHEDULE_TO_START = timedelta(seconds=10)
ANSWER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=4,
    non_retryable_error_types=["WrongNode"],
)
STANDBYS = 2
# An expert still working after this long gets a standby asked in parallel (a hedge); the first
# answer wins and the other call is cancelled. Overridable per task (TaskInput.answer_policy).
ANSWER_HEDGE_AFTER = timedelta(seconds=30)
# When every standby is used up, route again (excluding the nodes tried) at most this often.
MAX_REROUTES = 2
# Reporting an ask's outcome to the circuit breakers is advisory: a few quick tries, then move on.
OUTCOME_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=3)
# Behaviour changes that running workflows must not see mid-run (see workflow.patched).
PATCH_EXPERT_FAILOVER = "expert-failover"
PATCH_KNOWLEDGE_REUSE = "knowledge-reuse"
PATCH_KNOWLEDGE_CONFIRM = "knowledge-confirm"
PATCH_RECORD_ROUTE_FAILURE = "record-route-failure"
PATCH_KNOWLEDGE_PUBLISH = "knowledge-publish"
PATCH_QUORUM = "quorum-fan-out"
# Fewer commands, events and core steps per task (see _patched): plan and route run as one local
# activity, aggregate and record (which publishes the knowledge item) as another; successful asks'
# outcomes go to the breakers with the record; asks started together share one hedge timer; and
# search attributes are upserted only when they change. A run with this patch took every older
# patch's path, so it records this one marker instead of seven.
PATCH_LEAN = "lean-task"
KNOWLEDGE_CONTEXT_ITEMS = 3


# Not sandboxed: this is the network's hot path, and the sandbox costs each run a re-import of
# this module and a sandboxed code execution per payload converted (over a fifth of the core
# worker's CPU per task). The module imports only deterministic code (contracts, helpers, all
# passed through anyway); tests/test_replay.py replays committed histories to keep it honest.
@workflow.defn(sandboxed=False)
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
        self._lean = False
        self._listed_domain: str | None = None  # XpandoDomain as last set (lean runs)
        self._succeeded: list[Contribution] = []  # asks whose outcome goes with the record

    @workflow.run
    async def run(self, input: TaskInput) -> TaskResult:
        self._lean = workflow.patched(PATCH_LEAN)
        self._task_id = input.task_id
        self._domain = input.domain
        if self._lean:  # what the task was started with (the API and CLI set both)
            started = workflow.info().typed_search_attributes
            self._status = started.get(sa.STATUS) or ""
            self._listed_domain = started.get(sa.DOMAIN)
        self._set_stage(TaskStage.PLANNING)

        planned = PlanInput(
            task_id=input.task_id,
            prompt=input.prompt,
            domain=input.domain,
            max_context=KNOWLEDGE_CONTEXT_ITEMS,
            fresh=input.fresh,
        )
        routed: RouteResult | None = None  # lean runs plan and route in one local activity
        if self._lean:
            try:
                both: PlanRouteResult = await workflow.execute_local_activity_method(
                    RoutingActivities.plan_route,
                    PlanRouteInput(plan=planned, route=self._route_input(input, k=input.k)),
                    start_to_close_timeout=CORE_STEP_TIMEOUT,
                    retry_policy=CORE_STEP_RETRY,
                )
            except (ActivityError, ApplicationError) as err:
                if _failure_type(err) == "NoExpertsAvailable":
                    await self._fail(input, _reason(err), [], type="NoExpertsAvailable")
                raise
            plan, routed = both.plan, both.route
        else:
            plan = await workflow.execute_local_activity_method(
                CoreActivities.plan,
                planned,
                start_to_close_timeout=CORE_STEP_TIMEOUT,
                retry_policy=CORE_STEP_RETRY,
            )
        if plan.reuse is not None and self._patched(PATCH_KNOWLEDGE_REUSE):
            return await self._answer_from_knowledge(input, plan.reuse)

        # A related item is known: one expert, given it as context, answers first; the full
        # panel is asked only if that expert cannot (see _confirm_or_widen).
        k = input.k
        confirming = (
            plan.suggested_k is not None
            and plan.suggested_k < input.k
            and self._patched(PATCH_KNOWLEDGE_CONFIRM)
        )
        if confirming and plan.suggested_k is not None:
            k = plan.suggested_k

        self._set_stage(TaskStage.ROUTING)
        try:
            route = routed if routed is not None else await self._route(input, k=k)
        except (ActivityError, ApplicationError) as err:
            # temporalio raises a local activity's ApplicationError as is (not wrapped in an
            # ActivityError): record the failed task either way (patched: older runs failed
            # without recording).
            if isinstance(err, ActivityError) or self._patched(PATCH_RECORD_ROUTE_FAILURE):
                await self._fail(input, _reason(err), [], type="NoExpertsAvailable")
            raise
        self._domain = route.domain
        self._chosen = [c.node_id for c in route.chosen]
        listed = self._domain or "general"
        updates: list[SearchAttributeUpdate[Any]] = []
        if not self._lean or listed != self._listed_domain:
            self._listed_domain = listed
            updates.append(sa.DOMAIN.value_set(listed))
        updates.append(sa.NODES.value_set(self._chosen))
        workflow.upsert_search_attributes(updates)

        self._set_stage(TaskStage.ANSWERING)
        contributions = await self._fan_out(input, route, plan)
        if confirming and not any(c.status == ContributionStatus.OK for c in contributions):
            contributions = await self._widen(input, plan, contributions)

        if not any(c.status != ContributionStatus.FAILED for c in contributions):
            tried = ", ".join(f"{c.node_id} [{c.provider}] ({c.error})" for c in contributions)
            await self._fail(
                input, f"every expert failed: {tried}", contributions, type="AllExpertsFailed"
            )

        self._set_stage(TaskStage.AGGREGATING)
        if self._lean:
            aggregated = await self._finish(input, route, contributions)
        else:
            aggregated = await self._aggregate_and_record(input, route, contributions)
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

    async def _finish(
        self, input: TaskInput, route: RouteResult, contributions: list[Contribution]
    ) -> AggregateResult:
        """Aggregate and record in one local activity (lean runs)."""
        finished: FinishResult = await workflow.execute_local_activity_method(
            RecordingActivities.finish,
            FinishInput(
                aggregate=_aggregate_input(input, contributions),
                record=RecordInput(
                    task_id=input.task_id,
                    prompt=input.prompt,
                    domain=self._domain,
                    status=TaskStage.COMPLETED,
                    outcomes=[self._outcome(c) for c in self._succeeded],
                ),
                domains=_candidate_domains(route),
                name_domain=input.domain is None,
            ),
            start_to_close_timeout=CORE_STEP_TIMEOUT,
            retry_policy=RECORD_RETRY,
        )
        self._domain = finished.domain
        return finished.aggregated

    async def _aggregate_and_record(
        self, input: TaskInput, route: RouteResult, contributions: list[Contribution]
    ) -> AggregateResult:
        """Before PATCH_LEAN: aggregate, then record, then publish — one local activity each."""
        aggregated: AggregateResult = await workflow.execute_local_activity_method(
            CoreActivities.aggregate,
            _aggregate_input(input, contributions),
            start_to_close_timeout=CORE_STEP_TIMEOUT,
            retry_policy=CORE_STEP_RETRY,
        )

        if input.domain is None:
            # The task's domain is the domain of the expert whose answer won.
            won = winning_domain(aggregated, _candidate_domains(route))
            if won is not None:
                self._domain = won
                workflow.upsert_search_attributes([sa.DOMAIN.value_set(self._domain)])

        self._set_stage(TaskStage.RECORDING)
        learned = aggregated.confidence > 0
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
        if workflow.patched(PATCH_KNOWLEDGE_PUBLISH) and learned:
            await self._publish_knowledge(self._knowledge_item(input, aggregated))
        return aggregated

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
        """Ask every chosen expert in parallel, failing over and hedging with standbys.

        Per chosen expert (a *slot*): a non-retryable failure, or retries used up, sends the task
        to a standby at once; an expert still working after the hedge deadline gets a standby
        asked in parallel, and the first answer wins (the other call is cancelled). A standby is
        preferably of a provider that has not failed in this task; when standbys run out the
        task is routed again, excluding every node tried. A failed ask is reported to the circuit
        breakers as soon as it ends; one that ended well is counted by the record step (before
        PATCH_LEAN: also at once).
        """
        if not self._patched(PATCH_EXPERT_FAILOVER):
            return await self._fan_out_without_failover(input, route, plan)
        retry = _answer_retry(input.answer_policy)
        hedge_after = _hedge_after(input.answer_policy)
        standbys = list(route.standbys)
        asked = [c.node_id for c in route.chosen]
        failed_providers: list[str] = []
        results: list[Contribution] = []
        reroutes = 0
        standby_lock = asyncio.Lock()
        # Lean runs: asks launched at the same moment share one hedge timer (one timer for the
        # whole first fan-out, not one per expert); it is cancelled once no ask waits on it.
        hedge_at: dict[datetime, asyncio.Task[None]] = {}
        hedge_users: dict[asyncio.Task[None], int] = {}

        def hedge_timer() -> asyncio.Task[None]:
            if not self._lean:
                return asyncio.create_task(workflow.sleep(hedge_after))
            timer = hedge_at.get(workflow.now())
            if timer is None or timer.done():
                timer = hedge_at[workflow.now()] = asyncio.create_task(workflow.sleep(hedge_after))
            hedge_users[timer] = hedge_users.get(timer, 0) + 1
            return timer

        def release(timer: asyncio.Task[None]) -> None:
            left = hedge_users.pop(timer, 1) - 1  # (a timer of its own is not counted)
            if left > 0:
                hedge_users[timer] = left
            else:
                timer.cancel()

        async def next_standby(busy: list[str]) -> RouteCandidate | None:
            """The next standby, preferring a provider that has neither failed in this task
            nor is the one still working on this slot (``busy``)."""
            nonlocal reroutes
            async with standby_lock:
                if not standbys and reroutes < MAX_REROUTES:
                    reroutes += 1
                    for c in await self._reroute(input, exclude=asked):
                        if c.node_id not in asked and all(s.node_id != c.node_id for s in standbys):
                            standbys.append(c)
                if not standbys:
                    return None
                avoid = [*failed_providers, *busy]
                index = next((i for i, c in enumerate(standbys) if c.provider not in avoid), 0)
                pick = standbys.pop(index)
                asked.append(pick.node_id)
                self._chosen.append(pick.node_id)
                return pick

        async def slot(first: RouteCandidate, stop: asyncio.Event | None = None) -> bool:
            """One chosen expert's place: True once someone in it answered. ``stop`` (quorum
            fan-out) ends it early: what is still running is cancelled as a straggler."""
            running: dict[asyncio.Task[Contribution], RouteCandidate] = {}
            timers: dict[asyncio.Task[Contribution], asyncio.Task[None]] = {}
            started: dict[asyncio.Task[Contribution], datetime] = {}
            hedged: list[asyncio.Task[Contribution]] = []

            def launch(candidate: RouteCandidate) -> None:
                ask = asyncio.create_task(self._ask(input, candidate, plan, retry=retry))
                running[ask] = candidate
                timers[ask] = hedge_timer()
                started[ask] = workflow.now()

            launch(first)
            won = False
            stopping = asyncio.create_task(stop.wait()) if stop is not None else None
            while running and not won and not (stop is not None and stop.is_set()):
                waiting: list[asyncio.Task[Any]] = [*running]
                waiting += [timers[t] for t in running if t not in hedged]
                if stopping is not None:
                    waiting.append(stopping)
                await workflow.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                ended: list[Contribution] = []
                for ask in [t for t in running if t.done()]:
                    candidate = running.pop(ask)
                    release(timers.pop(ask))
                    contribution = ask.result()
                    ended.append(contribution)
                    results.append(contribution)
                    if contribution.status == ContributionStatus.FAILED:
                        self._failed += 1
                        failed_providers.append(candidate.provider)
                    else:
                        self._answered += 1
                        won = True
                if not won and not (stop is not None and stop.is_set()):
                    busy = [running[t].provider for t in running]
                    for ask in [t for t in running if t not in hedged and timers[t].done()]:
                        hedged.append(ask)  # past its deadline: ask a standby alongside
                        standby = await next_standby(busy)
                        if standby is not None:
                            launch(standby)
                    # a failure with nothing left in time (none running, or only overdue asks)
                    if ended and all(t in hedged for t in running):
                        standby = await next_standby([running[t].provider for t in running])
                        if standby is not None:
                            launch(standby)
                for contribution in ended:
                    await self._report(contribution)
            if stopping is not None:
                stopping.cancel()
            for ask, candidate in running.items():  # a faster expert answered: stop the others
                ask.cancel()
                release(timers[ask])
                overdue = ask in hedged
                elapsed = workflow.now() - started[ask]
                if not won:  # the task reached its quorum or deadline without this slot
                    results.append(_straggler(candidate, elapsed))
                    continue
                loser = _failed(
                    candidate,
                    elapsed,
                    error_type="DeadlineExceeded" if overdue else "Superseded",
                    error=(
                        f"DeadlineExceeded: no answer within {hedge_after.total_seconds():g}s; "
                        "a standby answered first"
                        if overdue
                        else "Superseded: the expert it stood in for answered first"
                    ),
                )
                results.append(loser)
                if overdue:
                    self._failed += 1
                    await self._report(loser)
            return won

        quorum = _quorum(input, len(route.chosen))
        if quorum is not None and self._patched(PATCH_QUORUM):
            await self._until_quorum(input, quorum, slot, route.chosen)
        else:
            await asyncio.gather(*(slot(c) for c in route.chosen))
        if len(self._chosen) > len(route.chosen):
            workflow.upsert_search_attributes([sa.NODES.value_set(self._chosen)])
        return sorted(results, key=lambda c: c.node_id)

    async def _until_quorum(
        self,
        input: TaskInput,
        quorum: int,
        slot: Callable[[RouteCandidate, asyncio.Event], Coroutine[Any, Any, bool]],
        chosen: list[RouteCandidate],
    ) -> None:
        """Run the slots until ``quorum`` of them answered, or the deadline passed with at least
        one answer (with none, until the first); then stop the rest: their asks are cancelled
        (the activities see the cancellation at their next heartbeat) and recorded as
        stragglers, which neither the breakers nor reputations count."""
        stop = asyncio.Event()
        pending = [asyncio.create_task(slot(c, stop)) for c in chosen]
        deadline = (
            asyncio.create_task(workflow.sleep(timedelta(milliseconds=input.deadline_ms)))
            if input.deadline_ms
            else None
        )
        answered = 0
        while pending:
            waiting: list[asyncio.Task[Any]] = list(pending)
            if deadline is not None and not deadline.done():
                waiting.append(deadline)
            await workflow.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for done in [t for t in pending if t.done()]:
                pending.remove(done)
                answered += int(done.result())
            if answered >= quorum or (deadline is not None and deadline.done() and answered):
                break
        stop.set()
        await asyncio.gather(*pending)
        if deadline is not None and not deadline.done():
            deadline.cancel()

    async def _reroute(self, input: TaskInput, *, exclude: list[str]) -> list[RouteCandidate]:
        """More standbys: route again without the nodes already tried (none if none is left)."""
        try:
            route = await self._route(input, k=1, exclude=exclude)
        except (ActivityError, ApplicationError) as err:  # a local activity raises the latter
            workflow.logger.info("no more standbys: %s", _reason(err))
            return []
        return [*route.chosen, *route.standbys]

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

    async def _report(self, contribution: Contribution) -> None:
        """Count an ask's outcome for the circuit breakers (advisory: never fails the task)."""
        if self._lean and contribution.status != ContributionStatus.FAILED:
            self._succeeded.append(contribution)  # counted by the record step
            return
        try:
            await workflow.execute_local_activity_method(
                RoutingActivities.report_outcome,
                self._outcome(contribution),
                start_to_close_timeout=CORE_STEP_TIMEOUT,
                retry_policy=OUTCOME_RETRY,
            )
        except (ActivityError, ApplicationError) as err:
            workflow.logger.warning("could not report an expert outcome: %s", _reason(err))

    async def _fan_out_without_failover(
        self, input: TaskInput, route: RouteResult, plan: PlanResult
    ) -> list[Contribution]:
        """Before PATCH_EXPERT_FAILOVER: a failed expert is replaced by the next standby."""
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
        self,
        input: TaskInput,
        candidate: RouteCandidate,
        plan: PlanResult,
        *,
        retry: RetryPolicy = ANSWER_RETRY,
    ) -> Contribution:
        started = workflow.now()
        try:
            answer: AnswerResult = await workflow.execute_activity_method(
                AnsweringActivities.answer,
                AnswerInput(
                    task_id=input.task_id,
                    prompt=input.prompt,
                    node_id=candidate.node_id,
                    context=plan.context,
                ),
                task_queue=candidate.task_queue,
                start_to_close_timeout=ANSWER_START_TO_CLOSE,
                schedule_to_close_timeout=ANSWER_SCHEDULE_TO_CLOSE,
                schedule_to_start_timeout=_schedule_to_start(input.answer_policy),
                heartbeat_timeout=ANSWER_HEARTBEAT,
                retry_policy=retry,
                summary=f"answer on {candidate.node_id}",
            )
        except ActivityError as err:
            elapsed = workflow.now() - started
            usage = usage_of(_root(err))  # what a failed call still cost (tokens, USD)
            return _failed(
                candidate,
                elapsed,
                error=_reason(err),
                error_type=_error_type(err),
                input_tokens=usage.input_tokens if usage else 0,
                output_tokens=usage.output_tokens if usage else 0,
                cost_usd=usage.cost_usd if usage else 0.0,
                request_id=usage.request_id if usage else None,
                finish_reason=usage.finish_reason if usage else None,
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
            cost_usd=answer.cost_usd,
            request_id=answer.request_id,
        )

    async def _widen(
        self, input: TaskInput, plan: PlanResult, contributions: list[Contribution]
    ) -> list[Contribution]:
        """The confirming expert had no answer: ask the rest of the panel (not the ones asked)."""
        asked = [c.node_id for c in contributions]
        try:
            route = await self._route(input, k=max(1, input.k - len(asked)), exclude=asked)
        except (ActivityError, ApplicationError):
            return contributions  # nobody else to ask: aggregate what we have
        self._chosen.extend(c.node_id for c in route.chosen)
        more = await self._fan_out(input, route, plan)
        return sorted([*contributions, *more], key=lambda c: c.node_id)

    async def _answer_from_knowledge(self, input: TaskInput, reuse: KnowledgeReuse) -> TaskResult:
        """A confident match in stored knowledge answers the task: no experts, no provider cost."""
        self._set_stage(TaskStage.RECORDING)
        self._domain = input.domain or reuse.domain
        if self._domain and not self._lean:  # lean: listed with the final status
            workflow.upsert_search_attributes([sa.DOMAIN.value_set(self._domain)])
        await self._record(
            RecordInput(
                task_id=input.task_id,
                prompt=input.prompt,
                domain=self._domain,
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

    def _knowledge_item(self, input: TaskInput, aggregated: AggregateResult) -> KnowledgeItemInput:
        return knowledge_item(
            task_id=input.task_id,
            question=input.prompt,
            result=aggregated,
            domain=self._domain,
            at=workflow.now(),
        )

    async def _publish_knowledge(self, item: KnowledgeItemInput) -> None:
        """Before PATCH_LEAN: signal-with-start the domain's KnowledgeWorkflow in a step of its
        own (lean runs hand the item to the record step)."""
        await workflow.execute_local_activity_method(
            KnowledgeActivities.publish,
            item,
            start_to_close_timeout=CORE_STEP_TIMEOUT,
            retry_policy=RECORD_RETRY,
        )

    async def _record(self, record: RecordInput) -> None:
        await workflow.execute_local_activity_method(
            RecordingActivities.record,
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

    def _patched(self, patch_id: str) -> bool:
        """``workflow.patched`` for the patches older than PATCH_LEAN: a lean run took all of
        their new paths and records no marker for them (replays of older runs still ask)."""
        return self._lean or workflow.patched(patch_id)

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

    def _set_stage(self, stage: TaskStage) -> None:
        self._stage = stage
        status = {
            TaskStage.COMPLETED: "completed",
            TaskStage.FAILED: "failed",
        }.get(stage, "running")
        if status == self._status:
            return
        self._status = status
        updates: list[SearchAttributeUpdate[Any]] = [sa.STATUS.value_set(status)]
        listed = self._domain or "general"
        if self._lean and status != "running" and listed != self._listed_domain:
            self._listed_domain = listed
            updates.append(sa.DOMAIN.value_set(listed))
        workflow.upsert_search_attributes(updates)


def _candidate_domains(route: RouteResult) -> dict[str, list[str]]:
    return {c.node_id: c.domains for c in [*route.chosen, *route.standbys]}


def _aggregate_input(input: TaskInput, contributions: list[Contribution]) -> AggregateInput:
    return AggregateInput(
        task_id=input.task_id,
        prompt=input.prompt,
        contributions=contributions,
        strategy=input.strategy,
    )


def _answer_retry(policy: AnswerPolicy | None) -> RetryPolicy:
    if policy is None:
        return ANSWER_RETRY
    ms = timedelta(milliseconds=1)
    return RetryPolicy(
        initial_interval=(
            policy.initial_interval_ms * ms
            if policy.initial_interval_ms
            else ANSWER_RETRY.initial_interval
        ),
        backoff_coefficient=ANSWER_RETRY.backoff_coefficient,
        maximum_interval=(
            policy.maximum_interval_ms * ms
            if policy.maximum_interval_ms
            else ANSWER_RETRY.maximum_interval
        ),
        maximum_attempts=policy.maximum_attempts or ANSWER_RETRY.maximum_attempts,
        non_retryable_error_types=ANSWER_RETRY.non_retryable_error_types,
    )


def _quorum(input: TaskInput, chosen: int) -> int | None:
    """The number of answers that ends the fan-out, or None when it waits for every slot (no
    quorum below the number of experts and no deadline: the fan-out as before quorums)."""
    quorum = min(input.quorum or chosen, chosen)
    if quorum >= chosen and not input.deadline_ms:
        return None
    return max(1, quorum)


def _failed(
    candidate: RouteCandidate, elapsed: timedelta, *, error_type: str, error: str, **usage: Any
) -> Contribution:
    """A failed ask of ``candidate`` that ran for ``elapsed`` (``usage``: what it still cost)."""
    return Contribution(
        node_id=candidate.node_id,
        region=candidate.region,
        provider=candidate.provider,
        model=candidate.model,
        status=ContributionStatus.FAILED,
        latency_ms=int(elapsed.total_seconds() * 1000),
        error_type=error_type,
        error=error,
        **usage,
    )


def _straggler(candidate: RouteCandidate, elapsed: timedelta) -> Contribution:
    return _failed(
        candidate,
        elapsed,
        error_type="QuorumReached",
        error="QuorumReached: the task had its quorum (or passed its deadline) first; cancelled",
    )


def _hedge_after(policy: AnswerPolicy | None) -> timedelta:
    if policy is None or not policy.hedge_after_ms:
        return ANSWER_HEDGE_AFTER
    return timedelta(milliseconds=policy.hedge_after_ms)


def _schedule_to_start(policy: AnswerPolicy | None) -> timedelta:
    if policy is None or not policy.schedule_to_start_ms:
        return ANSWER_SCHEDULE_TO_START
    return timedelta(milliseconds=policy.schedule_to_start_ms)


def _failure_type(err: BaseException) -> str | None:
    """The type of the first ApplicationError in the chain (a local activity's may be ``err``)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError):
            return cause.type
        cause = cause.__cause__
    return None


def _root(err: BaseException) -> BaseException:
    """The provider's ApplicationError under an ActivityError (and any timeout wrapping it)."""
    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
        if isinstance(cause, ApplicationError):
            return cause
    return cause


def _error_type(err: ActivityError) -> str:
    """A type the breakers and operators can act on (see errors.BREAKER_EFFECT)."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError"
    if isinstance(cause, TimeoutError):
        # a node that stops heartbeating is gone, one that never took the ask is gone or full;
        # any other timeout is a deadline overrun
        if cause.type == TimeoutType.HEARTBEAT:
            return "NodeUnresponsive"
        if cause.type == TimeoutType.SCHEDULE_TO_START:
            return "NodeUnavailable"
        return "DeadlineExceeded"
    if isinstance(cause, TemporalCancelledError):
        return "Cancelled"
    return type(cause).__name__ if cause is not None else "ActivityError"


def _reason(err: BaseException) -> str:
    """The first typed ApplicationError in the cause chain (the provider's classified error, not
    the SDK exception under it), else the deepest cause."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.type:
            return f"{cause.type}: {cause.message}"
        if cause.__cause__ is None:
            break
        cause = cause.__cause__
    return str(cause or err)
