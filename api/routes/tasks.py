"""``/v1/tasks``: submit a task (starts ``TaskWorkflow``), list, read, follow and cancel it.

Which store holds the truth about a task:

- While its workflow runs (or waits for a live expert), only Temporal knows the task: its status
  (``XpandoStatus``), domain, experts and owner are search attributes, listed from Temporal's
  visibility; its stages and contributions are in the workflow's event log (its ``events``
  query), which ``/events`` streams.
- A task that ends through its workflow (completed, failed, cancelled) is recorded in the
  database before the workflow closes. The database keeps it past Temporal's retention, with its
  final domain and every contribution: for an ended task it is the truth.

The listing pages both by the same key, (submission time, task id), newest first: the database
stores the workflow's StartTime as the submission time, to the microsecond Temporal reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryRejectedError,
)
from temporalio.common import QueryRejectCondition, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import (
    AuthRoute,
    PrincipalDep,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    TaskLimitsDep,
    TemporalClientDep,
    may_see,
    owner_filter,
    require,
)
from api.errors import ApiError, responses
from api.schemas import (
    CURSOR_PATTERN,
    EXAMPLE_TASK_ACCEPTED,
    EXAMPLE_TASK_CANCELLED,
    EXAMPLE_TASK_CANCELLING,
    EXAMPLE_TASK_EVENTS,
    EXAMPLE_TASK_LIST,
    EXAMPLE_TASK_VIEW,
    ID_PATTERN,
    NODE_ID_PATTERN,
    DateTimeParam,
    Links,
    TaskAccepted,
    TaskCancelled,
    TaskCreate,
    TaskCursor,
    TaskList,
    TaskStatus,
    TaskSummary,
    TaskView,
    example,
)
from workflows.task import TaskWorkflow
from xpando import metrics
from xpando import temporal as sa
from xpando.auth.keys import Principal, Scope
from xpando.contracts import (
    AggregationStrategy,
    Contribution,
    ContributionStatus,
    TaskError,
    TaskEvent,
    TaskEventsInput,
    TaskEventType,
    TaskInput,
    TaskResult,
)
from xpando.db import queries
from xpando.db.models import Task
from xpando.logs import get_logger
from xpando.settings import Settings

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], route_class=AuthRoute)
log = get_logger(__name__)

IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
# A running task's progress comes from a query its core worker answers: with no core worker,
# Temporal would hold the request for its own query timeout (30 s).
QUERY_TIMEOUT = timedelta(seconds=2)
# How often a follower of a running task asks it for new events (see follow_events): the most
# an event waits before it is streamed.
EVENTS_POLL = timedelta(milliseconds=500)
# How long a cancel waits for the task to record its cancellation and end, before it answers
# 202 (the task will end cancelled when a core worker runs it).
CANCEL_WAIT = timedelta(seconds=10)
PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX = 20, 100
MAX_EVENT_ID = 999_999_999
LIVE = (TaskStatus.RUNNING, TaskStatus.WAITING)  # in Temporal only, until recorded
TaskIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="The task id (workflow id)")]
TaskHandle = WorkflowHandle[TaskWorkflow, TaskResult]


@router.post(
    "",
    status_code=202,
    response_model=TaskAccepted,
    responses={
        202: example(EXAMPLE_TASK_ACCEPTED),
        **responses(
            400,
            401,
            402,
            403,
            409,
            413,
            422,
            429,
            503,
            examples={
                400: (
                    "invalid_idempotency_key",
                    "Idempotency-Key must be 1-100 characters of letters, digits, '.', '_', "
                    "':' or '-'",
                ),
                409: (
                    "idempotency_key_reused",
                    "Idempotency-Key 'order-42' was already used for a different request",
                ),
            },
        ),
    },
    dependencies=[Depends(require(Scope.TASKS_WRITE))],
)
async def submit_task(
    body: TaskCreate,
    response: Response,
    client: TemporalClientDep,
    settings: SettingsDep,
    principal: PrincipalDep,
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
    """Start a task, owned by the caller. With an ``Idempotency-Key`` header, repeating the
    request returns the same task instead of starting a second one; reusing the key for a
    different request (or by another caller) is a 409."""
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-100 characters of letters, digits, '.', '_', ':' or '-'",
        )
    task_id = f"task-{idempotency_key}" if idempotency_key else f"task-{uuid.uuid4().hex}"
    k = body.k or settings.default_k
    owner = principal.name if principal is not None else None
    request = TaskCreate(
        prompt=body.prompt,
        k=k,
        domain=body.domain,
        regions=body.regions,
        strategy=body.strategy,
        fresh=body.fresh,
        quorum=body.quorum,
        deadline_s=body.deadline_s,
    ).model_dump_json()
    if owner is not None:  # part of what the key stands for: another caller's is not theirs
        request = f"{owner}\n{request}"
    request_hash = hashlib.sha256(request.encode()).hexdigest()
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
        owner=owner,
        key_id=principal.key_id if principal is not None else None,
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
            search_attributes=sa.initial_task_attributes(body.domain, owner),
            static_summary=body.prompt[:200],
        )
        existing = idempotency_key is not None
    except WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle(task_id)
        existing = True
    if existing:
        await limits.undo()  # the task's first submission holds its cost
        memo = await (await handle.describe()).memo()
        if memo.get("request_sha256") != request_hash:
            raise ApiError(
                409,
                "idempotency_key_reused",
                f"Idempotency-Key {idempotency_key!r} was already used for a different request",
            )
    response.headers["Location"] = f"/v1/tasks/{task_id}"
    metrics.TASKS_SUBMITTED.inc()
    log.info("task submitted", task_id=task_id, k=k)  # with the principal bound (AuthRoute)
    return TaskAccepted(task_id=task_id, links=_links(settings, task_id))


_NOT_FOUND_EXAMPLE = {404: ("task_not_found", "no task 'task-5f0c9a1e2b7d4c3e8a9f6b1d2c3e4f50'")}


@router.get(
    "",
    response_model=TaskList,
    responses={
        200: example(EXAMPLE_TASK_LIST),
        **responses(401, 403, 422, 503),
    },
    dependencies=[Depends(require(Scope.TASKS_READ))],
)
async def list_tasks(
    client: TemporalClientDep,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    status: Annotated[TaskStatus | None, Query(description="Only tasks with this status")] = None,
    domain: Annotated[
        str | None,
        Query(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$", description="general: none"),
    ] = None,
    node: Annotated[
        str | None, Query(pattern=NODE_ID_PATTERN, description="Only tasks this node was asked")
    ] = None,
    since: Annotated[
        DateTimeParam | None,
        Query(description="Only tasks submitted at or after this time, e.g. 2025-06-01T12:00:00Z"),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(pattern=CURSOR_PATTERN, description="The next_cursor of the previous page"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_SIZE_MAX)] = PAGE_SIZE_DEFAULT,
) -> TaskList:
    """The caller's tasks (an admin's: every task), newest first, a page at a time: follow
    ``next_cursor`` until it is null. Tasks submitted meanwhile never shift a page (the cursor
    is the last task's submission time and id), so no task is repeated or skipped; a page may
    hold fewer than ``limit`` tasks.

    Running and waiting tasks are read from Temporal's visibility (their search attributes);
    ended ones from the database, where each is recorded before its workflow closes."""
    before: tuple[datetime, str] | None = None
    if cursor is not None:  # its shape was checked with the other parameters
        after = TaskCursor.decode(cursor)
        before = (after.submitted_at, after.task_id)
    since_utc = _utc(since) if since is not None else None
    owner = owner_filter(principal)
    # Temporal first, then the database: a task is recorded before its workflow closes, so one
    # that visibility no longer shows running is in the database by the time it is read.
    live: list[WorkflowExecution] = []
    if status is None or status in LIVE:
        live = await _running_tasks(
            client,
            limit=limit + 1,
            before=before,
            since=since_utc,
            status=status,
            domain=domain,
            node=node,
            owner=owner,
        )
    ended: list[Task] = []
    if status not in LIVE:
        ended = await queries.list_tasks(
            session=session,
            limit=limit + 1,
            before=before,
            since=since_utc,
            statuses=[status.value] if status is not None else None,
            domain=domain,
            node=node,
            owner=owner,
        )
    # The top `limit` of each store hold the top `limit` of both; a task in both (recorded,
    # its close not yet in visibility) is the database's.
    rows: dict[str, tuple[tuple[datetime, str], Task | WorkflowExecution]] = {}
    for task in ended:
        assert task.submitted_at is not None  # listed only with one
        rows[task.task_id] = ((_as_utc(task.submitted_at), task.task_id), task)
    for execution in live:
        rows.setdefault(execution.id, ((execution.start_time, execution.id), execution))
    ranked = sorted(rows.values(), key=lambda row: row[0], reverse=True)
    page, more = ranked[:limit], len(ranked) > limit
    # A running task recorded since (yet not among the database's rows) has ended with
    # something these filters leave out: its record is the truth, so it is not listed.
    running_ids = [r.id for _, r in page if isinstance(r, WorkflowExecution)]
    recorded = await queries.recorded_tasks(session=session, task_ids=running_ids)
    nodes = await queries.task_nodes(
        session=session, task_ids=[r.task_id for _, r in page if isinstance(r, Task)]
    )
    tasks = [
        _summary_of_record(r, nodes.get(r.task_id, []), settings)
        if isinstance(r, Task)
        else _summary_of_execution(r, settings)
        for _, r in page
        if not (isinstance(r, WorkflowExecution) and r.id in recorded)
    ]
    next_cursor = None
    if more:
        (at, last_id), _ = page[-1]
        next_cursor = TaskCursor(submitted_at=at, task_id=last_id).encode()
    return TaskList(tasks=tasks, next_cursor=next_cursor)


async def _running_tasks(
    client: Client,
    *,
    limit: int,
    before: tuple[datetime, str] | None,
    since: datetime | None,
    status: TaskStatus | None,
    domain: str | None,
    node: str | None,
    owner: str | None,
) -> list[WorkflowExecution]:
    """The newest ``limit`` running tasks after ``before`` by (StartTime, id), from visibility.

    Visibility lists running workflows newest first by StartTime (ties in no order of ours) and
    reports StartTime to the microsecond, so: read up to the microsecond of ``before`` (it may
    hold more than one task), keep those strictly after it by (StartTime, id), and read on past
    the ``limit``-th while others share its StartTime."""
    clauses = ['WorkflowType = "TaskWorkflow"', 'ExecutionStatus = "Running"']
    for key, value in (
        (sa.STATUS, status.value if status is not None else None),
        (sa.DOMAIN, domain),
        (sa.NODES, node),  # a keyword list: `=` means "holds"
        (sa.OWNER, owner),
    ):
        if value is not None and _expressible(value):
            clauses.append(f"{key.name} = {_quoted(value)}")
    if since is not None:
        clauses.append(f"StartTime >= {_quoted(_rfc3339(since))}")
    if before is not None:
        bound = (  # visibility may hold StartTime finer than the microsecond it reports
            before[0] + timedelta(microseconds=1)
            if before[0] < datetime.max.replace(tzinfo=UTC)
            else before[0]
        )
        clauses.append(f"StartTime < {_quoted(_rfc3339(bound))}")
    found: list[WorkflowExecution] = []
    async for execution in client.list_workflows(" AND ".join(clauses), page_size=limit):
        if before is not None and (execution.start_time, execution.id) >= before:
            continue
        if owner is not None and execution.typed_search_attributes.get(sa.OWNER) != owner:
            continue  # a name the list filter cannot hold (see _expressible)
        if len(found) >= limit and execution.start_time < found[-1].start_time:
            break
        found.append(execution)
    found.sort(key=lambda e: (e.start_time, e.id), reverse=True)
    return found[:limit]


def _summary_of_execution(execution: WorkflowExecution, settings: Settings) -> TaskSummary:
    attributes = execution.typed_search_attributes
    listed = attributes.get(sa.STATUS) or ""
    # A workflow about to close may show its final status already (its record says the same)
    status = TaskStatus(listed) if listed in set(TaskStatus) else TaskStatus.RUNNING
    return TaskSummary(
        task_id=execution.id,
        status=status,
        domain=attributes.get(sa.DOMAIN),
        owner=attributes.get(sa.OWNER),
        nodes=list(attributes.get(sa.NODES) or []),
        submitted_at=execution.start_time,
        links=_links(settings, execution.id),
    )


def _summary_of_record(task: Task, nodes: list[str], settings: Settings) -> TaskSummary:
    assert task.submitted_at is not None
    return TaskSummary(
        task_id=task.task_id,
        status=TaskStatus(task.status),
        domain=task.domain or "general",
        owner=task.owner,
        nodes=nodes,
        submitted_at=_as_utc(task.submitted_at),
        completed_at=queries.as_utc(task.completed_at),
        links=_links(settings, task.task_id),
    )


@router.get(
    "/{task_id}",
    response_model=TaskView,
    responses={
        200: example(EXAMPLE_TASK_VIEW),
        **responses(401, 403, 404, 422, 503, examples=_NOT_FOUND_EXAMPLE),
    },
    dependencies=[Depends(require(Scope.TASKS_READ))],
)
async def get_task(
    task_id: TaskIdPath,
    client: TemporalClientDep,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> TaskView:
    """The task's stage while it runs; its answer, confidence and contributions when done."""
    handle: TaskHandle = client.get_workflow_handle_for(TaskWorkflow.run, task_id)
    links = _links(settings, task_id)
    try:
        desc = await handle.describe()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        return await _from_database(task_id, session=session, links=links, principal=principal)
    _check_task(desc, principal)
    status = _status_name(desc.status)
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
    cancelled = desc.status == WorkflowExecutionStatus.CANCELED
    return view.model_copy(
        update={
            "status": status,
            "stage": "cancelled" if cancelled else "failed",
            # the record says which experts had answered; Temporal only that it was cancelled
            "error": (view.error or error) if cancelled else error,
        }
    )


@router.post(
    "/{task_id}/cancel",
    response_model=TaskCancelled,
    responses={
        200: example(EXAMPLE_TASK_CANCELLED, "Cancelled: which experts had answered"),
        202: example(
            EXAMPLE_TASK_CANCELLING,
            "Cancellation requested; the task has not ended yet (no core worker answered in time)",
        ),
        **responses(
            401,
            403,
            404,
            409,
            422,
            503,
            examples={
                **_NOT_FOUND_EXAMPLE,
                409: (
                    "task_ended",
                    "task 'task-5f0c9a1e2b7d4c3e8a9f6b1d2c3e4f50' has already completed: "
                    "nothing to cancel",
                ),
            },
        ),
    },
    dependencies=[Depends(require(Scope.TASKS_WRITE))],
)
async def cancel_task(
    task_id: TaskIdPath,
    response: Response,
    client: TemporalClientDep,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> TaskCancelled:
    """Cancel a running task: the experts still working are cancelled (their provider calls
    too), and the task is recorded ``cancelled`` with the contributions that had come in. Says
    which experts had answered. Cancelling a cancelled task says it again; one that has ended
    otherwise (or gets to record its answer first) is a 409."""
    handle: TaskHandle = client.get_workflow_handle_for(TaskWorkflow.run, task_id)
    links = _links(settings, task_id)
    desc = await _describe_task(handle, principal)
    if desc.status == WorkflowExecutionStatus.RUNNING:
        try:
            await handle.cancel(reason=f"by {principal.name}" if principal else "through the API")
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise  # (NOT_FOUND: it has just closed; how is read below)
        log.info("task cancel requested", task_id=task_id)
        try:
            await asyncio.wait_for(_closed(handle), CANCEL_WAIT.total_seconds())
        except TimeoutError:
            response.status_code = 202
            return TaskCancelled(task_id=task_id, status="cancelling", links=links)
        desc = await handle.describe()
    if desc.status != WorkflowExecutionStatus.CANCELED:
        raise ApiError(
            409,
            "task_ended",
            f"task {task_id!r} has already {_status_name(desc.status).replace('_', ' ')}: "
            "nothing to cancel",
        )
    found = await queries.get_task(session=session, task_id=task_id)
    contributions = _contributions(found[1]) if found is not None else []
    answered = [c.node_id for c in contributions if c.status != ContributionStatus.FAILED]
    return TaskCancelled(
        task_id=task_id,
        status="cancelled",
        answered=answered,
        unanswered=[c.node_id for c in contributions if c.node_id not in answered],
        contributions=contributions,
        links=links,
    )


async def _closed(handle: TaskHandle) -> None:
    """Until the task's workflow has closed, however it ended."""
    with contextlib.suppress(WorkflowFailureError):
        await handle.result()


@dataclass(frozen=True)
class _Followed:
    handle: TaskHandle
    after: int  # the last event the client has


async def _followed_task(
    task_id: TaskIdPath,
    client: TemporalClientDep,
    sessions: SessionFactoryDep,
    principal: PrincipalDep,
    last_event_id: Annotated[
        int,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=MAX_EVENT_ID,
            description="Resume after this event (what an EventSource sends on reconnecting)",
        ),
    ] = 0,
) -> _Followed:
    """The task whose events are asked for, checked before the stream starts (a missing task
    is a plain 404). The database is only read when Temporal no longer has the task: a stream
    holds no database session."""
    handle: TaskHandle = client.get_workflow_handle_for(TaskWorkflow.run, task_id)
    try:
        await _describe_task(handle, principal)
    except ApiError as missing:
        async with sessions() as session:
            found = await queries.get_task(session=session, task_id=task_id)
        if found is None or not may_see(principal, found[0].owner):
            raise
        raise ApiError(
            410,
            "task_events_gone",
            f"task {task_id!r} ended longer ago than Temporal keeps its history, and its events "
            f"with it; GET /v1/tasks/{task_id} has its record",
        ) from missing
    return _Followed(handle=handle, after=last_event_id)


_EVENTS_EXAMPLE = "".join(
    f"id: {e.id}\nevent: {e.type.value}\ndata: {e.model_dump_json()}\n\n"
    for e in EXAMPLE_TASK_EVENTS
)


@router.get(
    "/{task_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "Server-Sent Events, one per TaskEvent (its JSON as data, its id "
            "as id:, its type as event:), until the task's last event (result or error)",
            "content": {"text/event-stream": {"example": _EVENTS_EXAMPLE}},
        },
        **responses(
            401,
            403,
            404,
            410,
            422,
            429,
            503,
            streaming=True,
            examples={
                **_NOT_FOUND_EXAMPLE,
                410: (
                    "task_events_gone",
                    "task 'task-5f0c' ended longer ago than Temporal keeps its history",
                ),
            },
        ),
    },
    dependencies=[Depends(require(Scope.TASKS_READ))],
)
async def task_events(
    followed: Annotated[_Followed, Depends(_followed_task)],
) -> AsyncIterator[ServerSentEvent]:
    """The task's events as they happen: each ``stage`` it enters, each ``contribution`` as an
    expert's ask ends (node, status, latency, cost, …), then its ``result`` or ``error``, and
    the stream ends. Each event's ``id`` is its position in the task's log: reconnecting with
    ``Last-Event-ID`` resumes after it, with no event repeated or missed."""
    async for event in follow_events(followed.handle, after=followed.after):
        yield ServerSentEvent(id=str(event.id), event=event.type.value, data=event)


