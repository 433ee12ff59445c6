"""Guards on the proxy: count what each agent's calls came to, fleet-wide, and pause an agent that runs away.

A policy's `guards:` name a rate per agent (`denials`, `errors` or `calls` per window) and what to do past it
(`pause`: refuse the agent's calls, `hold`: hold each of them for a person). An agent that suddenly collects
denials is likely following injected instructions or stuck in a loop; one that floods an upstream with
errors or calls is burning money or someone's service. Counting happens in the shared store, so a guard sees
the agent's calls on every sidecar.

This stage only observes: it notes each finished call's outcome in memory and sends the counts to the store
in batches every `FLUSH_INTERVAL` (one `INCRBY`-like write per guard and agent, whatever the traffic), so the
answer never waits for it. When a window's count reaches the limit, the agent is paused fleet-wide
(`paused_by: guard:<id>`, the reason naming the rate) and `bastion_guard_trips_total{guard}` counts it; it
stays paused until someone resumes it. Counts that cannot be written while the store is down are dropped
(logged): a guard is a safety net, not an accounting.

What counts: `denials` are calls the rules refused (403 `policy_denied`); `errors` are calls the upstream
answered with 5xx or that got no answer (502 `upstream_unreachable`, a broken connection); `calls` are every
call of the agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from mitmproxy import http

from bastion.coord.fleet import FleetStore
from bastion.coord.store import StoreUnavailable
from bastion.metrics import GUARD_TRIPS
from bastion.policy.fleet_rules import GuardSpec
from bastion.proxy import flowmeta, responses
from bastion.proxy.pauses import PauseWatch

log = logging.getLogger("bastion.fleet")

_COUNTED = "bastion.guard_counted"  # flow.metadata: this call was counted (response and error may both run)

FLUSH_INTERVAL = 0.25
"""How often counts go to the store (seconds): a guard trips within about this plus the pause poll."""


def _per(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


def hits(guard: GuardSpec, refusal: str | None, status: int | None, failed: bool) -> bool:
    """Does a call that ended this way count for `guard`?"""
    if guard.metric == "calls":
        return True
    if guard.metric == "denials":
        return refusal == responses.POLICY_DENIED
    if failed or refusal == responses.UPSTREAM_UNREACHABLE:
        return True
    return refusal is None and status is not None and status >= 500


class Guards:
    """Observer stage (after the gate). `watch` is the sidecar's pause view, updated at once on a trip."""

    def __init__(self, store: FleetStore, watch: PauseWatch, interval: float = FLUSH_INTERVAL) -> None:
        self.store = store
        self.watch = watch
        self.interval = interval
        self._counts: Counter[tuple[GuardSpec, str]] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def response(self, flow: http.HTTPFlow) -> None:
        self._observe(flow, failed=False)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:  # an error after the answer (the client left) was counted by `response`
            self._observe(flow, failed=True)

    def _observe(self, flow: http.HTTPFlow, *, failed: bool) -> None:
        meta = flow.metadata
        agent = meta.get(flowmeta.AGENT)
        policy = meta.get(flowmeta.POLICY)
        if agent is None or policy is None or (flowmeta.DECISION not in meta and flowmeta.REFUSAL not in meta):
            return
        guards = policy.guards_for(agent)
        if not guards or meta.get(_COUNTED):
            return
        meta[_COUNTED] = True
        refusal = meta.get(flowmeta.REFUSAL)
        status = flow.response.status_code if flow.response is not None else None
        for guard in guards:
            if hits(guard, refusal, status, failed):
                self._counts[(guard, agent)] += 1
        if self._counts and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_soon(), name="guard-counts")

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(self.interval)
            await self.flush()
        finally:
            self._task = None
            if self._counts:  # counted while flushing
                self._task = asyncio.get_running_loop().create_task(self._flush_soon(), name="guard-counts")

    async def flush(self) -> None:
        """Send the counts gathered so far to the store and pause any agent past a guard's limit."""
        counts, self._counts = self._counts, Counter()
        for (guard, agent), n in counts.items():
            try:
                total = await self.store.count(guard.id, agent, guard.per, n)
            except StoreUnavailable as e:
                if not self._failing:
                    log.warning("cannot count guard %s in the store (%s); counts are dropped until it answers",
                                guard.id, e)
                self._failing = True
                continue
            self._failing = False
            if total >= guard.limit and self.watch.paused(agent) is None:
                await self._trip(guard, agent, total)

    async def _trip(self, guard: GuardSpec, agent: str, total: int) -> None:
        reason = (f"guard {guard.id}: {total} {guard.metric} within {_per(guard.per)} (limit {guard.limit}); "
                  "resume the agent once it is safe")
        try:
            pause = await self.store.pause(agent, reason, f"guard:{guard.id}", guard.action)
        except StoreUnavailable as e:
            log.error("guard %s tripped for agent %s but the pause could not be stored: %s", guard.id, agent, e)
            return
        GUARD_TRIPS.labels(guard.id).inc()
        log.warning("guard %s tripped: agent %s %s fleet-wide (%s)", guard.id, agent,
                    "paused" if guard.action == "pause" else "held for approval", reason)
        self.watch.add(pause)

    async def close(self) -> None:
        """Send what is left (shutdown)."""
        if self._task is not None:
            self._task.cancel()
        if self._counts:
            await self.flush()

