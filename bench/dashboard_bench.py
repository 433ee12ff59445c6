"""How fast the dashboard's flow pages render with a large audit log: 100,000 and 1,000,000 flows.

    .venv/bin/python bench/dashboard_bench.py [--sizes 100000,1000000] [--sinks sqlite,postgres] [--samples 60]
                                              [--postgres postgresql://postgres@127.0.0.1:5432/test]

For each sink (a SQLite file in a temporary directory; PostgreSQL in a schema of its own, dropped afterwards)
the bench writes synthetic but valid, hash-chained records through the sink's own `write` (4 agents, a mix of
allow/deny/hold over 5 hosts, small JSON bodies, spread over the last day, newest last) up to each size, then
starts `bastion dashboard` on that sink as a user would and times, from a logged-in HTTP client, whole page
loads: the flows page (newest 50), a filtered flows page (one agent's denials), and a flow detail (a random
record each time). Printed: median and p95 in milliseconds per page, sink and size.

All traffic stays on 127.0.0.1. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import machine, spawn, stop, wait_for  # noqa: E402

AGENTS = ("support-bot", "billing-bot", "coder-bot", "report-bot")
HOSTS = ("api.openai.com", "tickets.example.com", "payments.example.com", "git.example.com", "mcp.example.com")
USER = "bench-dash-token"


def rules_yaml() -> str:
    sha = hashlib.sha256(USER.encode()).hexdigest()
    agents = "\n".join(f"  {a}: {{roles: [bot]}}" for a in AGENTS)
    return f"""version: 1
defaults: {{effect: deny}}
agents:
{agents}
users:
  viewer: {{roles: [viewer], token_sha256: {sha}}}
rules:
  - {{id: reads, effect: allow, agents: ["*"], match: {{method: GET}}}}
  - {{id: erp-read-only, effect: deny, agents: ["*"], match: {{method: DELETE}}}}
  - {{id: refunds, effect: hold, agents: ["*"], match: {{method: POST, path: /v1/refunds}}}}
