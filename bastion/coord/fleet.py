"""Fleet coordination in the shared store: milestones, budgets, pauses and guard counters.

Task locks keep two agents off the same ticket; this store holds what a fleet needs beyond that, shared by every
sidecar through the same store URL (SQLite on one host, Redis for a fleet):

- **milestones** (`requires` / `complete`): keys that say a piece of work is done ("extracted:42"). `complete`
  records one when the upstream answers 2xx; `requires` refuses a call until every named milestone exists.
  A milestone lives for its `ttl`, or until it is cleared.
- **budgets**: counters per budget id and key (an agent, a ticket) over fixed windows aligned to the epoch on
  the store's clock (`window_start = floor(now / per) * per`), so every sidecar agrees on when a window
  resets and `Retry-After` is the real time to that reset. A call *reserves* before it is forwarded and is
  *settled* after its answer (tokens: the real usage replaces the estimate; a call refused later: 0), so
  concurrent calls overshoot a limit by at most the reservations in flight. The check and the reservation
  are one atomic step in the store (a Lua script, a write transaction).
- **pauses**: the fleet-wide kill switch. A paused agent's calls are refused (`action: pause`) or held for a
  person (`action: hold`) by every sidecar; `*` pauses every agent. Sidecars poll `list_pauses` (one small
  read) to learn of a pause within a second.
- **guard counters**: per guard, agent and fixed window, how many denials, upstream errors or calls were seen
  across the fleet, so a guard can pause an agent that runs away.

`StoreUnavailable` from any call means the store cannot answer: the caller fails closed (503
`store_unavailable`), and never falls back to a counter of its own. The same object recovers by itself.

Times in results are wall-clock epoch seconds (the store's clock: Redis `TIME`, or the host's clock for SQLite).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from bastion.coord.store import MAX_TTL, GuardedStore, check_name, iso_time

Unit = Literal["calls", "tokens"]
PauseAction = Literal["pause", "hold"]

MAX_REASON = 500
"""Longest pause reason kept (characters)."""

MAX_WINDOW = 31 * 24 * 3600.0
"""Longest budget or guard window accepted (seconds)."""

ALL_AGENTS = "*"
"""The pause that stops every agent."""


@dataclass(frozen=True, slots=True)
class Milestone:
    """A completed piece of work. `by` is who completed it: an agent name, or `user:NAME` by hand."""

    key: str
    completed_at: float
    expires_at: float
    by: str
    request_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """One item of `GET /api/milestones` and `bastion milestones list --format json`."""
        return {"key": self.key, "completed_at": iso_time(self.completed_at),
                "expires_at": iso_time(self.expires_at), "by": self.by, "request_id": self.request_id}


@dataclass(frozen=True, slots=True)
class Pause:
    """An agent (or `*`, every agent) stopped fleet-wide. `paused_by` is `user:NAME` or `guard:ID`."""

    agent: str
    reason: str
    paused_by: str
    paused_at: float
    action: PauseAction = "pause"

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "reason": self.reason, "paused_by": self.paused_by,
                "paused_at": iso_time(self.paused_at), "action": self.action}


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """One budget key's current window: `used` counts settled usage plus `reserved`, the tokens of LLM calls in
    flight (a call budget's call is settled in full when admitted, so it never shows as reserved)."""

    budget: str
    key: str
    unit: Unit
    limit: int
    used: int
    reserved: int
    window_start: float
    resets_at: float

    def to_json(self) -> dict[str, Any]:
        """One item of `GET /api/budgets` and `bastion budgets list --format json`."""
        return {"budget": self.budget, "key": self.key, "unit": self.unit, "limit": self.limit,
                "used": self.used, "reserved": self.reserved, "remaining": max(0, self.limit - self.used),
                "window_start": iso_time(self.window_start), "resets_at": iso_time(self.resets_at)}


@dataclass(frozen=True, slots=True)
class Reservation:
    """Admitted: `amount` was added to the window starting at `window_start`; `used` is the total after it.
    Hand it back to `settle` once the call's real cost is known."""

    budget: str
    key: str
    unit: Unit
    amount: int
    limit: int
    used: int
    window_start: float
    resets_at: float

    granted: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Exceeded:
    """Refused: the window's limit is used up until `resets_at`. Nothing was added."""

    budget: str
    key: str
    unit: Unit
    limit: int
    used: int
    resets_at: float

    granted: ClassVar[bool] = False


def check_seconds(value: float, what: str, most: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds")
    if not 0 < value <= most:
        raise ValueError(f"{what} must be > 0 and at most {most:.0f} seconds, got {value}")
    return float(value)


def check_count(value: int, what: str, *, allow_zero: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{what} must be an integer >= {0 if allow_zero else 1}")
    return value


def window_of(now: float, per: float) -> tuple[float, float]:
    """(start, end) of the fixed window of length `per` that holds `now`: aligned to the epoch, so every
    sidecar agrees on it."""
    start = math.floor(now / per) * per
    return start, start + per


def admits(unit: Unit, used: int, amount: int, limit: int) -> bool:
    """The admission rule both backends apply inside their atomic step.

    Calls: the call fits (`used + 1 <= limit`), so a call budget is exact. Tokens: some of the budget is left
    (`used < limit`): a call's real usage is known only after it, so the last admitted call may take the
    window past its limit by its own tokens, and concurrent calls by at most the reservations in flight.
    """
    if unit == "calls":
        return used + amount <= limit
    return used < limit


class FleetStore(GuardedStore):
    """Milestones, budgets, pauses and guard counters in the shared store. Safe to share between tasks of
    one event loop. Public methods validate their arguments (`ValueError`), count store failures, and raise
    `StoreUnavailable` when the store cannot answer; backends implement the `_`-prefixed methods."""

    # -- milestones ------------------------------------------------------------------------------------------

    async def complete_milestone(self, key: str, ttl: float, by: str, request_id: str | None = None) -> Milestone:
        """Record (or refresh: a later completion replaces the earlier) milestone `key` for `ttl` seconds."""
        check_name(key, "milestone key")
        check_name(by, "completed by")
        ttl = check_seconds(ttl, "milestone ttl", MAX_TTL)
        return await self._guard("milestone_complete", self._complete_milestone(key, ttl, by, request_id))

    async def missing_milestones(self, keys: Sequence[str]) -> list[str]:
        """Those of `keys` that do not exist now, in the order given (empty: every one exists). One read."""
        for key in keys:
            check_name(key, "milestone key")
        if not keys:
            return []
        return await self._guard("milestone_check", self._missing_milestones(list(keys)))

    async def clear_milestone(self, key: str) -> Milestone | None:
        """Remove milestone `key`; what was removed, None if it did not exist."""
        check_name(key, "milestone key")
        return await self._guard("milestone_clear", self._clear_milestone(key))

    async def list_milestones(self) -> list[Milestone]:
        """Every live milestone, sorted by key."""
        found = await self._guard("milestone_list", self._list_milestones())
        found.sort(key=lambda m: m.key)
        return found

    # -- budgets ---------------------------------------------------------------------------------------------

    async def reserve(self, budget: str, key: str, unit: Unit, limit: int, per: float,
                      amount: int) -> Reservation | Exceeded:
        """Check and reserve `amount` in the current window of (`budget`, `key`), atomically (see `admits`).

        The window's `limit` and `unit` are those of this call (a reload that changes a limit applies at once).
        """
        check_name(budget, "budget id")
        check_name(key, "budget key")
        if unit not in ("calls", "tokens"):
            raise ValueError(f"unknown budget unit {unit!r}")
        check_count(limit, "budget limit")
        per = check_seconds(per, "budget window", MAX_WINDOW)
        check_count(amount, "reservation")
        return await self._guard("budget_reserve", self._reserve(budget, key, unit, limit, per, amount))

    async def settle(self, reservation: Reservation, actual: int) -> None:
        """Replace the reserved amount by the call's real cost (0 gives it back) in the window it was reserved
        in. Usage never goes below zero; a window that has already been dropped is left alone."""
        check_count(actual, "actual usage")
        await self._guard("budget_settle", self._settle(reservation, actual))

    async def list_budgets(self) -> list[BudgetUsage]:
        """The current window of every budget key that has one, sorted by budget then key."""
        found = await self._guard("budget_list", self._list_budgets())
        found.sort(key=lambda b: (b.budget, b.key))
        return found

    # -- pauses ----------------------------------------------------------------------------------------------

    async def pause(self, agent: str, reason: str, paused_by: str, action: PauseAction = "pause") -> Pause:
        """Pause `agent` (or `*`) fleet-wide; replaces an existing pause of the same agent."""
        check_name(agent, "agent")
        check_name(paused_by, "paused by")
        if action not in ("pause", "hold"):
            raise ValueError(f"unknown pause action {action!r}")
        return await self._guard("pause", self._pause(agent, (reason or "")[:MAX_REASON], paused_by, action))

    async def resume(self, agent: str) -> Pause | None:
        """Lift the pause of `agent` (or `*`); what was lifted, None if it was not paused."""
        check_name(agent, "agent")
        return await self._guard("resume", self._resume(agent))

    async def list_pauses(self) -> list[Pause]:
        """Every pause in force, sorted by agent. Cheap: sidecars call it about twice a second."""
        found = await self._guard("pause_list", self._list_pauses())
        found.sort(key=lambda p: p.agent)
        return found

    # -- guard counters --------------------------------------------------------------------------------------

    async def count(self, guard: str, agent: str, per: float, amount: int = 1) -> int:
        """Add `amount` to the current window of (`guard`, `agent`) and return the window's total."""
        check_name(guard, "guard id")
        check_name(agent, "agent")
        per = check_seconds(per, "guard window", MAX_WINDOW)
        check_count(amount, "amount", allow_zero=False)
        return await self._guard("guard_count", self._count(guard, agent, per, amount))

    async def ping(self) -> None:
        await self._guard("ping", self._ping())

    # -- backends --------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def _complete_milestone(self, key: str, ttl: float, by: str, request_id: str | None) -> Milestone: ...

    @abc.abstractmethod
    async def _missing_milestones(self, keys: list[str]) -> list[str]: ...

    @abc.abstractmethod
    async def _clear_milestone(self, key: str) -> Milestone | None: ...

    @abc.abstractmethod
    async def _list_milestones(self) -> list[Milestone]: ...

    @abc.abstractmethod
    async def _reserve(self, budget: str, key: str, unit: Unit, limit: int, per: float,
                       amount: int) -> Reservation | Exceeded: ...

    @abc.abstractmethod
    async def _settle(self, reservation: Reservation, actual: int) -> None: ...

    @abc.abstractmethod
    async def _list_budgets(self) -> list[BudgetUsage]: ...

    @abc.abstractmethod
    async def _pause(self, agent: str, reason: str, paused_by: str, action: PauseAction) -> Pause: ...

    @abc.abstractmethod
    async def _resume(self, agent: str) -> Pause | None: ...

    @abc.abstractmethod
    async def _list_pauses(self) -> list[Pause]: ...

    @abc.abstractmethod
    async def _count(self, guard: str, agent: str, per: float, amount: int) -> int: ...

    @abc.abstractmethod
    async def _ping(self) -> None: ...
