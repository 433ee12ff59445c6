"""Coordination through a shared store: task locks that keep two agents off the same ticket, approvals, and
the fleet's milestones, budgets and pauses.

The factories here pick a backend by URL: `open_store(url)` gives a `LockStore` (SQLite for one host, Redis
for a fleet), `open_approval_store` and `open_fleet_store` the other stores on the same URL. They sit above
everything else in the package: each protocol module (`store`, `approvals`, `fleet`) names no backend, each
backend imports its protocol, and only this module knows them all. Backends are imported only when a URL asks
for them. See `bastion.coord.store` for the protocol the proxy follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bastion.coord.store import (
    DEFAULT_HANDOFF_TTL,
    DEFAULT_KEY_PREFIX,
    AcquireResult,
    Conflict,
    Lease,
    LockInfo,
    LockStore,
    StoreError,
    StoreUnavailable,
    StoreURLError,
)
from bastion.coord.urls import redact_url, store_location

if TYPE_CHECKING:
    from bastion.coord.approvals import ApprovalStore
    from bastion.coord.fleet import FleetStore

__all__ = [
    "DEFAULT_HANDOFF_TTL",
    "DEFAULT_KEY_PREFIX",
    "AcquireResult",
    "Conflict",
    "Lease",
    "LockInfo",
    "LockStore",
    "StoreError",
    "StoreURLError",
    "StoreUnavailable",
    "open_approval_store",
    "open_fleet_store",
    "open_store",
    "redact_url",
    "store_location",
]


def open_store(url: str, *, key_prefix: str = DEFAULT_KEY_PREFIX) -> LockStore:
    """The lock store for `url`; no I/O happens until the first call.

    `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`: the embedded default, shared by every
    Bastion process on the same host. `redis://[user:password@]host:port/db` or `rediss://...` (TLS): one
    Redis primary shared by a fleet; `key_prefix` namespaces every key Bastion writes there, and a `prefix`
    query parameter in the URL overrides it (SQLite ignores both: it owns its tables). Raises `StoreURLError`
    for anything else.
    """
    kind, where = store_location(url)
    if kind == "sqlite":
        from bastion.coord.sqlite import SqliteLockStore

        return SqliteLockStore(where)
    from bastion.coord.redis import RedisLockStore

    return RedisLockStore.from_url(str(where), key_prefix=key_prefix)


def open_approval_store(url: str, *, key_prefix: str | None = None) -> ApprovalStore:
    """The approval store for a store URL (the same URL as the lock store's; see `open_store`).
    No I/O happens until the first call."""
    kind, where = store_location(url)
    if kind == "sqlite":
        from bastion.coord.approvals_sqlite import SqliteApprovalStore

        return SqliteApprovalStore(where)
    from bastion.coord.approvals_redis import RedisApprovalStore

    return RedisApprovalStore.from_url(str(where), key_prefix=key_prefix or DEFAULT_KEY_PREFIX)


def open_fleet_store(url: str, *, key_prefix: str | None = None) -> FleetStore:
    """The fleet store for a store URL (the same URL as the lock store's; see `open_store`).
    No I/O happens until the first call."""
    kind, where = store_location(url)
    if kind == "sqlite":
        from bastion.coord.fleet_sqlite import SqliteFleetStore

        return SqliteFleetStore(where)
    from bastion.coord.fleet_redis import RedisFleetStore

    return RedisFleetStore.from_url(str(where), key_prefix=key_prefix or DEFAULT_KEY_PREFIX)
