"""NodeRegistrationWorkflow: a node worker registers (or deregisters) through the core.

Node workers hold no database credentials; they only talk to Temporal. Registration is a short
workflow on the core queue, so it is durable (a node that starts before the core is registered
as soon as the core runs) and idempotent (the id is derived from the signed request). The
request is signed by the node's identity key and verified by the ``register_node`` activity with
the same code as ``POST /v1/nodes``; its timestamp is checked against the time this workflow
started, i.e. when Temporal accepted the request, not when the core got round to it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.registration import RegistrationActivities
    from xpando.contracts import RegisterNodeInput, RegisterNodeResult

# Registering may embed the node's domains first (a model in a thread, or a provider call), so
# the step heartbeats while it runs: a core worker that dies during it is noticed within
# REGISTER_HEARTBEAT; the start-to-close timeout only bounds one that hangs.
REGISTER_TIMEOUT = timedelta(seconds=30)
REGISTER_HEARTBEAT = timedelta(seconds=5)
REGISTER_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30))


@workflow.defn
class NodeRegistrationWorkflow:
    @workflow.run
    async def run(self, input: RegisterNodeInput) -> RegisterNodeResult:
        if input.signed is not None and input.received_at is None:
            input = input.model_copy(update={"received_at": workflow.info().start_time})
        try:
            return await workflow.execute_activity_method(
                RegistrationActivities.register_node,
                input,
                start_to_close_timeout=REGISTER_TIMEOUT,
                heartbeat_timeout=REGISTER_HEARTBEAT,
                retry_policy=REGISTER_RETRY,
            )
        except ActivityError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.non_retryable:
                # Refused (InvalidSignature, NonceReused, NodeKeyMismatch, ...): the workflow
                # fails with the same type, so the node sees why.
                raise ApplicationError(cause.message, type=cause.type, non_retryable=True) from err
            raise
