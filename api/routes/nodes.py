"""``/v1/nodes``: the registered expert nodes, whether each is polling its queue, the state of
its circuit breakers (its own, and its provider's in its region) and its reputation; signed
registration, profile updates and deregistration (``xpando/identity.py``)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response

from api.deps import (
    AuthRoute,
    LivenessDep,
    RegistryDep,
    SessionDep,
    SettingsDep,
    registration_limit,
    require,
)
from api.errors import ApiError, responses
from api.schemas import (
    DeregisterNodeBody,
    NodeList,
    NodeRegistered,
    NodeView,
    Region,
    RegisterNodeBody,
)
from xpando.auth.keys import Scope
from xpando.breakers import node_key, provider_key, view
from xpando.contracts import NodeDomain, SignedNodeRequest
from xpando.db import queries
from xpando.embedding_providers import EmbeddingUnavailable
from xpando.identity import RegistrationRejected, verify_request
from xpando.routing.registry import NodeRegistry, Registered

router = APIRouter(prefix="/v1/nodes", tags=["nodes"], route_class=AuthRoute)

NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # as SignedNodeRequest.node_id
_RATE_EXAMPLE = {
    429: (
        "registration_rate_limited",
        "203.0.113.7 sent more than 60 node registrations this minute "
        "(XPANDO_LIMIT_REGISTRATIONS_PER_MINUTE); retry in 42 s",
    )
}


@router.get(
    "",
    response_model=NodeList,
    responses=responses(401, 403, 422, 503),
    dependencies=[Depends(require(Scope.NODES_READ))],
)
async def list_nodes(
    session: SessionDep,
    liveness: LivenessDep,
    settings: SettingsDep,
    region: Annotated[list[Region] | None, Query(max_length=8)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    status: Annotated[Literal["active", "deregistered", "all"], Query()] = "active",
) -> NodeList:
    nodes = await queries.list_nodes(
        session=session,
        regions=region or (),
        limit=limit,
        status=None if status == "all" else status,
    )
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
            status=n.status or "active",
            public_key=n.public_key,
            wallet=n.wallet,
            reputation=n.reputation if n.reputation is not None else settings.reputation_prior,
            contributions=n.reputation_n or 0,
            price_input_per_mtok=n.price_input_per_mtok or 0.0,
            price_output_per_mtok=n.price_output_per_mtok or 0.0,
        )
        for n, is_live in zip(nodes, live, strict=True)
    ]
    return NodeList(nodes=views, count=len(views))


@router.post(
    "",
    response_model=NodeRegistered,
    status_code=201,
    responses={
        200: {"model": NodeRegistered, "description": "An existing node, updated"},
        **responses(400, 401, 403, 409, 413, 422, 429, 503, examples=_RATE_EXAMPLE),
    },
    dependencies=[Depends(registration_limit)],
)
async def register_node(
    request: RegisterNodeBody, registry: RegistryDep, response: Response
) -> NodeRegistered:
    """Register a node, or update its profile: a request signed by the node's identity key
    (``action: "register"``). 201 when the node is new, 200 when it was updated."""
    done = await _apply(registry, request)
    response.status_code = 201 if done.created else 200
    return NodeRegistered(
        node_id=done.node_id,
        status="active",
        created=done.created,
        public_key=done.public_key,
        registered_at=done.registered_at,
    )


@router.delete(
    "/{node_id}",
    response_model=NodeRegistered,
    responses=responses(400, 401, 403, 404, 409, 413, 422, 429, 503, examples=_RATE_EXAMPLE),
    dependencies=[Depends(registration_limit)],
)
async def deregister_node(
    node_id: Annotated[str, Path(min_length=1, max_length=64, pattern=NODE_ID_PATTERN)],
    request: DeregisterNodeBody,
    registry: RegistryDep,
    settings: SettingsDep,
) -> NodeRegistered:
    """Take a node out of the network: a request signed by its key, ``action: "deregister"``.
    The node is no longer routed to; registering again (same key) brings it back."""
    if request.node_id != node_id:
        # As in the registry, the signature is checked first: an unsigned caller is a 401.
        try:
            verify_request(request, now=time.time(), max_skew_s=settings.node_signature_max_skew_s)
        except RegistrationRejected as err:
            raise ApiError(err.status, err.code, err.message) from err
        raise ApiError(
            422,
            "invalid_registration",
            f"DELETE /v1/nodes/{node_id} takes a signed deregister request for that node",
        )
    done = await _apply(registry, request)
    return NodeRegistered(
        node_id=done.node_id,
        status="deregistered",
        created=False,
        public_key=done.public_key,
        registered_at=done.registered_at,
    )


async def _apply(registry: NodeRegistry, request: SignedNodeRequest) -> Registered:
    try:
        return await registry.apply(request)
    except RegistrationRejected as err:
        raise ApiError(err.status, err.code, err.message) from err
    except EmbeddingUnavailable as err:  # a provider embedder (XPANDO_EMBEDDER) is down
        raise ApiError(503, "embedding_unavailable", str(err)) from err
