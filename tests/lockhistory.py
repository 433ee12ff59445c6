"""Lock histories: record what contending workers saw, then prove offline that the lock kept them apart.

A general linearizability checker is not needed: every grant carries a fence from one atomic counter, and
that fence *is* the linearization order. The checker only confirms that real time agrees with fence order,
that consecutive grants never overlap inside a lease, and that the fenced resource only ever moved forward.

History format: JSON lines, one event each, from any number of files (one per worker process). Times are
`time.monotonic_ns()`, one clock for every process on a Linux host.

    {"op": "acquire", "proc", "key", "inv", "comp", "ok", "fence", "ttl_ns"}   ok: true granted or renewed,
                                                                              false refused, null unknown
    {"op": "verify",  "proc", "key", "fence", "inv", "comp", "ok"}
    {"op": "release", "proc", "key", "fence", "inv", "comp", "ok"}
    {"op": "write",   "proc", "key", "fence", "t", "accepted"}                 t: when the resource decided
    {"op": "admin_release" | "handoff", "key", "inv", "comp", "ok"}          ends any lease of key from inv
    {"op": "chaos",   "what", "t"}                                            informational

"Unknown" outcomes (a store error: the reply was lost, the script may have run) never count as evidence
that something happened, and never as evidence that it did not: a lease's *guaranteed* end only uses
successful renewals, and any release attempt may have ended it. That keeps the checker free of false alarms
under connection kills while it still catches a lock that grants twice.

The module also holds the reusable harness: `Recorder`, the `FencedRegister` resource, a `LockClient`
protocol with a store-backed implementation, the worker loop (`run_worker`, `worker_process`) and a private,
restartable `RedisServer` (reachability of the shared one: tests/services.py).
`python tests/lockhistory.py FILE_OR_DIR...` checks recorded histories.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import fcntl
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Event = dict[str, Any]

EPS_NS = 5_000_000
"""Slack for clock reads on both sides of a store call (Redis expires on its own clock)."""


# --- recording ----------------------------------------------------------------------------------------------


class Recorder:
    """Appends events to a JSON-lines file, one flushed line each, so a killed or frozen worker still leaves
    a valid prefix of its history."""

    def __init__(self, path: str | Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def record(self, **event: Any) -> None:
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def load_history(paths: Iterable[str | Path]) -> list[Event]:
    """Every event of the given files (directories: their `*.jsonl`). A torn last line is ignored."""
    events: list[Event] = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            for line in file.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(line))
    return events


class FencedRegister:
    """The protected resource: per key, accepts a write iff its fence is >= the highest fence accepted so far.

    State lives in one small file per key under `directory`, guarded by `flock`, so writers in different
    processes are serialised; `t` is read while the lock is held, which makes it the resource's own order.
    """

    def __init__(self, directory: str | Path) -> None:
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)

    def write(self, key: str, fence: int) -> tuple[bool, int]:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        with open(self._dir / f"{name}.fence", "a+", encoding="ascii") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            text = f.read().strip()
            accepted = fence >= (int(text) if text else 0)
            if accepted:
                f.seek(0)
                f.truncate()
                f.write(str(fence))
                f.flush()
            t = time.monotonic_ns()
            fcntl.flock(f, fcntl.LOCK_UN)
        return accepted, t


# --- the worker loop ----------------------------------------------------------------------------------------


class LockClient(Protocol):
    """What a worker needs from "the lock": a store directly, or (later) a proxy in front of a resource."""

    async def acquire(self, key: str, ttl: float) -> int | None:
        """The fence if granted or renewed, None if another agent holds it. Raises if the outcome is unknown."""
        ...

    async def verify(self, key: str, fence: int) -> bool: ...

    async def write(self, key: str, fence: int) -> tuple[bool, int]:
        """Write to the fenced resource: (accepted, monotonic time the resource decided)."""
        ...

    async def release(self, key: str, fence: int) -> bool: ...

    async def close(self) -> None: ...


class StoreLockClient:
    """`LockClient` on a `bastion.coord` store, the worker's process name as the agent."""

    def __init__(self, store: Any, agent: str, register: FencedRegister) -> None:
        self.store, self.agent, self.register = store, agent, register

    async def acquire(self, key: str, ttl: float) -> int | None:
        result = await self.store.acquire(key, self.agent, ttl)
        return result.fence if result.granted else None

    async def verify(self, key: str, fence: int) -> bool:
        return bool(await self.store.verify(key, self.agent, fence))

    async def write(self, key: str, fence: int) -> tuple[bool, int]:
        return self.register.write(key, fence)

    async def release(self, key: str, fence: int) -> bool:
        return bool(await self.store.release(key, self.agent, fence))

    async def close(self) -> None:
        await self.store.close()


