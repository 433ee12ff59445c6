"""`SqliteFile`: writes that arrive together run as one group commit, each still atomic on its own.

A write that refuses itself (raises) is undone alone and its caller gets its exception; the others commit. A
failure of the file or the connection fails every write of the batch with `StoreUnavailable`, and none of them
is kept. Reads keep seeing every write their caller awaited.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bastion.coord import sqlitefile
from bastion.coord.sqlitefile import SqliteFile
from bastion.coord.store import StoreUnavailable

SCHEMA = ("CREATE TABLE items (name TEXT PRIMARY KEY, n INTEGER NOT NULL)",)


def _file(tmp_path: Path) -> SqliteFile:
    return SqliteFile(tmp_path / "store.db", schema=SCHEMA, tables={"items"}, what="test store")


def _insert(name: str, n: int = 1, *, refuse: bool = False):  # type: ignore[no-untyped-def]
    def work(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO items (name, n) VALUES (?, ?)", (name, n))
        if refuse:
            raise ValueError(f"{name} refused after writing")
        return name
    return work


def _names(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM items ORDER BY name")]


async def _batches_seen(f: SqliteFile, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    real = f._write_batch

    def counting(works):  # type: ignore[no-untyped-def]
        sizes.append(len(works))
        return real(works)

    monkeypatch.setattr(f, "_write_batch", counting)
    return sizes


async def test_concurrent_writes_commit_together_and_each_returns_its_result(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    f = _file(tmp_path)
    sizes = await _batches_seen(f, monkeypatch)
    results = await asyncio.gather(*(f.run(_insert(f"k{i:02}"), write=True) for i in range(20)))
    assert results == [f"k{i:02}" for i in range(20)]
    assert await f.run(_names, write=False) == [f"k{i:02}" for i in range(20)]
    assert sum(sizes) == 20 and len(sizes) < 20  # the first alone, the rest waited for it together
    await f.close()


async def test_a_write_that_raises_is_undone_alone(tmp_path: Path) -> None:
    f = _file(tmp_path)
    outcomes = await asyncio.gather(f.run(_insert("a"), write=True), f.run(_insert("b"), write=True),
                                    f.run(_insert("c", refuse=True), write=True), f.run(_insert("d"), write=True),
                                    return_exceptions=True)
    assert outcomes[:2] == ["a", "b"] and outcomes[3] == "d"
    assert isinstance(outcomes[2], ValueError) and "c refused" in str(outcomes[2])
    assert await f.run(_names, write=False) == ["a", "b", "d"]
    await f.close()


async def test_a_constraint_violation_fails_that_write_alone_as_store_unavailable(tmp_path: Path) -> None:
    f = _file(tmp_path)
    await f.run(_insert("taken"), write=True)
    outcomes = await asyncio.gather(f.run(_insert("x"), write=True), f.run(_insert("taken", 2), write=True),
                                    f.run(_insert("y"), write=True), return_exceptions=True)
    assert outcomes[0] == "x" and outcomes[2] == "y"
    assert isinstance(outcomes[1], StoreUnavailable)
    assert await f.run(_names, write=False) == ["taken", "x", "y"]
    assert await f.run(lambda c: c.execute("SELECT n FROM items WHERE name = 'taken'").fetchone()[0],
                       write=False) == 1
    await f.close()


async def test_a_broken_connection_fails_the_whole_batch_and_keeps_none_of_it(tmp_path: Path) -> None:
    f = _file(tmp_path)
    await f.run(_insert("before"), write=True)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("SELECT * FROM no_such_table")

    outcomes = await asyncio.gather(f.run(_insert("x"), write=True), f.run(broken, write=True),
                                    f.run(_insert("y"), write=True), return_exceptions=True)
    kept = await f.run(_names, write=False)
    for name, outcome in (("x", outcomes[0]), ("y", outcomes[2])):
        assert (outcome == name) == (name in kept)  # reported done exactly when kept
        assert outcome == name or isinstance(outcome, StoreUnavailable)
    assert isinstance(outcomes[1], StoreUnavailable)
    assert "before" in kept
    await f.close()


async def test_batches_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlitefile, "MAX_BATCH", 4)
    f = _file(tmp_path)
    sizes = await _batches_seen(f, monkeypatch)
    await asyncio.gather(*(f.run(_insert(f"k{i}"), write=True) for i in range(13)))
    assert max(sizes) <= 4 and sum(sizes) == 13
    await f.close()


async def test_writes_queued_when_the_store_closes_are_refused_not_lost_in_silence(tmp_path: Path) -> None:
    f = _file(tmp_path)
    await f.run(_insert("first"), write=True)
    pending = [asyncio.ensure_future(f.run(_insert(f"late{i}"), write=True)) for i in range(3)]
    await asyncio.sleep(0)
    await f.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)
    assert all(o in {"late0", "late1", "late2"} or isinstance(o, Exception) for o in outcomes)
    with pytest.raises(RuntimeError, match="closed"):
        await f.run(_insert("after"), write=True)


async def test_a_bad_statement_fails_that_write_alone(tmp_path: Path) -> None:
    f = _file(tmp_path)

    def bad_binding(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO items (name, n) VALUES (?, ?)", ("bad", {"not": "bindable"}))

    outcomes = await asyncio.gather(f.run(_insert("a"), write=True), f.run(bad_binding, write=True),
                                    f.run(_insert("b"), write=True), return_exceptions=True)
    assert outcomes[0] == "a" and outcomes[2] == "b"
    assert isinstance(outcomes[1], StoreUnavailable)
    assert await f.run(_names, write=False) == ["a", "b"]
    await f.close()


async def test_a_write_cancelled_before_it_started_never_runs(tmp_path: Path) -> None:
    f = _file(tmp_path)
    first = asyncio.ensure_future(f.run(_insert("first"), write=True))
    await asyncio.sleep(0)  # the first write is on the store thread; the next one queues behind it
    cancelled = asyncio.ensure_future(f.run(_insert("cancelled"), write=True))
    await asyncio.sleep(0)
    cancelled.cancel()
    assert await first == "first"
    assert await f.run(_insert("after"), write=True) == "after"
    assert await f.run(_names, write=False) == ["after", "first"]
    await f.close()


async def test_closing_refuses_queued_writes_and_keeps_the_connection_closed(tmp_path: Path) -> None:
    f = _file(tmp_path)
    writes = [asyncio.ensure_future(f.run(_insert(f"w{i}"), write=True)) for i in range(4)]
    await asyncio.sleep(0)
    await f.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 5)
    assert outcomes[0] == "w0"  # already on the store thread when the store closed
    assert all(isinstance(o, RuntimeError) for o in outcomes[1:])
    assert f._conn is None
