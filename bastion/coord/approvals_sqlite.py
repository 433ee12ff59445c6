"""Approvals in the SQLite file the task locks use: the embedded default, shared by every process on one host.

Each approval is one row holding the record as JSON, beside the columns the store looks things up by
(fingerprint, state, times). A fingerprint's head (its one live approval) is its own table, so joining or
opening an approval is one `BEGIN IMMEDIATE` transaction: atomic between the sidecars and CLIs of the host.
Approvals not changed for `RETENTION` and expired grants are dropped now and then.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import TypeVar

from bastion.coord.approvals import RETENTION, Approval, ApprovalStore, Grant, Mutation
from bastion.coord.sqlitefile import SqliteFile

T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS approvals (
        id          TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        state       TEXT NOT NULL,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        expires_at  REAL NOT NULL,     -- when a pending approval expires
        doc         TEXT NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS approvals_by_state ON approvals (state, created_at)",
    "CREATE INDEX IF NOT EXISTS approvals_pending ON approvals (expires_at) WHERE state = 'pending'",
    "CREATE INDEX IF NOT EXISTS approvals_by_time ON approvals (created_at)",
    """CREATE TABLE IF NOT EXISTS approval_heads (
        fingerprint TEXT PRIMARY KEY,
        id          TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS approval_grants (
        id    TEXT PRIMARY KEY,
        until REAL NOT NULL,
        doc   TEXT NOT NULL
    ) WITHOUT ROWID""",
)
_TABLES = {"approvals", "approval_heads", "approval_grants"}
_PURGE_EVERY = 60.0


class SqliteApprovalStore(ApprovalStore):
    """`ApprovalStore` on a SQLite file (created with its tables on first use; not the directory)."""

    backend = "sqlite"

    def __init__(self, path: Path | str, *, busy_timeout: float = 5.0) -> None:
        self._file = SqliteFile(path, schema=_SCHEMA, tables=_TABLES, what="approval store",
                                busy_timeout=busy_timeout)
        self._next_purge = 0.0

    @property
    def path(self) -> Path:
        return self._file.path

    async def close(self) -> None:
        await self._file.close()

    @staticmethod
    def _load(conn: sqlite3.Connection, approval_id: str) -> Approval | None:
        row = conn.execute("SELECT doc FROM approvals WHERE id = ?", (approval_id,)).fetchone()
        return None if row is None else Approval.from_doc(row[0])

    @staticmethod
    def _save(conn: sqlite3.Connection, a: Approval) -> None:
        conn.execute("INSERT OR REPLACE INTO approvals (id, fingerprint, state, created_at, updated_at, expires_at, "
                     "doc) VALUES (?, ?, ?, ?, ?, ?, ?)", (a.id, a.fingerprint, a.state, a.created_at, a.updated_at,
                                                          a.expires_at, a.to_doc()))

    def _purge(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        if now < self._next_purge:
            return
        self._next_purge = now + _PURGE_EVERY
        cutoff = now - RETENTION
        conn.execute("DELETE FROM approvals WHERE updated_at < ? AND (state != 'pending' OR expires_at < ?)",
                     (cutoff, cutoff))
        conn.execute("DELETE FROM approval_heads WHERE id NOT IN (SELECT id FROM approvals)")
        conn.execute("DELETE FROM approval_grants WHERE until <= ?", (now,))

    async def _update(self, approval_id: str, fn: Mutation[T]) -> T:
        def work(conn: sqlite3.Connection) -> T:
            after, result = fn(self._load(conn, approval_id))
            if after is not None:
                self._save(conn, after)
            return result

        return await self._file.run(work, write=True)

    async def _update_head(self, fingerprint: str, fn: Mutation[T]) -> T:
        def work(conn: sqlite3.Connection) -> T:
            row = conn.execute("SELECT id FROM approval_heads WHERE fingerprint = ?", (fingerprint,)).fetchone()
            head = None if row is None else self._load(conn, row[0])
            after, result = fn(head)
            if after is not None:
                self._save(conn, after)
                if head is None or after.id != head.id:
                    conn.execute("INSERT OR REPLACE INTO approval_heads (fingerprint, id) VALUES (?, ?)",
                                 (fingerprint, after.id))
                    self._purge(conn)
            return result

        return await self._file.run(work, write=True)

    async def _read(self, approval_ids: list[str]) -> list[Approval]:
        def work(conn: sqlite3.Connection) -> list[Approval]:
            out = []
            for start in range(0, len(approval_ids), 500):
                chunk = approval_ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                out += [Approval.from_doc(row[0]) for row in
                        conn.execute(f"SELECT doc FROM approvals WHERE id IN ({marks})", chunk)]  # noqa: S608
            return out

        return await self._file.run(work, write=False)

    async def _recent(self, state: str | None, limit: int, now: float) -> list[Approval]:
        if state is None:
            where, params = "1", ()
        elif state == "pending":
            where, params = "state = 'pending' AND expires_at > ?", (now,)
        elif state == "expired":  # also stored as pending until someone looks
            where, params = "state = 'expired' OR (state = 'pending' AND expires_at <= ?)", (now,)
        elif state == "lapsed":  # also stored as approved until someone looks
            where, params = "state IN ('lapsed', 'approved')", ()
        else:
            where, params = "state = ?", (state,)
        sql = f"SELECT doc FROM approvals WHERE {where} ORDER BY created_at DESC LIMIT ?"  # noqa: S608 (constants)

        def work(conn: sqlite3.Connection) -> list[Approval]:
            return [Approval.from_doc(row[0]) for row in conn.execute(sql, (*params, limit))]

        return await self._file.run(work, write=False)

    async def _decided(self, approval_ids: list[str], now: float) -> list[str]:
        def work(conn: sqlite3.Connection) -> list[str]:
            waiting: set[str] = set()
            for start in range(0, len(approval_ids), 500):
                chunk = approval_ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                waiting.update(row[0] for row in conn.execute(
                    f"SELECT id FROM approvals WHERE id IN ({marks}) AND state = 'pending' AND expires_at > ?",  # noqa: S608
                    (*chunk, now)))
            return [i for i in approval_ids if i not in waiting]

        return await self._file.run(work, write=False)

    async def _count_pending(self, now: float) -> int:
        return await self._file.run(lambda conn: int(conn.execute(
            "SELECT COUNT(*) FROM approvals WHERE state = 'pending' AND expires_at > ?", (now,)).fetchone()[0]),
            write=False)

    async def _put_grant(self, grant: Grant) -> None:
        await self._file.run(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO approval_grants (id, until, doc) VALUES (?, ?, ?)",
            (grant.id, grant.until, grant.to_doc())), write=True)

    async def _grants(self, now: float) -> list[Grant]:
        def work(conn: sqlite3.Connection) -> list[Grant]:
            rows = conn.execute("SELECT doc FROM approval_grants WHERE until > ?", (now,))
            return [Grant.from_doc(row[0]) for row in rows]

        return await self._file.run(work, write=False)

    async def _delete_grant(self, grant_id: str) -> Grant | None:
        def work(conn: sqlite3.Connection) -> Grant | None:
            row = conn.execute("SELECT doc FROM approval_grants WHERE id = ?", (grant_id,)).fetchone()
            conn.execute("DELETE FROM approval_grants WHERE id = ?", (grant_id,))
            return None if row is None else Grant.from_doc(row[0])

        return await self._file.run(work, write=True)

    async def _ping(self) -> None:
        await self._file.run(lambda conn: conn.execute("SELECT 1").fetchone(), write=False)
