"""Task locks on the proxy: take the locks a decision names before forwarding, free them after a 2xx.

A rule's `lock` keeps two agents off the same ticket; the lock lives in the shared store (`bastion.coord`), so
every sidecar of a fleet sees it. For an agent request whose decision carries locks or releases (the
`lock` obligation), this addon, in its `request` hook:

1. takes or renews each `lock` key for the agent (`store.acquire`). Another agent's lock (or a lock handed
   off to another agent) refuses the request with 423 `lock_conflict`, naming the holder and when the lock
   expires, and with `x-should-retry: false` so SDKs do not retry blindly;
2. checks each `release` key no `lock` rule names: the caller must hold the lock, or the lock must be free.
   A lock held by (or on offer to) another agent refuses the request with 423 before anything is sent: an
   agent must not close a ticket someone else is working on. A free lock is not taken (there is nothing
   to release afterwards); a lock on offer to the caller is claimed, as its next request would;
3. makes the store's confirmation of every lease the very last step before forwarding, so a lease lost
   meanwhile is noticed before the upstream sees anything: keys taken before the last one are re-checked
   with `store.verify` (they may have been lost while later keys were taken); the last key's own acquire or
   holder check is that confirmation already, as nothing is awaited between it and the forward;
4. sends the fencing tokens upstream in `Bastion-Fence` (see `FENCE_HEADER`), so an upstream that remembers
   the highest fence per resource can refuse a late write from a holder whose lease ended in flight.

In its `response` hook it frees each `release` key the caller held, once the upstream answered 2xx, and
only under the grant (fence) that was checked before forwarding, so it never frees a later grant; any
other answer (or none) frees nothing, so a failed close keeps the ticket with its agent. The release is
awaited before the answer goes back to the agent (for an answer Bastion streams, before its end), so the
agent's next step already sees the lock free.

A request refused here leaves no new lock behind: grants it made are given back. The store being down
refuses lock-guarded calls with 503 `store_unavailable` (fail closed) while other calls pass; the store
object reconnects by itself, so locks work again as soon as the store is back.

Place the addon after identity, enforcement, the network guard and approvals, right before the gate: a lock
is taken only for a call that is otherwise ready to go, never for one still waiting for a human (a call with
a pending `approval` obligation is left alone, and the gate refuses it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from bastion.coord.store import Conflict, LockStore, StoreUnavailable, iso_time
from bastion.metrics import LOCK_CONFLICTS
from bastion.policy.decision import Decision
from bastion.proxy import flowmeta, responses

log = logging.getLogger("bastion.locks")

LOCK_CONFLICT = "lock_conflict"

FENCE_HEADER = "Bastion-Fence"
"""Sent upstream with every request forwarded under a task lock: the fencing token of each lock the request
holds, comma-separated when there are several, in the decision's order (its `lock` keys as the engine lists
them, which is by rule id, then the `release` keys the caller held). Fences are decimal integers that
strictly increase per key with each new grant; a renewal keeps the fence. Agents cannot set this header:
whatever they send under this name is removed from every request."""

STORE_RETRY_AFTER = 5
"""`Retry-After` (seconds) of a 503 `store_unavailable`: about how long a store failover or restart takes."""

LOCKS_GAUGE_INTERVAL = 10.0
"""How often `bastion_locks_held` is refreshed from the store (seconds)."""


@dataclass(slots=True)
class _Need:
    """One key a request must hold: `ttl` is set for a `lock` key, None for a key only a `release` names."""

    key: str
    rule: str
    ttl: float | None
    release: bool


@dataclass(slots=True)
class _Held:
    """What the store said about one key: `fence` None means a release key that was free."""

    need: _Need
    fence: int | None = None
    expires_at: float | None = None
    renewed: bool = False
    granted: bool = False  # a new grant by this very request: given back if the request is refused


class _Refused(Exception):
    """The request was answered with a refusal; grants it made must be given back."""


def plan(decision: Decision) -> list[_Need]:
    """The keys a decision needs, each once, in the decision's order (locks, then release-only keys).

    Two rules locking the same key take it once with the longer ttl; a key that is both locked and released
    by the request is taken (or renewed) first and freed after a 2xx.
    """
    needs: dict[str, _Need] = {}
    for lock in decision.locks:
        need = needs.get(lock.key)
        if need is None:
            needs[lock.key] = _Need(lock.key, lock.rule, lock.ttl, False)
        else:
            need.ttl = max(need.ttl or 0.0, lock.ttl)
    for release in decision.releases:
        need = needs.get(release.key)
        if need is None:
            needs[release.key] = _Need(release.key, release.rule, None, True)
        else:
            need.release = True
    return list(needs.values())


def _event(flow: http.HTTPFlow, event: str, key: str, **fields: Any) -> None:
    flow.metadata.setdefault(flowmeta.LOCK_EVENTS, []).append({"event": event, "key": key, **fields})


def _seconds_until(epoch: float) -> int:
    return max(1, math.ceil(epoch - time.time()))


class TaskLocks:
    """mitmproxy addon: acquire, check and release the task locks of each agent request (module docstring)."""

    def __init__(self, store: LockStore) -> None:
        self.store = store

    # -- request --------------------------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Returns an awaitable only for requests that need the store (the common path stays synchronous)."""
        headers = flow.request.headers
        if FENCE_HEADER in headers:
            del headers[FENCE_HEADER]  # only Bastion speaks for the lock
        if flow.response is not None:
            return None
        pending = flow.metadata.get(flowmeta.OBLIGATIONS)
        if not pending or flowmeta.OBLIGATION_LOCK not in pending or flowmeta.OBLIGATION_APPROVAL in pending:
            return None
        return self._enforce(flow)

    async def _enforce(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        agent: str = meta[flowmeta.AGENT]
        needs = plan(meta[flowmeta.DECISION])
        held: list[_Held] = []
        try:
            for need in needs:
                held.append(await self._take(flow, agent, need))
            await self._verify(flow, agent, held)  # the last await before the request leaves
        except _Refused:
            await self._give_back(flow, agent, held)
            return
        except StoreUnavailable as e:
            # No give-back: the store cannot answer now, and the new leases end by themselves.
            self._store_unavailable(flow, needs, e)
            return
        except ValueError as e:  # a key the store refuses (too long): the rule rendered something unusable
            await self._give_back(flow, agent, held)
            responses.refuse(flow, 400, responses.BAD_REQUEST, f"Cannot use this task lock: {e}.",
                             rule=needs[0].rule)
            return
        except Exception:
            log.exception("task lock handling failed (request_id=%s)", meta.get(flowmeta.REQUEST_ID))
            responses.refuse(flow, 500, responses.INTERNAL_ERROR,
                             "Bastion could not handle the task lock of this request; it was not forwarded.")
            return
        meta[flowmeta.OBLIGATIONS].discard(flowmeta.OBLIGATION_LOCK)
        fences = [str(h.fence) for h in held if h.fence is not None]
        if fences:
            flow.request.headers[FENCE_HEADER] = ",".join(fences)
        meta[flowmeta.LOCKS] = [
            {"key": h.need.key, "rule": h.need.rule, "fence": h.fence, "renewed": h.renewed,
             "expires_at": None if h.expires_at is None else iso_time(h.expires_at), "release": h.need.release}
            for h in held
        ]

    async def _take(self, flow: http.HTTPFlow, agent: str, need: _Need) -> _Held:
        """Acquire or renew a lock key; check (or claim) a release-only key. Raises `_Refused` on a conflict."""
        key = need.key
        if need.ttl is not None:
            result = await self.store.acquire(key, agent, need.ttl)
        else:
            info = await self.store.get(key)
            if info is None:
                _event(flow, "checked", key, rule=need.rule, fence=None, holder=None)
                return _Held(need)
            if info.handoff_to is None and info.holder == agent:
                _event(flow, "checked", key, rule=need.rule, fence=info.fence, holder=agent)
                return _Held(need, info.fence, info.expires_at)
            if info.handoff_to == agent:  # handed to the caller: claim it, for as long as the offer had left
                result = await self.store.acquire(key, agent, max(1.0, info.expires_at - time.time()))
            else:
                result = Conflict(key, info.handoff_to or info.holder, info.expires_at, info.handoff_to is not None)
        if isinstance(result, Conflict):
            _event(flow, "conflict", key, rule=need.rule, holder=result.holder,
                   expires_at=iso_time(result.expires_at), pending=result.pending)
            self._conflict(flow, need, result.holder, result.expires_at, pending=result.pending)
            raise _Refused
        _event(flow, "renewed" if result.renewed else "acquired", key, rule=need.rule, fence=result.fence,
               expires_at=iso_time(result.expires_at))
        return _Held(need, result.fence, result.expires_at, result.renewed,
                     granted=not result.renewed and need.ttl is not None)

    async def _verify(self, flow: http.HTTPFlow, agent: str, held: list[_Held]) -> None:
        """Re-check every grant the store confirmed *before* the last store call, all at once.

        The last key's own store call (its acquire, or its holder check) is the final look at the store
        before forwarding and proves its lease as of then: verifying it again would narrow nothing and cost a
        round trip on every guarded request. Earlier keys may have been lost while later ones were taken.
        """
        checks = [(h, h.fence) for h in held[:-1] if h.fence is not None]
        if not checks:
            return
        if len(checks) == 1:  # the common case, without gather's task overhead
            ok = [await self.store.verify(checks[0][0].need.key, agent, checks[0][1])]
        else:
            ok = await asyncio.gather(*(self.store.verify(h.need.key, agent, fence) for h, fence in checks))
        lost = next((h for (h, _), still in zip(checks, ok, strict=True) if not still), None)
        if lost is None:
            return
        key = lost.need.key
        _event(flow, "lost", key, rule=lost.need.rule, fence=lost.fence)
        now = await self.store.get(key)
        holder = None if now is None else now.handoff_to or now.holder
        self._conflict(flow, lost.need, holder, None if now is None else now.expires_at,
                       pending=now is not None and now.handoff_to is not None, lost=True)
        raise _Refused

    async def _give_back(self, flow: http.HTTPFlow, agent: str, held: list[_Held]) -> None:
        """Release the grants a refused request made, so a refusal never leaves a new lock behind."""
        for h in held:
            if h.granted and h.fence is not None:
                try:
                    freed = await self.store.release(h.need.key, agent, h.fence)
                except StoreUnavailable as e:
                    log.warning("could not give back lock %s (fence %d) of a refused request: %s; its lease "
                                "ends by itself", h.need.key, h.fence, e)
                    continue
                if freed:  # else it is no longer ours (lost, handed off): nothing to give back
                    _event(flow, "rolled_back", h.need.key, fence=h.fence)

    # -- refusals -------------------------------------------------------------------------------------------

    @staticmethod
    def _conflict(flow: http.HTTPFlow, need: _Need, holder: str | None, expires_at: float | None, *,
                  pending: bool, lost: bool = False) -> None:
        key = need.key
        until = "" if expires_at is None else f" until {iso_time(expires_at)} unless renewed"
        if lost:
            now = f"; it is now held by {holder}{until}" if holder else ""
            message = (f"The task lock {key} (rule {need.rule}) was lost before this request could be sent: its "
                       f"lease ended, an admin released it, or it was handed off{now}. Nothing was forwarded.")
        elif pending:
            message = (f"The task lock {key} (rule {need.rule}) has been handed off to agent {holder}; only "
                       f"{holder} may act on it now. Do not act on it: pick other work.")
        else:
            message = (f"Another agent ({holder}) is working on {key} (rule {need.rule}) and holds its task "
                       f"lock{until}. Do not act on it: pick other work or try again later.")
        headers = {"x-should-retry": "false"}
        if expires_at is not None:
            headers["retry-after"] = str(_seconds_until(expires_at))
        LOCK_CONFLICTS.inc()
        responses.refuse(flow, 423, LOCK_CONFLICT, message, rule=need.rule, headers=headers, extra={
            "lock": key, "holder": holder, "expires_at": None if expires_at is None else iso_time(expires_at)})

    @staticmethod
    def _store_unavailable(flow: http.HTTPFlow, needs: list[_Need], error: StoreUnavailable) -> None:
        keys = ", ".join(n.key for n in needs)
        log.warning("lock store unavailable, refusing a lock-guarded request (lock %s, request_id=%s): %s",
                    keys, flow.metadata.get(flowmeta.REQUEST_ID), error)
        for need in needs:
            _event(flow, "store_unavailable", need.key, rule=need.rule)
        rule = needs[0].rule
        responses.refuse(flow, 503, responses.STORE_UNAVAILABLE,
                         f"The task lock store is unavailable, so this call (lock {keys}, rule {rule}) was refused "
                         "and not forwarded. Bastion reconnects by itself; try again in a few seconds.",
                         rule=rule, headers={"x-should-retry": "false", "retry-after": str(STORE_RETRY_AFTER)})

    # -- response -------------------------------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Free the caller's `release` locks after a 2xx; awaited before the agent gets the answer."""
        locks = flow.metadata.get(flowmeta.LOCKS)
        if not locks or flowmeta.REFUSAL in flow.metadata or flow.response is None:
            return None
        to_free = [lock for lock in locks if lock["release"] and lock["fence"] is not None]
        if not to_free:
            return None
        status = flow.response.status_code
        if not 200 <= status < 300:
            for lock in to_free:
                _event(flow, "not_released", lock["key"], fence=lock["fence"], reason=f"upstream answered {status}")
            return None
        return self._release(flow, to_free)

    async def _release(self, flow: http.HTTPFlow, to_free: list[dict[str, Any]]) -> None:
        agent: str = flow.metadata[flowmeta.AGENT]
        for lock in to_free:
            key, fence = lock["key"], lock["fence"]
            try:
                freed = await self.store.release(key, agent, fence)
            except StoreUnavailable as e:
                log.warning("could not release lock %s (fence %d) after a 2xx: %s; its lease ends by itself",
                            key, fence, e)
                _event(flow, "not_released", key, fence=fence, reason="store unavailable")
                continue
            if freed:
                _event(flow, "released", key, fence=fence)
            else:
                _event(flow, "not_released", key, fence=fence, reason="no longer held by this agent")


STARTUP_PING_TIMEOUT = 3.0
"""How long `bastion serve` waits for the store's first answer before it starts without it (seconds)."""


async def check_store(store: LockStore) -> None:
    """Say at startup whether the store answers. Not fatal: the sidecar starts anyway (calls without locks
    pass), lock-guarded calls get 503 until the store answers, and `/readyz` reports it meanwhile."""
    try:
        await asyncio.wait_for(store.ping(), STARTUP_PING_TIMEOUT)
    except (StoreUnavailable, TimeoutError) as e:
        log.warning("the %s lock store does not answer (%s); calls under a lock rule are refused with 503 "
                    "until it does", store.backend, e or f"no answer within {STARTUP_PING_TIMEOUT:g}s")


async def keep_locks_gauge(store: LockStore, interval: float = LOCKS_GAUGE_INTERVAL) -> None:
    """Refresh `bastion_locks_held` from the store every `interval` seconds, until cancelled.

    The gauge counts the whole store's live locks (every sidecar's), which is what an operator alerts on;
    `list_locks` sets it. A store that is down leaves the last value and is retried next round.
    """
    while True:
        try:
            await store.list_locks()
        except StoreUnavailable as e:
            log.debug("locks gauge not refreshed: %s", e)
        except Exception:
            log.exception("locks gauge refresh failed")
        await asyncio.sleep(interval)
