"""Proxy throughput and latency: direct vs plain mitmdump vs Bastion (allow-all and a 100-rule policy).

    .venv/bin/python bench/proxy_bench.py [--seconds 5] [--warmup 1] [--rounds 3] [--only bastion-100]

Every cell runs a closed-loop load generator in its own process (aiohttp, keep-alive connections, 1 or 50 at a
time) against a fast local aiohttp upstream (its own process too), over plain HTTP and intercepted HTTPS.
The proxies are the mitmdump binary of this venv (default addons, `ssl_verify_upstream_trusted_ca` for the
test upstream) and `bastion serve` as a user runs it (agent credentials on every connection, the network
guard, the request-id header). Printed: the machine, then a Markdown table with req/s, p50, p99, the proxy's
CPU time per request (with Bastion's audit worker process), and each figure as a ratio to mitmdump in the same
cell; then the targets.
With `--rounds N` every cell is measured N times, the targets interleaved within each round, and the median
is reported: on a shared machine one run of a few seconds can be off by a third.

All traffic stays on 127.0.0.1. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

AGENT, TOKEN = "bench-bot", "bench-token:secret"
USERS = {"bench": "bench-user-token"}


# -- child process roles ---------------------------------------------------------------------------------


def role_upstream(cert: str, key: str, body: bytes = b'{"ok": true, "n": 1}') -> None:
    """A fast upstream answering `body` (JSON) on HTTP and HTTPS; prints the two ports, serves until killed."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        print(json.dumps([a[1] for a in runner.addresses]), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def role_load(url: str, proxy: str, conc: int, seconds: float, warmup: float, cafile: str,
              body: bytes | None = None, headers: dict[str, str] | None = None) -> None:
    """Closed loop: `conc` workers on `conc` keep-alive connections, GETs (or POSTs of `body`); prints req/s,
    p50, p99 as JSON."""
    import aiohttp

    async def main() -> dict[str, float]:
        ctx = ssl.create_default_context(cafile=cafile)
        lat: list[float] = []
        errors = 0
        connector = aiohttp.TCPConnector(limit=conc, ssl=ctx)
        async with aiohttp.ClientSession(connector=connector) as s:
            t_meas = time.perf_counter() + warmup
            t_end = t_meas + seconds

            async def worker() -> None:
                nonlocal errors
                while (t := time.perf_counter()) < t_end:
                    try:
                        call = s.get(url, proxy=proxy or None) if body is None else s.post(
                            url, data=body, headers=headers, proxy=proxy or None)
                        async with call as r:
                            await r.read()
                            ok = r.status == 200
                    except Exception:
                        ok = False
                    if t >= t_meas:
                        if ok:
                            lat.append(time.perf_counter() - t)
                        else:
                            errors += 1

            await asyncio.gather(*(worker() for _ in range(conc)))
        lat.sort()
        n = len(lat)

        def q(p: float) -> float:
            return lat[min(n - 1, int(p * n))] * 1000 if n else float("nan")

        return {"req_s": n / seconds, "p50_ms": q(0.5), "p99_ms": q(0.99), "errors": errors, "n": n}

    print(json.dumps(asyncio.run(main())), flush=True)


def role_serve(audit: str, rules: str, home: str, upstream_ca: str) -> None:
    """`bastion serve` with the audit capture on or off (off exists for benchmarks only: no flag exposes it)."""
    import argparse as ap

    from bastion.logs import configure_logging
    from bastion.proxy.server import serve
    from bastion.proxy.settings import serve_settings

    settings = serve_settings(ap.Namespace(rules=[rules], listen="127.0.0.1:0", admin="127.0.0.1:0", home=home,
                                           store=None, audit=None, agent=None, upstream_ca=upstream_ca))
    configure_logging()
    raise SystemExit(asyncio.run(serve(settings, audit=audit == "on")))


