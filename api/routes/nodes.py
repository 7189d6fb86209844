"""``/v1/nodes``: the registered expert nodes, whether each is polling its queue, and the state of
its circuit breakers (its own, and its provider's in its region)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from activities.breaker import node_key, provider_key, view
from api.deps import LivenessDep, SessionDep
from api.schemas import NodeList, NodeView, Region
from xpando.contracts import NodeDomain
from xpando.db import queries

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])


@router.get("", response_model=NodeList)
async def list_nodes(
    session: SessionDep,
    liveness: LivenessDep,
    region: Annotated[list[Region] | None, Query(max_length=8)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> NodeList:
    nodes = await queries.list_nodes(session=session, regions=region or (), limit=limit)
    live = await asyncio.gather(*(liveness.is_live(n.task_queue) for n in nodes))
    keys = [node_key(n.node_id) for n in nodes]
    keys += sorted({provider_key(n.provider, n.region) for n in nodes})
    breakers = await queries.get_breakers(session=session, keys=keys)
    now = datetime.now(UTC)
    views = [
        NodeView(
            node_id=n.node_id,
            region=n.region,
            provider=n.provider,
            model=n.model,
            task_queue=n.task_queue,
            capacity=n.capacity,
            domains=[NodeDomain.model_validate(d) for d in n.domains],
            live=is_live,
            registered_at=queries.as_utc(n.registered_at),
            updated_at=queries.as_utc(n.updated_at),
            breaker=view(breakers.get(node_key(n.node_id)), key=node_key(n.node_id), now=now),
            provider_breaker=view(
                breakers.get(provider_key(n.provider, n.region)),
                key=provider_key(n.provider, n.region),
                now=now,
            ),
        )
        for n, is_live in zip(nodes, live, strict=True)
    ]
    return NodeList(nodes=views, count=len(views))
