"""Task-lock latency per backend: what one guarded request pays the store, measured one call at a time.

    python bench/lock_bench.py [--n 2000] [--redis redis://127.0.0.1:6379/0]

For each backend: `acquire` of a free key, `verify` (the pre-forward check), `release`, and the full
acquire + release pair, as median and p99 in microseconds. SQLite uses a file in a temporary directory (so
its disk decides the write latency); Redis uses a key prefix of its own and deletes its keys afterwards. The
calls go through the public async API, so thread hops (SQLite) and round trips (Redis) are included.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bastion.coord import Lease, LockStore, StoreUnavailable, open_store


def _quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e6, p99 * 1e6


async def measure(store: LockStore, n: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {"acquire": [], "verify": [], "release": [], "acquire+release": []}
    clock = time.perf_counter
    for i in range(n + n // 10):  # the first tenth warms connections and caches and is not counted
        key = f"bench:{i % 64}"
        t0 = clock()
        lease = await store.acquire(key, "bench-agent", 30)
        t1 = clock()
        assert isinstance(lease, Lease)
        await store.verify(key, "bench-agent", lease.fence)
        t2 = clock()
        assert await store.release(key, "bench-agent", lease.fence)
        t3 = clock()
        if i >= n // 10:
            timings["acquire"].append(t1 - t0)
            timings["verify"].append(t2 - t1)
            timings["release"].append(t3 - t2)
            timings["acquire+release"].append((t1 - t0) + (t3 - t2))
    return timings


async def run(n: int, redis_url: str) -> int:
    rows: list[tuple[str, str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"bastionbench:{uuid.uuid4().hex}:"
        backends = [("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}"), ("redis", redis_url)]
        for name, url in backends:
            store = open_store(url, key_prefix=prefix)
            try:
                timings = await measure(store, n)
            except StoreUnavailable as e:
                print(f"{name}: skipped ({e})", file=sys.stderr)
                continue
            finally:
                await store.close()
            rows += [(name, op, *_quantiles(samples)) for op, samples in timings.items()]
        await _cleanup(redis_url, prefix)
    print(f"{'backend':8} {'operation':16} {'median µs':>10} {'p99 µs':>10}   (n={n})")
    for name, op, median, p99 in rows:
        print(f"{name:8} {op:16} {median:10.0f} {p99:10.0f}")
    return 0 if rows else 1


async def _cleanup(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    except aioredis.RedisError:
        pass
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="measured iterations per backend")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL (loopback only)")
    args = parser.parse_args()
    return asyncio.run(run(args.n, args.redis))


if __name__ == "__main__":
    sys.exit(main())
