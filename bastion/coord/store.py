"""The task-lock store: one async interface, two backends (SQLite on one host, Redis for a fleet).

A task lock keeps two agents from working the same thing (a ticket, a customer) at the same time. The proxy
takes the lock named by a rule before it forwards a request, and every later matching request from the holder
renews it. The lock is a *lease*: it ends on its own when nobody renews it, so a crashed sidecar never blocks a
ticket for longer than the rule's `ttl`.

A lease alone cannot stop a holder that stalls past its expiry and then acts (a paused process, a slow
network). Two things narrow that window, and the proxy is expected to use both:

1. every grant carries a **fencing token** (`Lease.fence`): an integer that strictly increases per key across
   grants, even across a Redis restart that lost its data. An upstream that remembers the highest fence it
   has seen can refuse older ones;
2. immediately before forwarding, the proxy calls `verify(key, agent, fence)`, one store round trip, so a
   lease lost while the request waited (an approval hold, a slow client) is noticed before anything is sent.

How the proxy uses a store (everything it needs; see `LockStore` for details)::

    store = open_store(settings.store)               # bastion.coord.open_store: sqlite:///... or redis://...
    result = await store.acquire(key, agent, ttl)    # grant, renewal or conflict
    if isinstance(result, Conflict):                  # 423 lock_conflict: result.holder, result.expires_at
        ...
    if not await store.verify(key, agent, result.fence):   # just before forwarding
        ...                                           # lost meanwhile: answer as a conflict
    ...forward...; on 2xx of a `release` rule: await store.release(key, agent)

`StoreUnavailable` from any call means the store cannot answer: fail closed (503 `store_unavailable`). The
same store object recovers by itself when the store comes back. Admin actions (`admin_release`, `handoff`)
and `list_locks` serve the CLI, the dashboard and its JSON API.

Times in results are wall-clock seconds since the epoch, for display and for `Retry-After`; the stores
themselves measure leases on their own clock (Redis server time, or the host's monotonic clock for SQLite).
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Self, TypeVar

from bastion.config import ConfigError
from bastion.metrics import LOCK_ACQUIRE_SECONDS, LOCKS_HELD, STORE_ERRORS

T = TypeVar("T")

DEFAULT_KEY_PREFIX = "bastion:"
DEFAULT_HANDOFF_TTL = 300.0
"""How long a handed-off lock waits for its recipient before it frees itself (seconds)."""

MAX_TTL = 30 * 24 * 3600.0
"""Longest lease or offer accepted (seconds). Longer values are almost certainly a unit mistake."""

MAX_NAME_LENGTH = 1024
"""Longest key or agent name accepted (characters); keys come from URL captures, so bound them."""


class StoreError(Exception):
    """Base class of everything the store layer raises on purpose."""


class StoreUnavailable(StoreError):
    """The store could not be reached or could not complete the operation. Fail closed.

    This is the only exception a working store raises for a failed operation, so callers need one `except`.
    The message names the store (never its credentials) and the cause.
    """


class StoreURLError(StoreError, ConfigError):
    """The store URL is not one Bastion understands. Raised by `bastion.coord.open_store`, before any I/O."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The lock is the caller's: a new grant, a claimed handoff, or a renewal (`renewed=True`).

    `fence` identifies this grant and is what `verify` and `release` check; a renewal keeps the fence, a new
    grant (also by the same agent after the lock was free, and a handoff claim) always gets a higher one.
    """

    key: str
    agent: str
    fence: int
    acquired_at: float
    expires_at: float
    renewed: bool

    granted: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Conflict:
    """Someone else has the lock. `holder` is the agent it belongs to and `expires_at` when it frees itself
    unless renewed. After a handoff the lock belongs to the recipient even before it claims it: `holder` is
    then the recipient and `pending` is True (everyone else, the former holder included, is refused).
    """

    key: str
    holder: str
    expires_at: float
    pending: bool = False

    granted: ClassVar[bool] = False


AcquireResult = Lease | Conflict


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A live lock as `list_locks`, `get`, `admin_release` and `handoff` report it.

    `holder` is the agent that was granted the lock and `fence` its grant. When `handoff_to` is set the lock
    is on offer to that agent: `holder` can no longer use it and `expires_at` is when the offer lapses.
    """

    key: str
    holder: str
    fence: int
    acquired_at: float
    expires_at: float
    handoff_to: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The shape of one item of `GET /api/locks` and `bastion locks list --format json`."""
        return {
            "key": self.key,
            "holder": self.holder,
            "fence": self.fence,
            "acquired_at": iso_time(self.acquired_at),
            "expires_at": iso_time(self.expires_at),
            "handoff_to": self.handoff_to,
        }


def iso_time(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds, the one time format Bastion prints."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_name(value: str, what: str) -> None:
    """A key or agent name the stores accept: a non-empty string of at most MAX_NAME_LENGTH characters."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} is longer than {MAX_NAME_LENGTH} characters")


def _check_ttl(ttl: float, what: str = "ttl") -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise ValueError(f"{what} must be a finite number of seconds")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"{what} must be > 0 and at most {MAX_TTL:.0f} seconds, got {ttl}")
    return float(ttl)


