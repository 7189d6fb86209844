"""Per-key limits: requests and tasks per minute, tasks running at once, and a daily spend budget.

Each limit is the key's own (``api_keys`` columns, ``xpando keys create --rpm …``) or, where it
has none, the deployment's ``XPANDO_LIMIT_*``; 0 is no limit. They hold across API replicas:

- **Per-minute counters** sit behind one interface, :class:`Counter`, with two backends:
  :class:`RedisCounter` when ``XPANDO_REDIS_URL`` is set and :class:`DatabaseCounter`
  otherwise. Both count in a window that opens at a key's first request and lasts a minute
  (Redis: ``INCR`` and ``PEXPIRE`` in one Lua script; the database: one upsert ``… RETURNING``),
  so of N + 1 requests within a minute of the first, the last is refused, with ``Retry-After``
  the rest of the window. A refused request counts too (it does not move the window's end). In a
  rolling minute that straddles two windows a key can make up to 2 N requests: the price of one
  counter per key, where an exact sliding window keeps one entry per request.
- **Running tasks** and their worst-case costs are held in Redis when it is set
  (``xpando/auth/holds.py``: one script call admits a task) and in the task's database row
  otherwise (``xpando/auth/spend.py``). **Spend** is in the database with either: the record
  step, in the core worker, charges a task's cost in the transaction that records it (and then
  lifts its hold in Redis, where Redis keeps a copy of the day's spend).

If Redis does not answer, the per-minute limits let requests through (logged) and tasks are held
in the database: an outage of Redis does not take the API down with it, and money stays guarded
by the budget.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import case
from sqlalchemy.dialects import postgresql, sqlite

from xpando.auth import spend
from xpando.auth.holds import PREFIX, RedisHolds, count_in_window
from xpando.auth.keys import KeyLimits, Principal
from xpando.db import SessionFactory
from xpando.db.models import RateCounter
from xpando.logs import get_logger
from xpando.settings import Settings

log = get_logger(__name__)

WINDOW_S = 60.0
# Stable error codes (the API answers 402 for the budget, 429 for the others).
RATE_LIMITED = "rate_limited"
TASK_RATE_LIMITED = "task_rate_limited"
CONCURRENCY_LIMITED = "concurrency_limited"
BUDGET_EXCEEDED = "budget_exceeded"
REGISTRATION_RATE_LIMITED = "registration_rate_limited"

# The cost estimate (see estimate_task_cost).
CONTEXT_TOKENS = 1500
PRICE_REFRESH_S = 15.0
PRICES_KEPT = 32  # per region, the most expensive input and output prices (k is at most 9)
# A held task older than this whose workflow has ended unrecorded (terminated, timed out, never
# started) gives its hold back when the key would be refused; a younger one may be a task
# another replica admitted and is about to start.
RECONCILE_AFTER = timedelta(seconds=30)
RECONCILE_MAX = 64  # the oldest holds asked about at once (one describe each)
REDIS_TIMEOUT_S = 0.5
REDIS_PREFIX = PREFIX  # the per-minute counters and the holds share it
OUTAGE_LOG_EVERY_S = 10.0


class LimitExceeded(Exception):
    """A request or task a key's limits refuse: ``code`` is one of the codes above,
    ``retry_after_s`` when waiting that long lifts the refusal."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after_s: float | None = None,
        details: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.details = [dict(d) for d in details]


# --- per-minute counters -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    """One request counted: the window's count with it, and the seconds until the window ends."""

    allowed: bool
    count: int
    retry_after_s: float


class Counter(Protocol):
    """A per-minute counter shared by every API replica."""

    backend: str

    async def hit(self, bucket: str, *, limit: int, window_s: float = WINDOW_S) -> Hit:
        """Count one request in ``bucket``'s window (opened now when there is none)."""
        ...

    async def aclose(self) -> None: ...


# INCR, and the window's expiry when the key is new: atomic, one round trip.
_REDIS_HIT = count_in_window("KEYS[1]", "ARGV[1]") + "return {count, ttl}\n"


