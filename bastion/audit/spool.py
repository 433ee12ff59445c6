"""The local append-only spool every record reaches before any sink.

Why: the sink (SQLite, PostgreSQL, files) may be slow or down; the proxy must neither block nor lose records.
The writer's thread appends finished records here (one `os.write` each, so a record is in the kernel's page
cache, and survives the process being killed, the moment it is written) and `fdatasync`s at least every
`sync_interval` (200 ms by default) for power loss. The drain reads synced records in order and hands them to
the sink; once the sink has them it moves a cursor, and segments behind the cursor are deleted.

Directory layout (`<home>/spool`):

    lock                  flock'd by the one process using the spool (a second one gets SpoolLockedError)
    writer.id             this spool's writer id: the name of its hash chain, kept across restarts
    redaction.key         32 random bytes: HMAC key for redaction tags (never leaves this directory)
    cursor.json           first undrained position, and the chain head of the last drained record
    seg-<n>.spool         segments: an 8-byte magic, then frames (see `bastion.audit.entry`)

Recovery after a crash: the newest segment is scanned, a torn last frame is cut off, and the chain continues
from the last whole frame. If the chain's head cannot be found (the segments were deleted by hand), the spool
starts a new writer id rather than reuse sequence numbers a sink may already hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from bastion.audit.chain import ChainHead
from bastion.audit.entry import FRAME_HEADER, Entry, FrameError, peek_head, split_frame_header
from bastion.private_files import fsync_dir, tighten

log = logging.getLogger("bastion.audit")

MAGIC = b"BSTNSPL1"
DEFAULT_SEGMENT_BYTES = 16 << 20
SPOOL_SLOTS = 16
"""Spools one `--home` can hold: each Bastion process sharing a home takes the first free slot."""
_WRITE_BATCH = 1 << 20  # most bytes `append_many` joins into one write (bounds the copy it makes)


def spool_slot(home: Path, index: int) -> Path:
    """The directory of spool slot `index` under `home`: `spool`, then `spool.1` ... `spool.15`. The audit
    worker opens the first free one; `verify` reads the local checkpoint of each."""
    return home / "spool" if index == 0 else home / f"spool.{index}"


class SpoolLockedError(OSError):
    """Another process is using this spool directory."""


class Position(NamedTuple):
    """A place in the spool: segment number and byte offset. Positions compare in spool order."""

    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class SpoolState:
    """What `Spool.open` recovered."""

    writer: str
    head: ChainHead  # last record written by this writer (the chain continues from here)
    key: bytes  # redaction HMAC key
    cursor: Position  # first undrained frame
    pending: int  # frames not yet drained
    drained: ChainHead | None  # last drained record, as the cursor file says


def new_writer_id() -> str:
    return "w" + secrets.token_hex(8)


class Spool:
    """One spool directory. `append`/`sync` belong to the writer thread, `read`/`commit` to the drain; the two
    sides share only the synced position (under a lock) and never touch the same segment file descriptor."""

    def __init__(self, directory: str | os.PathLike[str], *, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._active = 0
        self._size = 0
        self._synced = Position(0, 0)
        self._disk = 0

    # --- opening and recovery --------------------------------------------------------------------------------

    def open(self) -> SpoolState:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tighten(self.directory)  # every file in it is created 0600; a directory left wider is narrowed
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolLockedError(f"another Bastion process is using the audit spool {self.directory}") from None
        try:
            return self._recover()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> SpoolState:
        key = self._secret_file("redaction.key", lambda: secrets.token_bytes(32))
        id_path = self.directory / "writer.id"
        writer = id_path.read_text().strip() if id_path.exists() else None
        cursor_info = read_cursor_file(self.directory)
        segments = self._segments()

        head: ChainHead | None = None
        for n in reversed(segments):
            last = self._scan_tail(n, truncate=n == segments[-1])
            if last is not None:
                if last.writer == writer:
                    head = last
                break
        if head is None and writer and cursor_info and cursor_info.drained and cursor_info.drained.writer == writer:
            head = cursor_info.drained
        if writer is None or head is None:
            if writer is not None:
                log.warning("audit spool %s: cannot find where chain %s ended; starting chain under a new writer "
                            "id", self.directory, writer)
            writer = new_writer_id()
            _atomic_write(id_path, writer.encode() + b"\n")
            head = ChainHead.empty(writer)

        floor = cursor_info.position.segment if cursor_info else 0
        if segments and segments[-1] >= floor:
            self._open_active(segments[-1])
        else:
            self._open_active(max(floor + 1, 1), create=True)
            segments = [*segments, self._active]
        cursor = cursor_info.position if cursor_info else Position(segments[0], len(MAGIC))
        if cursor.segment not in segments:
            cursor = Position(min(n for n in segments if n > cursor.segment), len(MAGIC))
        self._synced = Position(self._active, self._size)
        self._disk = sum(self._seg_path(n).stat().st_size for n in segments if self._seg_path(n).exists())
        pending = sum(1 for _ in self._walk(cursor))
        return SpoolState(writer, head, key, cursor, pending, cursor_info.drained if cursor_info else None)

    def _secret_file(self, name: str, make: Callable[[], bytes]) -> bytes:
        path = self.directory / name
        if path.exists():
            data = path.read_bytes()
            if len(data) >= 16:
                return data
        data = make()
        _atomic_write(path, data)
        return data

    def _segments(self) -> list[int]:
        out = []
        for p in self.directory.glob("seg-*.spool"):
            with contextlib.suppress(ValueError):
                out.append(int(p.name[4:-6]))
        return sorted(out)

    def _seg_path(self, n: int) -> Path:
        return self.directory / f"seg-{n:012d}.spool"

    def _scan_tail(self, n: int, *, truncate: bool) -> ChainHead | None:
        """The last whole frame of segment `n`; cut a torn tail off when `truncate`."""
        path = self._seg_path(n)
        last: ChainHead | None = None
        end = len(MAGIC)
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                log.error("audit spool: %s is not a spool segment; ignoring it", path)
                return None
            for offset, payload in _frames(f, len(MAGIC)):
                if payload is None:
                    break
                writer, seq, digest = peek_head(payload)
                last = ChainHead(writer, seq, digest)
                end = offset
            size = f.seek(0, os.SEEK_END)
        if truncate and size > end:
            log.warning("audit spool: dropping %d bytes of a torn record at the end of %s", size - end, path)
            os.truncate(path, end)
        return last

    def _walk(self, start: Position) -> Iterator[Position]:
        """Positions after each frame from `start` to the end of the spool (for counting the backlog)."""
        for n in self._segments():
            if n < start.segment:
                continue
            with open(self._seg_path(n), "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    continue
                off = start.offset if n == start.segment else len(MAGIC)
                for end, payload in _frames(f, off, check=False):
                    if payload is None:
                        break
                    yield Position(n, end)

    # --- writer side -----------------------------------------------------------------------------------------

    def _open_active(self, n: int, *, create: bool = False) -> None:
        path = self._seg_path(n)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        size = os.fstat(fd).st_size
        if size < len(MAGIC):
            os.ftruncate(fd, 0)
            _write_all(fd, MAGIC)
            os.fsync(fd)
            size = len(MAGIC)
            fsync_dir(self.directory)
        self._fd, self._active, self._size = fd, n, size

    def append(self, frame: bytes) -> tuple[Position, Position]:
        """Write one frame; returns where it starts and ends. On failure the segment is cut back to where it
        was, so no torn frame remains."""
        spans, error = self.append_many([frame])
        if error is not None:
            raise error
        return spans[0]

    def append_many(self, frames: Sequence[bytes]) -> tuple[list[tuple[Position, Position]], OSError | None]:
        """Write frames in order, with one `os.write` per run of frames that fits the active segment (and
        `_WRITE_BATCH` bytes) instead of one per frame: the writer thread then pays a system call, and a
        round trip for the GIL, per batch. Returns where each written frame starts and ends, and the error
        that stopped the rest (a prefix is written; the failed run is cut back, so no torn frame remains)."""
        spans: list[tuple[Position, Position]] = []
        i = 0
        while i < len(frames):
            if self._fd is None:
                return spans, OSError("audit spool is closed")
            try:
                if self._size + len(frames[i]) > self.segment_bytes and self._size > len(MAGIC):
                    self._rotate()
            except OSError as e:
                return spans, e
            j, end = i + 1, self._size + len(frames[i])  # a frame larger than a segment goes alone
            while j < len(frames) and end + len(frames[j]) <= min(self.segment_bytes, self._size + _WRITE_BATCH):
                end += len(frames[j])
                j += 1
            start = self._size
            assert self._fd is not None
            try:
                _write_all(self._fd, frames[i] if j == i + 1 else b"".join(frames[i:j]))
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                return spans, e
            for frame in frames[i:j]:
                spans.append((Position(self._active, self._size), Position(self._active, self._size + len(frame))))
                self._size += len(frame)
            with self._lock:
                self._disk += end - start
            i = j
        return spans, None

    def sync(self) -> Position:
        """Make everything appended durable and visible to the drain."""
        if self._fd is None:
            return self._synced
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(self._fd)
        with self._lock:
            self._synced = Position(self._active, self._size)
            return self._synced

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self._open_active(self._active + 1, create=True)
        with self._lock:
            self._synced = Position(self._active, self._size)
            self._disk += self._size

    @property
    def synced(self) -> Position:
        with self._lock:
            return self._synced

    @property
    def disk_bytes(self) -> int:
        """Bytes in segment files still on disk (drained segments are deleted, so this is about the backlog)."""
        with self._lock:
            return self._disk

    # --- drain side ------------------------------------------------------------------------------------------

    def read(self, cursor: Position, *, limit: int = 500, max_bytes: int = 16 << 20) -> tuple[list[Entry], Position]:
        """Up to `limit` synced entries from `cursor` on, and the position after the last one."""
        synced = self.synced
        entries: list[Entry] = []
        seg, off = cursor
        budget = max_bytes
        while len(entries) < limit and budget > 0 and Position(seg, off) < synced:
            path = self._seg_path(seg)
            end = synced.offset if seg == synced.segment else None
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed below; the loop may move on to the next segment
            except FileNotFoundError:
                if seg >= synced.segment:
                    break
                seg, off = seg + 1, len(MAGIC)
                continue
            with f:
                finished = False
                for next_off, payload in _frames(f, off):
                    if payload is None:  # end of file, or a corrupt frame: nothing after it is trustworthy
                        finished = True
                        if end is not None and next_off < end:
                            log.error("audit spool: corrupt record in %s at %d; skipping to %d", path, next_off, end)
                            off = end
                        break
                    try:
                        entries.append(Entry.from_payload(payload))
                    except FrameError as e:
                        log.error("audit spool: unreadable record in %s at %d skipped: %s", path, off, e)
                    off = next_off
                    budget -= len(payload)
                    if (end is not None and off >= end) or len(entries) >= limit or budget <= 0:
                        break
                else:
                    finished = True
            if end is None and finished:
                seg, off = seg + 1, len(MAGIC)
            elif end is not None and off >= end:
                break
        return entries, Position(seg, off)

    def commit(self, cursor: Position, drained: ChainHead | None, sink: str | None = None) -> None:
        """Everything before `cursor` is in the sink: remember that and delete the drained segments.

        The cursor is only fsync'd before segments are deleted: a cursor lost to a power cut merely makes the
        drain send some records again, which every sink ignores (they are keyed by writer and seq), but once
        segments are gone the cursor is the only record of where the chain stood. `sink` names the store the
        records went to, so that `verify` knows whether this cursor speaks about the store it checks."""
        doomed = [n for n in self._segments() if n < min(cursor.segment, self._active)]
        _atomic_write(self.directory / "cursor.json", json.dumps({
            "segment": cursor.segment, "offset": cursor.offset,
            "writer": drained.writer if drained else None, "seq": drained.seq if drained else None,
            "hash": drained.hash if drained else None, "sink": sink,
        }).encode(), sync=bool(doomed))
        for n in doomed:
            path = self._seg_path(n)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            with self._lock:
                self._disk -= size

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


# --- helpers shared with read-only users (verify, the CLI) ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class CursorInfo:
    position: Position
    drained: ChainHead | None
    sink: str | None = None


def read_cursor_file(directory: Path) -> CursorInfo | None:
    """The drain cursor of a spool directory, without locking it (safe while a writer runs)."""
    try:
        d = json.loads((directory / "cursor.json").read_bytes())
        pos = Position(int(d["segment"]), int(d["offset"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    drained = None
    if isinstance(d.get("writer"), str) and isinstance(d.get("seq"), int) and isinstance(d.get("hash"), str):
        drained = ChainHead(d["writer"], d["seq"], d["hash"])
    sink = d.get("sink") if isinstance(d.get("sink"), str) else None
    return CursorInfo(pos, drained, sink)


def _frames(f: BinaryIO, offset: int, *, check: bool = True) -> Iterator[tuple[int, bytes | None]]:
    """(offset after the frame, payload) for each whole frame from `offset`; a final (offset, None) marks where
    the readable data ends (end of file, a torn frame, or a CRC mismatch)."""
    f.seek(offset)
    while True:
        header = f.read(FRAME_HEADER)
        if len(header) < FRAME_HEADER:
            yield offset, None
            return
        try:
            length, crc = split_frame_header(header)
        except FrameError:
            yield offset, None
            return
        if check:
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                yield offset, None
                return
        else:
            here = f.tell()
            if f.seek(length, os.SEEK_CUR) > os.fstat(f.fileno()).st_size:
                yield offset, None
                return
            f.seek(here)
            payload = f.read(min(length, 64))  # enough for the fixed header; callers only count
            f.seek(here + length)
        offset += FRAME_HEADER + length
        yield offset, payload


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _atomic_write(path: Path, data: bytes, *, sync: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)
