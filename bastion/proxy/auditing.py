"""The audit log's life inside `bastion serve`: one object the server starts, wires and closes.

- `start(state)`: opens the audit writer on a spool under `--home` (records reach the spool before the sink,
  so nothing is lost while the sink is down or the process is killed) with the policy's `audit:` settings,
  and follows policy reloads (`AuditWriter.configure`).
- `capture`: the proxy stages (`bastion.proxy.capture`); `reader`: a separate store connection for the admin
  API's flow routes, so reads never queue behind the writer's batches; `ready`: the `/readyz` check;
  `retention()`: the retention task.
- `close()`: after the proxy stopped and in-flight calls finished, gives the sink a bounded time to take
  the rest; whatever is left stays in the spool and drains at the next start.

Spool slots: one spool belongs to one process (it is locked). Several sidecars sharing a `--home` on one
host (one per agent, say) each take the first free slot: `<home>/spool`, then `<home>/spool.1`, ... A
restarted process takes the lowest free slot, which is its old one when it was the only one that stopped,
and drains what it left there.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from bastion.audit.retention import run_retention
from bastion.audit.settings import AuditConfig
from bastion.audit.sinks import AuditStore, StoreError, open_store
from bastion.audit.spool import SpoolLockedError
from bastion.audit.writer import AuditWriter
from bastion.config import DataSettings
from bastion.proxy.capture import Capture
from bastion.proxy.state import PolicyState

log = logging.getLogger("bastion.audit")

SPOOL_SLOTS = 16
DRAIN_ON_SHUTDOWN = 10.0
"""Seconds the sink gets at shutdown to take the records still in the spool."""


class AuditStartError(Exception):
    """The audit log cannot start; `code` is the exit status `bastion serve` should use."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def spool_slot(home: Path, index: int) -> Path:
    return home / "spool" if index == 0 else home / f"spool.{index}"


def audit_config(policy: Any) -> AuditConfig:
    return AuditConfig.from_settings(policy.audit)


class AuditService:
    """Create with the data settings; nothing is opened before `start`."""

    def __init__(self, data: DataSettings, *, pinned: str | None = None) -> None:
        self._data = data
        self._pinned = pinned
        self._writer: AuditWriter | None = None
        self._capture: Capture | None = None
        self._reader: AuditStore | None = None

    @property
    def writer(self) -> AuditWriter:
        if self._writer is None:
            raise RuntimeError("the audit service is not started")
        return self._writer

    @property
    def capture(self) -> Capture:
        if self._capture is None:
            raise RuntimeError("the audit service is not started")
        return self._capture

    @property
    def reader(self) -> AuditStore | None:
        return self._reader

    async def start(self, state: PolicyState) -> None:
        """Open the writer with the active policy's settings. Raises AuditStartError."""
        home = self._data.home
        try:
            config = audit_config(state.policy)
        except ValueError as e:
            raise AuditStartError(f"the policy's audit settings are invalid: {e}", 3) from None
        try:
            await asyncio.to_thread(home.ensure)
            self._writer = await self._open_slot(home.path, config)
            self._reader = open_store(self._data.audit)
        except StoreError as e:
            raise AuditStartError(f"--audit: {e}", 2) from None
        except OSError as e:
            raise AuditStartError(f"cannot open the audit spool in {home.path}: {e.strerror or e}", 1) from None
        self._capture = Capture(self._writer, pinned=self._pinned)
        state.on_swap(self._reconfigure)

    async def _open_slot(self, home: Path, config: AuditConfig) -> AuditWriter:
        for index in range(SPOOL_SLOTS):
            spool = spool_slot(home, index)
            try:
                writer = await AuditWriter.open(self._data.audit, spool, config=config)
            except SpoolLockedError:
                continue
            if index:
                log.info("audit spool %s is used by another Bastion process; this one uses %s",
                         spool_slot(home, 0), spool)
            return writer
        raise AuditStartError(f"every audit spool slot in {home} ({SPOOL_SLOTS}) is used by another Bastion "
                              "process; give this one its own --home", 1)

    def _reconfigure(self, policy: Any) -> None:
        try:
            self.writer.configure(audit_config(policy))
        except ValueError as e:  # the policy loader validates these; never take the proxy down over them
            log.error("audit settings of the new policy not applied: %s", e)

    async def ready(self) -> tuple[bool, str]:
        """`/readyz`: not ready while calls are refused because records cannot be taken."""
        writer = self.writer
        if writer.available:
            return True, f"{writer.backlog} record(s) waiting for {writer.store.display_url}"
        if writer.config.on_failure == "allow":
            return True, "records cannot be spooled; calls pass unaudited (audit.on_failure: allow)"
        return False, "records cannot be spooled; calls are refused with 503 audit_unavailable"

    def retention(self) -> asyncio.Task[None]:
        writer = self.writer
        return asyncio.create_task(run_retention(writer.store, lambda: writer.config), name="audit-retention")

    async def close(self, drain_for: float = DRAIN_ON_SHUTDOWN) -> None:
        """Drain and release the spool. Safe to call when `start` never ran or failed."""
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                await reader.close()
            except Exception as e:  # a broken connection must not stop the shutdown
                log.warning("audit reader %s: error while closing: %s", reader.display_url, e)
        writer, self._writer = self._writer, None
        if writer is None:
            return
        waiting = writer.backlog
        if not await writer.close(drain_for=drain_for):
            log.warning("audit: not every record reached %s within %gs (%d were waiting at shutdown); the rest "
                        "stay in the spool and drain at the next start", writer.store.display_url, drain_for,
                        waiting)
