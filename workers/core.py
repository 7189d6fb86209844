"""The core worker: ``xpando-core`` task queue, workflows and the Mother Core's activities."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.breaker import BreakerPolicy
from activities.core import CoreActivities
from activities.knowledge import KnowledgeActivities, KnowledgeConfig, KnowledgeIndex
from activities.payouts import PayoutActivities
from activities.providers.base import Provider, ProviderConfig
from activities.providers.registry import DEFAULT_MODELS, make_provider
from activities.registration import NodeRegistry
from activities.routing import RoutingConfig, RoutingIndex, cached_embedder
from workers.payouts import build_payout_activities, ensure_payout_schedule, payout_activity_methods
from workers.runtime import stop_on_signals
from workflows.knowledge import KnowledgeWorkflow
from workflows.node_registration import NodeRegistrationWorkflow
from workflows.payout import PayoutSagaWorkflow
from workflows.task import TaskWorkflow
from xpando import temporal
from xpando.db import SessionFactory, create_engine, init_db, session_factory
from xpando.db.nodes import ReputationParams
from xpando.embedding import embedder_from_settings
from xpando.logs import get_logger
from xpando.settings import Settings
from xpando.temporal import NodeLiveness

log = get_logger(__name__)

WORKFLOWS = [TaskWorkflow, NodeRegistrationWorkflow, PayoutSagaWorkflow, KnowledgeWorkflow]


def knowledge_config(settings: Settings) -> KnowledgeConfig:
    return KnowledgeConfig(
        reuse_similarity=settings.knowledge_reuse_similarity,
        reuse_similarity_strong=settings.knowledge_reuse_similarity_strong,
        reuse_unexplained_terms=settings.knowledge_reuse_unexplained_terms,
        confirm_similarity=settings.knowledge_confirm_similarity,
        confirm_k=settings.knowledge_confirm_k,
        reuse_min_confidence=settings.knowledge_reuse_min_confidence,
        context_similarity=settings.knowledge_context_similarity,
        merge_similarity=settings.knowledge_merge_similarity,
        half_life_days=settings.knowledge_half_life_days,
        stale_below=settings.knowledge_stale_below,
    )


def build_aggregator(settings: Settings) -> Provider | None:
    """The model that writes ``synthesize`` answers, or None (extractive synthesis).

    Raises :class:`ProviderConfigError` naming what is missing (e.g. the key)."""
    if settings.aggregator_provider == "none":
        return None
    provider = settings.aggregator_provider
    key = settings.aggregator_api_key or {
        "openai": settings.openai_api_key,
        "openai-compatible": settings.openai_api_key,
        "anthropic": settings.anthropic_api_key,
        "gemini": settings.gemini_api_key,
    }.get(provider)
    return make_provider(
        ProviderConfig(
            provider=provider,
            model=settings.aggregator_model or DEFAULT_MODELS.get(provider, ""),
            api_key=key,
            base_url=settings.aggregator_base_url,
            timeout_s=settings.aggregator_timeout_s,
        )
    )


def build_knowledge_index(sessions: SessionFactory, settings: Settings) -> KnowledgeIndex:
    return KnowledgeIndex(
        sessions,
        cached_embedder(embedder_from_settings(settings)),
        config=knowledge_config(settings),
    )


def build_liveness(client: Client, settings: Settings) -> NodeLiveness:
    return NodeLiveness(
        client, max_age_s=settings.node_liveness_s, sweep_s=settings.node_liveness_sweep_s
    )


def build_routing_index(sessions: SessionFactory, settings: Settings) -> RoutingIndex:
    return RoutingIndex(
        sessions,
        cached_embedder(embedder_from_settings(settings)),
        config=RoutingConfig.from_settings(settings),
    )


def build_registry(sessions: SessionFactory, settings: Settings) -> NodeRegistry:
    return NodeRegistry(
        sessions=sessions,
        embedder=cached_embedder(embedder_from_settings(settings)),
        max_skew_s=settings.node_signature_max_skew_s,
    )


def build_core_worker(
    client: Client,
    *,
    sessions: SessionFactory,
    settings: Settings,
    task_queue: str | None = None,
    payouts: PayoutActivities | None = None,
) -> Worker:
    payouts = payouts or build_payout_activities(sessions=sessions, settings=settings)
    queue = task_queue or settings.core_task_queue
    index = build_knowledge_index(sessions, settings)
    knowledge = KnowledgeActivities(sessions=sessions, index=index, client=client, task_queue=queue)
    core = CoreActivities(
        sessions=sessions,
        liveness=build_liveness(client, settings),
        knowledge=index,
        breakers=BreakerPolicy.from_settings(settings),
        aggregator=build_aggregator(settings),
        routing_index=build_routing_index(sessions, settings),
        registry=build_registry(sessions, settings),
        reputation=ReputationParams(
            prior=settings.reputation_prior, alpha=settings.reputation_alpha
        ),
        publish=knowledge.publish,
    )
    return Worker(
        client,
        task_queue=queue,
        workflows=WORKFLOWS,
        activities=[
            core.plan,
            core.route,
            core.plan_route,
            core.aggregate,
            core.record,
            core.finish,
            core.register_node,
            core.report_outcome,
            knowledge.publish,
            knowledge.consolidate,
            *payout_activity_methods(payouts),
        ],
        graceful_shutdown_timeout=timedelta(seconds=10),
    )


async def run_core_worker(settings: Settings) -> None:
    client = await temporal.connect(settings, attempts=60)
    engine = create_engine(settings.database_dsn)
    await init_db(engine)
    worker = build_core_worker(client, sessions=session_factory(engine), settings=settings)
    await ensure_payout_schedule(client, settings)
    stop_on_signals(worker.shutdown)
    log.info("core worker started", task_queue=settings.core_task_queue)
    try:
        await worker.run()
    finally:
        await engine.dispose()
        log.info("core worker stopped")
