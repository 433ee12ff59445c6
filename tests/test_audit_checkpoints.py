"""Signed checkpoints of the audit chains: what lets `bastion audit verify` see a cut-off or rewritten tail that
the hash chain alone cannot show.

Unit tests cover the key file, the signed documents, the checkpoint cadence and the witness's bounds (SQLite
and Redis). The integration tests run a real `bastion serve` with traffic, stop it, and tamper with copies of
what it left: the default deployment (SQLite audit and store under --home) and a fleet's (PostgreSQL audit,
Redis store), verified from a different, empty --home as another machine would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from auditproxy import AuditUpstream, call, drop_schema, run_audit_upstream, session, wait_for_records, write_policy
from lockhistory import delete_prefix
from services import require_postgres, require_redis
from support.bastion import run_bastion, run_cli
from support.certs import CertFiles

from bastion.audit.chain import ChainHead, record_hash
from bastion.audit.checkpoint import (
    KEY_FILE,
    PUB_FILE,
    Checkpoint,
    Checkpointer,
    CheckpointError,
    PublicKey,
    SigningKey,
    TrustedKey,
    Witnessed,
    judge,
    load_or_create_key,
    parse_key_line,
    read_keys_file,
    sign_checkpoint,
)
from bastion.audit.record import AuditRecord, ChainLink
from bastion.audit.retention import apply_retention
from bastion.audit.sample import sample_exchange
from bastion.audit.sinks import open_store
from bastion.audit.verify import verify_store
from bastion.audit.writer import AuditWriter
from bastion.coord import witness as witness_mod
from bastion.coord.witness import HISTORY, CheckpointWitness, WitnessEntry, open_witness

HOUR_US = 3600 * 1_000_000
T0 = 1_795_000_000_000_000
SINK = "sqlite:///somewhere/audit.db"


def new_key() -> SigningKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(private, PublicKey(raw))


def trust(*keys: SigningKey, pinned: bool = True) -> dict[str, TrustedKey]:
    return {k.public.key_id: TrustedKey(k.public, "test", pinned) for k in keys}


# --- keys and documents -----------------------------------------------------------------------------------------


def test_the_signing_key_is_created_private_once_and_shared_by_racing_workers(tmp_path: Path) -> None:
    old = os.umask(0)  # the file must be private whatever the umask
    try:
        results: list[SigningKey] = []
        barrier = threading.Barrier(8)

        def create() -> None:
            barrier.wait()
            results.append(load_or_create_key(tmp_path))

        threads = [threading.Thread(target=create) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.umask(old)
    assert len({k.public.key_id for k in results}) == 1
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE, PUB_FILE]  # no temporary file left
    pub = parse_key_line((tmp_path / PUB_FILE).read_text())
    assert pub == results[0].public
    assert load_or_create_key(tmp_path).public == pub  # reloaded, not replaced


def test_a_key_file_readable_by_others_is_restricted(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    assert load_or_create_key(tmp_path).public == key.public
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


def test_a_checkpoint_verifies_only_unchanged_and_with_a_trusted_key() -> None:
    key, other = new_key(), new_key()
    head = ChainHead("w0123456789abcdef", 42, "ab" * 32)
    cp = sign_checkpoint(key, head, SINK, time_us=T0)
    doc = cp.document()
    assert Checkpoint.parse(doc) == cp
    assert judge(Witnessed(head.writer, "test", doc), trust(key)).fault is None
    assert judge(Witnessed(None, "test", doc), trust(key)).fault is None  # a spool's own file

    untrusted = judge(Witnessed(head.writer, "test", doc), trust(other)).fault
    assert untrusted is not None and "not trusted" in untrusted and key.public.key_id in untrusted
    moved = judge(Witnessed("wother", "test", doc), trust(key)).fault
    assert moved is not None and "filed under writer wother" in moved

    for field_name, value in (("seq", 41), ("hash", "cd" * 32), ("writer", "wfedcba9876543210"), ("sink", "x"),
                              ("time_us", T0 + 1)):
        edited = json.loads(doc)
        edited[field_name] = value
        fault = judge(Witnessed(None, "test", json.dumps(edited)), trust(key)).fault
        assert fault is not None and "valid signature" in fault, field_name

    # Signed by another key while naming the trusted one.
    forged = dataclasses.replace(cp, signature=other.sign(cp.payload()))
    fault = judge(Witnessed(head.writer, "test", forged.document()), trust(key)).fault
    assert fault is not None and "valid signature" in fault


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(seq=True), lambda d: d.update(seq=0), lambda d: d.update(hash="AB" * 32),
    lambda d: d.update(extra=1), lambda d: d.pop("sig"), lambda d: d.update(sig="not base64!"),
    lambda d: d.update(writer="../etc"), lambda d: d.update(v=2), lambda d: d.update(sink="x" * 5000),
])
def test_checkpoint_documents_are_parsed_strictly(mutate: Any) -> None:
    doc = json.loads(sign_checkpoint(new_key(), ChainHead("w1", 1, "00" * 32), SINK).document())
    mutate(doc)
    with pytest.raises(CheckpointError):
        Checkpoint.parse(json.dumps(doc))
    fault = judge(Witnessed("w1", "the store", json.dumps(doc)), {}).fault
    assert fault is not None and "unreadable" in fault


def test_keys_files(tmp_path: Path) -> None:
    a, b = new_key(), new_key()
    path = tmp_path / "keys"
    path.write_text(f"# fleet keys\n\n{a.public.line('host-a:/srv/bastion')}\n  {b.public.line()}\n")
    assert read_keys_file(path) == [a.public, b.public]
    for bad, why in (("ssh-ed25519 AAAA", "expected"), ("ed25519 !!!", "base64"), ("ed25519 AAAA", "32 bytes"),
                     ("# nothing\n", "no keys")):
        path.write_text(bad + "\n")
        with pytest.raises(CheckpointError, match=why):
            read_keys_file(path)


# --- verify against checkpoints, on a writer run in this process ------------------------------------------------


async def build(tmp_path: Path, n: int = 12) -> tuple[str, Path, ChainHead]:
    db = tmp_path / "audit.db"
    writer = await AuditWriter.open(f"sqlite:///{db}", tmp_path / "spool")
    for k in range(1, n + 1):
        rec, req, resp = sample_exchange(seed=k, body_words=10)
        rec.started_us, rec.ended_us = T0 + k * HOUR_US, T0 + k * HOUR_US + 1000
        assert writer.submit(rec, req, resp)
    assert await writer.flush()
    head = writer.drained_head
    await writer.close()
    assert head is not None and head.seq == n
    return f"sqlite:///{db}", db, head


async def verify_with(url: str, *docs: tuple[str | None, str], trusted: dict[str, TrustedKey]) -> Any:
    async with open_store(url) as store:
        return await verify_store(store, witnessed=[Witnessed(w, "test", d) for w, d in docs], trusted=trusted)


async def test_verify_holds_each_chain_against_its_checkpoints(tmp_path: Path) -> None:
    url, db, head = await build(tmp_path)
    key = new_key()
    doc = sign_checkpoint(key, head, url).document()
    middle = sign_checkpoint(key, ChainHead(head.writer, 6, _hash_at(db, 6)), url).document()

    report = await verify_with(url, (head.writer, doc), (head.writer, middle), trusted=trust(key))
    chain = report.chains[0]
    assert report.intact and chain.checkpoints == 2 and chain.checkpoint_seq == head.seq

    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit_records WHERE seq > 9")
    assert (await verify_with(url, trusted=trust(key))).intact  # the chain alone cannot tell
    report = await verify_with(url, (head.writer, doc), trusted=trust(key))
    problem = report.chains[0].problem
    assert problem is not None and problem.kind == "truncated" and problem.seq == 10
    assert f"checkpoint at record {head.seq}" in problem.message and "ends at record 9" in problem.message

    report = await verify_with(url, (head.writer, doc), trusted=trust(new_key()))  # not the writer's key
    problem = report.chains[0].problem
    assert problem is not None and problem.kind == "forged" and problem.seq == head.seq


async def test_a_writer_whose_every_record_was_deleted_is_reported(tmp_path: Path) -> None:
    url, db, head = await build(tmp_path)
    key = new_key()
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit_records")
    mine = sign_checkpoint(key, head, f"sqlite:///{db.absolute()}").document()
    report = await verify_with(url, (head.writer, mine), trusted=trust(key))
    problem = report.chains[0].problem
    assert problem is not None and problem.kind == "truncated" and "holds none of its records" in problem.message

    # A shared store may hold the checkpoints of other deployments' writers: not held against this store.
    other = sign_checkpoint(key, ChainHead("wother", 7, "11" * 32), "postgresql://elsewhere/audit").document()
    report = await verify_with(url, ("wother", other), trusted=trust(key))
    assert report.intact and [(u.writer, u.seq) for u in report.unchecked] == [("wother", 7)]


async def test_a_checkpoint_older_than_the_prune_point_is_satisfied_by_retention(tmp_path: Path) -> None:
    url, db, head = await build(tmp_path)
    key = new_key()
    old = sign_checkpoint(key, ChainHead(head.writer, 3, _hash_at(db, 3)), url).document()
    at_marker = sign_checkpoint(key, ChainHead(head.writer, 5, _hash_at(db, 5)), url).document()
    wrong_marker = sign_checkpoint(key, ChainHead(head.writer, 5, "ee" * 32), url).document()
    async with open_store(url) as store:  # records 1-5 started more than 7 hours before "now"
        result = await apply_retention(store, records=7 * 3600, bodies=None, now=T0 + 12 * HOUR_US + 1)
    assert result.records == 5
    report = await verify_with(url, (head.writer, old), (head.writer, at_marker), trusted=trust(key))
    assert report.intact and report.chains[0].pruned_through == 5
    report = await verify_with(url, (head.writer, wrong_marker), trusted=trust(key))
    problem = report.chains[0].problem
    assert problem is not None and problem.kind == "rewritten" and "prune marker" in problem.message


def _hash_at(db: Path, seq: int) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT hash FROM audit_records WHERE seq = ?", (seq,)).fetchone()[0])


# --- the writer's side: cadence ---------------------------------------------------------------------------------


class MemoryWitness(CheckpointWitness):
    where = "memory"

    def __init__(self) -> None:
        self.puts: list[tuple[str, int, str]] = []
        self.failing = False
        self.changed = asyncio.Event()

    async def put(self, writer: str, seq: int, time_us: int, document: str, key_line: str) -> None:
        if self.failing:
            from bastion.coord.store import StoreUnavailable

            raise StoreUnavailable("down")
        self.puts.append((writer, seq, key_line))
        self.changed.set()

    async def read(self) -> list[WitnessEntry]:
        return []

    async def close(self) -> None:
        pass


async def wait_for_puts(w: MemoryWitness, n: int) -> None:
    async with asyncio.timeout(10):
        while len(w.puts) < n:
            w.changed.clear()
            await w.changed.wait()


async def test_checkpoints_follow_the_drain_every_n_records_and_at_close(tmp_path: Path) -> None:
    w = MemoryWitness()
    key = new_key()
    cp = Checkpointer(key, SINK, tmp_path / "checkpoint.json", w, every_records=3, every_seconds=3600)
    cp.start()
    cp.note(ChainHead("w1", 1, "01" * 32))
    await wait_for_puts(w, 1)  # the first drain of a run is sealed at once
    for last in (4, 7):
        for seq in range(last - 2, last + 1):  # the checkpointer sees each head: none is due before the third
            cp.note(ChainHead("w1", seq, f"{seq:02x}" * 32))
            await asyncio.sleep(0.01)
        await wait_for_puts(w, 1 + last // 3)
    assert [seq for _, seq, _ in w.puts] == [1, 4, 7]
    assert w.puts[0][2] == key.public.line()  # the key is registered with every checkpoint
    cp.note(ChainHead("w1", 8, "08" * 32))
    await cp.close()  # shutdown seals what the sink took last
    assert [seq for _, seq, _ in w.puts] == [1, 4, 7, 8]
    local = Checkpoint.parse((tmp_path / "checkpoint.json").read_text())
    assert (local.seq, local.sink, local.key_id) == (8, SINK, key.public.key_id)
    assert stat.S_IMODE((tmp_path / "checkpoint.json").stat().st_mode) == 0o600


async def test_a_store_outage_delays_checkpoints_without_losing_the_local_one(tmp_path: Path) -> None:
    w = MemoryWitness()
    w.failing = True
    cp = Checkpointer(new_key(), SINK, tmp_path / "checkpoint.json", w, every_records=1, every_seconds=3600)
    cp.start()
    cp.note(ChainHead("w1", 5, "05" * 32))
    async with asyncio.timeout(10):
        while not (tmp_path / "checkpoint.json").exists():
            await asyncio.sleep(0.01)
    assert Checkpoint.parse((tmp_path / "checkpoint.json").read_text()).seq == 5 and w.puts == []
    w.failing = False
    await cp.close()
    assert [seq for _, seq, _ in w.puts] == [5]


# --- the witness: bounds, in SQLite and Redis -------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
async def witness_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    url = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    yield f"{url}?prefix={prefix}"
    delete_prefix(url, prefix)


async def test_the_witness_keeps_a_bounded_history_per_writer_and_a_bounded_number_of_writers(
        witness_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = open_witness(witness_url, create=False)
    assert await reader.read() == []  # nothing there yet, and reading created nothing
    if witness_url.startswith("sqlite"):
        assert not Path(witness_url.removeprefix("sqlite:///")).exists()
    monkeypatch.setattr(witness_mod, "MAX_WRITERS", 3)
    w = open_witness(witness_url, create=True)
    try:
        for seq in range(1, HISTORY + 6):
            await w.put("wa", seq, T0 + seq, f"doc-a-{seq}", "ed25519 KEY-A")
        await w.put("wa", HISTORY + 5, T0 + 99, "doc-a-again", "ed25519 KEY-A")  # same seq: replaced
        for n, writer in enumerate(("wb", "wc", "wd")):
            await w.put(writer, 1, T0 + 1000 + n, f"doc-{writer}", f"ed25519 KEY-{writer}")
        with pytest.raises(ValueError, match="writer id"):
            await w.put("bad id", 1, T0, "x", "y")
    finally:
        await w.close()
    entries = {e.writer: e for e in await reader.read()}
    await reader.close()
    assert sorted(entries) == ["wb", "wc", "wd"]  # "wa" checkpointed longest ago: dropped past 3 writers
    assert entries["wd"] == WitnessEntry("wd", "ed25519 KEY-wd", ("doc-wd",))


async def test_the_witness_history_keeps_the_newest(witness_url: str) -> None:
    w = open_witness(witness_url, create=True)
    try:
        for seq in range(1, HISTORY + 6):
            await w.put("wa", seq, T0 + seq, f"doc-{seq}", "ed25519 KEY")
        await w.put("wa", HISTORY + 5, T0 + 99, "doc-again", "ed25519 KEY")
        entries = await w.read()
    finally:
        await w.close()
    assert len(entries) == 1 and entries[0].key_line == "ed25519 KEY"
    assert entries[0].documents == ("doc-again", *(f"doc-{s}" for s in range(HISTORY + 4, 5, -1)))


# --- a real sidecar ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_upstream(test_certs: CertFiles) -> Iterator[AuditUpstream]:
    with run_audit_upstream(test_certs) as up:
        yield up


@dataclass
class Served:
    """What a stopped `bastion serve` left: its home, audit and store URLs, and its one writer's chain head."""

    kind: str
    work: Path
    home: Path
    audit: str
    store: str
    writer: str = ""
    last_seq: int = 0
    dsn: str = ""
    schema: str = ""
    redis: str = ""
    prefix: str = ""
    schemas: list[str] = field(default_factory=list)


