"""Frames between `bastion serve` and its audit worker process (`bastion.audit.worker`).

A frame is a 5-byte header (payload length, kind) and a pickle of plain values: exchange snapshots,
settings, counters. Pickle is safe here because both ends are Bastion itself and the pipes are private to the
two processes (nothing else can write to them); it is also the cheapest encoding for tuples of bytes and
strings, which matters because the proxy pays for encoding on its event loop.

Proxy -> worker: HELLO (settings), EXCHANGE (one snapshot), CONFIGURE, FLUSH (id), CLOSE (seconds to drain).
Worker -> proxy: READY (writer facts) or FAILED (message, exit code), STATUS (counters), FLUSHED (id, ok),
CLOSED (ok).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

from bastion.audit.settings import AuditConfig

HELLO, EXCHANGE, CONFIGURE, FLUSH, CLOSE = b"H", b"X", b"C", b"F", b"Q"
READY, FAILED, STATUS, FLUSHED, CLOSED = b"K", b"E", b"S", b"D", b"Z"

_HEAD = struct.Struct(">Ic")


@dataclass(frozen=True, slots=True)
class Hello:
    """What the proxy tells a new worker."""

    audit_url: str
    home: str
    config: AuditConfig
    drain_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Ready:
    writer_id: str
    spool: str
    display_url: str


@dataclass(frozen=True, slots=True)
class Status:
    """`received`: EXCHANGE frames taken so far; `backlog`: records taken, not yet in the sink; `refusal`: why
    records cannot be taken now (None when they can); the rest: this worker's metric totals."""

    received: int
    backlog: int
    refusal: str | None
    records: float
    write_errors: float
    dropped: tuple[tuple[str, float], ...]


class ProtocolError(Exception):
    """The other end sent something that is not a frame (it crashed mid-write, or is not Bastion)."""


def frame(kind: bytes, value: Any) -> bytes:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(payload), kind) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, Any] | None:
    """The next frame, or None at a clean end of the stream (the other process closed it or exited)."""
    try:
        head = await reader.readexactly(_HEAD.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError("the stream ended inside a frame header") from None
    length, kind = _HEAD.unpack(head)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("the stream ended inside a frame") from None
    try:
        return kind, pickle.loads(payload)  # noqa: S301 - written by Bastion's own other process, see above
    except Exception as e:
        raise ProtocolError(f"a frame did not decode: {e}") from None


class FrameBuffer:
    """Frames from a byte stream read in arbitrary chunks: `feed` returns every frame completed so far.

    Reading whatever the pipe holds and decoding all of it at once costs one wake-up per batch instead of
    two reads per frame.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        """Whether bytes of an unfinished frame are waiting."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[tuple[bytes, Any]]:
        buf = self._buf
        buf += data
        out: list[tuple[bytes, Any]] = []
        pos, end = 0, len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= _HEAD.size:
                length, kind = _HEAD.unpack_from(buf, pos)
                start = pos + _HEAD.size
                if end - start < length:
                    break
                try:
                    value = pickle.loads(view[start:start + length])  # noqa: S301 - see the module docstring
                except Exception as e:
                    raise ProtocolError(f"a frame did not decode: {e}") from None
                out.append((kind, value))
                pos = start + length
        finally:
            view.release()
        del buf[:pos]
        return out
