"""KnowledgeWorkflow: one long-running entity per domain that consolidates the domain's knowledge.

Completed tasks send their answer here (``add`` signal, by signal-with-start). Items are
consolidated in batches by one activity at a time, so each domain has a single writer; a timer
sweeps for items whose confidence decayed. The run continues as new before its history grows
large, carrying its statistics and any items not yet consolidated.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, VersioningBehavior
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.knowledge import KnowledgeActivities
    from xpando.contracts import (
        ConsolidateInput,
        ConsolidateResult,
        KnowledgeItemInput,
        KnowledgeStats,
        KnowledgeWorkflowInput,
    )
    from xpando.db.errors import REFUSAL_TYPES

CONSOLIDATE_TIMEOUT = timedelta(minutes=2)
CONSOLIDATE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
SWEEP_EVERY = timedelta(hours=6)
SEEN_LIMIT = 2000  # task ids remembered to drop duplicate signals (signal-with-start retries)


# Auto-upgrade: one entity per domain lives for the network's whole life, so it cannot stay pinned
# to the version that started it; it moves to the current version at its next workflow task (a
# change to it that alters its commands needs workflow.patched — the one place that tool fits).
@workflow.defn(versioning_behavior=VersioningBehavior.AUTO_UPGRADE)
class KnowledgeWorkflow:
    def __init__(self) -> None:
        self._pending: list[KnowledgeItemInput] = []
        self._seen: list[str] = []
        self._stats: KnowledgeStats | None = None
        self._received = 0  # signals taken in this run (may arrive before run() starts)

    @workflow.run
    async def run(self, input: KnowledgeWorkflowInput) -> None:
        stats = input.stats or KnowledgeStats(domain=input.domain)
        self._stats = stats
        self._pending = [*input.pending, *self._pending]
        consolidations = 0
        # One sweep timer for the run (restarted when it fires), not one per batch.
        sweep_timer: asyncio.Task[None] | None = None
        while True:
            if sweep_timer is None or sweep_timer.done():
                sweep_timer = asyncio.create_task(workflow.sleep(SWEEP_EVERY))
            if not self._pending:
                arrived = asyncio.create_task(workflow.wait_condition(lambda: bool(self._pending)))
                await workflow.wait([arrived, sweep_timer], return_when=asyncio.FIRST_COMPLETED)
                arrived.cancel()
            sweep = sweep_timer.done()  # a batch due with the sweep does both
            batch = self._pending[: input.batch_size]
            self._pending = self._pending[input.batch_size :]
            # A core step on this worker's own queue: a local activity (no task round trip).
            try:
                result: ConsolidateResult = await workflow.execute_local_activity_method(
                    KnowledgeActivities.consolidate,
                    ConsolidateInput(domain=input.domain, items=batch, sweep=sweep),
                    start_to_close_timeout=CONSOLIDATE_TIMEOUT,
                    retry_policy=CONSOLIDATE_RETRY,
                )
            except (ActivityError, ApplicationError) as err:
                # The database refused the batch as a whole (items it refuses one by one are
                # skipped by the activity): skip it, so the domain's knowledge keeps growing.
                if not _refused(err):
                    raise
                workflow.logger.warning("knowledge batch refused, skipped: %s", err)
                result = ConsolidateResult(items=self._stats.items, skipped=len(batch))
            consolidations += 1
            self._stats = self._stats.model_copy(
                update={
                    "items": result.items,
                    "added": self._stats.added + result.added,
                    "merges": self._stats.merges + result.merged,
                    "stale": self._stats.stale + result.stale,
                    "skipped": self._stats.skipped + result.skipped,
                    "consolidations": self._stats.consolidations + 1,
                    "last_consolidation": workflow.now(),
                }
            )
            if (
                consolidations >= input.max_consolidations_per_run
                or workflow.info().is_continue_as_new_suggested()
            ):
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    KnowledgeWorkflowInput(
                        domain=input.domain,
                        stats=self.stats().model_copy(
                            update={"runs": self._stats.runs + 1, "pending": 0}
                        ),
                        pending=self._pending,
                        batch_size=input.batch_size,
                        max_consolidations_per_run=input.max_consolidations_per_run,
                    )
                )

    @workflow.signal
    def add(self, item: KnowledgeItemInput) -> None:
        if item.task_id in self._seen:
            return
        self._seen = [*self._seen[-(SEEN_LIMIT - 1) :], item.task_id]
        self._pending.append(item)
        self._received += 1

    @workflow.query
    def stats(self) -> KnowledgeStats:
        base = self._stats or KnowledgeStats(domain="")
        return base.model_copy(
            update={"received": base.received + self._received, "pending": len(self._pending)}
        )


def _refused(err: BaseException) -> bool:
    """A non-retryable refusal by the database (a local activity's error may be ``err``)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError):
            return cause.non_retryable and cause.type in REFUSAL_TYPES
        cause = cause.__cause__
    return False
