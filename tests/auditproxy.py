"""Helpers for the audit tests through a running proxy (tests/test_audit_proxy*.py).

- `write_policy`: the rules those tests run with (agents, users, allow/deny/hold/lock rules, audit settings).
- `AuditUpstream`: a local upstream on HTTP and HTTPS (test CA) with what audit tests need beyond the shared
  echo server: an OpenAI-style chat endpoint whose event stream advances one event at a time when the test
  says so (`step`), a gzip bomb, a slow answer and a plain JSON answer that echoes nothing back.
- `Forwarder`: a TCP forwarder that can be cut (listener closed, live connections reset) and restored on the
  same port, to take PostgreSQL away from a running sidecar and give it back.
- `read_records`, `wait_for_records`: the audit store as `bastion audit` reads it.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from aiohttp import web
from support.bastion import BastionServer
from support.certs import CertFiles
from support.upstream import serve_in_thread

from bastion.audit.record import AuditRecord
from bastion.audit.sinks import RecordQuery, open_store

TOKENS = {"support-bot": "sb-token", "helper-bot": "helper-token", "legacy-bot": "legacy-token",
          "billing-bot": "billing-token"}
USERS = {"alice": "alice-token", "bob": "bob-token"}
MAX_BODY = 65536
SSE_EVENTS = 5
SSE_GAP = 0.3
STEP_TIMEOUT = 20.0


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_policy(path: Path, *, on_failure: str = "deny") -> Path:
    path.write_text(f"""\
version: 1
defaults: {{effect: deny}}
agents:
  support-bot: {{roles: [support], token_sha256: {_sha(TOKENS["support-bot"])}}}
  helper-bot: {{roles: [support], token_sha256: {_sha(TOKENS["helper-bot"])}}}
  legacy-bot: {{roles: [support], status: retired, token_sha256: {_sha(TOKENS["legacy-bot"])}}}
  billing-bot: {{roles: [billing], token_sha256: {_sha(TOKENS["billing-bot"])}}}
users:
  alice: {{roles: [admin], token_sha256: {_sha(USERS["alice"])}}}
  bob: {{roles: [viewer], token_sha256: {_sha(USERS["bob"])}}}
rules:
  - id: local-upstream
    effect: allow
    agents: ["role:support"]
    match: {{host: [127.0.0.1, localhost]}}
  - id: erp-read-only
    effect: deny
    agents: ["*"]
    match: {{method: [POST, PUT, PATCH, DELETE], path: "/erp/**"}}
    message: "The ERP is read-only for agents."
  - id: refunds-need-approval
    effect: hold
    agents: ["role:support"]
    match: {{method: POST, path: /refunds}}
    approval: {{wait: 1s}}
  - id: ticket-comments
    effect: allow
    agents: ["role:support"]
    match: {{method: POST, path: "/tickets/{{ticket}}/comments"}}
    lock: {{key: "ticket:{{ticket}}", ttl: 15m}}
network:
  allow_private: ["127.0.0.0/8"]
audit:
  max_body_bytes: {MAX_BODY}
  on_failure: {on_failure}
