"""Circuit breakers in the database, on SQLite and PostgreSQL: K failures open, cool-down,
exactly one half-open probe among concurrent routers, idempotent reports."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from xpando import breakers
from xpando.breakers import BreakerPolicy, node_key, provider_key
from xpando.contracts import BreakerState, BreakerView
from xpando.db import queries, session_factory

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
POLICY = BreakerPolicy(node_failures=3, provider_failures=2, cooldown=timedelta(seconds=30))


async def _report(
    engine: AsyncEngine,
    *,
    n: int,
    ok: bool,
    error_type: str | None = "ProviderServerError",
    node: str = "n1",
    provider: str = "openai",
    region: str = "eu-west",
    now: datetime = T0,
    event: str | None = None,
) -> bool:
    failing, healthy = POLICY.effects(
        node_id=node, provider=provider, region=region, ok=ok, error_type=error_type
    )
    async with session_factory(engine)() as s:
        return await queries.record_expert_outcome(
            session=s,
            event_id=event or f"task-{n}:{node}",
            task_id=f"task-{n}",
            node_id=node,
            provider=provider,
            region=region,
            ok=ok,
            error_type=None if ok else error_type,
            error=None if ok else f"{error_type}: boom",
            effects=failing,
            healthy=healthy,
            cooldown_s=POLICY.cooldown.total_seconds(),
            now=now,
        )


async def _state(engine: AsyncEngine, key: str, now: datetime) -> BreakerView:
    async with session_factory(engine)() as s:
        rows = await queries.get_breakers(session=s, keys=[key])
    return breakers.view(rows.get(key), key=key, now=now)


async def test_k_consecutive_failures_open_then_cool_down_to_half_open(
    any_engine: AsyncEngine,
) -> None:
    node, prov = node_key("n1"), provider_key("openai", "eu-west")
    await _report(any_engine, n=1, ok=False, error_type="ProviderAuthError")  # node only
    await _report(any_engine, n=2, ok=False)  # node + provider
    assert (await _state(any_engine, node, T0)).state == BreakerState.CLOSED
    assert (await _state(any_engine, prov, T0)).consecutive_failures == 1
    await _report(any_engine, n=3, ok=False)
    opened = await _state(any_engine, node, T0)
    assert opened.state == BreakerState.OPEN and opened.consecutive_failures == 3
    assert opened.open_until == T0 + POLICY.cooldown and "boom" in (opened.last_error or "")
    assert (await _state(any_engine, prov, T0)).state == BreakerState.OPEN  # its K is 2
    later = T0 + POLICY.cooldown + timedelta(seconds=1)
    half = await _state(any_engine, node, later)
    assert half.state == BreakerState.HALF_OPEN and not half.probe_in_flight


async def test_a_success_or_a_refusal_resets_the_count(any_engine: AsyncEngine) -> None:
    node = node_key("n1")
    await _report(any_engine, n=1, ok=False)
    await _report(any_engine, n=2, ok=False)
    await _report(any_engine, n=3, ok=False, error_type="ProviderRefusal")  # the node answered
    assert (await _state(any_engine, node, T0)).consecutive_failures == 0
    await _report(any_engine, n=4, ok=False)
    await _report(any_engine, n=5, ok=True)
    assert (await _state(any_engine, node, T0)).consecutive_failures == 0
    await _report(any_engine, n=6, ok=False, error_type="Superseded")  # not the node's doing
    assert (await _state(any_engine, node, T0)).consecutive_failures == 0


async def test_a_retried_report_counts_once(any_engine: AsyncEngine) -> None:
    assert await _report(any_engine, n=1, ok=False, event="same")
    assert not await _report(any_engine, n=1, ok=False, event="same")
    assert (await _state(any_engine, node_key("n1"), T0)).consecutive_failures == 1


async def test_exactly_one_router_gets_the_half_open_probe(any_engine: AsyncEngine) -> None:
    node = node_key("n1")
    for n in range(3):
        await _report(any_engine, n=n, ok=False, error_type="ProviderAuthError")
    sessions = session_factory(any_engine)
    early = T0 + timedelta(seconds=5)

    async def claim(task: str, now: datetime) -> bool:
        async with sessions() as s:
            return await queries.claim_probe(session=s, key=node, task_id=task, now=now, lease_s=60)

    assert not await claim("too-early", early)  # still open: no probe yet
    later = T0 + POLICY.cooldown + timedelta(seconds=1)
    wins = await asyncio.gather(*(claim(f"router-{i}", later) for i in range(8)))
    assert sum(wins) == 1
    winner = f"router-{wins.index(True)}"
    assert (await _state(any_engine, node, later)).probe_in_flight
    assert await claim(winner, later)  # a retried route of the same task keeps it
    # The probe fails: open for another cool-down, and the lease is gone.
    await _report(any_engine, n=10, ok=False, error_type="ProviderAuthError", now=later)
    reopened = await _state(any_engine, node, later)
    assert reopened.state == BreakerState.OPEN and reopened.open_until == later + POLICY.cooldown
    # After that cool-down a probe is possible again, and its success closes the breaker.
    again = later + POLICY.cooldown + timedelta(seconds=1)
    assert await claim("router-x", again)
    await _report(any_engine, n=11, ok=True, now=again)
    closed = await _state(any_engine, node, again)
    assert closed.state == BreakerState.CLOSED and closed.consecutive_failures == 0


async def test_an_expired_probe_lease_can_be_taken_again(any_engine: AsyncEngine) -> None:
    node = node_key("n1")
    for n in range(3):
        await _report(any_engine, n=n, ok=False, error_type="ProviderAuthError")
    t = T0 + POLICY.cooldown + timedelta(seconds=1)
    async with session_factory(any_engine)() as s:
        assert await queries.claim_probe(session=s, key=node, task_id="a", now=t, lease_s=10)
        assert not await queries.claim_probe(session=s, key=node, task_id="b", now=t, lease_s=10)
        later = t + timedelta(seconds=11)  # task a never reported
        assert await queries.claim_probe(session=s, key=node, task_id="b", now=later, lease_s=10)
        await queries.release_probe(session=s, key=node, task_id="b")
        assert await queries.claim_probe(session=s, key=node, task_id="c", now=later, lease_s=10)


def test_routing_gate_skips_open_and_claimed_breakers() -> None:
    from xpando.db.models import Breaker

    def row(key: str, *, until: datetime, probe: datetime | None = None) -> Breaker:
        return Breaker(
            key=key, scope="node", state="open", open_until=until, probe_until=probe, updated_at=T0
        )

    ok = breakers.gate(node_id="a", provider="openai", region="eu", open_rows={}, now=T0)
    assert ok.allowed and ok.probes == ()
    rows = {node_key("a"): row(node_key("a"), until=T0 + timedelta(seconds=5))}
    assert not breakers.gate(
        node_id="a", provider="openai", region="eu", open_rows=rows, now=T0
    ).allowed
    rows = {provider_key("openai", "eu"): row(provider_key("openai", "eu"), until=T0)}
    probe = breakers.gate(node_id="a", provider="openai", region="eu", open_rows=rows, now=T0)
    assert probe.allowed and probe.probes == (provider_key("openai", "eu"),)
    other_region = breakers.gate(
        node_id="a", provider="openai", region="us", open_rows=rows, now=T0
    )
    assert other_region.allowed and other_region.probes == ()
    rows = {node_key("a"): row(node_key("a"), until=T0, probe=T0 + timedelta(seconds=9))}
    assert not breakers.gate(
        node_id="a", provider="openai", region="eu", open_rows=rows, now=T0
    ).allowed


@pytest.mark.parametrize(
    ("error_type", "node_counts", "provider_counts"),
    [
        ("ProviderServerError", True, True),
        ("ProviderOverloaded", True, True),
        ("ProviderTimeout", True, True),
        ("DeadlineExceeded", True, True),
        ("ProviderRateLimited", True, False),
        ("ProviderAuthError", True, False),
        ("InsufficientQuota", True, False),
        ("ProviderMalformedResponse", True, False),
        ("ProviderTruncated", True, False),
        ("SomethingUnexpected", True, False),
        ("ProviderRefusal", False, False),
        ("ContextLengthExceeded", False, False),
        ("Superseded", False, False),
    ],
)
def test_which_breakers_a_failure_counts_against(
    error_type: str, node_counts: bool, provider_counts: bool
) -> None:
    failing, _ = POLICY.effects(
        node_id="a", provider="gemini", region="eu", ok=False, error_type=error_type
    )
    keys = {key for key, _, _ in failing}
    assert (node_key("a") in keys) is node_counts
    assert (provider_key("gemini", "eu") in keys) is provider_counts
