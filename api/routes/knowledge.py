"""``/v1/knowledge``: search the Mother Core's knowledge and read an item with its provenance."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BeforeValidator
from temporalio.service import RPCError, RPCStatusCode

from api.deps import AuthRoute, SessionDep, SettingsDep, TemporalClientDep, require
from api.errors import ApiError, responses
from api.schemas import ID_PATTERN, KnowledgeList, KnowledgeView
from workflows.knowledge import KnowledgeWorkflow
from xpando.auth.keys import Scope
from xpando.contracts import SAFE_TEXT_PATTERN, KnowledgeStats, Provenance, refuse_unsafe_text
from xpando.db import queries
from xpando.db.models import Knowledge
from xpando.mother.knowledge import KnowledgeIndex, effective_confidence, knowledge_workflow_id

router = APIRouter(
    prefix="/v1/knowledge",
    tags=["knowledge"],
    route_class=AuthRoute,
    dependencies=[Depends(require(Scope.KNOWLEDGE_READ))],
)

DomainQuery = Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")]


def _view(item: Knowledge, index: KnowledgeIndex, similarity: float | None = None) -> KnowledgeView:
    now = datetime.now(UTC)
    return KnowledgeView(
        knowledge_id=item.knowledge_id,
        question=item.question,
        answer=item.answer,
        domain=item.domain,
        confidence=round(
            effective_confidence(
                item.confidence,
                queries.as_utc(item.confirmed_at),
                now,
                index.config.half_life_days,
            ),
            4,
        ),
        support=item.support,
        status=item.status,
        merged_into=item.merged_into,
        uses=item.uses,
        similarity=similarity,
        provenance=[Provenance.model_validate(p) for p in item.provenance],
        created_at=queries.as_utc(item.created_at),
        updated_at=queries.as_utc(item.updated_at),
    )


@router.get("", response_model=KnowledgeList, responses=responses(401, 403, 422, 503))
async def search_knowledge(
    request: Request,
    session: SessionDep,
    q: Annotated[
        str,
        Query(
            min_length=1,
            max_length=2000,
            description="What to look for",
            json_schema_extra={"pattern": SAFE_TEXT_PATTERN},  # checked by the validator below
        ),
        BeforeValidator(refuse_unsafe_text),  # a provider embedder may refuse what a DB would
    ],
    domain: DomainQuery = None,
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
) -> KnowledgeList:
    """The stored items most similar to ``q`` (active items only), best first."""
    index: KnowledgeIndex = request.app.state.knowledge
    hits = await index.search(q, domain=domain, k=limit)
    items = []
    for hit in hits:
        item = await queries.get_knowledge(session=session, knowledge_id=hit.knowledge_id)
        if item is not None:
            items.append(_view(item, index, hit.similarity))
    return KnowledgeList(items=items, count=len(items))


@router.get(
    "/domains/{domain}/stats",
    response_model=KnowledgeStats,
    responses=responses(401, 403, 404, 422, 503),
)
async def knowledge_stats(
    domain: Annotated[str, Path(pattern=r"^[a-z0-9-]{1,64}$")],
    client: TemporalClientDep,
    settings: SettingsDep,
) -> KnowledgeStats:
    """The domain's KnowledgeWorkflow statistics (items, merges, last consolidation)."""
    handle = client.get_workflow_handle_for(
        KnowledgeWorkflow.run, knowledge_workflow_id(domain, settings.core_task_queue)
    )
    try:
        return await handle.query(KnowledgeWorkflow.stats)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise ApiError(404, "domain_not_found", f"no knowledge for domain {domain!r}") from err
        raise


@router.get(
    "/{knowledge_id}", response_model=KnowledgeView, responses=responses(401, 403, 404, 422)
)
async def get_knowledge(
    request: Request,
    session: SessionDep,
    knowledge_id: Annotated[str, Path(pattern=ID_PATTERN)],
) -> KnowledgeView:
    """One item with its provenance (tasks, contributing nodes and their scores)."""
    item = await queries.get_knowledge(session=session, knowledge_id=knowledge_id)
    if item is None:
        raise ApiError(404, "knowledge_not_found", f"no knowledge item {knowledge_id!r}")
    return _view(item, request.app.state.knowledge)
