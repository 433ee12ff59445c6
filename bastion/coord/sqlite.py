"""Task locks in a SQLite file: the embedded default, shared by every Bastion process on one host.

Every change is one `BEGIN IMMEDIATE` transaction on a WAL file, run on the store's own thread (see
`bastion.coord.sqlitefile`), so check-then-write is atomic between processes and never blocks the loop.

Time: leases are measured on CLOCK_MONOTONIC, which on Linux is one clock for all processes and never jumps
when someone sets the wall clock. Rows record the boot id, and a lease written before a reboot is expired by
definition. Without a boot id (not Linux) wall time is used instead.

Fences: one counter for the whole file, max(last + 1, wall time in microseconds), written in the grant's own
transaction. That makes them unique and increasing for every key, and of the same magnitude as Redis fences.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bastion.coord.sqlitefile import SqliteFile
from bastion.coord.store import Conflict, Lease, LockInfo, LockStore

T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS lock_leases (
        key         TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        fence       INTEGER NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('held', 'offered')),
        handoff_to  TEXT,
        acquired_at REAL NOT NULL,     -- wall clock, for display only
        clock       TEXT NOT NULL,     -- which clock expires_ns is on (boot id)
        expires_ns  INTEGER NOT NULL   -- on that clock
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS lock_fence (
        id   INTEGER PRIMARY KEY CHECK (id = 1),
        last INTEGER NOT NULL
    )""",
)

_SELECT = "SELECT key, owner, fence, state, handoff_to, acquired_at, clock, expires_ns FROM lock_leases"
_GRANT = ("INSERT OR REPLACE INTO lock_leases (key, owner, fence, state, handoff_to, acquired_at, clock, expires_ns) "
          "VALUES (?, ?, ?, 'held', NULL, ?, ?, ?)")
_PURGE_EVERY_NS = 60 * 1_000_000_000

Row = tuple[str, str, int, str, str | None, float, str, int]


@dataclass(frozen=True, slots=True)
class HostClock:
    """The clock leases are measured on, and its identity (rows from another clock are dead)."""

    id: str
    monotonic: bool

    @classmethod
    def detect(cls) -> HostClock:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = ""
        return cls(f"boot:{boot}", True) if boot else cls("wall", False)

    def now_ns(self) -> int:
        return time.monotonic_ns() if self.monotonic else time.time_ns()


def _wall(at_ns: int, now_ns: int) -> float:
    return time.time() + (at_ns - now_ns) / 1e9


