"""PostgreSQL audit store (`postgresql://user@host/db`), for a fleet of sidecars sharing one audit log.

asyncpg is asynchronous already, so this store runs on the caller's event loop. Writes are one transaction
per batch (`executemany`, pipelined). Each sidecar writes its own chain (its writer id), so sidecars never
contend on a row. Tables live in the schema given by `?schema=NAME` in the URL (default `public`); the
schema is created if missing, under an advisory lock so that sidecars starting together do not race.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
    POSTGRES_JSON,
    READ_COLUMNS,
    Params,
    entry_row,
    filter_index_ddl,
    row_record,
    select_durations,
    select_records,
    select_stats,
)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_PRUNE_CHUNK = 5000
_LOCK_SCHEMA = 0x62617374696F6E01  # pg_advisory_xact_lock keys ("bastion" + n)
_LOCK_RETENTION = 0x62617374696F6E02

log = logging.getLogger("bastion.audit")


def display_url(url: str) -> str:
    """The URL with its password (if any) masked, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _ddl(s: str) -> str:
    return f"""
CREATE SCHEMA IF NOT EXISTS "{s}";
CREATE TABLE IF NOT EXISTS "{s}".audit_records (
    ingest BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    writer TEXT NOT NULL,
    seq BIGINT NOT NULL,
    id TEXT NOT NULL,
    started_us BIGINT NOT NULL,
    ended_us BIGINT NOT NULL,
    agent TEXT,
    method TEXT NOT NULL,
    host TEXT NOT NULL,
    url TEXT NOT NULL,
    status INTEGER,
    effect TEXT,
    outcome TEXT NOT NULL,
    record TEXT NOT NULL,
    hash TEXT NOT NULL,
    request_body BYTEA,
    response_body BYTEA,
    purged_us BIGINT,
    UNIQUE (writer, seq)
);
CREATE INDEX IF NOT EXISTS audit_records_id ON "{s}".audit_records (id);
CREATE INDEX IF NOT EXISTS audit_records_time ON "{s}".audit_records (started_us, writer, seq);
CREATE INDEX IF NOT EXISTS audit_records_agent ON "{s}".audit_records (agent, started_us);
CREATE INDEX IF NOT EXISTS audit_records_bodies ON "{s}".audit_records (started_us)
    WHERE request_body IS NOT NULL OR response_body IS NOT NULL;
CREATE TABLE IF NOT EXISTS "{s}".audit_prune (
    writer TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    ended_us BIGINT,
    pruned_us BIGINT NOT NULL
);
"""


async def _analyze_if_never(pool: Any, table: str) -> None:
    """A large table PostgreSQL has never analyzed (restored, or filled faster than autovacuum looks) gets
    plans from default estimates, which can walk the wrong index for a filtered page: analyze it once."""
    never = await pool.fetchval(
        "SELECT last_analyze IS NULL AND last_autoanalyze IS NULL AND n_live_tup > 10000 "
        "FROM pg_stat_user_tables WHERE relid = $1::regclass", table)
    if never:
        log.info("audit: analyzing %s once (PostgreSQL has no statistics for it yet)", table)
        await pool.execute(f"ANALYZE {table}")


