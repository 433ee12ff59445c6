"""Coordination through a shared store: task locks that keep two agents off the same ticket.

`open_store(url)` gives a `LockStore` (SQLite for one host, Redis for a fleet); see `bastion.coord.store` for
the protocol the proxy follows. Backends are imported only when a URL asks for them.
"""

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
    open_store,
)

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
    "open_store",
]
