"""Temporal client factory, the search attributes xpando uses, and activity heartbeats."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from pydantic import ValidationError
from temporalio import activity
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import IndexedValueType, TaskQueueType, WorkerStatus
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest, ListWorkersRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
)
from temporalio.exceptions import ApplicationError
from temporalio.runtime import Runtime
from temporalio.service import RPCError

from xpando import telemetry
from xpando.contracts import INVALID_TEXT, INVALID_TEXT_TYPE
from xpando.logs import get_logger
from xpando.payload_codec import EncryptedPayloadRefusal, PayloadCipher
from xpando.settings import Settings

log = get_logger(__name__)

# Custom search attributes (registered idempotently at start-up).
DOMAIN = SearchAttributeKey.for_keyword("XpandoDomain")
STATUS = SearchAttributeKey.for_keyword("XpandoStatus")
NODES = SearchAttributeKey.for_keyword_list("XpandoNodes")
# The name of the principal that submitted the task (never its key): set when it starts.
OWNER = SearchAttributeKey.for_keyword("XpandoOwner")
SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[Any], ...] = (
    DOMAIN,
    STATUS,
    NODES,
    OWNER,
)

_INDEXED_TYPE = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}


class _JSONPayloadConverter(PydanticJSONPlainPayloadConverter):
    """Pydantic's JSON payload converter, except that a payload its contract refuses (e.g. a
    workflow started by hand with ``temporal workflow start`` and a misspelt field, or a
    ``CleanText`` field with a control character) raises a non-retryable ApplicationError —
    ``InvalidText`` when only text was refused, else ``InvalidInput`` — naming what is wrong.
    The SDK lets that fail the workflow (or reject the update) that received it; left a plain
    decoding error it would fail the workflow task, which then retries until the end of time.
    Pinned Worker Deployment versions mean a run is only ever decoded by the build that
    started it, so a refusal here is the input's fault, not a rollout's."""

    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        try:
            return super().from_payload(payload, type_hint)
        except ValidationError as err:
            text_only = all(e["type"] == INVALID_TEXT for e in err.errors())
            where = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}"
                for e in err.errors()[:10]
            )
            raise ApplicationError(
                f"refused {err.title}: {where}",
                type=INVALID_TEXT_TYPE if text_only else INVALID_INPUT_TYPE,
                non_retryable=True,
            ) from err


# A payload its contract refuses for anything but text (a missing or misspelt field, a value
# out of range).
INVALID_INPUT_TYPE = "InvalidInput"


class PayloadConverter(CompositePayloadConverter):
    """The SDK's default converters with :class:`_JSONPayloadConverter` for JSON, and last (so
    it costs nothing when writing) one that refuses an encrypted payload, typed, when this
    process has no key to decrypt it (:class:`~xpando.payload_codec.EncryptedPayloadRefusal`)."""

    def __init__(self) -> None:
        json_converter = _JSONPayloadConverter()
        super().__init__(
            *(
                json_converter if isinstance(c, JSONPlainPayloadConverter) else c
                for c in DefaultPayloadConverter.default_encoding_payload_converters
            ),
            EncryptedPayloadRefusal(),
        )


# xpando's data converter without a payload codec: what a process without XPANDO_PAYLOAD_KEY
# uses (see data_converter_for).
data_converter = DataConverter(payload_converter_class=PayloadConverter)


def data_converter_for(settings: Settings) -> DataConverter:
    """What every client and worker of xpando uses (workers take their client's): the data
    converter above, with the AES-GCM payload codec when ``XPANDO_PAYLOAD_KEY`` holds keys."""
    keys = settings.payload_keys
    if keys is None:
        return data_converter
    return dataclasses.replace(data_converter, payload_codec=PayloadCipher(keys))


class TemporalUnreachable(RuntimeError):
    """No Temporal frontend answered at the configured address (after every attempt)."""


async def connect(
    settings: Settings, *, attempts: int = 1, delay_s: float = 0.5, runtime: Runtime | None = None
) -> Client:
    """Connect with xpando's data converter (:func:`data_converter_for`: with the payload codec
    when a payload key is set; and, while tracing is on, the tracing interceptor,
    which the client's workers inherit), trying ``attempts`` times while it starts; raises
    :class:`TemporalUnreachable` naming the address when every attempt failed."""
    runtime = runtime or metrics_runtime()
    converter = data_converter_for(settings)
    last: Exception | None = None
    for attempt in range(max(1, attempts)):
        try:
            return await Client.connect(
                settings.temporal_target,
                namespace=settings.temporal_namespace,
                data_converter=converter,
                interceptors=telemetry.client_interceptors(),
                runtime=runtime,
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
    raise TemporalUnreachable(
        f"cannot reach Temporal at {settings.temporal_target}: {last}"
    ) from last


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


@dataclass(frozen=True)
class WorkerBeat:
    """What the latest worker heartbeats say about one task queue."""

    running: bool  # some worker on it sent a RUNNING heartbeat within max_age
    stopped: bool  # no running worker, and the latest heartbeat said it was shutting down
    at: float  # wall-clock seconds of the latest heartbeat
    used_slots: int = 0  # activity slots in use / free on the running workers
    free_slots: int = 0
    stopped_identities: frozenset[str] = frozenset()  # identities of the workers that stopped

    @property
    def load(self) -> float:
        total = self.used_slots + self.free_slots
        return self.used_slots / total if self.running and total > 0 else 0.0


HEARTBEAT_EVERY_S = 1.0


@asynccontextmanager
async def heartbeating() -> AsyncIterator[None]:
    """Heartbeat every second while an activity's body runs, so a worker that dies during a long
    step is noticed within the step's ``heartbeat_timeout`` and a slow call (an RPC, a scan, a
    model loading in a thread) does not look like a dead worker. It shows the worker is alive,
    not that the step progresses: the step's start-to-close timeout bounds that."""

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


