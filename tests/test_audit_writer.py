"""The writer with a real SQLite sink: round trip, sink outages drained in order, restarts with records
left in the spool, refusal when the spool is full or cannot be written, metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bastion.audit.entry import Entry
from bastion.audit.finalize import prepare
from bastion.audit.recent import RecentWindow, Spooled
from bastion.audit.record import AuditRecord
from bastion.audit.redact import Redactor
from bastion.audit.sample import sample_exchange
from bastion.audit.settings import AuditConfig
from bastion.audit.sinks import AuditStore, RecordQuery, open_store
from bastion.audit.spool import Position
from bastion.audit.verify import verify_store
from bastion.audit.writer import AuditWriter
from bastion.metrics import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def submit_many(writer: AuditWriter, n: int, agent: str = "support-bot") -> list[str]:
    ids = []
    for i in range(n):
        rec, req, resp = sample_exchange(seed=i, body_words=40, agent=agent)
        assert writer.submit(rec, req, resp)
        ids.append(rec.id)
    return ids


async def all_records(store: AuditStore) -> list[AuditRecord]:
    return [r async for r in store.iter_records(RecordQuery(limit=100, ascending=True))]


async def test_records_reach_sqlite_with_bodies_and_metrics(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    written, backlog = metric("bastion_audit_records_total"), metric("bastion_audit_backlog")
    writer = await AuditWriter.open(url, tmp_path / "spool")
    ids = submit_many(writer, 120)
    assert await writer.flush()
    assert writer.backlog == 0
    assert metric("bastion_audit_records_total") - written == 120
    assert metric("bastion_audit_backlog") == backlog
    await writer.close()
    async with open_store(url) as store:
        records = await all_records(store)
        assert sorted(r.id for r in records) == sorted(ids)
        one = await store.get(ids[7])
        assert one is not None and one.response is not None and one.response.body is not None
        assert json.loads(one.response.body.content or b"")["object"] == "chat.completion"
        assert one.chain is not None and one.chain.writer == writer.writer_id
        assert (await verify_store(store)).intact


async def test_a_sink_outage_keeps_records_in_the_spool_and_drains_them_in_order(tmp_path: Path) -> None:
    later = tmp_path / "not-yet"  # the sink's directory does not exist yet: every write fails
    url = f"sqlite:///{later}/audit.db"
    errors = metric("bastion_audit_write_errors_total")
    writer = await AuditWriter.open(url, tmp_path / "spool")
    ids = submit_many(writer, 50)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.flush()
    assert writer.backlog == 50 and writer.available and not writer.must_refuse()
    assert metric("bastion_audit_write_errors_total") > errors
    later.mkdir()
    async with asyncio.timeout(20):
        assert await writer.flush()
    assert writer.backlog == 0
    await writer.close()
    async with open_store(url) as store:
        records = await all_records(store)
        assert [r.id for r in records] == ids  # submission order
        assert [r.chain.seq for r in records if r.chain] == list(range(1, 51))
        changes, _ = await store.changes("0", limit=1000)  # storage (arrival) order
        assert [r.id for r in changes] == ids
        assert (await verify_store(store)).intact


async def test_records_left_in_the_spool_drain_after_a_restart_and_the_chain_continues(tmp_path: Path) -> None:
    later = tmp_path / "db"
    url = f"sqlite:///{later}/audit.db"
    first = await AuditWriter.open(url, tmp_path / "spool")
    old = submit_many(first, 30)
    assert not await first.close(drain_for=0.3)  # the sink is down: records stay in the spool
    later.mkdir()
    second = await AuditWriter.open(url, tmp_path / "spool")
    assert second.writer_id == first.writer_id
    new = submit_many(second, 10)
    assert await second.flush()
    await second.close()
    async with open_store(url) as store:
        records = await all_records(store)
        assert [r.id for r in records] == old + new
        assert [r.chain.seq for r in records if r.chain] == list(range(1, 41))
        report = await verify_store(store)
        assert report.intact and report.records == 40 and len(report.chains) == 1


async def test_a_full_spool_refuses_records_and_on_failure_decides_what_the_proxy_does(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/missing/audit.db"  # sink down, so the spool only grows
    dropped = metric("bastion_audit_dropped_total", reason="spool_full")
    writer = await AuditWriter.open(url, tmp_path / "spool", max_spool_bytes=30_000, config=AuditConfig())
    accepted = 0
    for i in range(400):
        rec, req, resp = sample_exchange(seed=i, body_words=100)
        if not writer.submit(rec, req, resp):
            break
        accepted += 1
        if i % 10 == 0:
            await asyncio.sleep(0.01)  # let the spool thread write
    else:
        pytest.fail("the spool never filled up")
    assert 0 < accepted < 400
    assert not writer.available and writer.must_refuse()
    assert metric("bastion_audit_dropped_total", reason="spool_full") > dropped
    writer.configure(AuditConfig(on_failure="allow"))
    assert not writer.must_refuse()  # fail open was configured: the proxy lets calls through unaudited
    await writer.close(drain_for=0.2)


SPOOL_ERROR_SCRIPT = textwrap.dedent("""
    import asyncio, json, resource, signal, sys
    from bastion.audit.sample import sample_exchange
    from bastion.audit.writer import AuditWriter
    from bastion.metrics import REGISTRY

    async def main(url, spool):
        writer = await AuditWriter.open(url, spool)
        # From here on no file of this process may grow past 200 kB: the kernel answers EFBIG, a real
        # write error, as a full disk would.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        accepted, refused = [], 0
        for i in range(3000):
            rec, req, resp = sample_exchange(seed=i, body_words=100)
            if writer.submit(rec, req, resp):
                accepted.append(rec.id)
            else:
                refused += 1
                if refused > 5:
                    break
            await asyncio.sleep(0.002)
        out = {"accepted": accepted, "refused": refused, "must_refuse": writer.must_refuse(),
               "dropped": REGISTRY.get_sample_value("bastion_audit_dropped_total", {"reason": "spool_error"})}
        await writer.close(drain_for=0.2)
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