"""


def make_entries(start: int, count: int, total: int, chain: object) -> list[object]:
    """Records `start`..`start+count` of `total`, chained; started_us spread over the last 24 hours."""
    from bastion.audit.bodies import pack
    from bastion.audit.entry import Entry
    from bastion.audit.record import AuditRecord, Body, DecisionFacts, Identity, Request, Response, Timings

    now_us = int(time.time() * 1_000_000)
    span = 24 * 3600 * 1_000_000
    rng = random.Random(start)
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "summarise ticket 42"}]}'
    answer = b'{"id": "x", "choices": [{"message": {"content": "done"}}]}'
    packed_req, packed_resp = pack(body), pack(answer)
    digest_req, digest_resp = hashlib.sha256(body).hexdigest(), hashlib.sha256(answer).hexdigest()
    out = []
    for i in range(start, start + count):
        roll = rng.random()
        effect, rule, method, status = (("deny", "erp-read-only", "DELETE", 403) if roll < 0.08 else
                                        ("hold", "refunds", "POST", 409) if roll < 0.10 else
                                        ("allow", "reads", "GET", 200))
        started = now_us - span + span * i // total
        host = HOSTS[i % len(HOSTS)]
        record = AuditRecord(
            id=f"01bench-{i:012d}", started_us=started, ended_us=started + 1500,
            identity=Identity(AGENTS[i % len(AGENTS)], "basic", "127.0.0.1:50000"),
            request=Request(method, f"https://{host}/v1/items/{i}", "HTTP/1.1",
                            [("content-type", "application/json"), ("user-agent", "bench")],
                            Body(len(body), digest_req, "application/json", stored=len(body),
                                 stored_sha256=digest_req)),
            outcome="forwarded" if effect == "allow" else "refused",
            timings=Timings(1500, 20, 1200 if effect == "allow" else None),
            response=Response(status, "", "HTTP/1.1", [("content-type", "application/json")],
                              Body(len(answer), digest_resp, "application/json", stored=len(answer),
                                   stored_sha256=digest_resp)),
            decision=DecisionFacts(effect, effect, "enforce", [rule]),
        )
        canonical, head = chain.link(record)  # type: ignore[attr-defined]
        chain.advance(head)  # type: ignore[attr-defined]
        out.append(Entry(head.writer, head.seq, head.hash, canonical, packed_req, packed_resp, record))
    return out


async def fill(url: str, upto: int, have: int, chain: object) -> None:
    from bastion.audit.sinks import open_store

    async with open_store(url) as store:
        batch = 5000
        for start in range(have, upto, batch):
            await store.write(make_entries(start, min(batch, upto - start), upto_total(upto), chain))


_TOTAL = {"n": 0}


def upto_total(upto: int) -> int:
    return _TOTAL["n"] or upto


def measure(base: str, samples: int, total: int) -> dict[str, tuple[float, float]]:
    import requests

    s = requests.Session()
    s.trust_env = False
    login = s.post(base + "/login", data={"token": USER, "next": "/flows"}, headers={"Origin": base},
                   allow_redirects=False)
    assert login.status_code == 303, login.text
    rng = random.Random(7)
    pages = {
        "flows page": lambda: "/flows",
        "filtered (agent + deny)": lambda: f"/flows?agent={AGENTS[rng.randrange(4)]}&decision=deny",
        "flow detail": lambda: f"/flows/01bench-{rng.randrange(total):012d}",
    }
    out = {}
    for name, path in pages.items():
        for _ in range(3):  # warm up
            s.get(base + path())
        times = []
        for _ in range(samples):
            t = time.perf_counter()
            resp = s.get(base + path())
            times.append((time.perf_counter() - t) * 1000)
            assert resp.status_code == 200, (name, resp.status_code, resp.text[:300])
            assert "01bench-" in resp.text, name
        times.sort()
        out[name] = (statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))])
    return out


def run_dashboard(work: Path, audit: str) -> tuple[object, str]:
    proc = spawn([sys.executable, "-m", "bastion", "dashboard", "--rules", str(work / "rules.yaml"), "--admin",
                  "127.0.0.1:0", "--home", str(work / "home"), "--store", f"sqlite:///{work / 'store.db'}",
                  "--audit", audit], work / "dashboard.log")
    m = wait_for(r"dashboard on (http://\S+)", work / "dashboard.log", proc, timeout=300)
    return proc, m.group(1)


async def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--sinks", default="sqlite,postgres")
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    from bastion.audit.chain import Chain, ChainHead

    print(f"machine: {machine()}")
    results = []
    for sink in args.sinks.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bastion-dash-bench-{sink}-"))
        (work / "rules.yaml").write_text(rules_yaml())
        schema = f"bastion_dash_bench_{secrets.token_hex(4)}"
        url = f"sqlite:///{work / 'audit.db'}" if sink == "sqlite" else f"{args.postgres}?schema={schema}"
        chain = Chain(ChainHead.empty("wbench" + secrets.token_hex(6)))
        have = 0
        _TOTAL["n"] = max(sizes)
        try:
            for size in sizes:
                t = time.perf_counter()
                asyncio.run(fill(url, size, have, chain))
                print(f"{sink}: wrote {size - have} records in {time.perf_counter() - t:.0f}s", file=sys.stderr)
                have = size
                proc, base = run_dashboard(work, url)
                try:
                    for page, (p50, p95) in measure(base, args.samples, size).items():
                        results.append((sink, size, page, p50, p95))
                finally:
                    stop(proc)  # type: ignore[arg-type]
        finally:
            if sink == "postgres":
                asyncio.run(drop_schema(args.postgres, schema))
    print()
    print("| sink | flows | page | median ms | p95 ms |")
    print("|---|---:|---|---:|---:|")
    for sink, size, page, p50, p95 in results:
        print(f"| {sink} | {size:,} | {page} | {p50:.1f} | {p95:.1f} |")
    worst = max(r[4] for r in results if r[1] == max(sizes))
    print(f"\nworst p95 at {max(sizes):,} flows: {worst:.1f} ms (target: under 150 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
