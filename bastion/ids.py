"""Request ids: time-ordered (UUIDv7 layout) so audit records sort by creation and ids are unguessable.

The id is what the agent sees in `X-Bastion-Request-Id` and what the audit log, the dashboard and approvals
use to find the call again.
"""

from __future__ import annotations

import os
import time
import uuid


def new_request_id() -> str:
    """A UUIDv7 string: 48-bit Unix milliseconds, version and variant bits, 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 62) & 0xFFF) << 64  # 12 bits rand_a
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)  # 62 bits rand_b
    return str(uuid.UUID(int=value))
