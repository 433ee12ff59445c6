"""SQLite audit store: the embedded default (`sqlite:///path.db`, by default the same file as the lock store).

One connection per store instance, used only by a dedicated thread, so the event loop never waits on disk.
WAL lets the dashboard and the CLI read while the sidecar writes; `synchronous=FULL` makes each batch durable
when it commits, since the spool deletes what the sink acknowledged. `busy_timeout` covers the short write
locks taken by retention or by the lock store sharing the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bastion.audit.entry import Entry
from bastion.audit.record import AuditRecord
from bastion.audit.sinks.base import (
    MAX_PAGE,
    AuditStore,
    ChainRow,
    Page,
    PruneMarker,
    RecordQuery,
    StatsRow,
    StoreError,
    page_key,
)
from bastion.audit.sinks.sql import (
    INDEX_COLUMNS,
    INSERT_COLUMNS,
    READ_COLUMNS,
    Params,
    entry_row,
    filter_index_ddl,
    row_record,
    select_durations,
    select_records,
    select_stats,
)
from bastion.private_files import prepare_sqlite

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    ingest INTEGER PRIMARY KEY AUTOINCREMENT,
    writer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    started_us INTEGER NOT NULL,
    ended_us INTEGER NOT NULL,
    agent TEXT,
    method TEXT NOT NULL,
    host TEXT NOT NULL,
    url TEXT NOT NULL,
    status INTEGER,
    effect TEXT,
    outcome TEXT NOT NULL,
    record TEXT NOT NULL,
    hash TEXT NOT NULL,
    request_body BLOB,
    response_body BLOB,
    purged_us INTEGER,
    UNIQUE (writer, seq)
);
CREATE INDEX IF NOT EXISTS audit_records_id ON audit_records (id);
CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (started_us, writer, seq);
CREATE INDEX IF NOT EXISTS audit_records_agent ON audit_records (agent, started_us);
CREATE INDEX IF NOT EXISTS audit_records_bodies ON audit_records (started_us)
    WHERE request_body IS NOT NULL OR response_body IS NOT NULL;
CREATE TABLE IF NOT EXISTS audit_prune (
    writer TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    ended_us INTEGER,
    pruned_us INTEGER NOT NULL
);
"""
_PRUNE_CHUNK = 5000
# Column lists are constants; every value is a bound parameter.
_INSERT = (f"INSERT OR IGNORE INTO audit_records ({', '.join(INSERT_COLUMNS)}) "  # noqa: S608
           f"VALUES ({', '.join('?' * len(INSERT_COLUMNS))})")
_GET = f"SELECT {READ_COLUMNS} FROM audit_records WHERE id = ? ORDER BY id, writer, seq LIMIT 1"  # noqa: S608
_CHANGES = f"SELECT ingest, {READ_COLUMNS} FROM audit_records WHERE ingest > ? ORDER BY ingest LIMIT ?"  # noqa: S608
_CHAIN = (f"SELECT seq, hash, record, request_body, response_body, purged_us, {', '.join(INDEX_COLUMNS)} "  # noqa: S608
          "FROM audit_records WHERE writer = ? AND seq > ? ORDER BY seq LIMIT 500")


