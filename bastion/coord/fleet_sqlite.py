"""Fleet coordination in the SQLite file the task locks use: milestones, budgets, pauses and guard counters for
every sidecar and CLI of one host.

Each concern is a table of its own in the same file (see `bastion.coord.sqlitefile`), and each change is one
`BEGIN IMMEDIATE` transaction on the store thread, so a budget's check and reservation are atomic between the
processes of the host and never block the event loop.

Time is the host's wall clock (`time.time()`), read inside the transaction: windows are aligned to the epoch
(`bastion.coord.fleet.window_of`), so they have to be on the clock that every process of the host shares.
Expired rows (milestones past their expiry, budget windows a whole window past their reset, guard windows
past their end) are ignored by every read and dropped about once a minute by a write.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from bastion.coord.fleet import (
    BudgetUsage,
    Exceeded,
    FleetStore,
    Milestone,
    Pause,
    PauseAction,
    Reservation,
    Unit,
    admits,
    window_of,
)
from bastion.coord.sqlitefile import SqliteFile

T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fleet_milestones (
        key          TEXT PRIMARY KEY,
        completed_at REAL NOT NULL,
        expires_at   REAL NOT NULL,
        completed_by TEXT NOT NULL,
        request_id   TEXT
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS fleet_milestones_by_expiry ON fleet_milestones (expires_at)",
    """CREATE TABLE IF NOT EXISTS fleet_budgets (
        budget       TEXT NOT NULL,
        key          TEXT NOT NULL,
        window_start REAL NOT NULL,
        resets_at    REAL NOT NULL,
        drop_at      REAL NOT NULL,    -- resets_at + the window's length: a late settle still finds the row
        unit         TEXT NOT NULL,
        lim          INTEGER NOT NULL,
        used         INTEGER NOT NULL,
        reserved     INTEGER NOT NULL,
        PRIMARY KEY (budget, key, window_start)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS fleet_budgets_by_reset ON fleet_budgets (resets_at)",
    "CREATE INDEX IF NOT EXISTS fleet_budgets_by_drop ON fleet_budgets (drop_at)",
    """CREATE TABLE IF NOT EXISTS fleet_pauses (
        agent     TEXT PRIMARY KEY,
        reason    TEXT NOT NULL,
        paused_by TEXT NOT NULL,
        paused_at REAL NOT NULL,
        action    TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS fleet_guard_counts (
        guard        TEXT NOT NULL,
        agent        TEXT NOT NULL,
        window_start REAL NOT NULL,
        window_end   REAL NOT NULL,
        total        INTEGER NOT NULL,
        PRIMARY KEY (guard, agent, window_start)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS fleet_guard_counts_by_end ON fleet_guard_counts (window_end)",
)
_TABLES = {"fleet_milestones", "fleet_budgets", "fleet_pauses", "fleet_guard_counts"}
_PURGE_EVERY = 60.0

_MILESTONE = "SELECT key, completed_at, expires_at, completed_by, request_id FROM fleet_milestones"
_BUDGET_TOUCH = ("UPDATE fleet_budgets SET unit = ?, lim = ?, resets_at = ?, drop_at = ? "
                 "WHERE budget = ? AND key = ? AND window_start = ?")
_BUDGET_ADD = (
    "INSERT INTO fleet_budgets (budget, key, window_start, resets_at, drop_at, unit, lim, used, reserved) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (budget, key, window_start) DO UPDATE SET "
    "used = used + excluded.used, reserved = reserved + excluded.reserved, unit = excluded.unit, "
    "lim = excluded.lim, resets_at = excluded.resets_at, drop_at = excluded.drop_at"
)


def _milestone(row: tuple[str, float, float, str, str | None]) -> Milestone:
    key, completed_at, expires_at, by, request_id = row
    return Milestone(key=key, completed_at=completed_at, expires_at=expires_at, by=by, request_id=request_id)


def _pause(row: tuple[str, str, str, float, str]) -> Pause:
    agent, reason, paused_by, paused_at, action = row
    return Pause(agent=agent, reason=reason, paused_by=paused_by, paused_at=paused_at,
                 action=cast(PauseAction, action))


class SqliteFleetStore(FleetStore):
    """`FleetStore` on a SQLite file (created with its tables on first use; not the directory)."""

    backend = "sqlite"

    def __init__(self, path: Path | str, *, busy_timeout: float = 5.0) -> None:
        self._file = SqliteFile(path, schema=_SCHEMA, tables=_TABLES, what="fleet store", busy_timeout=busy_timeout)
        self._next_purge = 0.0  # used only on the store thread

    @property
    def path(self) -> Path:
        return self._file.path

    async def close(self) -> None:
        await self._file.close()

    async def _run(self, work: Callable[[sqlite3.Connection, float], T], *, write: bool) -> T:
        """`work(conn, now)` on the store thread, in one transaction; `now` is read once the lock is ours."""
        return await self._file.run(lambda conn: work(conn, time.time()), write=write)

    def _purge(self, conn: sqlite3.Connection, now: float) -> None:
        """Dead rows do no harm (every read skips them) but would pile up: drop them once a minute."""
        if now < self._next_purge:
            return
        self._next_purge = now + _PURGE_EVERY
        conn.execute("DELETE FROM fleet_milestones WHERE expires_at <= ?", (now,))
        conn.execute("DELETE FROM fleet_budgets WHERE drop_at <= ?", (now,))
        conn.execute("DELETE FROM fleet_guard_counts WHERE window_end <= ?", (now,))

    # -- milestones ------------------------------------------------------------------------------------------

    async def _complete_milestone(self, key: str, ttl: float, by: str, request_id: str | None) -> Milestone:
        def work(conn: sqlite3.Connection, now: float) -> Milestone:
            done = Milestone(key=key, completed_at=now, expires_at=now + ttl, by=by, request_id=request_id)
            conn.execute("INSERT OR REPLACE INTO fleet_milestones (key, completed_at, expires_at, completed_by, "
                         "request_id) VALUES (?, ?, ?, ?, ?)", (key, now, now + ttl, by, request_id))
            self._purge(conn, now)
            return done

        return await self._run(work, write=True)

    async def _missing_milestones(self, keys: list[str]) -> list[str]:
        def work(conn: sqlite3.Connection, now: float) -> list[str]:
            present: set[str] = set()
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                present.update(row[0] for row in conn.execute(
                    f"SELECT key FROM fleet_milestones WHERE key IN ({marks}) AND expires_at > ?",  # noqa: S608
                    (*chunk, now)))
            return [k for k in keys if k not in present]

        return await self._run(work, write=False)

    async def _clear_milestone(self, key: str) -> Milestone | None:
        def work(conn: sqlite3.Connection, now: float) -> Milestone | None:
            row = conn.execute(_MILESTONE + " WHERE key = ? AND expires_at > ?", (key, now)).fetchone()
            conn.execute("DELETE FROM fleet_milestones WHERE key = ?", (key,))
            return None if row is None else _milestone(row)

        return await self._run(work, write=True)

    async def _list_milestones(self) -> list[Milestone]:
        def work(conn: sqlite3.Connection, now: float) -> list[Milestone]:
            return [_milestone(row) for row in conn.execute(_MILESTONE + " WHERE expires_at > ?", (now,))]

        return await self._run(work, write=False)

    # -- budgets ---------------------------------------------------------------------------------------------

    async def _reserve(self, budget: str, key: str, unit: Unit, limit: int, per: float,
                       amount: int) -> Reservation | Exceeded:
        def work(conn: sqlite3.Connection, now: float) -> Reservation | Exceeded:
            start, end = window_of(now, per)
            row = conn.execute("SELECT used FROM fleet_budgets WHERE budget = ? AND key = ? AND window_start = ?",
                               (budget, key, start)).fetchone()
            used = 0 if row is None else int(row[0])
            if not admits(unit, used, amount, limit):
                # Nothing added, but the row shows this call's limit (a reload may have changed it).
                conn.execute(_BUDGET_TOUCH, (unit, limit, end, end + per, budget, key, start))
                return Exceeded(budget=budget, key=key, unit=unit, limit=limit, used=used, resets_at=end)
            in_flight = amount if unit == "tokens" else 0  # a call is settled in full when admitted
            conn.execute(_BUDGET_ADD, (budget, key, start, end, end + per, unit, limit, amount, in_flight))
            self._purge(conn, now)
            return Reservation(budget=budget, key=key, unit=unit, amount=amount, limit=limit, used=used + amount,
                               window_start=start, resets_at=end)

        return await self._run(work, write=True)

    async def _settle(self, reservation: Reservation, actual: int) -> None:
        r = reservation

        def work(conn: sqlite3.Connection, now: float) -> None:
            conn.execute("UPDATE fleet_budgets SET used = max(0, used + ? - ?), reserved = max(0, reserved - ?) "
                         "WHERE budget = ? AND key = ? AND window_start = ? AND drop_at > ?",
                         (actual, r.amount, r.amount, r.budget, r.key, r.window_start, now))

        await self._run(work, write=True)

    async def _list_budgets(self) -> list[BudgetUsage]:
        def work(conn: sqlite3.Connection, now: float) -> list[BudgetUsage]:
            rows = conn.execute("SELECT budget, key, unit, lim, used, reserved, window_start, resets_at "
                                "FROM fleet_budgets WHERE window_start <= ? AND resets_at > ?", (now, now))
            return [BudgetUsage(budget=b, key=k, unit=cast(Unit, u), limit=lim, used=used, reserved=reserved,
                                window_start=start, resets_at=end)
                    for b, k, u, lim, used, reserved, start, end in rows]

        return await self._run(work, write=False)

    # -- pauses ----------------------------------------------------------------------------------------------

    async def _pause(self, agent: str, reason: str, paused_by: str, action: PauseAction) -> Pause:
        def work(conn: sqlite3.Connection, now: float) -> Pause:
            conn.execute("INSERT OR REPLACE INTO fleet_pauses (agent, reason, paused_by, paused_at, action) "
                         "VALUES (?, ?, ?, ?, ?)", (agent, reason, paused_by, now, action))
            return Pause(agent=agent, reason=reason, paused_by=paused_by, paused_at=now, action=action)

        return await self._run(work, write=True)

    async def _resume(self, agent: str) -> Pause | None:
        def work(conn: sqlite3.Connection, now: float) -> Pause | None:
            row = conn.execute("SELECT agent, reason, paused_by, paused_at, action FROM fleet_pauses "
                               "WHERE agent = ?", (agent,)).fetchone()
            conn.execute("DELETE FROM fleet_pauses WHERE agent = ?", (agent,))
            return None if row is None else _pause(row)

        return await self._run(work, write=True)

    async def _list_pauses(self) -> list[Pause]:
        def work(conn: sqlite3.Connection, now: float) -> list[Pause]:
            return [_pause(row) for row in
                    conn.execute("SELECT agent, reason, paused_by, paused_at, action FROM fleet_pauses")]

        return await self._run(work, write=False)

    # -- guard counters --------------------------------------------------------------------------------------

    async def _count(self, guard: str, agent: str, per: float, amount: int) -> int:
        def work(conn: sqlite3.Connection, now: float) -> int:
            start, end = window_of(now, per)
            conn.execute("INSERT INTO fleet_guard_counts (guard, agent, window_start, window_end, total) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT (guard, agent, window_start) DO UPDATE SET "
                         "total = total + excluded.total, window_end = excluded.window_end",
                         (guard, agent, start, end, amount))
            row = conn.execute("SELECT total FROM fleet_guard_counts WHERE guard = ? AND agent = ? "
                               "AND window_start = ?", (guard, agent, start)).fetchone()
            self._purge(conn, now)
            return int(row[0])

        return await self._run(work, write=True)

    async def _ping(self) -> None:
        await self._file.run(lambda conn: conn.execute("SELECT 1").fetchone(), write=False)