@dataclass(frozen=True)
class StoreClientFactory:
    """Picklable recipe for a `StoreLockClient`, so spawned worker processes build their own store.

    `store` must be picklable: a module-level callable or a `functools.partial` of one.
    """

    store: Callable[[], Any]
    register_dir: str

    def __call__(self, agent: str) -> StoreLockClient:
        return StoreLockClient(self.store(), agent, FencedRegister(self.register_dir))


@dataclass(frozen=True)
class WorkerConfig:
    """One worker: `proc` is also its agent name. Pauses are multiples of the ttl so they outlive the lease."""

    proc: str
    keys: tuple[str, ...]
    ttl: float
    duration: float
    history: str
    seed: int
    pause_p: float = 0.08   # per step: stall inside the critical section, past the lease
    renew_p: float = 0.3    # per step: renew before writing
    stale_p: float = 0.05   # per step: stall between verify and write (only the fence can stop that write)


async def run_worker(cfg: WorkerConfig, client: LockClient) -> None:
    """Acquire a random key, do 1-3 verified fenced writes (sometimes stalling), release; until time is up.

    Every call is recorded with its invocation and completion time. An exception is an unknown outcome:
    recorded as `ok: null`, after which the worker moves on (that is what chaos is for).
    """
    rng = random.Random(cfg.seed)
    rec = Recorder(cfg.history)
    now = time.monotonic_ns
    end = now() + int(cfg.duration * 1e9)
    ttl_ns = int(cfg.ttl * 1e9)

    async def stall() -> None:
        await asyncio.sleep(rng.uniform(1.3, 2.0) * cfg.ttl)

    async def acquire(key: str) -> int | None:
        inv = now()
        try:
            fence = await client.acquire(key, cfg.ttl)
        except Exception as e:
            rec.record(op="acquire", proc=cfg.proc, key=key, inv=inv, comp=now(), ok=None, fence=None,
                       ttl_ns=ttl_ns, error=type(e).__name__)
            return None
        rec.record(op="acquire", proc=cfg.proc, key=key, inv=inv, comp=now(), ok=fence is not None,
                   fence=fence, ttl_ns=ttl_ns)
        return fence

    async def call(op: str, key: str, fence: int, fn: Callable[[str, int], Any]) -> bool | None:
        inv = now()
        try:
            ok = bool(await fn(key, fence))
        except Exception as e:
            rec.record(op=op, proc=cfg.proc, key=key, fence=fence, inv=inv, comp=now(), ok=None,
                       error=type(e).__name__)
            return None
        rec.record(op=op, proc=cfg.proc, key=key, fence=fence, inv=inv, comp=now(), ok=ok)
        return ok

    try:
        while now() < end:
            key = rng.choice(cfg.keys)
            fence = await acquire(key)
            if fence is None:
                await asyncio.sleep(rng.uniform(0.001, 0.02))
                continue
            for _ in range(rng.randint(1, 3)):
                roll = rng.random()
                if roll < cfg.pause_p:
                    await stall()
                elif roll < cfg.pause_p + cfg.renew_p:
                    renewed = await acquire(key)
                    if renewed is None:
                        break
                    fence = renewed
                if not await call("verify", key, fence, client.verify):
                    break
                if rng.random() < cfg.stale_p:
                    await stall()
                try:
                    accepted, t = await client.write(key, fence)
                except Exception as e:
                    rec.record(op="write", proc=cfg.proc, key=key, fence=fence, t=now(), accepted=None,
                               error=type(e).__name__)
                    break
                rec.record(op="write", proc=cfg.proc, key=key, fence=fence, t=t, accepted=accepted)
            await call("release", key, fence, client.release)
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        rec.close()


def worker_process(cfg: WorkerConfig, factory: Callable[[str], LockClient], ready: Any) -> None:
    """Entry point of a spawned worker: build the client, wait at the barrier with the others, run."""

    async def main() -> None:
        client = factory(cfg.proc)
        ready.wait()
        await run_worker(cfg, client)

    asyncio.run(main())


# --- the checker --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    kind: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.key}: {self.message}"


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def ok(self) -> bool:
        return not self.violations

    def format(self, limit: int = 25) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items()))
        lines = [f"{len(self.violations)} violation(s); {counts}"]
        lines += [f"  {v}" for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"  ... and {len(self.violations) - limit} more")
        lines += [f"  note: {n}" for n in self.notes[:limit]]
        return "\n".join(lines)


@dataclass
class _Grant:
    """One grant (fence) with what the history proves about its lease.

    `valid_until`: the lease surely lasted at least until here (the last successful renewal's invocation +
    ttl, cut short by the first release that may have succeeded). `may_last_until`: it surely ended by here
    (the last renewal that may have happened, at its completion, + ttl).
    """

    fence: int
    proc: str
    inv: int
    comp: int
    ttl_ns: int
    valid_until: int
    may_last_until: int


