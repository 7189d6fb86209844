"""FanOut: ask a task's experts in parallel, hedging, failing over and stopping at a quorum.

TaskWorkflow's third step as a unit with its own state, driven on its own by
tests/test_fanout.py. It runs inside a workflow (it starts activities and timers) and is given
its dependencies as callables, so a test can hand it others:

- ``ask(candidate)``: one ask of one expert, never raising — a failure comes back as a FAILED
  ``Contribution``. ``ask_expert`` is the one TaskWorkflow uses (the node's ``answer``
  activity on the node's own queue).
- ``reroute(exclude)``: more standbys once they are used up (none when nobody is left).
- ``report(contribution)``: an ask's outcome, as soon as it is known, for the circuit breakers.
- ``arrived(contribution)`` (optional): every contribution as it joins the result, for the
  task's event log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
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
    from xpando.contracts import (
        AnswerInput,
        AnswerPolicy,
        Contribution,
        ContributionStatus,
        KnowledgeSnippet,
        RouteCandidate,
        RouteResult,
        TaskInput,
    )
    from xpando.providers.errors import usage_of

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
# An expert still working after this long gets a standby asked in parallel (a hedge); the first
# answer wins and the other call is cancelled. Overridable per task (TaskInput.answer_policy).
ANSWER_HEDGE_AFTER = timedelta(seconds=30)
# When every standby is used up, route again (excluding the nodes tried) at most this often.
MAX_REROUTES = 2

Ask = Callable[[RouteCandidate], Coroutine[Any, Any, Contribution]]
Reroute = Callable[[list[str]], Awaitable[list[RouteCandidate]]]
Report = Callable[[Contribution], Awaitable[None]]
Arrived = Callable[[Contribution], None]


class FanOut:
    """Ask every chosen expert in parallel; fail over and hedge with standbys; stop at a quorum.

    Each chosen expert holds a *slot*. A failed ask (non-retryable, or retries used up) sends the
    slot to a standby at once; an ask still running after ``hedge_after`` gets a standby asked
    alongside, and the first answer wins (the other ask is cancelled and recorded as
    ``DeadlineExceeded`` when it was the overdue one, ``Superseded`` when it was the standby). A
    standby is preferably of a provider that has neither failed in this fan-out nor is still
    working on the slot; when the standbys run out, ``reroute`` is asked for more (excluding
    every node asked), at most ``MAX_REROUTES`` times.

    With a ``quorum`` below the number of chosen experts, or a ``deadline``, the fan-out ends
    once that many slots answered, or the deadline passed with at least one answer (with none,
    at the first); the asks still running are cancelled and recorded as ``QuorumReached``
    stragglers, which neither the breakers nor the reputations count.

    ``cancel()``, or cancelling what awaits ``run`` (the workflow's cancellation), ends it the
    same way at once, whatever answered: the asks still running are cancelled and recorded as
    ``Cancelled``; ``run`` then re-raises the cancellation, and ``contributions`` holds them all.

    ``report`` is awaited for every ask that ended on its own and for an overdue ask beaten by
    its standby; not for a standby that lost, a straggler or a cancelled ask. ``arrived`` is
    called for every contribution as it joins the result, whatever its outcome. Asks launched at
    the same moment share one hedge timer.

    State, read by the workflow's queries while it runs: ``asked`` (node ids, the chosen first,
    then each standby as it is taken), ``answered``, ``failed`` and ``contributions``.
    """

    def __init__(
        self,
        chosen: Sequence[RouteCandidate],
        standbys: Sequence[RouteCandidate],
        *,
        ask: Ask,
        reroute: Reroute,
        report: Report,
        arrived: Arrived | None = None,
        hedge_after: timedelta = ANSWER_HEDGE_AFTER,
        quorum: int | None = None,
        deadline: timedelta | None = None,
    ) -> None:
        self._chosen = list(chosen)
        self._standbys = list(standbys)
        self._ask = ask
        self._reroute = reroute
        self._report = report
        self._arrived = arrived
        self._hedge_after = hedge_after
        self._quorum = _quorum(quorum, deadline, len(self._chosen))
        self._deadline = deadline
        self.asked: list[str] = [c.node_id for c in self._chosen]
        self.answered = 0
        self.failed = 0
        self._failed_providers: list[str] = []
        self._results: list[Contribution] = []
        self._reroutes = 0
        self._standby_lock = asyncio.Lock()
        self._hedge_at: dict[datetime, asyncio.Task[None]] = {}
        self._hedge_users: dict[asyncio.Task[None], int] = {}
        self._stop = asyncio.Event()  # set at the quorum or deadline, or by cancel()
        self._cancelled = False

    @classmethod
    def for_task(
        cls,
        task: TaskInput,
        route: RouteResult,
        context: list[KnowledgeSnippet],
        *,
        reroute: Reroute,
        report: Report,
        arrived: Arrived | None = None,
    ) -> FanOut:
        """The fan-out of one task's routing decision: each expert asked by ``ask_expert``,
        with the task's context, answer policy, quorum and deadline."""
        return cls(
            route.chosen,
            route.standbys,
            ask=partial(ask_expert, task=task, context=context),
            reroute=reroute,
            report=report,
            arrived=arrived,
            hedge_after=_hedge_after(task.answer_policy),
            quorum=task.quorum,
            deadline=timedelta(milliseconds=task.deadline_ms) if task.deadline_ms else None,
        )

    async def run(self) -> list[Contribution]:
        """Every ask's contribution (answers, failures, losers, stragglers), by node id.

        The slots run in a task of their own: a cancellation of the caller must not land inside
        one of their steps (an ask, a reroute, a report) half-way; it becomes ``cancel()``."""
        asking = asyncio.create_task(self._run())
        try:
            return await asyncio.shield(asking)
        except asyncio.CancelledError:
            self.cancel()
            await asking
            raise

    def cancel(self) -> None:
        """Stop now: each slot cancels what it still runs (recorded as ``Cancelled``)."""
        self._cancelled = True
        self._stop.set()

    async def _run(self) -> list[Contribution]:
        if self._quorum is None:
            await asyncio.gather(*(self._slot(c) for c in self._chosen))
        else:
            await self._until_quorum(self._quorum)
        return self.contributions

    @property
    def contributions(self) -> list[Contribution]:
        """The contributions so far, by node id."""
        return sorted(self._results, key=lambda c: c.node_id)

    def _add(self, contribution: Contribution) -> None:
        self._results.append(contribution)
        if self._arrived is not None:
            self._arrived(contribution)

    async def _until_quorum(self, quorum: int) -> None:
        """Run the slots until ``quorum`` of them answered, or the deadline passed with at least
        one answer; then stop the rest (their activities see the cancellation at their next
        heartbeat)."""
        pending = [asyncio.create_task(self._slot(c)) for c in self._chosen]
        deadline = asyncio.create_task(workflow.sleep(self._deadline)) if self._deadline else None
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
        self._stop.set()
        await asyncio.gather(*pending)
        if deadline is not None and not deadline.done():
            deadline.cancel()

    async def _slot(self, first: RouteCandidate) -> bool:
        """One chosen expert's place: True once someone in it answered. The fan-out's stop
        (its quorum or deadline, or ``cancel``) ends it early: what is still running is
        cancelled, as a straggler or as ``Cancelled``."""
        running: dict[asyncio.Task[Contribution], RouteCandidate] = {}
        timers: dict[asyncio.Task[Contribution], asyncio.Task[None]] = {}
        started: dict[asyncio.Task[Contribution], datetime] = {}
        hedged: list[asyncio.Task[Contribution]] = []

        def launch(candidate: RouteCandidate) -> None:
            ask = asyncio.create_task(self._ask(candidate))
            running[ask] = candidate
            timers[ask] = self._hedge_timer()
            started[ask] = workflow.now()

        def stopped() -> bool:
            return self._stop.is_set()

        launch(first)
        won = False
        stopping = asyncio.create_task(self._stop.wait())
        while running and not won and not stopped():
            waiting: list[asyncio.Task[Any]] = [*running, stopping]
            waiting += [timers[t] for t in running if t not in hedged]
            await workflow.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            ended: list[Contribution] = []
            for ask in [t for t in running if t.done()]:
                candidate = running.pop(ask)
                self._release(timers.pop(ask))
                contribution = ask.result()
                ended.append(contribution)
                self._add(contribution)
                if contribution.status == ContributionStatus.FAILED:
                    self.failed += 1
                    self._failed_providers.append(candidate.provider)
                else:
                    self.answered += 1
                    won = True
            if not won and not stopped():
                busy = [running[t].provider for t in running]
                for ask in [t for t in running if t not in hedged and timers[t].done()]:
                    hedged.append(ask)  # past its deadline: ask a standby alongside
                    standby = await self._next_standby(busy)
                    if standby is not None:
                        launch(standby)
                # a failure with nothing left in time (none running, or only overdue asks)
                if ended and all(t in hedged for t in running):
                    standby = await self._next_standby([running[t].provider for t in running])
                    if standby is not None:
                        launch(standby)
            for contribution in ended:
                await self._report(contribution)
        stopping.cancel()
        for ask, candidate in running.items():  # a faster ask answered: stop the others
            ask.cancel()
            self._release(timers[ask])
            overdue = ask in hedged
            elapsed = workflow.now() - started[ask]
            if not won:  # the task was cancelled, or reached its quorum or deadline first
                self._add(
                    _cancelled(candidate, elapsed)
                    if self._cancelled
                    else _straggler(candidate, elapsed)
                )
                continue
            loser = _failed(
                candidate,
                elapsed,
                error_type="DeadlineExceeded" if overdue else "Superseded",
                error=(
                    f"DeadlineExceeded: no answer within {self._hedge_after.total_seconds():g}s; "
                    "a standby answered first"
                    if overdue
                    else "Superseded: the expert it stood in for answered first"
                ),
            )
            self._add(loser)
            if overdue:
                self.failed += 1
                await self._report(loser)
        return won

    async def _next_standby(self, busy: list[str]) -> RouteCandidate | None:
        """The next standby, preferring a provider that has neither failed in this fan-out nor
        is the one still working on the slot (``busy``); rerouted when none is left."""
        async with self._standby_lock:
            if not self._standbys and self._reroutes < MAX_REROUTES:
                self._reroutes += 1
                for c in await self._reroute(list(self.asked)):
                    if c.node_id not in self.asked and all(
                        s.node_id != c.node_id for s in self._standbys
                    ):
                        self._standbys.append(c)
            if not self._standbys:
                return None
            avoid = [*self._failed_providers, *busy]
            index = next((i for i, c in enumerate(self._standbys) if c.provider not in avoid), 0)
            pick = self._standbys.pop(index)
            self.asked.append(pick.node_id)
            return pick

    def _hedge_timer(self) -> asyncio.Task[None]:
        """The hedge deadline of an ask launched now: shared by every ask launched at the same
        moment (one timer for the whole first fan-out, not one per expert)."""
        timer = self._hedge_at.get(workflow.now())
        if timer is None or timer.done():
            timer = self._hedge_at[workflow.now()] = asyncio.create_task(
                workflow.sleep(self._hedge_after)
            )
        self._hedge_users[timer] = self._hedge_users.get(timer, 0) + 1
        return timer

    def _release(self, timer: asyncio.Task[None]) -> None:
        """An ask no longer waits on ``timer``: cancel it once no ask does."""
        left = self._hedge_users.pop(timer, 1) - 1
        if left > 0:
            self._hedge_users[timer] = left
        else:
            timer.cancel()


