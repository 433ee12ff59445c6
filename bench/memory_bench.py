"""What hostile or careless clients cost the proxy in memory: RSS of `bastion serve` under oversized uploads,
stalled connections and a run of large forwarded uploads.

    .venv/bin/python bench/memory_bench.py [--quick] [--json] [--only uploads] [--stall-seconds 75]
        [--serve-arg=--some-flag=value ...] [--one-proxy] [--body-rule]

A proxy that reads a body whole before it looks at the size limit or the credentials, keeps finished flows
until a full garbage collection, or holds a stalled connection forever can be exhausted by one client. This
measures exactly that, from outside, on `bastion serve` as users run it (audit on, default body limit):

1. a chunked upload of `--big-mib` MiB without Proxy-Authorization (expected: 407, early);
2. the same upload with credentials: over the 32 MiB body limit (expected: 413, early);
3. the same size announced by Content-Length (expected: 413 before the body is read);
4. `--connections` connections that stall: silent, a partial request line, partial headers, or headers
   trickled one byte every 5 s; the bench waits up to `--stall-seconds` and counts the connections the proxy
   closed, and sends one normal request meanwhile (does the proxy still serve?);
5. `--uploads` sequential authenticated uploads of `--upload-mib` MiB (under the limit, forwarded to a local
   upstream that discards them), with RSS after every 10.

Each scenario gets a fresh `bastion serve` (own temporary --home) unless `--one-proxy`: the idle baseline is
taken after start and one small warm-up request. A background thread samples the RSS of the proxy process and
of its audit worker child every 50 ms; a scenario reports the client's answer (status, seconds, body bytes
written before the answer), the peak RSS during it and the final RSS after `--settle` seconds of idle, both
relative to the baseline. Targets, on the proxy process: peak < baseline + 64 MiB, final <= baseline + 10%;
in scenario 4 also every stalled connection closed within the wait and the normal request served (the audit
worker's figures are shown against the same thresholds, not as a target: it keeps at most 1 MiB of a body).
The JSON output adds each scenario's VmHWM of the proxy (the true peak; with `--one-proxy`, of the whole run).
Bodies are
one JSON document produced in 256 KiB pieces (never whole in this process), sent by a plain socket in
absolute form (plain HTTP proxying). The policy allows the agent to POST to the upstream with no body
condition; `--body-rule` adds a deny rule with a JSON condition on the same calls, so the body is needed
(JSON conditions fail closed on bodies over 1 MiB, so the uploads of scenario 5 then get 403, after the body
was read).
Extra `bastion serve` flags (timeouts, limits) pass through `--serve-arg=FLAG` (mind the `=`).

Exit status is non-zero only when the setup fails, never on a missed target. All traffic stays on 127.0.0.1.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import os
import select
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import proxy_bench as pb  # noqa: E402  (this directory: machine(), spawn, wait_for, stop)

AGENT, TOKEN = "bench-bot", "bench-token-secret"
MIB = 1 << 20
PIECE = 256 << 10
"""Body pieces the client writes and the upstream reads: big enough to be cheap, small enough to never matter."""
SAMPLE_EVERY = 0.05
TRICKLE_EVERY = 5.0
"""Seconds between two header bytes of a trickling connection: keeps an idle timer from firing, not a header
deadline."""
PEAK_BUDGET_MIB = 64.0
FINAL_BUDGET = 0.10
STALL_KINDS = ("silent", "request line", "headers", "trickle")


# -- upstream (child process) ----------------------------------------------------------------------------------


def role_upstream() -> None:
    """An HTTP/1.1 upstream that reads any body (Content-Length or chunked) in pieces and discards it, then
    answers 200 with the byte count. Prints its port; serves until killed. Never buffers a body: what it costs
    must not blur the proxy's figures on the same machine."""

    async def main() -> None:
        server = await asyncio.start_server(_serve_upstream, "127.0.0.1", 0)
        print(f"upstream port {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


async def _serve_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            received = await _discard_body(reader, head)
            body = json.dumps({"received": received}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass  # the peer went away or spoke nonsense: either way this connection is done
    finally:
        writer.close()


async def _discard_body(reader: asyncio.StreamReader, head: bytes) -> int:
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    if b"chunked" in fields.get(b"transfer-encoding", b""):
        total = 0
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await _skip(reader, size)
            await reader.readexactly(2)
            total += size
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return total
    size = int(fields.get(b"content-length", b"0"))
    await _skip(reader, size)
    return size


async def _skip(reader: asyncio.StreamReader, size: int) -> None:
    while size > 0:
        data = await reader.read(min(size, PIECE))
        if not data:
            raise asyncio.IncompleteReadError(b"", size)
        size -= len(data)


# -- memory sampling ---------------------------------------------------------------------------------------------


def _rss_reader() -> Callable[[int], float | None]:
    """psutil when this venv has it, /proc otherwise (Linux): RSS in MiB, None once the process is gone."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        def from_proc(pid: int) -> float | None:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            return int(line.split()[1]) / 1024
            except (OSError, ValueError):
                pass
            return None
        return from_proc

    def from_psutil(pid: int) -> float | None:
        try:
            return psutil.Process(pid).memory_info().rss / MIB
        except psutil.Error:
            return None
    return from_psutil


rss_mib = _rss_reader()


def high_water_mib(pid: int) -> float | None:
    """VmHWM: the most RSS the process ever had, which no sampling interval can miss (Linux only)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def audit_worker_pid(pid: int) -> int | None:
    """The audit worker: the child of `bastion serve` running `bastion.audit.worker` (any thread may have
    started it, so every task's children are looked at)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if b"bastion.audit.worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                        return int(child)
    return None


@dataclass
class Sample:
    t: float
    proxy: float | None
    worker: float | None


class Sampler:
    """Samples the RSS of the proxy and its audit worker every 50 ms on a thread, so a peak between two
    scenario steps is not missed; the worker is looked up again whenever it is not (or no longer) there."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[Sample] = []
        self._worker: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def read(self) -> Sample:
        worker = rss_mib(self._worker) if self._worker is not None else None
        if worker is None:
            self._worker = audit_worker_pid(self.pid)
            worker = rss_mib(self._worker) if self._worker is not None else None
        return Sample(time.monotonic(), rss_mib(self.pid), worker)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.samples.append(self.read())

    def since(self, t0: float) -> list[Sample]:
        return [s for s in self.samples if s.t >= t0]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _peak(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# -- client ------------------------------------------------------------------------------------------------------


def basic_auth() -> str:
    return "Basic " + base64.b64encode(f"{AGENT}:{TOKEN}".encode()).decode()


def json_body(size: int) -> Iterator[bytes]:
    """`size` bytes of one JSON document `{"model": "bench", "pad": "aaa…"}`, piece by piece: JSON so that a
    rule with a JSON condition can evaluate it (`--body-rule`), pieces so this process never holds it."""
    head, tail = b'{"model": "bench", "pad": "', b'"}'
    pad = max(0, size - len(head) - len(tail))
    block = b"a" * PIECE
    yield head
    while pad > 0:
        n = min(pad, PIECE)
        yield block if n == PIECE else block[:n]
        pad -= n
    yield tail


def framed(pieces: Iterator[bytes], chunked: bool) -> Iterator[tuple[bytes, int]]:
    """(bytes to write, body bytes they carry): chunked transfer coding or the bare pieces."""
    for piece in pieces:
        yield (b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece), len(piece)
    if chunked:
        yield b"0\r\n\r\n", 0


@dataclass
class Answer:
    status: str  # the HTTP status the client got, or "reset", "closed", "timeout", "refused"
    seconds: float  # until the status line (or the failure)
    sent: int  # body bytes the client had written by then


def post(proxy_port: int, url: str, size: int, *, chunked: bool, auth: bool, timeout: float) -> Answer:
    """POST a `size`-byte JSON body to `url` through the proxy (absolute form), stopping to write as soon as an
    answer arrives: a proxy that refuses early saves the client the rest of the upload too."""
    lines = [f"POST {url} HTTP/1.1", f"Host: {urlsplit(url).netloc}", "Content-Type: application/json"]
    if auth:
        lines.append(f"Proxy-Authorization: {basic_auth()}")
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    frames = itertools.chain([(head, 0)], framed(json_body(size), chunked))
    t0 = time.perf_counter()
    try:
        sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    except OSError:
        return Answer("refused", time.perf_counter() - t0, 0)
    try:
        sock.setblocking(False)
        return _exchange(sock, frames, t0, t0 + timeout)
    finally:
        sock.close()


def _exchange(sock: socket.socket, frames: Iterator[tuple[bytes, int]], t0: float, deadline: float) -> Answer:
    pending: memoryview | None = None
    carried = sent = 0
    got = bytearray()
    writing = True
    while (left := deadline - time.perf_counter()) > 0:
        if writing and pending is None:
            nxt = next(frames, None)
            if nxt is None:
                writing = False
            else:
                pending, carried = memoryview(nxt[0]), nxt[1]
        readable, writable, _ = select.select([sock], [sock] if writing else [], [], min(left, 1.0))
        try:
            if readable:
                data = sock.recv(65536)
                got += data
                status = _status(got)
                if status or not data:
                    return Answer(status or "closed", time.perf_counter() - t0, sent)
            elif writable and pending is not None:
                pending = pending[sock.send(pending):]
                if not pending:
                    sent += carried
                    pending = None
        except BlockingIOError:
            continue
        except OSError:
            return Answer(_status(got) or "reset", time.perf_counter() - t0, sent)
    return Answer("timeout", time.perf_counter() - t0, sent)


def _status(got: bytearray) -> str:
    line, sep, _ = bytes(got[:200]).partition(b"\r\n")
    parts = line.split()
    return parts[1].decode("ascii", "replace") if sep and len(parts) > 1 else ""


# -- the proxy under test ----------------------------------------------------------------------------------------


def policy_yaml(body_rule: bool) -> str:
    sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    lines = [
        "version: 1",
        "defaults: {effect: deny}",
        "agents:",
        f"  {AGENT}: {{roles: [bench], token_sha256: {sha}}}",
        "rules:",
        "  - id: upstream-post",
        "    effect: allow",
        f"    agents: [{AGENT}]",
        "    match: {host: 127.0.0.1, method: POST}",
    ]
    if body_rule:
        lines += ["  - id: no-forbidden-model", "    effect: deny", f"    agents: [{AGENT}]",
                  "    match: {host: 127.0.0.1, method: POST, json: {model: {in: [forbidden]}}}"]
    lines += ["network:", "  allow_private: [\"127.0.0.0/8\"]"]
    return "\n".join(lines) + "\n"


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    port: int
    sampler: Sampler
    log: Path
    base_proxy: float = 0.0
    base_worker: float | None = None

    @classmethod
    def start(cls, tmp: Path, name: str, rules: Path, serve_args: list[str]) -> Proxy:
        """`bastion serve` on free ports with a fresh --home, audit on (the default): SystemExit if it won't."""
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("BASTION_")},
               "BASTION_LOG_LEVEL": "WARNING"}
        log = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "bastion", "serve", "--rules", str(rules), "--listen", "127.0.0.1:0",
               "--admin", "127.0.0.1:0", "--home", str(tmp / f"home-{name}"), *serve_args]
        proc = pb.spawn(cmd, log, env)
        try:
            port = int(pb.wait_for(r"proxy on http://127\.0\.0\.1:(\d+)", log, proc).group(1))
        except BaseException:
            pb.stop(proc)
            raise
        return cls(proc, port, Sampler(proc.pid), log)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def settle_baseline(self, url: str) -> None:
        """One small request (code paths loaded, audit worker connected), then the median of 1 s of idle."""
        answer = post(self.port, url, 1024, chunked=False, auth=True, timeout=30)
        if answer.status != "200":
            self.stop()
            raise SystemExit(f"warm-up request got {answer.status}, not 200:\n{self.log.read_text()}")
        time.sleep(1.0)
        t0 = time.monotonic()
        time.sleep(1.0)
        window = self.sampler.since(t0)
        base = _median([s.proxy for s in window])
        if base is None:
            raise SystemExit(f"cannot read the RSS of pid {self.proc.pid}")
        self.base_proxy, self.base_worker = base, _median([s.worker for s in window])

    def stop(self) -> None:
        self.sampler.stop()
        pb.stop(self.proc)


