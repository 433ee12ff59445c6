"""What the audit log costs the proxy: `bastion serve` with audit capture on vs off, same run, same load.

    .venv/bin/python bench/audit_proxy_bench.py [--slice 2] [--pairs 6] [--conns 1,50]

Audit on is `bastion serve` exactly as users run it: every exchange captured, sent to the audit worker process,
redacted, hash-chained, spooled and drained to the default SQLite store in --home. Audit off is the same
server started without the capture stages (`serve(settings, audit=False)`, a parameter only benchmarks use: no
flag or variable turns the audit off). Both run the same 100-rule policy with agent credentials on every
connection, side by side.

The load is an LLM-shaped call: POST /v1/chat/completions with ~1.5 KB of JSON (an Authorization header for
the redactor to find), answered with ~1.5 KB of JSON, over plain HTTP and intercepted HTTPS, 1 or 50
keep-alive connections, closed loop. Client and upstream are `lean_http`'s minimal HTTP/1.1 ends, so the
cores of a small machine go to the proxy and its audit worker rather than to the harness.

One load process per cell alternates short slices between the two servers (off, on, on, off, ...), so the
drift a shared machine shows over seconds hits both alike; each pair of neighbouring slices gives one on/off
ratio, and a cell reports the median ratio, the median req/s of each side, latency percentiles over all its
slices, and CPU per request of the proxy, its audit worker and the load generator. Printed: machine, a Markdown
table, the records the audit wrote, and the target (on >= 0.9x off). All traffic stays on 127.0.0.1. Not part
of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import lean_http  # noqa: E402  (this directory)
import proxy_bench as pb  # noqa: E402  (this directory: its helpers and policy)

REQUEST_BODY = json.dumps({
    "model": "gpt-4o-mini", "temperature": 0.2, "max_tokens": 512,
    "messages": [{"role": "system", "content": "You are a support assistant for an online shop."},
                 {"role": "user", "content": "My package was delayed, please update the shipping address. " * 22}],
}).encode()
RESPONSE_BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Sorry about the delay; I updated the address on your order. " * 22}}],
    "usage": {"prompt_tokens": 300, "completion_tokens": 280, "total_tokens": 580},
}).encode()


# -- child process roles ---------------------------------------------------------------------------------


def role_upstream(cert: str, key: str) -> None:
    """An LLM-shaped upstream on HTTP and HTTPS answering RESPONSE_BODY (`lean_http`: cheap on the CPU)."""
    import asyncio

    async def main() -> None:
        ports = await lean_http.serve_upstream(RESPONSE_BODY, cert, key)
        print(json.dumps(list(ports)), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def role_paired(url: str, proxies: str, pids: str, conc: int, slice_s: float, pairs: int, cafile: str) -> None:
    """Closed loop against two proxies in alternating slices (`lean_http` client); prints one JSON object per
    slice and target."""
    import asyncio

    targets: list[str] = json.loads(proxies)
    servers: list[int] = json.loads(pids)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-not-a-real-key-0123456789"}

    async def main() -> None:
        clients = [lean_http.ProxyClient(url, proxy, REQUEST_BODY, headers, cafile) for proxy in targets]
        try:
            for i in range(pairs):
                for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                    await clients[which].run(conc, 0.3)  # connections up, caches warm
                    pid = servers[which]
                    cpu0, tree0, own0 = pb.cpu_seconds(pid), pb.tree_cpu_seconds(pid), time.process_time()
                    lat: list[float] = []
                    errors = await clients[which].run(conc, slice_s, lat)
                    cpu, tree = pb.cpu_seconds(pid) - cpu0, pb.tree_cpu_seconds(pid) - tree0
                    print(json.dumps({"pair": i, "target": which, "n": len(lat), "seconds": slice_s,
                                      "errors": errors, "cpu_s": cpu, "worker_cpu_s": tree - cpu,
                                      "load_cpu_s": time.process_time() - own0, "lat": lat}), flush=True)
        finally:
            for client in clients:
                client.close()

    asyncio.run(main())


def role_serve(audit: str, rules: str, home: str, upstream_ca: str) -> None:
    pb.role_serve(audit, rules, home, upstream_ca)


# -- orchestration ---------------------------------------------------------------------------------------


@dataclass
class Side:
    req_s: float  # median over slices
    p50: float
    p99: float
    cpu_ms: float | None  # median CPU per request of the proxy process
    worker_cpu_ms: float | None  # ... of its audit worker process
    load_cpu_ms: float | None  # ... of the load generator (same machine)
    errors: int


@dataclass
class Cell:
    scheme: str
    conns: int
    off: Side
    on: Side
    ratio: float  # median over pairs of on/off req/s


def paired(url: str, proxies: list[str], pids: list[int], conns: int, slice_s: float, pairs: int,
           cafile: str) -> tuple[Side, Side, float]:
    """(off, on, median on/off ratio) for one cell, from one alternating load process."""
    out = subprocess.run([sys.executable, __file__, "_paired", url, json.dumps(proxies), json.dumps(pids), str(conns),
                          str(slice_s), str(pairs), cafile], capture_output=True, text=True, check=True,
                         timeout=pairs * 2 * (slice_s + 1) + 60)
    slices = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    sides = []
    for which in (0, 1):
        mine = [s for s in slices if s["target"] == which]
        lat = sorted(x for s in mine for x in s["lat"])

        def q(p: float, lat: list[float] = lat) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

        def per_request(key: str, mine: list[dict] = mine) -> float | None:
            values = [s[key] / s["n"] * 1000 for s in mine if s["n"]]
            return statistics.median(values) if values else None

        sides.append(Side(statistics.median(s["n"] / s["seconds"] for s in mine), q(0.5), q(0.99),
                          per_request("cpu_s"), per_request("worker_cpu_s"), per_request("load_cpu_s"),
                          sum(s["errors"] for s in mine)))
    by_pair: dict[int, dict[int, float]] = {}
    for s in slices:
        by_pair.setdefault(s["pair"], {})[s["target"]] = s["n"] / s["seconds"]
    ratios = [p[1] / p[0] for p in by_pair.values() if p.get(0) and 1 in p]
    return sides[0], sides[1], statistics.median(ratios) if ratios else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slice", type=float, default=2.0, help="seconds per measured slice (default 2)")
    ap.add_argument("--pairs", type=int, default=6, help="off/on slice pairs per cell (default 6)")
    ap.add_argument("--conns", default="1,50")
    args = ap.parse_args()
    conns_list = [int(c) for c in args.conns.split(",")]

    from support.certs import make_test_certs

    from bastion.config import Home
    from bastion.proxy.ca import ensure_ca

    tmp = Path(tempfile.mkdtemp(prefix="bastion-audit-proxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        certs = make_test_certs(tmp / "certs")
        up = pb.spawn([sys.executable, __file__, "_upstream", str(certs.server_cert), str(certs.server_key)],
                      tmp / "upstream.log")
        procs.append(up)
        ports = json.loads(pb.wait_for(r"\[\d+, \d+\]", tmp / "upstream.log", up).group(0))
        urls = {"http": f"http://127.0.0.1:{ports[0]}/v1/chat/completions",
                "https": f"https://localhost:{ports[1]}/v1/chat/completions"}
        rules = tmp / "rules.yaml"
        rules.write_text(pb.policy_yaml(100))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}, "BASTION_LOG_LEVEL": "WARNING"}
        servers: dict[str, tuple[str, str, int]] = {}
        for audit in ("off", "on"):
            home = Home(tmp / f"home-{audit}")
            ensure_ca(home)
            p = pb.spawn([sys.executable, __file__, "_serve", audit, str(rules), str(home.path), str(certs.ca_cert)],
                         tmp / f"bastion-{audit}.log", env)
            procs.append(p)
            m = pb.wait_for(r"proxy on http://127\.0\.0\.1:(\d+), admin on http://(\S+)", tmp / f"bastion-{audit}.log",
                            p)
            proxy = f"http://{pb.AGENT}:{pb.TOKEN.replace(':', '%3A')}@127.0.0.1:{m.group(1)}"
            servers[audit] = (proxy, m.group(2), p.pid)
        cafile = tmp / "clients-trust.pem"
        cafile.write_bytes(certs.ca_cert.read_bytes() + (tmp / "home-off" / "mitmproxy-ca-cert.pem").read_bytes()
                           + (tmp / "home-on" / "mitmproxy-ca-cert.pem").read_bytes())

        print(f"Machine: {pb.machine()}")
        print(f"Each cell: {args.pairs} pairs of {args.slice:g} s slices, alternating off/on; request "
              f"{len(REQUEST_BODY)} B, response {len(RESPONSE_BODY)} B of JSON.\n")
        cells: list[Cell] = []
        for scheme in ("http", "https"):
            for conns in conns_list:
                off, on, ratio = paired(urls[scheme], [servers["off"][0], servers["on"][0]],
                                        [servers["off"][2], servers["on"][2]], conns, args.slice, args.pairs,
                                        str(cafile))
                cells.append(Cell(scheme, conns, off, on, ratio))
                print(f"  {scheme:5s} c={conns:<2d} off {off.req_s:6.0f} req/s  on {on.req_s:6.0f} req/s  "
                      f"median ratio {ratio:.2f}x", file=sys.stderr, flush=True)
        print(table(cells))
        admin_on = servers["on"][1]
        deadline = time.monotonic() + 30
        while metric(admin_on, "bastion_audit_backlog") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"\nAudit on: {metric(admin_on, 'bastion_audit_records_total'):.0f} records written, backlog "
              f"{metric(admin_on, 'bastion_audit_backlog'):.0f}, dropped "
              f"{metric(admin_on, 'bastion_audit_dropped_total')}.")
        print(verdict(cells))
    finally:
        for p in procs:
            pb.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def metric(admin: str, name: str) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{admin}/metrics", timeout=10) as resp:
        m = re.search(rf"^{name} (\S+)$", resp.read().decode(), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def table(cells: list[Cell]) -> str:
    rows = ["| scheme | conns | audit | req/s | p50 ms | p99 ms | CPU ms/req: proxy | audit worker | load generator "
            "| req/s on/off | errors |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    for cell in cells:
        for name, side in (("off", cell.off), ("on", cell.on)):
            ratio = f"{cell.ratio:.2f}x" if name == "on" else ""
            rows.append(f"| {cell.scheme} | {cell.conns} | {name} | {side.req_s:.0f} | {side.p50:.2f} | "
                        f"{side.p99:.2f} | {ms(side.cpu_ms)} | {ms(side.worker_cpu_ms) if name == 'on' else '-'} | "
                        f"{ms(side.load_cpu_ms)} | {ratio} | {side.errors} |")
    return "\n".join(rows)


def verdict(cells: list[Cell]) -> str:
    lines = ["", "Target: audit on >= 0.90x audit off (req/s, median of the pair ratios):"]
    for cell in cells:
        lines.append(f"- {cell.scheme}, {cell.conns} connection(s): {cell.ratio:.2f}x: "
                     f"{'met' if cell.ratio >= 0.9 else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        role_upstream(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_paired":
        role_paired(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]),
                    sys.argv[8])
    elif len(sys.argv) > 1 and sys.argv[1] == "_serve":
        role_serve(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        main()