# A worker that said it stopped may still show a poll ending a moment later; one with the same
# identity polling this long after its stop is a restart.
RESTART_GRACE_S = 10.0
STOPPED_STATUSES = (WorkerStatus.WORKER_STATUS_SHUTTING_DOWN, WorkerStatus.WORKER_STATUS_SHUTDOWN)

_RUNTIMES: dict[float, Runtime] = {}
_metrics_runtime: Runtime | None = None


def heartbeat_runtime(interval_s: float) -> Runtime:
    """A Temporal runtime whose workers send a heartbeat every ``interval_s`` seconds (what
    ``NodeLiveness`` sweeps). One per interval per process, kept for the process's life; the
    first built after ``telemetry.want_sdk_metrics()`` exports the SDK's metrics."""
    runtime = _RUNTIMES.get(interval_s)
    if runtime is None:
        runtime = _RUNTIMES[interval_s] = Runtime(
            telemetry=telemetry.temporal_telemetry(),
            worker_heartbeat_interval=timedelta(seconds=interval_s),
        )
    return runtime


def metrics_runtime() -> Runtime | None:
    """The runtime of a client that names none: the SDK's default, unless this process wants
    the SDK's metrics and no runtime exports them yet (then one that does, kept for the
    process's life)."""
    global _metrics_runtime
    if _metrics_runtime is None and telemetry.sdk_metrics_wanted():
        _metrics_runtime = Runtime(telemetry=telemetry.temporal_telemetry())
    return _metrics_runtime


