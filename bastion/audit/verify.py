"""`bastion audit verify`: walk every writer's hash chain in a store and report the first break in each.

For each chain, starting after its prune marker (or at record 1 with `GENESIS`), every stored record must:
hash to its stored hash (else it was edited), parse, belong to this chain at the position it is stored at
(else it was moved or swapped), have search columns that agree with its JSON, come next in sequence (a jump
is a deletion, a step back a reordering), point at its predecessor's hash (else the predecessor was replaced),
and have bodies matching their digests unless retention purged them.

A chain alone cannot show a cut-off tail, nor a tail replaced by records linked properly with recomputed
hashes. Two outside witnesses can:

- the local spool's drain cursor, when it drains into this store: the chain must reach the record the cursor
  says was drained, with the same hash;
- the writers' signed checkpoints (`bastion.audit.checkpoint`), from the shared store and the local spools:
  each must be signed by a trusted key (else "forged"), the chain must hold at its seq the very record the
  writer signed (else "rewritten"), and reach at least that seq (else "truncated"). A checkpoint at or before
  the prune marker is satisfied by retention, if it matches the marker where they meet. A checkpoint of a
  writer with no record here is checked only when it was made for this very store (by its display URL): a
  shared store may hold other deployments' writers.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bastion.audit.bodies import DecodeError, unpack
from bastion.audit.chain import GENESIS, record_hash
from bastion.audit.checkpoint import Checkpoint, TrustedKey, Witnessed, judge, stamp
from bastion.audit.record import AuditRecord, Body, RecordError
from bastion.audit.sinks.base import AuditStore, ChainRow, PruneMarker, index_of
from bastion.audit.spool import CursorInfo


@dataclass(frozen=True, slots=True)
class Problem:
    """`kind`: edited, moved, reordered, deleted, link, body, truncated, rewritten (differs from a signed
    checkpoint), forged (a checkpoint without a valid signature of a trusted key)."""

    kind: str
    seq: int | None
    record_id: str | None
    message: str


@dataclass(slots=True)
class ChainReport:
    writer: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str | None = None
    pruned_through: int | None = None
    bodies_checked: int = 0
    bodies_purged: int = 0
    checkpoints: int = 0  # distinct valid signed checkpoints held against this chain
    checkpoint_seq: int | None = None  # the newest of them
    checkpoint_time_us: int | None = None
    checkpoint_key: str | None = None
    problem: Problem | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None


@dataclass(frozen=True, slots=True)
class Unchecked:
    """A valid checkpoint of a writer with no record in this store, made for another store: not held against it."""

    writer: str
    seq: int
    sink: str
    source: str


@dataclass(slots=True)
class VerifyReport:
    chains: list[ChainReport] = field(default_factory=list)
    keys: list[TrustedKey] = field(default_factory=list)  # the keys checkpoint signatures were checked against
    checkpoints_found: int = 0
    unchecked: list[Unchecked] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # unreadable checkpoints, which name no writer

    @property
    def intact(self) -> bool:
        return all(c.intact for c in self.chains) and not self.faults

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains)

    def to_json(self) -> dict[str, Any]:
        return {"intact": self.intact, "records": self.records, "chains": [
            {**{k: v for k, v in asdict(c).items() if k != "problem"},
             "intact": c.intact, "problem": None if c.problem is None else asdict(c.problem)}
            for c in self.chains],
            "keys": [{"key": k.key.key_id, "public_key": k.key.line(), "source": k.source, "pinned": k.pinned}
                     for k in self.keys],
            "checkpoints_found": self.checkpoints_found,
            "unchecked_checkpoints": [asdict(u) for u in self.unchecked], "checkpoint_faults": self.faults}


async def verify_store(store: AuditStore, *, anchor: CursorInfo | None = None, witnessed: Sequence[Witnessed] = (),
                       trusted: Mapping[str, TrustedKey] | None = None) -> VerifyReport:
    """Check every chain in `store`. `anchor` is the local spool's drain cursor, when it drains into `store`;
    `witnessed` the signed checkpoints found, judged against the `trusted` keys (by key id)."""
    markers = await store.prune_markers()
    writers = await store.writers()
    if anchor and anchor.drained and anchor.drained.seq > 0 and anchor.drained.writer not in writers:
        writers.append(anchor.drained.writer)
    report = VerifyReport(keys=list((trusted or {}).values()), checkpoints_found=len(witnessed))
    valid, forged = _sort_checkpoints(witnessed, trusted or {}, set(writers) | set(markers), store.display_url,
                                      report)
    writers += [w for w in dict.fromkeys([*valid, *forged]) if w not in writers]
    for writer in writers:
        rep = await _verify_chain(store, writer, markers.get(writer), anchor, valid.get(writer, []))
        if rep.problem is None and forged.get(writer):
            rep.problem = forged[writer][0]
        report.chains.append(rep)
    return report


def _sort_checkpoints(witnessed: Sequence[Witnessed], trusted: Mapping[str, TrustedKey], present: set[str],
                      sink: str, report: VerifyReport) -> tuple[dict[str, list[Checkpoint]], dict[str, list[Problem]]]:
    """Judge every document: per writer, the valid checkpoints and the faulty ones that concern this store."""
    valid: dict[str, list[Checkpoint]] = {}
    forged: dict[str, list[Problem]] = {}
    for w in witnessed:
        judged = judge(w, trusted)
        cp = judged.checkpoint
        if cp is None:
            report.faults.append(judged.fault or "an unreadable checkpoint")
            continue
        if cp.writer not in present and cp.sink != sink:
            if judged.fault is None:
                report.unchecked.append(Unchecked(cp.writer, cp.seq, cp.sink, w.source))
            continue
        if judged.fault is None:
            valid.setdefault(cp.writer, []).append(cp)
        else:
            forged.setdefault(cp.writer, []).append(Problem("forged", cp.seq, None, judged.fault))
    return valid, forged


class _Peek:
    """An async iterator with one row of look-ahead (to tell a deletion from a swap)."""

    def __init__(self, it: AsyncIterator[ChainRow]) -> None:
        self._it = it
        self._next: ChainRow | None = None
        self._done = False

    async def peek(self) -> ChainRow | None:
        if self._next is None and not self._done:
            try:
                self._next = await anext(self._it)
            except StopAsyncIteration:
                self._done = True
        return self._next

    async def pop(self) -> ChainRow | None:
        row = await self.peek()
        self._next = None
        return row


async def _verify_chain(store: AuditStore, writer: str, marker: PruneMarker | None,
                        anchor: CursorInfo | None, checkpoints: list[Checkpoint]) -> ChainReport:
    rep = ChainReport(writer, pruned_through=marker.seq if marker else None)
    signed = _index_checkpoints(checkpoints, rep)
    if marker is not None and (problem := _against_checkpoints(signed.get(marker.seq), marker.hash, None, writer,
                                                               store.display_url)):
        rep.problem = problem
        return rep
    want = anchor.drained if anchor and anchor.drained and anchor.drained.writer == writer else None
    base = marker.seq if marker else 0
    # Rows at or before the marker exist only while a prune is unfinished (the JSONL store writes the marker,
    # then deletes files). They are checked from the first one present and must lead exactly to the marker:
    # a hole among them is a deletion the marker does not explain (or a marker moved to hide one).
    expected: int | None = base + 1
    prev_hash, prev_id = (marker.hash if marker else GENESIS), None
    before_marker: tuple[int, str, str] | None = None  # (seq, hash, id) of the last such row
    rows = _Peek(aiter(store.chain_rows(writer)))
    while (row := await rows.pop()) is not None:
        problem, record = _check_row(row, writer)
        if problem is None and record is not None:
            assert record.chain is not None
            seq = record.chain.seq
            if marker is not None and seq <= marker.seq:
                if before_marker is None:  # the first row present: the chain is taken from here
                    expected, prev_hash = seq, record.chain.prev
                problem = await _step(record, row, expected, prev_hash, prev_id, rows, base) or \
                    _check_bodies(row, record, rep)
                before_marker = (seq, row.hash, record.id)
            else:
                if before_marker is not None:
                    problem = _marker_gap(before_marker, marker)
                    before_marker = None
                    expected, prev_hash = base + 1, marker.hash if marker else GENESIS
                problem = problem or await _step(record, row, expected, prev_hash, prev_id, rows, base) or \
                    _check_bodies(row, record, rep)
        if problem is None and record is not None and want is not None and record.chain is not None and \
                record.chain.seq == want.seq and row.hash != want.hash:
            problem = Problem("edited", want.seq, record.id, f"record {want.seq} ({record.id}) differs from the "
                              "one the local spool delivered: the chain's tail was rewritten")
        if problem is None and record is not None and record.chain is not None:
            problem = _against_checkpoints(signed.get(record.chain.seq), row.hash, record.id, writer,
                                           store.display_url)
        if problem is not None:
            rep.problem = problem
            return rep
        assert record is not None and record.chain is not None
        rep.records += 1
        rep.first_seq = record.chain.seq if rep.first_seq is None else rep.first_seq
        rep.last_seq, rep.head = record.chain.seq, row.hash
        prev_hash, prev_id, expected = row.hash, record.id, record.chain.seq + 1
    if before_marker is not None:
        rep.problem = _marker_gap(before_marker, marker)
        return rep
    end = max(rep.last_seq or 0, base)
    if want is not None and want.seq > end:
        rep.problem = Problem("truncated", end + 1, None, f"the local spool delivered records up to {want.seq} to "
                              f"this store, but the chain ends at {end}: records were deleted from the end")
    elif signed and (top := max(signed)) > end:
        cp = signed[top][0]
        held = f"the chain ends at record {end}" if end else "this store holds none of its records"
        rep.problem = Problem("truncated", end + 1, None, f"writer {writer} signed a checkpoint at record {top} "
                              f"({_signed(cp, store.display_url)}), but {held}: records were deleted from the end")
    return rep


def _index_checkpoints(checkpoints: list[Checkpoint], rep: ChainReport) -> dict[int, list[Checkpoint]]:
    """Valid checkpoints by seq (one per distinct record hash); the newest goes into the report."""
    signed: dict[int, list[Checkpoint]] = {}
    for cp in sorted(checkpoints, key=lambda c: (c.seq, c.time_us)):
        at = signed.setdefault(cp.seq, [])
        if all(c.hash != cp.hash for c in at):
            at.append(cp)
    rep.checkpoints = sum(len(v) for v in signed.values())
    if signed:
        newest = signed[max(signed)][-1]
        rep.checkpoint_seq, rep.checkpoint_time_us, rep.checkpoint_key = newest.seq, newest.time_us, newest.key_id
    return signed


def _against_checkpoints(signed: list[Checkpoint] | None, digest: str, record_id: str | None, writer: str,
                         sink: str) -> Problem | None:
    """Does the record (or prune marker) at a checkpoint's seq hash to what the writer signed?"""
    for cp in signed or ():
        if cp.hash != digest:
            what = f"record {cp.seq} ({record_id})" if record_id else f"the prune marker at record {cp.seq}"
            return Problem("rewritten", cp.seq, record_id, f"{what} is not the record writer {writer} signed in its "
                           f"checkpoint ({_signed(cp, sink)}): the chain was rewritten up to there")
    return None


