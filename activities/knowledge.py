"""Knowledge activities: the domain's KnowledgeWorkflow consolidates its items through these."""

from __future__ import annotations

from temporalio import activity

from xpando.contracts import ConsolidateInput, ConsolidateResult
from xpando.db.errors import fail_fast
from xpando.mother.knowledge import Consolidator


class KnowledgeActivities:
    """Consolidation of a domain's knowledge (:class:`xpando.mother.knowledge.Consolidator`)."""

    def __init__(self, *, consolidator: Consolidator) -> None:
        self._consolidator = consolidator

    @activity.defn(name="consolidate_knowledge")
    async def consolidate(self, input: ConsolidateInput) -> ConsolidateResult:
        """Store new items, merge near-duplicates, mark stale ones. An item the database refuses
        is skipped and counted (``ConsolidateResult.skipped``); a refusal of the batch as a
        whole (the sweep) fails the step without a retry."""
        with fail_fast(f"consolidate the knowledge of {input.domain}"):
            return await self._consolidator.consolidate(input)
