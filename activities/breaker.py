"""Circuit breakers: stop routing to an expert node (or a provider in a region) that keeps failing.

Policy (the numbers are settings: ``XPANDO_BREAKER_FAILURES``, ``XPANDO_BREAKER_PROVIDER_FAILURES``,
``XPANDO_BREAKER_COOLDOWN_S``):

* Every ask of an expert that ends is reported by ``TaskWorkflow`` to the core (the
  ``report_outcome`` local activity) as soon as it ends — so a failure counts even when the task
  then succeeds through a standby. One *ask* is one ``answer`` activity: Temporal's retries of
  it are inside the ask, so a 429 that succeeds on its second attempt is a success, and one
  that exhausts its attempts is one failure.
* How a failure counts depends on its type (``activities/providers/errors.py``
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

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from activities.providers.errors import breaker_effect
from xpando.contracts import BreakerState, BreakerView
from xpando.db.models import Breaker
from xpando.db.queries import as_utc
from xpando.settings import Settings

# How long a claimed probe is reserved for its task: as long as one ask may take
# (TaskWorkflow's ANSWER_SCHEDULE_TO_CLOSE), after which another task may probe.
PROBE_LEASE = timedelta(minutes=3)


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