async def ask_expert(
    candidate: RouteCandidate, *, task: TaskInput, context: list[KnowledgeSnippet]
) -> Contribution:
    """One ask of one expert: the ``answer`` activity on the node's own task queue. A failure
    comes back as a FAILED contribution with a type the breakers act on and what the failed call
    still cost (tokens, USD)."""
    started = workflow.now()
    try:
        return await workflow.execute_activity_method(
            AnsweringActivities.answer,
            AnswerInput(
                task_id=task.task_id,
                prompt=task.prompt,
                node_id=candidate.node_id,
                context=context,
            ),
            task_queue=candidate.task_queue,
            start_to_close_timeout=ANSWER_START_TO_CLOSE,
            schedule_to_close_timeout=ANSWER_SCHEDULE_TO_CLOSE,
            schedule_to_start_timeout=_schedule_to_start(task.answer_policy),
            heartbeat_timeout=ANSWER_HEARTBEAT,
            retry_policy=_answer_retry(task.answer_policy),
            summary=f"answer on {candidate.node_id}",
        )
    except ActivityError as err:
        usage = usage_of(_root(err))
        return _failed(
            candidate,
            workflow.now() - started,
            error=failure_reason(err),
            error_type=_error_type(err),
            input_tokens=usage.input_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            cost_usd=usage.cost_usd if usage else 0.0,
            request_id=usage.request_id if usage else None,
            finish_reason=usage.finish_reason if usage else None,
        )


def failure_reason(err: BaseException) -> str:
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


def _quorum(quorum: int | None, deadline: timedelta | None, chosen: int) -> int | None:
    """The number of answers that ends the fan-out, or None when it waits for every slot (no
    quorum below the number of experts and no deadline)."""
    needed = min(quorum or chosen, chosen)
    if needed >= chosen and not deadline:
        return None
    return max(1, needed)


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


def _hedge_after(policy: AnswerPolicy | None) -> timedelta:
    if policy is None or not policy.hedge_after_ms:
        return ANSWER_HEDGE_AFTER
    return timedelta(milliseconds=policy.hedge_after_ms)


def _schedule_to_start(policy: AnswerPolicy | None) -> timedelta:
    if policy is None or not policy.schedule_to_start_ms:
        return ANSWER_SCHEDULE_TO_START
    return timedelta(milliseconds=policy.schedule_to_start_ms)


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


def _cancelled(candidate: RouteCandidate, elapsed: timedelta) -> Contribution:
    return _failed(
        candidate,
        elapsed,
        error_type="Cancelled",
        error="Cancelled: the task was cancelled before this expert answered",
    )


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