# -- orchestration ---------------------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    scheme: str
    conns: int
    req_s: float
    p50: float
    p99: float
    errors: int
    cpu_ms: float | None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children (Bastion's audit worker), all threads."""
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError, ValueError):  # it may have exited meanwhile
            total += tree_cpu_seconds(int(child))
    return total


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}; "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def policy_yaml(rules: int) -> str:
    import hashlib

    sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    user_sha = hashlib.sha256(USERS["bench"].encode()).hexdigest()
    lines = [
        "version: 1",
        "defaults: {effect: deny}",
        "agents:",
        f"  {AGENT}: {{roles: [bench], token_sha256: {sha}}}",
        f"  other-bot: {{roles: [other], token_sha256: {sha}}}",
        "users:",
        f"  bench: {{roles: [admin], token_sha256: {user_sha}}}",
        "rules:",
        "  - id: local-upstream",
        "    effect: allow",
        f"    agents: [{AGENT}]",
        "    match: {host: [127.0.0.1, localhost], method: [GET, POST]}",
    ]
    for i in range(rules - 1):
        kind = i % 5
        if kind == 0:  # other hosts: not candidates for 127.0.0.1 (the host index skips them)
            lines += [f"  - id: api-{i}", "    effect: allow", "    agents: [\"*\"]",
                      f"    match: {{host: api{i}.example.com, method: POST, path: \"/v1/items/{{id}}\"}}"]
        elif kind == 1:  # wildcard hosts
            lines += [f"  - id: wild-{i}", "    effect: deny", "    agents: [\"*\"]",
                      f"    match: {{host: \"*.svc{i}.example.net\", path: \"/admin/**\"}}",
                      "    message: admin is off limits"]
        elif kind == 2:  # host-less deny rules with paths: evaluated for every request, none match
            lines += [f"  - id: path-deny-{i}", "    effect: deny", "    agents: [\"*\"]",
                      f"    match: {{method: [DELETE, PUT], path: \"/internal{i}/**\"}}"]
        elif kind == 3:  # json conditions (never parsed for GET: the method fails first)
            lines += [f"  - id: json-{i}", "    effect: deny", f"    agents: [{AGENT}]",
                      f"    match: {{method: POST, path: /v1/chat/completions, json: {{model: {{in: [m{i}]}}}}}}"]
        else:  # another agent's rules
            lines += [f"  - id: other-{i}", "    effect: allow", "    agents: [\"role:other\"]",
                      f"    match: {{path: \"/other/{i}/**\", query: {{page: {{exists: true}}}}}}"]
    lines += ["network:", "  allow_private: [\"127.0.0.0/8\"]"]
    return "\n".join(lines) + "\n"


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)


