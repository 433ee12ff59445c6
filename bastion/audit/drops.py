"""Counting audit records that could not be taken: `bastion_audit_dropped_total{reason}` and a log line.

Shared by the writer (in the worker process) and the proxy's client. The log line is rate-limited: when the
spool is full every call would otherwise log one; the counter carries the exact number.
"""

from __future__ import annotations

import logging
import time

from bastion import metrics

log = logging.getLogger("bastion.audit")

LOG_EVERY = 10.0
"""Seconds between two log lines about dropped records."""


class Drops:
    def __init__(self) -> None:
        self._last_log = 0.0

    def count(self, reason: str, record_id: str) -> None:
        metrics.AUDIT_DROPPED.labels(reason=reason).inc()
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.error("audit: record %s not taken (%s); see bastion_audit_dropped_total", record_id, reason)
