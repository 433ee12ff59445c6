"""Local upstream servers for integration tests: one aiohttp app on plain HTTP and on HTTPS (test CA).

Endpoints:
- `/sse?n=5&gap=0.1`: a `text/event-stream` of n events, then `data: [DONE]`.
- `/sse/gated/KEY`: one event, then waits until `POST /gate/KEY` (sent directly, not through the proxy)
  before the second event: a client that reads the first event before opening the gate proves streaming.
- `/slow?seconds=2`: answers after a delay (for shutdown with a call in flight).
- `/ws`: a websocket that echoes text and binary messages.
- `/big?size=N`: N bytes of 'x'.
- anything else: echoes what arrived as JSON: method, raw path, query, headers (as a list of pairs, so
  repeats and exact names are visible), body (if small) and body length/sha256.

The server runs on its own event loop in a thread, so synchronous tests, subprocess clients and async tests
can all use it. Every request is recorded in `hits` (method, raw path).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from support.certs import CertFiles

ECHO_BODY_LIMIT = 64 << 10
HITS = web.AppKey("hits", list)
GATES = web.AppKey("gates", dict)


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[HITS].append((request.method, request.raw_path))
    return web.json_response({
        "method": request.method,
        "path": request.raw_path,
        "query": request.query_string,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body": body.decode("utf-8", "replace") if len(body) <= ECHO_BODY_LIMIT else None,
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "scheme": request.scheme,
    })


async def _sse(request: web.Request) -> web.StreamResponse:
    request.app[HITS].append((request.method, request.raw_path))
    n = int(request.query.get("n", "5"))
    gap = float(request.query.get("gap", "0.1"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for i in range(n):
        await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
        await asyncio.sleep(gap)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _gate(request: web.Request) -> asyncio.Event:
    return request.app[GATES].setdefault(request.match_info["key"], asyncio.Event())


async def _sse_gated(request: web.Request) -> web.StreamResponse:
    request.app[HITS].append((request.method, request.raw_path))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b"data: first\n\n")
    await asyncio.wait_for(_gate(request).wait(), 30)
    await resp.write(b"data: second\n\ndata: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _open_gate(request: web.Request) -> web.Response:
    _gate(request).set()
    return web.json_response({"open": request.match_info["key"]})


async def _slow(request: web.Request) -> web.Response:
    request.app[HITS].append((request.method, request.raw_path))
    await asyncio.sleep(float(request.query.get("seconds", "2")))
    return web.json_response({"slow": True})


async def _big(request: web.Request) -> web.Response:
    request.app[HITS].append((request.method, request.raw_path))
    return web.Response(body=b"x" * int(request.query.get("size", "1048576")), content_type="text/plain")


async def _ws(request: web.Request) -> web.WebSocketResponse:
    request.app[HITS].append((request.method, request.raw_path))
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(f"echo: {msg.data}")
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def make_app() -> web.Application:
    app = web.Application(client_max_size=128 << 20)
    app[HITS] = []
    app[GATES] = {}
    app.router.add_get("/sse", _sse)
    app.router.add_get("/sse/gated/{key}", _sse_gated)
    app.router.add_post("/gate/{key}", _open_gate)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/big", _big)
    app.router.add_get("/ws", _ws)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


@dataclass
class Upstream:
    http_port: int = 0
    https_port: int = 0
    hits: list[tuple[str, str]] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://localhost:{self.https_port}"

    def paths(self) -> list[str]:
        return [p for _, p in list(self.hits)]


@contextmanager
def serve_in_thread(app: web.Application, certs: CertFiles | None = None) -> Iterator[tuple[int, int]]:
    """Serve `app` on plain HTTP and, with `certs`, on HTTPS too (free ports on 127.0.0.1), from an event loop
    in a thread of its own, so synchronous tests, subprocess clients and async tests can all use it. Yields
    the two ports (the HTTPS one is 0 without `certs`)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-upstream", daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        if certs is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(certs.server_cert, certs.server_key)
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        return runner

    try:
        runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        raise
    try:
        ports = [int(a[1]) for a in runner.addresses] + [0]
        yield ports[0], ports[1]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def run_upstream(certs: CertFiles) -> Iterator[Upstream]:
    """Start the upstream app on free ports (HTTP and HTTPS) in a background thread."""
    app = make_app()
    with serve_in_thread(app, certs) as (http_port, https_port):
        yield Upstream(http_port, https_port, app[HITS])