def _signed(cp: Checkpoint, sink: str) -> str:
    elsewhere = "" if cp.sink == sink else f", made for {cp.sink}"
    return f"{stamp(cp.time_us)}, key {cp.key_id}{elsewhere}"


async def _step(record: AuditRecord, row: ChainRow, expected: int | None, prev_hash: str, prev_id: str | None,
                rows: _Peek, base: int) -> Problem | None:
    """Does `record` come next: right sequence number, pointing at the previous record's hash?"""
    assert record.chain is not None and expected is not None
    seq = record.chain.seq
    if seq > expected:
        nxt = await rows.peek()
        if nxt is not None and nxt.seq == expected:
            return Problem("reordered", seq, record.id,
                           f"record {seq} comes before record {expected}: the records were reordered")
        missing = f"record {expected}" if seq == expected + 1 else f"records {expected}-{seq - 1}"
        return Problem("deleted", expected, None, f"{missing} missing before record {seq} ({record.id}): deleted")
    if seq < expected:
        return Problem("reordered", seq, record.id,
                       f"record {seq} appears again after record {expected - 1}: reordered or duplicated")
    if record.chain.prev != prev_hash:
        if seq == base + 1:
            what = "the prune marker" if base else "the start of the chain"
            return Problem("link", seq, record.id, f"record {seq} ({record.id}) does not follow {what}: "
                           "records before it were deleted or it was replaced")
        return Problem("link", seq - 1, prev_id, f"record {seq - 1} ({prev_id}) no longer matches the hash record "
                       f"{seq} ({record.id}) holds: one of them was replaced or edited")
    return None