class RedisCounter:
    backend = "redis"

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._script = self._redis.register_script(_REDIS_HIT)
        self._outage_logged = -math.inf

    async def hit(self, bucket: str, *, limit: int, window_s: float = WINDOW_S) -> Hit:
        from redis.exceptions import RedisError

        try:
            count, ttl_ms = await self._script(
                keys=[REDIS_PREFIX + bucket], args=[int(window_s * 1000)]
            )
        except (RedisError, OSError) as err:
            if time.monotonic() - self._outage_logged > OUTAGE_LOG_EVERY_S:
                self._outage_logged = time.monotonic()
                log.warning("redis unavailable: per-minute limits not enforced", error=repr(err))
            return Hit(allowed=True, count=0, retry_after_s=0.0)
        return Hit(allowed=int(count) <= limit, count=int(count), retry_after_s=int(ttl_ms) / 1000)

    async def aclose(self) -> None:
        await self._redis.aclose()


class DatabaseCounter:
    backend = "database"

    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions
        self._statements: dict[str, Any] = {}

    def _statement(self, dialect: str) -> Any:
        stmt = self._statements.get(dialect)
        if stmt is None:  # built once: parameters carry the bucket and the times
            from sqlalchemy import bindparam

            table: Any = RateCounter.__table__  # type: ignore[attr-defined]
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            now: Any = bindparam("now")
            ends: Any = bindparam("ends")
            ended = table.c.resets_at <= now
            stmt = self._statements[dialect] = (
                insert(table)
                .values(bucket=bindparam("bucket"), count=1, resets_at=ends)
                .on_conflict_do_update(
                    index_elements=["bucket"],
                    set_={
                        "count": case((ended, 1), else_=table.c.count + 1),
                        "resets_at": case((ended, ends), else_=table.c.resets_at),
                    },
                )
                .returning(table.c.count, table.c.resets_at)
            )
        return stmt

    async def hit(self, bucket: str, *, limit: int, window_s: float = WINDOW_S) -> Hit:
        now = time.time()
        async with self._sessions() as session:
            dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
            result = await session.exec(
                self._statement(dialect),
                params={"bucket": bucket, "now": now, "ends": now + window_s},
            )
            count, resets_at = result.one()
            await session.commit()
        return Hit(allowed=count <= limit, count=count, retry_after_s=max(0.0, resets_at - now))

    async def aclose(self) -> None:
        return None


def counter_from_settings(settings: Settings, sessions: SessionFactory) -> Counter:
    if settings.redis_url:
        return RedisCounter(settings.redis_url)
    return DatabaseCounter(sessions)


# --- the worst case of a task --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prices:
    """The most expensive input and output prices (USD per 1M tokens) of a set of nodes,
    highest first."""

    inputs: tuple[float, ...] = ()
    outputs: tuple[float, ...] = ()


def estimate_task_cost(prices: Prices, *, prompt: str, k: int, output_tokens: int) -> float:
    """The worst-case provider cost of a task, in USD, as it is known at submit time.

    Routing picks the experts inside the workflow, so any ``k`` registered nodes the task may be
    routed to (active, in its regions) could answer it: the estimate takes the ``k`` highest
    input prices and the ``k`` highest output prices among them (an upper bound of any ``k``
    nodes' cost, even when the dearest input and output are not the same nodes'), times

    - input tokens: the prompt's UTF-8 bytes (a token of a byte-level tokenizer covers at least
      one byte, so this bounds the prompt's tokens) plus ``CONTEXT_TOKENS`` for the instructions
      and the stored knowledge handed to experts as context;
    - output tokens: ``output_tokens`` per expert (``XPANDO_LIMIT_ESTIMATE_OUTPUT_TOKENS``, the
      nodes' ``max_output_tokens``).

    Not counted: hedges and retries (a standby asked in parallel with a slow expert, an attempt
    that failed after the provider billed it) and an aggregator model; they are charged when the
    task records, so the budget can be passed by what those cost. With no node registered the
    estimate is 0 (the task waits for experts)."""
    input_tokens = len(prompt.encode()) + CONTEXT_TOKENS
    usd = sum(prices.inputs[:k]) * input_tokens + sum(prices.outputs[:k]) * output_tokens
    return round(usd / 1_000_000, 8)