class SQLiteStore(AuditStore):
    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.display_url = f"sqlite:///{self.path.absolute()}"
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-sqlite")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.display_url}: store is not open")
        return self._conn

    async def open(self) -> None:
        if self._conn is None:
            await self._run(self._open_sync)

    def _open_sync(self) -> None:
        if not self.path.parent.is_dir():
            raise StoreError(f"{self.display_url}: directory {self.path.parent} does not exist")
        try:
            # Records and bodies are sensitive: the file is owner-only before SQLite opens it (created 0600, or
            # tightened if an older version left it wider); SQLite gives -wal and -shm the same mode.
            prepare_sqlite(self.path)
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{self.display_url}: {e}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            for ddl in filter_index_ddl("audit_records"):
                conn.execute(ddl)
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"{self.display_url}: {e}") from None
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
        self._executor = None

    # --- writing ---------------------------------------------------------------------------------------------

    async def write(self, entries: Sequence[Entry]) -> None:
        if entries:
            await self._run(self._write_sync, list(entries))

    def _write_sync(self, entries: list[Entry]) -> None:
        rows = [entry_row(e) for e in entries]  # here, not on the event loop: a few µs per record add up
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_INSERT, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # --- reading ---------------------------------------------------------------------------------------------

    async def get(self, record_id: str) -> AuditRecord | None:
        return await self._run(self._get_sync, record_id)

    def _get_sync(self, record_id: str) -> AuditRecord | None:
        row = self._db().execute(_GET, (record_id,)).fetchone()
        return None if row is None else row_record(row)

    async def query(self, q: RecordQuery) -> Page:
        return await self._run(self._query_sync, q)

    def _query_sync(self, q: RecordQuery) -> Page:
        p = Params(numbered=False)
        sql = select_records("audit_records", q, p)
        rows = self._db().execute(sql, p.args).fetchall()
        limit = max(1, min(q.limit, MAX_PAGE))
        records = [row_record(r) for r in rows[:limit]]
        return Page(records, page_key(records[-1]) if len(rows) > limit else None)

    async def stats(self, since_us: int) -> list[StatsRow] | None:
        sql = select_stats("audit_records", "?", "json_extract(record, '$.decision.rules[0]')")
        rows = await self._run(lambda: self._db().execute(sql, (since_us,)).fetchall())
        return [StatsRow(r[0], r[1], r[2], r[3], int(r[4]), int(r[5])) for r in rows]

    async def durations(self, since_us: int, limit: int = 1000) -> list[int]:
        sql = select_durations("audit_records", "?", "?")
        rows = await self._run(lambda: self._db().execute(sql, (since_us, limit)).fetchall())
        return [int(r[0]) for r in rows]

    async def changes(self, token: str | None, limit: int = 500) -> tuple[list[AuditRecord], str]:
        return await self._run(self._changes_sync, token, limit)

    def _changes_sync(self, token: str | None, limit: int) -> tuple[list[AuditRecord], str]:
        db = self._db()
        if token is None:
            (last,) = db.execute("SELECT COALESCE(MAX(ingest), 0) FROM audit_records").fetchone()
            return [], str(last)
        try:
            after = int(token)
        except ValueError:
            raise StoreError(f"bad change token {token!r}") from None
        rows = db.execute(_CHANGES, (after, limit)).fetchall()
        return [row_record(r[1:]) for r in rows], str(rows[-1][0]) if rows else token

    async def writers(self) -> list[str]:
        return await self._run(lambda: [r[0] for r in self._db().execute(
            "SELECT writer FROM audit_records GROUP BY writer UNION SELECT writer FROM audit_prune "
            "ORDER BY 1").fetchall()])

    async def prune_markers(self) -> dict[str, PruneMarker]:
        rows = await self._run(lambda: self._db().execute(
            "SELECT writer, seq, hash, ended_us, pruned_us FROM audit_prune").fetchall())
        return {r[0]: PruneMarker(*r) for r in rows}

    async def chain_rows(self, writer: str) -> AsyncIterator[ChainRow]:
        after = -1
        while True:
            rows = await self._run(self._chain_page, writer, after)
            for row in rows:
                yield row
            if len(rows) < 500:
                return
            after = rows[-1].seq

    def _chain_page(self, writer: str, after: int) -> list[ChainRow]:
        rows = self._db().execute(_CHAIN, (writer, after)).fetchall()
        return [ChainRow(r[0], r[1], r[2].encode("utf-8") if isinstance(r[2], str) else bytes(r[2]), r[3], r[4],
                         r[5], dict(zip(INDEX_COLUMNS, r[6:], strict=True))) for r in rows]

    # --- retention -------------------------------------------------------------------------------------------

    async def prune_records(self, cutoff_us: int, now_us: int) -> int:
        return await self._run(self._prune_sync, cutoff_us, now_us)

    def _prune_sync(self, cutoff_us: int, now_us: int) -> int:
        db = self._db()
        total = 0
        writers = [r[0] for r in db.execute("SELECT DISTINCT writer FROM audit_records").fetchall()]
        for writer in writers:
            while True:
                db.execute("BEGIN IMMEDIATE")
                try:
                    (boundary,) = db.execute(
                        "SELECT MIN(seq) FROM audit_records WHERE writer = ? AND started_us >= ?",
                        (writer, cutoff_us)).fetchone()
                    limit_seq = boundary if boundary is not None else 1 << 62
                    last = db.execute(
                        "SELECT seq, hash, ended_us FROM (SELECT seq, hash, ended_us FROM audit_records "
                        "WHERE writer = ? AND seq < ? ORDER BY seq LIMIT ?) ORDER BY seq DESC LIMIT 1",
                        (writer, limit_seq, _PRUNE_CHUNK)).fetchone()
                    if last is None:
                        db.execute("COMMIT")
                        break
                    n = db.execute("DELETE FROM audit_records WHERE writer = ? AND seq <= ?",
                                   (writer, last[0])).rowcount
                    db.execute("INSERT INTO audit_prune (writer, seq, hash, ended_us, pruned_us) "
                               "VALUES (?, ?, ?, ?, ?) ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, "
                               "hash = excluded.hash, ended_us = excluded.ended_us, pruned_us = excluded.pruned_us",
                               (writer, last[0], last[1], last[2], now_us))
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                total += n
        return total

    async def purge_bodies(self, cutoff_us: int, now_us: int) -> int:
        return await self._run(self._purge_sync, cutoff_us, now_us)

    def _purge_sync(self, cutoff_us: int, now_us: int) -> int:
        db = self._db()
        total = 0
        while True:
            n = db.execute(
                "UPDATE audit_records SET request_body = NULL, response_body = NULL, purged_us = ? WHERE ingest IN "
                "(SELECT ingest FROM audit_records WHERE started_us < ? AND "
                "(request_body IS NOT NULL OR response_body IS NOT NULL) LIMIT ?)",
                (now_us, cutoff_us, _PRUNE_CHUNK)).rowcount
            total += n
            if n < _PRUNE_CHUNK:
                return total
