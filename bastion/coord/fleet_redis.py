"""Fleet coordination in the Redis the task locks use: milestones, budgets, pauses and guard counters shared by
sidecars on many hosts.

Every change that reads before it writes is one Lua script, so a budget's check and its reservation are one
atomic step however many sidecars reserve at once. Windows and milestone times are on the Redis server's
clock (`TIME` inside the scripts), so sidecar clocks never matter and every sidecar agrees on when a window
resets. The scripts build the names of per-window keys from that clock, which ties this store to one Redis
primary (as the lock store already is), not a Cluster.

Layout (all under the store's key prefix)::

    milestone:<key>                                 HASH  key, completed_ms, expires_ms, by, request_id
                                                          PEXPIREAT = expires_ms
    budget:<len>:<budget>:<window_start_ms>:<key>   HASH  budget, key, unit, limit, per_ms, window_start_ms,
                                                          used, reserved
                                                          PEXPIREAT = window end + one window (late settles)
    budgets                                         ZSET  budget hash name -> window end ms (listing without
                                                          SCAN; ended windows are pruned by `reserve`)
    pauses                                          HASH  agent -> JSON {reason, paused_by, paused_ms, action}
    guard:<len>:<guard>:<window_start_ms>:<agent>   STRING the window's count; PEXPIREAT = window end + 1 s

Names are free text (agents, ticket keys rendered from URLs), so a budget or guard id is length-prefixed and
the budget key or agent comes last: a name decodes one way only, and no crafted key reaches another budget's
counter.

Repeating a script after a lost reply (redis-py re-sends on a connection error): completing a milestone,
pausing, resuming and clearing are idempotent; a repeated reservation or count is counted twice (the safe
direction for a limit), and a repeated settle applies the difference again.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bastion.coord.fleet import (
    BudgetUsage,
    Exceeded,
    FleetStore,
    Milestone,
    Pause,
    PauseAction,
    Reservation,
    Unit,
)
from bastion.coord.redis import _glob_escape, _ms, redis_client
from bastion.coord.redis_batch import ScriptBatcher
from bastion.coord.store import DEFAULT_KEY_PREFIX, StoreUnavailable

T = TypeVar("T")

GUARD_MARGIN_MS = 1000
"""How long a guard counter outlives its window (ms): a count racing the window's end still finds it."""

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: milestone hash. ARGV: key, ttl ms, by, request id ('' = none). -> {completed_ms, expires_ms}
_COMPLETE = _NOW + """
local expires = now + tonumber(ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'key', ARGV[1], 'completed_ms', string.format('%d', now),
           'expires_ms', string.format('%d', expires), 'by', ARGV[3], 'request_id', ARGV[4])
redis.call('PEXPIREAT', KEYS[1], string.format('%d', expires))
return {now, expires}
"""

# KEYS: milestone hash. -> {key, completed_ms, expires_ms, by, request_id} of the removed milestone | nil
_CLEAR = """
local h = redis.call('HMGET', KEYS[1], 'key', 'completed_ms', 'expires_ms', 'by', 'request_id')
if not h[1] then return false end
redis.call('DEL', KEYS[1])
return h
"""

# KEYS: budgets index. ARGV: hash name up to the window start, budget key, budget id, unit, limit, per ms,
# amount. -> {1 admitted | 0 exceeded, used (after), window_start_ms, window_end_ms}
# The admission rule is `bastion.coord.fleet.admits`: keep the two alike.
_RESERVE = _NOW + """
local limit = tonumber(ARGV[5])
local per = tonumber(ARGV[6])
local amount = tonumber(ARGV[7])
local start = now - (now % per)
local ends = start + per
local name = ARGV[1] .. string.format('%d', start) .. ':' .. ARGV[2]
local exists = redis.call('EXISTS', name) == 1
local used = 0
if exists then used = tonumber(redis.call('HGET', name, 'used') or '0') end
local admitted
if ARGV[4] == 'calls' then admitted = used + amount <= limit else admitted = used < limit end
if not admitted and not exists then return {0, used, start, ends} end
if admitted then
  used = redis.call('HINCRBY', name, 'used', ARGV[7])
  -- tokens stay reserved until settled; a call is settled in full when admitted
  local in_flight = 0
  if ARGV[4] == 'tokens' then in_flight = amount end
  redis.call('HINCRBY', name, 'reserved', in_flight)
end
-- the window shows this call's limit, unit and length (a reload may have changed them)
redis.call('HSET', name, 'budget', ARGV[3], 'key', ARGV[2], 'unit', ARGV[4], 'limit', ARGV[5],
           'per_ms', ARGV[6], 'window_start_ms', string.format('%d', start))
redis.call('PEXPIREAT', name, string.format('%d', ends + per))
redis.call('ZADD', KEYS[1], string.format('%d', ends), name)
if not exists then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now)) end
return {admitted and 1 or 0, used, start, ends}
"""

