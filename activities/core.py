"""Core activities run by the ``xpando-core`` worker: plan, route, aggregate, record, register."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
from numpy.typing import NDArray
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import aggregate, breaker, routing
from activities.knowledge import KnowledgeIndex, reuse_from
from activities.providers.base import Provider, ProviderRequest
from activities.registration import NodeRegistry
from xpando.contracts import (
    AggregateInput,
    AggregateResult,
    AggregationStrategy,
    BreakerState,
    ExpertOutcomeInput,
    ExpertOutcomeResult,
    FinishInput,
    FinishResult,
    KnowledgeItemInput,
    KnowledgeSnippet,
    PlanInput,
    PlanResult,
    PlanRouteInput,
    PlanRouteResult,
    RecordInput,
    RecordResult,
    RegisterNodeInput,
    RegisterNodeResult,
    RouteCandidate,
    RouteInput,
    RouteOutcome,
    RouteResult,
    RouteTerms,
    RoutingReport,
    TaskStage,
    node_task_queue,
)
from xpando.db import SessionFactory, queries
from xpando.db import nodes as node_queries
from xpando.db.models import Breaker
from xpando.db.nodes import ReputationParams
from xpando.identity import RegistrationRejected
from xpando.logs import get_logger
from xpando.temporal import NodeLiveness

log = get_logger(__name__)

# Routing reads the circuit breakers at most this often (and after each outcome reported here).
BREAKER_CACHE_S = 1.0
HEALTHY = breaker.Gate(allowed=True)
# Aggregations of finish attempts whose record has not landed yet (kept for their retry).
AGGREGATIONS_KEPT = 256


class CoreActivities:
    """Activities of the Mother Core. Receives its clients; never builds them.

    ``aggregator``: the model that writes ``synthesize`` answers (None: extractive synthesis).
    ``publish``: hands a task's knowledge item to its domain's KnowledgeWorkflow (``record``
    calls it; ``KnowledgeActivities.publish``).
    """

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        liveness: NodeLiveness,
        knowledge: KnowledgeIndex,
        aggregator: Provider | None = None,
        breakers: breaker.BreakerPolicy | None = None,
        routing_index: routing.RoutingIndex | None = None,
        registry: NodeRegistry | None = None,
        reputation: ReputationParams | None = None,
        publish: Callable[[KnowledgeItemInput], Awaitable[object]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._publish = publish
        self._breakers = breakers or breaker.BreakerPolicy()
        self._liveness = liveness
        self._knowledge = knowledge
        self._aggregator = aggregator
        if routing_index is None:  # (an index is falsy while empty: compare with None)
            routing_index = routing.RoutingIndex(sessions, knowledge.embedder)
        self._routing = routing_index
        if registry is None:
            registry = NodeRegistry(sessions=sessions, embedder=knowledge.embedder)
        self._registry = registry
        self._reputation = reputation or ReputationParams(
            prior=self._routing.config.reputation_prior
        )
        self._troubled: tuple[float, dict[str, Breaker]] | None = None
        self._aggregations: OrderedDict[str, AggregateResult] = OrderedDict()

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
        """Choose ``k`` live experts for the prompt, plus standbys (score, selection and
        exploration: ``activities/routing.py``). Nodes behind an open circuit breaker and nodes
        whose worker is not polling are skipped (a half-open breaker's node may be chosen as its
        one probe); every chosen, standby and top skipped candidate is explained."""
        index = self._routing
        cfg = index.config
        vector = await index.embed_prompt(input.prompt)
        await index.maybe_refresh()
        troubled = await self._troubled_breakers()
        now = datetime.now(UTC)
        want = input.k + input.standbys
        window = max(2 * want, 16)
        offset, considered = 0, 0
        usable: list[routing.Scored] = []
        skipped: list[routing.Scored] = []
        gates: dict[str, breaker.Gate] = {}
        while True:
            batch, considered = index.rank(
                vector,
                regions=input.regions,
                exclude=input.exclude,
                domain=input.domain,
                limit=window,
                offset=offset,
            )
            offset += len(batch)
            ok, bad = await self._check(batch, troubled, gates, now)
            usable.extend(ok)
            skipped.extend(bad)
            usable.sort(key=lambda s: (-s.score, s.node.node_id))
            # Health only lowers a score: once the want-th usable score beats the last ranked
            # one, nothing further down can overtake it.
            if not batch or offset >= considered:
                break
            if len(usable) >= want and usable[want - 1].score >= batch[-1].score:
                break
            window *= 2
        if not usable:
            blocked = [s.node.node_id for s in skipped if s.reason.startswith("circuit")]
            raise ApplicationError(
                f"no live expert node among {considered} that could serve the task"
                + (f" in regions {input.regions}" if input.regions else "")
                + (f" (excluding {len(input.exclude)} already tried)" if input.exclude else "")
                + (f"; circuit breakers are open for {', '.join(blocked[:10])}" if blocked else ""),
                type="NoExpertsAvailable",
                non_retryable=True,
            )
        chosen, standbys = await self._select(input, usable, gates, now)
        chosen, standbys = await self._explore(
            input, vector, chosen, standbys, troubled, gates, now
        )
        domain = input.domain
        if domain is None and chosen and chosen[0].fit > 0:
            domain = chosen[0].domain or (chosen[0].node.domains or (None,))[0]
        report = _report(cfg, considered, chosen, standbys, usable, skipped)
        log.info(
            "routed",
            task_id=input.task_id,
            chosen=[c.node.node_id for c in chosen],
            standbys=[c.node.node_id for c in standbys],
            considered=considered,
            breaker_blocked=[s.node.node_id for s in skipped if s.reason.startswith("circuit")][
                :20
            ],
        )
        return RouteResult(
            chosen=[_candidate(s, probe=bool(gates[s.node.node_id].probes)) for s in chosen],
            standbys=[_candidate(s) for s in standbys],
            considered=considered,
            domain=domain,
            report=report,
        )

    @activity.defn(name="plan_route")
    async def plan_route(self, input: PlanRouteInput) -> PlanRouteResult:
        """``plan``, then ``route`` unless stored knowledge answers the task: the first core
        step of a task in one local activity (a NoExpertsAvailable from routing fails it)."""
        plan = await self.plan(input.plan)
        if plan.reuse is not None:
            return PlanRouteResult(plan=plan)
        route = input.route
        if plan.suggested_k is not None and plan.suggested_k < route.k:
            route = route.model_copy(update={"k": plan.suggested_k})
        return PlanRouteResult(plan=plan, route=await self.route(route))

    async def _troubled_breakers(self) -> dict[str, Breaker]:
        """Breakers that are open or counting failures, read at most every
        ``BREAKER_CACHE_S`` — and again after any outcome this process reports — so a burst of
        decisions is not a burst of queries (another core worker's report is seen within that)."""
        now = time.monotonic()
        cached = self._troubled
        if cached is not None and now - cached[0] < BREAKER_CACHE_S:
            return cached[1]
        async with self._sessions() as session:
            rows = await node_queries.troubled_breakers(session=session)
        self._troubled = (now, rows)
        return rows

    async def _check(
        self,
        batch: list[routing.Scored],
        troubled: dict[str, Breaker],
        gates: dict[str, breaker.Gate],
        now: datetime,
    ) -> tuple[list[routing.Scored], list[routing.Scored]]:
        """Split ranked candidates into usable ones (with their health) and skipped ones (with
        the reason): breakers first (no I/O), then liveness of the rest, concurrently."""
        allowed: list[routing.Scored] = []
        skipped: list[routing.Scored] = []
        keys: dict[str, tuple[str, str]] = {}
        for s in batch:
            node_id = s.node.node_id
            keys[node_id] = (
                breaker.node_key(node_id),
                breaker.provider_key(s.node.provider, s.node.region),
            )
            if keys[node_id][0] not in troubled and keys[node_id][1] not in troubled:
                gates[node_id] = HEALTHY
                allowed.append(s)
                continue
            gate = breaker.gate(
                node_id=node_id,
                provider=s.node.provider,
                region=s.node.region,
                open_rows=troubled,
                now=now,
            )
            gates[node_id] = gate
            if gate.allowed:
                allowed.append(s)
            else:
                skipped.append(replace(s.with_health(0.0), reason="circuit breaker open"))
        live = await self._liveness.are_live([s.node.task_queue for s in allowed])
        usable: list[routing.Scored] = []
        recent = now - self._breakers.cooldown
        for s in allowed:
            if not live[s.node.task_queue]:
                reason = f"not live: no worker polls {s.node.task_queue}"
                skipped.append(replace(s.with_health(0.0), reason=reason))
                continue
            # Recent failures (closed breakers still counting, within one cool-down) halve the
            # health each; a half-open node is not penalised: its one probe must be able to win.
            failures = sum(
                row.consecutive_failures
                for key in keys[s.node.node_id]
                if (row := troubled.get(key)) is not None
                and row.state != "open"
                and (queries.as_utc(row.updated_at) or now) >= recent
            )
            health = 0.5**failures * (1.0 - self._liveness.load(s.node.task_queue) / 2)
            usable.append(s if health == 1.0 else s.with_health(round(health, 6)))
        return usable, skipped

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
        diversity = self._routing.config.diversity
        while True:
            chosen, _ = routing.select(pool, k=input.k, standbys=0, diversity=diversity)
            lost: list[str] = []
            if not any(gates[s.node.node_id].probes for s in chosen):
                break
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

    async def _explore(
        self,
        input: RouteInput,
        vector: NDArray[np.float32],
        chosen: list[routing.Scored],
        standbys: list[routing.Scored],
        troubled: dict[str, Breaker],
        gates: dict[str, breaker.Gate],
        now: datetime,
    ) -> tuple[list[routing.Scored], list[routing.Scored]]:
        """In a bounded share of tasks (k ≥ 2), give the weakest chosen slot to the best-fitting
        new node, so new nodes can earn a reputation next to established experts."""
        cfg = self._routing.config
        if input.k < 2 or len(chosen) < 2 or not routing.explores(input.task_id, cfg.exploration):
            return chosen, standbys
        weakest = min(range(len(chosen)), key=lambda i: chosen[i].score)
        if (
            chosen[weakest].contributions < cfg.new_below
            or gates[chosen[weakest].node.node_id].probes
        ):
            return chosen, standbys  # already a new node (or a probe) in that slot
        best_fit = max(c.fit for c in chosen)
        taken = [*input.exclude, *(c.node.node_id for c in chosen)]
        fresh, _ = self._routing.rank(
            vector,
            regions=input.regions,
            exclude=taken,
            domain=input.domain,
            limit=8,
            new_only=True,
        )
        fitting = [s for s in fresh if s.fit >= cfg.exploration_min_fit * best_fit]
        ok, _ = await self._check(fitting, troubled, gates, now)
        ok = [s for s in ok if not gates[s.node.node_id].probes]
        if not ok:
            return chosen, standbys
        explorer = replace(ok[0], explore=True, reason="exploration")
        out = list(chosen)
        replaced = out[weakest]
        out[weakest] = explorer
        rest = [s for s in standbys if s.node.node_id != explorer.node.node_id]
        return out, [replaced, *rest][: max(len(standbys), 1)]

    @activity.defn(name="report_outcome")
    async def report_outcome(self, input: ExpertOutcomeInput) -> ExpertOutcomeResult:
        """Count one ask's outcome for the node's and its provider's circuit breakers."""
        failing, _ = self._effects(input)
        now = datetime.now(UTC)
        self._troubled = None  # the next decision reads the breakers again
        async with self._sessions() as session:
            recorded = await self._log_outcome(session, input, now)
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
        now = datetime.now(UTC)

        async def write() -> tuple[RecordResult, list[str]]:
            moved: list[str] = []
            async with self._sessions() as session:  # one transaction
                result = await queries.record_task(
                    session=session, record=input, now=now, commit=False
                )
                if input.status == TaskStage.COMPLETED and input.contributions:
                    moved = await node_queries.apply_reputation(
                        session=session,
                        record=input,
                        params=self._reputation,
                        now=now,
                        commit=False,
                    )
                if input.outcomes:
                    await self._count_outcomes(session, input.outcomes, now)
                await session.commit()
            return result, moved

        async def publish() -> None:
            if input.publish is None:
                return
            if self._publish is None:
                log.warning("no knowledge publisher: item not published", task_id=input.task_id)
                return
            await self._publish(input.publish)

        # The signal-with-start and the database writes are independent (each idempotent, and
        # a failure of either retries the step): run them side by side.
        (result, moved), _ = await asyncio.gather(write(), publish())
        if moved:
            log.info("reputation updated", task_id=input.task_id, nodes=moved)
        log.info("recorded", task_id=input.task_id, status=input.status.value)
        return result

    @activity.defn(name="finish")
    async def finish(self, input: FinishInput) -> FinishResult:
        """``aggregate``, then ``record`` the result (and hand a confident answer to the
        domain's KnowledgeWorkflow): the last core step of a task in one local activity."""
        # A retried finish (its record failed) reuses its aggregation: a synthesis would
        # otherwise ask the aggregator model, and pay for it, once per attempt.
        key = hashlib.sha256(input.aggregate.model_dump_json().encode()).hexdigest()
        aggregated = self._aggregations.get(key)
        if aggregated is None:
            aggregated = await self.aggregate(input.aggregate)
            self._aggregations[key] = aggregated
            while len(self._aggregations) > AGGREGATIONS_KEPT:
                self._aggregations.popitem(last=False)
        domain = input.record.domain
        if input.name_domain:  # the task's domain is the domain of the expert whose answer won
            domain = aggregate.winning_domain(aggregated, input.domains) or domain
        learned = None
        if input.publish and aggregated.confidence > 0:
            learned = aggregate.knowledge_item(
                task_id=input.record.task_id,
                question=input.record.prompt,
                result=aggregated,
                domain=domain,
                at=datetime.now(UTC),
            )
        await self.record(
            input.record.model_copy(
                update={
                    "domain": domain,
                    "answer": aggregated.answer,
                    "confidence": aggregated.confidence,
                    "contributions": aggregated.contributions,
                    "publish": learned,
                }
            )
        )
        self._aggregations.pop(key, None)
        return FinishResult(aggregated=aggregated, domain=domain)

    def _effects(self, o: ExpertOutcomeInput) -> tuple[list[tuple[str, str, int]], list[str]]:
        return self._breakers.effects(
            node_id=o.node_id,
            provider=o.provider,
            region=o.region,
            ok=o.ok,
            error_type=o.error_type,
        )

    async def _log_outcome(
        self, session: AsyncSession, o: ExpertOutcomeInput, now: datetime
    ) -> bool:
        """One outcome, logged once and applied to its breakers (commits)."""
        failing, healthy = self._effects(o)
        return await queries.record_expert_outcome(
            session=session,
            event_id=o.event_id,
            task_id=o.task_id,
            node_id=o.node_id,
            provider=o.provider,
            region=o.region,
            ok=o.ok,
            error_type=o.error_type,
            error=o.error,
            effects=failing,
            healthy=healthy,
            cooldown_s=self._breakers.cooldown.total_seconds(),
            now=now,
        )

    async def _count_outcomes(
        self, session: AsyncSession, outcomes: list[ExpertOutcomeInput], now: datetime
    ) -> None:
        """Outcomes handed to ``record`` (asks that ended well): one batch for the breakers."""
        healthy: set[str] = set()
        rows = []
        for o in outcomes:
            failing, closes = self._effects(o)
            if failing or not o.ok:  # not what record is handed; count it the full way
                await self._log_outcome(session, o, now)
                continue
            healthy.update(closes)
            rows.append(
                {
                    "event_id": o.event_id,
                    "task_id": o.task_id,
                    "node_id": o.node_id,
                    "provider": o.provider,
                    "region": o.region,
                    "error_type": o.error_type,
                }
            )
        _, changed = await queries.record_expert_successes(
            session=session, outcomes=rows, healthy=sorted(healthy), now=now, commit=False
        )
        if changed or len(rows) < len(outcomes):
            self._troubled = None  # the next decision reads the breakers again

    @activity.defn(name="register_node")
    async def register_node(self, input: RegisterNodeInput) -> RegisterNodeResult:
        """Apply a node's signed registration or deregistration (the same verification as
        ``POST /v1/nodes``); a refused one fails with the rejection's type, not retried."""
        if input.signed is None:
            raise ApplicationError(
                "unsigned node registration: a node registers with a request signed by its "
                "identity key (xpando/identity.py)",
                type="UnsignedRegistration",
                non_retryable=True,
            )
        try:
            info = activity.info()
            done = await self._registry.apply_idempotent(
                input.signed,
                received_at=input.received_at,
                origin=f"{info.workflow_id}/{info.workflow_run_id}",
            )
        except RegistrationRejected as err:
            raise ApplicationError(err.message, type=err.type, non_retryable=True) from err
        self._liveness.forget(node_task_queue(done.node_id))
        return RegisterNodeResult(
            node_id=done.node_id,
            created=done.created,
            registered_at=done.registered_at,
            action=done.action,
            public_key=done.public_key,
        )


def _candidate(s: routing.Scored, *, probe: bool = False) -> RouteCandidate:
    # model_construct: the values are the index's own (typed, in range); a decision builds
    # a few dozen of these and validating each would be a good share of its time.
    return RouteCandidate.model_construct(
        node_id=s.node.node_id,
        region=s.node.region,
        provider=s.node.provider,
        model=s.node.model,
        task_queue=s.node.task_queue,
        score=round(s.score, 9),
        fit=s.fit,
        domains=list(s.node.domains),
        probe=probe,
        reputation=s.reputation,
        health=s.health,
        explore=s.explore,
    )


def _terms(s: routing.Scored, outcome: RouteOutcome, reason: str = "") -> RouteTerms:
    return RouteTerms.model_construct(
        node_id=s.node.node_id,
        region=s.node.region,
        provider=s.node.provider,
        domain=s.domain,
        fit=s.fit,
        reputation=s.reputation,
        contributions=s.contributions,
        health=s.health,
        price=s.price,
        diversity=round(s.diversity, 6),
        score=round(s.score * s.diversity, 9),
        outcome=outcome,
        reason=reason or s.reason,
    )


def _report(
    cfg: routing.RoutingConfig,
    considered: int,
    chosen: list[routing.Scored],
    standbys: list[routing.Scored],
    usable: list[routing.Scored],
    skipped: list[routing.Scored],
) -> RoutingReport:
    """Chosen and standby experts, then the best skipped candidates (up to ``cfg.explain``)."""
    picked = {s.node.node_id for s in [*chosen, *standbys]}
    passed = [
        replace(s, reason="lower score after diversity")
        for s in usable
        if s.node.node_id not in picked
    ]
    others = sorted([*passed, *skipped], key=lambda s: (-s.base, s.node.node_id))
    return RoutingReport(
        formula=cfg.formula,
        considered=considered,
        candidates=[
            *(_terms(s, RouteOutcome.CHOSEN) for s in chosen),
            *(_terms(s, RouteOutcome.STANDBY) for s in standbys),
            *(_terms(s, RouteOutcome.SKIPPED) for s in others[: cfg.explain]),
        ],
    )
