"""Circuit breakers: stop routing to an expert node (or a provider in a region) that keeps failing.

Policy (the numbers are settings: ``XPANDO_BREAKER_FAILURES``, ``XPANDO_BREAKER_PROVIDER_FAILURES``,
``XPANDO_BREAKER_COOLDOWN_S``):

* Every ask of an expert that ends is reported by ``TaskWorkflow`` to the core (the
  ``report_outcome`` local activity) as soon as it ends — so a failure counts even when the task
  then succeeds through a standby. One *ask* is one ``answer`` activity: Temporal's retries of
  it are inside the ask, so a 429 that succeeds on its second attempt is a success, and one
  that exhausts its attempts is one failure.
* How a failure counts depends on its type (``xpando/providers/errors.py``
  ``BREAKER_EFFECT``): outages, overload, timeouts and deadline overruns count against the
  node *and* its ``provider@region``; a bad key, a spent quota, a rate limit or an unusable
  answer count against the node only; a refusal or an over-long prompt is the request's fault
  and counts as a success (the node answered).
* ``closed`` → after K consecutive failures → ``open`` for the cool-down → ``half_open``: the
  next task that would route there claims the one probe (an atomic UPDATE, so exactly one
  router gets it, whichever process it runs in) → the probe's success closes the breaker, its
  failure opens it for another cool-down. A claimed probe is a lease (:data:`PROBE_LEASE`): if
  its task never reports, another probe may go after it.
* Routing skips every node whose breaker, or whose provider-in-region breaker, is open;
  half-open nodes may only be *chosen* (as the probe), never held as standbys.

State lives in the database (tables ``breakers`` and ``expert_outcomes``), so every core worker
and the API see the same breakers. ``GET /v1/nodes`` shows them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel.ext.asyncio.session import AsyncSession

from xpando import metrics
from xpando.contracts import BreakerState, BreakerView, ExpertOutcomeInput
from xpando.db import SessionFactory, queries
from xpando.db import nodes as node_queries
from xpando.db.models import Breaker
from xpando.db.queries import as_utc
from xpando.providers.errors import breaker_effect
from xpando.settings import Settings

# How long a claimed probe is reserved for its task: as long as one ask may take
# (TaskWorkflow's ANSWER_SCHEDULE_TO_CLOSE), after which another task may probe.
PROBE_LEASE = timedelta(minutes=3)
# Routing reads the circuit breakers at most this often (and after any outcome this process
# writes), so a burst of decisions is not a burst of queries.
BREAKER_CACHE_S = 1.0


@dataclass(frozen=True)
class BreakerPolicy:
    node_failures: int = 3
    provider_failures: int = 5
    cooldown: timedelta = timedelta(seconds=30)
    probe_lease: timedelta = PROBE_LEASE

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerPolicy:
        return cls(
            node_failures=settings.breaker_failures,
            provider_failures=settings.breaker_provider_failures,
            cooldown=timedelta(seconds=settings.breaker_cooldown_s),
        )

    def effects(
        self, *, node_id: str, provider: str, region: str, ok: bool, error_type: str | None
    ) -> tuple[list[tuple[str, str, int]], list[str]]:
        """(breakers the outcome counts a failure against, breakers it closes)."""
        node, prov = node_key(node_id), provider_key(provider, region)
        if ok:
            return [], [node, prov]
        effect = breaker_effect(error_type)
        if effect == "healthy":
            return [], [node, prov]
        if effect == "ignore":
            return [], []
        failing = [(node, "node", self.node_failures)]
        if effect == "provider":
            failing.append((prov, "provider", self.provider_failures))
        return failing, []


def node_key(node_id: str) -> str:
    return f"node:{node_id}"


def provider_key(provider: str, region: str) -> str:
    return f"provider:{provider}@{region}"


def view(row: Breaker | None, *, key: str, now: datetime) -> BreakerView:
    """What a breaker row means at ``now`` (no row: closed, never failed)."""
    if row is None:
        return BreakerView(key=key, state=BreakerState.CLOSED)
    open_until = as_utc(row.open_until)
    probe_until = as_utc(row.probe_until)
    state = BreakerState.CLOSED
    if row.state == "open":
        state = (
            BreakerState.OPEN
            if open_until is not None and open_until > now
            else BreakerState.HALF_OPEN
        )
    return BreakerView(
        key=key,
        state=state,
        consecutive_failures=row.consecutive_failures,
        open_until=open_until if state != BreakerState.CLOSED else None,
        probe_in_flight=state == BreakerState.HALF_OPEN
        and probe_until is not None
        and probe_until > now,
        last_error=row.last_error,
        updated_at=as_utc(row.updated_at),
    )


@dataclass(frozen=True)
class Gate:
    """Routing's verdict on one node: ``allowed`` at all, and the half-open breakers whose probe
    it must claim to be chosen (empty: a healthy node)."""

    allowed: bool
    probes: tuple[str, ...] = ()


def gate(
    *,
    node_id: str,
    provider: str,
    region: str,
    open_rows: Mapping[str, Breaker],
    now: datetime | None = None,
) -> Gate:
    now = now or datetime.now(UTC)
    probes: list[str] = []
    for key in (node_key(node_id), provider_key(provider, region)):
        state = view(open_rows.get(key), key=key, now=now)
        if state.state == BreakerState.OPEN:
            return Gate(allowed=False)
        if state.state == BreakerState.HALF_OPEN:
            if state.probe_in_flight:
                return Gate(allowed=False)
            probes.append(key)
    return Gate(allowed=True, probes=tuple(probes))


class BreakerBook:
    """The breakers as one process sees and writes them: routing reads the troubled ones
    (cached for :data:`BREAKER_CACHE_S`), outcome reports and task records write them. One book
    is shared by the routing and recording activities of a worker, so a write it makes is seen
    by its next routing decision at once (another process's within the cache time)."""

    def __init__(self, sessions: SessionFactory, policy: BreakerPolicy | None = None) -> None:
        self._sessions = sessions
        self.policy = policy or BreakerPolicy()
        self._troubled: tuple[float, dict[str, Breaker]] | None = None
        self._last_read: dict[str, Breaker] = {}
        # The breaker metrics show what this book last read (the process's routing book).
        metrics.BREAKERS.watch(self.samples)

    async def troubled(self) -> dict[str, Breaker]:
        """Breakers that are open or counting failures."""
        now = time.monotonic()
        cached = self._troubled
        if cached is not None and now - cached[0] < BREAKER_CACHE_S:
            return cached[1]
        async with self._sessions() as session:
            rows = await node_queries.troubled_breakers(session=session)
        self._troubled = (now, rows)
        self._last_read = rows
        return rows

    def samples(self) -> list[metrics.BreakerSample]:
        """The troubled breakers last read, in their state now (the breaker metrics)."""
        now = datetime.now(UTC)
        out = []
        for key, row in list(self._last_read.items()):
            kind, _, name = key.partition(":")
            provider, _, region = name.partition("@") if kind == "provider" else ("", "", "")
            state = view(row, key=key, now=now).state.value
            out.append(metrics.BreakerSample(kind, provider, region, state))
        return out

    def invalidate(self) -> None:
        """The next decision reads the breakers again."""
        self._troubled = None

    def effects(self, o: ExpertOutcomeInput) -> tuple[list[tuple[str, str, int]], list[str]]:
        return self.policy.effects(
            node_id=o.node_id,
            provider=o.provider,
            region=o.region,
            ok=o.ok,
            error_type=o.error_type,
        )

    async def report(self, o: ExpertOutcomeInput, now: datetime) -> tuple[bool, list[BreakerView]]:
        """Count one ask's outcome (logged once) against its breakers; returns whether it was
        new and the node's and provider's breakers after it."""
        self.invalidate()
        async with self._sessions() as session:
            recorded = await self.log_outcome(session, o, now)
            keys = [node_key(o.node_id), provider_key(o.provider, o.region)]
            rows = await queries.get_breakers(session=session, keys=keys)
        return recorded, [view(rows.get(k), key=k, now=now) for k in keys]

    async def log_outcome(
        self, session: AsyncSession, o: ExpertOutcomeInput, now: datetime
    ) -> bool:
        """One outcome, logged once and applied to its breakers (commits)."""
        failing, healthy = self.effects(o)
        return await queries.record_expert_outcome(
            session=session,
            event_id=o.event_id,
            task_id=o.task_id,
            node_id=o.node_id,
            provider=o.provider,
            region=o.region,
            ok=o.ok,
            error_type=o.error_type,
            error=o.error,
            effects=failing,
            healthy=healthy,
            cooldown_s=self.policy.cooldown.total_seconds(),
            now=now,
        )

    async def count_outcomes(
        self, session: AsyncSession, outcomes: list[ExpertOutcomeInput], now: datetime
    ) -> None:
        """Outcomes handed to a task's record (asks that ended well): one batch, in the
        record's transaction."""
        healthy: set[str] = set()
        rows = []
        for o in outcomes:
            failing, closes = self.effects(o)
            if failing or not o.ok:  # not what a record is handed; count it the full way
                await self.log_outcome(session, o, now)
                continue
            healthy.update(closes)
            rows.append(
                {
                    "event_id": o.event_id,
                    "task_id": o.task_id,
                    "node_id": o.node_id,
                    "provider": o.provider,
                    "region": o.region,
                    "error_type": o.error_type,
                }
            )
        _, changed = await queries.record_expert_successes(
            session=session, outcomes=rows, healthy=sorted(healthy), now=now, commit=False
        )
        if changed or len(rows) < len(outcomes):
            self.invalidate()
