"""``xpando worker nodes``: many expert nodes in one process, for load tests and benchmarks.

Each hosted node is a real node as far as the network can tell: its own id, its own identity
keypair (``<data_dir>/keys/<node_id>.json``), its own signed registration through
``NodeRegistrationWorkflow``, its own task queue ``node.<id>`` and its own Temporal ``Worker`` —
but all the workers share one process, one client connection and one runtime, and nodes of one
domain share one provider object (one corpus in memory). Each worker keeps a single activity
poller (``PollerBehaviorSimpleMaximum(1)``): one long poll per node on the server, not five.

Providers: ``offline`` (the built-in corpora: ``python``, ``temporal``, ``web-api``,
``solana``, round-robin) or ``instant`` (answers at once with a fixed text for its domain: no
corpus, for measuring the network rather than the experts).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from solders.keypair import Keypair
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import PollerBehaviorSimpleMaximum, Worker

from activities.answering import AnsweringActivities
from workers.node import DOMAIN_KEYWORDS, register
from workers.runtime import NODE_DEPLOYMENT, VersionedWorker, stop_on_signals
from xpando import __version__, telemetry, temporal
from xpando.contracts import ContributionStatus, NodeDomain, NodeProfile
from xpando.corpus import DEV_DOMAINS, ensure_domain_corpus
from xpando.keys import load_or_create_keypair, node_key_path
from xpando.logs import get_logger
from xpando.providers.base import Provider, ProviderReply, ProviderRequest
from xpando.providers.offline import OfflineRetrievalProvider
from xpando.retrieval import RetrievalIndex, load_passages
from xpando.settings import Settings

log = get_logger(__name__)

REGISTER_CONCURRENCY = 32
DEFAULT_DOMAINS = tuple(DEV_DOMAINS)


class InstantProvider:
    """Answers at once with a fixed text about its domain (simulated nodes)."""

    name = "instant"
    model = "instant"

    def __init__(self, domain: str) -> None:
        self._domain = domain

    async def answer(self, request: ProviderRequest) -> ProviderReply:
        words = len(request.prompt.split())
        return ProviderReply(
            status=ContributionStatus.OK,
            text=f"A simulated {self._domain} expert's answer to: {request.prompt[:200]}",
            model="instant",
            relevance=0.8,
            input_tokens=words,
            output_tokens=words + 6,
            finish_reason="stop",
        )


@dataclass(frozen=True)
class FleetSpec:
    count: int
    prefix: str = "sim"
    regions: tuple[str, ...] = ("local",)
    provider: str = "instant"  # instant | offline
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    capacity: int = 4
    simulated_latency_ms: int = 0
    descriptions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetNode:
    profile: NodeProfile
    provider: Provider
    keypair: Keypair | None = None


def fleet_nodes(spec: FleetSpec, *, data_dir: Path, keys: bool = True) -> list[FleetNode]:
    """The fleet's nodes: ids ``<prefix>-<i>``, regions and domains round-robin; one provider
    object per domain, shared by the nodes of that domain."""
    if spec.count < 1:
        raise ValueError("a fleet needs at least one node")
    if spec.provider not in ("instant", "offline"):
        raise ValueError(f"simulated nodes are 'instant' or 'offline', not {spec.provider!r}")
    providers: dict[str, Provider] = {}
    keywords: dict[str, list[str]] = {}
    for domain in spec.domains:
        if spec.provider == "offline":
            if domain not in DEV_DOMAINS:
                raise ValueError(f"offline simulated nodes use built-in domains, not {domain!r}")
            passages = load_passages(ensure_domain_corpus(domain, data_dir / "corpora"))
            providers[domain] = OfflineRetrievalProvider(passages, domain=domain)
            keywords[domain] = RetrievalIndex(passages).top_terms(DOMAIN_KEYWORDS)
        else:
            providers[domain] = InstantProvider(domain)
            keywords[domain] = []
    nodes = []
    for i in range(spec.count):
        domain = spec.domains[i % len(spec.domains)]
        node_id = f"{spec.prefix}-{i + 1}"
        keypair = load_or_create_keypair(node_key_path(data_dir, node_id)) if keys else None
        description = spec.descriptions.get(domain) or (
            DEV_DOMAINS[domain].description if domain in DEV_DOMAINS else ""
        )
        profile = NodeProfile(
            node_id=node_id,
            region=spec.regions[i % len(spec.regions)],
            provider=providers[domain].name,
            model="instant" if spec.provider == "instant" else "bm25-retrieval",
            domains=[NodeDomain(name=domain, description=description, keywords=keywords[domain])],
            capacity=spec.capacity,
            wallet=str(keypair.pubkey()) if keypair is not None else None,
        )
        nodes.append(FleetNode(profile=profile, provider=providers[domain], keypair=keypair))
    return nodes


def fleet_worker(
    client: Client,
    node: FleetNode,
    *,
    simulated_latency_ms: int = 0,
    build_id: str = __version__,
) -> Worker:
    activities = AnsweringActivities(
        profile=node.profile, provider=node.provider, simulated_latency_ms=simulated_latency_ms
    )
    return VersionedWorker(
        client,
        deployment=NODE_DEPLOYMENT,
        build_id=build_id,
        routed=False,
        task_queue=node.profile.task_queue,
        activities=[activities.answer],
        max_concurrent_activities=node.profile.capacity,
        activity_task_poller_behavior=PollerBehaviorSimpleMaximum(maximum=1),
        graceful_shutdown_timeout=timedelta(seconds=5),
        identity=(
            f"xpando-node/{node.profile.node_id}@{node.profile.region}/"
            f"{os.getpid()}@{socket.gethostname()}"
        ),
    )


async def register_fleet(
    client: Client,
    nodes: Sequence[FleetNode],
    *,
    core_task_queue: str,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Register every node (signed, through the core), a few at a time; returns the refused.
    ``progress(done, total)`` is called after each node, registered or refused."""
    gate = asyncio.Semaphore(REGISTER_CONCURRENCY)
    refused: list[str] = []
    done = 0

    async def one(node: FleetNode) -> None:
        nonlocal done
        async with gate:
            try:
                await register(
                    client, node.profile, core_task_queue=core_task_queue, keypair=node.keypair
                )
            except WorkflowFailureError as err:
                refused.append(f"{node.profile.node_id}: {err.cause}")
            done += 1
            if progress is not None:
                progress(done, len(nodes))

    await asyncio.gather(*(one(n) for n in nodes))
    return refused


