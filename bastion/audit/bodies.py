"""Message bodies: capture on the hot path, bounded decoding, compression at rest.

Capture (`BodyCapture`) runs on the proxy's event loop, inside mitmproxy's stream callable, so it does the
least possible: update a SHA-256, count bytes, and keep at most `cap` bytes of the raw (still
Content-Encoded) body. Everything else (undoing gzip/deflate/br/zstd, redaction, compression) happens later
on the audit writer's thread.

Decoding is where a decompression bomb would hurt: 1 MB of gzip can claim to be 1 GB of zeros. Every decoder
here produces at most `limit + 1` bytes and stops; memory stays within the limit plus the decoder's own window
(brotli 16 MiB at most, zstd capped at 8 MiB as RFC 9659 requires of HTTP senders).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import brotli
import zstandard

ZSTD_MAX_WINDOW = 8 << 20
STORE_LEVEL = 1  # zlib level for bodies at rest: most of level 6's ratio on JSON/text at a fraction of its CPU


@dataclass(frozen=True, slots=True)
class CapturedBody:
    """A body as the proxy saw it: the first `len(raw)` bytes of `size`, and the digest of all of them.

    `complete` is False when the transfer broke off (client or upstream gone), so `size` is what arrived.
    """

    raw: bytes
    size: int
    sha256: str
    encoding: str = ""
    mime_type: str = ""
    complete: bool = True

    @property
    def cut(self) -> bool:
        """True when only a prefix of the raw body was kept."""
        return len(self.raw) < self.size


class BodyCapture:
    """Incremental capture for a (possibly streamed) body. Not thread-safe; one per body.

    `feed(chunk)` costs O(len(chunk)) (one hash update, one bounded copy) and never buffers more than `cap`
    bytes in total; call it from mitmproxy's `flow.response.stream` callable or once with a whole body.
    `finish()` returns the `CapturedBody` to hand to the audit writer.
    """

    __slots__ = ("_buf", "_cap", "_done", "_encoding", "_hash", "_mime", "_size")

    def __init__(self, cap: int, *, content_encoding: str = "", content_type: str = "") -> None:
        if cap < 0:
            raise ValueError("cap must not be negative")
        self._cap = cap
        self._buf = bytearray()
        self._hash = hashlib.sha256()
        self._size = 0
        self._encoding = content_encoding.strip().lower()
        self._mime = content_type.strip()
        self._done = False

    def feed(self, chunk: bytes) -> None:
        if self._done:
            raise RuntimeError("BodyCapture.feed after finish")
        n = len(chunk)
        if not n:
            return
        self._hash.update(chunk)
        self._size += n
        room = self._cap - len(self._buf)
        if room > 0:
            self._buf += chunk if n <= room else memoryview(chunk)[:room]

    def finish(self, *, complete: bool = True) -> CapturedBody:
        self._done = True
        return CapturedBody(bytes(self._buf), self._size, self._hash.hexdigest(), self._encoding, self._mime,
                            complete)


def capture_bytes(data: bytes, cap: int, *, content_encoding: str = "", content_type: str = "",
                  complete: bool = True) -> CapturedBody:
    """A whole, already received body (not streamed)."""
    if len(data) <= cap:  # the usual case, kept whole: skip BodyCapture's buffer and its two copies
        raw = bytes(data)  # no copy for bytes; a bytearray must not change behind the writer's back
        return CapturedBody(raw, len(raw), hashlib.sha256(raw).hexdigest(), content_encoding.strip().lower(),
                            content_type.strip(), complete)
    cap_ = BodyCapture(cap, content_encoding=content_encoding, content_type=content_type)
    cap_.feed(data)
    return cap_.finish(complete=complete)


# --- decoding --------------------------------------------------------------------------------------------------

class DecodeError(Exception):
    """The Content-Encoding is unknown or the data does not decode."""


@dataclass(frozen=True, slots=True)
class Decoded:
    data: bytes
    cut: bool  # more output existed than `limit`, or the input ended mid-stream


def decode_content(raw: bytes, encoding: str, limit: int) -> Decoded:
    """Undo `encoding` (a Content-Encoding list, applied in order, so undone in reverse), keeping at most
    `limit` bytes of output. Raises DecodeError for an unknown coding or corrupt data."""
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if len(codings) > 3:
        raise DecodeError(f"too many content codings: {encoding!r}")
    data, cut = raw, False
    for coding in reversed(codings):
        step = _DECODERS.get(coding)
        if step is None:
            raise DecodeError(f"unsupported content-encoding {coding!r}")
        decoded = step(data, limit)
        data, cut = decoded.data, cut or decoded.cut
    if len(data) > limit:
        data, cut = data[:limit], True
    return Decoded(data, cut)


def _inflate(data: bytes, wbits: int, limit: int, *, members: bool) -> Decoded:
    out = bytearray()
    d = zlib.decompressobj(wbits)
    buf = data
    while True:
        room = limit + 1 - len(out)
        out += d.decompress(buf, room)
        if len(out) > limit:
            return Decoded(bytes(out[:limit]), True)
        if d.eof:
            buf = d.unused_data
            if members and buf.strip(b"\0"):  # concatenated gzip members form one body
                d = zlib.decompressobj(wbits)
                continue
            return Decoded(bytes(out), False)
        buf = d.unconsumed_tail
        if not buf:
            return Decoded(bytes(out), True)  # input ended before the stream did


def _gzip(data: bytes, limit: int) -> Decoded:
    try:
        return _inflate(data, 16 + zlib.MAX_WBITS, limit, members=True)
    except zlib.error as e:
        raise DecodeError(f"gzip: {e}") from None


def _deflate(data: bytes, limit: int) -> Decoded:
    # RFC 9110 "deflate" is zlib-wrapped, but some servers send raw deflate; accept both like browsers do.
    try:
        return _inflate(data, zlib.MAX_WBITS, limit, members=False)
    except zlib.error:
        pass
    try:
        return _inflate(data, -zlib.MAX_WBITS, limit, members=False)
    except zlib.error as e:
        raise DecodeError(f"deflate: {e}") from None


def _brotli(data: bytes, limit: int) -> Decoded:
    d = brotli.Decompressor()
    try:
        out = bytearray(d.process(data, output_buffer_limit=limit + 1))
        while len(out) <= limit and not d.can_accept_more_data():
            more = d.process(b"", output_buffer_limit=limit + 1 - len(out))
            if not more:
                break
            out += more
    except brotli.error as e:
        raise DecodeError(f"br: {e}") from None
    if len(out) > limit:
        return Decoded(bytes(out[:limit]), True)
    return Decoded(bytes(out), not d.is_finished())


def _zstd(data: bytes, limit: int) -> Decoded:
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    out = bytearray()
    try:
        with dctx.stream_reader(data, read_across_frames=True) as reader:
            while len(out) <= limit:
                chunk = reader.read(limit + 1 - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as e:
        raise DecodeError(f"zstd: {e}") from None
    if len(out) > limit:
        return Decoded(bytes(out[:limit]), True)
    # A cut input simply yields less; the caller knows from the capture whether the input was whole.
    return Decoded(bytes(out), False)


_DECODERS = {"gzip": _gzip, "x-gzip": _gzip, "deflate": _deflate, "br": _brotli, "zstd": _zstd}


# --- at rest ---------------------------------------------------------------------------------------------------

def pack(data: bytes) -> bytes:
    """Compress a stored body for the spool and the sinks."""
    return zlib.compress(data, STORE_LEVEL)


def unpack(blob: bytes, expected: int) -> bytes:
    """Inflate a stored body, refusing to produce more than `expected` bytes: a tampered store must not be able
    to plant a decompression bomb in `show` or `verify`. Raises DecodeError when the blob is bad."""
    try:
        d = zlib.decompressobj()
        out = d.decompress(blob, expected + 1)
    except zlib.error as e:
        raise DecodeError(f"stored body: {e}") from None
    if len(out) > expected or not d.eof:
        raise DecodeError("stored body does not match its recorded size")
    return out
