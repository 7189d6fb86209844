"""Registration activities: a node's signed registration, applied by the core."""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from xpando.contracts import RegisterNodeInput, RegisterNodeResult, node_task_queue
from xpando.db.errors import fail_fast
from xpando.identity import RegistrationRejected
from xpando.routing.registry import NodeRegistry
from xpando.temporal import NodeLiveness, heartbeating


class RegistrationActivities:
    """Run by NodeRegistrationWorkflow on the core worker (node workers hold no database)."""

    def __init__(self, *, registry: NodeRegistry, liveness: NodeLiveness) -> None:
        self._registry = registry
        self._liveness = liveness

    @activity.defn(name="register_node")
    async def register_node(self, input: RegisterNodeInput) -> RegisterNodeResult:
        """Apply a node's signed registration or deregistration (the same verification as
        ``POST /v1/nodes``); a refused one fails with the rejection's type, not retried, and so
        does one whose profile the database refuses (``xpando/db/errors.py``)."""
        if input.signed is None:
            raise ApplicationError(
                "unsigned node registration: a node registers with a request signed by its "
                "identity key (xpando/identity.py)",
                type="UnsignedRegistration",
                non_retryable=True,
            )
        info = activity.info()
        # Heartbeats: embedding the node's domains may take a while (a model loading).
        async with heartbeating():
            with fail_fast(f"register node {input.signed.node_id}"):  # a value the db refuses
                try:
                    done = await self._registry.apply_idempotent(
                        input.signed,
                        received_at=input.received_at,
                        origin=f"{info.workflow_id}/{info.workflow_run_id}",
                    )
                except RegistrationRejected as err:
                    raise ApplicationError(err.message, type=err.type, non_retryable=True) from err
        self._liveness.forget(node_task_queue(done.node_id))
        return RegisterNodeResult(
            node_id=done.node_id,
            created=done.created,
            registered_at=done.registered_at,
            action=done.action,
            public_key=done.public_key,
        )