@pytest.fixture(scope="module", params=["sqlite", "fleet"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_certs: CertFiles,
           audit_upstream: AuditUpstream) -> Iterator[Served]:
    work = tmp_path_factory.mktemp(f"checkpoints-{request.param}")
    home = work / "home"
    if request.param == "sqlite":  # the default: audit and store in the home's database
        url = f"sqlite:///{home / 'bastion.db'}"
        s = Served("sqlite", work, home, url, url)
    else:
        dsn, redis = require_postgres(), require_redis()
        schema, prefix = f"bastiontest_{uuid.uuid4().hex[:12]}", f"bastiontest:{uuid.uuid4().hex}:"
        s = Served("fleet", work, home, f"{dsn}?schema={schema}", f"{redis}?prefix={prefix}", dsn=dsn,
                   schema=schema, redis=redis, prefix=prefix, schemas=[schema])
    try:
        _serve_traffic(s, test_certs, audit_upstream)
        yield s
    finally:
        if s.kind == "fleet":
            for schema in s.schemas:
                asyncio.run(drop_schema(s.dsn, schema))
            delete_prefix(s.redis, s.prefix)


def _serve_traffic(s: Served, certs: CertFiles, upstream: AuditUpstream) -> None:
    rules = write_policy(s.work / "rules.yaml")
    extra = [] if s.kind == "sqlite" else ["--audit", s.audit, "--store", s.store]
    with run_bastion(s.work / "srv", [rules], home=s.home, upstream_ca=certs.ca_cert, extra_args=extra) as server:
        client = session(server)
        ids = [call(client, upstream, f"checkpoint-{i}") for i in range(12)]
        wait_for_records(s.audit, ids)
        assert server.stop() == 0, server.logs()[-3000:]
    rows = asyncio.run(_tail_rows(s.audit))
    s.writer, s.last_seq = rows[-1][0], rows[-1][1]
    assert s.last_seq >= 12


async def _tail_rows(audit: str) -> list[tuple[str, int]]:
    async with open_store(audit) as store:
        writers = await store.writers()
        assert len(writers) == 1
        return [(writers[0], row.seq) async for row in store.chain_rows(writers[0])]


class Copy:
    """A copy of a deployment's audit store and checkpoint witness, for one test to tamper with."""

    def __init__(self, s: Served, name: str) -> None:
        self.s = s
        self.empty_home = s.work / f"elsewhere-{name}"  # another machine: no key, no spool
        self.empty_home.mkdir()
        if s.kind == "sqlite":
            self.db = s.work / f"copy-{name}.db"
            with sqlite3.connect(s.home / "bastion.db") as src, sqlite3.connect(self.db) as dst:
                src.backup(dst)
            self.audit = self.store = f"sqlite:///{self.db}"
        else:
            self.schema = f"{s.schema}_{name}"
            s.schemas.append(self.schema)
            self.audit = f"{s.dsn}?schema={self.schema}"
            self.prefix = f"{s.prefix}{name}:"
            self.store = f"{s.redis}?prefix={self.prefix}"
            asyncio.run(self._copy_fleet())

    async def _copy_fleet(self) -> None:
        import asyncpg
        import redis.asyncio as aioredis

        async with open_store(self.audit):  # creates the schema's tables
            pass
        cols = ("writer, seq, id, started_us, ended_us, agent, method, host, url, status, effect, outcome, record, "
                "hash, request_body, response_body, purged_us")
        conn = await asyncpg.connect(self.s.dsn)
        try:
            await conn.execute(f'INSERT INTO "{self.schema}".audit_records ({cols}) '  # noqa: S608
                               f'SELECT {cols} FROM "{self.s.schema}".audit_records')
        finally:
            await conn.close()
        client = aioredis.Redis.from_url(self.s.redis)
        try:
            async for key in client.scan_iter(match=f"{self.s.prefix}{{audit}}:*"):
                await client.copy(key, self.prefix.encode() + key[len(self.s.prefix):])
        finally:
            await client.aclose()

    def verify(self, *extra: str, home: Path | None = None) -> tuple[int, str]:
        p = run_cli("audit", "verify", "--audit", self.audit, "--store", self.store, "--home",
                    str(home or self.empty_home), *extra)
        assert p.returncode in (0, 1), p.stderr
        return p.returncode, p.stdout

    def sql(self, statement: str, *args: Any) -> list[Any]:
        """`statement` with `?` placeholders, on the copy's audit_records / witness tables."""
        if self.s.kind == "sqlite":
            with sqlite3.connect(self.db) as conn:
                return conn.execute(statement, args).fetchall()
        return asyncio.run(self._pg(statement, args))

    async def _pg(self, statement: str, args: tuple[Any, ...]) -> list[Any]:
        import asyncpg

        parts = statement.split("?")
        text = parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))
        conn = await asyncpg.connect(self.s.dsn, server_settings={"search_path": self.schema})
        try:
            return [tuple(r) for r in await conn.fetch(text, *args)]
        finally:
            await conn.close()

    def chain_only(self) -> bool:
        """What plain chain verification (no checkpoints) says."""
        async def main() -> bool:
            async with open_store(self.audit) as store:
                return (await verify_store(store)).intact
        return asyncio.run(main())

    def witness(self, work: Any) -> Any:
        async def main() -> Any:
            w = open_witness(self.store, create=True)
            try:
                return await work(w)
            finally:
                await w.close()
        return asyncio.run(main())

    def add_raw_checkpoint(self, writer: str, seq: int, document: str) -> None:
        """A document in the witness, as someone who can write the store would add it (no key registered)."""
        if self.s.kind == "sqlite":
            self.sql("INSERT OR REPLACE INTO audit_witness_checkpoints (writer, seq, time_us, document) "
                     "VALUES (?, ?, ?, ?)", writer, seq, T0, document)
            return
        import redis

        client = redis.Redis.from_url(self.s.redis)
        try:
            client.zadd(f"{self.prefix}{{audit}}:cp:{writer}", {document: seq})
        finally:
            client.close()

    def clear_history(self, writer: str) -> None:
        if self.s.kind == "sqlite":
            self.sql("DELETE FROM audit_witness_checkpoints WHERE writer = ?", writer)
            return
        import redis

        client = redis.Redis.from_url(self.s.redis)
        try:
            client.delete(f"{self.prefix}{{audit}}:cp:{writer}")
        finally:
            client.close()


