"""An expert node worker: polls ``node.<node_id>`` and answers through the node's provider."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pydantic import SecretStr
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.worker import Worker

from activities.node import NodeActivities
from activities.providers.base import Pricing, Provider, ProviderConfig
from activities.providers.offline import OfflineRetrievalProvider
from activities.providers.registry import (
    DEFAULT_MODELS,
    MODEL_PROVIDERS,
    ProviderConfigError,
    make_provider,
)
from workers.runtime import stop_on_signals
from workflows.node_registration import NodeRegistrationWorkflow
from xpando import temporal
from xpando.contracts import NodeDomain, NodeProfile, RegisterNodeInput, RegisterNodeResult
from xpando.corpus import DEV_DOMAINS, ensure_domain_corpus
from xpando.keys import load_or_create_keypair, node_key_path
from xpando.logs import get_logger
from xpando.retrieval import RetrievalIndex, load_passages
from xpando.settings import Settings

log = get_logger(__name__)

DOMAIN_KEYWORDS = 200


class NodeConfigError(ValueError):
    """A node cannot start with the configuration it was given (shown to the operator)."""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    region: str
    provider: str = "offline"
    model: str | None = None  # default: bm25-retrieval (offline) or the provider's default
    domain: str | None = None
    corpus: Path | None = None
    simulated_latency_ms: int = 0
    # language-model nodes (the key is a SecretStr: it is never logged or put in a payload)
    base_url: str | None = None
    api_key: SecretStr | None = None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    max_output_tokens: int = 1024
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0


def build_offline_node(spec: NodeSpec, *, data_dir: Path) -> tuple[NodeProfile, Provider]:
    """Load (building on first start) the node's corpus and describe its domain from it."""
    if spec.corpus is not None:
        corpus_path = spec.corpus
    elif spec.domain in DEV_DOMAINS:
        corpus_path = ensure_domain_corpus(spec.domain, data_dir / "corpora")
    else:
        raise NodeConfigError(
            f"node {spec.node_id!r}: an offline node needs --corpus FILE.jsonl or one of the "
            f"built-in domains {sorted(DEV_DOMAINS)} (got domain={spec.domain!r})"
        )
    if not corpus_path.exists():
        raise NodeConfigError(f"node {spec.node_id!r}: corpus file {corpus_path} does not exist")
    passages = load_passages(corpus_path)
    domain_name = spec.domain or corpus_path.stem
    index = RetrievalIndex(passages)
    description = DEV_DOMAINS[domain_name].description if domain_name in DEV_DOMAINS else ""
    profile = NodeProfile(
        node_id=spec.node_id,
        region=spec.region,
        provider="offline",
        model=(spec.model if spec.provider == "offline" else None) or "bm25-retrieval",
        domains=[
            NodeDomain(
                name=domain_name,
                description=description,
                keywords=index.top_terms(DOMAIN_KEYWORDS),
            )
        ],
    )
    provider = OfflineRetrievalProvider(passages, domain=domain_name)
    return profile, provider


def build_model_node(spec: NodeSpec) -> tuple[NodeProfile, Provider]:
    """A node answering through a language-model provider's SDK.

    Its domain (for routing) is ``--domain`` (with the built-in description when it is one of
    the dev domains) or ``general``; a model node answers any question, so it is routed by
    score after the domain experts.
    """
    model = spec.model or DEFAULT_MODELS.get(spec.provider)
    if not model:
        raise NodeConfigError(
            f"node {spec.node_id!r}: provider {spec.provider!r} needs a model (--model NAME)"
        )
    config = ProviderConfig(
        provider=spec.provider,
        model=model,
        api_key=spec.api_key,
        base_url=spec.base_url,
        timeout_s=spec.timeout_s,
        connect_timeout_s=spec.connect_timeout_s,
        max_output_tokens=spec.max_output_tokens,
        pricing=Pricing(spec.price_input_per_mtok, spec.price_output_per_mtok),
    )
    try:
        provider = make_provider(config)
    except ProviderConfigError as err:
        raise NodeConfigError(f"node {spec.node_id!r}: {err}") from err
    domain_name = spec.domain or "general"
    description = DEV_DOMAINS[domain_name].description if domain_name in DEV_DOMAINS else ""
    profile = NodeProfile(
        node_id=spec.node_id,
        region=spec.region,
        provider=spec.provider,
        model=model,
        domains=[NodeDomain(name=domain_name, description=description)],
    )
    return profile, provider


def build_node(spec: NodeSpec, *, data_dir: Path) -> tuple[NodeProfile, Provider]:
    if spec.provider == "offline":
        return build_offline_node(spec, data_dir=data_dir)
    if spec.provider in MODEL_PROVIDERS:
        return build_model_node(spec)
    raise NodeConfigError(
        f"node {spec.node_id!r}: unknown provider {spec.provider!r}; expected one of "
        f"{', '.join(('offline', *MODEL_PROVIDERS))}"
    )


def build_node_worker(
    client: Client, *, profile: NodeProfile, provider: Provider, simulated_latency_ms: int = 0
) -> Worker:
    node = NodeActivities(
        profile=profile, provider=provider, simulated_latency_ms=simulated_latency_ms
    )
    return Worker(
        client,
        task_queue=profile.task_queue,
        activities=[node.answer],
        max_concurrent_activities=profile.capacity,
        graceful_shutdown_timeout=timedelta(seconds=5),
        identity=f"xpando-node/{profile.node_id}@{profile.region}",
    )


def with_wallet(profile: NodeProfile, *, data_dir: Path) -> NodeProfile:
    """The profile with the node's payout address: the public key of its identity keypair at
    ``<data_dir>/keys/<node_id>.json`` (created, mode 0600, on first start)."""
    keypair = load_or_create_keypair(node_key_path(data_dir, profile.node_id))
    return profile.model_copy(update={"wallet": str(keypair.pubkey())})


def registration_id(profile: NodeProfile) -> str:
    """Same profile → same workflow id, so a repeated registration is one workflow."""
    digest = hashlib.sha256(profile.model_dump_json().encode()).hexdigest()[:16]
    return f"node-register-{profile.node_id}-{digest}"


async def register(
    client: Client, profile: NodeProfile, *, core_task_queue: str
) -> RegisterNodeResult:
    """Register through the core (an idempotent upsert behind a deterministic workflow id)."""
    handle = await client.start_workflow(
        NodeRegistrationWorkflow.run,
        RegisterNodeInput(profile=profile),
        id=registration_id(profile),
        task_queue=core_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    return await handle.result()


async def run_node_worker(settings: Settings, spec: NodeSpec) -> None:
    profile, provider = await asyncio.to_thread(build_node, spec, data_dir=settings.data_dir)
    profile = with_wallet(profile, data_dir=settings.data_dir)
    client = await temporal.connect(settings, attempts=60)
    worker = build_node_worker(
        client,
        profile=profile,
        provider=provider,
        simulated_latency_ms=spec.simulated_latency_ms,
    )

    async def _register() -> None:
        result = await register(client, profile, core_task_queue=settings.core_task_queue)
        log.info("node registered", node_id=result.node_id, created=result.created)

    registration = asyncio.create_task(_register())
    stop_on_signals(worker.shutdown)
    log.info(
        "node worker started",
        node_id=profile.node_id,
        region=profile.region,
        task_queue=profile.task_queue,
        provider=profile.provider,
        model=profile.model,
        domains=[d.name for d in profile.domains],
    )
    try:
        await worker.run()
    finally:
        registration.cancel()
        log.info("node worker stopped", node_id=profile.node_id)
