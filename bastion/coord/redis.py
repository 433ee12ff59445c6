"""Task locks in one Redis primary, for a fleet of sidecars on many hosts.

Every state change is one Lua script, so it is atomic without MULTI/WATCH round trips, and each script is
idempotent because redis-py retries a command whose reply was lost (a connection killed mid-call): a repeated
grant is a renewal of the same fence, a repeated handoff is the same offer, a repeated release finds nothing.

Layout (`{...}` is a Redis Cluster hash tag, so both keys of one lock live in one slot)::

    <prefix>lock:{<key>}    HASH    key, owner, fence, state (held|offered), to, acquired_ms
                                    PEXPIRE = the lease (or the handoff offer)
    <prefix>fence:{<key>}   STRING  the last fence issued for <key>; expires FENCE_RETENTION after it

Fence = max(last + 1, Redis TIME in microseconds). A plain INCR counter restarts from 1 when Redis comes back
without its data (no AOF, a failover before replication) and hands out a fence that was already used; the
clock term keeps fences increasing across such a restart as long as the Redis host's clock does not step
backwards, and the `last + 1` term keeps them unique even if it does. The same argument lets the fence key
expire a day after its last grant instead of piling up one key per ticket forever.

Leases are measured on the Redis server's clock, so sidecar clocks never matter. Run Redis with
`maxmemory-policy noeviction` (lock keys carry TTLs, which `volatile-*` policies evict first). Requires Redis 5+
(scripts replicated by effects, so TIME may precede writes).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import RedisError

from bastion.coord.store import (
    DEFAULT_KEY_PREFIX,
    Conflict,
    Lease,
    LockInfo,
    LockStore,
    StoreUnavailable,
    StoreURLError,
)
from bastion.coord.urls import redact_url

T = TypeVar("T")

FENCE_RETENTION_MS = 24 * 3600 * 1000

# KEYS: lock hash, fence key. ARGV: agent, ttl_ms, key name, fence retention ms.
# -> {1, fence, pttl, acquired_ms} new grant or claim | {2, fence, pttl, acquired_ms} renewal
#    | {0, holder, pttl, pending 0/1} conflict
_ACQUIRE = """
local ttl = tonumber(ARGV[2])
if not ttl or ttl <= 0 then return redis.error_reply('ERR bastion: ttl must be > 0 ms') end
local h = redis.call('HMGET', KEYS[1], 'owner', 'fence', 'state', 'to', 'acquired_ms')
if h[1] then
  if h[3] == 'held' and h[1] == ARGV[1] then
    local pttl = redis.call('PTTL', KEYS[1])
    if pttl < ttl then
      redis.call('PEXPIRE', KEYS[1], ttl)
      pttl = ttl
    end
    return {2, h[2], pttl, h[5] or '0'}
  end
  if h[3] == 'offered' then
    if h[4] ~= ARGV[1] then return {0, h[4], redis.call('PTTL', KEYS[1]), 1} end
  else
    return {0, h[1], redis.call('PTTL', KEYS[1]), 0}
  end
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local fence = string.format('%d', math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, now_us))
local acquired = string.format('%d', math.floor(now_us / 1000))
redis.call('SET', KEYS[2], fence, 'PX', ARGV[4])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'key', ARGV[3], 'owner', ARGV[1], 'fence', fence, 'state', 'held',
           'acquired_ms', acquired)
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, fence, ttl, acquired}
"""

# KEYS: lock hash. ARGV: agent, fence ('' = any grant of this agent). -> 1 released | 0 not the holder
_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'fence', 'state')
if h[1] == ARGV[1] and h[3] == 'held' and (ARGV[2] == '' or h[2] == ARGV[2]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: lock hash. -> {owner, fence, state, to, acquired_ms, pttl} of the freed lock | nil if free
_ADMIN_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'fence', 'state', 'to', 'acquired_ms')
if not h[1] then return false end
local pttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
return {h[1], h[2], h[3], h[4] or '', h[5] or '0', pttl}
"""

# KEYS: lock hash. ARGV: recipient, offer ttl ms. -> {owner, fence, state, to, acquired_ms, pttl} | nil if free
_HANDOFF = """
local ttl = tonumber(ARGV[2])
if not ttl or ttl <= 0 then return redis.error_reply('ERR bastion: ttl must be > 0 ms') end
local h = redis.call('HMGET', KEYS[1], 'owner', 'fence', 'acquired_ms')
if not h[1] then return false end
redis.call('HSET', KEYS[1], 'state', 'offered', 'to', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return {h[1], h[2], 'offered', ARGV[1], h[3] or '0', ttl}
"""

_FIELDS = ("owner", "fence", "state", "to", "acquired_ms")


