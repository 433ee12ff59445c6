"""What Bastion's LLM awareness costs streamed answers: `bastion serve --response-facts on` vs `off`, one run.

    .venv/bin/python bench/llm_bench.py [--seconds 5] [--warmup 1] [--conns 8] [--pairs 4] [--words 50,400]
                                        [--ttfb-samples 200] [--ttfb-gap 0.01] [--ttfb-words 5]

Why: with response facts on, the proxy reads every streamed LLM answer as it passes (an observer chained into
the response stream parses the SSE events for usage, tool calls and the first token's time). That parsing runs
on the proxy's event loop for every chunk, so it is the one cost LLM awareness adds to each answer; this
measures it against the same server with the reading off. Everything else is equal between the arms: both are
`bastion serve` as users run it (agent credentials on every connection, the network guard, the audit log on
by default in a fresh --home of its own), each in its own process tree, in front of one shared fake OpenAI API
(`tests/support/llm_upstream.py`, its own process).

Two measurements, interleaved in `--pairs` pairs (the order of the arms flips every pair, so the drift of a
shared machine hits them alike; each pair gives one on/off ratio, and the median, min and max are reported):

1. Throughput and latency: a closed-loop load generator in its own process (`proxy_bench.role_load`: aiohttp,
   `--conns` keep-alive connections, absolute-URI requests with Proxy-Authorization Basic, plain HTTP) POSTs a
   chat completion like the openai SDK does (`stream: true`, `stream_options.include_usage`) and reads each
   whole answer: `--words` content events (50, and 400 to show the per-event cost). The content chunks are
   alike but for their text (as vLLM, llama.cpp or Ollama send them), or with `--padded` as api.openai.com
   sends them now (`"usage":null` and a random `obfuscation` string in each): the observer's run tests differ
   for the two (see `bastion/protocols/quiet.py`), so both are worth a run. Per cell: req/s, p50, p99,
   and the proxy's CPU per request (its process tree: proxy and audit worker, counted once the audit backlog
   has drained). Direct (no proxy) is measured alongside as a reference.
2. Time to first byte: one keep-alive connection, requests one after another, from sending the request to the
   first body byte (the first SSE event), direct vs through Bastion (response facts on). The upstream waits
   `--ttfb-gap` seconds between events, so the first event travels alone: a proxy that held it back until
   more arrived would show at least the gap added. (0.01 s by default: with 0.05 s and 200 samples per arm the
   9-event answers alone would take three minutes.)

Printed: the machine, a Markdown table per measurement, the on/off ratios with the targets (req/s on >= 0.95x
off; at most 5 ms added to the first byte at p50), and what each server's audit and token metrics counted (the
arm with response facts on counts tokens, the other none). The default run takes about three and a half
minutes.

All traffic stays on 127.0.0.1. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
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
from urllib.parse import unquote, urlsplit

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

import proxy_bench as pb  # noqa: E402  (this directory: process helpers, the load role, agent credentials)

CHAT_PATH = "/v1/chat/completions"
REQUEST_BODY = json.dumps({
    "model": "gpt-4o-mini", "temperature": 0.2, "stream": True, "stream_options": {"include_usage": True},
    "messages": [{"role": "system", "content": "You are a support assistant for an online shop."},
                 {"role": "user", "content": "My package was delayed, please update the shipping address. " * 8}],
}).encode()
REQUEST_HEADERS = {  # what the openai SDK sends (the key is fake: the upstream is local)
    "Content-Type": "application/json", "Accept": "application/json", "User-Agent": "OpenAI/Python 1.0 (bench)",
    "Authorization": "Bearer sk-bench-not-a-real-key-0123456789",
}
EXTRA_EVENTS = 4  # besides one per word: the role delta, the finish chunk, the usage chunk, [DONE]
END_OF_STREAM = b"data: [DONE]\n\n"

ARMS = ("direct", "off", "on")
ARM_NAMES = {"direct": "direct (no proxy)", "off": "Bastion, --response-facts off",
             "on": "Bastion, --response-facts on"}


# -- child process roles ---------------------------------------------------------------------------------


def role_upstream() -> None:
    """The fake OpenAI API on a free port of 127.0.0.1; prints the port, serves until killed."""
    import asyncio

    from aiohttp import web
    from support.llm_upstream import make_app

    async def main() -> None:
        runner = web.AppRunner(make_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        print(json.dumps([a[1] for a in runner.addresses]), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def role_load(url: str, proxy: str, conns: int, seconds: float, warmup: float) -> None:
    """proxy_bench's closed loop, POSTing the streamed chat completion; prints req/s, p50, p99 as JSON."""
    import certifi

    pb.role_load(url, proxy, conns, seconds, warmup, certifi.where(), body=REQUEST_BODY, headers=REQUEST_HEADERS)


