"""Signed audit checkpoints witnessed in the shared store (`--store`), outside the audit database.

A fleet keeps its audit log in PostgreSQL and its locks in Redis; whoever can rewrite the audit database cannot
necessarily write Redis too, and `bastion audit verify` run from any machine with `--store` finds every
sidecar's checkpoints here. The documents are opaque to this module (`bastion.audit.checkpoint` signs and
checks them); it only keeps them, bounded:

- per writer, its newest `HISTORY` checkpoints (by seq) and the public key line it registered;
- at most `MAX_WRITERS` writers: past that, the writers whose last checkpoint is oldest are dropped (a fleet
  whose sidecars start with a fresh `--home` each time makes a new writer per start);
- documents longer than `MAX_DOCUMENT` are read back cut, so a planted giant fails to parse instead of
  filling memory.

Layout in SQLite (the store's file, next to the lock tables)::

    audit_witness_writers(writer PK, public_key, time_us)         the key line; time of the last checkpoint
    audit_witness_checkpoints(writer, seq, time_us, document)     PK (writer, seq)

Layout in Redis (under the store's key prefix; one hash tag so a transaction touches one slot)::

    {audit}:writers        ZSET   writer -> time of its last checkpoint (ms)
    {audit}:keys           HASH   writer -> public key line
    {audit}:cp:<writer>    ZSET   document, scored by seq

`open_witness(url, create=False)` is what `verify` uses: it never creates anything, and a SQLite store file
that does not exist reads as empty.
"""

from __future__ import annotations

import abc
import asyncio
import re
import sqlite3
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bastion.coord.store import DEFAULT_KEY_PREFIX, StoreUnavailable, StoreURLError
from bastion.coord.urls import store_location

T = TypeVar("T")

HISTORY = 16
"""Checkpoints kept per writer (the newest, by seq)."""
MAX_WRITERS = 10_000
"""Writers kept (those with the most recent checkpoints)."""
MAX_DOCUMENT = 4096
"""Longest checkpoint document read back whole (characters)."""
MAX_KEY_LINE = 1024

WRITER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""The writer ids the witness accepts (spool ids are `w` + 16 hex digits)."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit_witness_writers (
        writer TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        time_us INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_witness_writers_time ON audit_witness_writers (time_us)",
    """CREATE TABLE IF NOT EXISTS audit_witness_checkpoints (
        writer TEXT NOT NULL,
        seq INTEGER NOT NULL,
        time_us INTEGER NOT NULL,
        document TEXT NOT NULL,
        PRIMARY KEY (writer, seq)
    )""",
)
_TABLES = {"audit_witness_writers", "audit_witness_checkpoints"}


@dataclass(frozen=True, slots=True)
class WitnessEntry:
    """What the store holds for one writer: its key line (None if not registered) and its checkpoint documents,
    newest first."""

    writer: str
    key_line: str | None
    documents: tuple[str, ...]


class CheckpointWitness(abc.ABC):
    """Keeps checkpoint documents. Raises `StoreUnavailable` when the store cannot answer."""

    where: str

    @abc.abstractmethod
    async def put(self, writer: str, seq: int, time_us: int, document: str, key_line: str) -> None:
        """Keep `document` as `writer`'s checkpoint at `seq` (replacing one at the same seq), register its key
        line, and trim to the bounds."""

    @abc.abstractmethod
    async def read(self) -> list[WitnessEntry]:
        """Every writer's entry, within the bounds."""

    @abc.abstractmethod
    async def close(self) -> None: ...


