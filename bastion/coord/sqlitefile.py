"""One SQLite file shared by every Bastion process on a host, used from asyncio without blocking the loop.

Across processes: the file is in WAL mode and every change runs in `BEGIN IMMEDIATE`, which takes the write
lock *before* reading, so check-then-write is atomic between processes (a deferred transaction that reads and
then writes can fail with SQLITE_BUSY whatever the busy timeout). The busy timeout makes a contender wait for
that lock; past it, the call fails with `StoreUnavailable`. WAL needs every process on the same host: never
put the file on a network filesystem.

Off the event loop: sqlite3 calls block, so each `SqliteFile` owns one thread that owns the connection
(sqlite3 connections stay in the thread that made them) and runs this process's calls in order; the write
lock would serialise them anyway. The task locks, the approvals and the fleet state each use one.

Writes are group-committed: the writes that arrive while the thread is busy wait for it together and then run
as one batch, one `BEGIN IMMEDIATE` ... `COMMIT`, each write in a savepoint of its own, so one that fails is
rolled back alone and the others commit. Each write is as atomic as before (nothing of another process comes
between its read and its write); what a batch saves is the hand-offs between the event loop and the thread
(one per batch, not one per write: every hand-off makes the two threads trade the GIL, which cost a proxied
call under a budget about 0.15 ms of the event loop's time at 16 concurrent calls) and a commit per write.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bastion.coord.store import StoreUnavailable
from bastion.private_files import prepare_sqlite

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], Any]
Outcome = tuple[bool, Any]  # (True, result) or (False, the exception to raise)
MAX_BATCH = 64  # writes per transaction: bounds how long one batch holds the file's write lock
# Errors that belong to one write (a constraint, a bad statement or value), not to the file or the connection.
_ONE_WRITE_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError, sqlite3.DataError)


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
        self._queued: list[tuple[Work, asyncio.Future[Any]]] = []  # writes waiting for the next batch
        self._batch_running = False

    async def run(self, work: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """`work(conn)` on the store thread; when `write`, atomically (`BEGIN IMMEDIATE`, or a savepoint of a
        batch: see the module doc)."""
        if self._closed:
            raise RuntimeError(f"the {self._what} is closed")
        loop = asyncio.get_running_loop()
        if not write:
            return await loop.run_in_executor(self._executor, self._transaction, work, False)
        done: asyncio.Future[T] = loop.create_future()
        self._queued.append((work, done))
        if not self._batch_running:
            self._start_batch(loop)
        return await done

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        # A write whose caller was cancelled before it started is dropped, as an executor job would be.
        self._queued = [(work, done) for work, done in self._queued if not done.done()]
        if not self._queued:
            return
        batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
        self._batch_running = True
        ran: Future[list[Outcome]]
        try:
            if self._closed:
                raise RuntimeError(f"the {self._what} is closed")
            ran = self._executor.submit(self._write_batch, [work for work, _ in batch])
        except RuntimeError as e:  # the store was closed while these waited
            ran = Future()
            ran.set_exception(e)
            self._deliver(loop, batch, ran)
            return

        def finished(_: Future[list[Outcome]]) -> None:  # on the store thread: one hand-off back per batch
            try:
                loop.call_soon_threadsafe(self._deliver, loop, batch, ran)
            except RuntimeError:  # the loop is gone, and its waiters with it: the next loop starts afresh
                self._batch_running = False
                self._queued = []

        ran.add_done_callback(finished)

    def _deliver(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Work, asyncio.Future[Any]]],
                 ran: Future[list[Outcome]]) -> None:
        self._batch_running = False
        try:
            outcomes = ran.result()
        except BaseException as e:  # the thread failed outside any write (shut down, say)
            outcomes = [(False, e)] * len(batch)
        for (_, done), (ok, value) in zip(batch, outcomes, strict=True):
            if done.done():  # its caller was cancelled; the write itself ran
                continue
            if ok:
                done.set_result(value)
            else:
                done.set_exception(value)
        if self._queued:
            self._start_batch(loop)

    def _write_batch(self, works: list[Work]) -> list[Outcome]:
        """Every write in one transaction, each in its own savepoint (on the store thread)."""
        outcomes: list[Outcome] = []
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for work in works:
                    conn.execute("SAVEPOINT write")
                    try:
                        result = work(conn)
                    except _ONE_WRITE_ERRORS as e:  # this write's own statements or data: undone alone
                        conn.execute("ROLLBACK TO write")
                        conn.execute("RELEASE write")
                        outcomes.append((False, self._unavailable(e, keep_connection=True)))
                    except sqlite3.Error:  # the file or the connection, not this write: the batch fails
                        raise
                    except Exception as e:  # this write refused itself (a value it rejects): undo it alone
                        conn.execute("ROLLBACK TO write")
                        conn.execute("RELEASE write")
                        outcomes.append((False, e))
                    else:
                        conn.execute("RELEASE write")
                        outcomes.append((True, result))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:  # the transaction itself failed: nothing of the batch was kept
            error = self._unavailable(e)
            return [(False, error)] * len(works)
        return outcomes

    def _unavailable(self, e: sqlite3.Error, *, keep_connection: bool = False) -> StoreUnavailable:
        if not keep_connection and not is_busy(e):
            # Not just contention: start from a fresh connection, the file may have been fixed or replaced.
            self._close_connection()
        error = StoreUnavailable(f"{self._what} sqlite:///{self.path} unavailable: {e}")
        error.__cause__ = e
        return error

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
            raise self._unavailable(e) from e

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
