"""Policy load time and evaluation time per decision for 10 / 100 / 1,000 / 10,000 / 50,000 generated rules.

The generated policies mix what real ones hold: exact and wildcard hosts across many services, path templates
with captures, method lists, JSON body conditions, deny and hold rules beside allows, `unless` carve-outs and
role selectors. Requests mix hits, near misses and unknown hosts. Facts are built outside the timed section but
fresh for every call, so lazy JSON parsing is counted whenever a rule needs the body.

Load time is `load_policy` on the generated file (read, parse, validate, compile, index), the median of
`--loads` runs (one run at 50,000 rules), on the main thread as `bastion check` runs it. What a reload costs the
proxy's event loop is measured by bench/reload_lag_bench.py.

    .venv/bin/python bench/policy_bench.py [--samples N] [--loads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bastion.policy.facts import RequestFacts
from bastion.policy.load import load_policy

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
PATHS = ["/v1/items", "/v1/items/{id}", "/v1/items/{id}/comments", "/api/tickets/{ticket}/close",
         "/repos/{owner}/{repo}/pulls", "/v2/**", "/admin/*", "/search"]


def generate(n: int, rnd: random.Random) -> dict[str, Any]:
    services = max(3, n // 8)
    rules = []
    for i in range(n):
        svc = rnd.randrange(services)
        host = f"*.svc{svc}.example.com" if rnd.random() < 0.2 else f"api.svc{svc}.example.com"
        match: dict[str, Any] = {"host": host, "method": rnd.sample(METHODS, rnd.randint(1, 2)),
                                 "path": rnd.choice(PATHS)}
        if rnd.random() < 0.3:
            match["json"] = {"amount": {"gt": rnd.randint(10, 10_000)}}
        elif rnd.random() < 0.2:
            match["json"] = {"model": {"in": ["gpt-4o-mini", "gpt-4.1"]}}
        effect = rnd.choices(["allow", "deny", "hold"], weights=[7, 2, 1])[0]
        rule: dict[str, Any] = {"id": f"r{i}", "effect": effect,
                                "agents": [rnd.choice(["*", "role:support", "role:billing", "bot-1"])],
                                "match": match}
        if rnd.random() < 0.1:
            rule["unless"] = {"path": "/admin/*"}
        rules.append(rule)
    agents = {f"bot-{i}": {"roles": ["support", "billing"][: 1 + i % 2]} for i in range(1, 6)}
    return {"version": 1, "defaults": {"effect": "deny"}, "agents": agents, "rules": rules}


def requests(n: int, count: int, rnd: random.Random) -> list[tuple[str, str, str, bytes | None]]:
    services = max(3, n // 8)
    out = []
    for _ in range(count):
        svc = rnd.randrange(services) if rnd.random() < 0.9 else services + 7  # 10% unknown hosts
        host = rnd.choice([f"api.svc{svc}.example.com", f"x.svc{svc}.example.com"])
        path = rnd.choice(["/v1/items", "/v1/items/42", "/v1/items/42/comments", "/api/tickets/7/close",
                           "/repos/acme/app/pulls", "/v2/a/b/c", "/admin/users", "/search", "/nothing"])
        body = json.dumps({"amount": rnd.randint(0, 20_000), "model": "gpt-4.1",
                           "messages": [{"role": "user", "content": "x" * 200}]}).encode()
        out.append((rnd.choice(METHODS), f"https://{host}{path}?page=2", f"bot-{rnd.randint(1, 5)}", body))
    return out


def bench(n: int, samples: int, loads: int) -> tuple[float, float, float]:
    rnd = random.Random(n)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "policy.yaml"
        f.write_text(yaml.safe_dump(generate(n, rnd), sort_keys=False))
        load_times = []
        for _ in range(loads):
            policy = None  # the previous load is freed before the next one starts
            t0 = time.perf_counter()
            policy = load_policy([f])
            load_times.append(time.perf_counter() - t0)
        load_s = statistics.median(load_times)
    reqs = requests(n, samples, rnd)
    facts = [RequestFacts.from_url(m, u, headers={"content-type": "application/json"}, body=b) for m, u, _, b in reqs]
    for fa, (_, _, agent, _) in zip(facts[:200], reqs, strict=False):  # warm up
        policy.evaluate(fa, agent)
    facts = [RequestFacts.from_url(m, u, headers={"content-type": "application/json"}, body=b) for m, u, _, b in reqs]
    times = []
    clock = time.perf_counter_ns
    for fa, (_, _, agent, _) in zip(facts, reqs, strict=True):
        t = clock()
        policy.evaluate(fa, agent)
        times.append(clock() - t)
    times.sort()
    return statistics.median(times) / 1000, times[int(len(times) * 0.99)] / 1000, load_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--loads", type=int, default=5, help="loads per size up to 10,000 rules (median)")
    args = ap.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    print(f"machine: {os.cpu_count()} cores, {cpu}; Python {platform.python_version()}")
    print(f"{args.samples} decisions per policy size; policy load: median of {args.loads} (1 at 50,000 rules)\n")
    print("| rules  | median µs | p99 µs | policy load s |")
    print("|-------:|----------:|-------:|--------------:|")
    for n in (10, 100, 1_000, 10_000, 50_000):
        med, p99, load_s = bench(n, args.samples, args.loads if n <= 10_000 else 1)
        print(f"| {n:>6} | {med:>9.1f} | {p99:>6.1f} | {load_s:>13.3f} |")


if __name__ == "__main__":
    main()
