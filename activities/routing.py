"""Routing activities of the core worker: plan and route a task, count ask outcomes.

TaskWorkflow runs them as local activities: ``plan_route`` (knowledge lookup, then the routing
decision), ``route`` (a reroute or a widened panel) and ``report_outcome`` (a failed ask, for the
circuit breakers). The decisions themselves are :class:`xpando.routing.router.Router`'s. A
database error no retry can fix fails a step at once (``xpando/db/errors.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio import activity

from xpando import metrics
from xpando.breakers import BreakerBook
from xpando.contracts import (
    BreakerState,
    ExpertOutcomeInput,
    ExpertOutcomeResult,
    KnowledgeSnippet,
    PlanInput,
    PlanResult,
    PlanRouteInput,
    PlanRouteResult,
    RouteInput,
    RouteResult,
)
from xpando.db import SessionFactory, queries
from xpando.db.errors import fail_fast
from xpando.logs import get_logger
from xpando.mother.knowledge import KnowledgeIndex, reuse_from
from xpando.routing.router import Router

log = get_logger(__name__)


class RoutingActivities:
    """Given its clients: the knowledge index (reuse and context), the router, the breakers."""

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        knowledge: KnowledgeIndex,
        router: Router,
        breaker_book: BreakerBook,
    ) -> None:
        self._sessions = sessions
        self._knowledge = knowledge
        self._router = router
        self._breakers = breaker_book

    @activity.defn(name="plan_route")
    async def plan_route(self, input: PlanRouteInput) -> PlanRouteResult:
        """``plan``, then ``route`` unless stored knowledge answers the task: the first core
        step of a task in one local activity (a NoExpertsAvailable from routing fails it)."""
        with fail_fast(f"plan and route {input.plan.task_id}"):
            plan = await self._plan(input.plan)
            metrics.KNOWLEDGE_PLANS.labels(decision=_decision(plan)).inc()
            if plan.reuse is not None:
                return PlanRouteResult(plan=plan)
            route = input.route
            if plan.suggested_k is not None and plan.suggested_k < route.k:
                route = route.model_copy(update={"k": plan.suggested_k})
            return PlanRouteResult(plan=plan, route=await self._router.route(route))

    @activity.defn(name="route")
    async def route(self, input: RouteInput) -> RouteResult:
        """One routing decision (``Router.route``); NoExpertsAvailable when nobody can serve."""
        with fail_fast(f"route {input.task_id}"):
            return await self._router.route(input)

    @activity.defn(name="report_outcome")
    async def report_outcome(self, input: ExpertOutcomeInput) -> ExpertOutcomeResult:
        """Count one ask's outcome for the node's and its provider's circuit breakers."""
        failing, _ = self._breakers.effects(input)
        with fail_fast(f"report the outcome of {input.event_id}"):
            recorded, views = await self._breakers.report(input, datetime.now(UTC))
        opened = [v.key for v in views if v.state == BreakerState.OPEN and failing]
        if opened:
            log.warning(
                "circuit breaker open",
                task_id=input.task_id,
                node_id=input.node_id,
                breakers=opened,
                error_type=input.error_type,
            )
        return ExpertOutcomeResult(recorded=recorded, breakers=views)

    async def _plan(self, input: PlanInput) -> PlanResult:
        """Look the prompt up in stored knowledge: a confident match answers the task (reuse);
        related items go to the experts as context."""
        hits = await self._knowledge.search(input.prompt, domain=input.domain, k=5)
        cfg = self._knowledge.config
        context = [
            KnowledgeSnippet(
                knowledge_id=h.knowledge_id,
                question=h.question,
                answer=h.answer,
                domain=h.domain,
                confidence=max(0.0, min(1.0, h.confidence)),
            )
            for h in hits[: input.max_context]
            if h.similarity >= cfg.context_similarity
        ]
        reuse = None
        hit = None if input.fresh else self._knowledge.reusable(input.prompt, hits)
        if hit is not None:
            async with self._sessions() as session:
                item = await queries.get_knowledge(session=session, knowledge_id=hit.knowledge_id)
            if item is not None and item.status == "active":
                reuse = reuse_from(hit, item)
                log.info(
                    "answered from knowledge",
                    task_id=input.task_id,
                    knowledge_id=hit.knowledge_id,
                    similarity=hit.similarity,
                )
        suggested_k = None
        if (
            reuse is None
            and not input.fresh
            and cfg.confirm_similarity > 0
            and hits
            and hits[0].similarity >= cfg.confirm_similarity
            and hits[0].confidence >= cfg.reuse_min_confidence
        ):
            suggested_k = cfg.confirm_k
        return PlanResult(
            domain=input.domain, context=context, reuse=reuse, suggested_k=suggested_k
        )


def _decision(plan: PlanResult) -> str:
    """What stored knowledge decided for a task (the ``xpando_knowledge_plans`` label)."""
    if plan.reuse is not None:
        return "reused"
    return "confirm" if plan.suggested_k is not None else "none"
