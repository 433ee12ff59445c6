"""The JSON-lines sink: files a SIEM can tail, rotated and gzip'd, readable by the CLI, verifiable, retained by
whole files; and a line torn by a crash does not corrupt what comes after it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from bastion.audit.retention import apply_retention
from bastion.audit.sample import sample_exchange
from bastion.audit.sinks import RecordQuery, open_store
from bastion.audit.verify import verify_store
from bastion.audit.writer import AuditWriter

HOUR_US = 3600 * 1_000_000
T0 = 1_795_000_000_000_000


async def build(tmp_path: Path, n: int = 30, max_file_bytes: int = 12_000) -> tuple[str, Path, list[str]]:
    url = f"jsonl:///{tmp_path}/logs"
    writer = await AuditWriter.open(url, tmp_path / "spool", store_options={"max_file_bytes": max_file_bytes},
                                    batch_size=7)
    ids = []
    for k in range(1, n + 1):
        rec, req, resp = sample_exchange(seed=k, body_words=60)
        rec.started_us, rec.ended_us = T0 + k * HOUR_US, T0 + k * HOUR_US + 1000
        assert writer.submit(rec, req, resp)
        ids.append(rec.id)
    assert await writer.flush()
    await writer.close()
    return url, tmp_path / "logs" / writer.writer_id, ids


def lines_of(path: Path) -> list[bytes]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.splitlines(keepends=True)


async def test_records_are_plain_json_lines_rotated_and_compressed(tmp_path: Path) -> None:
    url, wdir, ids = await build(tmp_path)
    files = sorted(wdir.iterdir())
    closed = [p for p in files if p.name.endswith(".jsonl.gz")]
    active = [p for p in files if p.name.endswith(".jsonl")]
    assert len(closed) >= 2 and len(active) == 1
    first = json.loads(lines_of(closed[0])[0])
    assert first["id"] == ids[0] and first["hash"] and first["chain"]["seq"] == 1
    assert first["request"]["body"]["content"]["text"].startswith('{"model"')  # readable for a SIEM
    assert first["request"]["headers"][2]["value"].startswith("Bearer [REDACTED:")
    async with open_store(url) as store:
        everything = [r.id async for r in store.iter_records(RecordQuery(limit=8, ascending=True))]
        assert everything == ids
        one = await store.get(ids[12])
        assert one is not None and one.response is not None and one.response.body is not None
        assert b"chat.completion" in (one.response.body.content or b"")
        _, token = await store.changes(None)
        assert (await store.changes(token))[0] == []
        report = await verify_store(store)
        assert report.intact and report.records == 30


async def test_tampering_with_the_files_is_detected(tmp_path: Path) -> None:
    url, wdir, _ = await build(tmp_path, max_file_bytes=1 << 30)  # one plain file
    active = next(wdir.glob("*.jsonl"))
    original = lines_of(active)

    edited = list(original)
    edited[4] = edited[4].replace(b'"status":200', b'"status":404')
    active.write_bytes(b"".join(edited))
    async with open_store(url) as store:
        problem = (await verify_store(store)).chains[0].problem
        assert problem is not None and problem.kind == "edited" and problem.seq == 5

    swapped = list(original)
    swapped[6], swapped[7] = swapped[7], swapped[6]
    active.write_bytes(b"".join(swapped))
    async with open_store(url) as store:
        problem = (await verify_store(store)).chains[0].problem
        assert problem is not None and problem.kind == "reordered" and problem.seq == 8

    active.write_bytes(b"".join(original[:9] + original[10:]))
    async with open_store(url) as store:
        problem = (await verify_store(store)).chains[0].problem
        assert problem is not None and problem.kind == "deleted" and problem.seq == 10

    extra = json.loads(original[2])
    extra["unknown_field"] = "added later"  # even a field no parser reads is covered by the hash
    active.write_bytes(b"".join([*original[:2], json.dumps(extra).encode() + b"\n", *original[3:]]))
    async with open_store(url) as store:
        problem = (await verify_store(store)).chains[0].problem
        assert problem is not None and problem.kind == "edited" and problem.seq == 3


async def test_retention_deletes_whole_old_files_and_strips_old_bodies(tmp_path: Path) -> None:
    url, wdir, ids = await build(tmp_path, n=40, max_file_bytes=12_000)
    before = sorted(p.name for p in wdir.iterdir() if ".jsonl" in p.name)
    async with open_store(url) as store:
        result = await apply_retention(store, records=20.5 * 3600, bodies=15.5 * 3600, now=T0 + int(40.5 * HOUR_US))
        assert result.records > 0 and result.bodies > 0
        report = await verify_store(store)
        assert report.intact, report.to_json()
        chain = report.chains[0]
        assert chain.pruned_through == chain.first_seq - 1 and chain.last_seq == 40 and chain.bodies_purged > 0
        survivors = [r async for r in store.iter_records(RecordQuery(limit=100, ascending=True))]
        assert [r.id for r in survivors] == ids[chain.first_seq - 1:]
        stripped = [r for r in survivors if r.purged_us is not None]
        assert stripped and all(r.request.body and r.request.body.content is None for r in stripped)
    after = sorted(p.name for p in wdir.iterdir() if ".jsonl" in p.name)
    assert len(after) < len(before) and any(".purged." in n for n in after) and (wdir / "pruned.json").exists()


async def test_a_line_torn_by_a_crash_is_dropped_before_writing_on(tmp_path: Path) -> None:
    url, wdir, _ = await build(tmp_path, n=5, max_file_bytes=1 << 30)
    active = next(wdir.glob("*.jsonl"))
    with open(active, "ab") as f:
        f.write(b'{"schema": "bastion.audit/1", "id": "half-writ')
    writer = await AuditWriter.open(url, tmp_path / "spool")
    rec, req, resp = sample_exchange(seed=99)
    assert writer.submit(rec, req, resp)
    assert await writer.flush()
    await writer.close()
    assert b"half-writ" not in active.read_bytes()
    async with open_store(url) as store:
        report = await verify_store(store)
        assert report.intact and report.records == 6


async def test_a_prune_interrupted_before_its_files_were_deleted_still_verifies(tmp_path: Path) -> None:
    """The JSONL store writes the prune marker, then deletes files; a crash in between leaves records the
    marker already counts as removed. They must lead exactly to the marker, and then it verifies."""
    url, wdir, _ = await build(tmp_path, n=30, max_file_bytes=12_000)
    first = sorted(p for p in wdir.iterdir() if p.name.endswith(".jsonl.gz"))[0]
    last = json.loads(lines_of(first)[-1])
    (wdir / "pruned.json").write_text(json.dumps({"writer": wdir.name, "seq": last["chain"]["seq"],
                                                  "hash": last["hash"], "ended_us": 0, "pruned_us": 0}))
    async with open_store(url) as store:
        report = await verify_store(store)
        assert report.intact and report.records == 30 and report.chains[0].pruned_through == last["chain"]["seq"]
