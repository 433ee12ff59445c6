"""What the audit log costs the proxy: `bastion serve` with audit capture on vs off, same run, same load.

    .venv/bin/python bench/audit_proxy_bench.py [--seconds 5] [--warmup 1] [--rounds 2] [--conns 1,50]

Audit on is `bastion serve` exactly as users run it: every exchange captured, redacted, hash-chained, spooled
and drained to the default SQLite store in --home. Audit off is the same server started without the capture
stages (`serve(settings, audit=False)`, a parameter only benchmarks use: no flag or variable turns the audit
off). Both run the same 100-rule policy with agent credentials on every connection.

The load is an LLM-shaped call: POST /v1/chat/completions with ~1.5 KB of JSON (an Authorization header for
the redactor to find), answered with ~1.5 KB of JSON, over plain HTTP and intercepted HTTPS, 1 or 50
keep-alive connections, closed loop. Rounds alternate on and off so drift hits both alike; a cell reports its
best round. Printed: machine, a Markdown table (req/s, p50, p99, proxy CPU per request incl. the audit
threads, on/off ratio), the records the audit wrote, and the target (on >= 0.9x off). All traffic stays on
127.0.0.1. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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
    """An LLM-shaped upstream on HTTP and HTTPS (proxy_bench's, answering RESPONSE_BODY)."""
    pb.role_upstream(cert, key, RESPONSE_BODY)


def role_load(url: str, proxy: str, conc: int, seconds: float, warmup: float, cafile: str) -> None:
    """proxy_bench's closed loop, POSTing REQUEST_BODY with an API key the audit must redact."""
    pb.role_load(url, proxy, conc, seconds, warmup, cafile, body=REQUEST_BODY,
                 headers={"Content-Type": "application/json",
                          "Authorization": "Bearer sk-bench-not-a-real-key-0123456789"})


def role_serve(audit: str, rules: str, home: str, upstream_ca: str) -> None:
    pb.role_serve(audit, rules, home, upstream_ca)


# -- orchestration ---------------------------------------------------------------------------------------


@dataclass
class Cell:
    audit: str
    scheme: str
    conns: int
    req_s: float
    p50: float
    p99: float
    cpu_ms: float | None
    errors: int


def load(url: str, proxy: str, conns: int, seconds: float, warmup: float, cafile: str,
         pid: int) -> tuple[dict[str, float], float | None]:
    cpu0 = pb.cpu_seconds(pid)
    out = subprocess.run([sys.executable, __file__, "_load", url, proxy, str(conns), str(seconds), str(warmup),
                          cafile], capture_output=True, text=True, check=True, timeout=seconds + warmup + 60)
    stats = json.loads(out.stdout)
    cpu_ms = None
    if stats["n"]:
        cpu_ms = (pb.cpu_seconds(pid) - cpu0) / (stats["n"] * (seconds + warmup) / seconds) * 1000
    return stats, cpu_ms


def metric(admin: str, name: str) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{admin}/metrics", timeout=10) as resp:
        m = re.search(rf"^{name} (\S+)$", resp.read().decode(), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
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
        print(f"Each cell: {args.warmup:g} s warm-up + {args.seconds:g} s measured, best of {args.rounds} "
              f"alternating rounds; request {len(REQUEST_BODY)} B, response {len(RESPONSE_BODY)} B of JSON.\n")
        best: dict[tuple[str, str, int], Cell] = {}
        for rnd in range(args.rounds):
            for scheme in ("http", "https"):
                for conns in conns_list:
                    order = ("off", "on") if rnd % 2 == 0 else ("on", "off")
                    for audit in order:
                        proxy, _, pid = servers[audit]
                        stats, cpu = load(urls[scheme], proxy, conns, args.seconds, args.warmup, str(cafile), pid)
                        cell = Cell(audit, scheme, conns, stats["req_s"], stats["p50_ms"], stats["p99_ms"], cpu,
                                    int(stats["errors"]))
                        print(f"  round {rnd + 1} audit {audit:3s} {scheme:5s} c={conns:<2d} {cell.req_s:7.0f} req/s "
                              f"p50 {cell.p50:6.2f} ms p99 {cell.p99:6.2f} ms errors {cell.errors}",
                              file=sys.stderr, flush=True)
                        key = (audit, scheme, conns)
                        if key not in best or cell.req_s > best[key].req_s:
                            best[key] = cell
        print(table(best, conns_list))
        admin_on = servers["on"][1]
        deadline = time.monotonic() + 30
        while metric(admin_on, "bastion_audit_backlog") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"\nAudit on: {metric(admin_on, 'bastion_audit_records_total'):.0f} records written, backlog "
              f"{metric(admin_on, 'bastion_audit_backlog'):.0f}, dropped "
              f"{metric(admin_on, 'bastion_audit_dropped_total')}.")
        print(verdict(best, conns_list))
    finally:
        for p in procs:
            pb.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def table(best: dict[tuple[str, str, int], Cell], conns_list: list[int]) -> str:
    rows = ["| scheme | conns | audit | req/s | p50 ms | p99 ms | proxy CPU ms/req | req/s on/off | errors |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for scheme in ("http", "https"):
        for conns in conns_list:
            off = best[("off", scheme, conns)]
            for cell in (off, best[("on", scheme, conns)]):
                cpu = f"{cell.cpu_ms:.2f}" if cell.cpu_ms is not None else "-"
                ratio = f"{cell.req_s / off.req_s:.2f}x" if cell.audit == "on" and off.req_s else ""
                rows.append(f"| {scheme} | {conns} | {cell.audit} | {cell.req_s:.0f} | {cell.p50:.2f} | "
                            f"{cell.p99:.2f} | {cpu} | {ratio} | {cell.errors} |")
    return "\n".join(rows)


def verdict(best: dict[tuple[str, str, int], Cell], conns_list: list[int]) -> str:
    lines = ["", "Target: audit on >= 0.90x audit off (req/s):"]
    for scheme in ("http", "https"):
        for conns in conns_list:
            on, off = best[("on", scheme, conns)], best[("off", scheme, conns)]
            ratio = on.req_s / off.req_s if off.req_s else 0.0
            lines.append(f"- {scheme}, {conns} connection(s): {ratio:.2f}x: {'met' if ratio >= 0.9 else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        role_upstream(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_load":
        role_load(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), sys.argv[7])
    elif len(sys.argv) > 1 and sys.argv[1] == "_serve":
        role_serve(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        main()