async def test_an_unwritable_spool_refuses_records_without_leaving_a_gap_in_the_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db/audit.db"  # no sink while the limit is on: only the spool writes
    script = tmp_path / "spool_error.py"
    script.write_text(SPOOL_ERROR_SCRIPT)
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), url, str(tmp_path / "spool"),
                                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["refused"] > 0 and result["must_refuse"] and result["accepted"]

    (tmp_path / "db").mkdir()
    writer = await AuditWriter.open(url, tmp_path / "spool")  # no limit now: drain what was spooled
    assert await writer.flush()
    await writer.close()
    async with open_store(url) as store:
        records = await all_records(store)
        stored = [r.id for r in records]
        assert stored and set(stored) <= set(result["accepted"])
        assert stored == [i for i in result["accepted"] if i in set(stored)]  # in order
        # Accepted records that never reached the spool were counted as dropped, none silently lost.
        assert len(result["accepted"]) - len(stored) <= (result["dropped"] or 0)
        assert (await verify_store(store)).intact  # failed writes took no sequence numbers


async def test_settings_changes_apply_to_later_records(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    writer = await AuditWriter.open(url, tmp_path / "spool", config=AuditConfig(max_body_bytes=100))
    rec1, req1, resp1 = sample_exchange(seed=1, max_body_bytes=writer.config.max_body_bytes)
    assert writer.capture().finish().size == 0
    writer.submit(rec1, req1, resp1)
    writer.configure(AuditConfig(max_body_bytes=1 << 20, redact_json_keys=("model",)))
    rec2, req2, resp2 = sample_exchange(seed=2)
    writer.submit(rec2, req2, resp2)
    assert await writer.flush()
    await writer.close()
    async with open_store(url) as store:
        a, b = await store.get(rec1.id), await store.get(rec2.id)
        assert a is not None and a.request.body is not None and a.request.body.truncated
        assert a.request.body.stored == 100
        assert b is not None and b.request.body is not None and not b.request.body.truncated
        assert "/request/body/model" in b.redactions and "/request/body/model" not in a.redactions


async def test_submit_after_close_is_refused(tmp_path: Path) -> None:
    writer = await AuditWriter.open(f"sqlite:///{tmp_path}/audit.db", tmp_path / "spool")
    await writer.close()
    rec, req, resp = sample_exchange(seed=3)
    assert not writer.submit(rec, req, resp)
    assert await writer.close()  # idempotent


async def test_a_malformed_record_never_stops_the_writer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    invalid = metric("bastion_audit_dropped_total", reason="invalid")
    writer = await AuditWriter.open(url, tmp_path / "spool")
    odd, req, resp = sample_exchange(seed=1)
    odd.extra = {"when": object()}  # not JSON: kept, without the extra facts
    broken, _, _ = sample_exchange(seed=2)
    broken.request.headers = [(b"x-raw", b"bytes")]  # type: ignore[list-item]  # a caller bug: dropped
    good, greq, gresp = sample_exchange(seed=3)
    for rec, a, b in ((odd, req, resp), (broken, None, None), (good, greq, gresp)):
        assert writer.submit(rec, a, b)
    assert await writer.flush()
    assert writer.available
    await writer.close()
    assert metric("bastion_audit_dropped_total", reason="invalid") == invalid + 1
    async with open_store(url) as store:
        kept = await store.get(odd.id)
        assert kept is not None and kept.extra == {"audit_error": "extra facts were not JSON-serialisable"}
        assert await store.get(broken.id) is None and await store.get(good.id) is not None
        assert (await verify_store(store)).intact


# --- the parts the writer is made of, alone ---------------------------------------------------------------------

def _spooled(seq: int, size: int = 100) -> Spooled:
    rec, _, _ = sample_exchange(seed=seq)
    entry = Entry("w", seq, "00" * 32, b"{}", None, None, rec)
    return Spooled(Position(1, seq * size), Position(1, (seq + 1) * size), entry, size)


def test_recent_window_takes_contiguous_synced_entries_from_the_cursor() -> None:
    window = RecentWindow(max_bytes=1000)
    window.add(_spooled(i) for i in range(5))
    assert window.take(Position(1, 50), Position(1, 500), 10) is None  # not at an entry's start
    entries, end = window.take(Position(1, 100), Position(1, 400), 10) or ([], None)
    assert [e.seq for e in entries] == [1, 2, 3] and end == Position(1, 400)  # only what is synced
    entries, end = window.take(Position(1, 100), Position(1, 500), 2) or ([], None)
    assert [e.seq for e in entries] == [1, 2] and end == Position(1, 300)  # at most `limit`
    assert window.take(Position(1, 500), Position(1, 500), 10) is None  # everything drained
    window.add([_spooled(5)])
    assert [e.seq for e in (window.take(Position(1, 500), Position(1, 600), 10) or ([], None))[0]] == [5]


def test_recent_window_drops_the_oldest_past_its_bound() -> None:
    window = RecentWindow(max_bytes=250)
    window.add(_spooled(i) for i in range(5))
    assert window.take(Position(1, 0), Position(1, 500), 10) is None  # pushed out: the drain reads the spool
    entries, _ = window.take(Position(1, 300), Position(1, 500), 10) or ([], None)
    assert [e.seq for e in entries] == [3, 4]


def test_prepare_drops_what_it_cannot_build_and_keeps_records_without_bad_bodies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.audit import finalize as finalize_mod

    redactor = Redactor(key=b"k" * 32)
    rec, req, resp = sample_exchange(seed=1, body_words=5)
    done = prepare(rec, req, resp, redactor=redactor, max_body_bytes=1 << 20)
    assert done is not None and done.record is rec and done.request_blob is not None

    real = finalize_mod.finalize

    def bodies_fail(record: AuditRecord, request_body: object, response_body: object, **kw: object) -> object:
        if request_body is not None or response_body is not None:
            raise ValueError("broken body")
        return real(record, None, None, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(finalize_mod, "finalize", bodies_fail)
    rec, req, resp = sample_exchange(seed=2, body_words=5)
    done = prepare(rec, req, resp, redactor=redactor, max_body_bytes=1 << 20)
    assert done is not None and done.request_blob is None
    assert done.record.extra["audit_error"] == "bodies could not be processed"

    def always_fail(*args: object, **kw: object) -> object:
        raise ValueError("cannot redact")

    monkeypatch.setattr(finalize_mod, "finalize", always_fail)
    assert prepare(sample_exchange(seed=3)[0], None, None, redactor=redactor, max_body_bytes=0) is None