def wait_for(pattern: str, log: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        m = rx.search(log.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited:\n{log.read_text()}")
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r} in {log}:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run_cell(url: str, proxy: str, conns: int, seconds: float, warmup: float, cafile: str,
             proxy_pid: int | None) -> tuple[dict[str, float], float | None]:
    cpu0 = tree_cpu_seconds(proxy_pid) if proxy_pid else None
    out = subprocess.run([sys.executable, __file__, "_load", url, proxy, str(conns), str(seconds), str(warmup),
                          cafile], capture_output=True, text=True, check=True, timeout=seconds + warmup + 60)
    stats = json.loads(out.stdout)
    cpu_ms = None
    if proxy_pid and cpu0 is not None and stats["n"]:
        # CPU over warm-up + measurement, per request measured (warm-up requests scale it by the same factor)
        total = tree_cpu_seconds(proxy_pid) - cpu0
        cpu_ms = total / (stats["n"] * (seconds + warmup) / seconds) * 1000
    return stats, cpu_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1, help="measure each cell this many times, report the median")
    ap.add_argument("--only", action="append",
                    help="targets to run (direct, mitmdump, bastion-allow, bastion-100, bastion-100-audit)")
    args = ap.parse_args()
    targets = args.only or ["direct", "mitmdump", "bastion-allow", "bastion-100", "bastion-100-audit"]

    from support.certs import make_test_certs

    from bastion.config import Home
    from bastion.proxy.ca import ensure_ca

    tmp = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        certs = make_test_certs(tmp / "certs")
        up = spawn([sys.executable, __file__, "_upstream", str(certs.server_cert), str(certs.server_key)],
                   tmp / "upstream.log")
        procs.append(up)
        ports = json.loads(wait_for(r"\[\d+, \d+\]", tmp / "upstream.log", up).group(0))
        urls = {"http": f"http://127.0.0.1:{ports[0]}/bench", "https": f"https://localhost:{ports[1]}/bench"}

        bastion_home = Home(tmp / "bastion-home")
        ensure_ca(bastion_home)
        mitm_home = tmp / "mitmdump-home"
        trust = tmp / "upstream-trust.pem"
        import certifi

        trust.write_bytes(Path(certifi.where()).read_bytes() + certs.ca_cert.read_bytes())
        cafile = tmp / "clients-trust.pem"  # what the load generator trusts: every CA in play

        proxies: dict[str, tuple[str, int | None]] = {"direct": ("", None)}
        if "mitmdump" in targets:
            mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent)) or "mitmdump"
            from support.ports import free_port

            port = free_port()
            p = spawn([mitmdump, "-q", "--listen-host", "127.0.0.1", "-p", str(port), "--set",
                       f"confdir={mitm_home}", "--set", f"ssl_verify_upstream_trusted_ca={trust}"],
                      tmp / "mitmdump.log")
            procs.append(p)
            deadline = time.monotonic() + 30
            while not (mitm_home / "mitmproxy-ca-cert.pem").exists() or not _port_open(port):
                if time.monotonic() > deadline or p.poll() is not None:
                    raise SystemExit("mitmdump did not start:\n" + (tmp / "mitmdump.log").read_text())
                time.sleep(0.05)
            proxies["mitmdump"] = (f"http://127.0.0.1:{port}", p.pid)
        # bastion-allow / bastion-100: the proxy and its rules (audit capture off, a benchmark-only switch);
        # bastion-100-audit: `bastion serve` exactly as shipped, every exchange written to the SQLite audit log.
        for name, nrules, audit in (("bastion-allow", 1, False), ("bastion-100", 100, False),
                                    ("bastion-100-audit", 100, True)):
            if name not in targets:
                continue
            rules = tmp / f"{name}.yaml"
            rules.write_text(policy_yaml(nrules))
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("BASTION_")},
                   "BASTION_LOG_LEVEL": "WARNING"}
            if audit:
                cmd = [sys.executable, "-m", "bastion", "serve", "--rules", str(rules), "--listen", "127.0.0.1:0",
                       "--admin", "127.0.0.1:0", "--home", str(bastion_home.path), "--upstream-ca",
                       str(certs.ca_cert)]
            else:
                cmd = [sys.executable, __file__, "_serve", "off", str(rules), str(bastion_home.path),
                       str(certs.ca_cert)]
            p = spawn(cmd, tmp / f"{name}.log", env)
            procs.append(p)
            m = wait_for(r"proxy on http://127\.0\.0\.1:(\d+)", tmp / f"{name}.log", p)
            proxies[name] = (f"http://{AGENT}:{TOKEN.replace(':', '%3A')}@127.0.0.1:{m.group(1)}", p.pid)
        pem = [certs.ca_cert.read_bytes(), bastion_home.ca_cert.read_bytes()]
        if (mitm_home / "mitmproxy-ca-cert.pem").exists():
            pem.append((mitm_home / "mitmproxy-ca-cert.pem").read_bytes())
        cafile.write_bytes(b"".join(pem))

        print(f"Machine: {machine()}")
        print(f"Each cell: {args.warmup:g} s warm-up + {args.seconds:g} s measured, closed loop, keep-alive; "
              f"median of {args.rounds} round(s).\n")
        results: list[Result] = []
        for scheme in ("http", "https"):
            for conns in (1, 50):
                runs: dict[str, list[tuple[dict[str, float], float | None]]] = {t: [] for t in targets}
                for _ in range(args.rounds):
                    for target in targets:
                        proxy, pid = proxies[target]
                        stats, cpu_ms = run_cell(urls[scheme], proxy, conns, args.seconds, args.warmup,
                                                 str(cafile), pid)
                        runs[target].append((stats, cpu_ms))
                        print(f"  {target:14s} {scheme:5s} c={conns:<2d} {stats['req_s']:8.0f} req/s  "
                              f"p50 {stats['p50_ms']:6.2f} ms  p99 {stats['p99_ms']:6.2f} ms  "
                              f"errors {stats['errors']}", file=sys.stderr, flush=True)
                for target in targets:
                    measured = runs[target]

                    def med(key: str, measured: list[tuple[dict[str, float], float | None]] = measured) -> float:
                        return statistics.median(m[0][key] for m in measured)

                    cpus = [c for _, c in measured if c is not None]
                    results.append(Result(target, scheme, conns, med("req_s"), med("p50_ms"), med("p99_ms"),
                                          int(sum(m[0]["errors"] for m in measured)),
                                          statistics.median(cpus) if cpus else None))
        print(table(results))
        print(verdict(results))
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def table(results: list[Result]) -> str:
    base = {(r.scheme, r.conns): r for r in results if r.target == "mitmdump"}

    def ratio(value: float, ref: float | None) -> str:
        return f"{value / ref:.2f}x" if ref else "-"

    rows = ["| target | scheme | conns | req/s | p50 ms | p99 ms | proxy CPU ms/req | req/s vs mitmdump "
            "| p50 vs mitmdump | p99 vs mitmdump | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b = base.get((r.scheme, r.conns))
        cpu = f"{r.cpu_ms:.2f}" if r.cpu_ms is not None else "-"
        rows.append(f"| {r.target} | {r.scheme} | {r.conns} | {r.req_s:.0f} | {r.p50:.2f} | {r.p99:.2f} | {cpu} | "
                    f"{ratio(r.req_s, b.req_s if b else None)} | {ratio(r.p50, b.p50 if b else None)} | "
                    f"{ratio(r.p99, b.p99 if b else None)} | {r.errors} |")
    return "\n".join(rows)


def verdict(results: list[Result]) -> str:
    by = {(r.target, r.scheme, r.conns): r for r in results}
    lines = ["", "Targets (Bastion with 100 rules vs plain mitmdump):"]
    for scheme in ("http", "https"):
        b, m = by.get(("bastion-100", scheme, 50)), by.get(("mitmdump", scheme, 50))
        if b and m:
            ok = b.req_s >= 1.3 * m.req_s
            lines.append(f"- {scheme} req/s at 50 connections: {b.req_s / m.req_s:.2f}x (target >= 1.30x): "
                         f"{'met' if ok else 'MISSED'}")
        b, m = by.get(("bastion-100", scheme, 1)), by.get(("mitmdump", scheme, 1))
        if b and m:
            ok = b.p50 <= m.p50
            lines.append(f"- {scheme} p50 at 1 connection: {b.p50:.2f} ms vs {m.p50:.2f} ms (target: no worse): "
                         f"{'met' if ok else 'MISSED'}")
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
