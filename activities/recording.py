"""Recording activities of the core worker: aggregate a task's answers and persist the outcome.

``finish`` is a task's last core step (aggregate, then record and hand what was learned to the
domain's KnowledgeWorkflow); ``record`` alone persists a failed task or one answered from
knowledge. Either charges the API key that submitted the task what its contributions cost
(``xpando/auth/spend.py``). Every write is an idempotent upsert keyed by the task (and node),
so a retried step writes nothing twice. A write the database refuses for what it holds
(``xpando/db/errors.py``) fails the step at once with a non-retryable ``ApplicationError``
(``InvalidText``, ``DataRefused``, ``ConstraintViolation``): no retry would land it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from temporalio import activity

from xpando import metrics
from xpando.auth import spend
from xpando.auth.holds import RedisHolds
from xpando.breakers import BreakerBook
from xpando.contracts import (
    AggregateResult,
    FinishInput,
    FinishResult,
    KnowledgeItemInput,
    RecordInput,
    RecordResult,
    TaskStage,
)
from xpando.db import SessionFactory, queries
from xpando.db import nodes as node_queries
from xpando.db.errors import fail_fast
from xpando.db.nodes import ReputationParams
from xpando.logs import get_logger
from xpando.mother import aggregate
from xpando.mother.aggregate import aggregate_with
from xpando.providers.base import Provider
from xpando.routing.index import RoutingIndex

log = get_logger(__name__)

# Aggregations of finish attempts whose record has not landed yet (kept for their retry).
AGGREGATIONS_KEPT = 256

Publisher = Callable[[KnowledgeItemInput], Awaitable[object]]


class RecordingActivities:
    """``aggregator``: the model that writes ``synthesize`` answers (None: extractive synthesis).
    ``publish``: hands a task's knowledge item to its domain's KnowledgeWorkflow.
    ``routing``: the process's routing index, which learns each node's fit per topic from the
    scored contributions (in the record's transaction, once per task + node)."""

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        breaker_book: BreakerBook,
        reputation: ReputationParams,
        aggregator: Provider | None = None,
        publish: Publisher | None = None,
        holds: RedisHolds | None = None,
        routing: RoutingIndex | None = None,
    ) -> None:
        self._sessions = sessions
        self._holds = holds  # the API's holds in Redis, when it has them there
        self._breakers = breaker_book
        self._reputation = reputation
        self._aggregator = aggregator
        self._publish = publish
        self._routing = routing
        self._aggregations: OrderedDict[str, AggregateResult] = OrderedDict()

    @activity.defn(name="finish")
    async def finish(self, input: FinishInput) -> FinishResult:
        """``aggregate``, then ``record`` the result (and hand a confident answer to the
        domain's KnowledgeWorkflow): the last core step of a task in one local activity."""
        # A retried finish (its record failed) reuses its aggregation: a synthesis would
        # otherwise ask the aggregator model, and pay for it, once per attempt.
        key = hashlib.sha256(input.aggregate.model_dump_json().encode()).hexdigest()
        aggregated = self._aggregations.get(key)
        if aggregated is None:
            aggregated = await aggregate_with(self._aggregator, input.aggregate)
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

    async def _lift_hold(self, task_id: str, charge: spend.Charge, now: datetime) -> None:
        """The task is charged: its hold in Redis ends, and its charge counts in the day's copy
        of the key's spend. Redis down: the hold stays until the key would be refused, when
        the API finds the task ended and lifts it (``xpando/auth/holds.py``)."""
        from redis.exceptions import RedisError

        assert self._holds is not None
        try:
            await self._holds.lift(
                key_id=charge.key_id,
                task_id=task_id,
                day=spend.day_of(now),
                charged_usd=charge.total_usd,
            )
        except (RedisError, OSError) as err:
            log.warning("could not lift the task's hold in redis", task_id=task_id, error=repr(err))

    @activity.defn(name="record")
    async def record(self, input: RecordInput) -> RecordResult:
        """Persist the task, its contributions and its knowledge item (idempotent upserts)."""
        now = datetime.now(UTC)
        learns = (
            self._routing is not None
            and input.status == TaskStage.COMPLETED
            and bool(input.contributions)
        )
        # The prompt's vector (plan embedded it: usually a cache hit), before the transaction.
        vector = (
            await self._routing.embed_prompt(input.prompt) if self._routing and learns else None
        )

        async def write() -> tuple[RecordResult, list[str], spend.Charge | None]:
            moved: list[str] = []
            with fail_fast(f"record {input.task_id}"):
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
                    if self._routing is not None and vector is not None and moved:
                        # the first contribution of a node is the one its reputation counted
                        quality = {
                            c.node_id: max(0.0, min(1.0, c.quality))
                            for c in reversed(input.contributions)
                        }
                        await self._routing.learn(
                            session,
                            task_id=input.task_id,
                            vector=vector,
                            qualities=[(node_id, quality[node_id]) for node_id in moved],
                            now=now,
                        )
                    if input.outcomes:
                        await self._breakers.count_outcomes(session, input.outcomes, now)
                    # The key that submitted the task pays what its contributions cost.
                    charge = await spend.charge_task(
                        session=session, task_id=input.task_id, now=now
                    )
                    await session.commit()
            return result, moved, charge

        async def publish() -> None:
            if input.publish is None:
                return
            if self._publish is None:
                log.warning("no knowledge publisher: item not published", task_id=input.task_id)
                return
            with fail_fast(f"publish the knowledge of {input.task_id}"):  # a payload not sendable
                await self._publish(input.publish)

        # The signal-with-start and the database writes are independent (each idempotent, and
        # a failure of either retries the step): run them side by side.
        (result, moved, charge), _ = await asyncio.gather(write(), publish())
        if charge is not None and self._holds is not None:
            await self._lift_hold(input.task_id, charge, now)
        if moved:
            log.info("reputation updated", task_id=input.task_id, nodes=moved)
        log.info("recorded", task_id=input.task_id, status=input.status.value)
        if input.status in (TaskStage.COMPLETED, TaskStage.FAILED):
            metrics.record_task(
                outcome=input.status.value,
                domain=input.domain,
                duration_s=(now - input.started_at).total_seconds() if input.started_at else None,
                reused=input.reused_knowledge_id is not None,
            )
        return result
