"""What held calls cost the rest of the traffic: other agents' req/s with and without 200 calls held for approval.

    .venv/bin/python bench/approval_bench.py [--holds 200] [--seconds 5] [--rounds 3] [--conns 16]
                                              [--store sqlite|redis] [--redis redis://127.0.0.1:6379/0]

One `bastion serve` (its store: a SQLite file in a temporary directory, or Redis under a key prefix of its own,
deleted afterwards) runs in front of a fast local upstream. Agent `bench-bot` is measured by a closed-loop load
generator (aiohttp, keep-alive, `--conns` connections, GET of an allowed URL); agent `held-bot` opens `--holds`
connections, each sending a distinct call that a hold rule keeps waiting (its `approval.wait` is longer than the
run). Each round measures bench-bot without holds, then with the holds in place (all pending in the store, the
sidecar polling for them), in one process tree; the median round is printed, with req/s, p50 and p99 latency,
the ratio of req/s with holds to without, and the proxy process's resident memory before and while holding in
the first round (the difference divided by the holds is the memory per held call; later rounds reuse it).

All traffic stays on 127.0.0.1. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))

from proxy_bench import machine, spawn, stop, wait_for  # noqa: E402  (this directory)

TOKEN = "bench-token"
USER = "bench-user-token"


def rules_yaml() -> str:
    sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    user = hashlib.sha256(USER.encode()).hexdigest()
    return f"""\
version: 1
defaults: {{effect: deny}}
agents:
  bench-bot: {{roles: [bench], token_sha256: {sha}}}
  held-bot: {{roles: [bench], token_sha256: {sha}}}
users:
  viewer: {{roles: [viewer], token_sha256: {user}}}
rules:
  - id: upstream
    effect: allow
    agents: ["role:bench"]
    match: {{host: 127.0.0.1}}
  - id: held
    effect: hold
    agents: [held-bot]
    match: {{method: POST, path: "/refunds/**"}}
    approval: {{wait: 10m, timeout: 1h}}
approvals:
  max_open_per_minute: 100000   # the bench opens its held calls all at once
network:
  allow_private: ["127.0.0.0/8"]
"""


def role_hold(url: str, proxy: str, n: int) -> None:
    """Open `n` held calls (distinct bodies) and keep them open until killed; prints "holding" once all
    requests are sent."""
    import aiohttp

    async def main() -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
            async def one(i: int) -> None:
                body = json.dumps({"amount": 9000 + i, "nonce": uuid.uuid4().hex})
                try:
                    async with s.post(f"{url}/refunds/{i}", data=body, proxy=proxy,
                                      headers={"content-type": "application/json"}) as r:
                        await r.read()
                except Exception as e:
                    print(f"held call {i} ended: {e}", file=sys.stderr, flush=True)

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            await asyncio.sleep(0.5)
            print("holding", flush=True)
            await asyncio.gather(*tasks)

    asyncio.run(main())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pending(admin: str) -> int:
    import urllib.request

    req = urllib.request.Request(f"http://{admin}/api/approvals?state=pending&limit=1000",
                                 headers={"Authorization": f"Bearer {USER}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        return len(json.load(resp)["approvals"])


def load(url: str, proxy: str, conns: int, seconds: float, cafile: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "proxy_bench.py"), "_load", url, proxy, str(conns),
                          str(seconds), "1", cafile], capture_output=True, text=True, check=True,
                         timeout=seconds + 60)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--holds", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bastion-approval-bench-"))
    (work / "rules.yaml").write_text(rules_yaml())
    prefix = f"bastionbench:{uuid.uuid4().hex}:"
    store = f"sqlite:///{work / 'store.db'}" if args.store == "sqlite" else f"{args.redis}?prefix={prefix}"
    from support.certs import make_test_certs

    certs = make_test_certs(work / "certs")
    upstream = spawn([sys.executable, str(REPO / "bench" / "proxy_bench.py"), "_upstream", str(certs.server_cert),
                      str(certs.server_key)], work / "upstream.log")
    serve = spawn([sys.executable, "-m", "bastion", "serve", "--rules", str(work / "rules.yaml"), "--listen",
                   "127.0.0.1:0", "--admin", "127.0.0.1:0", "--home", str(work / "home"), "--store", store],
                  work / "serve.log")
    rows = []
    try:
        http_port = json.loads(wait_for(r"\[\d+, \d+\]", work / "upstream.log", upstream).group(0))[0]
        m = wait_for(r"proxy on http://([\d.:]+), admin on http://([\d.:]+)", work / "serve.log", serve)
        proxy_addr, admin = m.group(1), m.group(2)
        url = f"http://127.0.0.1:{http_port}"
        bench_proxy = f"http://bench-bot:{TOKEN}@{proxy_addr}"
        held_proxy = f"http://held-bot:{TOKEN}@{proxy_addr}"
        ca = str(certs.ca_cert)
        load(url + "/warm", bench_proxy, args.conns, 1.0, ca)
        for r in range(args.rounds):
            before_rss = rss_kib(serve.pid)
            without = load(url + "/plain", bench_proxy, args.conns, args.seconds, ca)
            already = pending(admin)  # earlier rounds' approvals stay pending in the store
            holder = spawn([sys.executable, __file__, "_hold", url, held_proxy, str(args.holds)],
                           work / f"hold-{r}.log")
            wait_for("holding", work / f"hold-{r}.log", holder)
            deadline = time.monotonic() + 60
            while (held := pending(admin) - already) < args.holds and time.monotonic() < deadline:
                time.sleep(0.2)
            holding_rss = rss_kib(serve.pid)
            with_holds = load(url + "/plain", bench_proxy, args.conns, args.seconds, ca)
            still = pending(admin) - already
            stop(holder)
            rows.append((without, with_holds, before_rss, holding_rss, held, still))
            time.sleep(1.0)
    finally:
        stop(serve)
        stop(upstream)
        if args.store == "redis":
            import redis

            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
    rounds_in_order = list(rows)
    rows.sort(key=lambda row: row[1]["req_s"] / row[0]["req_s"])
    without, with_holds, _, _, held, still = rows[len(rows) // 2]
    ratios = [row[1]["req_s"] / row[0]["req_s"] for row in rows]
    print(f"machine: {machine()}")
    print(f"store: {args.store}; {args.conns} connections of bench-bot, {args.holds} held calls of held-bot; "
          f"{args.rounds} rounds of {args.seconds:g}s, median round shown")
    print()
    print("| bench-bot traffic | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|")
    print(f"| without holds | {without['req_s']:.0f} | {without['p50_ms']:.2f} | {without['p99_ms']:.2f} | "
          f"{without['errors']} |")
    print(f"| with {held} held calls | {with_holds['req_s']:.0f} | {with_holds['p50_ms']:.2f} | "
          f"{with_holds['p99_ms']:.2f} | {with_holds['errors']} |")
    print()
    print(f"req/s with holds / without: {with_holds['req_s'] / without['req_s']:.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); still pending after the run: {still}")
    # Memory from the first round: later rounds reuse what the first one made the process allocate.
    _, _, first_before, first_holding, first_held, _ = rounds_in_order[0]
    per_call = (first_holding - first_before) / max(1, first_held)
    print(f"proxy RSS (first round): {first_before / 1024:.1f} MiB before, {first_holding / 1024:.1f} MiB holding "
          f"{first_held} calls ({per_call:.1f} KiB per held call)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_hold":
        role_hold(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(main())
