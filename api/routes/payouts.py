"""``/v1/payouts``: XPD payouts per epoch (settle, approve, read) and a node's earnings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Response
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import (
    AuthRoute,
    PayoutApprover,
    SessionDep,
    SettingsDep,
    TemporalClientDep,
    require,
)
from api.errors import ApiError, responses
from api.schemas import (
    ApproveBody,
    EarningsView,
    EpochLinks,
    EpochView,
    PayoutList,
    PayoutView,
    PendingEarnings,
    SettleAccepted,
)
from workflows.payout import PayoutSagaWorkflow
from xpando.auth.keys import Principal, Scope
from xpando.contracts_payouts import (
    ApproveInput,
    ApproveResult,
    PayoutSagaInput,
    PayoutSagaResult,
    epoch_workflow_id,
)
from xpando.db import ledger
from xpando.db.ledger_models import Payout
from xpando.economy import rewards
from xpando.logs import get_logger
from xpando.settings import Settings

router = APIRouter(prefix="/v1/payouts", tags=["payouts"], route_class=AuthRoute)
earnings_router = APIRouter(prefix="/v1/nodes", tags=["nodes"], route_class=AuthRoute)
log = get_logger(__name__)

# The last second a datetime holds (9999-12-31T23:59:59Z). The epoch path's bound is the last
# epoch that ends by then at the shortest epoch length (1 s): a larger number is a 422 whatever
# XPANDO_PAYOUT_EPOCH_S is; with longer epochs the ones in between are in the future (409).
LAST_TIMESTAMP = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
MAX_EPOCH = LAST_TIMESTAMP - 1
QUERY_TIMEOUT = timedelta(seconds=2)
# Approval is an update the saga's core worker must accept; with none polling, Temporal would
# hold the request indefinitely.
UPDATE_TIMEOUT = timedelta(seconds=10)
# The saga's memo entry naming who settled it through the API: {"key_id", "name"}.
SETTLED_BY = "settled_by"
EpochPath = Annotated[int, Path(ge=0, le=MAX_EPOCH, description="Epoch number")]
NodeIdPath = Annotated[
    str,
    Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
]
PAYOUT_STATUSES = r"^(prepared|signed|sent|confirmed|finalized|failed|carried_over)$"


def _links(settings: Settings, epoch: int) -> EpochLinks:
    base = settings.api_base
    return EpochLinks(
        self=f"{base}/v1/payouts/epochs/{epoch}",
        payouts=f"{base}/v1/payouts?epoch={epoch}",
        ui=settings.workflow_ui_url(epoch_workflow_id(epoch)),
    )


def _view(p: Payout) -> PayoutView:
    return PayoutView(
        payout_id=p.payout_id,
        epoch=p.epoch,
        node_id=p.node_id,
        wallet=p.wallet,
        points=p.points,
        earned=p.earned,
        carried_in=p.carried_in,
        amount=p.amount,
        status=p.status,
        reason=p.reason,
        carried_into=p.carried_into,
        signature=p.signature,
        signatures=list(p.signatures or []),
        attempts=p.attempts,
        slot=p.slot,
        error=p.error,
        created_at=_utc(p.created_at),
        signed_at=_utc(p.signed_at),
        sent_at=_utc(p.sent_at),
        confirmed_at=_utc(p.confirmed_at),
    )


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else ledger.utc(value)


@router.get(
    "",
    response_model=PayoutList,
    responses=responses(401, 403, 422),
    dependencies=[Depends(require(Scope.PAYOUTS_READ))],
)
async def list_payouts(
    session: SessionDep,
    node: Annotated[
        str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    ] = None,
    epoch: Annotated[int | None, Query(ge=0, le=MAX_EPOCH)] = None,
    status: Annotated[str | None, Query(pattern=PAYOUT_STATUSES)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> PayoutList:
    """Payouts, newest epoch first, with their transaction signatures."""
    rows, total = await ledger.list_payouts(
        session=session, node_id=node, epoch=epoch, status=status, limit=limit, offset=offset
    )
    return PayoutList(payouts=[_view(p) for p in rows], count=len(rows), total=total)


@router.get(
    "/epochs/{epoch}",
    response_model=EpochView,
    responses=responses(401, 403, 404, 422, 503),
    dependencies=[Depends(require(Scope.PAYOUTS_READ))],
)
async def get_epoch(
    epoch: EpochPath, session: SessionDep, client: TemporalClientDep, settings: SettingsDep
) -> EpochView:
    row = await ledger.get_epoch(session=session, epoch=epoch)
    if row is None:
        raise ApiError(404, "epoch_not_found", f"epoch {epoch} has not been closed")
    stage: str | None = None
    handle = client.get_workflow_handle_for(PayoutSagaWorkflow.run, epoch_workflow_id(epoch))
    try:
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            progress = await handle.query(PayoutSagaWorkflow.progress, rpc_timeout=QUERY_TIMEOUT)
            stage = progress.stage.value
    except RPCError:
        stage = None  # no such run any more, or no core worker to answer right now
    return EpochView(
        epoch=row.epoch,
        status=row.status,
        workflow_id=row.workflow_id,
        stage=stage,
        starts_at=_utc(row.starts_at),
        ends_at=_utc(row.ends_at),
        emission=row.emission,
        accruals=row.accruals,
        payouts=row.payouts,
        total=row.total,
        payable=row.payable,
        reserved=row.reserved,
        released=row.released,
        paid=row.paid,
        carried_over=row.carried_over,
        approval_required=row.approval_required,
        approver=row.approver,
        approved_at=_utc(row.approved_at),
        reconciled=row.reconciled,
        reconcile_report=row.reconcile_report or {},
        error=row.error,
        closed_at=_utc(row.closed_at),
        settled_at=_utc(row.settled_at),
        links=_links(settings, epoch),
    )


@router.post(
    "/epochs/{epoch}/settle",
    status_code=202,
    response_model=SettleAccepted,
    responses={
        200: {"model": SettleAccepted, "description": "The epoch's saga has already completed"},
        **responses(401, 403, 409, 422, 503),
    },
)
async def settle_epoch(
    epoch: EpochPath,
    principal: PayoutApprover,
    response: Response,
    client: TemporalClientDep,
    settings: SettingsDep,
) -> SettleAccepted:
    """Start the epoch's payout saga (idempotent: one saga per epoch; a failed one may be
    started again and resumes from the ledger). The saga remembers who settled it (its memo),
    so that another principal approves it (XPANDO_PAYOUT_APPROVAL_SEPARATE_KEY)."""
    current = rewards.epoch_of(datetime.now(UTC).timestamp(), settings.payout_epoch_s)
    if epoch >= current:
        _, end = rewards.epoch_bounds(epoch, settings.payout_epoch_s)
        ends = (
            f"at {datetime.fromtimestamp(end, UTC).isoformat()}"
            if end <= LAST_TIMESTAMP
            else "after the year 9999"
        )
        raise ApiError(
            409, "epoch_not_ended", f"epoch {epoch} ends {ends}; the current epoch is {current}"
        )
    workflow_id = epoch_workflow_id(epoch)
    handle: WorkflowHandle[PayoutSagaWorkflow, PayoutSagaResult]
    try:
        handle = await client.start_workflow(
            PayoutSagaWorkflow.run,
            PayoutSagaInput(epoch=epoch),
            id=workflow_id,
            task_queue=settings.core_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            memo={SETTLED_BY: {"key_id": principal.key_id, "name": principal.name}},
        )
    except WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle_for(PayoutSagaWorkflow.run, workflow_id)
    desc = await handle.describe()
    status = (desc.status or WorkflowExecutionStatus.RUNNING).name.lower()
    result: PayoutSagaResult | None = None
    if desc.status == WorkflowExecutionStatus.COMPLETED:
        result = await handle.result()
        response.status_code = 200
    elif desc.status == WorkflowExecutionStatus.RUNNING and desc.start_time is not None:
        started_now = (datetime.now(UTC) - desc.start_time).total_seconds() < 5
        status = "started" if started_now else "running"
    response.headers["Location"] = f"/v1/payouts/epochs/{epoch}"
    log.info("epoch settle requested", epoch=epoch, status=status)  # with the principal bound
    return SettleAccepted(
        epoch=epoch,
        workflow_id=workflow_id,
        status=status,
        result=result,
        links=_links(settings, epoch),
    )


@router.post(
    "/epochs/{epoch}/approve",
    response_model=ApproveResult,
    responses=responses(400, 401, 403, 404, 409, 413, 422, 503),
)
async def approve_epoch(
    epoch: EpochPath,
    principal: PayoutApprover,
    client: TemporalClientDep,
    settings: SettingsDep,
    body: Annotated[ApproveBody | None, Body()] = None,
) -> ApproveResult:
    """Approve an epoch whose total is above the approval threshold (a workflow update). The
    approver recorded is the key's principal."""
    handle = client.get_workflow_handle_for(PayoutSagaWorkflow.run, epoch_workflow_id(epoch))
    if settings.payout_approval_separate_key:
        await _refuse_the_settler(handle, epoch, principal)
    approval = ApproveInput(approver=principal.name, note=body.note if body else "")
    handle = client.get_workflow_handle_for(PayoutSagaWorkflow.run, epoch_workflow_id(epoch))
    try:
        result = await handle.execute_update(
            PayoutSagaWorkflow.approve, approval, rpc_timeout=UPDATE_TIMEOUT
        )
    except WorkflowUpdateRPCTimeoutOrCancelledError as err:
        raise ApiError(
            503,
            "core_unavailable",
            f"no core worker took the approval of epoch {epoch} within "
            f"{UPDATE_TIMEOUT.total_seconds():g}s; retry when the core worker runs",
        ) from err
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        raise ApiError(
            409, "not_awaiting_approval", getattr(cause, "message", None) or str(cause)
        ) from err
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            if "completed" in str(err).lower():
                raise ApiError(
                    409, "not_awaiting_approval", f"the saga of epoch {epoch} has finished"
                ) from err
            raise ApiError(
                404, "epoch_not_settling", f"no payout saga for epoch {epoch}; settle it first"
            ) from err
        raise
    log.info("epoch approved", epoch=epoch, approver=principal.name)
    return result


