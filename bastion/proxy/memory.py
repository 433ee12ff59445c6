"""Give the memory of finished calls back: drop body bytes as soon as nothing needs them, and make sure the C
allocator returns large freed buffers to the operating system.

Why both:

- A finished flow is not freed when its call ends: mitmproxy's flow, layer and stream objects reference each
  other, so the flow (and the bodies it holds) waits for Python's cyclic garbage collector, which may not run a
  full collection for a long time. Dropping the body bytes when the call is over frees the large part at once,
  whatever happens to the flow's shell (`ReleaseBodies`, the last pipeline stage).
- glibc's malloc raises its mmap threshold after a large block is freed (up to 32 MiB), so later bodies of that
  size come from the heap, and a heap with a live object above freed space cannot shrink: RSS stays at its
  peak after the bodies are long gone. `tune_allocator()` pins the threshold, so every buffer above 1 MiB is
  its own mapping and goes back to the system the moment it is freed. (No-op on other C libraries.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from mitmproxy import http

from bastion.proxy import flowmeta

log = logging.getLogger("bastion.proxy")

MMAP_THRESHOLD = 1 << 20
"""Allocations at least this large get their own mapping (returned to the system when freed)."""

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Pin glibc's mmap and trim thresholds; True when applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the thresholds; freed bodies may stay in RSS")
    return ok


class ReleaseBodies:
    """Pipeline stage, after every other one: once a call's record is taken and its answer is on its way,
    nothing reads the request body again. (The response body is still being sent when `response` runs, so it
    stays; answers larger than a megabyte are streamed and never held whole anyway.)"""

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            _drop_request_body(flow)

    def error(self, flow: http.HTTPFlow) -> None:  # mitmproxy sends its own answer (or none) after an error
        _drop_request_body(flow)
        if flow.response is not None:
            flow.response.data.content = None


def _drop_request_body(flow: http.HTTPFlow) -> None:
    flow.request.data.content = None
    flow.metadata.pop(flowmeta.FACTS, None)  # what the rules saw holds the body too (and its parsed JSON)