async def follow_events(
    handle: TaskHandle, *, after: int = 0, poll: timedelta = EVENTS_POLL
) -> AsyncIterator[TaskEvent]:
    """A task's events after event ``after``, as they come, until its last one.

    Read with the workflow's ``events`` query every ``poll`` while it runs. A query is answered
    by the core worker that holds the workflow in memory and leaves nothing in its history, so
    any number of followers costs the task nothing durable (an update that waits for new events
    would write two history events per batch and per follower, and Temporal caps a workflow's
    updates in flight). Once the workflow has closed, one last query (a worker replays its
    history) reads what is left; a task closed without a last event of its own (terminated or
    timed out by an operator) gets one saying so. While no core worker answers, it keeps
    asking: the task is durable."""
    closed: WorkflowExecutionStatus | None = None
    while True:
        try:
            batch = await handle.query(
                TaskWorkflow.events,
                TaskEventsInput(after=after),
                reject_condition=QueryRejectCondition.NOT_OPEN if closed is None else None,
                rpc_timeout=QUERY_TIMEOUT,
            )
        except WorkflowQueryRejectedError as rejected:
            closed = rejected.status or WorkflowExecutionStatus.TERMINATED
            continue
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise
            log.info("task events not answered; asking again", task_id=handle.id, error=str(err))
            await asyncio.sleep(poll.total_seconds())
            continue
        for event in batch.events:
            yield event
            after = event.id
        if batch.ended:
            return
        if closed is not None:
            status = _status_name(closed)
            yield TaskEvent(
                id=after + 1,
                type=TaskEventType.ERROR,
                at=(await handle.describe()).close_time or datetime.now(UTC),
                error=TaskError(
                    type=closed.name.title().replace("_", ""),
                    message=f"the task's workflow was {status.replace('_', ' ')} before it ended",
                ),
            )
            return
        await asyncio.sleep(poll.total_seconds())