# -- scenarios ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    client: str
    seconds: float | None
    sent_mib: float | None
    detail: dict[str, object] = field(default_factory=dict)


@dataclass
class Result:
    key: str
    title: str
    client: str
    seconds: float | None
    sent_mib: float | None
    proxy_base: float
    proxy_start: float | None  # relative to the baseline, MiB
    proxy_peak: float | None
    proxy_final: float | None
    worker_base: float | None
    worker_start: float | None
    worker_peak: float | None
    worker_final: float | None
    proxy_exit: int | None
    missed: list[str]
    detail: dict[str, object]


def big_upload(chunked: bool, auth: bool) -> Callable[[Proxy, str, argparse.Namespace], Outcome]:
    def run(proxy: Proxy, url: str, args: argparse.Namespace) -> Outcome:
        answer = post(proxy.port, url, args.big_mib * MIB, chunked=chunked, auth=auth, timeout=args.timeout)
        return Outcome(answer.status, answer.seconds, answer.sent / MIB)
    return run


def stalled_connections(proxy: Proxy, url: str, args: argparse.Namespace) -> Outcome:
    """Open the connections, stall them, and watch which the proxy closes (EOF or reset, after any answer such
    as 408) within `--stall-seconds`; a normal request is sent once they are all open."""
    netloc = urlsplit(url).netloc
    line = f"POST {url} HTTP/1.1\r\n".encode()
    first = {"silent": b"", "request line": line[:-8], "headers": line + f"Host: {netloc}\r\nX-Stall: ".encode()}
    first["trickle"] = first["headers"]
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, tuple[str, float]] = {}
    closed: dict[str, list[float]] = {kind: [] for kind in STALL_KINDS}
    kept: Counter[str] = Counter()  # connections the proxy accepted, by kind
    refused = 0
    for i in range(args.connections):
        kind = STALL_KINDS[i % len(STALL_KINDS)]
        try:
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            sock.sendall(first[kind])
        except OSError:
            refused += 1
            continue
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        opened[sock] = (kind, time.monotonic())
        kept[kind] += 1
    probe = post(proxy.port, url, 1024, chunked=False, auth=True, timeout=30)

    def gone(sock: socket.socket) -> None:
        kind, t_open = opened.pop(sock)
        closed[kind].append(time.monotonic() - t_open)
        sel.unregister(sock)
        sock.close()

    deadline = time.monotonic() + args.stall_seconds
    next_trickle = time.monotonic() + TRICKLE_EVERY
    try:
        while opened and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(min(left, 0.5)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if sock.recv(65536):
                        continue  # an answer (408?) before the close: the close is what counts
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                gone(sock)
            if time.monotonic() >= next_trickle:
                next_trickle += TRICKLE_EVERY
                for sock in [s for s, (kind, _) in opened.items() if kind == "trickle"]:
                    try:
                        sock.send(b"a")
                    except BlockingIOError:
                        pass
                    except OSError:
                        gone(sock)
    finally:
        for sock in list(opened):
            sel.unregister(sock)
            sock.close()
        sel.close()
    times = [t for ts in closed.values() for t in ts]
    per_kind = {kind: len(ts) for kind, ts in closed.items()}
    return Outcome(f"closed {len(times)}/{kept.total()}, probe {probe.status}",
                   statistics.median(times) if times else None, None,
                   {"closed": per_kind, "opened_per_kind": {k: kept[k] for k in STALL_KINDS},
                    "left_open": kept.total() - len(times), "refused": refused, "waited_s": args.stall_seconds,
                    "probe": asdict(probe), "close_seconds": sorted(round(t, 2) for t in times)})


def many_uploads(proxy: Proxy, url: str, args: argparse.Namespace) -> Outcome:
    """Sequential uploads on a new connection each (separate calls, as an agent's tools make them), with the RSS
    after every 10th."""
    statuses: Counter[str] = Counter()
    every10: list[dict[str, float | int | None]] = []
    sent = 0
    t0 = time.perf_counter()
    for i in range(1, args.uploads + 1):
        answer = post(proxy.port, url, args.upload_mib * MIB, chunked=False, auth=True, timeout=args.timeout)
        statuses[answer.status] += 1
        sent += answer.sent
        if i % 10 == 0 or i == args.uploads:
            s = proxy.sampler.read()
            every10.append({"after": i, "proxy": _delta(s.proxy, proxy.base_proxy),
                            "worker": _delta(s.worker, proxy.base_worker)})
            print(f"    after {i:3d} uploads: proxy {_mib(every10[-1]['proxy'])} MiB, "
                  f"worker {_mib(every10[-1]['worker'])} MiB", file=sys.stderr, flush=True)
        if not proxy.alive():
            break
    client = ", ".join(f"{status} x{n}" for status, n in statuses.most_common())
    return Outcome(client, time.perf_counter() - t0, sent / MIB, {"rss_every_10": every10})


def scenarios(args: argparse.Namespace) -> dict[str, tuple[str, Callable[[Proxy, str, argparse.Namespace], Outcome]]]:
    big = args.big_mib
    return {
        "unauth-chunked": (f"1. {big} MiB chunked, no credentials (407)", big_upload(chunked=True, auth=False)),
        "auth-chunked": (f"2. {big} MiB chunked, over the limit (413)", big_upload(chunked=True, auth=True)),
        "auth-length": (f"3. {big} MiB Content-Length, over the limit (413)", big_upload(chunked=False, auth=True)),
        "stalled": (f"4. {args.connections} stalled connections", stalled_connections),
        "uploads": (f"5. {args.uploads} x {args.upload_mib} MiB uploads (200)", many_uploads),
    }


def _delta(value: float | None, base: float | None) -> float | None:
    return value - base if value is not None and base is not None else None


def run_scenario(key: str, title: str, run: Callable[[Proxy, str, argparse.Namespace], Outcome], proxy: Proxy,
                 url: str, args: argparse.Namespace) -> Result:
    print(f"  {title} ...", file=sys.stderr, flush=True)
    start = proxy.sampler.read()
    t0 = time.monotonic()
    outcome = run(proxy, url, args)
    time.sleep(args.settle)
    end = proxy.sampler.read()
    outcome.detail["proxy_vmhwm_mib"] = high_water_mib(proxy.proc.pid)  # process lifetime, start included
    window = [*proxy.sampler.since(t0), end]
    result = Result(
        key, title, outcome.client, outcome.seconds, outcome.sent_mib,
        proxy.base_proxy, _delta(start.proxy, proxy.base_proxy),
        _delta(_peak([s.proxy for s in window]), proxy.base_proxy), _delta(end.proxy, proxy.base_proxy),
        proxy.base_worker, _delta(start.worker, proxy.base_worker),
        _delta(_peak([s.worker for s in window]), proxy.base_worker), _delta(end.worker, proxy.base_worker),
        proxy.proc.poll(), [], outcome.detail)
    result.missed = missed_targets(result)
    print(f"    {result.client} in {_num(result.seconds)} s; proxy peak {_mib(result.proxy_peak)} final "
          f"{_mib(result.proxy_final)} MiB; worker peak {_mib(result.worker_peak)} final "
          f"{_mib(result.worker_final)} MiB", file=sys.stderr, flush=True)
    return result


def missed_targets(r: Result) -> list[str]:
    """The proxy process: peak < baseline + 64 MiB, final <= baseline + 10%; a proxy that died missed everything.
    Stalled connections must all be closed within the wait, and the proxy must still serve meanwhile."""
    missed = []
    if r.proxy_exit is not None:
        missed.append(f"proxy exited ({r.proxy_exit})")
    if r.proxy_peak is None or r.proxy_peak >= PEAK_BUDGET_MIB:
        missed.append("peak")
    if r.proxy_final is None or r.proxy_final > FINAL_BUDGET * r.proxy_base:
        missed.append("final")
    if r.key == "stalled":
        if r.detail["left_open"]:
            missed.append(f"{r.detail['left_open']} left open")
        probe = r.detail["probe"]
        assert isinstance(probe, dict)
        if probe["status"] != "200":
            missed.append(f"probe got {probe['status']}")
    return missed


def worker_within(r: Result) -> bool | None:
    """The proxy's thresholds applied to the audit worker: shown, not a target (it stores at most
    `audit.max_body_bytes` of a body, so its growth is bounded by design, not by this fix)."""
    if r.worker_base is None or r.worker_peak is None or r.worker_final is None:
        return None
    return r.worker_peak < PEAK_BUDGET_MIB and r.worker_final <= FINAL_BUDGET * r.worker_base


# -- report ------------------------------------------------------------------------------------------------------


def _mib(value: object) -> str:
    """A signed MiB delta, '-' when unknown."""
    return f"{value:+.0f}" if isinstance(value, float | int) else "-"


def _num(value: float | None, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def table(results: list[Result]) -> str:
    rows = ["| scenario | client got | s | sent MiB | proxy base MiB | start | peak | final "
            "| worker base MiB | start | peak | final | proxy targets |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        sent = f"{r.sent_mib:.0f}" if r.sent_mib is not None else "-"
        worker_base = f"{r.worker_base:.0f}" if r.worker_base is not None else "-"
        rows.append(f"| {r.title} | {r.client} | {_num(r.seconds)} | {sent} | {r.proxy_base:.0f} | "
                    f"{_mib(r.proxy_start)} | {_mib(r.proxy_peak)} | {_mib(r.proxy_final)} | {worker_base} | "
                    f"{_mib(r.worker_start)} | {_mib(r.worker_peak)} | {_mib(r.worker_final)} | "
                    f"{'met' if not r.missed else 'MISSED: ' + ', '.join(r.missed)} |")
    return "\n".join(rows)


def details(results: list[Result]) -> str:
    lines = []
    for r in results:
        if r.key == "stalled":
            closed, opened = r.detail["closed"], r.detail["opened_per_kind"]
            assert isinstance(closed, dict) and isinstance(opened, dict)
            kinds = ", ".join(f"{k} {closed[k]}/{opened[k]}" for k in STALL_KINDS)
            lines.append(f"- {r.title}: closed by the proxy within {r.detail['waited_s']:g} s: {kinds}; refused at "
                         f"connect: {r.detail['refused']}; median seconds to close: {_num(r.seconds)}.")
        elif r.key == "uploads":
            steps = r.detail["rss_every_10"]
            assert isinstance(steps, list)
            shown = ", ".join(f"{s['after']}: {_mib(s['proxy'])}/{_mib(s['worker'])}" for s in steps)
            lines.append(f"- {r.title}: RSS over baseline after N uploads (proxy/worker MiB): {shown}.")
    return "\n".join(lines)


def verdict(results: list[Result]) -> str:
    met = sum(1 for r in results if not r.missed)
    lines = [f"Targets (the proxy process): peak < baseline + {PEAK_BUDGET_MIB:.0f} MiB, final <= baseline + "
             f"{FINAL_BUDGET:.0%}; stalled connections all closed within the wait, a normal call still served: "
             f"{met} of {len(results)} scenarios met."]
    for r in results:
        within = worker_within(r)
        worker = {None: "no audit worker seen", True: "within", False: "outside"}[within]
        lines.append(f"- {r.title}: {'met' if not r.missed else 'MISSED (' + ', '.join(r.missed) + ')'}; "
                     f"audit worker {worker} the same thresholds (not a target)")
    return "\n".join(lines)


# -- orchestration -----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="70 MiB big uploads, 20 connections, 10 uploads")
    ap.add_argument("--big-mib", type=int, help="size of the oversized uploads (default 700, quick 70)")
    ap.add_argument("--connections", type=int, help="stalled connections (default 200, quick 20)")
    ap.add_argument("--uploads", type=int, help="sequential forwarded uploads (default 100, quick 10)")
    ap.add_argument("--upload-mib", type=int, default=20, help="size of each forwarded upload (default 20)")
    ap.add_argument("--stall-seconds", type=float, default=75.0,
                    help="how long scenario 4 waits for the proxy to close stalled connections (default 75)")
    ap.add_argument("--settle", type=float, default=5.0, help="idle seconds before the final RSS (default 5)")
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout per upload, seconds (default 300)")
    ap.add_argument("--only", action="append", help="scenarios to run: unauth-chunked, auth-chunked, auth-length, "
                    "stalled, uploads (may repeat)")
    ap.add_argument("--one-proxy", action="store_true",
                    help="run every scenario on the same `bastion serve` (growth adds up) instead of a fresh one each")
    ap.add_argument("--body-rule", action="store_true",
                    help="add a deny rule with a JSON condition on the uploads, so the proxy needs their body "
                    "(bodies over 1 MiB then fail it closed: 403)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="FLAG",
                    help="extra `bastion serve` argument, e.g. --serve-arg=--header-timeout=10 (may repeat)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = ap.parse_args()
    for name, full, quick in (("big_mib", 700, 70), ("connections", 200, 20), ("uploads", 100, 10)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main() -> None:
    args = parse_args()
    table_of = scenarios(args)
    selected = args.only or list(table_of)
    unknown = [k for k in selected if k not in table_of]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {list(table_of)}")
    tmp = Path(tempfile.mkdtemp(prefix="bastion-memory-bench-"))
    upstream: subprocess.Popen[bytes] | None = None
    proxy: Proxy | None = None
    results: list[Result] = []
    try:
        upstream = pb.spawn([sys.executable, __file__, "_upstream"], tmp / "upstream.log")
        up_port = pb.wait_for(r"upstream port (\d+)", tmp / "upstream.log", upstream).group(1)
        url = f"http://127.0.0.1:{up_port}/upload"
        rules = tmp / "rules.yaml"
        rules.write_text(policy_yaml(args.body_rule))
        for n, key in enumerate(selected):
            if proxy is None or not proxy.alive():
                if proxy is not None:
                    proxy.stop()
                proxy = Proxy.start(tmp, f"serve-{n}", rules, args.serve_arg)
                proxy.settle_baseline(url)
            title, run = table_of[key]
            results.append(run_scenario(key, title, run, proxy, url, args))
            if not args.one_proxy:
                proxy.stop()
                proxy = None
    finally:
        if proxy is not None:
            proxy.stop()
        if upstream is not None:
            pb.stop(upstream)
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, results)


def report(args: argparse.Namespace, results: list[Result]) -> None:
    settings = {k: getattr(args, k) for k in ("big_mib", "connections", "uploads", "upload_mib", "stall_seconds",
                                              "settle", "one_proxy", "body_rule", "serve_arg")}
    if args.json:
        print(json.dumps({"machine": pb.machine(), "settings": settings, "rss": "psutil" if "psutil" in sys.modules
                          else "/proc/PID/status VmRSS", "results": [asdict(r) for r in results],
                          "targets": {"peak_below_baseline_plus_mib": PEAK_BUDGET_MIB,
                                      "final_within_fraction_of_baseline": FINAL_BUDGET,
                                      "met": all(not r.missed for r in results),
                                      "worker_within": [worker_within(r) for r in results]}}, indent=2))
        return
    print(f"Machine: {pb.machine()}")
    print(f"{'One `bastion serve` for all scenarios' if args.one_proxy else 'A fresh `bastion serve` per scenario'}"
          f" (audit on{', serve args ' + ' '.join(args.serve_arg) if args.serve_arg else ''}"
          f"{', a JSON body rule' if args.body_rule else ', no body rule'}); baseline = idle RSS after start and one "
          f"warm-up request; start/peak/final in MiB over it, final after {args.settle:g} s idle; RSS sampled every "
          f"{SAMPLE_EVERY * 1000:.0f} ms. 'sent' = body bytes the client had written when the answer came.\n")
    print(table(results))
    extra = details(results)
    if extra:
        print("\n" + extra)
    print("\n" + verdict(results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        role_upstream()
    else:
        main()