class GuardedStore(abc.ABC):
    """What every store object of `bastion.coord` shares: closing (also as an async context manager) and
    counting the operations the store could not answer in `bastion_store_errors_total{operation}`."""

    backend: ClassVar[str]

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads. The store must not be used afterwards."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _guard(self, operation: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except StoreUnavailable:
            STORE_ERRORS.labels(operation=operation).inc()
            raise


class LockStore(GuardedStore):
    """Task locks in a shared store. Safe to share between tasks of one event loop; cheap to call.

    Public methods validate their arguments (`ValueError` for a bad key, agent or ttl: a programming or rule
    error, never the store's fault), keep the lock metrics, and raise `StoreUnavailable` when the store
    cannot answer. Backends implement the `_`-prefixed methods and translate their own errors into
    `StoreUnavailable`.

    Every state change is atomic in the store, and safe to repeat when a client library retries after a
    lost reply: a retried grant comes back as a renewal of the same fence, a retried handoff is the same
    offer, a retried release reports False (the lock is already gone).
    """

    async def acquire(self, key: str, agent: str, ttl: float) -> Lease | Conflict:
        """Take `key` for `agent` for `ttl` seconds, or renew it if `agent` already holds it.

        A renewal never shortens a lease: the expiry becomes the later of the current one and now + ttl.
        A lock handed off to `agent` is claimed by this call, with a new fence. Anyone else gets `Conflict`.
        """
        check_name(key, "lock key")
        check_name(agent, "agent")
        ttl = _check_ttl(ttl)
        start = time.perf_counter()
        result = await self._guard("acquire", self._acquire(key, agent, ttl))
        LOCK_ACQUIRE_SECONDS.observe(time.perf_counter() - start)
        return result

    async def verify(self, key: str, agent: str, fence: int) -> bool:
        """True if `agent` still holds `key` under grant `fence` (lease live, not handed off, not re-granted).

        Read-only: it does not extend the lease. Call it as late as possible before acting under the lock.
        """
        check_name(key, "lock key")
        check_name(agent, "agent")
        return await self._guard("verify", self._verify(key, agent, int(fence)))

    async def release(self, key: str, agent: str, fence: int | None = None) -> bool:
        """Free `key` if `agent` holds it (and, when `fence` is given, under that grant). True if freed.

        Passing the fence makes a late or repeated release harmless: it can never free a newer grant.
        A former holder cannot release a lock that was handed off.
        """
        check_name(key, "lock key")
        check_name(agent, "agent")
        return await self._guard("release", self._release(key, agent, None if fence is None else int(fence)))

    async def admin_release(self, key: str) -> LockInfo | None:
        """Free `key` whoever holds it (or whoever it is offered to). Returns what was freed, None if free."""
        check_name(key, "lock key")
        return await self._guard("admin_release", self._admin_release(key))

    async def handoff(self, key: str, to_agent: str, ttl: float = DEFAULT_HANDOFF_TTL) -> LockInfo | None:
        """Offer the live lock `key` to `to_agent`; None if `key` is free.

        From now on the former holder and everyone else are refused (`Conflict.pending`); the recipient's next
        `acquire` claims the lock with a new, higher fence. An offer not claimed within `ttl` seconds lapses
        and the lock is free. Handing off a pending offer re-targets it.
        """
        check_name(key, "lock key")
        check_name(to_agent, "agent")
        ttl = _check_ttl(ttl, "handoff ttl")
        return await self._guard("handoff", self._handoff(key, to_agent, ttl))

    async def get(self, key: str) -> LockInfo | None:
        """The live lock `key`, or None if it is free."""
        check_name(key, "lock key")
        return await self._guard("get", self._get(key))

    async def list_locks(self) -> list[LockInfo]:
        """Every live lock, sorted by key. Also refreshes the `bastion_locks_held` gauge."""
        locks = await self._guard("list", self._list_locks())
        locks.sort(key=lambda lock: lock.key)
        LOCKS_HELD.set(len(locks))
        return locks

    async def ping(self) -> None:
        """Return if the store answers, raise `StoreUnavailable` if not (for `/readyz`)."""
        await self._guard("ping", self._ping())

    @abc.abstractmethod
    async def _acquire(self, key: str, agent: str, ttl: float) -> Lease | Conflict: ...

    @abc.abstractmethod
    async def _verify(self, key: str, agent: str, fence: int) -> bool: ...

    @abc.abstractmethod
    async def _release(self, key: str, agent: str, fence: int | None) -> bool: ...

    @abc.abstractmethod
    async def _admin_release(self, key: str) -> LockInfo | None: ...

    @abc.abstractmethod
    async def _handoff(self, key: str, to_agent: str, ttl: float) -> LockInfo | None: ...

    @abc.abstractmethod
    async def _get(self, key: str) -> LockInfo | None: ...

    @abc.abstractmethod
    async def _list_locks(self) -> list[LockInfo]: ...

    @abc.abstractmethod
    async def _ping(self) -> None: ...
