"""The hash chain that makes the audit log tamper-evident.

Each writer (one per sidecar home, its id kept in the spool directory) numbers its records 1, 2, 3, ... and
stores in record n the hash of record n-1 (`chain.prev`; record 1 points at `GENESIS`). A record's hash is the
SHA-256 of its canonical JSON (`AuditRecord.canonical_bytes`), which includes the link, so editing, deleting,
inserting or reordering any record breaks the chain at that point, and `bastion audit verify` says where.

Retention deletes only whole prefixes of a chain and leaves a prune marker (writer, last pruned seq, that
record's hash) in the same transaction, so a verifier starts from the marker: an old prefix may be gone, a
hole in the middle is still a hole. What a chain alone cannot show is a cut-off or rewritten *tail*: for that
each writer signs checkpoints of its chain and keeps them outside the audit database (`bastion.audit.checkpoint`),
and `verify` also compares the store with the local spool's drain cursor when it can.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bastion.audit.record import AuditRecord, ChainLink

GENESIS = "0" * 64


def record_hash(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last record of a chain so far (`seq` 0 and `GENESIS` for an empty chain)."""

    writer: str
    seq: int
    hash: str

    @classmethod
    def empty(cls, writer: str) -> ChainHead:
        return cls(writer, 0, GENESIS)


class Chain:
    """Links records for one writer. Used by the writer's single spool thread only."""

    def __init__(self, head: ChainHead) -> None:
        self.head = head

    def link(self, record: AuditRecord) -> tuple[bytes, ChainHead]:
        """Set `record.chain` and `record.hash` for the next position; returns the canonical bytes and the
        head the chain will have once `advance` is called (after the record is safely spooled)."""
        record.chain = ChainLink(self.head.writer, self.head.seq + 1, self.head.hash)
        data = record.canonical_bytes()
        record.hash = record_hash(data)
        return data, ChainHead(self.head.writer, self.head.seq + 1, record.hash)

    def advance(self, head: ChainHead) -> None:
        self.head = head
