"""Audit stores, chosen by URL: `sqlite:///path.db` (default), `postgresql://user@host/db[?schema=NAME]`,
`jsonl:///dir`. See `base.AuditStore` for what each offers."""

from __future__ import annotations

from typing import Any

from bastion.audit.sinks.base import AuditStore, ChainRow, Page, PruneMarker, RecordQuery, StoreError

__all__ = ["AuditStore", "ChainRow", "Page", "PruneMarker", "RecordQuery", "StoreError", "open_store"]


def open_store(url: str, **options: Any) -> AuditStore:
    """The store for `url`, not yet connected (call `await store.open()` or use `async with`).

    Raises StoreError for a URL Bastion does not understand. `options` go to the store's constructor
    (PostgreSQL: `schema`, `connect_timeout`; SQLite: `busy_timeout`; JSONL: `max_file_bytes`).
    """
    from bastion.config import ConfigError, sqlite_path

    if url.startswith("sqlite:"):
        from bastion.audit.sinks.sqlite import SQLiteStore

        try:
            return SQLiteStore(sqlite_path(url), **options)
        except ConfigError as e:
            raise StoreError(str(e)) from None
    if url.startswith(("postgresql://", "postgres://")):
        from bastion.audit.sinks.postgres import PostgresStore

        return PostgresStore(url, **options)
    if url.startswith("jsonl:///"):
        from bastion.audit.sinks.jsonl import JsonlStore

        path = url[len("jsonl:///"):]
        if not path:
            raise StoreError("jsonl URL needs a directory: jsonl:///path/to/dir")
        return JsonlStore(path, **options)
    shown = url.split("@")[-1] if "@" in url else url
    raise StoreError(f"unsupported audit URL {shown!r}: use sqlite:///PATH, postgresql://USER@HOST/DB or "
                     "jsonl:///DIR")
