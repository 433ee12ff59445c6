"""One SQLite file shared by every Bastion process on a host, used from asyncio without blocking the loop.

Across processes: the file is in WAL mode and every change runs in `BEGIN IMMEDIATE`, which takes the write
lock *before* reading, so check-then-write is atomic between processes (a deferred transaction that reads and
then writes can fail with SQLITE_BUSY whatever the busy timeout). The busy timeout makes a contender wait for
that lock; past it, the call fails with `StoreUnavailable`. WAL needs every process on the same host: never
put the file on a network filesystem.

Off the event loop: sqlite3 calls block, so each `SqliteFile` owns one thread that owns the connection
(sqlite3 connections stay in the thread that made them) and runs this process's calls in order; the write
lock would serialise them anyway. The task locks and the approvals each use one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from bastion.coord.store import StoreUnavailable
from bastion.private_files import prepare_sqlite

T = TypeVar("T")


def is_busy(error: sqlite3.Error) -> bool:
    """Contention (another connection holds the lock), as opposed to a broken file or connection."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class SqliteFile:
    """A connection on its own thread. `schema` is run once (in one write transaction) when any of `tables`
    is missing; `what` names the store in errors ("lock store")."""

    def __init__(self, path: Path | str, *, schema: Sequence[str], tables: set[str], what: str,
                 busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._schema = tuple(schema)
        self._tables = set(tables)
        self._what = what
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bastion-{what.split()[0]}-sqlite")
        self._conn: sqlite3.Connection | None = None  # used only on the executor thread
        self._closed = False

    async def run(self, work: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """`work(conn)` on the store thread; in one `BEGIN IMMEDIATE` transaction when `write`."""
        if self._closed:
            raise RuntimeError(f"the {self._what} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transaction, work, write)

    def _transaction(self, work: Callable[[sqlite3.Connection], T], write: bool) -> T:
        try:
            conn = self._connection()
            if not write:
                return work(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result
        except sqlite3.Error as e:
            if not is_busy(e):
                # Not just contention: start from a fresh connection, the file may have been fixed or replaced.
                self._close_connection()
            raise StoreUnavailable(f"{self._what} sqlite:///{self.path} unavailable: {e}") from e

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            try:  # owner-only before SQLite creates it: it names agents, tasks and approvals
                prepare_sqlite(self.path)
            except OSError as e:  # reported like SQLite's own "unable to open database file"
                raise sqlite3.OperationalError(f"unable to open database file: {e.strerror or e}") from e
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            try:
                self._enable_wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")
                tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not self._tables <= tables:  # creating takes the write lock: only once
                    conn.execute("BEGIN IMMEDIATE")
                    for statement in self._schema:
                        conn.execute(statement)
                    conn.execute("COMMIT")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL (a no-op once it is). The switch needs an exclusive lock and SQLite does not
        run the busy handler for it, so processes opening a new file together retry here up to the timeout."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL").fetchone()
                return
            except sqlite3.OperationalError as e:
                if not is_busy(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def _close_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_connection)
        self._executor.shutdown(wait=False)
