"""Lock histories through real sidecars: a fenced HTTP resource and an agent that works on it via Bastion.

Through a sidecar there is no separate "acquire" call: every request that matches a lock rule *is* an
acquire (grant or renewal), a verify and a write, in that order, inside the proxy. So the agent records each
guarded request as an `acquire` event (from send to answer, with the fence the resource saw), and the
resource records each write it decided, with the writer and the fence. `attribute_forwarded` then joins
the two by request id: a write that reached the resource proves its request was granted even when the agent
never got the answer (a paused sidecar, a client timeout). The result is a history in the format of
`lockhistory.py`, checked by its `check_history`.

`FencedUpstream` (also used by the behavioural tests) answers:

- `POST /res/{key}/write`: a fenced write. Accepted (200) iff the request's `Bastion-Fence` is >= the highest
  fence accepted for `key` so far, else 409; 400 without a fence. `?delay=SECONDS` sits on the write before
  deciding, like a slow network between proxy and resource: by then a newer holder may have written.
- anything else: 200 (or `?status=CODE`), echoing the fence and path.

Every request is recorded in `seen` (method, path with query, fence header, worker, t); writes are also in
`writes` as history events. Bodies are `{"fence": int|null, ...}` so agents learn the fence they worked under.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from aiohttp import web
from lockhistory import Event, Recorder

FENCE = "Bastion-Fence"
WORKER = "X-Worker"
REQ = "X-Req"


class FencedUpstream:
    """The resource the locks protect; see the module docstring. All state lives on the serving loop."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.writes: list[Event] = []
        self._top: dict[str, int] = {}
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _record(self, request: web.Request, fence: str | None, t: int) -> None:
        self.seen.append({"method": request.method, "path": request.path_qs, "fence": fence,
                          "worker": request.headers.get(WORKER), "t": t})

    async def _write(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        raw = request.headers.get(FENCE)
        delay = float(request.query.get("delay", "0"))
        if delay > 0:
            await asyncio.sleep(delay)
        t = time.monotonic_ns()
        self._record(request, raw, t)
        if raw is None or not raw.isdigit():
            return web.json_response({"error": "a write needs exactly one Bastion-Fence", "fence": raw}, status=400)
        fence = int(raw)
        accepted = fence >= self._top.get(key, 0)
        if accepted:
            self._top[key] = fence
        self.writes.append({"op": "write", "proc": request.headers.get(WORKER), "key": key, "fence": fence,
                            "t": t, "accepted": accepted, "req": request.headers.get(REQ)})
        return web.json_response({"accepted": accepted, "fence": fence, "t": t}, status=200 if accepted else 409)

    async def _echo(self, request: web.Request) -> web.Response:
        await request.read()
        raw = request.headers.get(FENCE)
        self._record(request, raw, time.monotonic_ns())
        fence: int | str | None = int(raw) if raw is not None and raw.isdigit() else raw
        return web.json_response({"fence": fence, "path": request.path_qs},
                                 status=int(request.query.get("status", "200")))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/res/{key}/write", self._write)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[FencedUpstream]:
        """Serve on the running loop (for async tests)."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.port = int(runner.addresses[0][1])
            yield self
        finally:
            await runner.cleanup()

    @contextmanager
    def in_thread(self) -> Iterator[FencedUpstream]:
        """Serve on a loop of its own in a background thread (for synchronous tests)."""
        loop = asyncio.new_event_loop()
        ready, stop = threading.Event(), asyncio.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                async with self.serve():
                    ready.set()
                    await stop.wait()
            except BaseException as e:
                failure.append(e)
                ready.set()

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="fenced-upstream",
                                  daemon=True)
        thread.start()
        ready.wait(10)
        if failure:
            raise RuntimeError(f"fenced upstream failed to start: {failure[0]!r}")
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()

    def seen_paths(self) -> list[str]:
        return [s["path"] for s in list(self.seen)]


@dataclass(frozen=True)
class HttpWorkerConfig:
    """One agent. Stalls are multiples of the ttl, so they outlive the lease."""

    proc: str
    keys: tuple[str, ...]
    ttl: float
    duration: float
    seed: int
    stall_p: float = 0.08   # before a later write: the agent thinks past its lease
    slow_p: float = 0.08    # a write the resource sits on past the lease before deciding


async def run_http_worker(cfg: HttpWorkerConfig, client: httpx.AsyncClient, resource: str, rec: Recorder) -> None:
    """Pick a key, send 1-3 guarded writes, then the releasing request; until time is up.

    `client` must already point at the worker's sidecar (proxy URL with its credentials). Outcomes: 200 or
    409 from the resource means the sidecar forwarded the write (granted, fence from the body); 423 refused;
    anything else (503 while the store is being disturbed, a timeout while the sidecar is frozen) unknown.
    """
    rng = random.Random(cfg.seed)
    now = time.monotonic_ns
    end = now() + int(cfg.duration * 1e9)
    ttl_ns = int(cfg.ttl * 1e9)
    count = 0

    def stall() -> float:
        return rng.uniform(1.3, 2.0) * cfg.ttl

    async def post(path: str, params: dict[str, str]) -> tuple[str, int, httpx.Response | None, str]:
        nonlocal count
        count += 1
        req = f"{cfg.proc}-{count}"
        inv = now()
        try:
            resp = await client.post(f"{resource}{path}", params=params, headers={WORKER: cfg.proc, REQ: req})
        except httpx.HTTPError as e:
            return req, inv, None, type(e).__name__
        return req, inv, resp, ""

    while now() < end:
        key = rng.choice(cfg.keys)
        fence: int | None = None
        for i in range(rng.randint(1, 3)):
            if i and rng.random() < cfg.stall_p:
                await asyncio.sleep(stall())
            params = {"delay": f"{stall():.3f}"} if rng.random() < cfg.slow_p else {}
            req, inv, resp, error = await post(f"/res/{key}/write", params)
            event: Event = {"op": "acquire", "proc": cfg.proc, "key": key, "inv": inv, "comp": now(),
                            "ttl_ns": ttl_ns, "req": req}
            if resp is not None and resp.status_code in (200, 409):
                fence = int(resp.json()["fence"])
                rec.record(**event, ok=True, fence=fence)
                if resp.status_code == 409:
                    break  # the resource saw a newer holder: our lease is gone
                continue
            ok = False if resp is not None and resp.status_code == 423 else None
            rec.record(**event, ok=ok, fence=None, error=error or (resp.status_code if resp is not None else None))
            if ok is False:
                await asyncio.sleep(rng.uniform(0.001, 0.02))
            break
        req, inv, resp, error = await post(f"/res/{key}/release", {})
        event = {"op": "release", "proc": cfg.proc, "key": key, "inv": inv, "comp": now(), "req": req}
        if resp is not None and 200 <= resp.status_code < 300:
            echoed = resp.json().get("fence")  # None: the lock was free, nothing to release
            if echoed is not None:
                rec.record(**event, fence=int(echoed), ok=True)
            elif fence is not None:
                rec.record(**event, fence=fence, ok=False)
        elif fence is not None:
            rec.record(**event, fence=fence, ok=False if resp is not None and resp.status_code == 423 else None)


def attribute_forwarded(events: list[Event]) -> list[Event]:
    """Complete agent-side `acquire` events with what the resource saw (see the module docstring).

    An acquire whose answer was lost (ok None) but whose write reached the resource was granted: it becomes
    ok True with the fence the resource saw, completed no later than the resource's decision. Returns a new
    list; resource-side write events pass through unchanged.
    """
    forwarded = {e["req"]: e for e in events if e.get("op") == "write" and e.get("req")}
    out: list[Event] = []
    for e in events:
        w = forwarded.get(e.get("req", "")) if e.get("op") == "acquire" else None
        if w is not None and e.get("ok") is None:
            e = {**e, "ok": True, "fence": w["fence"], "comp": min(e["comp"], w["t"]), "attributed": True}
        out.append(e)
    return out
