"""The event loop's cost of a budget reservation on Redis, one round trip per call vs calls batched.

    .venv/bin/python bench/redis_batch_bench.py [--redis redis://127.0.0.1:6379/0] [--calls 4000] [--conns 16]

`RedisFleetStore.reserve` sends calls that arrive while a round trip is in flight together, in one pipeline
(bastion/coord/redis_batch.py). This measures what that saves the proxy's event loop: `--conns` concurrent
tasks reserve `--calls` times in all, against a call budget no run reaches, once with the batcher bypassed
(each call its own `EVALSHA` round trip, as before) and once as shipped, three times each, alternating.
Printed: CPU time of this process and wall time, per reservation (µs). Keys live under a prefix of their own,
deleted afterwards. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import redis

from bastion.coord import open_fleet_store
from bastion.coord.fleet import MAX_WINDOW


async def run(url: str, calls: int, conns: int, batched: bool) -> tuple[float, float]:
    prefix = f"bench-fleet-{uuid.uuid4().hex}:"
    store: Any = open_fleet_store(url, key_prefix=prefix)
    if not batched:
        async def one_by_one(script: Any, keys: list[Any], args: list[Any]) -> Any:
            return await script(keys=keys, args=args)

        store._batch.call = one_by_one
    try:
        await store.reserve("bench", "warm-up", "calls", 10**9, MAX_WINDOW, 1)

        async def worker(n: int) -> None:
            for _ in range(calls // conns):
                await store.reserve("bench", f"conn-{n}", "calls", 10**9, MAX_WINDOW, 1)

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(conns)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await store.close()
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()
    done = calls // conns * conns
    return cpu / done * 1e6, wall / done * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL (loopback only)")
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--conns", type=int, default=16)
    args = ap.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(3):
        for batched in (False, True):
            results[batched].append(asyncio.run(run(args.redis, args.calls, args.conns, batched)))
    print(f"{args.calls} reservations, {args.conns} concurrent; median of 3 runs each, alternating\n")
    print("| reservations | CPU µs each | wall µs each |")
    print("|---|---:|---:|")
    for batched, name in ((False, "one round trip each"), (True, "batched (as shipped)")):
        cpu = statistics.median(r[0] for r in results[batched])
        wall = statistics.median(r[1] for r in results[batched])
        print(f"| {name} | {cpu:.0f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