def _marker_gap(last: tuple[int, str, str], marker: PruneMarker | None) -> Problem | None:
    assert marker is not None
    seq, digest, rid = last
    if seq == marker.seq and digest == marker.hash:
        return None
    return Problem("deleted", seq + 1, None, f"records kept before the prune marker end at record {seq} ({rid}), "
                   f"but the marker says retention removed up to record {marker.seq}: records were deleted")


def _check_row(row: ChainRow, writer: str) -> tuple[Problem | None, AuditRecord | None]:
    if record_hash(row.canonical) != row.hash:
        rid = _peek_id(row)
        return Problem("edited", row.seq, rid, f"record {row.seq} ({rid}) does not match its hash: it was edited"), None
    try:
        record = AuditRecord.from_bytes(row.canonical)
    except RecordError as e:
        return Problem("edited", row.seq, None, f"record {row.seq} is not a valid record: {e}"), None
    chain = record.chain
    if chain is None or chain.writer != writer:
        return Problem("moved", row.seq, record.id, f"record {record.id} stored in chain {writer} belongs to "
                       f"{chain.writer if chain else 'no chain'}"), None
    if row.seq != chain.seq:
        return Problem("reordered", row.seq, record.id, f"position {row.seq} holds record {chain.seq} "
                       f"({record.id}): records were swapped or moved"), None
    if row.index:
        actual = index_of(record)
        for column, value in row.index.items():
            if actual.get(column) != value:
                return Problem("edited", row.seq, record.id, f"record {row.seq} ({record.id}): column {column} says "
                               f"{value!r} but the record says {actual.get(column)!r}"), None
    return None, record