def rewrite_tail(c: Copy, writer: str, first: int) -> None:
    """Edit records `first`.. and relink them with recomputed hashes, as an attacker who knows the format would."""
    rows = c.sql("SELECT seq, record, hash FROM audit_records WHERE writer = ? AND seq >= ? ORDER BY seq",
                 writer, first - 1)
    prev = rows[0][2]
    for seq, text, _ in rows[1:]:
        record = AuditRecord.from_bytes(text)
        assert record.canonical_bytes() == text.encode()  # the stored bytes are what the hash covers
        assert record.chain is not None
        record.extra = {**record.extra, "note": "nothing to see here"}
        record.chain = ChainLink(writer, seq, prev)
        data = record.canonical_bytes()
        prev = record_hash(data)
        c.sql("UPDATE audit_records SET record = ?, hash = ? WHERE writer = ? AND seq = ?", data.decode(), prev,
              writer, seq)


def test_an_untouched_log_verifies_with_its_checkpoints(served: Served) -> None:
    c = Copy(served, "untouched")
    rc, out = c.verify()  # from elsewhere: the checkpoints come from the store, the key is trusted on first use
    assert rc == 0, out
    assert f"signed checkpoint #{served.last_seq} " in out and " holds" in out
    assert "trusted on first use" in out and "intact" in out

    p = run_cli("audit", "verify", "--audit", served.audit, "--store", served.store, "--home", str(served.home))
    assert p.returncode == 0, p.stdout + p.stderr  # on the sidecar: its own key, pinned
    assert f"trusted key {_home_key(served).key_id}: --home" in p.stdout
    local = Checkpoint.parse((served.home / "spool" / "checkpoint.json").read_text())
    assert (local.writer, local.seq) == (served.writer, served.last_seq)  # sealed at shutdown, also locally

    p = run_cli("audit", "key", "--home", str(served.home))
    assert p.returncode == 0 and parse_key_line(p.stdout) == _home_key(served)

    p = run_cli("audit", "verify", "--format", "json", "--audit", c.audit, "--store", c.store, "--home",
                str(c.empty_home))
    doc = json.loads(p.stdout)
    assert p.returncode == 0 and doc["intact"] and doc["chains"][0]["checkpoint_seq"] == served.last_seq
    assert [(k["key"], k["pinned"]) for k in doc["keys"]] == [(_home_key(served).key_id, False)]


