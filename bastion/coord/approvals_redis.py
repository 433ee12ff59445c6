"""Approvals in the Redis the task locks use, for a fleet of sidecars on many hosts.

Layout (all under the store's key prefix)::

    approval:<id>          STRING  the record as JSON; expires RETENTION after its last change (later for a
                                   pending approval whose timeout is further away)
    approval-head:<fp>     STRING  the id of the fingerprint's one live approval; same expiry
    approvals              ZSET    id -> created_at, newest first for listings
    approvals-pending      ZSET    id -> expires_at of the approvals stored as pending (score > now: waiting)
    approval-grant:<id>    STRING  a grant as JSON; expires when the grant ends
    approval-grants        ZSET    id -> until

Each change is an optimistic transaction: WATCH the record (and the head), read it, compute the transition
in Python (the same functions as SQLite's), MULTI/EXEC; a concurrent change makes EXEC fail and the step is
retried on the new state. That keeps one state machine for both backends; approvals change a few times in
their life, so conflicts are rare. Index entries whose record expired are dropped when a listing meets them.
"""

from __future__ import annotations

import math
import time
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from bastion.coord.approvals import RETENTION, Approval, ApprovalStore, Grant, Mutation
from bastion.coord.redis import redis_client
from bastion.coord.store import DEFAULT_KEY_PREFIX, StoreUnavailable

T = TypeVar("T")

_MAX_RETRIES = 64
_SCAN_LIMIT = 5000