async def _refuse_the_settler(
    handle: WorkflowHandle[PayoutSagaWorkflow, PayoutSagaResult], epoch: int, approver: Principal
) -> None:
    """403 when the approver's key, or its principal, settled the epoch through the API."""
    try:
        desc = await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise ApiError(
                404, "epoch_not_settling", f"no payout saga for epoch {epoch}; settle it first"
            ) from err
        raise
    if desc.status != WorkflowExecutionStatus.RUNNING:
        return  # nothing to approve: the update says so (409)
    settler = (await desc.memo()).get(SETTLED_BY)
    if not isinstance(settler, dict):
        return  # started by the Schedule (or by hand in Temporal): no one to keep apart
    if approver.key_id == settler.get("key_id") or approver.name == settler.get("name"):
        raise ApiError(
            403,
            "separate_approver_required",
            f"epoch {epoch} was settled by {settler.get('name')!r} (key {settler.get('key_id')}); "
            "another principal's key with scope 'payouts:approve' must approve it "
            "(XPANDO_PAYOUT_APPROVAL_SEPARATE_KEY)",
        )


@earnings_router.get(
    "/{node_id}/earnings",
    response_model=EarningsView,
    responses=responses(401, 403, 404, 422),
    dependencies=[Depends(require(Scope.PAYOUTS_READ))],
)
async def node_earnings(
    node_id: NodeIdPath,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> EarningsView:
    """What a node has earned, been paid (with signatures), and is owed."""
    found = await ledger.earnings(session=session, node_id=node_id, limit=limit)
    if found is None:
        raise ApiError(404, "node_not_found", f"no node {node_id!r} and no earnings for it")
    return EarningsView(
        node_id=found.node_id,
        wallet=found.wallet,
        pending=PendingEarnings(
            accruals=found.pending_accruals, quality_ppm=found.pending_quality_ppm
        ),
        earned=found.earned,
        paid=found.paid,
        carried_over=found.carried_over,
        in_flight=found.in_flight,
        payouts=[_view(p) for p in found.payouts],
    )
