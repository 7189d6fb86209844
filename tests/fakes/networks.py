"""Networks the workflow and API tests run on, besides ``offline_network`` (conftest): a core
worker plus nodes whose ``answer`` is a test's fake (:func:`fake_network`), or whose provider
is an official SDK against the loopback server of ``bench/loopback_providers.py``
(:func:`loopback_network`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import SecretStr
from temporalio.client import Client
from temporalio.worker import Worker

from bench.loopback_providers import FakeProviders
from tests.conftest import wait_live
from workers.core import build_core_worker
from workers.node import build_node_worker, register
from xpando.contracts import (
    AnswerInput,
    Contribution,
    ContributionStatus,
    NodeDomain,
    NodeProfile,
    node_task_queue,
)
from xpando.db import SessionFactory, queries
from xpando.providers.base import Pricing, ProviderConfig
from xpando.providers.registry import make_provider
from xpando.settings import Settings

BAKING = NodeDomain(name="baking", description="bread, dough, yeast")
PRICES = Pricing(input_per_mtok=3.0, output_per_mtok=15.0)


def answered(
    node_id: str, answer: str, *, provider: str = "fake", model: str = "fake-1", **fields: object
) -> Contribution:
    """A fake expert's good answer (relevance 0.9 unless ``fields`` say otherwise)."""
    values: dict[str, object] = {"relevance": 0.9, **fields}
    return Contribution.model_validate(
        {
            "node_id": node_id,
            "region": "eu-west",
            "provider": provider,
            "model": model,
            "status": ContributionStatus.OK,
            "answer": answer,
            **values,
        }
    )


async def register_fake_nodes(
    sessions: SessionFactory,
    node_ids: Sequence[str],
    domains: Sequence[NodeDomain] | NodeDomain = BAKING,
    *,
    provider: str = "fake",
    model: str = "fake-1",
) -> None:
    """Write the nodes' rows in eu-west, as registration would: one domain for all, or one
    each."""
    each = [domains] * len(node_ids) if isinstance(domains, NodeDomain) else list(domains)
    async with sessions() as s:
        for node_id, domain in zip(node_ids, each, strict=True):
            await queries.upsert_node(
                session=s,
                profile=NodeProfile(
                    node_id=node_id,
                    region="eu-west",
                    provider=provider,
                    model=model,
                    domains=[domain],
                ),
                now=datetime.now(UTC),
            )


@asynccontextmanager
async def fake_network(
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    node_ids: Sequence[str],
    answer: Callable[[AnswerInput], Awaitable[Contribution]],
) -> AsyncIterator[dict[str, Worker]]:
    """A core worker and one worker per node (registered with :func:`register_fake_nodes`
    first, or by the caller) whose ``answer`` is ``answer``, all polling: each node's worker."""
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            build_core_worker(client, sessions=sessions, settings=settings)
        )
        workers = {}
        for node_id in node_ids:
            workers[node_id] = Worker(
                client, task_queue=node_task_queue(node_id), activities=[answer]
            )
            await stack.enter_async_context(workers[node_id])
        await wait_live(client, *(node_task_queue(n) for n in node_ids))
        yield workers


@dataclass(frozen=True)
class LoopbackNode:
    """A node of :func:`loopback_network`: ``name`` is its key in the result (the node id adds
    a suffix of the test's own); ``priced`` puts ``pricing`` on its profile too (what the
    API's cost estimate reads)."""

    name: str
    provider: str = "openai-compatible"
    keywords: tuple[str, ...] = ("bread", "dough", "yeast")
    region: str = "eu-west"
    timeout_s: float = 5.0
    pricing: Pricing = PRICES
    priced: bool = False
    model: str | None = None  # default: "<provider>-model"


@asynccontextmanager
async def loopback_network(
    client: Client,
    settings: Settings,
    sessions: SessionFactory,
    fake: FakeProviders,
    nodes: Sequence[LoopbackNode],
) -> AsyncIterator[dict[str, NodeProfile]]:
    """A core worker plus one SDK-backed node per definition on the loopback server,
    registered through the core and live. Node ids are unique per call; the loopback server
    counts calls per node id."""
    suffix = uuid.uuid4().hex[:6]
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            build_core_worker(client, sessions=sessions, settings=settings)
        )
        profiles: dict[str, NodeProfile] = {}
        for d in nodes:
            node_id = f"{d.name}-{suffix}"
            model = d.model or f"{d.provider}-model"
            provider = make_provider(
                ProviderConfig(
                    provider=d.provider,
                    model=model,
                    api_key=SecretStr(f"key-{node_id}"),
                    base_url=fake.base_url(d.provider, node_id),
                    timeout_s=d.timeout_s,
                    pricing=d.pricing,
                )
            )
            profile = NodeProfile(
                node_id=node_id,
                region=d.region,
                provider=d.provider,
                model=model,
                domains=[NodeDomain(name="baking", keywords=list(d.keywords))],
                price_input_per_mtok=d.pricing.input_per_mtok if d.priced else 0.0,
                price_output_per_mtok=d.pricing.output_per_mtok if d.priced else 0.0,
            )
            await stack.enter_async_context(
                build_node_worker(client, profile=profile, provider=provider)
            )
            await register(client, profile, core_task_queue=settings.core_task_queue)
            profiles[d.name] = profile
        await wait_live(client, *(p.task_queue for p in profiles.values()))
        yield profiles
