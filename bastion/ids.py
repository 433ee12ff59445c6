"""Request ids and clock readings: one id generator for the whole process.

The id an agent sees in `X-Bastion-Request-Id` is the id of its audit record, so it must be unique across a
fleet of sidecars without coordination, and sort by time so that listings and exports page cheaply. A UUIDv7
(RFC 9562) gives both, reads like any UUID in logs and SIEMs, and costs about a microsecond to make.
"""

from __future__ import annotations

import secrets
import threading
import time

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_request_id() -> str:
    """A UUIDv7 string: 48-bit Unix milliseconds, a 12-bit counter, 62 random bits.

    The counter (RFC 9562 §6.2, method 1) starts at a random value below 2048 each millisecond and counts up,
    so ids made by one process sort in the order they were made even within a millisecond; if the wall clock
    steps back, the last millisecond is reused rather than going backwards. Safe to call from any thread.
    """
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = secrets.randbits(11)
        else:
            _counter += 1
            if _counter > 0xFFF:  # 2048+ ids in one millisecond: borrow the next one
                _last_ms += 1
                _counter = 0
        ms, counter = _last_ms, _counter
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | secrets.randbits(62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_us() -> int:
    """Wall-clock time in Unix microseconds: records keep integers only, so their encoding is exact."""
    return time.time_ns() // 1000
