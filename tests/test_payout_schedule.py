"""The Temporal Schedule that settles ended epochs: created idempotently, kept in line with the
settings, and its tick starts one saga per due epoch (real dev server, real core worker)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from temporalio.client import (
    Client,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
)
from temporalio.service import RPCError

from tests.conftest import wait_for
from tests.payout_support import accrue, fresh_epoch, payout_settings, register_nodes
from tests.test_payout_saga import core_worker, record_history
from workers.payouts import ensure_payout_schedule, schedule_id
from workflows.payout import PayoutSagaWorkflow
from xpando.chain import init_embedded_chain
from xpando.contracts_payouts import PayoutStage, epoch_workflow_id
from xpando.db import SessionFactory
from xpando.settings import Settings


async def test_the_schedule_is_created_once_and_its_tick_settles_every_due_epoch(
    client: Client, settings: Settings, sessions: SessionFactory
) -> None:
    s = payout_settings(settings, payout_schedule_s=3600)
    init_embedded_chain(s)
    assert await ensure_payout_schedule(client, s) == schedule_id(s)
    await ensure_payout_schedule(client, s)  # a second core worker starting: no error
    handle = client.get_schedule_handle(schedule_id(s))
    slower = s.model_copy(update={"payout_schedule_s": 7200})
    await ensure_payout_schedule(client, slower)  # the period setting changed
    desc = await handle.describe()
    assert desc.schedule.spec.intervals[0].every == timedelta(seconds=7200)
    action = desc.schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow)
    assert action.workflow == "PayoutSagaWorkflow" and action.task_queue == s.core_task_queue

    nodes = await register_nodes(sessions, 2)
    first = fresh_epoch()
    await accrue(sessions, first, {n.node_id: 0.5 for n in nodes})
    await accrue(sessions, first + 2, {nodes[0].node_id: 0.9})
    try:
        async with core_worker(client, s, sessions):
            await handle.trigger()

            async def ticked() -> bool:
                return bool((await handle.describe()).info.recent_actions)

            await wait_for(ticked, timeout=30)
            started = (await handle.describe()).info.recent_actions[0].action
            assert isinstance(started, ScheduleActionExecutionStartWorkflow)
            tick_id = started.workflow_id
            tick = client.get_workflow_handle_for(PayoutSagaWorkflow.run, tick_id)
            ticked_result = await tick.result()
            await record_history(tick, "payout_saga_tick")
            settled = [
                await client.get_workflow_handle_for(
                    PayoutSagaWorkflow.run, epoch_workflow_id(e)
                ).result()
                for e in (first, first + 2)
            ]
    finally:
        await ensure_payout_schedule(client, s.model_copy(update={"payout_schedule_s": 0}))
    assert ticked_result.stage == PayoutStage.SCHEDULED
    assert ticked_result.started == [first, first + 2]
    assert [r.stage for r in settled] == [PayoutStage.SETTLED, PayoutStage.SETTLED]
    assert [r.paid for r in settled] == [2, 1]
    with pytest.raises(RPCError):  # a period of 0 removed the schedule
        await handle.describe()
