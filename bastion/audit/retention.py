"""Retention: delete old records and old bodies, without making `verify` fail.

Records go by chain prefix (see `AuditStore.prune_records`): per writer, everything before the first record
that is still within `retention_records` is deleted and a prune marker remembers the last deleted record's
hash, so `verify` starts from there and still catches a deletion anywhere later. Bodies past
`retention_bodies` are dropped in place; their digests stay in the chained record, so the chain still
verifies and the record says when its bodies were purged.

The server runs `run_retention(store, lambda: writer.config)` as a task; `apply_retention` is one pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from bastion.audit.settings import AuditConfig
from bastion.audit.sinks.base import AuditStore
from bastion.ids import now_us

log = logging.getLogger("bastion.audit")

DEFAULT_INTERVAL = 3600.0


@dataclass(frozen=True, slots=True)
class RetentionResult:
    records: int  # records deleted
    bodies: int  # records whose bodies were dropped


async def apply_retention(store: AuditStore, *, records: float | None, bodies: float | None,
                          now: int | None = None) -> RetentionResult:
    """One pass. `records` / `bodies` are retention periods in seconds (None: keep forever); `now` is Unix µs."""
    now = now_us() if now is None else now
    deleted = purged = 0
    if records is not None:
        deleted = await store.prune_records(now - int(records * 1_000_000), now)
    if bodies is not None:
        purged = await store.purge_bodies(now - int(bodies * 1_000_000), now)
    return RetentionResult(deleted, purged)


async def run_retention(store: AuditStore, settings: Callable[[], AuditConfig], *,
                        interval: float = DEFAULT_INTERVAL) -> None:
    """Apply retention every `interval` seconds with the settings current at each pass (they follow policy
    reloads). Runs until cancelled; a failed pass is logged and retried at the next one."""
    while True:
        config = settings()
        if config.retention_records is not None or config.retention_bodies is not None:
            try:
                result = await apply_retention(store, records=config.retention_records,
                                               bodies=config.retention_bodies)
                if result.records or result.bodies:
                    log.info("audit retention: %d records deleted, bodies of %d records dropped", result.records,
                             result.bodies)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store may be down; the next pass will catch up
                log.warning("audit retention on %s failed: %s", store.display_url, e)
        await asyncio.sleep(interval)
