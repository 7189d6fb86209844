"""Fake experts for tests that run TaskWorkflow without providers (the activity keeps its real
name, ``answer``)."""

from __future__ import annotations

import asyncio

from temporalio import activity

from tests.fakes.networks import answered
from xpando.contracts import AnswerInput, Contribution


class HangingPanel:
    """``quick`` nodes answer at once; the others work, heartbeating, until cancelled, and say
    so in ``cancelled`` (what a cancelled task must do to the experts still answering)."""

    def __init__(self, quick: set[str]) -> None:
        self.cancelled: list[str] = []

        @activity.defn(name="answer")
        async def answer(input: AnswerInput) -> Contribution:
            if input.node_id not in quick:
                try:
                    while True:
                        activity.heartbeat()
                        await asyncio.sleep(0.1)
                except asyncio.CancelledError:
                    self.cancelled.append(input.node_id)
                    raise
            return answered(input.node_id, f"answered by {input.node_id}")

        self.answer = answer