class SqliteLockStore(LockStore):
    """`LockStore` on a SQLite file. The file and its tables are created on first use (not the directory)."""

    backend = "sqlite"

    def __init__(self, path: Path | str, *, busy_timeout: float = 5.0, clock: HostClock | None = None) -> None:
        self._file = SqliteFile(path, schema=_SCHEMA, tables={"lock_leases", "lock_fence"}, what="lock store",
                                busy_timeout=busy_timeout)
        self._clock = clock or HostClock.detect()
        self._next_purge_ns = 0

    @property
    def path(self) -> Path:
        return self._file.path

    # --- thread plumbing ------------------------------------------------------------------------------------

    async def _run(self, work: Callable[[sqlite3.Connection, int], T], *, write: bool) -> T:
        """`work(conn, now_ns)` on the store thread, in one transaction; `now` is read once the lock is ours."""
        return await self._file.run(lambda conn: work(conn, self._clock.now_ns()), write=write)

    async def close(self) -> None:
        await self._file.close()

    # --- rows -----------------------------------------------------------------------------------------------

    def _live_row(self, conn: sqlite3.Connection, key: str, now: int) -> Row | None:
        row: Row | None = conn.execute(_SELECT + " WHERE key = ?", (key,)).fetchone()
        if row is None or row[6] != self._clock.id or row[7] <= now:
            return None
        return row

    @staticmethod
    def _info(row: Row, now: int) -> LockInfo:
        key, owner, fence, state, to, acquired_at, _, expires_ns = row
        return LockInfo(key=key, holder=owner, fence=fence, acquired_at=acquired_at,
                        expires_at=_wall(expires_ns, now), handoff_to=to if state == "offered" else None)

    @staticmethod
    def _next_fence(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT last FROM lock_fence WHERE id = 1").fetchone()
        fence = max((row[0] if row else 0) + 1, time.time_ns() // 1000)
        conn.execute("INSERT OR REPLACE INTO lock_fence (id, last) VALUES (1, ?)", (fence,))
        return fence

    def _purge(self, conn: sqlite3.Connection, now: int) -> None:
        """Dead rows do no harm (every read checks expiry) but would pile up: drop them once a minute."""
        if now >= self._next_purge_ns:
            conn.execute("DELETE FROM lock_leases WHERE clock != ? OR expires_ns <= ?", (self._clock.id, now))
            self._next_purge_ns = now + _PURGE_EVERY_NS

    # --- operations -----------------------------------------------------------------------------------------

    async def _acquire(self, key: str, agent: str, ttl: float) -> Lease | Conflict:
        ttl_ns = max(1, round(ttl * 1e9))

        def work(conn: sqlite3.Connection, now: int) -> Lease | Conflict:
            row = self._live_row(conn, key, now)
            if row is not None:
                _, owner, fence, state, to, acquired_at, _, expires_ns = row
                if state == "held" and owner == agent:
                    expires = max(expires_ns, now + ttl_ns)
                    if expires != expires_ns:
                        conn.execute("UPDATE lock_leases SET expires_ns = ? WHERE key = ?", (expires, key))
                    return Lease(key=key, agent=agent, fence=fence, acquired_at=acquired_at,
                                 expires_at=_wall(expires, now), renewed=True)
                if state == "held" or to != agent:
                    holder = owner if state == "held" else (to or owner)
                    return Conflict(key=key, holder=holder, expires_at=_wall(expires_ns, now),
                                    pending=state == "offered")
            self._purge(conn, now)
            fence = self._next_fence(conn)
            acquired_at = time.time()
            conn.execute(_GRANT, (key, agent, fence, acquired_at, self._clock.id, now + ttl_ns))
            return Lease(key=key, agent=agent, fence=fence, acquired_at=acquired_at,
                         expires_at=_wall(now + ttl_ns, now), renewed=False)

        return await self._run(work, write=True)

    async def _verify(self, key: str, agent: str, fence: int) -> bool:
        def work(conn: sqlite3.Connection, now: int) -> bool:
            row = self._live_row(conn, key, now)
            return row is not None and row[1] == agent and row[2] == fence and row[3] == "held"

        return await self._run(work, write=False)

    async def _release(self, key: str, agent: str, fence: int | None) -> bool:
        def work(conn: sqlite3.Connection, now: int) -> bool:
            sql = ("DELETE FROM lock_leases WHERE key = ? AND owner = ? AND state = 'held' AND clock = ? "
                   "AND expires_ns > ?")
            params: tuple[object, ...] = (key, agent, self._clock.id, now)
            if fence is not None:
                sql += " AND fence = ?"
                params += (fence,)
            return conn.execute(sql, params).rowcount == 1

        return await self._run(work, write=True)

    async def _admin_release(self, key: str) -> LockInfo | None:
        def work(conn: sqlite3.Connection, now: int) -> LockInfo | None:
            row = self._live_row(conn, key, now)
            conn.execute("DELETE FROM lock_leases WHERE key = ?", (key,))
            return None if row is None else self._info(row, now)

        return await self._run(work, write=True)

    async def _handoff(self, key: str, to_agent: str, ttl: float) -> LockInfo | None:
        expires_in = max(1, round(ttl * 1e9))

        def work(conn: sqlite3.Connection, now: int) -> LockInfo | None:
            row = self._live_row(conn, key, now)
            if row is None:
                return None
            conn.execute("UPDATE lock_leases SET state = 'offered', handoff_to = ?, expires_ns = ? WHERE key = ?",
                         (to_agent, now + expires_in, key))
            return self._info((*row[:3], "offered", to_agent, row[5], row[6], now + expires_in), now)

        return await self._run(work, write=True)

    async def _get(self, key: str) -> LockInfo | None:
        def work(conn: sqlite3.Connection, now: int) -> LockInfo | None:
            row = self._live_row(conn, key, now)
            return None if row is None else self._info(row, now)

        return await self._run(work, write=False)

    async def _list_locks(self) -> list[LockInfo]:
        def work(conn: sqlite3.Connection, now: int) -> list[LockInfo]:
            rows: list[Row] = conn.execute(
                _SELECT + " WHERE clock = ? AND expires_ns > ?", (self._clock.id, now)
            ).fetchall()
            return [self._info(row, now) for row in rows]

        return await self._run(work, write=False)

    async def _ping(self) -> None:
        await self._run(lambda conn, now: conn.execute("SELECT 1").fetchone(), write=False)
