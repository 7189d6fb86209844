"""``/v1/tasks``: submit a task (starts ``TaskWorkflow``) and read it back."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Response
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import (
    AuthRoute,
    SessionDep,
    SettingsDep,
    TaskLimitsDep,
    TemporalClientDep,
    require,
)
from api.errors import ApiError, responses
from api.schemas import ID_PATTERN, Links, TaskAccepted, TaskCreate, TaskView
from workflows.task import TaskWorkflow
from xpando import temporal as sa
from xpando.auth.keys import Scope
from xpando.contracts import AggregationStrategy, Contribution, TaskInput, TaskResult
from xpando.db import queries
from xpando.logs import get_logger
from xpando.settings import Settings

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], route_class=AuthRoute)
log = get_logger(__name__)

IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
# A running task's progress comes from a query its core worker answers: with no core worker,
# Temporal would hold the request for its own query timeout (30 s).
QUERY_TIMEOUT = timedelta(seconds=2)
TaskIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="The task id (workflow id)")]


def _links(settings: Settings, task_id: str) -> Links:
    return Links(
        self=f"{settings.api_base}/v1/tasks/{task_id}", ui=settings.workflow_ui_url(task_id)
    )


@router.post(
    "",
    status_code=202,
    response_model=TaskAccepted,
    responses=responses(400, 401, 402, 403, 409, 413, 422, 429, 503),
    dependencies=[Depends(require(Scope.TASKS_WRITE))],
)
async def submit_task(
    body: TaskCreate,
    response: Response,
    client: TemporalClientDep,
    settings: SettingsDep,
    limits: TaskLimitsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Repeat a request safely: the same key and body give the same task",
            # Documented here, checked below: a bad key is a 400 invalid_idempotency_key.
            json_schema_extra={"pattern": IDEMPOTENCY_KEY.pattern},
        ),
    ] = None,
) -> TaskAccepted:
    """Start a task. With an ``Idempotency-Key`` header, repeating the request returns the same
    task instead of starting a second one; reusing the key for a different request is a 409."""
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-100 characters of letters, digits, '.', '_', ':' or '-'",
        )
    task_id = f"task-{idempotency_key}" if idempotency_key else f"task-{uuid.uuid4().hex}"
    k = body.k or settings.default_k
    request_hash = hashlib.sha256(
        TaskCreate(
            prompt=body.prompt,
            k=k,
            domain=body.domain,
            regions=body.regions,
            strategy=body.strategy,
            fresh=body.fresh,
            quorum=body.quorum,
            deadline_s=body.deadline_s,
        )
        .model_dump_json()
        .encode()
    ).hexdigest()
    strategy = body.strategy or AggregationStrategy(settings.aggregation_strategy)
    quorum = body.quorum if body.quorum is not None else settings.task_quorum
    deadline_s = body.deadline_s if body.deadline_s is not None else settings.task_deadline_s
    task = TaskInput(
        task_id=task_id,
        prompt=body.prompt,
        k=k,
        domain=body.domain,
        regions=body.regions,
        submitted_at=datetime.now(UTC),
        strategy=strategy,
        fresh=body.fresh,
        quorum=min(quorum, k) if quorum else None,
        # At least the 1 ms a TaskInput takes: deadline_s may be any positive number.
        deadline_ms=max(1, round(deadline_s * 1000)) if deadline_s else None,
        wait_for_experts_s=settings.task_wait_for_experts_s,
    )
    await limits.admit(
        task_id=task_id, prompt=task.prompt, k=k, regions=task.regions, domain=task.domain
    )
    try:
        handle = await client.start_workflow(
            TaskWorkflow.run,
            task,
            id=task_id,
            task_queue=settings.core_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            memo={"request_sha256": request_hash},
            search_attributes=sa.initial_task_attributes(body.domain),
            static_summary=body.prompt[:200],
        )
        existing = idempotency_key is not None
    except WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle(task_id)
        existing = True
    if existing:
        memo = await (await handle.describe()).memo()
        if memo.get("request_sha256") != request_hash:
            raise ApiError(
                409,
                "idempotency_key_reused",
                f"Idempotency-Key {idempotency_key!r} was already used for a different request",
            )
    response.headers["Location"] = f"/v1/tasks/{task_id}"
    log.info("task submitted", task_id=task_id, k=k)  # with the principal bound (AuthRoute)
    return TaskAccepted(task_id=task_id, links=_links(settings, task_id))


@router.get(
    "/{task_id}",
    response_model=TaskView,
    responses=responses(401, 403, 404, 422, 503),
    dependencies=[Depends(require(Scope.TASKS_READ))],
)
async def get_task(
    task_id: TaskIdPath, client: TemporalClientDep, session: SessionDep, settings: SettingsDep
) -> TaskView:
    """The task's stage while it runs; its answer, confidence and contributions when done."""
    handle: WorkflowHandle[TaskWorkflow, TaskResult] = client.get_workflow_handle_for(
        TaskWorkflow.run, task_id
    )
    links = _links(settings, task_id)
    try:
        desc = await handle.describe()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        return await _from_database(task_id, session=session, links=links)
    if desc.workflow_type != "TaskWorkflow":
        raise ApiError(404, "task_not_found", f"no task {task_id!r}")
    status = (desc.status or WorkflowExecutionStatus.RUNNING).name.lower()
    if desc.status == WorkflowExecutionStatus.RUNNING:
        try:
            progress = await handle.query(TaskWorkflow.progress, rpc_timeout=QUERY_TIMEOUT)
        except RPCError:
            # No core worker to answer the query right now; the task is still durable.
            return TaskView(task_id=task_id, status=status, stage=None, links=links)
        return TaskView(
            task_id=task_id,
            status=status,
            stage=progress.stage.value,
            domain=progress.domain,
            chosen=progress.chosen,
            links=links,
        )
    if desc.status == WorkflowExecutionStatus.COMPLETED:
        result = await handle.result()
        return TaskView(
            task_id=task_id,
            status=status,
            stage="completed",
            domain=result.domain,
            prompt=result.prompt,
            chosen=[c.node_id for c in result.contributions],
            answer=result.answer,
            confidence=result.confidence,
            contributions=result.contributions,
            knowledge_used=result.knowledge_used,
            strategy=result.strategy,
            reused=result.reused,
            routing=result.routing,
            completed_at=result.completed_at,
            links=links,
        )
    error: str | None = None
    try:
        await handle.result()
    except WorkflowFailureError as err:
        cause = err.cause
        error = getattr(cause, "message", None) or str(cause)
    view = await _from_database(task_id, session=session, links=links, missing_ok=True)
    return view.model_copy(update={"status": status, "stage": "failed", "error": error})


async def _from_database(
    task_id: str, *, session: SessionDep, links: Links, missing_ok: bool = False
) -> TaskView:
    """Tasks whose workflow history has passed retention are read from the database."""
    found = await queries.get_task(session=session, task_id=task_id)
    if found is None:
        if missing_ok:
            return TaskView(task_id=task_id, status="unknown", links=links)
        raise ApiError(404, "task_not_found", f"no task {task_id!r}")
    task, rows = found
    return TaskView(
        task_id=task_id,
        status=task.status,
        stage=task.status,
        domain=task.domain,
        prompt=task.prompt,
        answer=task.answer or None,
        confidence=task.confidence,
        error=task.error,
        completed_at=queries.as_utc(task.completed_at),
        contributions=[
            # exclude_none: rows written before the provider columns existed have NULLs there
            Contribution.model_validate(
                row.model_dump(exclude={"id", "task_id", "created_at"}, exclude_none=True)
            )
            for row in rows
        ],
        links=links,
    )
