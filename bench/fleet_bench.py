"""What a budget check and a milestone check cost a proxied request: `bastion serve` throughput with and without.

    .venv/bin/python bench/fleet_bench.py [--seconds 5] [--conns 16] [--redis redis://127.0.0.1:6379/0]

For each store backend (a SQLite file in a temporary directory, then Redis under a key prefix of its own,
deleted afterwards) one `bastion serve` (one pinned agent) runs in front of a fast local upstream (the one of
lock_proxy_bench.py), and a closed-loop load generator measures three workloads in rotating order, `--rounds`
times (the median round is shown):

- `plain`:     POST /plain/N           an allow rule, no store call
- `budget`:    POST /budget/RUN-N      a call budget per connection (a limit no run reaches): one atomic
                                       reserve in the store per request (calls need no settlement)
- `milestone`: POST /report/N          a rule that `requires` a milestone completed before the run: one read
                                       of the store per request

Printed: a Markdown table with req/s, p50 and p99 latency, and req/s relative to `plain` of the same backend.
All traffic stays on 127.0.0.1. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lock_proxy_bench  # this directory
from lock_proxy_bench import Cell, start
from proxy_bench import stop

AGENT = "bench-bot"
WORKLOADS = ("plain", "budget", "milestone")

RULES = """\
version: 1
defaults: {effect: deny}
agents:
  bench-bot: {roles: [bench]}
rules:
  - id: upstream
    effect: allow
    agents: ["role:bench"]
    match: {host: 127.0.0.1}
  - id: ready
    effect: allow
    agents: ["role:bench"]
    match: {method: POST, path: /ready}
    complete: {key: ready, ttl: 1d}
  - id: report
    effect: allow
    agents: ["role:bench"]
    match: {method: POST, path: "/report/{n}"}
    requires: [ready]
budgets:
  - id: calls
    match: {method: POST, path: "/budget/{run}"}
    limit: {calls: 1000000000, per: 1d}
    key: "run:{run}"
network:
  allow_private: ["127.0.0.0/8"]
"""


async def load(upstream: str, proxy: str, workload: str, conns: int, seconds: float, warmup: float) -> Cell:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    run = uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as session:
        start_at = time.perf_counter()
        measure_from, end = start_at + warmup, start_at + warmup + seconds

        async def worker(n: int) -> None:
            nonlocal errors
            path = {"plain": f"/plain/{n}", "budget": f"/budget/{run}-{n}", "milestone": f"/report/{n}"}[workload]
            while (now := time.perf_counter()) < end:
                async with session.post(upstream + path, proxy=proxy, data=b"{}") as resp:
                    await resp.read()
                    ok = resp.status == 200
                if now >= measure_from:
                    latencies.append(time.perf_counter() - now)
                    errors += not ok

        await asyncio.gather(*(worker(n) for n in range(conns)))
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] if ordered else 0.0
    return Cell("", workload, len(latencies) / seconds, statistics.median(ordered) * 1e3 if ordered else 0.0,
                p99 * 1e3, errors)


def bench_backend(name: str, store: str, upstream: str, tmp: Path, args: argparse.Namespace) -> list[Cell]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") and "PROXY" not in k.upper()}
    env["BASTION_LOG_LEVEL"] = "WARNING"
    cmd = [sys.executable, "-m", "bastion", "serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
           "--home", str(tmp / "home"), "--rules", str(tmp / "rules.yaml"), "--agent", AGENT, "--store", store]
    proc, m = start(cmd, tmp / f"bastion-{name}.log", r"proxy on http://(\S+?),", env)
    proxy = f"http://{m.group(1)}"
    try:
        with requests.Session() as s:
            s.trust_env = False
            ready = s.post(upstream + "/ready", proxies={"http": proxy}, timeout=10)
            if ready.status_code != 200:
                raise SystemExit(f"could not complete the milestone: {ready.status_code} {ready.text}")
        rounds: dict[str, list[Cell]] = {w: [] for w in WORKLOADS}
        for r in range(args.rounds):
            for workload in WORKLOADS[r % 3:] + WORKLOADS[:r % 3]:
                cell = asyncio.run(load(upstream, proxy, workload, args.conns, args.seconds, args.warmup))
                cell.backend = name
                rounds[workload].append(cell)
        return [sorted(cells, key=lambda c: c.rps)[len(cells) // 2] for cells in rounds.values()]
    finally:
        stop(proc)


def main() -> int:
    return lock_proxy_bench.main(RULES, bench_backend, "plain", __doc__)


if __name__ == "__main__":
    sys.exit(main())
