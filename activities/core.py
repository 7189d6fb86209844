"""Core activities run by the ``xpando-core`` worker: plan, route, aggregate, record, register."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import aggregate, routing
from xpando.contracts import (
    AggregateInput,
    AggregateResult,
    KnowledgeSnippet,
    PlanInput,
    PlanResult,
    RecordInput,
    RecordResult,
    RegisterNodeInput,
    RegisterNodeResult,
    RouteCandidate,
    RouteInput,
    RouteResult,
)
from xpando.db import SessionFactory, queries
from xpando.logs import get_logger
from xpando.temporal import NodeLiveness

log = get_logger(__name__)

KNOWLEDGE_MIN_SIMILARITY = 0.25


class CoreActivities:
    """Activities of the Mother Core. Receives its clients; never builds them."""

    def __init__(self, *, sessions: SessionFactory, liveness: NodeLiveness) -> None:
        self._sessions = sessions
        self._liveness = liveness

    @activity.defn(name="plan")
    async def plan(self, input: PlanInput) -> PlanResult:
        """Find stored knowledge related to the prompt, to hand to the experts as context."""
        async with self._sessions() as session:
            items = await queries.recent_knowledge(session=session, domain=input.domain)
        scored = sorted(
            ((aggregate.cosine(input.prompt, k.question), k) for k in items),
            key=lambda pair: (-pair[0], pair[1].knowledge_id),
        )
        context = [
            KnowledgeSnippet(
                knowledge_id=k.knowledge_id,
                question=k.question,
                answer=k.answer,
                domain=k.domain,
                confidence=max(0.0, min(1.0, k.confidence)),
            )
            for sim, k in scored[: input.max_context]
            if sim >= KNOWLEDGE_MIN_SIMILARITY
        ]
        return PlanResult(domain=input.domain, context=context)

    @activity.defn(name="route")
    async def route(self, input: RouteInput) -> RouteResult:
        """Choose ``k`` live experts for the prompt, plus standbys."""
        async with self._sessions() as session:
            nodes = await queries.list_nodes(session=session, regions=input.regions)
        cards = [
            routing.NodeCard(
                node_id=n.node_id,
                region=n.region,
                provider=n.provider,
                model=n.model,
                task_queue=n.task_queue,
                domains=tuple(str(d.get("name", "")) for d in n.domains),
                terms=routing.node_terms(n.domains),
            )
            for n in nodes
        ]
        ranked = routing.score_nodes(input.prompt, cards, domain=input.domain)
        want = input.k + input.standbys
        live: list[routing.Scored] = []
        # Check liveness in score order, a batch at a time, until enough live nodes are found.
        batch = max(want, 8)
        for start in range(0, len(ranked), batch):
            window = ranked[start : start + batch]
            flags = await asyncio.gather(
                *(self._liveness.is_live(s.node.task_queue) for s in window)
            )
            live.extend(s for s, ok in zip(window, flags, strict=True) if ok)
            if len(live) >= want:
                break
        if not live:
            raise ApplicationError(
                f"no live expert node among {len(cards)} registered"
                + (f" in regions {input.regions}" if input.regions else ""),
                type="NoExpertsAvailable",
                non_retryable=True,
            )
        chosen, standbys = routing.select(live, k=input.k, standbys=input.standbys)
        domain = input.domain
        if domain is None and chosen and chosen[0].fit > 0 and chosen[0].node.domains:
            domain = chosen[0].node.domains[0]
        log.info(
            "routed",
            task_id=input.task_id,
            chosen=[c.node.node_id for c in chosen],
            standbys=[c.node.node_id for c in standbys],
            considered=len(cards),
        )
        return RouteResult(
            chosen=[_candidate(s) for s in chosen],
            standbys=[_candidate(s) for s in standbys],
            considered=len(cards),
            domain=domain,
        )

    @activity.defn(name="aggregate")
    async def aggregate(self, input: AggregateInput) -> AggregateResult:
        return aggregate.consensus(input.contributions)

    @activity.defn(name="record")
    async def record(self, input: RecordInput) -> RecordResult:
        """Persist the task, its contributions and its knowledge item (idempotent upserts)."""
        async with self._sessions() as session:
            result = await queries.record_task(session=session, record=input, now=datetime.now(UTC))
        log.info("recorded", task_id=input.task_id, status=input.status.value)
        return result

    @activity.defn(name="register_node")
    async def register_node(self, input: RegisterNodeInput) -> RegisterNodeResult:
        async with self._sessions() as session:
            created, registered_at = await queries.upsert_node(
                session=session, profile=input.profile, now=datetime.now(UTC)
            )
        self._liveness.forget(input.profile.task_queue)
        log.info("node registered", node_id=input.profile.node_id, created=created)
        return RegisterNodeResult(
            node_id=input.profile.node_id, created=created, registered_at=registered_at
        )


def _candidate(s: routing.Scored) -> RouteCandidate:
    return RouteCandidate(
        node_id=s.node.node_id,
        region=s.node.region,
        provider=s.node.provider,
        model=s.node.model,
        task_queue=s.node.task_queue,
        score=s.score,
        fit=s.fit,
        domains=list(s.node.domains),
    )