def rss_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


async def run_fleet(
    settings: Settings, spec: FleetSpec, *, progress: Callable[[int, int], None] | None = None
) -> None:
    before = rss_bytes()
    nodes = await asyncio.to_thread(fleet_nodes, spec, data_dir=settings.data_dir)
    telemetry.serve_worker_metrics(settings)
    client = await temporal.connect(
        settings, attempts=60, runtime=temporal.heartbeat_runtime(settings.node_heartbeat_s)
    )
    workers = [
        fleet_worker(
            client,
            n,
            simulated_latency_ms=spec.simulated_latency_ms,
            build_id=settings.worker_build_id,
        )
        for n in nodes
    ]
    runs = [asyncio.create_task(w.run()) for w in workers]

    async def stop() -> None:
        await asyncio.gather(*(w.shutdown() for w in workers))

    stop_on_signals(stop)
    refused = await register_fleet(
        client, nodes, core_task_queue=settings.core_task_queue, progress=progress
    )
    after = rss_bytes()
    log.info(
        "simulated nodes running",
        nodes=len(nodes),
        refused=refused[:5],
        provider=spec.provider,
        regions=list(spec.regions),
        rss_mb=round(after / 2**20, 1),
        kb_per_node=round((after - before) / len(nodes) / 1024, 1),
    )
    try:
        await asyncio.gather(*runs)
    finally:
        log.info("simulated nodes stopped", nodes=len(nodes))
