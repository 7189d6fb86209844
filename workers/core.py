"""The core worker: ``xpando-core`` task queue, workflows and the Mother Core's activities."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.knowledge import KnowledgeActivities
from activities.payouts import PayoutActivities
from activities.recording import RecordingActivities
from activities.registration import RegistrationActivities
from activities.routing import RoutingActivities
from workers.payouts import build_payout_activities, ensure_payout_schedule, payout_activity_methods
from workers.runtime import VersionedWorker, stop_on_signals
from workers.wiring import (
    build_aggregator,
    build_core_parts,
    knowledge_publisher,
    reputation_params,
)
from workflows.knowledge import KnowledgeWorkflow
from workflows.node_registration import NodeRegistrationWorkflow
from workflows.payout import PayoutSagaWorkflow
from workflows.task import TaskWorkflow
from xpando import telemetry, temporal
from xpando.auth.holds import RedisHolds
from xpando.db import SessionFactory, create_engine, init_db, session_factory
from xpando.logs import get_logger
from xpando.mother.knowledge import Consolidator
from xpando.settings import Settings

log = get_logger(__name__)

WORKFLOWS = [TaskWorkflow, NodeRegistrationWorkflow, PayoutSagaWorkflow, KnowledgeWorkflow]
# A workflow's next task goes first to the queue of the worker that ran its last one (its cache).
# When that worker has died, the server moves the task to the shared queue after this long: the
# SDK's default (10 s) was most of the time a crashed core worker cost each of its workflows.
# A live worker takes its tasks at once; one too busy for this long costs a replay, not a failure.
STICKY_QUEUE_TIMEOUT = timedelta(seconds=3)


def build_core_worker(
    client: Client,
    *,
    sessions: SessionFactory,
    settings: Settings,
    task_queue: str | None = None,
    payouts: PayoutActivities | None = None,
    holds: RedisHolds | None = None,
) -> Worker:
    """The core worker; ``holds``: the API's task holds in Redis (made from
    ``XPANDO_REDIS_URL`` when not given), which the record step lifts."""
    payouts = payouts or build_payout_activities(sessions=sessions, settings=settings)
    queue = task_queue or settings.core_task_queue
    parts = build_core_parts(client, sessions, settings)
    routing = RoutingActivities(
        sessions=sessions,
        knowledge=parts.knowledge,
        router=parts.router,
        breaker_book=parts.breaker_book,
    )
    recording = RecordingActivities(
        sessions=sessions,
        breaker_book=parts.breaker_book,
        reputation=reputation_params(settings),
        aggregator=build_aggregator(settings),
        publish=knowledge_publisher(client, queue),
        holds=holds or (RedisHolds(settings.redis_url) if settings.redis_url else None),
        routing=parts.router.index,
    )
    registration = RegistrationActivities(registry=parts.registry, liveness=parts.liveness)
    knowledge = KnowledgeActivities(
        consolidator=Consolidator(sessions=sessions, index=parts.knowledge)
    )
    return VersionedWorker(
        client,
        deployment=queue,
        build_id=settings.worker_build_id,
        promote=settings.worker_promote,
        task_queue=queue,
        workflows=WORKFLOWS,
        activities=[
            routing.plan_route,
            routing.route,
            routing.report_outcome,
            recording.finish,
            recording.record,
            registration.register_node,
            knowledge.consolidate,
            *payout_activity_methods(payouts),
        ],
        graceful_shutdown_timeout=timedelta(seconds=10),
        sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,
    )


async def run_core_worker(settings: Settings) -> None:
    telemetry.serve_worker_metrics(settings)
    client = await temporal.connect(settings, attempts=60)
    engine = create_engine(settings.database_dsn)
    await init_db(engine)
    holds = RedisHolds(settings.redis_url) if settings.redis_url else None
    worker = build_core_worker(
        client, sessions=session_factory(engine), settings=settings, holds=holds
    )
    await ensure_payout_schedule(client, settings)
    stop_on_signals(worker.shutdown)
    log.info("core worker started", task_queue=settings.core_task_queue)
    try:
        await worker.run()
    finally:
        await engine.dispose()
        if holds is not None:
            await holds.aclose()
        log.info("core worker stopped")