# KEYS: budget hash. ARGV: reserved amount, actual usage. -> 1 settled | 0 the window is gone
_SETTLE = """
local h = redis.call('HMGET', KEYS[1], 'used', 'reserved')
if not h[1] then return 0 end
local amount = tonumber(ARGV[1])
local used = math.max(0, tonumber(h[1]) + tonumber(ARGV[2]) - amount)
local reserved = math.max(0, tonumber(h[2] or '0') - amount)
redis.call('HSET', KEYS[1], 'used', string.format('%d', used), 'reserved', string.format('%d', reserved))
return 1
"""

# KEYS: budgets index. -> {{budget, key, unit, limit, used, reserved, window_start_ms, window_end_ms}, ...}
# for every current window (read only).
_LIST_BUDGETS = _NOW + """
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%d', now), '+inf')
local out = {}
for _, name in ipairs(names) do
  local h = redis.call('HMGET', name, 'budget', 'key', 'unit', 'limit', 'used', 'reserved', 'window_start_ms',
                       'per_ms')
  if h[1] and h[7] and h[8] then
    local start = tonumber(h[7])
    local ends = start + tonumber(h[8])
    if start <= now and now < ends then
      out[#out + 1] = {h[1], h[2], h[3], h[4], h[5] or '0', h[6] or '0', h[7], string.format('%d', ends)}
    end
  end
end
return out
"""

# KEYS: pauses hash. ARGV: agent, reason, paused by, action. -> paused_ms
_PAUSE = _NOW + """
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({reason = ARGV[2], paused_by = ARGV[3], action = ARGV[4],
                                                   paused_ms = string.format('%d', now)}))
return now
"""

# KEYS: pauses hash. ARGV: agent. -> the lifted pause's JSON | nil
_RESUME = """
local doc = redis.call('HGET', KEYS[1], ARGV[1])
if not doc then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
return doc
"""

# ARGV: counter name up to the window start, agent, per ms, amount, margin ms. -> the window's total
_COUNT = _NOW + """
local per = tonumber(ARGV[3])
local start = now - (now % per)
local name = ARGV[1] .. string.format('%d', start) .. ':' .. ARGV[2]
local total = redis.call('INCRBY', name, ARGV[4])
redis.call('PEXPIREAT', name, string.format('%d', start + per + tonumber(ARGV[5])))
return total
"""

_MILESTONE_FIELDS = ("key", "completed_ms", "expires_ms", "by", "request_id")


def _milestone(key: str | None, completed_ms: str | None, expires_ms: str | None, by: str | None,
               request_id: str | None) -> Milestone | None:
    if key is None or completed_ms is None or expires_ms is None:
        return None  # expired (or cleared) between the listing and the read
    return Milestone(key=key, completed_at=int(completed_ms) / 1000, expires_at=int(expires_ms) / 1000,
                     by=by or "", request_id=request_id or None)


def _pause(agent: str, doc: str) -> Pause:
    fields = json.loads(doc)
    return Pause(agent=agent, reason=fields["reason"], paused_by=fields["paused_by"],
                 paused_at=int(fields["paused_ms"]) / 1000, action=cast(PauseAction, fields["action"]))