""")
    return path


# -- upstream ----------------------------------------------------------------------------------------------


def gzip_bomb(size: int = 1 << 30) -> bytes:
    """`size` zero bytes as one gzip stream (about 1 MB for 1 GiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(16 << 20)
    parts = [c.compress(block) for _ in range(size // len(block))]
    parts.append(c.flush())
    return b"".join(parts)


def chat_chunk(i: int) -> bytes:
    chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


class AuditUpstream:
    """See the module docstring. `/step/{key}/v1/chat/completions` with `"stream": true` sends event 0 at once
    and every further event only after the test called `step(key)` for the previous one, then waits
    `SSE_GAP` seconds as a model would between tokens. `sent[key]` counts the events sent so far."""

    def __init__(self, certs: CertFiles) -> None:
        self._certs = certs
        self.sent: dict[str, int] = {}
        self.stream_bytes: dict[str, bytes] = {}
        self.received: list[dict[str, Any]] = []
        self._steps: dict[str, threading.Semaphore] = {}
        self._lock = threading.Lock()
        self._bomb: bytes | None = None
        self.http_port = self.https_port = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://localhost:{self.https_port}"

    def _step_sem(self, key: str) -> threading.Semaphore:
        with self._lock:
            return self._steps.setdefault(key, threading.Semaphore(0))

    def step(self, key: str) -> None:
        """Let the stream `key` send its next event."""
        self._step_sem(key).release()

    def bomb(self) -> bytes:
        if self._bomb is None:
            self._bomb = gzip_bomb()
        return self._bomb

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        key = request.match_info["key"]
        if not body.get("stream"):
            return web.json_response({"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": "hello"}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        sent = bytearray()
        self.sent[key] = 0
        loop = asyncio.get_running_loop()
        sem = self._step_sem(key)
        for i in range(SSE_EVENTS):
            if i:
                if not await loop.run_in_executor(None, sem.acquire, True, STEP_TIMEOUT):
                    return resp  # the client never read the previous event: stop here, the test fails
                await asyncio.sleep(SSE_GAP)
            data = chat_chunk(i)
            sent += data
            self.sent[key] = i + 1  # counted before it can arrive
            self.stream_bytes[key] = bytes(sent)
            try:
                await resp.write(data)
            except ConnectionError:
                return resp
        done = b"data: [DONE]\n\n"
        await resp.write(done)
        self.stream_bytes[key] = bytes(sent + done)
        await resp.write_eof()
        return resp

    async def _bomb_handler(self, request: web.Request) -> web.StreamResponse:
        data = await asyncio.to_thread(self.bomb)
        # Chunked, with no length: Bastion streams it (through its tap) instead of buffering it.
        resp = web.StreamResponse(headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(data), 64 << 10):
            await resp.write(data[i:i + (64 << 10)])
        await resp.write_eof()
        return resp

    async def _json(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
        return web.json_response({"ok": True, "bytes": len(body)})

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "3")))
        return web.json_response({"slow": True})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/step/{key}/v1/chat/completions", self._chat)
        app.router.add_get("/bomb", self._bomb_handler)
        app.router.add_get("/slow", self._slow)
        app.router.add_route("*", "/{tail:.*}", self._json)
        return app


@contextmanager
def run_audit_upstream(certs: CertFiles) -> Iterator[AuditUpstream]:
    upstream = AuditUpstream(certs)
    with serve_in_thread(upstream.app(), certs) as ports:
        upstream.http_port, upstream.https_port = ports
        yield upstream


# -- a TCP forwarder that can be cut -------------------------------------------------------------------------


class Forwarder:
    """127.0.0.1:`port` -> `target`. `cut()` closes the listener and resets every live connection (the
    service "goes away" for its clients); `restore()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forwarder", daemon=True)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    def _call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(10)

    def start(self) -> Forwarder:
        self._thread.start()
        self._call(self._listen())
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer.transport, up_writer.transport)
        self._transports.update(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._transports.difference_update(pair)

    def cut(self) -> None:
        async def cut() -> None:
            assert self._server is not None
            self._server.close()
            for t in list(self._transports):
                t.abort()
            await self._server.wait_closed()
        self._call(cut())

    def restore(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        if self._server is not None and self._server.is_serving():
            self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# -- reading the store ---------------------------------------------------------------------------------------


async def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def read_records(url: str, *, bodies: bool = True, **query: Any) -> list[AuditRecord]:
    """Every record in the store, oldest first (as `bastion audit export` reads them)."""
    async def main() -> list[AuditRecord]:
        async with open_store(url) as store:
            q = RecordQuery(ascending=True, bodies=bodies, limit=500, **query)
            return [r async for r in store.iter_records(q)]
    return asyncio.run(main())


def wait_for_records(url: str, ids: Iterable[str], timeout: float = 30.0) -> dict[str, AuditRecord]:
    """The records with these ids (with bodies), once all of them are in the store; AssertionError after
    `timeout` seconds."""
    wanted = list(dict.fromkeys(ids))

    async def main() -> dict[str, AuditRecord]:
        found: dict[str, AuditRecord] = {}
        deadline = time.monotonic() + timeout
        async with open_store(url) as store:
            while True:
                for record_id in wanted:
                    if record_id not in found:
                        record = await store.get(record_id)
                        if record is not None:
                            found[record_id] = record
                if len(found) == len(wanted):
                    return found
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(wanted) - len(found)} of {len(wanted)} records never reached {url}")
                await asyncio.sleep(0.1)

    return asyncio.run(main())


def wait_for_record(url: str, record_id: str, timeout: float = 30.0) -> AuditRecord:
    return wait_for_records(url, [record_id], timeout)[record_id]


# -- agents calling through a running server ----------------------------------------------------------------


def session(server: BastionServer) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    url = server.proxy_url("support-bot", TOKENS["support-bot"])
    s.proxies = {"http": url, "https": url}
    return s


def call(s: requests.Session, upstream: AuditUpstream, path: str) -> str:
    resp = s.post(f"{upstream.http_url}/{path}", json={"n": path}, timeout=10)
    assert resp.status_code == 200
    return resp.headers["X-Bastion-Request-Id"]


class Traffic(threading.Thread):
    """Calls the proxy back to back until it fails; remembers when each call completed."""

    def __init__(self, server: BastionServer, upstream: AuditUpstream) -> None:
        super().__init__(daemon=True)
        self.session = session(server)
        self.upstream = upstream
        self.completed: list[tuple[float, str]] = []

    def wait_for(self, calls: int, first_done_before: float) -> None:
        """Until `calls` calls completed, the first of them at least `first_done_before` seconds ago."""
        deadline = time.monotonic() + 30
        while len(self.completed) < calls or time.monotonic() - self.completed[0][0] < first_done_before:
            assert time.monotonic() < deadline and self.is_alive(), "no traffic through the proxy"
            time.sleep(0.05)

    def run(self) -> None:
        i = 0
        while True:
            try:
                request_id = call(self.session, self.upstream, f"traffic-{i}")
            except (requests.RequestException, AssertionError):
                return
            self.completed.append((time.monotonic(), request_id))
            i += 1