def check_put(writer: str, seq: int, document: str, key_line: str) -> None:
    """Refuse what the bounds or the key layout cannot take (a writer id is part of a Redis key name)."""
    if not valid_writer_id(writer):
        raise ValueError(f"bad writer id {writer!r}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError("seq must be a positive integer")
    if len(document) > MAX_DOCUMENT or len(key_line) > MAX_KEY_LINE:
        raise ValueError("checkpoint document or key line too long")


def valid_writer_id(writer: str) -> bool:
    return isinstance(writer, str) and WRITER_ID.fullmatch(writer) is not None


def open_witness(url: str, *, create: bool, key_prefix: str = DEFAULT_KEY_PREFIX) -> CheckpointWitness:
    """The witness in the store at `url` (sqlite:/// or redis://, as `--store`); no I/O yet.

    `create=False` (verify): read only, nothing is created. Raises `StoreURLError` for any other URL.
    """
    kind, where = store_location(url)
    if kind == "sqlite":
        assert isinstance(where, Path)
        return SqliteWitness(where, create=create)
    return RedisWitness.from_url(str(where), key_prefix=key_prefix)


# --- SQLite -----------------------------------------------------------------------------------------------------

class SqliteWitness(CheckpointWitness):
    """Writes through `SqliteFile` (one thread, `BEGIN IMMEDIATE`); reads on a read-only connection of its own,
    so `verify` never creates the file or its tables."""

    def __init__(self, path: Path, *, create: bool) -> None:
        from bastion.coord.sqlitefile import SqliteFile

        self.path = path
        self.where = f"sqlite:///{path}"
        self._file = SqliteFile(path, schema=_SCHEMA, tables=_TABLES, what="checkpoint witness") if create else None

    async def put(self, writer: str, seq: int, time_us: int, document: str, key_line: str) -> None:
        check_put(writer, seq, document, key_line)
        if self._file is None:
            raise RuntimeError("this witness was opened read-only")

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO audit_witness_checkpoints (writer, seq, time_us, document) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (writer, seq) DO UPDATE SET time_us = excluded.time_us, "
                         "document = excluded.document", (writer, seq, time_us, document))
            conn.execute("DELETE FROM audit_witness_checkpoints WHERE writer = ? AND seq NOT IN (SELECT seq FROM "
                         "audit_witness_checkpoints WHERE writer = ? ORDER BY seq DESC LIMIT ?)",
                         (writer, writer, HISTORY))
            conn.execute("INSERT INTO audit_witness_writers (writer, public_key, time_us) VALUES (?, ?, ?) "
                         "ON CONFLICT (writer) DO UPDATE SET public_key = excluded.public_key, "
                         "time_us = max(time_us, excluded.time_us)", (writer, key_line, time_us))
            (count,) = conn.execute("SELECT count(*) FROM audit_witness_writers").fetchone()
            if count > MAX_WRITERS:
                doomed = [r[0] for r in conn.execute("SELECT writer FROM audit_witness_writers ORDER BY time_us "
                                                     "LIMIT ?", (count - MAX_WRITERS,))]
                conn.executemany("DELETE FROM audit_witness_checkpoints WHERE writer = ?", [(w,) for w in doomed])
                conn.executemany("DELETE FROM audit_witness_writers WHERE writer = ?", [(w,) for w in doomed])

        await self._file.run(work, write=True)

    async def read(self) -> list[WitnessEntry]:
        try:
            return await asyncio.to_thread(self._read)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"checkpoint witness {self.where} unavailable: {e}") from e

    def _read(self) -> list[WitnessEntry]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables >= _TABLES:
                return []
            keys = dict(conn.execute("SELECT writer, substr(public_key, 1, ?) FROM audit_witness_writers "
                                     "ORDER BY time_us DESC LIMIT ?", (MAX_KEY_LINE + 1, MAX_WRITERS)).fetchall())
            docs: dict[str, list[str]] = {}
            for writer, document in conn.execute(
                    "SELECT writer, substr(document, 1, ?) FROM (SELECT writer, seq, document, row_number() OVER "
                    "(PARTITION BY writer ORDER BY seq DESC) AS n FROM audit_witness_checkpoints) WHERE n <= ? "
                    "ORDER BY writer, seq DESC LIMIT ?", (MAX_DOCUMENT + 1, HISTORY, MAX_WRITERS * HISTORY)):
                docs.setdefault(str(writer), []).append(str(document))
        finally:
            conn.close()
        writers = [w for w in dict.fromkeys([*docs, *keys]) if valid_writer_id(w)][:MAX_WRITERS]
        return [WitnessEntry(w, keys.get(w), tuple(docs.get(w, ()))) for w in writers]

    async def close(self) -> None:
        if self._file is not None:
            await self._file.close()


# --- Redis ------------------------------------------------------------------------------------------------------

class RedisWitness(CheckpointWitness):
    """`put` is one MULTI/EXEC (the checkpoint, its trim, the writer's time and key); trimming writers past
    `MAX_WRITERS` follows in a second step."""

    def __init__(self, client: Any, *, key_prefix: str, where: str) -> None:
        self._client = client
        self._prefix = key_prefix
        self.where = where

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str = DEFAULT_KEY_PREFIX, timeout: float = 5.0) -> RedisWitness:
        from bastion.coord.redis import redis_client

        client, key_prefix, where = redis_client(url, key_prefix=key_prefix, client_name="bastion-audit",
                                                 timeout=timeout)
        return cls(client, key_prefix=key_prefix, where=where)

    @property
    def _writers(self) -> str:
        return f"{self._prefix}{{audit}}:writers"

    @property
    def _keys(self) -> str:
        return f"{self._prefix}{{audit}}:keys"

    def _cp(self, writer: str) -> str:
        return f"{self._prefix}{{audit}}:cp:{writer}"

    async def _call(self, call: Awaitable[T]) -> T:
        from redis.exceptions import RedisError

        try:
            return await call
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"checkpoint witness {self.where} unavailable: {e}") from e

    async def put(self, writer: str, seq: int, time_us: int, document: str, key_line: str) -> None:
        check_put(writer, seq, document, key_line)
        pipe = self._client.pipeline(transaction=True)
        pipe.zremrangebyscore(self._cp(writer), seq, seq)
        pipe.zadd(self._cp(writer), {document: seq})
        pipe.zremrangebyrank(self._cp(writer), 0, -(HISTORY + 1))
        pipe.zadd(self._writers, {writer: time_us // 1000})
        pipe.hset(self._keys, writer, key_line)
        pipe.zcard(self._writers)
        replies = await self._call(pipe.execute())
        excess = int(replies[-1]) - MAX_WRITERS
        if excess > 0:
            doomed = [w for w, _ in await self._call(self._client.zpopmin(self._writers, excess))]
            if doomed:
                await self._call(self._client.delete(*[self._cp(w) for w in doomed]))
                await self._call(self._client.hdel(self._keys, *doomed))

    async def read(self) -> list[WitnessEntry]:
        writers = [w for w in await self._call(self._client.zrevrange(self._writers, 0, MAX_WRITERS - 1))
                   if valid_writer_id(w)]
        if not writers:
            return []
        pipe = self._client.pipeline(transaction=False)
        pipe.hmget(self._keys, writers)
        for w in writers:
            pipe.zrevrange(self._cp(w), 0, HISTORY - 1)
        replies = await self._call(pipe.execute())
        keys = replies[0]
        return [WitnessEntry(w, None if k is None else str(k)[:MAX_KEY_LINE + 1],
                             tuple(str(d)[:MAX_DOCUMENT + 1] for d in docs))
                for w, k, docs in zip(writers, keys, replies[1:], strict=True)]

    async def close(self) -> None:
        closer = getattr(self._client, "aclose", None) or self._client.close
        await closer()


__all__ = ["HISTORY", "MAX_DOCUMENT", "MAX_WRITERS", "CheckpointWitness", "StoreURLError", "WitnessEntry",
           "open_witness"]