def _check_bodies(row: ChainRow, record: AuditRecord, rep: ChainReport) -> Problem | None:
    for name, body, blob in (("request", record.request.body, row.request_body),
                             ("response", record.response.body if record.response else None, row.response_body)):
        problem = _check_body(name, body, blob, row, record, rep)
        if problem is not None:
            return problem
    return None


def _check_body(name: str, body: Body | None, blob: bytes | None, row: ChainRow, record: AuditRecord,
                rep: ChainReport) -> Problem | None:
    expected = body.stored if body is not None else 0
    where = f"record {row.seq} ({record.id}) {name} body"
    if blob is None:
        if expected and row.purged_us is None:
            return Problem("body", row.seq, record.id, f"{where} is missing but was never purged by retention")
        if expected:
            rep.bodies_purged += 1
        return None
    if body is None or not expected:
        return Problem("body", row.seq, record.id, f"{where} is stored but the record says there is none")
    try:
        data = unpack(bytes(blob), expected) if row.packed else bytes(blob)
    except DecodeError:
        data = None
    if data is None or hashlib.sha256(data).hexdigest() != body.stored_sha256:
        return Problem("body", row.seq, record.id, f"{where} does not match its digest: it was edited")
    rep.bodies_checked += 1
    return None


def _peek_id(row: ChainRow) -> str | None:
    try:
        return AuditRecord.from_bytes(row.canonical).id
    except RecordError:
        return None