async def _describe_task(
    handle: TaskHandle, principal: Principal | None
) -> WorkflowExecutionDescription:
    """The task's workflow, or a 404 when there is none the caller may see."""
    try:
        desc = await handle.describe()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        raise ApiError(404, "task_not_found", f"no task {handle.id!r}") from err
    _check_task(desc, principal)
    return desc


def _check_task(desc: WorkflowExecutionDescription, principal: Principal | None) -> None:
    """Another workflow, or another caller's task, is not found (not forbidden: its existence
    is not the caller's to know)."""
    owner = desc.typed_search_attributes.get(sa.OWNER)
    if desc.workflow_type != "TaskWorkflow" or not may_see(principal, owner):
        raise ApiError(404, "task_not_found", f"no task {desc.id!r}")


def _status_name(status: WorkflowExecutionStatus | None) -> str:
    """running, completed, failed, cancelled, terminated, timed_out, continued_as_new."""
    if status == WorkflowExecutionStatus.CANCELED:
        return "cancelled"  # as recorded
    return (status or WorkflowExecutionStatus.RUNNING).name.lower()


def _links(settings: Settings, task_id: str) -> Links:
    return Links(
        self=f"{settings.api_base}/v1/tasks/{task_id}", ui=settings.workflow_ui_url(task_id)
    )