class _Clock:
    """Formats monotonic times relative to the start of the history, in ms."""

    def __init__(self, events: list[Event]) -> None:
        times = [e[k] for e in events for k in ("inv", "t") if isinstance(e.get(k), int)]
        self.t0 = min(times, default=0)

    def __call__(self, t: int) -> str:
        return f"+{(t - self.t0) / 1e6:.3f}ms"


def check_history(events: list[Event], eps_ns: int = EPS_NS) -> Report:
    """Check a recorded history. Violations (each fails the run):

    fence-reused      one fence granted to two processes
    order             a grant completed before an older-fenced grant was even requested
    overlap           a grant completed while the previous holder's lease was surely still valid
    release           a release succeeded after a newer fence had been granted
    verify            verify confirmed a fence after a newer grant, or after its lease surely ended
    resource          the resource accepted a fence lower than one it had accepted before
    write-unowned     an accepted write carries a fence its writer was never granted

    Notes (allowed by fencing, reported): writes the resource accepted from a holder whose lease had ended
    while the next holder had not written yet, and writes the resource rejected (stale writes stopped).
    """
    report = Report()
    clock = _Clock(events)
    by_key: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        if "key" in e:
            by_key[e["key"]].append(e)
    for key in sorted(by_key):
        _check_key(key, by_key[key], report, clock, eps_ns)
    return report


def _grants(key: str, evs: list[Event], report: Report, clock: _Clock) -> dict[int, _Grant]:
    grants: dict[int, _Grant] = {}
    for e in sorted((e for e in evs if e["op"] == "acquire" and e.get("ok")), key=lambda e: e["comp"]):
        g = grants.get(e["fence"])
        if g is None:
            grants[e["fence"]] = _Grant(e["fence"], e["proc"], e["inv"], e["comp"], e["ttl_ns"],
                                        valid_until=e["inv"] + e["ttl_ns"], may_last_until=e["comp"] + e["ttl_ns"])
            report.stats["grants"] += 1
        elif g.proc != e["proc"]:
            report.violations.append(Violation(
                "fence-reused", key, f"fence {g.fence} granted to {g.proc} at {clock(g.comp)} and to "
                f"{e['proc']} at {clock(e['comp'])}"))
        else:
            g.valid_until = max(g.valid_until, e["inv"] + e["ttl_ns"])
            g.may_last_until = max(g.may_last_until, e["comp"] + e["ttl_ns"])
            report.stats["renewals"] += 1
    by_proc: dict[str, list[_Grant]] = defaultdict(list)
    for g in grants.values():
        by_proc[g.proc].append(g)
    for e in evs:
        if e["op"] == "acquire" and e.get("ok") is None:
            # An acquire whose outcome is unknown may have renewed the lease its caller held at the time.
            held = [g for g in by_proc.get(e.get("proc", ""), ()) if g.inv <= e["inv"]]
            if held:
                g = max(held, key=lambda g: g.inv)
                g.may_last_until = max(g.may_last_until, e["comp"] + g.ttl_ns)
    for e in evs:
        if e["op"] == "release" and e.get("fence") in grants:
            # Whatever it answered, a release may have ended the lease: a retried release reports False
            # when its first attempt freed the lock and the reply was lost.
            g = grants[e["fence"]]
            if g.proc == e["proc"]:
                g.valid_until = min(g.valid_until, e["inv"])
        elif e["op"] in ("admin_release", "handoff") and e.get("ok") is not False:
            for g in grants.values():
                if g.inv <= e["inv"]:
                    g.valid_until = min(g.valid_until, e["inv"])
    return grants


