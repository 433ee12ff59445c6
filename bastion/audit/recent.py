"""The window of recently spooled entries that lets the drain skip re-reading the spool.

`AuditWriter` has two concurrency domains: the spool thread writes records to the spool, and the drain task on
the event loop reads them back and hands them to the sink. Most of the time the drain wants exactly what the
spool thread just wrote, so the spool thread also keeps those entries here and the drain takes its batches
from memory. This class is the one thing both sides touch, and it owns the lock that makes that safe: the
spool thread only `add`s, the drain only `take`s.

The window holds entries contiguous in spool order, bounded in bytes (oldest dropped first). When the drain's
cursor is not at the window's start (after a restart, or when a long sink outage pushed entries out), `take`
returns None and the drain reads the spool files instead.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from bastion.audit.entry import Entry
from bastion.audit.spool import Position


class Spooled(NamedTuple):
    """One entry as written: where its frame starts and ends in the spool, and the frame's size in bytes."""

    start: Position
    end: Position
    entry: Entry
    size: int


class RecentWindow:
    """Recently spooled entries, at most `max_bytes` of frames; safe to share between the two sides."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: deque[Spooled] = deque()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, spooled: Iterable[Spooled]) -> None:
        """Spool thread: keep entries just written (in spool order, following the last ones added), then drop
        the oldest until the window fits its bound again."""
        with self._lock:
            for item in spooled:
                self._entries.append(item)
                self._bytes += item.size
            while self._bytes > self._max_bytes:
                self._bytes -= self._entries.popleft().size

    def take(self, cursor: Position, synced: Position, limit: int) -> tuple[list[Entry], Position] | None:
        """Drain: up to `limit` entries starting exactly at `cursor` and ending at or before `synced` (only
        synced records may reach the sink), with the position after the last one; None when the window does
        not start at `cursor` or holds nothing synced there. Entries before `cursor` are drained: dropped."""
        with self._lock:
            entries = self._entries
            while entries and entries[0].start < cursor:
                self._bytes -= entries.popleft().size
            if not entries or entries[0].start != cursor:
                return None
            out: list[Entry] = []
            end = cursor
            for start, stop, entry, _ in entries:
                if start != end or stop > synced or len(out) >= limit:
                    break
                out.append(entry)
                end = stop
        return (out, end) if out else None