class PostgresStore(AuditStore):
    def __init__(self, url: str, *, schema: str | None = None, connect_timeout: float = 5.0,
                 pool_size: int = 4) -> None:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        url_schema = next((v for k, v in query if k == "schema"), None)
        self.schema = schema or url_schema or "public"
        if not _IDENT.fullmatch(self.schema):
            raise StoreError(f"audit schema {self.schema!r}: use letters, digits and _ only")
        self._dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"])))
        self.display_url = display_url(url)
        self._timeout = connect_timeout
        self._pool_size = pool_size
        self._pool: Any = None
        t = f'"{self.schema}".audit_records'
        self._records = t
        self._prune = f'"{self.schema}".audit_prune'
        cols = ", ".join(INSERT_COLUMNS)
        marks = ", ".join(f"${i}" for i in range(1, len(INSERT_COLUMNS) + 1))
        # Identifiers are constants or the validated schema name; every value is a bound parameter.
        self._insert = f"INSERT INTO {t} ({cols}) VALUES ({marks}) ON CONFLICT (writer, seq) DO NOTHING"  # noqa: S608
        # ORDER BY id first: the planner must find the row through the id index, never walk (writer, seq).
        self._get = f"SELECT {READ_COLUMNS} FROM {t} WHERE id = $1 ORDER BY id, writer, seq LIMIT 1"  # noqa: S608
        self._changes = (f"SELECT ingest, {READ_COLUMNS} FROM {t} WHERE ingest > $1 "  # noqa: S608
                         "ORDER BY ingest LIMIT $2")
        self._chain = (f"SELECT seq, hash, record, request_body, response_body, purged_us, "  # noqa: S608
                       f"{', '.join(INDEX_COLUMNS)} FROM {t} WHERE writer = $1 AND seq > $2 ORDER BY seq LIMIT 500")

    async def open(self) -> None:
        if self._pool is not None:
            return
        import asyncpg

        try:
            pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=self._pool_size,
                                             timeout=self._timeout, command_timeout=60)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise StoreError(f"{self.display_url}: cannot connect: {e}") from None
        try:
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_SCHEMA)
                    await conn.execute(_ddl(self.schema))
                    for ddl in filter_index_ddl(f'"{self.schema}".audit_records'):
                        await conn.execute(ddl)
            except asyncpg.InsufficientPrivilegeError as e:
                # A read-only role (a central dashboard) can use tables the sidecars created.
                if await pool.fetchval("SELECT to_regclass($1)", self._records) is None:
                    raise StoreError(f"{self.display_url}: cannot create the audit tables: {e}") from None
                log.info("audit: %s is read-only for this role; using the existing tables", self.display_url)
            with contextlib.suppress(asyncpg.PostgresError):
                await _analyze_if_never(pool, self._records)
        except asyncpg.PostgresError as e:
            await pool.close()
            raise StoreError(f"{self.display_url}: {e}") from None
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _p(self) -> Any:
        if self._pool is None:
            raise StoreError(f"{self.display_url}: store is not open")
        return self._pool

    async def write(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        rows = [entry_row(e) for e in entries]
        async with self._p().acquire() as conn, conn.transaction():
            await conn.executemany(self._insert, rows)

    async def get(self, record_id: str) -> AuditRecord | None:
        row = await self._p().fetchrow(self._get, record_id)
        return None if row is None else row_record(tuple(row))

    async def query(self, q: RecordQuery) -> Page:
        p = Params(numbered=True)
        sql = select_records(self._records, q, p, ilike=True, json_filters=POSTGRES_JSON)
        rows = await self._p().fetch(sql, *p.args)
        limit = max(1, min(q.limit, MAX_PAGE))
        records = [row_record(tuple(r)) for r in rows[:limit]]
        return Page(records, page_key(records[-1]) if len(rows) > limit else None)

    async def stats(self, since_us: int) -> list[StatsRow] | None:
        sql = select_stats(self._records, "$1", "(record::jsonb #>> '{decision,rules,0}')")
        rows = await self._p().fetch(sql, since_us)
        return [StatsRow(r[0], r[1], r[2], r[3], int(r[4]), int(r[5])) for r in rows]

    async def durations(self, since_us: int, limit: int = 1000) -> list[int]:
        rows = await self._p().fetch(select_durations(self._records, "$1", "$2"), since_us, limit)
        return [int(r[0]) for r in rows]

    async def changes(self, token: str | None, limit: int = 500) -> tuple[list[AuditRecord], str]:
        pool = self._p()
        if token is None:
            last = await pool.fetchval(f"SELECT COALESCE(MAX(ingest), 0) FROM {self._records}")  # noqa: S608
            return [], str(last)
        try:
            after = int(token)
        except ValueError:
            raise StoreError(f"bad change token {token!r}") from None
        rows = await pool.fetch(self._changes, after, limit)
        return [row_record(tuple(r)[1:]) for r in rows], str(rows[-1][0]) if rows else token

    async def writers(self) -> list[str]:
        rows = await self._p().fetch(f"SELECT writer FROM {self._records} GROUP BY writer "  # noqa: S608
                                     f"UNION SELECT writer FROM {self._prune} ORDER BY 1")
        return [r[0] for r in rows]

    async def prune_markers(self) -> dict[str, PruneMarker]:
        rows = await self._p().fetch(f"SELECT writer, seq, hash, ended_us, pruned_us FROM {self._prune}")  # noqa: S608
        return {r[0]: PruneMarker(*r) for r in rows}

    async def chain_rows(self, writer: str) -> AsyncIterator[ChainRow]:
        after = -1
        while True:
            rows = await self._p().fetch(self._chain, writer, after)
            for r in rows:
                yield ChainRow(r[0], r[1], r[2].encode("utf-8"), r[3], r[4], r[5],
                               dict(zip(INDEX_COLUMNS, tuple(r)[6:], strict=True)))
            if len(rows) < 500:
                return
            after = rows[-1][0]

    async def prune_records(self, cutoff_us: int, now_us: int) -> int:
        pool = self._p()
        total = 0
        t, m = self._records, self._prune
        for (writer,) in await pool.fetch(f"SELECT DISTINCT writer FROM {t}"):  # noqa: S608
            while True:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_RETENTION)
                    boundary = await conn.fetchval(
                        f"SELECT MIN(seq) FROM {t} WHERE writer = $1 AND started_us >= $2", writer, cutoff_us)  # noqa: S608
                    last = await conn.fetchrow(
                        f"SELECT seq, hash, ended_us FROM (SELECT seq, hash, ended_us FROM {t} "  # noqa: S608
                        "WHERE writer = $1 AND seq < $2 ORDER BY seq LIMIT $3) AS p ORDER BY seq DESC LIMIT 1",
                        writer, boundary if boundary is not None else 1 << 62, _PRUNE_CHUNK)
                    if last is None:
                        break
                    status = await conn.execute(f"DELETE FROM {t} WHERE writer = $1 AND seq <= $2",  # noqa: S608
                                                writer, last["seq"])
                    await conn.execute(
                        f"INSERT INTO {m} (writer, seq, hash, ended_us, pruned_us) VALUES ($1, $2, $3, $4, $5) "  # noqa: S608
                        "ON CONFLICT (writer) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, "
                        "ended_us = EXCLUDED.ended_us, pruned_us = EXCLUDED.pruned_us",
                        writer, last["seq"], last["hash"], last["ended_us"], now_us)
                total += int(status.split()[-1])
        return total

    async def purge_bodies(self, cutoff_us: int, now_us: int) -> int:
        total = 0
        t = self._records
        while True:
            status = await self._p().execute(
                f"UPDATE {t} SET request_body = NULL, response_body = NULL, purged_us = $1 WHERE ingest IN "  # noqa: S608
                f"(SELECT ingest FROM {t} WHERE started_us < $2 AND "
                "(request_body IS NOT NULL OR response_body IS NOT NULL) LIMIT $3)", now_us, cutoff_us, _PRUNE_CHUNK)
            n = int(status.split()[-1])
            total += n
            if n < _PRUNE_CHUNK:
                return total
