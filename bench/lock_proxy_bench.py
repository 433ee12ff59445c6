"""What a task lock costs a proxied request: `bastion serve` throughput with and without a lock rule.

    .venv/bin/python bench/lock_proxy_bench.py [--seconds 5] [--conns 16] [--redis redis://127.0.0.1:6379/0]

For each store backend (a SQLite file in a temporary directory, then Redis under a key prefix of its own,
deleted afterwards) one `bastion serve` (one pinned agent) runs in front of a fast local upstream, and a
closed-loop load generator (aiohttp, keep-alive, `--conns` connections) measures three workloads, in
`--rounds` rounds of rotating order (the median round is shown, which keeps background load from favouring
one workload):

- `no lock`:      POST /plain/N             an allow rule, no store call
- `lock (renew)`: POST /t/N/work            a lock rule; each connection keeps its own ticket, so every
                                            request renews it (1 store call: the acquire, which is also
                                            the last look at the store before forwarding)
- `lock+release`: POST /t/N/work, /t/N/close  alternately: a new grant, then the release rule's holder
                                            check and the release after the 2xx (3 store calls per 2)

Printed: a Markdown table with req/s, p50 and p99 latency, and req/s relative to `no lock` of the same
backend. All traffic stays on 127.0.0.1. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import stop  # noqa: E402  (this directory: stop a child politely, then firmly)

AGENT = "bench-bot"
WORKLOADS = ("no lock", "lock (renew)", "lock+release")

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
  - id: work
    effect: allow
    agents: ["role:bench"]
    match: {method: POST, path: "/t/{ticket}/work"}
    lock: {key: "ticket:{ticket}", ttl: 10m}
  - id: close
    effect: allow
    agents: ["role:bench"]
    match: {method: POST, path: "/t/{ticket}/close"}
    release: "ticket:{ticket}"
network:
  allow_private: ["127.0.0.0/8"]
"""


def role_upstream() -> None:
    """Child process: answer every request with a small JSON body; print the port, serve until killed."""
    from aiohttp import web

    async def small(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", small)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


@dataclass
class Cell:
    backend: str
    workload: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


async def load(upstream: str, proxy: str, workload: str, conns: int, seconds: float, warmup: float) -> Cell:
    """Closed loop: each connection sends its workload's requests back to back; latency per request."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    run = uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as session:
        start = time.perf_counter()
        measure_from, end = start + warmup, start + warmup + seconds

        async def worker(n: int) -> None:
            nonlocal errors
            step = 0
            while (now := time.perf_counter()) < end:
                if workload == "no lock":
                    path = f"/plain/{n}"
                elif workload == "lock (renew)":
                    path = f"/t/{run}-{n}/work"
                else:
                    path = f"/t/{run}-{n}/{'work' if step % 2 == 0 else 'close'}"
                step += 1
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


def start(cmd: list[str], log: Path, pattern: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes],
                                                                                               re.Match[str]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"), re.MULTILINE)
        if m:
            return proc, m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop(proc)
    raise SystemExit(f"{cmd[:4]} did not start:\n{log.read_text()}")


def redis_reachable(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def delete_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def bench_backend(name: str, store: str, upstream: str, tmp: Path, args: argparse.Namespace) -> list[Cell]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") and "PROXY" not in k.upper()}
    env["BASTION_LOG_LEVEL"] = "WARNING"
    cmd = [sys.executable, "-m", "bastion", "serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
           "--home", str(tmp / "home"), "--rules", str(tmp / "rules.yaml"), "--agent", AGENT, "--store", store]
    proc, m = start(cmd, tmp / f"bastion-{name}.log", r"proxy on http://(\S+?),", env)
    try:
        rounds: dict[str, list[Cell]] = {w: [] for w in WORKLOADS}
        for r in range(args.rounds):  # rotate the order: background load hits every workload alike
            for workload in WORKLOADS[r % 3:] + WORKLOADS[:r % 3]:
                cell = asyncio.run(load(upstream, f"http://{m.group(1)}", workload, args.conns, args.seconds,
                                        args.warmup))
                cell.backend = name
                rounds[workload].append(cell)
        return [sorted(cells, key=lambda c: c.rps)[len(cells) // 2] for cells in rounds.values()]
    finally:
        stop(proc)


def table(cells: list[Cell], baseline: str = "no lock") -> str:
    base = {c.backend: c.rps for c in cells if c.workload == baseline}
    lines = [f"| store | workload | req/s | p50 ms | p99 ms | vs {baseline} | errors |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for c in cells:
        ratio = c.rps / base[c.backend] if base.get(c.backend) else float("nan")
        lines.append(f"| {c.backend} | {c.workload} | {c.rps:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | "
                     f"{ratio:.2f}x | {c.errors} |")
    return "\n".join(lines)


def main(rules: str = RULES, bench: Callable[..., list[Cell]] | None = None, baseline: str = "no lock",
         description: str | None = __doc__) -> int:
    """Run `bench(name, store_url, upstream_url, tmp, args)` on SQLite and Redis and print the table (shared with
    fleet_bench.py, which measures other workloads the same way)."""
    if sys.argv[1:] == ["_upstream"]:
        role_upstream()
        return 0
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per workload")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each workload")
    parser.add_argument("--conns", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per workload; the median round is shown")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL (loopback only)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "rules.yaml").write_text(rules)
        upstream_proc, m = start([sys.executable, __file__, "_upstream"], tmp / "upstream.log", r"^(\d+)$")
        upstream = f"http://127.0.0.1:{m.group(1)}"
        prefix = f"bastionbench:{uuid.uuid4().hex}:"
        backends = [("sqlite", f"sqlite:///{tmp / 'bastion.db'}")]
        if redis_reachable(args.redis):
            backends.append(("redis", f"{args.redis}?prefix={prefix}"))
        else:
            print(f"redis: skipped ({args.redis} does not answer)", file=sys.stderr)
        cells: list[Cell] = []
        try:
            for name, store in backends:
                cells += (bench or bench_backend)(name, store, upstream, tmp, args)
        finally:
            stop(upstream_proc)
            if len(backends) > 1:
                delete_prefix(args.redis, prefix)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.conns} connections, median of {args.rounds} rounds of {args.seconds:g}s per workload")
    print(table(cells, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
