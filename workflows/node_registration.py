"""NodeRegistrationWorkflow: a node worker registers its profile through the core.

Node workers hold no database credentials; they only talk to Temporal. Registration is a short
workflow on the core queue, so it is durable (a node that starts before the core is registered
as soon as the core runs) and idempotent (the id is the node id plus a hash of its profile).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.core import CoreActivities
    from xpando.contracts import RegisterNodeInput, RegisterNodeResult

REGISTER_TIMEOUT = timedelta(seconds=30)
REGISTER_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30))


@workflow.defn
class NodeRegistrationWorkflow:
    @workflow.run
    async def run(self, input: RegisterNodeInput) -> RegisterNodeResult:
        return await workflow.execute_activity_method(
            CoreActivities.register_node,
            input,
            start_to_close_timeout=REGISTER_TIMEOUT,
            retry_policy=REGISTER_RETRY,
        )
