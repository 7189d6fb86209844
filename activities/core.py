"""Core activities run by the ``xpando-core`` worker: plan, route, aggregate, record, register."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import aggregate, breaker, routing
from activities.knowledge import KnowledgeIndex, reuse_from
from activities.providers.base import Provider, ProviderRequest
from xpando.contracts import (
    AggregateInput,
    AggregateResult,
    AggregationStrategy,
    BreakerState,
    ExpertOutcomeInput,
    ExpertOutcomeResult,
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


class CoreActivities:
    """Activities of the Mother Core. Receives its clients; never builds them.

    ``aggregator``: the model that writes ``synthesize`` answers (None: extractive synthesis).
    """

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        liveness: NodeLiveness,
        knowledge: KnowledgeIndex,
        aggregator: Provider | None = None,
        breakers: breaker.BreakerPolicy | None = None,
    ) -> None:
        self._sessions = sessions
        self._breakers = breakers or breaker.BreakerPolicy()
        self._liveness = liveness
        self._knowledge = knowledge
        self._aggregator = aggregator

    @activity.defn(name="plan")
    async def plan(self, input: PlanInput) -> PlanResult:
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

    @activity.defn(name="route")
    async def route(self, input: RouteInput) -> RouteResult:
        """Choose ``k`` live experts for the prompt, plus standbys; skip nodes behind an open
        circuit breaker (a half-open one may be chosen as its breaker's one probe)."""
        async with self._sessions() as session:
            nodes = await queries.list_nodes(session=session, regions=input.regions)
            tripped = await queries.open_breakers(session=session)
        now = datetime.now(UTC)
        excluded = set(input.exclude)
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
            if n.node_id not in excluded
        ]
        scored = routing.score_nodes(input.prompt, cards, domain=input.domain)
        gates = {
            s.node.node_id: breaker.gate(
                node_id=s.node.node_id,
                provider=s.node.provider,
                region=s.node.region,
                open_rows=tripped,
                now=now,
            )
            for s in scored
        }
        ranked = [s for s in scored if gates[s.node.node_id].allowed]
        blocked = [s.node.node_id for s in scored if not gates[s.node.node_id].allowed]
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
                + (f" in regions {input.regions}" if input.regions else "")
                + (f" (excluding {len(excluded)} already tried)" if excluded else "")
                + (f"; circuit breakers are open for {', '.join(blocked[:10])}" if blocked else ""),
                type="NoExpertsAvailable",
                non_retryable=True,
            )
        chosen, standbys = await self._select(input, live, gates, now)
        domain = input.domain
        if domain is None and chosen and chosen[0].fit > 0 and chosen[0].node.domains:
            domain = chosen[0].node.domains[0]
        log.info(
            "routed",
            task_id=input.task_id,
            chosen=[c.node.node_id for c in chosen],
            standbys=[c.node.node_id for c in standbys],
            considered=len(cards),
            breaker_blocked=blocked[:20],
        )
        return RouteResult(
            chosen=[_candidate(s, probe=bool(gates[s.node.node_id].probes)) for s in chosen],
            standbys=[_candidate(s) for s in standbys],
            considered=len(cards),
            domain=domain,
        )

    async def _select(
        self,
        input: RouteInput,
        live: list[routing.Scored],
        gates: dict[str, breaker.Gate],
        now: datetime,
    ) -> tuple[list[routing.Scored], list[routing.Scored]]:
        """Select as usual; a chosen half-open node must win its breaker's probe (an atomic
        claim shared by every router) or be replaced. Standbys are healthy nodes only."""
        pool = list(live)
        lease = self._breakers.probe_lease.total_seconds()
        claimed: dict[str, list[str]] = {}
        while True:
            chosen, _ = routing.select(pool, k=input.k, standbys=0)
            lost: list[str] = []
            async with self._sessions() as session:
                for s in chosen:
                    node_id = s.node.node_id
                    for key in gates[node_id].probes:
                        if key in claimed.get(node_id, []):
                            continue
                        won = await queries.claim_probe(
                            session=session, key=key, task_id=input.task_id, now=now, lease_s=lease
                        )
                        if not won:
                            lost.append(node_id)
                            break
                        claimed.setdefault(node_id, []).append(key)
            if not lost:
                break
            pool = [s for s in pool if s.node.node_id not in lost]
        final = {s.node.node_id for s in chosen}
        unused = [(n, k) for n, keys in claimed.items() if n not in final for k in keys]
        if unused:
            async with self._sessions() as session:
                for _, key in unused:
                    await queries.release_probe(session=session, key=key, task_id=input.task_id)
        healthy = [
            s for s in pool if s.node.node_id not in final and not gates[s.node.node_id].probes
        ]
        return chosen, routing.pick_standbys(healthy, chosen, input.standbys)

    @activity.defn(name="report_outcome")
    async def report_outcome(self, input: ExpertOutcomeInput) -> ExpertOutcomeResult:
        """Count one ask's outcome for the node's and its provider's circuit breakers."""
        failing, healthy = self._breakers.effects(
            node_id=input.node_id,
            provider=input.provider,
            region=input.region,
            ok=input.ok,
            error_type=input.error_type,
        )
        now = datetime.now(UTC)
        async with self._sessions() as session:
            recorded = await queries.record_expert_outcome(
                session=session,
                event_id=input.event_id,
                task_id=input.task_id,
                node_id=input.node_id,
                provider=input.provider,
                region=input.region,
                ok=input.ok,
                error_type=input.error_type,
                error=input.error,
                effects=failing,
                healthy=healthy,
                cooldown_s=self._breakers.cooldown.total_seconds(),
                now=now,
            )
            keys = [
                breaker.node_key(input.node_id),
                breaker.provider_key(input.provider, input.region),
            ]
            rows = await queries.get_breakers(session=session, keys=keys)
        views = [breaker.view(rows.get(k), key=k, now=now) for k in keys]
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

    @activity.defn(name="aggregate")
    async def aggregate(self, input: AggregateInput) -> AggregateResult:
        """Score every contribution and produce the answer with the task's strategy."""
        result = aggregate.aggregate(input.contributions, input.strategy)
        if input.strategy != AggregationStrategy.SYNTHESIZE or self._aggregator is None:
            return result
        majority = aggregate.majority(input.contributions)
        if not majority:
            return result
        try:
            reply = await self._aggregator.answer(
                ProviderRequest(prompt=aggregate.synthesis_prompt(input.prompt, majority))
            )
        except Exception as err:  # the experts' answers still stand: fall back to consensus
            log.warning("aggregator model failed", task_id=input.task_id, error=str(err))
            fallback = aggregate.aggregate(input.contributions, AggregationStrategy.CONSENSUS)
            return fallback.model_copy(
                update={
                    "strategy": AggregationStrategy.SYNTHESIZE,
                    "note": f"aggregator model failed ({type(err).__name__}); consensus answer",
                }
            )
        return aggregate.aggregate(input.contributions, input.strategy, synthesized=reply.text)

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


def _candidate(s: routing.Scored, *, probe: bool = False) -> RouteCandidate:
    return RouteCandidate(
        node_id=s.node.node_id,
        region=s.node.region,
        provider=s.node.provider,
        model=s.node.model,
        task_queue=s.node.task_queue,
        score=s.score,
        fit=s.fit,
        domains=list(s.node.domains),
        probe=probe,
    )
