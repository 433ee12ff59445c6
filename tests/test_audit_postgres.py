"""The PostgreSQL sink against a real server (127.0.0.1:5432, database `test`), each test in a schema of its
own that is dropped afterwards. An outage is made real with a TCP relay the test stops and restarts in front
of PostgreSQL: records wait in the spool and drain, in order, once the relay is back."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from services import POSTGRES_HOST, POSTGRES_PORT, require_postgres

from bastion.audit.chain import record_hash
from bastion.audit.retention import apply_retention
from bastion.audit.sample import sample_exchange
from bastion.audit.sinks import RecordQuery, open_store
from bastion.audit.verify import verify_store
from bastion.audit.writer import AuditWriter

HOUR_US = 3600 * 1_000_000
T0 = 1_795_000_000_000_000


@pytest.fixture
async def pg() -> AsyncIterator[tuple[str, str]]:
    """(DSN, schema): a schema unique to this test, dropped afterwards."""
    dsn = require_postgres()
    schema = f"bastion_audit_test_{secrets.token_hex(6)}"
    yield dsn, schema
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def url_for(dsn: str, schema: str, port: int | None = None) -> str:
    base = dsn if port is None else dsn.replace(f":{POSTGRES_PORT}/", f":{port}/")
    return f"{base}?schema={schema}"


async def connect(dsn: str, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"search_path": schema})


async def fetch(dsn: str, schema: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await connect(dsn, schema)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def submit(writer: AuditWriter, n: int, *, start: int = 0, hours: bool = False) -> list[str]:
    ids = []
    for k in range(start, start + n):
        rec, req, resp = sample_exchange(seed=k, body_words=30, agent="billing-bot" if k % 3 == 0 else "support-bot")
        if hours:
            rec.started_us, rec.ended_us = T0 + k * HOUR_US, T0 + k * HOUR_US + 1000
        assert writer.submit(rec, req, resp)
        ids.append(rec.id)
    return ids


class Relay:
    """A TCP relay to PostgreSQL that can be taken down (connections cut, port closed) and brought back."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._conns):
            w.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(POSTGRES_HOST, POSTGRES_PORT)
        except OSError:
            writer.transport.abort()
            return
        self._conns |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns -= {writer, up_writer}


async def test_records_round_trip_through_postgres(pg: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = pg
    url = url_for(dsn, schema)
    writer = await AuditWriter.open(url, tmp_path / "spool")
    ids = submit(writer, 60)
    assert await writer.flush()
    await writer.close()
    async with open_store(url) as store:
        page = await store.query(RecordQuery(limit=25))
        assert len(page.records) == 25 and page.next is not None
        rest = await store.query(RecordQuery(limit=100, cursor=page.next))
        assert sorted(r.id for r in page.records + rest.records) == sorted(ids)
        billing = await store.query(RecordQuery(agent="billing-bot", limit=100))
        assert {r.id for r in billing.records} == {ids[k] for k in range(0, 60, 3)}
        assert (await store.query(RecordQuery(text="CHAT/COMPLETIONS", limit=1))).records  # ILIKE
        one = await store.get(ids[10])
        assert one is not None and one.request.body is not None and b"gpt-4o-mini" in (one.request.body.content or b"")
        assert one.request.headers[2][1].startswith("Bearer [REDACTED:")
        changes, token = await store.changes("0", limit=1000)
        assert [r.id for r in changes] == ids and (await store.changes(token))[0] == []
        report = await verify_store(store)
        assert report.intact and report.records == 60
    rows = await fetch(dsn, schema, "SELECT count(*) FROM audit_records")
    assert rows[0][0] == 60


async def test_a_postgres_outage_is_bridged_by_the_spool_and_drained_in_order(pg: tuple[str, str],
                                                                             tmp_path: Path) -> None:
    dsn, schema = pg
    relay = Relay()
    await relay.start()
    url = url_for(dsn, schema, relay.port)
    writer = await AuditWriter.open(url, tmp_path / "spool")
    first = submit(writer, 10)
    assert await writer.flush()

    await relay.stop()  # PostgreSQL unreachable from the writer's point of view
    during = submit(writer, 40, start=10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.5):
            await writer.flush()
    assert writer.backlog == 40 and not writer.must_refuse()
    count = await fetch(dsn, schema, "SELECT count(*) FROM audit_records")
    assert count[0][0] == 10

    await relay.start()  # same port: PostgreSQL is back
    async with asyncio.timeout(30):
        assert await writer.flush()
    after = submit(writer, 5, start=50)
    assert await writer.flush()
    await writer.close()
    await relay.stop()

    rows = await fetch(dsn, schema, "SELECT id, seq FROM audit_records ORDER BY ingest")
    assert [r["id"] for r in rows] == first + during + after  # arrival order is submission order
    assert [r["seq"] for r in rows] == list(range(1, 56))
    async with open_store(url_for(dsn, schema)) as store:
        assert (await verify_store(store)).intact


async def test_retention_and_tampering_on_postgres(pg: tuple[str, str], tmp_path: Path) -> None:
    dsn, schema = pg
    url = url_for(dsn, schema)
    writer = await AuditWriter.open(url, tmp_path / "spool")
    submit(writer, 20, start=1, hours=True)
    assert await writer.flush()
    await writer.close()
    async with open_store(url) as store:
        result = await apply_retention(store, records=10.5 * 3600, bodies=8.5 * 3600, now=T0 + int(20.5 * HOUR_US))
        assert (result.records, result.bodies) == (9, 2)
        report = await verify_store(store)
        assert report.intact and report.chains[0].pruned_through == 9 and report.chains[0].first_seq == 10

        rec, _ = (await fetch(dsn, schema, "SELECT record, hash FROM audit_records WHERE seq = 14"))[0]
        forged = rec.replace('"support-bot"', '"forged-bot"')
        assert forged != rec
        conn = await connect(dsn, schema)
        try:
            await conn.execute("UPDATE audit_records SET record = $1, hash = $2 WHERE seq = 14", forged,
                               record_hash(forged.encode()))
            problem = (await verify_store(store)).chains[0].problem
            assert problem is not None and problem.kind in ("link", "edited") and problem.seq == 14
            await conn.execute("UPDATE audit_records SET record = $1, hash = $2 WHERE seq = 14", rec,
                               record_hash(rec.encode()))
            assert (await verify_store(store)).intact
            await conn.execute("DELETE FROM audit_records WHERE seq = 12")
            problem = (await verify_store(store)).chains[0].problem
            assert problem is not None and problem.kind == "deleted" and problem.seq == 12
        finally:
            await conn.close()


async def test_an_unreachable_postgres_is_a_clear_store_error(tmp_path: Path) -> None:
    store = open_store("postgresql://postgres@127.0.0.1:9/test?schema=x", connect_timeout=2)
    with pytest.raises(Exception, match="cannot connect"):
        await store.open()
    with pytest.raises(Exception, match="letters, digits"):
        open_store("postgresql://postgres@127.0.0.1/test?schema=bad;name")
