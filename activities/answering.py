"""The activity every expert node runs on its own task queue (``node.<node_id>``)."""

from __future__ import annotations

import asyncio
import time

from temporalio import activity
from temporalio.exceptions import ApplicationError

from xpando import metrics
from xpando.contracts import AnswerInput, Contribution, NodeProfile
from xpando.logs import get_logger
from xpando.providers.base import Provider, ProviderReply, ProviderRequest

log = get_logger(__name__)

HEARTBEAT_EVERY_S = 1.0


class AnsweringActivities:
    """Answers tasks through this node's provider, heartbeating so a dead worker is noticed
    within the heartbeat timeout and a cancelled task stops the provider call."""

    def __init__(
        self, *, profile: NodeProfile, provider: Provider, simulated_latency_ms: int = 0
    ) -> None:
        self._profile = profile
        self._provider = provider
        self._latency_s = simulated_latency_ms / 1000.0

    @activity.defn(name="answer")
    async def answer(self, input: AnswerInput) -> Contribution:
        if input.node_id != self._profile.node_id:
            raise ApplicationError(
                f"task for node {input.node_id!r} reached node {self._profile.node_id!r}",
                type="WrongNode",
                non_retryable=True,
            )
        info = activity.info()
        started = time.monotonic()
        log.info("answering", task_id=input.task_id, node_id=input.node_id, attempt=info.attempt)
        call = asyncio.ensure_future(self._call(input))
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=HEARTBEAT_EVERY_S)
                if done:
                    break
                activity.heartbeat()
        except asyncio.CancelledError:
            call.cancel()
            raise
        try:
            reply = call.result()
        except ApplicationError as err:
            metrics.record_answer(
                provider=self._provider.name,
                model=self._provider.model,
                status="failed",
                duration_s=time.monotonic() - started,
                error_type=err.type or "error",
            )
            # Classified by the provider (errors.py); the type and retryability go to Temporal.
            log.warning(
                "provider call failed",
                task_id=input.task_id,
                node_id=input.node_id,
                attempt=info.attempt,
                error_type=err.type,
                retryable=not err.non_retryable,
                error=err.message,
            )
            raise
        except Exception:
            metrics.record_answer(
                provider=self._provider.name,
                model=self._provider.model,
                status="failed",
                duration_s=time.monotonic() - started,
                error_type="error",
            )
            raise
        metrics.record_answer(
            provider=self._provider.name,
            model=reply.model,
            status=reply.status.value,
            duration_s=time.monotonic() - started,
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            cost_usd=reply.cost_usd,
        )
        return Contribution(
            node_id=self._profile.node_id,
            region=self._profile.region,
            provider=self._provider.name,
            model=reply.model,
            status=reply.status,
            answer=reply.text,
            citations=reply.citations,
            relevance=max(0.0, min(1.0, reply.relevance)),
            latency_ms=int((time.monotonic() - started) * 1000),
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            finish_reason=reply.finish_reason,
            attempts=info.attempt,
            cost_usd=reply.cost_usd,
            request_id=reply.request_id,
        )

    async def _call(self, input: AnswerInput) -> ProviderReply:
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        return await self._provider.answer(
            ProviderRequest(prompt=input.prompt, context=input.context)
        )
