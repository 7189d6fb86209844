"""A key's running tasks and their worst-case costs in Redis, when ``XPANDO_REDIS_URL`` is set:
admitting a task costs one Redis call instead of a database transaction.

Per key, three Redis entries (prefix ``xpando:limit:<key id>:``):

- ``holds``: a hash, task id → the task's worst-case cost (USD) held against the budget while it
  runs; its length is the key's running tasks.
- ``held_at``: a sorted set, task id → when it was admitted (ms), to find old holds.
- ``spent:<day>``: what the key was charged on a UTC day, a copy of the database's
  ``key_spend`` row, read from the database when it is missing and kept ``SPENT_TTL_S``.

One Lua script admits a task atomically (the key's every replica calls the same Redis): the
load with this task (running tasks, held USD, spent today) against the key's limits, and, when
it fits, the hold. The database stays the truth for what was spent: the record step charges a
task there (``spend.charge_task``), then lifts the hold here and adds the charge to the day's
copy (only when it lifted the hold, so a retried record adds nothing twice). A hold whose
workflow ended without a record (terminated, timed out) is found when the key would be refused
(older than ``RECONCILE_AFTER``, asked of Temporal): lifted, and the day's copy dropped, to be
read again from the database.

What this trades: the copy of the day's spend can lag the database by a charge made in the
moment it is read (until it expires, ``SPENT_TTL_S``), and while Redis is unreachable the API
holds tasks in the database (``spend.hold_task``), where the two sets of holds do not see each
other's running tasks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from xpando.logs import get_logger

log = get_logger(__name__)

PREFIX = "xpando:limit:"
SPENT_TTL_S = 30
TIMEOUT_S = 0.5


def count_in_window(key: str, window_ms: str) -> str:
    """Lua that counts one in ``key``, whose window of ``window_ms`` opens at its first count:
    sets ``count`` and ``ttl`` (ms left of the window). The per-minute counters' one step."""
    return f"""local count = redis.call('INCR', {key})
local ttl = redis.call('PTTL', {key})
if ttl < 0 then
  redis.call('PEXPIRE', {key}, {window_ms})
  ttl = tonumber({window_ms})
end
"""


# KEYS: holds, held_at, spent, the key's tasks-per-minute and requests-per-minute counters.
# ARGV: task id, estimate, now (ms), concurrent limit, budget, tasks per minute, the counters'
# window (ms), requests per minute (each limit 0: none, or not counted this call). Returns
# {verdict, running, held, spent} as strings (Lua numbers would be truncated to integers on the
# way out): verdict is seed (no copy of the day's spend; nothing counted), requests or rate
# (over the requests or tasks per minute: then the count and the seconds left of the window),
# again (the task holds already), refused or held. The counters are RedisCounter's.
_ADMIT = (
    """
local spent = redis.call('GET', KEYS[3])
if not spent then return {'seed', '0', '0', '0'} end
local requests = tonumber(ARGV[8])
if requests > 0 then
"""
    + count_in_window("KEYS[5]", "ARGV[7]")
    + """
  if count > requests then return {'requests', tostring(count), tostring(ttl / 1000), '0'} end
end
local per_minute = tonumber(ARGV[6])
if per_minute > 0 then
"""
    + count_in_window("KEYS[4]", "ARGV[7]")
    + """
  if count > per_minute then return {'rate', tostring(count), tostring(ttl / 1000), '0'} end
end
local held = tonumber(ARGV[2])
local values = redis.call('HVALS', KEYS[1])
for _, v in ipairs(values) do held = held + tonumber(v) end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return {'again', tostring(#values), tostring(held - tonumber(ARGV[2])), spent}
end
local running = #values + 1
local concurrent = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
if (concurrent > 0 and running > concurrent) or (budget > 0 and tonumber(spent) + held > budget)
then
  return {'refused', tostring(running), tostring(held), spent}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {'held', tostring(running), tostring(held), spent}
"""
)

