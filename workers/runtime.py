"""Shared plumbing for long-running worker processes."""

from __future__ import annotations

import asyncio
import signal
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from temporalio.api.workflowservice.v1 import (
    DescribeWorkerDeploymentRequest,
    SetWorkerDeploymentCurrentVersionRequest,
)
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError
from temporalio.worker import Worker, WorkerDeploymentConfig

from xpando.logs import get_logger

log = get_logger(__name__)


def stop_on_signals(stop: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Call ``stop`` once on SIGINT or SIGTERM (the process then exits when its run ends)."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    def _handler() -> None:
        if not tasks:
            tasks.append(loop.create_task(stop()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _handler)


# --- Worker Deployment versions ---------------------------------------------------------------

# The core worker's deployment is named after its task queue (XPANDO_CORE_TASK_QUEUE, so two
# networks sharing a namespace roll out apart). Node workers report a version of this one but
# are not routed by it: a deployment has one current version for all its queues (rolling one
# node to a new build would strand every other node), and a version holds about a hundred task
# queues by default, far fewer than a network's nodes. A node's queue has only its own workers.
NODE_DEPLOYMENT = "xpando-node"
# How long a promoting worker waits for the server to know its version (it learns it from the
# worker's first poll, usually within a fraction of a second).
PROMOTE_WITHIN_S = 20.0


def deployment_config(
    deployment: str, build_id: str, *, routed: bool = True
) -> WorkerDeploymentConfig:
    """Poll as ``deployment``'s version ``build_id``; workflows are pinned to the version that
    started them (a new version never replays an old run) unless their definition says
    otherwise (KnowledgeWorkflow auto-upgrades). ``routed=False``: the worker reports its
    version (``temporal worker list``) but takes its queue's tasks whatever is current."""
    return WorkerDeploymentConfig(
        version=WorkerDeploymentVersion(deployment_name=deployment, build_id=build_id),
        use_worker_versioning=routed,
        default_versioning_behavior=(
            VersioningBehavior.PINNED if routed else VersioningBehavior.UNSPECIFIED
        ),
    )


# What each client has promoted (held weakly: a client's id may be reused once it is gone).
_promoted: weakref.WeakKeyDictionary[Client, set[tuple[str, str]]] = weakref.WeakKeyDictionary()


async def promote_version(client: Client, deployment: str, build_id: str) -> None:
    """Make ``build_id`` the current version of ``deployment`` (new runs and every task queue of
    the version go to it; pinned runs stay on theirs). Done once per process and version; a
    version already current is left alone. Retried while the server does not know the version
    yet (it learns it from a worker's poll)."""
    key = (deployment, build_id)
    done = _promoted.setdefault(client, set())
    if key in done:
        return
    deadline = time.monotonic() + PROMOTE_WITHIN_S
    while True:
        try:
            described = await client.workflow_service.describe_worker_deployment(
                DescribeWorkerDeploymentRequest(
                    namespace=client.namespace, deployment_name=deployment
                )
            )
            current = described.worker_deployment_info.routing_config.current_deployment_version
            if current.build_id != build_id:
                await client.workflow_service.set_worker_deployment_current_version(
                    SetWorkerDeploymentCurrentVersionRequest(
                        namespace=client.namespace,
                        deployment_name=deployment,
                        build_id=build_id,
                        identity="xpando",
                    )
                )
                log.info("deployment version promoted", deployment=deployment, build_id=build_id)
            done.add(key)
            return
        except RPCError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"could not make {deployment}/{build_id} the current version: {err}"
                ) from err
            await asyncio.sleep(0.05)


class VersionedWorker(Worker):
    """A Worker that polls as a Worker Deployment version and, with ``promote``, makes that
    version current once the server knows it: what ``xpando dev``, the tests and a small
    deployment want. A production rollout sets ``XPANDO_WORKER_PROMOTE=false`` and moves the
    current version itself (``temporal worker deployment set-current-version``, see README)."""

    def __init__(
        self,
        client: Client,
        *,
        deployment: str,
        build_id: str,
        promote: bool = True,
        routed: bool = True,
        **options: Any,
    ) -> None:
        config = deployment_config(deployment, build_id, routed=routed)
        super().__init__(client, deployment_config=config, **options)
        self._deployment = deployment
        self._build_id = build_id
        self._promote = promote and routed

    async def __aenter__(self) -> Worker:
        await super().__aenter__()
        if self._promote:  # so the caller's first workflow is dispatched to this version
            await promote_version(self.client, self._deployment, self._build_id)
        return self

    async def run(self) -> None:
        promoting = (
            asyncio.create_task(promote_version(self.client, self._deployment, self._build_id))
            if self._promote
            else None
        )
        if promoting is not None:
            promoting.add_done_callback(_log_promotion)
        try:
            await super().run()
        finally:
            if promoting is not None:
                promoting.cancel()


def _log_promotion(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("deployment version not promoted", error=str(task.exception()))