def test_a_cut_off_tail_is_reported_as_truncated(served: Served) -> None:
    c = Copy(served, "truncated")
    c.sql("DELETE FROM audit_records WHERE writer = ? AND seq > ?", served.writer, served.last_seq - 3)
    assert c.chain_only()  # what verify said before there were checkpoints
    rc, out = c.verify()
    assert rc == 1
    assert f"chain {served.writer}: BROKEN (truncated)" in out
    assert f"signed a checkpoint at record {served.last_seq}" in out and f"ends at record {served.last_seq - 3}" in out


def test_a_rewritten_tail_with_recomputed_hashes_is_reported(served: Served) -> None:
    c = Copy(served, "rewritten")
    rewrite_tail(c, served.writer, served.last_seq - 2)
    assert c.chain_only()  # properly relinked: the chain alone looks intact
    rc, out = c.verify()
    assert rc == 1
    assert f"chain {served.writer}: BROKEN (rewritten)" in out and f"record {served.last_seq} (" in out


def test_a_checkpoint_signed_by_another_key_is_refused(served: Served) -> None:
    c = Copy(served, "forged")
    rewrite_tail(c, served.writer, served.last_seq - 2)
    head = c.sql("SELECT seq, hash FROM audit_records WHERE writer = ? ORDER BY seq DESC LIMIT 1", served.writer)[0]
    forged = sign_checkpoint(new_key(), ChainHead(served.writer, head[0], head[1]), c.audit)
    c.clear_history(served.writer)  # the genuine checkpoints would give the rewrite away
    c.add_raw_checkpoint(served.writer, head[0], forged.document())
    rc, out = c.verify()
    assert rc == 1
    assert f"chain {served.writer}: BROKEN (forged)" in out and forged.key_id in out and "not trusted" in out