def _split_prefix(url: str, default: str) -> tuple[str, str]:
    """Take Bastion's own `prefix` query parameter out of a Redis URL; redis-py would not understand it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    if not prefixes:
        return url, default
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefixes[-1]


POOL_SIZE = 64
"""Connections one store object opens to Redis at most. A burst of calls beyond that queues for a connection
(up to the store's timeout) instead of failing: Redis answers each in microseconds."""


def redis_client(url: str, *, key_prefix: str, client_name: str = "bastion", timeout: float = 2.0,
                 retries: int = 2) -> tuple[Redis, str, str]:
    """(client, key prefix, URL without password) for a store URL; see `RedisLockStore.from_url`."""
    url, key_prefix = _split_prefix(url, key_prefix)
    where = redact_url(url)
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=timeout,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(EqualJitterBackoff(cap=0.25, base=0.025), retries),
            client_name=client_name,
        )
    except ValueError as e:
        raise StoreURLError(f"bad store URL {where!r}: {e}") from None
    return Redis.from_pool(pool), key_prefix, where


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _glob_escape(text: str) -> str:
    """Escape SCAN MATCH metacharacters so a prefix like `test[1]:` matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisLockStore(LockStore):
    """`LockStore` on one Redis primary. Build it with `from_url` (or `bastion.coord.open_store`).

    The redis-py client reconnects by itself, so the same object works again once Redis is back; scripts are
    sent by SHA and reloaded on NOSCRIPT (a restarted Redis has an empty script cache).
    """

    backend = "redis"

    def __init__(self, client: Redis, *, key_prefix: str = DEFAULT_KEY_PREFIX, where: str = "redis") -> None:
        self._client = client
        self._prefix = key_prefix
        self._where = where
        self._acquire_script = client.register_script(_ACQUIRE)
        self._release_script = client.register_script(_RELEASE)
        self._admin_release_script = client.register_script(_ADMIN_RELEASE)
        self._handoff_script = client.register_script(_HANDOFF)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        client_name: str = "bastion",
        timeout: float = 2.0,
        retries: int = 2,
    ) -> RedisLockStore:
        """A store on `url` (`redis://`, `rediss://`; user, password and `/db` as redis-py accepts them).

        A `prefix` query parameter (`redis://host:6379/0?prefix=staging:`) overrides `key_prefix`, so
        deployments sharing one Redis keep apart through configuration alone.

        `timeout` bounds each connect and each reply (seconds) and `retries` how often a command is re-sent
        after a connection error, so a dead Redis turns into `StoreUnavailable` within a few seconds instead of
        redis-py's default ten retries. `client_name` shows up in `CLIENT LIST`.
        """
        client, key_prefix, where = redis_client(url, key_prefix=key_prefix, client_name=client_name,
                                                 timeout=timeout, retries=retries)
        return cls(client, key_prefix=key_prefix, where=where)

    def _lock_key(self, key: str) -> str:
        return f"{self._prefix}lock:{{{key}}}"

    def _fence_key(self, key: str) -> str:
        return f"{self._prefix}fence:{{{key}}}"

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"lock store {self._where} unavailable: {e}") from e

    async def _acquire(self, key: str, agent: str, ttl: float) -> Lease | Conflict:
        status, value, pttl, extra = await self._call(self._acquire_script(
            keys=[self._lock_key(key), self._fence_key(key)],
            args=[agent, _ms(ttl), key, FENCE_RETENTION_MS],
        ))
        expires_at = time.time() + int(pttl) / 1000
        if int(status) == 0:
            return Conflict(key=key, holder=value, expires_at=expires_at, pending=bool(int(extra)))
        return Lease(key=key, agent=agent, fence=int(value), acquired_at=int(extra) / 1000,
                     expires_at=expires_at, renewed=int(status) == 2)

    async def _verify(self, key: str, agent: str, fence: int) -> bool:
        owner, held_fence, state = await self._call(
            self._client.hmget(self._lock_key(key), ["owner", "fence", "state"]))
        return owner == agent and state == "held" and held_fence == str(fence)

    async def _release(self, key: str, agent: str, fence: int | None) -> bool:
        freed = await self._call(self._release_script(
            keys=[self._lock_key(key)], args=[agent, "" if fence is None else str(fence)]))
        return int(freed) == 1

    async def _admin_release(self, key: str) -> LockInfo | None:
        row = await self._call(self._admin_release_script(keys=[self._lock_key(key)]))
        return None if row is None else _info(key, *row)

    async def _handoff(self, key: str, to_agent: str, ttl: float) -> LockInfo | None:
        row = await self._call(self._handoff_script(keys=[self._lock_key(key)], args=[to_agent, _ms(ttl)]))
        return None if row is None else _info(key, *row)

    async def _get(self, key: str) -> LockInfo | None:
        found = await self._read([self._lock_key(key)])
        return found[0] if found else None

    async def _list_locks(self) -> list[LockInfo]:
        pattern = _glob_escape(self._prefix) + "lock:*"

        async def scan() -> list[str]:
            return list(dict.fromkeys([k async for k in self._client.scan_iter(match=pattern, count=1000)]))

        return await self._read(await self._call(scan()))

    async def _read(self, hash_keys: list[str]) -> list[LockInfo]:
        """HMGET + PTTL for each hash in one round trip; locks that expire meanwhile are left out."""
        if not hash_keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for hash_key in hash_keys:
            pipe.hmget(hash_key, ["key", *_FIELDS])
            pipe.pttl(hash_key)
        replies: list[Any] = await self._call(pipe.execute())
        found = []
        for (name, *fields), pttl in zip(replies[::2], replies[1::2], strict=True):
            info = _info(name, *fields, pttl) if name is not None else None
            if info is not None:
                found.append(info)
        return found

    async def _ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        closer = getattr(self._client, "aclose", None) or self._client.close
        await closer()


def _info(key: str, owner: str | None, fence: str | None, state: str | None, to: str | None,
          acquired_ms: str | None, pttl: int | str) -> LockInfo | None:
    """A `LockInfo` from the hash fields, or None when the lock vanished or has no expiry left."""
    if owner is None or fence is None or int(pttl) <= 0:
        return None
    return LockInfo(
        key=key,
        holder=owner,
        fence=int(fence),
        acquired_at=int(acquired_ms or 0) / 1000,
        expires_at=time.time() + int(pttl) / 1000,
        handoff_to=(to or None) if state == "offered" else None,
    )