class RedisFleetStore(FleetStore):
    """`FleetStore` on one Redis primary. Build it with `from_url` (or `open_fleet_store`).

    The redis-py client reconnects by itself, so the same object works again once Redis is back; scripts are
    sent by SHA and reloaded on NOSCRIPT (a restarted Redis has an empty script cache).
    """

    backend = "redis"

    def __init__(self, client: Redis, *, key_prefix: str = DEFAULT_KEY_PREFIX, where: str = "redis") -> None:
        self._client = client
        self._prefix = key_prefix
        self._where = where
        self._complete_script = client.register_script(_COMPLETE)
        self._clear_script = client.register_script(_CLEAR)
        self._reserve_script = client.register_script(_RESERVE)
        self._settle_script = client.register_script(_SETTLE)
        self._list_budgets_script = client.register_script(_LIST_BUDGETS)
        self._pause_script = client.register_script(_PAUSE)
        self._resume_script = client.register_script(_RESUME)
        self._count_script = client.register_script(_COUNT)
        self._batch = ScriptBatcher(client)  # reservations: one per budgeted call, the hot path

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str = DEFAULT_KEY_PREFIX, timeout: float = 2.0,
                 retries: int = 2) -> RedisFleetStore:
        """A store on `url`, configured like `bastion.coord.redis.RedisLockStore.from_url`."""
        client, key_prefix, where = redis_client(url, key_prefix=key_prefix, client_name="bastion-fleet",
                                                 timeout=timeout, retries=retries)
        return cls(client, key_prefix=key_prefix, where=where)

    # -- keys ------------------------------------------------------------------------------------------------

    def _milestone_key(self, key: str) -> str:
        return f"{self._prefix}milestone:{key}"

    def _budget_head(self, budget: str) -> str:
        """A budget hash's name up to its window start; the script appends `<window_start_ms>:<key>`."""
        return f"{self._prefix}budget:{len(budget)}:{budget}:"

    def _guard_head(self, guard: str) -> str:
        """A guard counter's name up to its window start; the script appends `<window_start_ms>:<agent>`."""
        return f"{self._prefix}guard:{len(guard)}:{guard}:"

    @property
    def _budget_index(self) -> str:
        return f"{self._prefix}budgets"

    @property
    def _pauses(self) -> str:
        return f"{self._prefix}pauses"

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"fleet store {self._where} unavailable: {e}") from e

    # -- milestones ------------------------------------------------------------------------------------------

    async def _complete_milestone(self, key: str, ttl: float, by: str, request_id: str | None) -> Milestone:
        completed_ms, expires_ms = await self._call(self._complete_script(
            keys=[self._milestone_key(key)], args=[key, _ms(ttl), by, request_id or ""]))
        return Milestone(key=key, completed_at=int(completed_ms) / 1000, expires_at=int(expires_ms) / 1000,
                         by=by, request_id=request_id or None)

    async def _missing_milestones(self, keys: list[str]) -> list[str]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._milestone_key(key))
        found: list[Any] = await self._call(pipe.execute())
        return [key for key, exists in zip(keys, found, strict=True) if not int(exists)]

    async def _clear_milestone(self, key: str) -> Milestone | None:
        row = await self._call(self._clear_script(keys=[self._milestone_key(key)]))
        return None if row is None else _milestone(*row)

    async def _list_milestones(self) -> list[Milestone]:
        pattern = _glob_escape(self._prefix) + "milestone:*"

        async def scan() -> list[str]:
            return list(dict.fromkeys([k async for k in self._client.scan_iter(match=pattern, count=1000)]))

        names = await self._call(scan())
        if not names:
            return []
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, list(_MILESTONE_FIELDS))
        rows: list[Any] = await self._call(pipe.execute())
        return [m for m in (_milestone(*row) for row in rows) if m is not None]

    # -- budgets ---------------------------------------------------------------------------------------------

    async def _reserve(self, budget: str, key: str, unit: Unit, limit: int, per: float,
                       amount: int) -> Reservation | Exceeded:
        admitted, used, start_ms, end_ms = await self._call(self._batch.call(
            self._reserve_script, [self._budget_index],
            [self._budget_head(budget), key, budget, unit, limit, _ms(per), amount]))
        if not int(admitted):
            return Exceeded(budget=budget, key=key, unit=unit, limit=limit, used=int(used),
                            resets_at=int(end_ms) / 1000)
        return Reservation(budget=budget, key=key, unit=unit, amount=amount, limit=limit, used=int(used),
                           window_start=int(start_ms) / 1000, resets_at=int(end_ms) / 1000)

    async def _settle(self, reservation: Reservation, actual: int) -> None:
        r = reservation
        name = f"{self._budget_head(r.budget)}{round(r.window_start * 1000)}:{r.key}"
        await self._call(self._settle_script(keys=[name], args=[r.amount, actual]))

    async def _list_budgets(self) -> list[BudgetUsage]:
        rows = await self._call(self._list_budgets_script(keys=[self._budget_index]))
        return [BudgetUsage(budget=budget, key=key, unit=cast(Unit, unit), limit=int(limit), used=int(used),
                            reserved=int(reserved), window_start=int(start_ms) / 1000, resets_at=int(end_ms) / 1000)
                for budget, key, unit, limit, used, reserved, start_ms, end_ms in rows]

    # -- pauses ----------------------------------------------------------------------------------------------

    async def _pause(self, agent: str, reason: str, paused_by: str, action: PauseAction) -> Pause:
        paused_ms = await self._call(self._pause_script(keys=[self._pauses],
                                                        args=[agent, reason, paused_by, action]))
        return Pause(agent=agent, reason=reason, paused_by=paused_by, paused_at=int(paused_ms) / 1000,
                     action=action)

    async def _resume(self, agent: str) -> Pause | None:
        doc = await self._call(self._resume_script(keys=[self._pauses], args=[agent]))
        return None if doc is None else _pause(agent, doc)

    async def _list_pauses(self) -> list[Pause]:
        docs: dict[str, str] = await self._call(self._client.hgetall(self._pauses))  # type: ignore[misc]
        return [_pause(agent, doc) for agent, doc in docs.items()]

    # -- guard counters --------------------------------------------------------------------------------------

    async def _count(self, guard: str, agent: str, per: float, amount: int) -> int:
        total = await self._call(self._count_script(
            keys=[], args=[self._guard_head(guard), agent, _ms(per), amount, GUARD_MARGIN_MS]))
        return int(total)

    async def _ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        await self._batch.close()
        closer = getattr(self._client, "aclose", None) or self._client.close
        await closer()