class RedisApprovalStore(ApprovalStore):
    """`ApprovalStore` on one Redis primary. Build it with `from_url` (or `open_approval_store`)."""

    backend = "redis"

    def __init__(self, client: Redis, *, key_prefix: str = DEFAULT_KEY_PREFIX, where: str = "redis") -> None:
        self._client = client
        self._prefix = key_prefix
        self._where = where

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str = DEFAULT_KEY_PREFIX, timeout: float = 2.0,
                 retries: int = 2) -> RedisApprovalStore:
        client, key_prefix, where = redis_client(url, key_prefix=key_prefix, client_name="bastion-approvals",
                                                 timeout=timeout, retries=retries)
        return cls(client, key_prefix=key_prefix, where=where)

    # -- keys ------------------------------------------------------------------------------------------------

    def _key(self, approval_id: str) -> str:
        return f"{self._prefix}approval:{approval_id}"

    def _head(self, fingerprint: str) -> str:
        return f"{self._prefix}approval-head:{fingerprint}"

    @property
    def _index(self) -> str:
        return f"{self._prefix}approvals"

    @property
    def _pending(self) -> str:
        return f"{self._prefix}approvals-pending"

    def _grant_key(self, grant_id: str) -> str:
        return f"{self._prefix}approval-grant:{grant_id}"

    @property
    def _grant_index(self) -> str:
        return f"{self._prefix}approval-grants"

    async def _call(self, call: Any) -> Any:
        try:
            return await call
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"approval store {self._where} unavailable: {e}") from e

    # -- writes ----------------------------------------------------------------------------------------------

    def _queue_save(self, pipe: Any, a: Approval, *, head: bool) -> None:
        ttl = math.ceil(max(RETENTION, a.expires_at - time.time() + RETENTION))
        pipe.set(self._key(a.id), a.to_doc(), ex=ttl)
        if head:
            pipe.set(self._head(a.fingerprint), a.id, ex=ttl)
        pipe.zadd(self._index, {a.id: a.created_at})
        if a.state == "pending":
            pipe.zadd(self._pending, {a.id: a.expires_at})
            pipe.zremrangebyscore(self._pending, "-inf", time.time() - RETENTION)  # long expired, never looked at
        else:
            pipe.zrem(self._pending, a.id)

    async def _transact(self, watch: list[str], step: Any) -> Any:
        """Run `step(pipe)` (reads, then `pipe.multi()` and queued writes) until EXEC goes through."""
        async def attempt() -> Any:
            async with self._client.pipeline(transaction=True) as pipe:
                for _ in range(_MAX_RETRIES):
                    try:
                        await pipe.watch(*watch)
                        result = await step(pipe)
                        if pipe.explicit_transaction:
                            await pipe.execute()
                        return result
                    except WatchError:
                        continue
                raise StoreUnavailable(f"approval store {self._where}: too much contention on {watch[0]}")

        return await self._call(attempt())

    async def _update(self, approval_id: str, fn: Mutation[T]) -> T:
        key = self._key(approval_id)

        async def step(pipe: Any) -> T:
            raw = await pipe.get(key)
            after, result = fn(None if raw is None else Approval.from_doc(raw))
            if after is not None:
                pipe.multi()
                self._queue_save(pipe, after, head=False)
            return result

        return await self._transact([key], step)  # type: ignore[no-any-return]

    async def _update_head(self, fingerprint: str, fn: Mutation[T]) -> T:
        head_key = self._head(fingerprint)

        async def step(pipe: Any) -> T:
            head_id = await pipe.get(head_key)
            head = None
            if head_id is not None:
                await pipe.watch(self._key(head_id))
                raw = await pipe.get(self._key(head_id))
                head = None if raw is None else Approval.from_doc(raw)
            after, result = fn(head)
            if after is not None:
                pipe.multi()
                self._queue_save(pipe, after, head=True)
            return result

        return await self._transact([head_key], step)  # type: ignore[no-any-return]

    # -- reads -----------------------------------------------------------------------------------------------

    async def _read(self, approval_ids: list[str]) -> list[Approval]:
        docs = await self._call(self._client.mget([self._key(i) for i in approval_ids]))
        return [Approval.from_doc(d) for d in docs if d is not None]

    async def _recent(self, state: str | None, limit: int, now: float) -> list[Approval]:
        if state == "pending":
            ids = await self._call(self._client.zrangebyscore(self._pending, f"({now}", "+inf", start=0,
                                                              num=_SCAN_LIMIT))
            found = await self._read(ids) if ids else []
            found.sort(key=lambda a: a.created_at, reverse=True)
            return [a for a in found if a.state == "pending"][:limit]
        out: list[Approval] = []
        start = 0
        while len(out) < limit and start < _SCAN_LIMIT:
            ids = await self._call(self._client.zrevrange(self._index, start, start + 499))
            if not ids:
                break
            start += len(ids)
            docs = await self._call(self._client.mget([self._key(i) for i in ids]))
            gone = [i for i, d in zip(ids, docs, strict=True) if d is None]
            if gone:
                await self._call(self._client.zrem(self._index, *gone))
                start -= len(gone)
            for d in docs:
                if d is None:
                    continue
                a = Approval.from_doc(d)
                if state is None or a.state == state or (state, a.state) in (("expired", "pending"),
                                                                             ("lapsed", "approved")):
                    out.append(a)
        return out[:limit]

    async def _decided(self, approval_ids: list[str], now: float) -> list[str]:
        scores = await self._call(self._client.zmscore(self._pending, approval_ids))
        return [i for i, score in zip(approval_ids, scores, strict=True) if score is None or float(score) <= now]

    async def _count_pending(self, now: float) -> int:
        return int(await self._call(self._client.zcount(self._pending, f"({now}", "+inf")))

    # -- grants ----------------------------------------------------------------------------------------------

    async def _put_grant(self, grant: Grant) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._grant_key(grant.id), grant.to_doc(), pxat=math.ceil(grant.until * 1000))
        pipe.zadd(self._grant_index, {grant.id: grant.until})
        pipe.zremrangebyscore(self._grant_index, "-inf", time.time())
        await self._call(pipe.execute())

    async def _grants(self, now: float) -> list[Grant]:
        ids = await self._call(self._client.zrangebyscore(self._grant_index, f"({now}", "+inf"))
        if not ids:
            return []
        docs = await self._call(self._client.mget([self._grant_key(i) for i in ids]))
        return [Grant.from_doc(d) for d in docs if d is not None]

    async def _delete_grant(self, grant_id: str) -> Grant | None:
        pipe = self._client.pipeline(transaction=True)
        pipe.getdel(self._grant_key(grant_id))
        pipe.zrem(self._grant_index, grant_id)
        doc, _ = await self._call(pipe.execute())
        return None if doc is None else Grant.from_doc(doc)

    async def _ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        closer = getattr(self._client, "aclose", None) or self._client.close
        await closer()
