"""An expert node worker: polls ``node.<node_id>`` and answers through the node's provider."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import structlog
from pydantic import SecretStr
from solders.keypair import Keypair
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.worker import Worker

from activities.answering import AnsweringActivities
from workers.runtime import NODE_DEPLOYMENT, VersionedWorker, stop_on_signals
from workflows.node_registration import NodeRegistrationWorkflow
from xpando import __version__, telemetry, temporal
from xpando.contracts import (
    NodeAction,
    NodeDomain,
    NodeProfile,
    RegisterNodeInput,
    RegisterNodeResult,
    SignedNodeRequest,
)
from xpando.corpus import DEV_DOMAINS, ensure_domain_corpus
from xpando.identity import sign_request
from xpando.keys import KeyFileError, load_or_create_keypair, node_key_path, parse_keypair
from xpando.logs import get_logger
from xpando.providers.base import Pricing, Provider, ProviderConfig
from xpando.providers.offline import OfflineRetrievalProvider
from xpando.providers.registry import (
    DEFAULT_MODELS,
    MODEL_PROVIDERS,
    ProviderConfigError,
    make_provider,
)
from xpando.retrieval import RetrievalIndex, load_passages
from xpando.settings import Settings

log = get_logger(__name__)

DOMAIN_KEYWORDS = 200


class NodeConfigError(ValueError):
    """A node cannot start with the configuration it was given (shown to the operator)."""


class RegistrationRefused(NodeConfigError):
    """The network refused the node's signed registration (key mismatch, bad signature, …)."""


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
    capacity: int = 4  # tasks answered at once (the worker's activity slots)
    domain_description: str | None = None  # default: the built-in domain's description


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
    profile = NodeProfile(
        node_id=spec.node_id,
        region=spec.region,
        provider="offline",
        model=(spec.model if spec.provider == "offline" else None) or "bm25-retrieval",
        domains=[
            NodeDomain(
                name=domain_name,
                description=_description(spec, domain_name),
                keywords=index.top_terms(DOMAIN_KEYWORDS),
            )
        ],
        capacity=spec.capacity,
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
    profile = NodeProfile(
        node_id=spec.node_id,
        region=spec.region,
        provider=spec.provider,
        model=model,
        domains=[NodeDomain(name=domain_name, description=_description(spec, domain_name))],
        capacity=spec.capacity,
        price_input_per_mtok=spec.price_input_per_mtok,
        price_output_per_mtok=spec.price_output_per_mtok,
    )
    return profile, provider


def _description(spec: NodeSpec, domain: str) -> str:
    if spec.domain_description:
        return spec.domain_description
    return DEV_DOMAINS[domain].description if domain in DEV_DOMAINS else ""


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
    client: Client,
    *,
    profile: NodeProfile,
    provider: Provider,
    simulated_latency_ms: int = 0,
    build_id: str = __version__,
) -> Worker:
    node = AnsweringActivities(
        profile=profile, provider=provider, simulated_latency_ms=simulated_latency_ms
    )
    return VersionedWorker(
        client,
        deployment=NODE_DEPLOYMENT,
        build_id=build_id,
        routed=False,
        task_queue=profile.task_queue,
        activities=[node.answer],
        max_concurrent_activities=profile.capacity,
        graceful_shutdown_timeout=timedelta(seconds=5),
        # Unique per process: liveness tells a restarted node from the one that stopped.
        identity=f"xpando-node/{profile.node_id}@{profile.region}/{os.getpid()}@{socket.gethostname()}",
    )


def node_keypair(settings: Settings, node_id: str) -> Keypair:
    """The node's identity: ``XPANDO_NODE_KEY`` when set (e.g. from a Kubernetes Secret), else the
    keypair at ``<data_dir>/keys/<node_id>.json`` (created, mode 0600, on first start)."""
    if settings.node_key is not None and settings.node_key.get_secret_value().strip():
        try:
            return parse_keypair(settings.node_key.get_secret_value())
        except KeyFileError as err:
            raise NodeConfigError(f"XPANDO_NODE_KEY: {err}") from err
    try:
        return load_or_create_keypair(node_key_path(settings.data_dir, node_id))
    except KeyFileError as err:
        raise NodeConfigError(str(err)) from err


