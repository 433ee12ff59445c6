"""Let other threads run while a long policy load holds the GIL.

The proxy loads a new policy on a worker thread, but Python code on that thread holds the GIL. A thread that
wants it back (the event loop, woken by a timer or a socket) waits until the holder lets go, which a busy
thread only does when the interpreter forces it, after `sys.getswitchinterval()` (5 ms): every wake-up of the
loop is late by up to that much for as long as the load runs, and more when the loop needs several turns.
Changing the switch interval would change it for the whole process, so the loader lets go by itself instead:
`Pacer.pace()`, called between small units of work (a rule, a chunk of rules to validate), sleeps for zero
seconds once a millisecond has passed since it last did. `time.sleep(0)` releases the GIL; a waiting thread
takes it at once, and the loader continues when that thread waits again.

Measured with a 1 ms sleep probe on the loop while a thread ran pure Python for one second (2 vCPUs): wake-ups
late by 5.4 ms at the median and 9 ms at the 99th percentile without pacing; 0.1 ms and 1.5 ms with it.

Pacing cannot split what runs as one C call with the GIL held: a garbage collection (a full one walks every
object the process tracks, the policies' included; bastion/proxy/longlived.py keeps those off a reload) and
the release of a large structure (the previous policy, the parsed files once compiled), which is one cascade
of deallocations unless `release_paced` takes it apart. bench/reload_lag_bench.py measures what is left.
"""

from __future__ import annotations

import gc
import sys
import threading
import time

SLICE_S = 0.001  # the longest stretch between two chances for another thread to take the GIL


class Pacer:
    """Call `pace()` often (it is cheap: one clock read); it yields the GIL once per `SLICE_S`.

    A yield costs 0.1 ms (`time.sleep(0)` is a real sleep, rounded up by the kernel; shorter ways to release
    the GIL, such as `os.sched_yield()`, take it back before a waiting thread wakes, and starve that thread
    worse than not yielding at all), and more once the thread is back on a cold CPU: loading 10,000 rules on
    a worker thread took 0.89 s paced against 0.70 s unpaced (2 vCPUs). So on the main thread, where the
    loader runs for `bastion check` and nothing waits for it to finish a turn, pacing is off and free."""

    __slots__ = ("_next", "enabled")

    def __init__(self, enabled: bool | None = None) -> None:
        """`enabled`: None (the default) paces when not on the main thread."""
        if enabled is None:
            enabled = threading.current_thread() is not threading.main_thread()
        self.enabled = enabled
        self._next = time.perf_counter() + SLICE_S if enabled else float("inf")

    def pace(self) -> None:
        if time.perf_counter() >= self._next:
            time.sleep(0)
            self._next = time.perf_counter() + SLICE_S


def release_paced(holder: list[object]) -> int:
    """Free the graph reachable from `holder[0]` (the caller's only reference, which this empties) one object
    at a time, pacing between objects; returns how many objects it freed.

    Nothing is modified: the walk only takes references (`gc.get_referents`) and drops them, so an object is
    freed here exactly when it would have been freed anyway, just in a different order. An object someone else
    still holds (a rule a request is still using, a class, an interned string) has more references than the
    walk's own and is left alone; it is freed by its last holder as usual."""
    pacer = Pacer()
    if not pacer.enabled:  # nothing waits for this thread: plain deallocation is cheaper
        holder.clear()
        return 0
    stack = [holder.pop()]
    freed = 0
    while stack:
        obj = stack.pop()
        if sys.getrefcount(obj) > 2:  # the local name and the call's argument: anything more is another holder
            continue
        stack.extend(gc.get_referents(obj))
        del obj
        freed += 1
        pacer.pace()
    return freed