def _check_key(key: str, evs: list[Event], report: Report, clock: _Clock, eps: int) -> None:
    grants = _grants(key, evs, report, clock)
    fences = sorted(grants)
    seq = [grants[f] for f in fences]
    report.stats["conflicts"] += sum(1 for e in evs if e["op"] == "acquire" and e.get("ok") is False)
    report.stats["unknown_outcomes"] += sum(1 for e in evs if e.get("op") != "write" and e.get("ok", 0) is None)

    latest: _Grant | None = None     # among older fences: the one requested last ...
    longest: _Grant | None = None    # ... and the one surely valid longest
    for g in seq:
        if latest is not None and g.comp < latest.inv:
            report.violations.append(Violation(
                "order", key, f"fence {g.fence} ({g.proc}) was granted at {clock(g.comp)}, before the older "
                f"fence {latest.fence} ({latest.proc}) was requested at {clock(latest.inv)}"))
        if longest is not None and g.comp + eps < longest.valid_until and g.comp > longest.inv:
            report.violations.append(Violation(
                "overlap", key, f"fence {g.fence} ({g.proc}) granted at {clock(g.comp)} while fence "
                f"{longest.fence} ({longest.proc}) was held until at least {clock(longest.valid_until)} "
                f"({(longest.valid_until - g.comp) / 1e6:.1f} ms overlap)"))
        if latest is None or g.inv > latest.inv:
            latest = g
        if longest is None or g.valid_until > longest.valid_until:
            longest = g

    # first_after[i]: the grant completed first among fences >= fences[i] ("a newer grant existed by t")
    first_after: list[_Grant | None] = [None] * (len(seq) + 1)
    for i in range(len(seq) - 1, -1, -1):
        nxt = first_after[i + 1]
        first_after[i] = seq[i] if nxt is None or seq[i].comp < nxt.comp else nxt

    def newer_before(fence: int, t: int) -> _Grant | None:
        first = first_after[bisect.bisect_right(fences, fence)]
        return first if first is not None and first.comp < t else None

    for e in evs:
        g = grants.get(e.get("fence"))  # type: ignore[arg-type]
        if e["op"] == "release" and e.get("ok"):
            report.stats["releases"] += 1
            newer = newer_before(e["fence"], e["inv"] - eps)
            if newer is not None:
                report.violations.append(Violation(
                    "release", key, f"{e['proc']} released fence {e['fence']} at {clock(e['inv'])}, after "
                    f"fence {newer.fence} ({newer.proc}) was granted at {clock(newer.comp)}"))
        elif e["op"] == "verify" and e.get("ok"):
            newer = newer_before(e["fence"], e["inv"] - eps)
            if newer is not None:
                report.violations.append(Violation(
                    "verify", key, f"{e['proc']} was told fence {e['fence']} still holds at {clock(e['inv'])}, "
                    f"after fence {newer.fence} ({newer.proc}) was granted at {clock(newer.comp)}"))
            elif g is not None and e["inv"] > g.may_last_until + eps:
                report.violations.append(Violation(
                    "verify", key, f"{e['proc']} was told fence {e['fence']} still holds at {clock(e['inv'])}, "
                    f"after its lease ended by {clock(g.may_last_until)}"))
        elif e["op"] == "verify" and e.get("ok") is False:
            report.stats["verify_refused"] += 1

    writes = sorted((e for e in evs if e["op"] == "write" and e.get("accepted") is not None), key=lambda e: e["t"])
    top: Event | None = None
    for w in writes:
        if not w["accepted"]:
            report.stats["writes_rejected"] += 1
            continue
        report.stats["writes_accepted"] += 1
        g = grants.get(w["fence"])
        if g is None or g.proc != w["proc"]:
            owner = "never granted" if g is None else f"granted to {g.proc}"
            report.violations.append(Violation(
                "write-unowned", key, f"{w['proc']} wrote with fence {w['fence']} at {clock(w['t'])}, a fence "
                f"{owner}"))
        if top is not None and w["fence"] < top["fence"]:
            report.violations.append(Violation(
                "resource", key, f"write by {w['proc']} with fence {w['fence']} accepted at {clock(w['t'])} "
                f"after fence {top['fence']} ({top['proc']}) was accepted at {clock(top['t'])}"))
        elif g is not None and (newer := newer_before(w["fence"], w["t"])) is not None:
            report.stats["zombie_writes"] += 1
            report.notes.append(
                f"{key}: {w['proc']} wrote with fence {w['fence']} at {clock(w['t'])} after fence {newer.fence} "
                f"({newer.proc}) was granted at {clock(newer.comp)}; accepted because {newer.proc} had not "
                "written yet (fencing allows this; the proxy's verify narrows it)")
        if top is None or w["fence"] >= top["fence"]:
            top = w


# --- services the tests need --------------------------------------------------------------------------------

def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under `prefix` (and nothing else)."""
    import redis

    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private `redis-server` on a loopback port, without persistence: stopping and starting it again is
    a Redis restart that lost all data (and its script cache)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._dir = tempfile.mkdtemp(prefix="bastion-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def require_binary() -> str:
        """The redis-server path; skip (or under CI=true fail) the calling test when there is none."""
        import pytest
        from services import in_ci

        path = shutil.which("redis-server")
        if path is None:
            message = "redis-server is not installed"
            if in_ci():
                pytest.fail(message + "; CI=true requires it", pytrace=False)
            pytest.skip(message)
        return path

    def start(self, timeout: float = 10.0) -> None:
        import redis

        self._proc = subprocess.Popen(
            [self.require_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", self._dir, "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if self._proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python tests/lockhistory.py FILE_OR_DIR...`: exit 0 when the history holds, 1 with violations."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--eps-ms", type=float, default=EPS_NS / 1e6)
    args = parser.parse_args(argv)
    report = check_history(load_history(args.paths), eps_ns=int(args.eps_ms * 1e6))
    print(report.format(limit=1000))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
