"""Builds the clients xpando's processes share — the one place both the API and the workers
construct them from settings, so a knob means the same thing in every process."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy

from workflows.knowledge import KnowledgeWorkflow
from xpando.breakers import BreakerBook, BreakerPolicy
from xpando.contracts import KnowledgeItemInput, KnowledgeWorkflowInput
from xpando.db import SessionFactory
from xpando.db.nodes import ReputationParams
from xpando.embedding import embedder_from_settings
from xpando.mother.knowledge import KnowledgeConfig, KnowledgeIndex, knowledge_workflow_id
from xpando.providers.base import Provider, ProviderConfig
from xpando.providers.registry import DEFAULT_MODELS, make_provider
from xpando.routing.index import RoutingConfig, RoutingIndex, cached_embedder
from xpando.routing.registry import NodeRegistry
from xpando.routing.router import Router
from xpando.settings import Settings
from xpando.temporal import NodeLiveness


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


def reputation_params(settings: Settings) -> ReputationParams:
    return ReputationParams(prior=settings.reputation_prior, alpha=settings.reputation_alpha)


def knowledge_publisher(
    client: Client, task_queue: str
) -> Callable[[KnowledgeItemInput], Awaitable[None]]:
    """Signal-with-start the item's domain KnowledgeWorkflow (one entity per domain and core
    queue; "use existing" makes a retried publish a plain signal, which the workflow dedupes)."""

    async def publish(item: KnowledgeItemInput) -> None:
        await client.start_workflow(
            KnowledgeWorkflow.run,
            KnowledgeWorkflowInput(domain=item.domain),
            id=knowledge_workflow_id(item.domain, task_queue),
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            start_signal="add",
            start_signal_args=[item],
        )

    return publish


@dataclass
class CoreParts:
    """What a core worker's activities share: one breaker book (so a breaker this process
    writes is seen by its next routing decision), one knowledge index, one router."""

    breaker_book: BreakerBook
    knowledge: KnowledgeIndex
    router: Router
    registry: NodeRegistry
    liveness: NodeLiveness


def build_core_parts(client: Client, sessions: SessionFactory, settings: Settings) -> CoreParts:
    liveness = build_liveness(client, settings)
    breaker_book = BreakerBook(sessions, BreakerPolicy.from_settings(settings))
    return CoreParts(
        breaker_book=breaker_book,
        knowledge=build_knowledge_index(sessions, settings),
        router=Router(
            sessions=sessions,
            index=build_routing_index(sessions, settings),
            breaker_book=breaker_book,
            liveness=liveness,
        ),
        registry=build_registry(sessions, settings),
        liveness=liveness,
    )
