"""Tamper evidence: `verify` over a real SQLite store that the tests edit behind Bastion's back (edited field,
recomputed hash, deleted record, swapped pair, edited search column, edited or missing body, cut-off tail),
and retention, which deletes old records without breaking the chain."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import sqlite3
import zlib
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from bastion.audit.chain import record_hash
from bastion.audit.retention import apply_retention
from bastion.audit.sample import sample_exchange
from bastion.audit.sinks import RecordQuery, open_store
from bastion.audit.spool import read_cursor_file
from bastion.audit.verify import VerifyReport, verify_store
from bastion.audit.writer import AuditWriter

HOUR_US = 3600 * 1_000_000
T0 = 1_795_000_000_000_000


async def build(tmp_path: Path, n: int = 20) -> tuple[str, Path]:
    """n records, record k started k hours after T0; returns the URL and the database path."""
    db = tmp_path / "audit.db"
    writer = await AuditWriter.open(f"sqlite:///{db}", tmp_path / "home" / "spool")
    for k in range(1, n + 1):
        rec, req, resp = sample_exchange(seed=k, body_words=30)
        rec.started_us, rec.ended_us = T0 + k * HOUR_US, T0 + k * HOUR_US + 1000
        assert writer.submit(rec, req, resp)
    assert await writer.flush()
    await writer.close()
    return f"sqlite:///{db}", db


async def check(url: str, *, anchor_home: Path | None = None) -> VerifyReport:
    anchor = read_cursor_file(anchor_home / "spool") if anchor_home else None
    async with open_store(url) as store:
        return await verify_store(store, anchor=anchor)


def sql(db: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    with sqlite3.connect(db) as conn:
        for stmt, params in statements:
            conn.execute(stmt, params)


def row(db: Path, seq: int) -> tuple[str, str]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT record, hash FROM audit_records WHERE seq = ?", (seq,)).fetchone()


async def cli_verify(url: str, home: Path) -> tuple[int, str]:
    """`bastion audit verify` in-process (on a thread: the command runs its own event loop)."""
    return await asyncio.to_thread(_cli_verify, url, home)


def _cli_verify(url: str, home: Path) -> tuple[int, str]:
    from bastion.audit import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    ns = parser.parse_args(["audit", "verify", "--audit", url, "--home", str(home)])
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = ns.handler(ns)
    return rc, buf.getvalue()


async def test_an_untouched_log_verifies(tmp_path: Path) -> None:
    url, _ = await build(tmp_path)
    report = await check(url, anchor_home=tmp_path / "home")
    assert report.intact and report.records == 20
    chain = report.chains[0]
    assert (chain.first_seq, chain.last_seq, chain.bodies_checked) == (1, 20, 40)
    rc, out = await cli_verify(url, tmp_path / "home")
    assert rc == 0 and "intact" in out and "20 records" in out


async def test_an_edited_field_is_reported_at_that_record(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    record, _ = row(db, 5)
    assert '"status":200' in record
    sql(db, ("UPDATE audit_records SET record = replace(record, '\"status\":200', '\"status\":201') WHERE seq = 5",
             ()))
    report = await check(url)
    problem = report.chains[0].problem
    assert problem is not None and problem.kind == "edited" and problem.seq == 5
    assert report.chains[0].records == 4
    rc, out = await cli_verify(url, tmp_path / "home")
    assert rc == 1 and "BROKEN" in out and "record 5" in out


async def test_an_edit_with_a_recomputed_hash_breaks_the_link_to_the_next_record(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    record, _ = row(db, 8)
    forged = record.replace('"support-bot"', '"other-bot"')
    sql(db, ("UPDATE audit_records SET record = ?, hash = ?, agent = 'other-bot' WHERE seq = 8",
             (forged, record_hash(forged.encode()))))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "link" and problem.seq == 8


async def test_a_deleted_record_is_reported_as_a_gap(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    sql(db, ("DELETE FROM audit_records WHERE seq = 7", ()))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "deleted" and problem.seq == 7
    assert "record 7 missing" in problem.message


async def test_deleting_the_first_records_without_a_prune_marker_is_detected(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    sql(db, ("DELETE FROM audit_records WHERE seq <= 3", ()))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "deleted" and problem.seq == 1


@pytest.mark.parametrize("how", ["contents", "positions"])
async def test_a_swapped_pair_is_reported_as_reordered(tmp_path: Path, how: str) -> None:
    url, db = await build(tmp_path)
    if how == "contents":  # the rows keep their seq, their JSON and hashes trade places
        (r3, h3), (r4, h4) = row(db, 3), row(db, 4)
        sql(db, ("UPDATE audit_records SET record = ?, hash = ? WHERE seq = 3", (r4, h4)),
            ("UPDATE audit_records SET record = ?, hash = ? WHERE seq = 4", (r3, h3)))
    else:  # the rows trade their positions
        sql(db, ("UPDATE audit_records SET seq = -1 WHERE seq = 3", ()),
            ("UPDATE audit_records SET seq = 3 WHERE seq = 4", ()),
            ("UPDATE audit_records SET seq = 4 WHERE seq = -1", ()))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "reordered" and problem.seq == 3


async def test_an_edited_search_column_is_caught(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    sql(db, ("UPDATE audit_records SET status = 500 WHERE seq = 11", ()))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "edited" and problem.seq == 11 and "status" in problem.message


async def test_edited_and_vanished_bodies(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    sql(db, ("UPDATE audit_records SET response_body = ? WHERE seq = 4", (zlib.compress(b'{"forged": true}'),)))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "body" and problem.seq == 4

    url, db = await build(tmp_path / "b")
    sql(db, ("UPDATE audit_records SET request_body = NULL WHERE seq = 6", ()))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "body" and "never purged" in problem.message


async def test_a_cut_off_tail_is_caught_through_the_local_spool_cursor(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    home = tmp_path / "home"
    info = read_cursor_file(home / "spool")
    assert info is not None and info.drained is not None and info.drained.seq == 20
    sql(db, ("DELETE FROM audit_records WHERE seq >= 18", ()))
    assert (await check(url)).intact  # a hash chain alone cannot see a missing tail...
    report = await check(url, anchor_home=home)  # ...the spool's record of what it delivered can
    problem = report.chains[0].problem
    assert problem is not None and problem.kind == "truncated" and problem.seq == 18
    rc, out = await cli_verify(url, home)  # the CLI uses the cursor of --home's spool when it names this store
    assert rc == 1 and "truncated" in out


async def test_a_rewritten_tail_is_caught_through_the_local_spool_cursor(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    record, _ = row(db, 20)
    forged = record.replace('"support-bot"', '"ghost-bot"')
    sql(db, ("UPDATE audit_records SET record = ?, hash = ?, agent = 'ghost-bot' WHERE seq = 20",
             (forged, hashlib.sha256(forged.encode()).hexdigest())))
    report = await check(url, anchor_home=tmp_path / "home")
    problem = report.chains[0].problem
    assert problem is not None and problem.kind == "edited" and problem.seq == 20


async def test_retention_prunes_a_prefix_and_verify_still_catches_a_later_deletion(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    now = T0 + int(20.5 * HOUR_US)
    async with open_store(url) as store:
        # records started in the last 10.5 h stay (10..20); bodies of those older than 8.5 h go (10, 11)
        result = await apply_retention(store, records=10.5 * 3600, bodies=8.5 * 3600, now=now)
        assert (result.records, result.bodies) == (9, 2)
        report = await verify_store(store)
        assert report.intact, report.to_json()
        chain = report.chains[0]
        assert (chain.pruned_through, chain.first_seq, chain.last_seq, chain.bodies_purged) == (9, 10, 20, 4)
        oldest = (await store.query(RecordQuery(limit=1, ascending=True))).records[0]
        purged = await store.get(oldest.id)
        assert purged is not None and purged.purged_us == now and purged.request.body is not None
        assert purged.request.body.content is None and purged.request.body.stored > 0
        again = await apply_retention(store, records=10.5 * 3600, bodies=None, now=now)
        assert again.records == 0
    rc, out = await cli_verify(url, tmp_path / "home")
    assert rc == 0 and "up to #9 removed by retention" in out
    sql(db, ("DELETE FROM audit_records WHERE seq = 15", ()))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "deleted" and problem.seq == 15


async def test_deleting_the_first_survivor_after_pruning_is_detected(tmp_path: Path) -> None:
    url, db = await build(tmp_path)
    async with open_store(url) as store:
        await apply_retention(store, records=10.5 * 3600, bodies=None, now=T0 + int(20.5 * HOUR_US))
    sql(db, ("DELETE FROM audit_records WHERE seq = 10", ()))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "deleted" and problem.seq == 10


async def test_a_prune_marker_moved_past_a_deletion_is_caught(tmp_path: Path) -> None:
    """Deleting records 5-7 and writing a marker that claims retention removed up to 7 does not pass while
    records 1-4 (which retention would have removed first) are still there."""
    url, db = await build(tmp_path)
    record8, _ = row(db, 8)
    writer, prev7 = json.loads(record8)["chain"]["writer"], json.loads(record8)["chain"]["prev"]
    sql(db, ("DELETE FROM audit_records WHERE seq BETWEEN 5 AND 7", ()),
        ("INSERT INTO audit_prune (writer, seq, hash, ended_us, pruned_us) VALUES (?, 7, ?, 0, 0)", (writer, prev7)))
    problem = (await check(url)).chains[0].problem
    assert problem is not None and problem.kind == "deleted" and problem.seq == 5