def _quoted(value: str) -> str:
    """A string literal of Temporal's list filter (see _expressible)."""
    return f'"{value}"'


def _expressible(value: str) -> bool:
    """Whether the list filter can match ``value``: with SQL visibility no escaping of ``"`` or
    ``\\`` matches a value holding one (checked against the dev server)."""
    return '"' not in value and "\\" not in value


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _as_utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _utc(at: datetime) -> datetime:
    """A time parameter in UTC; past either end of the calendar in UTC (e.g.
    0001-01-01T00:00:00+01:00), that end."""
    try:
        return _as_utc(at).astimezone(UTC)
    except OverflowError:
        ahead = (at.utcoffset() or timedelta(0)) > timedelta(0)
        return (datetime.min if ahead else datetime.max).replace(tzinfo=UTC)


def _contributions(rows: list[Any]) -> list[Contribution]:
    # exclude_none: rows written before the provider columns existed have NULLs there
    return [
        Contribution.model_validate(
            row.model_dump(exclude={"id", "task_id", "created_at"}, exclude_none=True)
        )
        for row in rows
    ]


async def _from_database(
    task_id: str,
    *,
    session: SessionDep,
    links: Links,
    missing_ok: bool = False,
    principal: Principal | None = None,
) -> TaskView:
    """Tasks whose workflow history has passed retention are read from the database."""
    found = await queries.get_task(session=session, task_id=task_id)
    if found is None or not may_see(principal, found[0].owner):
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
        contributions=_contributions(rows),
        links=links,
    )