def test_trust_on_first_use_is_as_strong_as_the_store_and_pinned_keys_are_not(served: Served) -> None:
    """Someone who can write the audit database AND the store, without the sidecar's key: rewrites the tail,
    replaces the checkpoints and registers a key of their own. Trusting the store's keys cannot see it (the
    documented limit, and verify says which keys it trusted on first use); pinning the keys with --keys can."""
    c = Copy(served, "takeover")
    rewrite_tail(c, served.writer, served.last_seq - 2)
    head = c.sql("SELECT seq, hash FROM audit_records WHERE writer = ? ORDER BY seq DESC LIMIT 1", served.writer)[0]
    attacker = new_key()
    forged = sign_checkpoint(attacker, ChainHead(served.writer, head[0], head[1]), c.audit)
    c.clear_history(served.writer)
    c.witness(lambda w: w.put(served.writer, head[0], forged.time_us, forged.document(), attacker.public.line()))

    rc, out = c.verify()
    assert rc == 0 and f"trusted key {attacker.public.key_id}" in out and "trusted on first use" in out

    keys = served.work / "fleet-keys.txt"
    keys.write_text(_home_key(served).line("the sidecar") + "\n")
    rc, out = c.verify("--keys", str(keys))
    assert rc == 1 and f"chain {served.writer}: BROKEN (forged)" in out and "not trusted" in out
    assert f"trusted key {_home_key(served).key_id}: --keys {keys}" in out


def _home_key(s: Served) -> PublicKey:
    return parse_key_line((s.home / PUB_FILE).read_text())
