"""Keep a large policy out of the garbage collector's way, so that a reload does not stall the proxy.

A compiled policy is a big, long-lived, acyclic graph: about 12 tracked objects per rule, 120,000 for 10,000
rules. A full garbage collection walks every tracked object in the process while holding the GIL, whichever
thread started it, so every request the event loop serves waits for it: about 7 ms per 1,000 rules on
2 vCPUs. Building a new policy allocates a policy's worth of objects, which used to set off several full
collections during each reload, each walking the old policy and the new one (260 ms at 10,000 rules).

- `full_collections_deferred`: while a policy is built, no automatic full collection runs (young ones still
  do, more often than usual, so each stays short). The next full collection after the reload walks the new
  policy once, as any full collection in a process holding that policy does.
- `settle`: at startup, before the first request, everything alive (modules, the first policy, the stores) is
  moved into the collector's permanent generation, which collections skip. A proxy that is never reloaded
  never walks its policy again. This is not repeated at reloads: what is in flight then (mitmproxy's flows
  and connections form reference cycles) would be kept forever once unreachable, and with it the policy a
  flow holds; measured at 5 MB per reload of a 2,000-rule policy under traffic.

Freeing the previous policy is the other long stall (57 ms at 10,000 rules, 235 ms at 50,000, as one cascade
of deallocations): `bastion.policy.pacing.release_paced` frees it object by object on a worker thread.
bench/reload_lag_bench.py measures the loop's lag during a reload and the next full collection after it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_NEVER = 2**30  # a generation-2 threshold no run reaches
# Middle-generation collections every other young one, not every tenth: each walks what survived since the last,
# and a build makes nothing but survivors (2,000 x 10 of them took 8-13 ms a collection; 2,000 x 2, about 2 ms).
_MIDDLE_EVERY = 2
_lock = threading.Lock()
_deferring = 0
_saved_threshold: tuple[int, int, int] = (0, 0, 0)


@contextmanager
def full_collections_deferred() -> Iterator[None]:
    """No automatic full collection inside the block (process-wide; nested and concurrent uses are counted)."""
    global _deferring, _saved_threshold
    with _lock:
        if _deferring == 0:
            _saved_threshold = gc.get_threshold()
            gc.set_threshold(_saved_threshold[0], min(_saved_threshold[1], _MIDDLE_EVERY), _NEVER)
        _deferring += 1
    try:
        yield
    finally:
        with _lock:
            _deferring -= 1
            if _deferring == 0:
                gc.set_threshold(*_saved_threshold)


def settle() -> None:
    """At startup, before the first request: collect once, then move everything alive into the permanent
    generation (see the module doc for why only then)."""
    gc.collect()
    gc.freeze()
