"""The audit log: one record per HTTP exchange an agent makes through Bastion, redacted, hash-chained,
spooled locally first and drained to SQLite, PostgreSQL or JSON-lines files.

What the proxy uses (all importable from here):

    client = await AuditClient.spawn(audit_url, home.path, display_url)   # the worker process starts
    await client.start(AuditConfig.from_settings(policy.audit))             # ... and opens its writer
    rid = new_request_id()                      # X-Bastion-Request-Id, and the record's id
    if client.must_refuse(): ...                # before forwarding: 503 audit_unavailable
    cap = client.capture(content_encoding=..., content_type=...)   # a streamed body; cap.feed(chunk) in the tap
    client.submit_exchange(ExchangeSnapshot(...))   # once per exchange (`bastion.proxy.flowrecord.snapshot`)
    client.configure(AuditConfig.from_settings(new_policy.audit))  # on reload
    await client.close()                        # on shutdown: the worker drains and exits

In the worker (`bastion.audit.worker`) an `AuditWriter` does the work; it can also be used directly, in one
process (`await AuditWriter.open(url, spool_dir)`, then `submit` / `submit_exchange`, `flush`, `close`).
Readers (CLI, dashboard) use `open_store(url)`; `bastion.audit.har`, `.verify` and `.retention` build on it.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562), so `bastion audit ...` and every other subcommand start without loading
# the writer, compression libraries and metrics.
_EXPORTS = {
    "BodyCapture": "bodies", "CapturedBody": "bodies", "capture_bytes": "bodies",
    "ApprovalFact": "record", "AuditRecord": "record", "Body": "record", "DecisionFacts": "record",
    "ErrorFacts": "record", "Identity": "record", "LockFact": "record", "Request": "record", "Response": "record",
    "Timings": "record",
    "AuditConfig": "settings",
    "AuditStore": "sinks", "RecordQuery": "sinks", "StoreError": "sinks", "open_store": "sinks",
    "SpoolLockedError": "spool",
    "AuditWriter": "writer",
    "AuditClient": "client",
    "ExchangeSnapshot": "snapshot",
}


def __getattr__(name: str) -> Any:
    if name in ("new_request_id", "now_us"):  # the process-wide generator lives in bastion.ids
        return getattr(importlib.import_module("bastion.ids"), name)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bastion.audit' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bastion.audit.{module}"), name)


__all__ = [
    "ApprovalFact",
    "AuditClient",
    "AuditConfig",
    "AuditRecord",
    "AuditStore",
    "AuditWriter",
    "Body",
    "BodyCapture",
    "CapturedBody",
    "DecisionFacts",
    "ErrorFacts",
    "ExchangeSnapshot",
    "Identity",
    "LockFact",
    "RecordQuery",
    "Request",
    "Response",
    "SpoolLockedError",
    "StoreError",
    "Timings",
    "capture_bytes",
    "new_request_id",
    "now_us",
    "open_store",
]