@dataclass
class PriceBook:
    """The registered nodes' prices per region, from the database, read again every
    ``refresh_s`` in the background (a submission never waits for it but the first)."""

    sessions: SessionFactory
    refresh_s: float = PRICE_REFRESH_S
    _regions: dict[str, Prices] = field(default_factory=dict)
    _loaded_at: float = -math.inf
    _refreshing: asyncio.Task[None] | None = None

    async def prices(self, regions: Sequence[str] = ()) -> Prices:
        if self._loaded_at == -math.inf:
            await self.refresh()
        elif time.monotonic() - self._loaded_at > self.refresh_s and self._refreshing is None:
            self._refreshing = asyncio.create_task(self.refresh())
            self._refreshing.add_done_callback(self._refreshed)
        found = [p for r, p in self._regions.items() if not regions or r in regions]
        return Prices(
            inputs=tuple(sorted((x for p in found for x in p.inputs), reverse=True)[:PRICES_KEPT]),
            outputs=tuple(
                sorted((x for p in found for x in p.outputs), reverse=True)[:PRICES_KEPT]
            ),
        )

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not read node prices", error=repr(task.exception()))

    async def refresh(self) -> None:
        async with self.sessions() as session:
            levels = await spend.price_levels(session=session)
        inputs: dict[str, list[float]] = {}
        outputs: dict[str, list[float]] = {}
        for region, price_in, price_out, count in levels:
            n = min(int(count), PRICES_KEPT)
            inputs.setdefault(region, []).extend([float(price_in)] * n)
            outputs.setdefault(region, []).extend([float(price_out)] * n)
        self._regions = {
            region: Prices(
                inputs=tuple(sorted(inputs[region], reverse=True)[:PRICES_KEPT]),
                outputs=tuple(sorted(outputs[region], reverse=True)[:PRICES_KEPT]),
            )
            for region in inputs
        }
        self._loaded_at = time.monotonic()

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()


# --- the limiter ---------------------------------------------------------------------------------

# For task ids, which ones are no longer running and how they ended: the workflow's final status
# (``completed``, ``terminated``, …), or None when Temporal has no such workflow.
EndedCheck = Callable[[Sequence[str]], Awaitable[Mapping[str, str | None]]]


@dataclass(frozen=True, slots=True)
class Admission:
    """A task let through: ``held`` is False when it was submitted before (its first
    submission holds its cost); ``estimate_usd`` its worst case."""

    task_id: str
    held: bool
    estimate_usd: float
    key_id: str = ""
    in_redis: bool = False  # held in Redis (else in the task's database row)


