"""The spool on its own: framing, crash recovery (torn tails), the single-process lock, segment rotation and
deletion after draining, and what happens when the chain's head cannot be found."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.audit.chain import Chain, ChainHead
from bastion.audit.entry import Entry
from bastion.audit.sample import sample_exchange
from bastion.audit.spool import MAGIC, Position, Spool, SpoolLockedError, read_cursor_file


def append_records(spool: Spool, chain: Chain, n: int) -> list[Entry]:
    out = []
    for i in range(n):
        rec, _, _ = sample_exchange(seed=i, body_words=5)
        data, head = chain.link(rec)
        entry = Entry(head.writer, head.seq, head.hash, data, b"req-blob", None, rec)
        spool.append(entry.frame())
        chain.advance(head)
        out.append(entry)
    spool.sync()
    return out


def read_all(spool: Spool, cursor: Position) -> tuple[list[Entry], Position]:
    got: list[Entry] = []
    while True:
        batch, cursor = spool.read(cursor, limit=7)
        if not batch:
            return got, cursor
        got += batch


def test_entries_round_trip_through_frames(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    state = spool.open()
    assert state.head == ChainHead.empty(state.writer) and state.pending == 0 and len(state.key) == 32
    written = append_records(spool, Chain(state.head), 20)
    got, _ = read_all(spool, state.cursor)
    assert [(e.seq, e.hash, e.canonical, e.request_body, e.response_body) for e in got] == \
           [(e.seq, e.hash, e.canonical, e.request_body, e.response_body) for e in written]
    assert got[3].record.id == written[3].record.id and got[3].record.hash == written[3].hash
    spool.close()


def test_a_second_process_cannot_use_the_same_spool(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    first.open()
    with pytest.raises(SpoolLockedError):
        Spool(tmp_path).open()
    first.close()
    second = Spool(tmp_path)
    second.open()  # the lock went with the first owner
    second.close()


def test_recovery_cuts_a_torn_tail_and_continues_the_chain(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    state = spool.open()
    written = append_records(spool, Chain(state.head), 5)
    spool.close()
    seg = next(tmp_path.glob("seg-*.spool"))
    good_size = seg.stat().st_size
    with open(seg, "ab") as f:  # what a crash in the middle of a write leaves behind
        f.write(written[0].frame()[:40])

    spool = Spool(tmp_path)
    again = spool.open()
    assert seg.stat().st_size == good_size
    assert again.writer == state.writer and again.key == state.key
    assert again.head == ChainHead(state.writer, 5, written[-1].hash)
    assert again.pending == 5
    more = append_records(spool, Chain(again.head), 2)
    assert more[0].seq == 6 and more[0].record.chain is not None and more[0].record.chain.prev == written[-1].hash
    got, _ = read_all(spool, again.cursor)
    assert [e.seq for e in got] == [1, 2, 3, 4, 5, 6, 7]
    spool.close()


def test_drained_segments_are_deleted_and_the_cursor_remembers_the_head(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=4096)
    state = spool.open()
    written = append_records(spool, Chain(state.head), 40)
    assert len(list(tmp_path.glob("seg-*.spool"))) > 3
    got, cursor = read_all(spool, state.cursor)
    assert [e.seq for e in got] == list(range(1, 41))
    last = ChainHead(state.writer, 40, written[-1].hash)
    spool.commit(cursor, last, "sqlite:////x.db")
    assert len(list(tmp_path.glob("seg-*.spool"))) == 1  # only the active segment is kept
    info = read_cursor_file(tmp_path)
    assert info is not None and info.drained == last and info.sink == "sqlite:////x.db"
    spool.close()

    spool = Spool(tmp_path, segment_bytes=4096)
    again = spool.open()
    assert again.head.seq == 40 and again.pending == 0 and again.cursor == cursor
    spool.close()


def test_a_corrupt_frame_in_a_closed_segment_does_not_stall_the_drain(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=4096)
    state = spool.open()
    append_records(spool, Chain(state.head), 30)
    spool.close()
    first = sorted(tmp_path.glob("seg-*.spool"))[0]
    data = bytearray(first.read_bytes())
    data[len(MAGIC) + 20] ^= 0xFF  # flip a byte inside the first frame
    first.write_bytes(bytes(data))
    spool = Spool(tmp_path, segment_bytes=4096)
    again = spool.open()
    got, _ = read_all(spool, again.cursor)
    seqs = [e.seq for e in got]
    assert seqs and seqs[-1] == 30 and 1 not in seqs  # the damaged segment is skipped, the rest drains
    spool.close()


def test_without_a_known_head_the_spool_starts_a_new_chain(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    state = spool.open()
    append_records(spool, Chain(state.head), 3)
    spool.close()
    for p in tmp_path.glob("seg-*.spool"):
        p.unlink()
    spool = Spool(tmp_path)
    again = spool.open()
    # Reusing the old id would restart at seq 1 and collide with records a sink already has.
    assert again.writer != state.writer and again.head.seq == 0
    assert (tmp_path / "writer.id").read_text().strip() == again.writer
    spool.close()
