"""Event-loop lag while the proxy reloads a large policy (10,000 and 50,000 generated rules).

The proxy reloads its rules on a worker thread (`PolicyState.reload`), but the event loop still competes with
that thread for the GIL, and whatever the loader does in one long C call (or a garbage collection it sets off)
stalls every request for as long. A probe task sleeps 1 ms in a loop and records how late each wake-up is,
first with the loop idle, then while `PolicyState.reload()` loads, compiles and swaps in a policy of the given
size (a different policy from the running one, so the swap and the release of the old policy are counted).
The running policy is settled first, as `bastion serve` does at startup (bastion/proxy/longlived.py).

    .venv/bin/python bench/reload_lag_bench.py [--rules 10000 50000] [--repeat 3]

Prints, per size: the reload's wall time, the probe's worst and 99th-percentile lateness during the reload,
the longest garbage collection during the reload (a collection holds the GIL, whichever thread set it off: when
it equals the worst lateness, it is what bounded it), what the next full collection after the reload costs
(the loop waits that long whenever one runs: it walks the new policy), and the idle loop's figures for
comparison; each the median of `--repeat` reloads.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from policy_bench import generate

from bastion.policy.load import load_policy
from bastion.proxy.longlived import settle
from bastion.proxy.state import PolicyState

TICK = 0.001


class _GcWatch:
    """The longest garbage collection while installed (the loop cannot run during one, whichever thread
    set it off)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._start)


async def _probe(stop: asyncio.Event, lags: list[float]) -> None:
    clock = time.perf_counter
    while not stop.is_set():
        t = clock()
        await asyncio.sleep(TICK)
        lags.append(clock() - t - TICK)


def _figures(lags: list[float]) -> tuple[float, float]:
    """(max, p99) lateness in milliseconds."""
    ordered = sorted(lags)
    return ordered[-1] * 1000, ordered[int(len(ordered) * 0.99)] * 1000


async def _measure(state: PolicyState, idle_s: float) -> tuple[float, tuple[float, float, float, float],
                                                               tuple[float, float]]:
    """(reload seconds, (max lag, p99 lag, longest collection) during the reload and the next full collection
    after it, idle lag figures)."""
    stop, idle = asyncio.Event(), []
    task = asyncio.create_task(_probe(stop, idle))
    await asyncio.sleep(idle_s)
    stop.set()
    await task
    stop, busy = asyncio.Event(), []
    task = asyncio.create_task(_probe(stop, busy))
    await asyncio.sleep(0.05)  # the probe is running before the reload starts
    del busy[:]
    watch = _GcWatch()
    gc.callbacks.append(watch)
    t0 = time.perf_counter()
    result = await state.reload("bench")
    took = time.perf_counter() - t0
    await state.retired()  # and keeps running through the swap and the release of the old policy
    await asyncio.sleep(0.05)
    stop.set()
    await task
    gc.callbacks.remove(watch)
    if not result.ok or not result.changed:
        raise SystemExit(f"reload did not swap: {result}")
    t0 = time.perf_counter()
    gc.collect()  # what the next automatic full collection after the reload will cost the loop
    after = (time.perf_counter() - t0) * 1000
    return took, (*_figures(busy), watch.longest * 1000, after), _figures(idle)


def bench(n: int, repeat: int) -> tuple[float, float, float, float, float, float, float]:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "policy.yaml"
        policies = [yaml.safe_dump(generate(n, random.Random(n * 10 + k)), sort_keys=False) for k in range(2)]
        f.write_text(policies[0])
        state = PolicyState([str(f)], load_policy([f]))
        settle()  # as `bastion serve` does once it has started
        runs = []
        for i in range(repeat):
            f.write_text(policies[(i + 1) % 2])  # every reload changes the revision, so every one swaps
            runs.append(asyncio.run(_measure(state, 0.3)))
    took = statistics.median(r[0] for r in runs)
    return (took, statistics.median(r[1][0] for r in runs), statistics.median(r[1][1] for r in runs),
            statistics.median(r[1][2] for r in runs), statistics.median(r[1][3] for r in runs),
            statistics.median(r[2][0] for r in runs),
            statistics.median(r[2][1] for r in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    print(f"machine: {os.cpu_count()} cores, {cpu}; Python {platform.python_version()}")
    print(f"probe: 1 ms sleeps; median of {args.repeat} reloads\n")
    print("| rules  | reload s | max lag ms | p99 lag ms | longest gc ms | next full gc ms | idle max ms "
          "| idle p99 ms |")
    print("|-------:|---------:|-----------:|-----------:|--------------:|----------------:|------------:"
          "|------------:|")
    for n in args.rules:
        took, mx, p99, gc_ms, next_gc, idle_mx, idle_p99 = bench(n, args.repeat)
        print(f"| {n:>6} | {took:>8.2f} | {mx:>10.1f} | {p99:>10.1f} | {gc_ms:>13.1f} | {next_gc:>15.1f} "
              f"| {idle_mx:>11.1f} | {idle_p99:>11.1f} |")


if __name__ == "__main__":
    main()
