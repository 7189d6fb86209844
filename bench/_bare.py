"""The bare-Temporal baseline of ``bench.routing``: a workflow of the same shape as TaskWorkflow's
fan-out — five activities in parallel on a node queue, then one more — with nothing else."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel
from temporalio import activity, workflow

TIMEOUT = timedelta(seconds=30)


class BareInput(BaseModel):
    prompt: str
    node_queue: str


class BareAnswer(BaseModel):
    text: str


@activity.defn(name="bare_answer")
async def bare_answer(prompt: str) -> BareAnswer:
    return BareAnswer(text=f"an answer to {prompt[:50]}")


@activity.defn(name="bare_record")
async def bare_record(answers: list[BareAnswer]) -> int:
    return len(answers)


@workflow.defn
class BareWorkflow:
    @workflow.run
    async def run(self, input: BareInput) -> int:
        answers = await asyncio.gather(
            *(
                workflow.execute_activity(
                    bare_answer,
                    input.prompt,
                    task_queue=input.node_queue,
                    start_to_close_timeout=TIMEOUT,
                )
                for _ in range(5)
            )
        )
        return await workflow.execute_activity(
            bare_record, list(answers), start_to_close_timeout=TIMEOUT
        )