class NodeLiveness:
    """Whether a node's worker is polling its task queue, read from Temporal itself.

    Two sources, cheapest first:

    1. **Worker heartbeats** (``ListWorkers``; Temporal server ≥ 1.29, SDK worker heartbeating).
       With ``sweep_s`` set, one paged ``ListWorkers`` call at most every ``sweep_s`` seconds
       lists every node worker of the namespace (``TaskQueue STARTS_WITH "node."``): a queue with
       a fresh RUNNING heartbeat is live without any per-node call, whatever the number of nodes;
       a worker that shuts down sends a last heartbeat saying so, so a stopped node is dead from
       the next sweep on (unless a poller of another identity, or of the same one well after
       the stop, shows it was restarted).
    2. **Pollers** (``DescribeTaskQueue``, per queue, cached ``cache_s``): for a queue without a
       heartbeat yet (a worker sends its first one a heartbeat interval after it starts), or
       whose heartbeats went stale (a killed process). A live worker always holds a long poll
       open, so its ``last_access_time`` is never much older than one poll (about a minute);
       a process killed with SIGKILL therefore still looks live for up to ``max_age_s``.

    Routing asks only about its top candidates, so even the fallback costs a handful of calls
    per decision, not one per registered node.
    """

    def __init__(
        self,
        client: Client,
        *,
        max_age_s: float,
        cache_s: float = 2.0,
        sweep_s: float | None = None,
        prefix: str = "node.",
    ) -> None:
        self._client = client
        self._max_age_s = max_age_s
        self._cache_s = cache_s
        self._sweep_s = sweep_s
        self._prefix = prefix
        self._cache: dict[str, tuple[float, list[tuple[str, float]]]] = {}
        self._beats: dict[str, WorkerBeat] = {}
        self._swept_at = -math.inf
        self._sweep_lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self.sweeps = 0
        self.describes = 0

    # --- heartbeats ----------------------------------------------------------------------------

    async def sweep(self) -> int:
        """List every node worker's latest heartbeat; returns the queues seen."""
        beats: dict[str, list[Any]] = {}
        token = b""
        while True:
            resp = await self._client.workflow_service.list_workers(
                ListWorkersRequest(
                    namespace=self._client.namespace,
                    page_size=1000,
                    next_page_token=token,
                    query=f'TaskQueue STARTS_WITH "{self._prefix}"',
                )
            )
            for info in resp.workers_info:
                hb = info.worker_heartbeat
                if hb.task_queue.startswith(self._prefix):
                    beats.setdefault(hb.task_queue, []).append(hb)
            token = resp.next_page_token
            if not token:
                break
        wall = time.time()
        summary: dict[str, WorkerBeat] = {}
        for queue, hbs in beats.items():
            running = [
                hb
                for hb in hbs
                if hb.status == WorkerStatus.WORKER_STATUS_RUNNING
                and wall - hb.heartbeat_time.ToDatetime(tzinfo=UTC).timestamp() <= self._max_age_s
            ]
            latest = max(hbs, key=lambda hb: hb.heartbeat_time.ToDatetime(tzinfo=UTC))
            summary[queue] = WorkerBeat(
                running=bool(running),
                stopped=not running and latest.status in STOPPED_STATUSES,
                at=latest.heartbeat_time.ToDatetime(tzinfo=UTC).timestamp(),
                used_slots=sum(hb.activity_task_slots_info.current_used_slots for hb in running),
                free_slots=sum(
                    hb.activity_task_slots_info.current_available_slots for hb in running
                ),
                stopped_identities=frozenset(
                    hb.worker_identity for hb in hbs if hb.status in STOPPED_STATUSES
                ),
            )
        self.observe(summary)
        self.sweeps += 1
        return len(summary)

    def observe(self, beats: dict[str, WorkerBeat]) -> None:
        """Take a sweep's result (``sweep`` calls this; benchmarks feed it synthetic sweeps)."""
        self._beats = beats
        self._swept_at = time.monotonic()

    async def _maybe_sweep(self) -> None:
        """Sweep when the last one is ``sweep_s`` old: in the background while it is younger
        than twice that (the caller goes on with the last sweep: at 10,000 nodes a sweep takes
        about a second), in line when older (nobody routed for a while: no stale answer)."""
        if self._sweep_s is None:
            return
        age = time.monotonic() - self._swept_at
        if age < self._sweep_s:
            return
        if age < 2 * self._sweep_s:
            if self._background is None or self._background.done():
                self._background = asyncio.create_task(self._sweep_once())
            return
        await self._sweep_once()

    async def _sweep_once(self) -> None:
        async with self._sweep_lock:
            if self._sweep_s is not None and time.monotonic() - self._swept_at < self._sweep_s:
                return
            try:
                await self.sweep()
            except (RPCError, RuntimeError) as err:  # e.g. a server without worker heartbeats
                log.warning("listing worker heartbeats failed; using pollers", error=str(err))
                self._beats = {}
                self._swept_at = time.monotonic()

    def _sweep_fresh(self) -> bool:
        return self._sweep_s is not None and (
            time.monotonic() - self._swept_at <= max(3 * self._sweep_s, self._sweep_s + 1.0)
        )

    def beat(self, task_queue: str) -> WorkerBeat | None:
        return self._beats.get(task_queue) if self._sweep_fresh() else None

    def load(self, task_queue: str) -> float:
        """Share of the node's activity slots in use at its last heartbeat (0 when unknown)."""
        beat = self.beat(task_queue)
        return beat.load if beat is not None else 0.0

    # --- verdicts ------------------------------------------------------------------------------

    async def is_live(self, task_queue: str) -> bool:
        await self._maybe_sweep()
        beat = self.beat(task_queue)
        if beat is not None and beat.running:
            return True
        return await self._polled(task_queue, stopped=beat if beat and beat.stopped else None)

    async def are_live(self, task_queues: list[str]) -> dict[str, bool]:
        """:meth:`is_live` of many queues: those with a fresh RUNNING heartbeat at once, the
        rest concurrently."""
        await self._maybe_sweep()
        out: dict[str, bool] = {}
        ask: list[str] = []
        for queue in task_queues:
            beat = self.beat(queue)
            if beat is not None and beat.running:
                out[queue] = True
            else:
                ask.append(queue)
        if ask:
            flags = await asyncio.gather(*(self.is_live(q) for q in ask))
            out.update(zip(ask, flags, strict=True))
        return out

    async def _polled(self, task_queue: str, *, stopped: WorkerBeat | None) -> bool:
        """Some poller accessed the queue within ``max_age``. After a worker said it stopped,
        its own pollers count only if they came back well after (``RESTART_GRACE_S``: the
        stopping worker's last poll can still end a moment after its last heartbeat)."""
        now = time.monotonic()
        cached = self._cache.get(task_queue)
        if cached and now - cached[0] < self._cache_s:
            pollers = cached[1]
        else:
            self.describes += 1
            resp = await self._client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=self._client.namespace,
                    task_queue=TaskQueue(name=task_queue),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
                )
            )
            pollers = [
                (p.identity, p.last_access_time.ToDatetime(tzinfo=UTC).timestamp())
                for p in resp.pollers
            ]
            self._cache[task_queue] = (now, pollers)
        wall = time.time()
        return any(
            wall - at <= self._max_age_s
            and (
                stopped is None
                or identity not in stopped.stopped_identities
                or at > stopped.at + RESTART_GRACE_S
            )
            for identity, at in pollers
        )

    def forget(self, task_queue: str) -> None:
        self._cache.pop(task_queue, None)


def initial_task_attributes(domain: str | None, owner: str | None = None) -> TypedSearchAttributes:
    """Search attributes a task starts with, so it is findable before its first step (by its
    owner too, when a principal submitted it)."""
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(DOMAIN, domain or "general"),
        SearchAttributePair(STATUS, "running"),
    ]
    if owner is not None:
        pairs.append(SearchAttributePair(OWNER, owner))
    return TypedSearchAttributes(pairs)
