"""Frames between `bastion serve` and its audit worker process (`bastion.audit.worker`).

A frame is a 5-byte header (payload length, kind) and a pickle of plain values: exchange snapshots,
settings, counters. Pickle is safe here because both ends are Bastion itself and the pipes are private to the
two processes (nothing else can write to them); it is also the cheapest encoding for tuples of bytes and
strings, which matters because the proxy pays for encoding on its event loop.

Each side reads the other's pipe on its own timer (`PolledPipe`) rather than waiting on it: a pipe write wakes a
waiting reader with the kernel's "sync" hint, which places the reader on the writer's CPU. Waiting on its pipe,
the worker would be pulled onto the proxy's core with every batch (and the proxy onto the worker's with every
status report), and the two would take turns on one core while another sits idle.

Proxy -> worker: HELLO (settings), EXCHANGE (one snapshot), CONFIGURE, FLUSH (id), CLOSE (seconds to drain).
Worker -> proxy: READY (writer facts) or FAILED (message, exit code), STATUS (counters), FLUSHED (id, ok),
CLOSED (ok).
"""

from __future__ import annotations

import os
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
    store_url: str | None = None  # the shared store, where the worker witnesses its signed checkpoints
    otlp_url: str | None = None  # the OTLP/HTTP traces URL: one span per record (`bastion.audit.tracing`)
    service_name: str = "bastion"  # the spans' `service.name`


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


POLL_EVERY = 0.05
"""Seconds between two looks at the other side's pipe."""


class PolledPipe:
    """The read end of a pipe, read when its owner looks (see the module docstring); the writer's side holds
    what arrives meanwhile (the proxy enlarges the pipe to the worker)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.frames = FrameBuffer()
        os.set_blocking(fd, False)

    def read_available(self) -> tuple[list[tuple[bytes, Any]], bool]:
        """(the frames completed by everything readable now, whether the stream has ended)."""
        chunks: list[bytes] = []
        ended = False
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            if not data:
                ended = True
                break
            chunks.append(data)
        return self.frames.feed(b"".join(chunks)), ended

    def close(self) -> None:
        os.close(self.fd)