def role_ttfb(url: str, proxy: str, samples: int, warmup: int) -> None:
    """Sequential requests on one keep-alive connection; prints the times to the first body byte (seconds) and
    the errors (a status other than 200, or an answer that is not a whole event stream) as JSON."""
    import asyncio

    import aiohttp

    async def main() -> dict[str, object]:
        ttfb: list[float] = []
        errors = 0
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for i in range(warmup + samples):
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=REQUEST_BODY, headers=REQUEST_HEADERS,
                                            proxy=proxy or None) as resp:
                        first = await resp.content.readany()
                        t_first = time.perf_counter()
                        rest = await resp.read()
                        ok = resp.status == 200 and first.startswith(b"data: ") and (first + rest).endswith(
                            END_OF_STREAM)
                except Exception:
                    ok = False
                if i < warmup:
                    continue
                if ok:
                    ttfb.append(t_first - t0)
                else:
                    errors += 1
        return {"ttfb": ttfb, "errors": errors}

    print(json.dumps(asyncio.run(main())), flush=True)


# -- servers ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    proxy: str  # proxy URL with the agent's credentials ("" for direct)
    pid: int | None  # the proxy process (its audit worker is a child)
    admin: str | None  # host:port of its admin listener


def rules_yaml() -> str:
    """One agent with a token, the upstream allowed, loopback let through the network guard."""
    import hashlib

    sha = hashlib.sha256(pb.TOKEN.encode()).hexdigest()
    return f"""\
version: 1
defaults: {{effect: deny}}
agents:
  {pb.AGENT}: {{roles: [bench], token_sha256: {sha}}}
rules:
  - id: upstream
    effect: allow
    agents: ["role:bench"]
    match: {{host: 127.0.0.1}}
network:
  allow_private: ["127.0.0.0/8"]
"""


