"""`Entry`: a finished record on its way from the writer through the spool to a sink.

A finished record has been redacted and chained: its canonical JSON bytes are final (they are what the hash
covers) and its bodies are compressed. The spool stores entries as length-prefixed, CRC-checked frames so a
write torn by a crash is recognised and dropped instead of corrupting what follows.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from bastion.audit.record import AuditRecord, RecordError

_FRAME = struct.Struct(">II")  # payload length, CRC-32 of the payload
_HEAD = struct.Struct(">32sQHIII")  # hash, seq, len(writer), len(canonical), len(request blob), len(response blob)
FRAME_HEADER = _FRAME.size
MAX_FRAME = 1 << 30


class FrameError(ValueError):
    """A spool frame that is torn or corrupt."""


@dataclass(frozen=True, slots=True)
class Entry:
    """`canonical` is the exact hashed JSON; the bodies are zlib-compressed (None when nothing was stored)."""

    writer: str
    seq: int
    hash: str
    canonical: bytes
    request_body: bytes | None
    response_body: bytes | None
    record: AuditRecord

    def frame(self) -> bytes:
        w = self.writer.encode()
        req, resp = self.request_body or b"", self.response_body or b""
        payload = b"".join((_HEAD.pack(bytes.fromhex(self.hash), self.seq, len(w), len(self.canonical), len(req),
                                       len(resp)), w, self.canonical, req, resp))
        return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def from_payload(cls, payload: bytes) -> Entry:
        """Decode a frame payload (its CRC already checked); parses the record JSON."""
        if len(payload) < _HEAD.size:
            raise FrameError("short frame")
        digest, seq, wl, cl, ql, rl = _HEAD.unpack_from(payload)
        if _HEAD.size + wl + cl + ql + rl != len(payload):
            raise FrameError("frame lengths do not add up")
        pos = _HEAD.size
        writer = payload[pos:pos + wl].decode()
        pos += wl
        canonical_ = payload[pos:pos + cl]
        pos += cl
        req = payload[pos:pos + ql] or None
        pos += ql
        resp = payload[pos:pos + rl] or None
        try:
            record = AuditRecord.from_bytes(canonical_)
        except RecordError as e:
            raise FrameError(f"frame holds no valid record: {e}") from None
        record.hash = digest.hex()
        return cls(writer, seq, digest.hex(), canonical_, req, resp, record)


def split_frame_header(header: bytes) -> tuple[int, int]:
    """(payload length, crc) of a frame header; FrameError when the length is absurd (garbage)."""
    length, crc = _FRAME.unpack(header)
    if length > MAX_FRAME or length < _HEAD.size:
        raise FrameError(f"bad frame length {length}")
    return length, crc


def peek_head(payload: bytes) -> tuple[str, int, str]:
    """(writer, seq, hash) of a frame payload without parsing its JSON: used when recovering the spool."""
    digest, seq, wl, _cl, _ql, _rl = _HEAD.unpack_from(payload)
    return payload[_HEAD.size:_HEAD.size + wl].decode(), seq, digest.hex()
