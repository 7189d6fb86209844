"""Knowledge activities: the domain's KnowledgeWorkflow consolidates its items through these."""

from __future__ import annotations

from temporalio import activity

from xpando.contracts import ConsolidateInput, ConsolidateResult
from xpando.mother.knowledge import Consolidator


class KnowledgeActivities:
    """Consolidation of a domain's knowledge (:class:`xpando.mother.knowledge.Consolidator`)."""

    def __init__(self, *, consolidator: Consolidator) -> None:
        self._consolidator = consolidator

    @activity.defn(name="consolidate_knowledge")
    async def consolidate(self, input: ConsolidateInput) -> ConsolidateResult:
        """Store new items, merge near-duplicates, mark stale ones; one transaction."""
        return await self._consolidator.consolidate(input)
