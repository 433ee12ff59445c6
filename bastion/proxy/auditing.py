"""The audit log's life inside `bastion serve`: one object the server starts, wires and closes.

- `spawn()`: starts the audit worker process early (`bastion.audit.worker`; it imports while the proxy loads
  its policy and CA). `start(state)`: opens the writer there, on a spool under `--home`, with the policy's
  `audit:` settings (records reach the spool before the sink, so nothing is lost while the sink is down or
  the process is killed), and follows policy reloads.
- `capture`: the proxy stages (`bastion.proxy.capture`), which send each exchange to the worker through
  `bastion.audit.client.AuditClient`; `reader`: a separate store connection for the admin API's flow routes;
  `ready`: the `/readyz` check. Retention runs in the worker, which owns the sink.
- `close()`: after the proxy stopped and in-flight calls finished, gives the sink a bounded time to take
  the rest; whatever is left stays in the spool and drains at the next start.

Several sidecars sharing a `--home` on one host (one per agent, say) each get their own spool slot; see
`bastion.audit.worker`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bastion.audit.client import AuditClient, AuditStartError
from bastion.audit.settings import AuditConfig
from bastion.audit.sinks import AuditStore, StoreError, open_store
from bastion.audit.tracing import TracingSettings
from bastion.config import DataSettings
from bastion.proxy.capture import Capture
from bastion.proxy.state import PolicyState

__all__ = ["AuditService", "AuditStartError"]

log = logging.getLogger("bastion.audit")

DRAIN_ON_SHUTDOWN = 10.0
"""Seconds the sink gets at shutdown to take the records still in the spool."""


def audit_config(policy: Any) -> AuditConfig:
    return AuditConfig.from_settings(policy.audit)


class AuditService:
    """Create with the data settings; `spawn` and `start` open it."""

    def __init__(self, data: DataSettings, *, pinned: str | None = None,
                 tracing: TracingSettings | None = None) -> None:
        self._data = data
        self._pinned = pinned
        self._tracing = tracing
        self._client: AuditClient | None = None
        self._capture: Capture | None = None
        self._reader: AuditStore | None = None

    @property
    def client(self) -> AuditClient:
        if self._client is None:
            raise RuntimeError("the audit service is not started")
        return self._client

    @property
    def capture(self) -> Capture:
        if self._capture is None:
            raise RuntimeError("the audit service is not started")
        return self._capture

    @property
    def reader(self) -> AuditStore | None:
        return self._reader

    async def spawn(self) -> None:
        """Check the audit URL and start the worker process. Raises AuditStartError."""
        try:
            self._reader = open_store(self._data.audit)
        except StoreError as e:
            raise AuditStartError(f"--audit: {e}", 2) from None
        home = self._data.home
        try:
            await asyncio.to_thread(home.ensure)
        except OSError as e:
            raise AuditStartError(f"cannot open the audit spool in {home.path}: {e.strerror or e}", 1) from None
        try:
            self._client = await AuditClient.spawn(self._data.audit, home.path, self._reader.display_url,
                                                   store_url=self._data.store, tracing=self._tracing)
        except OSError as e:
            raise AuditStartError(f"cannot start the audit worker process: {e.strerror or e}", 1) from None

    async def start(self, state: PolicyState) -> None:
        """Open the writer with the active policy's settings. Raises AuditStartError."""
        try:
            config = audit_config(state.policy)
        except ValueError as e:
            raise AuditStartError(f"the policy's audit settings are invalid: {e}", 3) from None
        if self._client is None:
            await self.spawn()
        await self.client.start(config)
        self._capture = Capture(self.client, pinned=self._pinned)
        state.on_swap(self._reconfigure)

    def _reconfigure(self, policy: Any) -> None:
        try:
            self.client.configure(audit_config(policy))
        except ValueError as e:  # the policy loader validates these; never take the proxy down over them
            log.error("audit settings of the new policy not applied: %s", e)

    async def ready(self) -> tuple[bool, str]:
        """`/readyz`: not ready while calls are refused because records cannot be taken."""
        client = self.client
        reason = client.refusal()
        if reason is None:
            return True, f"{client.backlog} record(s) waiting for {client.display_url}"
        why = {"writer_down": "the audit worker is not running",
               "overloaded": "the audit worker has fallen behind"}.get(reason, f"records cannot be spooled ({reason})")
        if client.config.on_failure == "allow":
            return True, f"{why}; calls pass unaudited (audit.on_failure: allow)"
        return False, f"{why}; calls are refused with 503 audit_unavailable"

    async def close(self, drain_for: float = DRAIN_ON_SHUTDOWN) -> None:
        """Drain and stop the worker. Safe to call when `spawn`/`start` never ran or failed."""
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                await reader.close()
            except Exception as e:  # a broken connection must not stop the shutdown
                log.warning("audit reader %s: error while closing: %s", reader.display_url, e)
        client, self._client = self._client, None
        if client is None:
            return
        waiting = client.backlog
        if not await client.close(drain_for=drain_for):
            log.warning("audit: not every record reached %s within %gs (%d were waiting at shutdown); the rest "
                        "stay in the spool and drain at the next start", client.display_url, drain_for, waiting)