def start_bastion(tmp: Path, rules: Path, response_facts: str, procs: list[subprocess.Popen[bytes]]) -> Server:
    """`bastion serve` as users run it (audit on, its SQLite file in a fresh --home), response facts on or off."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}, "BASTION_LOG_LEVEL": "WARNING"}
    log = tmp / f"bastion-{response_facts}.log"
    p = pb.spawn([sys.executable, "-m", "bastion", "serve", "--rules", str(rules), "--listen", "127.0.0.1:0",
                  "--admin", "127.0.0.1:0", "--home", str(tmp / f"home-{response_facts}"),
                  "--response-facts", response_facts], log, env)
    procs.append(p)
    m = pb.wait_for(r"proxy on http://127\.0\.0\.1:(\d+), admin on http://([\d.:]+)", log, p)
    return Server(f"http://{pb.AGENT}:{pb.TOKEN.replace(':', '%3A')}@127.0.0.1:{m.group(1)}", p.pid, m.group(2))


def metric_total(admin: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` on the admin listener's /metrics whose labels contain `labels`."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE):
        if labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def wait_audit_drained(server: Server, timeout: float = 30) -> None:
    """Let the audit worker write what the last cell sent it, so that work is counted in that cell's CPU and
    does not slow the next cell (which may be the other arm)."""
    if server.admin is None:
        return
    deadline = time.monotonic() + timeout
    while metric_total(server.admin, "bastion_audit_backlog") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)


def fetch_once(url: str, server: Server) -> bytes:
    """One streamed answer through `server` (or direct), read whole with http.client: a check before measuring."""
    target = urlsplit(server.proxy or url)
    conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=30)
    headers = dict(REQUEST_HEADERS)
    if server.proxy:
        creds = f"{unquote(target.username or '')}:{unquote(target.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
    try:
        conn.request("POST", url if server.proxy else urlsplit(url).path + "?" + urlsplit(url).query,
                     REQUEST_BODY, headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"{url} via {server.proxy or 'direct'}: HTTP {resp.status}: {body[:300]!r}")
        return body
    finally:
        conn.close()


def check_stream(url: str, words: int, servers: dict[str, Server]) -> None:
    """Every arm passes the answer through whole: all its content events and the end of the stream."""
    for arm, server in servers.items():
        body = fetch_once(url, server)
        found = body.count(b'"content":"word')
        if found != words or not body.endswith(END_OF_STREAM):
            raise SystemExit(f"{arm}: {found} of {words} content events, ends {body[-40:]!r}")


# -- measurements ----------------------------------------------------------------------------------------


@dataclass
class Cell:
    pair: int
    words: int
    arm: str
    req_s: float
    p50: float
    p99: float
    errors: int
    cpu_ms: float | None  # CPU per request of the proxy process
    worker_cpu_ms: float | None  # ... of its audit worker (the rest of its process tree)


def run_cell(pair: int, words: int, arm: str, url: str, server: Server, args: argparse.Namespace) -> Cell:
    cpu0 = (pb.cpu_seconds(server.pid), pb.tree_cpu_seconds(server.pid)) if server.pid else None
    out = subprocess.run([sys.executable, __file__, "_load", url, server.proxy, str(args.conns), str(args.seconds),
                          str(args.warmup)], capture_output=True, text=True, check=True,
                         timeout=args.seconds + args.warmup + 60)
    stats = json.loads(out.stdout)
    wait_audit_drained(server)
    cpu_ms = worker_cpu_ms = None
    if server.pid and cpu0 is not None and stats["n"]:
        # CPU over warm-up + measurement, per request measured (warm-up requests scale it by the same factor)
        requests = stats["n"] * (args.seconds + args.warmup) / args.seconds
        proc, tree = pb.cpu_seconds(server.pid) - cpu0[0], pb.tree_cpu_seconds(server.pid) - cpu0[1]
        cpu_ms, worker_cpu_ms = proc / requests * 1000, (tree - proc) / requests * 1000
    cell = Cell(pair, words, arm, stats["req_s"], stats["p50_ms"], stats["p99_ms"], int(stats["errors"]), cpu_ms,
                worker_cpu_ms)
    cpu = f"{cpu_ms:.2f} + {worker_cpu_ms:.2f}" if cpu_ms is not None and worker_cpu_ms is not None else "-"
    print(f"  pair {pair} words={words:<4d} {arm:6s} {cell.req_s:7.0f} req/s  p50 {cell.p50:7.2f} ms  "
          f"p99 {cell.p99:7.2f} ms  cpu {cpu} ms/req (proxy + audit worker)  errors {cell.errors}",
          file=sys.stderr, flush=True)
    return cell


@dataclass
class Ttfb:
    pair: int
    arm: str
    samples: list[float]  # milliseconds
    errors: int


def run_ttfb(pair: int, arm: str, url: str, server: Server, samples: int) -> Ttfb:
    out = subprocess.run([sys.executable, __file__, "_ttfb", url, server.proxy, str(samples), "5"],
                         capture_output=True, text=True, check=True, timeout=samples * 5 + 60)
    stats = json.loads(out.stdout)
    wait_audit_drained(server)
    result = Ttfb(pair, arm, [s * 1000 for s in stats["ttfb"]], int(stats["errors"]))
    print(f"  pair {pair} first byte {arm:6s} p50 {quantile(result.samples, 0.5):6.2f} ms  "
          f"p90 {quantile(result.samples, 0.9):6.2f} ms  errors {result.errors}", file=sys.stderr, flush=True)
    return result


def quantile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def arm_order(pair: int, arms: tuple[str, ...]) -> tuple[str, ...]:
    """The arms in one order on even pairs, reversed on odd ones."""
    return arms if pair % 2 == 0 else tuple(reversed(arms))


# -- report ----------------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    """Median with min and max, for per-pair ratios."""
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}x (pairs: min {min(values):.2f}x, max {max(values):.2f}x)"


def per_pair_ratios(cells: list[Cell], words: int, key: str) -> list[float]:
    by_pair: dict[int, dict[str, Cell]] = {}
    for c in cells:
        if c.words == words:
            by_pair.setdefault(c.pair, {})[c.arm] = c
    return [getattr(p["on"], key) / getattr(p["off"], key) for p in by_pair.values()
            if "on" in p and "off" in p and getattr(p["off"], key)]


@dataclass
class Summary:
    """One arm at one answer size: medians over the pairs, errors summed."""

    req_s: float
    p50: float
    p99: float
    cpu_ms: float | None
    worker_cpu_ms: float | None
    errors: int


def summarize(mine: list[Cell]) -> Summary:
    def median_of(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return Summary(statistics.median(c.req_s for c in mine), statistics.median(c.p50 for c in mine),
                   statistics.median(c.p99 for c in mine), median_of([c.cpu_ms for c in mine]),
                   median_of([c.worker_cpu_ms for c in mine]), sum(c.errors for c in mine))


def ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def cpu_added(on: Summary, off: Summary, events: int) -> str:
    """What reading the answer adds to the CPU of the proxy and of its audit worker, per answer and event."""
    if on.cpu_ms is None or off.cpu_ms is None or on.worker_cpu_ms is None or off.worker_cpu_ms is None:
        return "CPU: not measured"
    proxy, worker = on.cpu_ms - off.cpu_ms, on.worker_cpu_ms - off.worker_cpu_ms
    return (f"CPU added per answer (medians): proxy {proxy:+.2f} ms ({proxy * 1000 / events:+.1f} µs per SSE "
            f"event), audit worker {worker:+.2f} ms")


def throughput_report(cells: list[Cell], words_list: list[int]) -> str:
    rows = ["| answer | path | req/s | p50 ms | p99 ms | CPU ms/req: proxy | audit worker | req/s vs direct | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = ["", "Response facts on / off (median of the pair ratios; target req/s >= 0.95x):"]
    for words in words_list:
        arms = {arm: summarize(mine) for arm in ARMS
                if (mine := [c for c in cells if c.words == words and c.arm == arm])}
        direct = arms["direct"].req_s if "direct" in arms else None
        for arm, m in arms.items():
            vs = f"{m.req_s / direct:.2f}x" if direct and arm != "direct" else "-"
            rows.append(f"| {words} words ({words + EXTRA_EVENTS} SSE events) | {ARM_NAMES[arm]} | {m.req_s:.0f} | "
                        f"{m.p50:.2f} | {m.p99:.2f} | {ms(m.cpu_ms)} | {ms(m.worker_cpu_ms)} | {vs} | {m.errors} |")
        req = per_pair_ratios(cells, words, "req_s")
        p50 = per_pair_ratios(cells, words, "p50")
        met = bool(req) and statistics.median(req) >= 0.95
        verdicts.append(f"- {words} words: req/s {spread(req)}: {'met' if met else 'MISSED'}; p50 {spread(p50)}")
        if "on" in arms and "off" in arms:
            verdicts.append("  " + cpu_added(arms["on"], arms["off"], words + EXTRA_EVENTS))
    return "\n".join(rows + verdicts)


def ttfb_report(results: list[Ttfb], gap: float, words: int) -> str:
    rows = [f"| first byte of an SSE answer ({words} words, {gap * 1000:g} ms between events) | samples | p50 ms "
            "| p90 ms | errors |", "|---|---:|---:|---:|---:|"]
    pooled: dict[str, list[float]] = {}
    for arm in ("direct", "on"):
        mine = [r for r in results if r.arm == arm]
        pooled[arm] = [s for r in mine for s in r.samples]
        rows.append(f"| {ARM_NAMES[arm]} | {len(pooled[arm])} | {quantile(pooled[arm], 0.5):.2f} | "
                    f"{quantile(pooled[arm], 0.9):.2f} | {sum(r.errors for r in mine)} |")
    added50 = quantile(pooled["on"], 0.5) - quantile(pooled["direct"], 0.5)
    added90 = quantile(pooled["on"], 0.9) - quantile(pooled["direct"], 0.9)
    by_pair: dict[int, dict[str, Ttfb]] = {}
    for r in results:
        by_pair.setdefault(r.pair, {})[r.arm] = r
    pair_added = [quantile(p["on"].samples, 0.5) - quantile(p["direct"].samples, 0.5) for p in by_pair.values()
                  if "on" in p and "direct" in p]
    lines = ["", f"Added by Bastion to the first byte: p50 {added50:+.2f} ms, p90 {added90:+.2f} ms "
                 f"(per pair p50: min {min(pair_added):+.2f}, max {max(pair_added):+.2f} ms); "
                 f"target <= 5 ms at p50: {'met' if added50 <= 5 else 'MISSED'}"]
    return "\n".join(rows + lines)


def metrics_report(servers: dict[str, Server]) -> str:
    lines = [""]
    for arm in ("off", "on"):
        admin = servers[arm].admin
        assert admin is not None
        records = metric_total(admin, "bastion_audit_records_total")
        tokens = metric_total(admin, "bastion_llm_tokens_total", 'kind="output"')
        dropped = metric_total(admin, "bastion_audit_dropped_total")
        lines.append(f"{ARM_NAMES[arm]}: {records:.0f} audit records written, {dropped:.0f} dropped; "
                     f"{tokens:.0f} output tokens counted")
    return "\n".join(lines)


# -- orchestration ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per throughput cell (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per throughput cell (default 1)")
    ap.add_argument("--conns", type=int, default=8, help="closed-loop connections (default 8)")
    ap.add_argument("--pairs", type=int, default=4, help="on/off pairs, arm order flipped each pair (default 4)")
    ap.add_argument("--words", default="50,400", help="content events per answer, comma-separated (default 50,400)")
    ap.add_argument("--ttfb-samples", type=int, default=200, help="first-byte samples per arm (default 200)")
    ap.add_argument("--ttfb-gap", type=float, default=0.01, help="upstream seconds between events (default 0.01)")
    ap.add_argument("--ttfb-words", type=int, default=5, help="content events per first-byte answer (default 5)")
    ap.add_argument("--padded", action="store_true",
                    help="chunks as api.openai.com sends them now: `\"usage\":null` and a random-length "
                         "`obfuscation` string in each, so no two content chunks share their bytes but the text")
    args = ap.parse_args()
    words_list = [int(w) for w in args.words.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="bastion-llm-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up = pb.spawn([sys.executable, __file__, "_upstream"], tmp / "upstream.log")
        procs.append(up)
        port = json.loads(pb.wait_for(r"\[\d+\]", tmp / "upstream.log", up).group(0))[0]
        base = f"http://127.0.0.1:{port}{CHAT_PATH}"
        query = "&padded=1" if args.padded else ""
        rules = tmp / "rules.yaml"
        rules.write_text(rules_yaml())
        servers = {"direct": Server("", None, None)}
        for facts in ("off", "on"):
            servers[facts] = start_bastion(tmp, rules, facts, procs)
        for words in words_list:
            check_stream(f"{base}?words={words}{query}", words, servers)

        print(f"Machine: {pb.machine()}")
        print(f"Throughput: {args.conns} keep-alive connections, closed loop, {args.warmup:g} s warm-up + "
              f"{args.seconds:g} s measured per cell; {args.pairs} pairs, arm order flipped each pair, medians "
              f"shown. Request {len(REQUEST_BODY)} B of JSON; answers streamed (SSE), read whole; chunks "
              f"{'padded as api.openai.com sends them (usage null, obfuscation)' if args.padded else 'uniform'}.\n")
        cells: list[Cell] = []
        ttfbs: list[Ttfb] = []
        per_pair = math.ceil(args.ttfb_samples / args.pairs)
        ttfb_url = f"{base}?words={args.ttfb_words}&gap={args.ttfb_gap:g}"
        for pair in range(args.pairs):
            for words in words_list:
                for arm in arm_order(pair, ARMS):
                    cells.append(run_cell(pair, words, arm, f"{base}?words={words}{query}", servers[arm], args))
            for arm in arm_order(pair, ("direct", "on")):
                ttfbs.append(run_ttfb(pair, arm, ttfb_url, servers[arm], per_pair))
        print(throughput_report(cells, words_list))
        print()
        print(ttfb_report(ttfbs, args.ttfb_gap, args.ttfb_words))
        print(metrics_report(servers))
    finally:
        for p in procs:
            pb.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        role_upstream()
    elif len(sys.argv) > 1 and sys.argv[1] == "_load":
        role_load(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_ttfb":
        role_ttfb(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