class Limiter:
    """Checks a key's limits: :meth:`check_request` for every request, :meth:`admit_task`
    before a task starts. Raises :class:`LimitExceeded`."""

    def __init__(
        self,
        *,
        counter: Counter,
        sessions: SessionFactory,
        defaults: KeyLimits,
        output_tokens: int,
        prices: PriceBook | None = None,
        holds: RedisHolds | None = None,
    ) -> None:
        self.counter = counter
        self.holds = holds
        self._outage_logged = -math.inf
        self._sessions = sessions
        self._defaults = defaults
        self._output_tokens = output_tokens
        self.prices = prices or PriceBook(sessions)

    def limits_for(self, principal: Principal) -> KeyLimits:
        return principal.limits.over(self._defaults)

    async def check_request(self, principal: Principal) -> None:
        limit = self.limits_for(principal).requests_per_minute or 0
        if not limit:
            return
        hit = await self.counter.hit(f"{principal.key_id}:requests", limit=limit)
        if not hit.allowed:
            raise _requests_refused(principal, limit, hit)

    async def check_registration(self, address: str, limit: int) -> None:
        """A signed node registration from ``address`` (a client's address): open to anyone
        holding a node key, so counted per address, before its signature and profile cost
        anything (0: no limit)."""
        await self._per_minute(
            f"registrations:{address}",
            limit,
            REGISTRATION_RATE_LIMITED,
            f"{address} sent more than {limit} node registrations this minute "
            "(XPANDO_LIMIT_REGISTRATIONS_PER_MINUTE)",
            _detail("registrations_per_minute", f"{limit} a minute"),
        )

    async def _per_minute(
        self, bucket: str, limit: int, code: str, over: str, detail: dict[str, str]
    ) -> None:
        """Count one in ``bucket``; refused (``code``, ``over`` and when to retry) past
        ``limit`` (0: no limit, nothing counted)."""
        if not limit:
            return
        hit = await self.counter.hit(bucket, limit=limit)
        if not hit.allowed:
            raise LimitExceeded(
                code,
                f"{over}; retry in {math.ceil(hit.retry_after_s)} s",
                retry_after_s=hit.retry_after_s,
                details=[detail],
            )

    async def estimate(self, *, prompt: str, k: int, regions: Sequence[str] = ()) -> float:
        prices = await self.prices.prices(regions)
        return estimate_task_cost(prices, prompt=prompt, k=k, output_tokens=self._output_tokens)

    async def admit_task(
        self,
        principal: Principal,
        *,
        task_id: str,
        prompt: str,
        k: int,
        regions: Sequence[str] = (),
        domain: str | None = None,
        ended: EndedCheck | None = None,
        count_request: bool = False,
    ) -> Admission:
        """Let a task of ``principal`` start, holding its worst-case cost, or refuse it: over
        the key's tasks per minute, its running tasks, or its budget for today (what its tasks
        were charged today, plus the worst case of those still running, plus this one's).

        When the running tasks or the budget refuse it, holds of tasks whose workflow ended
        unrecorded are given back first (``ended`` asks Temporal), and the check is made again.
        """
        limits = self.limits_for(principal)
        estimate = await self.estimate(prompt=prompt, k=k, regions=regions)
        if self.holds is not None:  # one script call counts the task, and holds it
            from redis.exceptions import RedisError

            try:
                return await self._admit_in_redis(
                    self.holds, principal, limits, task_id, estimate, ended, count_request
                )
            except (RedisError, OSError) as err:
                self._outage("redis unavailable: tasks held in the database", err)
        if count_request:
            await self.check_request(principal)
        counted: asyncio.Future[Hit] | None = None
        if limits.tasks_per_minute:
            # Counted in Redis while the database admits the task; the database backend may
            # have one connection only, which the admission is about to take: first, then.
            counted = asyncio.ensure_future(
                self.counter.hit(f"{principal.key_id}:tasks", limit=limits.tasks_per_minute)
            )
            if self.counter.backend == "database":
                _tasks_per_minute(principal, limits, await counted)
        try:
            reconciled = False
            while True:
                now = datetime.now(UTC)
                async with self._sessions() as session:  # rolled back unless committed
                    load = await spend.hold_task(
                        session=session,
                        key_id=principal.key_id,
                        task_id=task_id,
                        prompt=prompt,
                        domain=domain,
                        hold_usd=estimate,
                        now=now,
                    )
                    if counted is not None:
                        _tasks_per_minute(principal, limits, await counted)
                    refusal = (
                        None if load is None else _refusal(principal, limits, load, estimate, now)
                    )
                    if refusal is None:
                        await session.commit()
                        held = load is not None
                        return Admission(task_id=task_id, held=held, estimate_usd=estimate)
                if (
                    reconciled
                    or ended is None
                    or not await self._reconcile(principal.key_id, ended)
                ):
                    raise refusal
                reconciled = True
        finally:
            if counted is not None and not counted.done():
                counted.cancel()

    async def _admit_in_redis(
        self,
        holds: RedisHolds,
        principal: Principal,
        limits: KeyLimits,
        task_id: str,
        estimate: float,
        ended: EndedCheck | None,
        count_request: bool,
    ) -> Admission:
        key_id = principal.key_id
        reconciled = False
        seeded = 0
        count = True
        while True:
            now = datetime.now(UTC)
            day = spend.day_of(now)
            found = await holds.admit(
                key_id=key_id,
                task_id=task_id,
                estimate_usd=estimate,
                day=day,
                concurrent=limits.concurrent_tasks or 0,
                budget_usd=limits.budget_usd_per_day or 0.0,
                tasks_per_minute=limits.tasks_per_minute or 0 if count else 0,
                requests_per_minute=limits.requests_per_minute or 0 if count_request else 0,
                window_s=WINDOW_S,
            )
            if found.verdict in ("requests", "rate"):
                hit = Hit(allowed=False, count=found.running, retry_after_s=found.held_usd)
                if found.verdict == "requests":
                    raise _requests_refused(principal, limits.requests_per_minute or 0, hit)
                _tasks_per_minute(principal, limits, hit)
            # Counted once, whatever the tries (a seed verdict counted nothing).
            count = count_request = count and found.verdict == "seed"
            if found.verdict == "seed" and seeded < 3:  # the day's spend, from the database
                seeded += 1
                async with self._sessions() as session:
                    spent = await spend.spent_on(session=session, key_id=key_id, day=day)
                await holds.seed(key_id=key_id, day=day, spent_usd=spent.spent_usd if spent else 0)
                continue
            if found.verdict in ("held", "again"):
                return Admission(
                    task_id=task_id,
                    held=found.verdict == "held",
                    estimate_usd=estimate,
                    key_id=key_id,
                    in_redis=True,
                )
            load = spend.KeyLoad(
                running=found.running, held_usd=found.held_usd, spent_usd=found.spent_usd
            )
            refusal = _refusal(principal, limits, load, estimate, now) or LimitExceeded(
                BUDGET_EXCEEDED, f"API key {key_id} has no room for this task now"
            )
            if reconciled or ended is None:
                raise refusal
            reconciled = True
            old = await holds.old_holds(
                key_id=key_id,
                admitted_before_s=(now - RECONCILE_AFTER).timestamp(),
                limit=RECONCILE_MAX,
            )
            over = await ended(old) if old else {}
            if not over:
                raise refusal
            await holds.release(key_id=key_id, task_ids=over, day=day)
            log.info("holds of ended tasks released", key_id=key_id, tasks=sorted(over))

    def _outage(self, message: str, err: BaseException) -> None:
        if time.monotonic() - self._outage_logged > OUTAGE_LOG_EVERY_S:
            self._outage_logged = time.monotonic()
            log.warning(message, error=repr(err))

    async def _reconcile(self, key_id: str, ended: EndedCheck) -> bool:
        """Give back the holds of the key's tasks that ended unrecorded; whether any was."""
        async with self._sessions() as session:
            held = await spend.held_tasks(
                session=session,
                key_id=key_id,
                created_before=datetime.now(UTC) - RECONCILE_AFTER,
                limit=RECONCILE_MAX,
            )
            if not held:
                return False
            over = await ended(held)
            if not over:
                return False
            await spend.release_holds(session=session, ended=over)
        log.info("holds of ended tasks released", key_id=key_id, tasks=sorted(over))
        return True

    async def release(
        self, ended: Mapping[str, str | None], admission: Admission | None = None
    ) -> None:
        """Give back the holds of tasks whose workflow ended unrecorded or never started
        (``ended``: as :data:`EndedCheck` answers); ``admission``: where they were held."""
        if admission is not None and admission.in_redis and self.holds is not None:
            day = spend.day_of(datetime.now(UTC))
            await self.holds.release(key_id=admission.key_id, task_ids=ended, day=day)
            return
        async with self._sessions() as session:
            await spend.release_holds(session=session, ended=ended)

    async def aclose(self) -> None:
        await self.prices.aclose()
        await self.counter.aclose()
        if self.holds is not None:
            await self.holds.aclose()