def with_wallet(profile: NodeProfile, *, data_dir: Path) -> NodeProfile:
    """The profile with the node's payout address: the public key of its identity keypair at
    ``<data_dir>/keys/<node_id>.json`` (created, mode 0600, on first start)."""
    keypair = load_or_create_keypair(node_key_path(data_dir, profile.node_id))
    return profile.model_copy(update={"wallet": str(keypair.pubkey())})


def registration_id(request: SignedNodeRequest) -> str:
    """One signed request → one workflow id, so submitting it twice starts one workflow."""
    digest = hashlib.sha256(request.signature.encode()).hexdigest()[:16]
    return f"node-{request.action.value}-{request.node_id}-{digest}"


async def submit(
    client: Client, request: SignedNodeRequest, *, core_task_queue: str
) -> RegisterNodeResult:
    """Send a signed node request through the core (NodeRegistrationWorkflow) and wait for it.

    Raises ``WorkflowFailureError`` whose cause is an ``ApplicationError`` typed after the
    rejection (``InvalidSignature``, ``NonceReused``, ``NodeKeyMismatch``, …)."""
    workflow_id = registration_id(request)
    try:
        handle = await client.start_workflow(
            NodeRegistrationWorkflow.run,
            RegisterNodeInput(signed=request),
            id=workflow_id,
            task_queue=core_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except WorkflowAlreadyStartedError:  # submitted before and finished: its outcome stands
        handle = client.get_workflow_handle_for(NodeRegistrationWorkflow.run, workflow_id)
    return await handle.result()


async def register(
    client: Client,
    profile: NodeProfile,
    *,
    core_task_queue: str,
    keypair: Keypair | None = None,
) -> RegisterNodeResult:
    """Register (or update) ``profile``, signed by ``keypair``.

    Without a keypair the node gets a throwaway identity (tests and scripts): its id is then
    bound to a key nobody keeps, so only a new node id can register again."""
    if keypair is None:
        if profile.wallet is not None:
            raise ValueError("the profile names a wallet: pass the node's keypair to sign with")
        keypair = Keypair()
    request = sign_request(
        keypair, action=NodeAction.REGISTER, node_id=profile.node_id, profile=profile
    )
    return await submit(client, request, core_task_queue=core_task_queue)


async def deregister(
    client: Client, node_id: str, *, keypair: Keypair, core_task_queue: str
) -> RegisterNodeResult:
    """Take the node out of the network (signed by its key): it is no longer routed to."""
    request = sign_request(keypair, action=NodeAction.DEREGISTER, node_id=node_id)
    return await submit(client, request, core_task_queue=core_task_queue)


async def run_node_worker(settings: Settings, spec: NodeSpec) -> None:
    profile, provider = await asyncio.to_thread(build_node, spec, data_dir=settings.data_dir)
    keypair = node_keypair(settings, spec.node_id)
    profile = profile.model_copy(update={"wallet": str(keypair.pubkey())})
    structlog.contextvars.bind_contextvars(node_id=profile.node_id)  # on every line it logs
    telemetry.serve_worker_metrics(settings)
    client = await temporal.connect(
        settings, attempts=60, runtime=temporal.heartbeat_runtime(settings.node_heartbeat_s)
    )
    worker = build_node_worker(
        client,
        profile=profile,
        provider=provider,
        simulated_latency_ms=spec.simulated_latency_ms,
        build_id=settings.worker_build_id,
    )
    rejected: list[str] = []

    async def _register() -> None:
        try:
            result = await register(
                client, profile, core_task_queue=settings.core_task_queue, keypair=keypair
            )
        except WorkflowFailureError as err:
            # Refused (bad signature, key mismatch, …): a node nobody can route to stops.
            rejected.append(f"registration refused: {err.cause}")
            # A warning: the process ends with this reason as its error (``xpando`` prints it).
            log.warning("registration refused", node_id=profile.node_id, error=str(err.cause))
            await worker.shutdown()
            return
        log.info(
            "node registered",
            node_id=result.node_id,
            created=result.created,
            public_key=result.public_key,
        )

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
    if rejected:
        raise RegistrationRefused(f"node {profile.node_id!r}: {rejected[0]}")
