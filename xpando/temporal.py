"""Temporal client factory and the search attributes xpando uses."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from temporalio.api.enums.v1 import IndexedValueType, TaskQueueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from xpando.settings import Settings

# Custom search attributes (registered idempotently at start-up).
DOMAIN = SearchAttributeKey.for_keyword("XpandoDomain")
STATUS = SearchAttributeKey.for_keyword("XpandoStatus")
NODES = SearchAttributeKey.for_keyword_list("XpandoNodes")
SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[Any], ...] = (
    DOMAIN,
    STATUS,
    NODES,
)

_INDEXED_TYPE = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}


async def connect(settings: Settings, *, attempts: int = 1, delay_s: float = 0.5) -> Client:
    """Connect with the pydantic data converter, trying ``attempts`` times while it starts."""
    last: Exception | None = None
    for attempt in range(max(1, attempts)):
        try:
            return await Client.connect(
                settings.temporal_target,
                namespace=settings.temporal_namespace,
                data_converter=pydantic_data_converter,
                tls=settings.temporal_tls,
                api_key=(
                    settings.temporal_api_key.get_secret_value()
                    if settings.temporal_api_key
                    else None
                ),
            )
        except RuntimeError as err:  # connection refused while the server starts
            last = err
            if attempt + 1 < attempts:
                await asyncio.sleep(delay_s)
    assert last is not None
    raise last


async def ensure_search_attributes(client: Client) -> list[str]:
    """Register xpando's custom search attributes on the namespace; returns the names added."""
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    missing = {
        key.name: _INDEXED_TYPE["KeywordList" if key.name == NODES.name else "Keyword"]
        for key in SEARCH_ATTRIBUTES
        if key.name not in listed.custom_attributes
    }
    if not missing:
        return []
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
    except RPCError as err:  # a concurrent start registered them first
        if "already" not in str(err).lower():
            raise
    return sorted(missing)


class NodeLiveness:
    """Whether a node's worker is polling its task queue, read from Temporal itself.

    A live worker always holds a long poll open, so the server's ``last_access_time`` for it is
    never much older than one poll (about a minute). Answers are cached briefly so a burst of
    tasks does not turn into a burst of DescribeTaskQueue calls.
    """

    def __init__(self, client: Client, *, max_age_s: float, cache_s: float = 2.0) -> None:
        self._client = client
        self._max_age_s = max_age_s
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, bool]] = {}

    async def is_live(self, task_queue: str) -> bool:
        now = time.monotonic()
        cached = self._cache.get(task_queue)
        if cached and now - cached[0] < self._cache_s:
            return cached[1]
        resp = await self._client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=self._client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            )
        )
        wall = datetime.now(UTC).timestamp()
        live = any(
            wall - p.last_access_time.ToDatetime(tzinfo=UTC).timestamp() <= self._max_age_s
            for p in resp.pollers
        )
        self._cache[task_queue] = (now, live)
        return live

    def forget(self, task_queue: str) -> None:
        self._cache.pop(task_queue, None)


def initial_task_attributes(domain: str | None) -> TypedSearchAttributes:
    """Search attributes a task starts with, so it is findable before its first step."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(DOMAIN, domain or "general"),
            SearchAttributePair(STATUS, "running"),
        ]
    )