def _requests_refused(principal: Principal, limit: int, hit: Hit) -> LimitExceeded:
    return LimitExceeded(
        RATE_LIMITED,
        f"API key {principal.key_id} made more than {limit} requests this minute (its "
        f"requests per minute); retry in {math.ceil(hit.retry_after_s)} s",
        retry_after_s=hit.retry_after_s,
        details=[_detail("requests_per_minute", f"{limit} requests a minute")],
    )


def _tasks_per_minute(principal: Principal, limits: KeyLimits, hit: Hit) -> None:
    if not hit.allowed:
        raise LimitExceeded(
            TASK_RATE_LIMITED,
            f"API key {principal.key_id} submitted more than {limits.tasks_per_minute} tasks "
            f"this minute (its tasks per minute); retry in {math.ceil(hit.retry_after_s)} s",
            retry_after_s=hit.retry_after_s,
            details=[_detail("tasks_per_minute", f"{limits.tasks_per_minute} tasks a minute")],
        )


def _refusal(
    principal: Principal, limits: KeyLimits, load: spend.KeyLoad, estimate: float, now: datetime
) -> LimitExceeded | None:
    """Why ``load`` (this task's hold included) is over the key's limits, if it is."""
    key = principal.key_id
    if limits.concurrent_tasks and load.running > limits.concurrent_tasks:
        return LimitExceeded(
            CONCURRENCY_LIMITED,
            f"API key {key} has {load.running - 1} tasks running, its limit of tasks at once; "
            "submit again when one has finished",
            details=[_detail("concurrent_tasks", f"{limits.concurrent_tasks} tasks at once")],
        )
    budget = limits.budget_usd_per_day
    if budget and load.spent_usd + load.held_usd > budget:
        others = load.held_usd - estimate
        midnight = datetime.combine(
            now.astimezone(UTC).date() + timedelta(days=1), datetime.min.time(), UTC
        )
        # Only tomorrow's budget lifts a refusal that running tasks do not account for.
        wait = (midnight - now).total_seconds() if load.spent_usd + estimate > budget else None
        return LimitExceeded(
            BUDGET_EXCEEDED,
            f"API key {key} would pass its budget of ${budget:g} a day: spent "
            f"${load.spent_usd:.6f} today (UTC), ${others:.6f} held by its running tasks, and "
            f"this task may cost up to ${estimate:.6f} (k experts at the dearest nodes' prices); "
            "the budget renews at 00:00 UTC, and a task with fewer experts or a shorter prompt "
            "may fit",
            retry_after_s=wait,
            details=[
                _detail("budget_usd_per_day", f"${budget:g} a day"),
                _detail("spent_usd", f"{load.spent_usd:.8f}", "amount"),
                _detail("held_usd", f"{others:.8f}", "amount"),
                _detail("estimate_usd", f"{estimate:.8f}", "amount"),
            ],
        )
    return None


def _detail(field: str, message: str, code: str = "limit") -> dict[str, str]:
    """An error detail: the limit that refused (``limit``), or an amount that counted
    (``amount``, in USD)."""
    return {"field": field, "code": code, "message": message}


def default_limits(settings: Settings) -> KeyLimits:
    """The limits of a key that has none of its own (``XPANDO_LIMIT_*``)."""
    return KeyLimits(
        requests_per_minute=settings.limit_requests_per_minute,
        tasks_per_minute=settings.limit_tasks_per_minute,
        concurrent_tasks=settings.limit_concurrent_tasks,
        budget_usd_per_day=settings.limit_budget_usd_per_day,
    )


def limiter_from_settings(settings: Settings, sessions: SessionFactory) -> Limiter:
    return Limiter(
        counter=counter_from_settings(settings, sessions),
        sessions=sessions,
        defaults=default_limits(settings),
        output_tokens=settings.limit_estimate_output_tokens,
        holds=RedisHolds(settings.redis_url) if settings.redis_url else None,
    )
