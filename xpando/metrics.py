"""xpando's Prometheus metrics: one catalogue, recorded where the value is known.

A value known only in a workflow is recorded by the activity that knows it: a task's outcome and
latency by ``record`` (the task's last step), knowledge reuse by ``plan_route``, an expert's
answer, tokens and cost by the node's ``answer``. Each process exposes what it recorded (the
API at ``/metrics``, a worker on ``XPANDO_METRICS_PORT``); Prometheus sums the processes.

Labels are bounded: no task, workflow or node id is ever a label. A node is a label nowhere (a
network of 10,000 nodes would be 10,000 series per metric): a node's figures are its own
process's, and the breakers of all nodes are counted by state. Free-form values that a caller
or an operator chooses (a task's domain, a model name) keep their first
:data:`DISTINCT_VALUES` values and fold the rest into ``other``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DISTINCT_VALUES = 64
OTHER = "other"
# Seconds: a task takes from tens of milliseconds (knowledge reuse) to minutes (slow models).
TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
PROVIDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
ROUTING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class BoundedLabel:
    """A label's values as they come, up to ``limit`` distinct ones; later ones are ``other``."""

    def __init__(self, limit: int = DISTINCT_VALUES) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = value or "none"
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER


domain_label = BoundedLabel()
model_label = BoundedLabel()

# --- tasks (core worker: record; API: submissions) ---------------------------------------------

TASKS = Counter(
    "xpando_tasks",
    "Tasks recorded, by outcome (completed, failed) and domain",
    ["outcome", "domain"],
)
TASK_DURATION = Histogram(
    "xpando_task_duration_seconds",
    "From the workflow's start to its record, by outcome",
    ["outcome"],
    buckets=TASK_BUCKETS,
)
TASKS_ANSWERED_FROM_KNOWLEDGE = Counter(
    "xpando_tasks_answered_from_knowledge", "Completed tasks answered from stored knowledge"
)
TASKS_SUBMITTED = Counter("xpando_tasks_submitted", "Tasks the API started (or found started)")
KNOWLEDGE_PLANS = Counter(
    "xpando_knowledge_plans",
    "Plans by what stored knowledge decided: reused (answered the task), confirm (a related "
    "item: fewer experts asked first), none (the full panel)",
    ["decision"],
)

# --- routing (core worker) ---------------------------------------------------------------------

ROUTING_DURATION = Histogram(
    "xpando_routing_decision_seconds",
    "One routing decision, by outcome (routed, no_experts, error)",
    ["outcome"],
    buckets=ROUTING_BUCKETS,
)

# --- experts and providers (node workers) ------------------------------------------------------

EXPERT_ANSWERS = Counter(
    "xpando_expert_answers",
    "Answers of this process's experts by provider and status (ok, no_answer, failed)",
    ["provider", "status"],
)
PROVIDER_ERRORS = Counter(
    "xpando_provider_errors",
    "Failed provider calls by provider and error type (ProviderRateLimited, ...)",
    ["provider", "error_type"],
)
PROVIDER_DURATION = Histogram(
    "xpando_provider_request_duration_seconds",
    "One provider call (every attempt), by provider",
    ["provider"],
    buckets=PROVIDER_BUCKETS,
)
PROVIDER_TOKENS = Counter(
    "xpando_provider_tokens",
    "Tokens the providers counted, by provider, model and direction (input, output)",
    ["provider", "model", "direction"],
)
PROVIDER_COST = Counter(
    "xpando_provider_cost_usd",
    "USD the provider calls cost at the nodes' prices",
    ["provider", "model"],
)

# --- payouts (core worker) ---------------------------------------------------------------------

PAYOUTS = Counter(
    "xpando_payouts", "Payouts settled by a batch or compensation, by status", ["status"]
)
PAYOUT_AMOUNT = Counter(
    "xpando_payout_amount_base_units", "XPD base units by payout status", ["status"]
)
PAYOUT_EPOCHS = Counter(
    "xpando_payout_epochs", "Epochs finished by the payout saga, by status", ["status"]
)
PAYOUT_LAST_EPOCH = Gauge(
    "xpando_payout_last_epoch", "Number of the last epoch the payout saga finished"
)
TREASURY_BALANCE = Gauge(
    "xpando_treasury_balance_base_units", "Treasury XPD balance when it was last read"
)

