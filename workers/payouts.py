"""Wiring of the payout saga into the core worker: its activities and its Temporal Schedule."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.payouts import PayoutActivities
from workflows.payout import PayoutSagaWorkflow
from xpando.chain import ChainHandle
from xpando.contracts_payouts import PayoutSagaInput
from xpando.db import SessionFactory
from xpando.economy.payments import PayoutConfig, PayoutHooks
from xpando.logs import get_logger
from xpando.settings import Settings

log = get_logger(__name__)

TICK_WORKFLOW_ID = "payout-tick"


def build_payout_activities(
    *,
    sessions: SessionFactory,
    settings: Settings,
    chain: ChainHandle | None = None,
    hooks: PayoutHooks | None = None,
) -> PayoutActivities:
    return PayoutActivities(
        sessions=sessions,
        chain=chain or ChainHandle(settings),
        config=PayoutConfig.from_settings(settings),
        hooks=hooks,
    )


def payout_activity_methods(payouts: PayoutActivities) -> list[Callable[..., Any]]:
    return [
        payouts.due_epochs,
        payouts.close_epoch,
        payouts.reserve,
        payouts.record_approval,
        payouts.pay_batch,
        payouts.compensate,
        payouts.reconcile,
        payouts.finish,
    ]


def schedule_id(settings: Settings) -> str:
    return f"xpando-payouts.{settings.core_task_queue}"


async def ensure_payout_schedule(client: Client, settings: Settings) -> str | None:
    """Create the payout Schedule, or bring an existing one in line with the settings
    (idempotent; safe when several core workers start at once). Period 0 removes it."""
    sid = schedule_id(settings)
    handle = client.get_schedule_handle(sid)
    if settings.payout_schedule_s == 0:
        try:
            await handle.delete()
            log.info("payout schedule removed", schedule_id=sid)
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        return None
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            PayoutSagaWorkflow.run,
            PayoutSagaInput(epoch=None),
            id=TICK_WORKFLOW_ID,
            task_queue=settings.core_task_queue,
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.payout_schedule_s))]
        ),
        policy=SchedulePolicy(catchup_window=timedelta(hours=1)),
    )
    try:
        try:
            await client.create_schedule(sid, schedule)
            log.info("payout schedule created", schedule_id=sid, every_s=settings.payout_schedule_s)
        except ScheduleAlreadyRunningError:

            def updated(_: ScheduleUpdateInput) -> ScheduleUpdate:
                return ScheduleUpdate(schedule=schedule)

            await handle.update(updated)
    except RPCError as err:
        # Payouts can still be settled over the API; the worker must not fail to start.
        log.error("payout schedule not set up", schedule_id=sid, error=str(err))
        return None
    return sid