# KEYS: holds, held_at, spent. ARGV: task id, charged USD. Lifts the task's hold; when it was
# there, adds the charge to the day's copy (if the copy is there: else it is read anew).
_LIFT = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('INCRBYFLOAT', KEYS[3], ARGV[2])
end
return 1
"""


def _keys(key_id: str, day: str) -> list[str]:
    base = f"{PREFIX}{key_id}:"
    return [base + "holds", base + "held_at", f"{base}spent:{day}"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the admission script found: ``verdict`` (seed, again, refused, held) and the key's
    load with the task (running tasks, USD held, USD spent today)."""

    verdict: str
    running: int
    held_usd: float
    spent_usd: float


class RedisHolds:
    """The key's holds in Redis (see the module's docstring). Raises ``RedisError`` or
    ``OSError`` when Redis does not answer: the caller decides what an outage means."""

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
        )
        self._admit = self._redis.register_script(_ADMIT)
        self._lift = self._redis.register_script(_LIFT)

    async def admit(
        self,
        *,
        key_id: str,
        task_id: str,
        estimate_usd: float,
        day: str,
        concurrent: int,
        budget_usd: float,
        tasks_per_minute: int = 0,
        requests_per_minute: int = 0,
        window_s: float = 60.0,
    ) -> Verdict:
        """Admit the task (see ``_ADMIT``), counting the request and the task in the key's
        per-minute counters when their limits are given (for a requests or rate verdict,
        ``running`` is the count and ``held_usd`` the seconds left of the window)."""
        found: list[Any] = await self._admit(
            keys=[*_keys(key_id, day), f"{PREFIX}{key_id}:tasks", f"{PREFIX}{key_id}:requests"],
            args=[
                task_id,
                repr(estimate_usd),
                int(time.time() * 1000),
                concurrent,
                budget_usd,
                tasks_per_minute,
                int(window_s * 1000),
                requests_per_minute,
            ],
        )
        verdict, running, held, spent = (v.decode() if isinstance(v, bytes) else v for v in found)
        return Verdict(str(verdict), int(running), float(held), float(spent))

    async def seed(self, *, key_id: str, day: str, spent_usd: float) -> None:
        """Set the copy of the key's spend on ``day`` (read from the database) unless another
        replica just did."""
        await self._redis.set(_keys(key_id, day)[2], repr(spent_usd), nx=True, ex=SPENT_TTL_S)

    async def lift(self, *, key_id: str, task_id: str, day: str, charged_usd: float) -> bool:
        """Lift the task's hold and count its charge in the day's copy; whether it held."""
        return bool(await self._lift(keys=_keys(key_id, day), args=[task_id, repr(charged_usd)]))

    async def old_holds(self, *, key_id: str, admitted_before_s: float, limit: int) -> list[str]:
        """The key's oldest ``limit`` holds admitted before ``admitted_before_s`` (epoch s)."""
        found = await self._redis.zrangebyscore(
            _keys(key_id, "")[1], "-inf", int(admitted_before_s * 1000), start=0, num=limit
        )
        return [t.decode() if isinstance(t, bytes) else str(t) for t in found]

    async def held(self, *, key_id: str) -> dict[str, float]:
        """The key's running tasks and what each holds."""
        found = await self._redis.hgetall(_keys(key_id, "")[0])
        return {
            (t.decode() if isinstance(t, bytes) else str(t)): float(v) for t, v in found.items()
        }

    async def release(self, *, key_id: str, task_ids: Iterable[str], day: str) -> None:
        """Lift the holds of tasks that ended unrecorded or never started, and drop the day's
        copy of the spend (read again from the database, which has whatever they were charged)."""
        holds, held_at, spent = _keys(key_id, day)
        ids = list(task_ids)
        if not ids:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(holds, *ids)
            pipe.zrem(held_at, *ids)
            pipe.delete(spent)
            await pipe.execute()

    async def aclose(self) -> None:
        await self._redis.aclose()