# --- HTTP (API) --------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "xpando_http_requests",
    "API requests by method, route template and status code",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "xpando_http_request_duration_seconds",
    "API request latency by route template",
    ["route"],
    buckets=HTTP_BUCKETS,
)


def record_task(
    *, outcome: str, domain: str | None, duration_s: float | None, reused: bool
) -> None:
    TASKS.labels(outcome=outcome, domain=domain_label(domain)).inc()
    if duration_s is not None and duration_s >= 0:
        TASK_DURATION.labels(outcome=outcome).observe(duration_s)
    if reused and outcome == "completed":
        TASKS_ANSWERED_FROM_KNOWLEDGE.inc()


def record_answer(
    *,
    provider: str,
    model: str,
    status: str,
    duration_s: float,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cost_usd: float = 0.0,
    error_type: str | None = None,
) -> None:
    EXPERT_ANSWERS.labels(provider=provider, status=status).inc()
    PROVIDER_DURATION.labels(provider=provider).observe(duration_s)
    if error_type is not None:
        PROVIDER_ERRORS.labels(provider=provider, error_type=error_type).inc()
    model = model_label(model)
    if input_tokens:
        PROVIDER_TOKENS.labels(provider=provider, model=model, direction="input").inc(input_tokens)
    if output_tokens:
        PROVIDER_TOKENS.labels(provider=provider, model=model, direction="output").inc(
            output_tokens
        )
    if cost_usd > 0:
        PROVIDER_COST.labels(provider=provider, model=model).inc(cost_usd)


class timed:
    """``with timed(ROUTING_DURATION) as t: ...; t.outcome = "routed"``: one observation with
    the outcome the block set (``error`` when it raised and set none)."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self.outcome: str | None = None

    def __enter__(self) -> timed:
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        outcome = self.outcome or ("error" if exc_type is not None else "ok")
        self._histogram.labels(outcome=outcome).observe(time.perf_counter() - self._started)


# --- circuit breakers (core worker) ------------------------------------------------------------


@dataclass(frozen=True)
class BreakerSample:
    """One breaker as the core last read it: ``kind`` node or provider; state closed,
    half_open or open."""

    kind: str
    provider: str
    region: str
    state: str


BREAKER_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class BreakerCollector(Collector):
    """Breaker state at scrape time, from the breakers the core's routing last read (at most
    a second old while tasks are routed; an open breaker turns half-open by the clock here too).

    ``xpando_provider_breaker_state{provider,region}``: 0 closed, 1 half-open, 2 open (every
    provider@region seen troubled since start stays listed, 0 once closed).
    ``xpando_node_breakers{state}``: how many nodes' breakers are open or half-open."""

    def __init__(self) -> None:
        self._source: Callable[[], Iterable[BreakerSample]] | None = None
        self._providers_seen: set[tuple[str, str]] = set()

    def watch(self, source: Callable[[], Iterable[BreakerSample]]) -> None:
        """Read breakers from ``source`` (the process's routing breaker book)."""
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self._source is None:
            return
        samples = list(self._source())
        providers = GaugeMetricFamily(
            "xpando_provider_breaker_state",
            "Breaker of a provider in a region: 0 closed, 1 half-open, 2 open",
            labels=["provider", "region"],
        )
        states = {(s.provider, s.region): s.state for s in samples if s.kind == "provider"}
        self._providers_seen.update(states)
        for provider, region in sorted(self._providers_seen):
            value = BREAKER_STATE_VALUE[states.get((provider, region), "closed")]
            providers.add_metric([provider, region], value)
        yield providers
        nodes = GaugeMetricFamily(
            "xpando_node_breakers", "Nodes whose breaker is in a state", labels=["state"]
        )
        for state in ("open", "half_open"):
            nodes.add_metric(
                [state], sum(1 for s in samples if s.kind == "node" and s.state == state)
            )
        yield nodes


BREAKERS = BreakerCollector()
REGISTRY.register(BREAKERS)
