"""WebSocket sessions through a running proxy: every message in the session's audit record, and the policy applied
to what the agent sends (a refused message closes the session with 1008 and never reaches the upstream).

Real pieces only: `bastion serve` (audit on its home's SQLite store), a `websockets` server as the upstream on
127.0.0.1 (plain and TLS with the test CA; it remembers what it received and how each session was closed), and
the `websockets` client connecting through the proxy (HTTP CONNECT with credentials in the proxy URL).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from auditproxy import wait_for_record
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage
from policyhelp import policy_from
from support.bastion import BastionServer, run_bastion
from support.certs import CertFiles
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from wsproto.frame_protocol import Opcode

from bastion.audit.record import AuditRecord
from bastion.policy.facts import RequestFacts
from bastion.proxy import flowmeta
from bastion.proxy.httplimits import BASTION_CLOSE, MESSAGE_TOO_BIG, WEBSOCKET_MESSAGE_LIMIT
from bastion.proxy.wsession import WebSocketSessions, cut_close_reason, looks_like_json, message_facts

TOKENS = {"ws-bot": "ws-token", "ws-shadow": "shadow-token"}
MAX_BODY = 65536
DENIED = "Agents may not drop databases."
NO_UPDATE = "Agents may not change the session settings."
LONG_REASON = "Nicht erlaubt: " + "ä" * 80  # 175 bytes of UTF-8: more than a close frame can carry


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_rules(path: Path) -> Path:
    """Client messages to /realtime are JSON-RPC (MCP over WebSocket): `mcp` conditions judge them; on
    /json-realtime a `json` condition does."""
    path.write_text(f"""\
version: 1
defaults: {{effect: deny}}
agents:
  ws-bot: {{roles: [ws], token_sha256: {_sha(TOKENS["ws-bot"])}}}
  ws-shadow: {{roles: [ws], mode: report, token_sha256: {_sha(TOKENS["ws-shadow"])}}}
rules:
  - id: local-upstream
    effect: allow
    agents: ["role:ws"]
    match: {{host: [127.0.0.1, localhost]}}
  - id: no-drop-database
    effect: deny
    agents: ["*"]
    match: {{host: [127.0.0.1, localhost], path: /realtime, mcp: {{method: tools/call, tool: drop_database}}}}
    message: "{DENIED}"
  - id: payments-need-approval
    effect: hold
    agents: ["*"]
    match: {{path: /realtime, mcp: {{method: tools/call, tool: pay}}}}
  - id: long-reason
    effect: deny
    agents: ["*"]
    match: {{path: /realtime, mcp: {{method: tools/call, tool: long_reason}}}}
    message: "{LONG_REASON}"
  - id: no-session-update
    effect: deny
    agents: ["*"]
    match: {{host: 127.0.0.1, path: /json-realtime, json: {{type: session.update}}}}
    message: "{NO_UPDATE}"
network:
  allow_private: ["127.0.0.0/8"]
audit:
  max_body_bytes: {MAX_BODY}
""")
    return path


def rpc(tool: str, call_id: int = 1) -> str:
    """A JSON-RPC (MCP) tool call, as the agent sends it."""
    return json.dumps({"jsonrpc": "2.0", "id": call_id, "method": "tools/call",
                       "params": {"name": tool, "arguments": {}}})


# -- the upstream -----------------------------------------------------------------------------------------


@dataclass
class WsUpstream:
    """Echoes text as "echo: TEXT" and binary as is; "please close" makes it close the session (4001).
    `received[s]` is what session `s` (the `s` query
    parameter) got, in order; `closes[s]` the close code and reason it saw once it ended."""

    ws_port: int = 0
    wss_port: int = 0
    received: dict[str, list[str | bytes]] = field(default_factory=dict)
    closes: dict[str, tuple[int | None, str | None]] = field(default_factory=dict)

    def url(self, scheme: str, session: str, path: str = "/realtime") -> str:
        port = self.wss_port if scheme == "wss" else self.ws_port
        return f"{scheme}://127.0.0.1:{port}{path}?s={session}"

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        session = ws.request.path.partition("s=")[2]
        got = self.received.setdefault(session, [])
        try:
            async for message in ws:
                got.append(message)
                if message == "please close":
                    await ws.close(4001, "upstream is done")
                    break
                await ws.send(f"echo: {message}" if isinstance(message, str) else message)
        except ConnectionClosed:
            pass
        finally:
            self.closes[session] = (ws.close_code, ws.close_reason)

    async def closed(self, session: str, timeout: float = 10.0) -> tuple[int | None, str | None]:
        async with asyncio.timeout(timeout):
            while session not in self.closes:
                await asyncio.sleep(0.02)
        return self.closes[session]


@contextmanager
def run_ws_upstream(certs: CertFiles) -> Iterator[WsUpstream]:
    """The upstream on two free ports (plain and TLS) in a thread with its own event loop."""
    upstream = WsUpstream()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certs.server_cert, certs.server_key)
        async with serve(upstream.handle, "127.0.0.1", 0) as plain, \
                serve(upstream.handle, "127.0.0.1", 0, ssl=ctx) as tls:
            upstream.ws_port = next(iter(plain.sockets)).getsockname()[1]
            upstream.wss_port = next(iter(tls.sockets)).getsockname()[1]
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="ws-upstream", daemon=True)
    thread.start()
    assert ready.wait(10), "the websocket upstream did not start"
    try:
        yield upstream
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


# -- fixtures ---------------------------------------------------------------------------------------------


@dataclass
class Proxy:
    server: BastionServer
    audit_url: str


@pytest.fixture(scope="module")
def ws_upstream(test_certs: CertFiles) -> Iterator[WsUpstream]:
    with run_ws_upstream(test_certs) as up:
        yield up


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, test_certs: CertFiles) -> Iterator[Proxy]:
    work = tmp_path_factory.mktemp("websocket-sessions")
    home = work / "home"
    with run_bastion(work / "srv", [write_rules(work / "rules.yaml")], home=home,
                     upstream_ca=test_certs.ca_cert) as server:
        yield Proxy(server, f"sqlite:///{home / 'bastion.db'}")


@asynccontextmanager
async def session(proxy: Proxy, url: str, agent: str = "ws-bot") -> AsyncIterator[ClientConnection]:
    tls: dict[str, Any] = {}
    if url.startswith("wss:"):
        tls["ssl"] = ssl.create_default_context(cafile=str(proxy.server.ca_cert))
    async with connect(url, proxy=proxy.server.proxy_url(agent, TOKENS[agent]), open_timeout=10,
                       close_timeout=5, **tls) as ws:
        yield ws


def request_id(ws: ClientConnection) -> str:
    assert ws.response is not None
    return ws.response.headers["X-Bastion-Request-Id"]


async def record_of(proxy: Proxy, rid: str) -> AuditRecord:
    return await asyncio.to_thread(wait_for_record, proxy.audit_url, rid)


async def closed_by_proxy(ws: ClientConnection) -> tuple[int, str]:
    """The close frame the client got, once the proxy closed the session."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    assert info.value.rcvd is not None, "the connection ended without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


def entries(record: AuditRecord) -> list[dict[str, Any]]:
    return record.extra["websocket"]["messages"]


# -- recording --------------------------------------------------------------------------------------------


async def test_messages_both_ways_are_recorded_in_order(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    blob = bytes(range(256)) * 4
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        await ws.send("hello")
        assert await ws.recv() == "echo: hello"
        await ws.send(blob)
        assert await ws.recv() == blob
        await ws.send(rpc("search"))
        assert await ws.recv() == f"echo: {rpc('search')}"
    record = await record_of(proxy, rid)

    assert record.outcome == "forwarded" and record.error is None
    assert record.response is not None and record.response.status == 101
    assert record.decision is not None and record.decision.effect == "allow"
    got = record.extra["websocket"]
    digest = hashlib.sha256(blob).hexdigest()
    call = rpc("search")
    assert [(m["dir"], m["type"], m["size"], m.get("text"), m.get("sha256")) for m in got["messages"]] == [
        ("client", "text", 5, "hello", None),
        ("server", "text", 11, "echo: hello", None),
        ("client", "binary", 1024, None, digest),
        ("server", "binary", 1024, None, digest),
        ("client", "text", len(call), call, None),
        ("server", "text", len(call) + 6, f"echo: {call}", None),
    ]
    assert not any(m["cut"] or m["refused"] for m in got["messages"])
    times = [m["t"] for m in got["messages"]]
    assert times == sorted(times) and 0 <= times[0] < 10 and all(round(t, 3) == t for t in times)
    assert (got["kept"], got["total"]) == (6, 6)
    assert got["bytes"] == {"client": 5 + 1024 + len(call), "server": 11 + 1024 + len(call) + 6}
    assert got["close"] == {"code": 1000, "reason": "", "by": "client"}
    assert ws_upstream.received[sid] == ["hello", blob, call]


async def test_secrets_in_messages_are_masked_in_the_record(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    """A realtime API's first message may carry a key: message texts are redacted like bodies."""
    sid = uuid.uuid4().hex
    key = "k-" + uuid.uuid4().hex
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        await ws.send(json.dumps({"type": "auth", "api_key": key}))
        await ws.recv()
    record = await record_of(proxy, rid)
    texts = [m.get("text") or "" for m in record.extra["websocket"]["messages"]]
    assert len(texts) == 2 and not any(key in t for t in texts)
    assert json.loads(texts[0])["type"] == "auth"
    assert "/extra/websocket/messages/0/text/api_key" in record.redactions
    assert ws_upstream.received[sid] == [json.dumps({"type": "auth", "api_key": key})]  # the agent's call is intact


async def test_tls_session_cuts_long_text(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    long_text = "é" * 5000
    async with session(proxy, ws_upstream.url("wss", sid)) as ws:
        rid = request_id(ws)
        await ws.send(long_text)
        assert await ws.recv() == f"echo: {long_text}"
    got = (await record_of(proxy, rid)).extra["websocket"]

    client, server = got["messages"]
    assert (client["size"], client["cut"], client["text"]) == (10000, True, "é" * 4096)
    assert (server["size"], server["cut"], server["text"]) == (10006, True, ("echo: " + long_text)[:4096])
    assert got["close"] == {"code": 1000, "reason": "", "by": "client"}


async def test_long_session_keeps_the_first_thousand_and_counts_all(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        for i in range(1000):
            await ws.send(f"m{i:04d}")
        for i in range(1000):
            assert await ws.recv() == f"echo: m{i:04d}"
    got = (await record_of(proxy, rid)).extra["websocket"]

    assert (got["kept"], got["total"], len(got["messages"])) == (1000, 2000, 1000)
    assert got["bytes"] == {"client": 5000, "server": 11000}
    client_texts = [m["text"] for m in got["messages"] if m["dir"] == "client"]
    assert client_texts == [f"m{i:04d}" for i in range(len(client_texts))]
    assert got["close"] is not None and got["close"]["by"] == "client"


async def test_kept_text_is_capped_like_a_body(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        for i in range(12):
            await ws.send(str(i % 10) * 4096)
            await ws.recv()
    got = (await record_of(proxy, rid)).extra["websocket"]

    texts = [m["text"] for m in got["messages"]]
    assert (got["kept"], got["total"]) == (24, 24)
    assert sum(len(t.encode()) for t in texts) == MAX_BODY
    assert texts[-1] == "" and got["messages"][-1]["cut"] and got["messages"][-1]["size"] == 4102
    assert texts[0] == "0" * 4096 and not got["messages"][0]["cut"]


# -- the policy on client messages ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_denied_message_closes_the_session(proxy: Proxy, ws_upstream: WsUpstream, scheme: str) -> None:
    sid = uuid.uuid4().hex
    allowed, denied = rpc("search", 1), rpc("drop_database", 2)
    async with session(proxy, ws_upstream.url(scheme, sid)) as ws:
        rid = request_id(ws)
        await ws.send(allowed)
        assert await ws.recv() == f"echo: {allowed}"
        await ws.send(denied)
        assert await closed_by_proxy(ws) == (1008, DENIED)

    assert await ws_upstream.closed(sid) == (1008, DENIED)
    assert ws_upstream.received[sid] == [allowed]  # the refused message never reached the upstream
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert [(m["dir"], m.get("text"), m["refused"]) for m in got["messages"]] == [
        ("client", allowed, False),
        ("server", f"echo: {allowed}", False),
        ("client", denied, True),
    ]
    assert got["close"] == {"code": 1008, "reason": DENIED, "by": "bastion"}
    proxy.server.wait_for_log(rf"refused websocket message 127\.0\.0\.1/realtime: {DENIED} \(agent=ws-bot "
                              rf"request_id={rid}\)")
    status, metrics = proxy.server.admin_get("/metrics")
    refusals = re.search(rb"^bastion_websocket_refusals_total (\S+)$", metrics, re.MULTILINE)
    assert status == 200 and refusals is not None and float(refusals[1]) >= 1


async def test_messages_after_the_refused_one_are_dropped(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    """Sent right behind the refused message (the same TCP segment, likely): never relayed either."""
    sid = uuid.uuid4().hex
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        await ws.send(rpc("drop_database"))
        await ws.send("right behind it")
        await ws.send(rpc("search", 3))
        assert await closed_by_proxy(ws) == (1008, DENIED)
    assert await ws_upstream.closed(sid) == (1008, DENIED)
    assert ws_upstream.received[sid] == []
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert got["messages"][0]["refused"] and got["messages"][0]["text"] == rpc("drop_database")
    assert all(m["dir"] == "client" and m["refused"] for m in got["messages"])
    assert got["close"] == {"code": 1008, "reason": DENIED, "by": "bastion"}


async def test_json_rule_judges_the_messages_not_the_upgrade(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    """`json` conditions do not apply to the upgrade (it has no body): the session opens, and the rule then
    refuses the message it matches."""
    sid = uuid.uuid4().hex
    create, update = '{"type": "response.create"}', '{"type": "session.update", "session": {"voice": "x"}}'
    async with session(proxy, ws_upstream.url("wss", sid, "/json-realtime")) as ws:
        rid = request_id(ws)
        await ws.send(create)
        assert await ws.recv() == f"echo: {create}"
        await ws.send("session.update")  # text, not JSON: not checked
        assert await ws.recv() == "echo: session.update"
        await ws.send(update)
        assert await closed_by_proxy(ws) == (1008, NO_UPDATE)
    assert ws_upstream.received[sid] == [create, "session.update"]
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert [m["refused"] for m in got["messages"]] == [False, False, False, False, True]
    assert got["close"] == {"code": 1008, "reason": NO_UPDATE, "by": "bastion"}


async def test_hold_on_a_message_is_a_refusal(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        await ws.send(rpc("pay"))
        code, reason = await closed_by_proxy(ws)

    assert code == 1008 and "Approvals are not available for WebSocket messages" in reason
    assert "payments-need-approval" in reason and len(reason.encode()) <= 123
    assert await ws_upstream.closed(sid) == (1008, reason)
    assert ws_upstream.received[sid] == []
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert [m["refused"] for m in got["messages"]] == [True]
    assert got["close"] == {"code": 1008, "reason": reason, "by": "bastion"}


async def test_close_reason_is_cut_to_123_bytes(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        await ws.send(rpc("long_reason"))
        code, reason = await closed_by_proxy(ws)

    assert code == 1008 and LONG_REASON.startswith(reason)
    assert 122 <= len(reason.encode()) <= 123  # whole characters only: "ä" is two bytes
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert got["close"] == {"code": 1008, "reason": reason, "by": "bastion"}


async def test_messages_that_do_not_look_like_json_pass_unchecked(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    blob = b"\x00\x01drop_database" + bytes(range(256))
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        for text in ("drop_database", "  tools/call drop_database {}"):
            await ws.send(text)
            assert await ws.recv() == f"echo: {text}"
        await ws.send(blob)
        assert await ws.recv() == blob
    assert ws_upstream.received[sid] == ["drop_database", "  tools/call drop_database {}", blob]
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert not any(m["refused"] for m in got["messages"]) and got["total"] == 6
    assert got["close"] == {"code": 1000, "reason": "", "by": "client"}


async def test_binary_json_is_judged_like_text(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    """Servers read a binary message as JSON as readily as a text one (`json.loads(bytes)`)."""
    sid = uuid.uuid4().hex
    allowed, denied = rpc("search").encode(), rpc("drop_database", 2).encode()
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        await ws.send(allowed)
        assert await ws.recv() == allowed
        await ws.send(denied)
        assert await closed_by_proxy(ws) == (1008, DENIED)
    assert ws_upstream.received[sid] == [allowed]
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert [(m["type"], m["refused"]) for m in got["messages"]] == [
        ("binary", False), ("binary", False), ("binary", True)]
    assert got["close"] == {"code": 1008, "reason": DENIED, "by": "bastion"}


_DEEP = 30000
UNREADABLE = {  # messages Python's json refuses, that other servers read; each would carry a session.update
    "a 5000-digit number": '{"type": "session.update", "n": ' + "9" * 5000 + "}",
    "30000-deep nesting": '{"type": "session.update", "x": ' + "[" * _DEEP + "]" * _DEEP + "}",
    "trailing data": '{"type": "response.create"}\n{"type": "session.update"}',
    "over the size limit after whitespace": " " * 100 + '{"type": "session.update", "pad": "' + "p" * (1 << 20) + '"}',
    "a cut object": '{"type": "session.update"',
}


@pytest.mark.parametrize("name", list(UNREADABLE))
async def test_json_that_cannot_be_read_fails_closed(proxy: Proxy, ws_upstream: WsUpstream, name: str) -> None:
    """A message that starts like JSON is judged even when it cannot be parsed: its `json` conditions fail
    closed, so the deny rule applies and the message never reaches the upstream."""
    sid = uuid.uuid4().hex
    message = UNREADABLE[name]
    async with session(proxy, ws_upstream.url("ws", sid, "/json-realtime")) as ws:
        rid = request_id(ws)
        await ws.send(message)
        code, reason = await closed_by_proxy(ws)
    assert code == 1008 and reason.startswith(NO_UPDATE)
    assert await ws_upstream.closed(sid) == (1008, reason)
    assert ws_upstream.received[sid] == []
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert [m["refused"] for m in got["messages"]] == [True]
    assert got["close"] == {"code": 1008, "reason": reason, "by": "bastion"}


UNREADABLE_CALLS = {
    "a 5000-digit number": rpc("drop_database")[:-1] + ', "n": ' + "9" * 5000 + "}",
    "a second value": json.dumps({"jsonrpc": "2.0", "id": 0, "method": "ping"}) + "\n" + rpc("drop_database"),
    "30000-deep nesting": rpc("drop_database")[:-1] + ', "x": ' + "[" * _DEEP + "]" * _DEEP + "}",
}


@pytest.mark.parametrize("name", list(UNREADABLE_CALLS))
async def test_json_rpc_calls_python_cannot_parse_are_judged(proxy: Proxy, ws_upstream: WsUpstream,
                                                             name: str) -> None:
    sid = uuid.uuid4().hex
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        await ws.send(UNREADABLE_CALLS[name])
        code, _ = await closed_by_proxy(ws)
    assert code == 1008  # every deny rule with an `mcp` condition on /realtime applies: one of them closes it
    assert (await ws_upstream.closed(sid))[0] == 1008
    assert ws_upstream.received[sid] == []


async def test_a_deflate_offer_gets_a_session_without_compression(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    """permessage-deflate would be inflated whole by the proxy before any rule saw the message (a megabyte on
    the wire inflates to gigabytes): the agent's offer is removed, so the session runs uncompressed."""
    sid = uuid.uuid4().hex
    async with connect(ws_upstream.url("ws", sid), proxy=proxy.server.proxy_url("ws-bot", TOKENS["ws-bot"]),
                       compression="deflate", open_timeout=10, close_timeout=5) as ws:
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
        assert ws.protocol.extensions == []
        await ws.send("x" * 10000)
        assert await ws.recv() == "echo: " + "x" * 10000
    assert ws_upstream.received[sid] == ["x" * 10000]


# -- message size -----------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """The process's resident memory (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Samples the process's VmRSS until the block ends; yields a list whose only item is the highest seen."""
    peak = [rss_bytes(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], rss_bytes(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join(5)


TOO_BIG_REASON = f"Message too big: WebSocket messages through Bastion are limited to {WEBSOCKET_MESSAGE_LIMIT} bytes."


async def test_a_message_over_the_size_limit_closes_the_session(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    """A 40 MiB message in 1 MiB fragments: the proxy stops buffering it at the limit (16 MiB) and closes the
    session with 1009 on both sides; its memory does not grow by the message's size."""
    sid = uuid.uuid4().hex
    pid = proxy.server.proc.pid
    fragment = b"f" * (1 << 20)

    async def fragments() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield fragment

    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        await ws.send("before")
        assert await ws.recv() == "echo: before"
        before = rss_bytes(pid)
        with peak_rss(pid) as peak:
            with contextlib.suppress(ConnectionClosed):  # the close may come while the fragments still go
                await ws.send(fragments())
            assert await closed_by_proxy(ws) == (MESSAGE_TOO_BIG, TOO_BIG_REASON)
        after = rss_bytes(pid)

    assert after - before < 20 << 20, f"the proxy grew by {(after - before) >> 20} MiB"
    assert peak[0] - before < 40 << 20, f"the proxy held {(peak[0] - before) >> 20} MiB: the whole message"
    assert await ws_upstream.closed(sid) == (MESSAGE_TOO_BIG, TOO_BIG_REASON)
    assert ws_upstream.received[sid] == ["before"]
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert [m["dir"] for m in got["messages"]] == ["client", "server"]  # the oversized one never completed
    assert got["close"] == {"code": MESSAGE_TOO_BIG, "reason": TOO_BIG_REASON, "by": "bastion"}
    proxy.server.wait_for_log(rf"closing websocket 127\.0\.0\.1/realtime: a client message passed "
                              rf"{WEBSOCKET_MESSAGE_LIMIT} bytes \(request_id={rid}\)")


def raw_upgrade(proxy: Proxy, url: str) -> socket.socket:
    """A WebSocket session through the proxy on a plain socket (absolute-form upgrade), for frames no client
    library sends."""
    target = url.replace("ws://", "http://", 1)
    authority = target.split("/")[2]
    credentials = base64.b64encode(f"ws-bot:{TOKENS['ws-bot']}".encode()).decode()
    s = socket.create_connection(("127.0.0.1", proxy.server.proxy_port), timeout=20)
    s.sendall((f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Basic {credentials}\r\n"
               f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, f"the proxy closed before answering the upgrade: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    assert head.endswith(b"\r\n\r\n"), "the proxy sent frames before any message"
    return s


def close_frame_of(s: socket.socket) -> tuple[int, str]:
    """Code and reason of the first frame the proxy sends, which must be a close."""
    data = b""
    while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
        chunk = s.recv(4096)
        assert chunk, f"the connection ended without a close frame: {data!r}"
        data += chunk
    assert data[0] == 0x88, data
    payload = data[2:2 + (data[1] & 0x7F)]
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


def test_endless_empty_fragments_count_against_the_limit(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    """mitmproxy keeps an entry for every frame of a message: empty continuation frames cost memory too, and
    count against the limit."""
    sid = uuid.uuid4().hex
    s = raw_upgrade(proxy, ws_upstream.url("ws", sid))
    with s:
        first = struct.pack("!BB", 0x01, 0x80) + b"\0\0\0\0"  # text, not final, masked, empty
        empty = struct.pack("!BB", 0x00, 0x80) + b"\0\0\0\0"  # continuation, not final, masked, empty
        frames = WEBSOCKET_MESSAGE_LIMIT // 64 + 1000
        with contextlib.suppress(OSError):  # the proxy may close while frames are still going
            s.sendall(first + empty * frames)
        assert close_frame_of(s) == (MESSAGE_TOO_BIG, TOO_BIG_REASON)
    assert asyncio.run(ws_upstream.closed(sid)) == (MESSAGE_TOO_BIG, TOO_BIG_REASON)
    assert ws_upstream.received.get(sid, []) == []


async def test_report_mode_logs_and_does_not_close(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    denied = rpc("drop_database")
    async with session(proxy, ws_upstream.url("ws", sid), agent="ws-shadow") as ws:
        rid = request_id(ws)
        await ws.send(denied)
        assert await ws.recv() == f"echo: {denied}"
        await ws.send("still open")
        assert await ws.recv() == "echo: still open"
    assert ws_upstream.received[sid] == [denied, "still open"]
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert not any(m["refused"] for m in got["messages"]) and got["total"] == 4
    assert got["close"] == {"code": 1000, "reason": "", "by": "client"}
    proxy.server.wait_for_log(rf"report mode: would close websocket ws://127\.0\.0\.1:{ws_upstream.ws_port}"
                              rf"/realtime on a client message: {DENIED} \(agent=ws-shadow rule=no-drop-database "
                              rf"request_id={rid}\)")


async def test_upstream_close_is_recorded(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        await ws.send("please close")
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "upstream is done")
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert [(m["dir"], m["text"]) for m in got["messages"]] == [("client", "please close")]
    assert got["close"] == {"code": 4001, "reason": "upstream is done", "by": "server"}


# -- the stage on its own (no proxy: the policy decisions and the record's bounds) ---------------------------


UNIT_RULES = """\
version: 1
defaults: {effect: deny}
agents:
  bot:
    roles: [ws]
    token_sha256: BOT_SHA
  shadow:
    roles: [ws]
    mode: report
    token_sha256: SHADOW_SHA
rules:
  - id: any-example
    effect: allow
    agents: ["role:ws"]
    match: {host: example.com}
  - id: no-x
    effect: deny
    agents: ["*"]
    match: {path: /ws, json: {type: x}}
  - id: y-needs-approval
    effect: hold
    agents: ["*"]
    match: {path: /ws, json: {type: y}}
""".replace("BOT_SHA", _sha("bot-token")).replace("SHADOW_SHA", _sha("shadow-token"))


class NoConnections:
    """A Proxyserver with no live connection: the stage cannot send a close frame, so it cuts (nothing here)."""

    connections: dict[str, Any] = {}


def unit_flow(tmp_path: Path, agent: str = "bot", body_limit: int = 1 << 20) -> Any:

    flow = tflow.twebsocketflow()
    flow.websocket.messages = []
    flow.metadata.update({
        flowmeta.POLICY: policy_from(tmp_path, UNIT_RULES), flowmeta.AGENT: agent, flowmeta.REQUEST_ID: "rid-1",
        flowmeta.FACTS: RequestFacts.build(method="GET", scheme="ws", host="example.com", port=80, raw_path="/ws",
                                           headers={"upgrade": "websocket"}, body_limit=body_limit)})
    return flow


def deliver(stage: Any, flow: Any, content: bytes, *, from_client: bool = True, text: bool = True) -> Any:
    """One message through the stage, as mitmproxy hands it over; returns it (`dropped` tells the verdict)."""
    message = WebSocketMessage(Opcode.TEXT if text else Opcode.BINARY, from_client, content)
    flow.websocket.messages.append(message)
    stage.websocket_message(flow)
    return message


def test_client_messages_that_look_like_json_are_checked(tmp_path: Path) -> None:
    stage = WebSocketSessions(NoConnections())
    flow = unit_flow(tmp_path)
    stage.websocket_start(flow)
    # Every deny rule with a json condition fails closed on what cannot be parsed: plain text is not judged.
    assert not deliver(stage, flow, b"hello").dropped
    assert not deliver(stage, flow, b"type x", text=False).dropped
    assert not deliver(stage, flow, b'{"type": "x"}', from_client=False).dropped  # from the upstream
    assert not deliver(stage, flow, b'{"type": "z"}').dropped
    assert not deliver(stage, flow, b'{"type": "z"}', text=False).dropped
    assert deliver(stage, flow, b'{"type": "x"}', text=False).dropped  # binary: judged like text
    assert deliver(stage, flow, b"after the refusal", from_client=False).dropped  # nothing more goes through
    stage.websocket_end(flow)
    record = flow.metadata["bastion.traffic"]["websocket"]
    assert [m["refused"] for m in record["messages"]] == [False] * 5 + [True, True]
    # No live connection to send a close frame on: the connection is cut, and the record says so.
    assert record["close"] == {"code": None, "reason": "Denied by rule no-x.", "by": "bastion"}


@pytest.mark.parametrize("content", [
    b'{"type": "x"',                                     # cut
    b'{"type": "z"} {"type": "x"}',                      # two values (Go's json.Decoder reads the first)
    b'{"type": "z", "n": ' + b"1" * 5000 + b"}",         # past Python's int digits limit (Node reads it)
    b'{"type": "z", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}",  # RecursionError in Python's json
    b"\xef\xbb\xbf \r\n\t" + b'{"type": "z", "bad": tru}',  # BOM, whitespace
    ' {"type": "z", "bad": }'.encode("utf-16-le"),       # UTF-16, which Python's json.loads(bytes) reads
], ids=["cut", "two-values", "long-number", "deep", "bom", "utf-16"])
def test_json_that_cannot_be_parsed_fails_closed(tmp_path: Path, content: bytes) -> None:
    stage = WebSocketSessions(NoConnections())
    for text in (True, False):
        flow = unit_flow(tmp_path)
        stage.websocket_start(flow)
        assert deliver(stage, flow, content, text=text).dropped
        assert "rule no-x could not evaluate this request and fails closed" in flow.metadata[
            "bastion.wsession"].closing


def test_readable_wide_json_is_judged_by_its_content(tmp_path: Path) -> None:
    stage = WebSocketSessions(NoConnections())
    flow = unit_flow(tmp_path)
    stage.websocket_start(flow)
    assert not deliver(stage, flow, '{"type": "z"}'.encode("utf-32"), text=False).dropped
    assert deliver(stage, flow, '\n{"type": "x"}'.encode("utf-16-be"), text=False).dropped


def test_looks_like_json() -> None:
    assert looks_like_json(b'{"a": 1}') and looks_like_json(b"[1]") and looks_like_json(b"{")
    assert looks_like_json(b" " * 100_000 + b"{")  # the whole message is scanned, not a head of it
    assert looks_like_json(b"\xef\xbb\xbf\r\n\t {}") and looks_like_json(b"\f\v[")
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):
        assert looks_like_json(' \n{"a": 1}'.encode(encoding)), encoding
        assert not looks_like_json(" \nhello".encode(encoding)), encoding
    for content in (b"", b"   ", b"hello {", b'"{}"', b"1", b"\xef\xbb\xbf", b"\x00\x01{}", b"\xff\xd8\xff{",
                    b"\xef\xbb\xbf\xef\xbb\xbf{}", b" " * 100_000 + b"x{"):
        assert not looks_like_json(content), content


class ExplodingPolicy:
    def evaluate(self, facts: RequestFacts, agent: str) -> Any:
        raise RuntimeError("boom")


def test_any_error_while_judging_refuses_the_message(tmp_path: Path) -> None:
    """mitmproxy logs an addon's exception and relays the message: the stage must refuse it instead."""
    stage = WebSocketSessions(NoConnections())
    flow = unit_flow(tmp_path)
    stage.websocket_start(flow)
    flow.metadata["bastion.wsession"].policy = ExplodingPolicy()
    assert not deliver(stage, flow, b"plain text is not judged").dropped
    assert deliver(stage, flow, b'{"type": "z"}').dropped
    assert flow.metadata["bastion.wsession"].closing == "Bastion could not check this message; the session was closed."


def test_errors_outside_the_rules_refuse_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = WebSocketSessions(NoConnections())
    flow = unit_flow(tmp_path)
    stage.websocket_start(flow)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("broken record")

    monkeypatch.setattr(stage, "_note", broken)
    assert deliver(stage, flow, b"hello").dropped
    assert flow.metadata["bastion.wsession"].closing == "Bastion could not check this message; the session was closed."


def test_a_close_bastion_started_is_recorded_as_bastion_s(tmp_path: Path) -> None:
    stage = WebSocketSessions(NoConnections())
    flow = unit_flow(tmp_path)
    stage.websocket_start(flow)
    flow.metadata[BASTION_CLOSE] = (MESSAGE_TOO_BIG, "too big")
    flow.websocket.close_code, flow.websocket.close_reason, flow.websocket.closed_by_client = 1009, "too big", True
    stage.websocket_end(flow)
    assert flow.metadata["bastion.traffic"]["websocket"]["close"] == {"code": 1009, "reason": "too big",
                                                                       "by": "bastion"}
    # The peer's own close, when it came before Bastion's went out, is the peer's.
    other = unit_flow(tmp_path)
    stage.websocket_start(other)
    other.metadata[BASTION_CLOSE] = (MESSAGE_TOO_BIG, "too big")
    other.websocket.close_code, other.websocket.close_reason, other.websocket.closed_by_client = 1000, "", False
    stage.websocket_end(other)
    assert other.metadata["bastion.traffic"]["websocket"]["close"] == {"code": 1000, "reason": "", "by": "server"}


def test_json_over_the_size_limit_fails_closed(tmp_path: Path) -> None:
    stage = WebSocketSessions(NoConnections())
    flow = unit_flow(tmp_path, body_limit=64)
    stage.websocket_start(flow)
    assert not deliver(stage, flow, b"plain text " * 10).dropped
    assert deliver(stage, flow, b'  {"type": "z", "pad": "' + b"p" * 100 + b'"}').dropped


def test_hold_is_refused_and_report_mode_only_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stage = WebSocketSessions(NoConnections())
    held = unit_flow(tmp_path)
    stage.websocket_start(held)
    assert deliver(stage, held, b'{"type": "y"}').dropped
    assert "Approvals are not available for WebSocket messages (rule y-needs-approval)" in (
        held.metadata["bastion.wsession"].closing)

    shadow = unit_flow(tmp_path, agent="shadow")
    stage.websocket_start(shadow)
    with caplog.at_level("INFO", logger="bastion.proxy"):
        assert not deliver(stage, shadow, b'{"type": "x"}').dropped
        assert not deliver(stage, shadow, b'{"type": "z"}').dropped
    assert "report mode: would close websocket ws://example.com:80/ws on a client message: Denied by rule no-x." \
        in caplog.text
    assert shadow.metadata["bastion.wsession"].closing is None


def test_record_bounds(tmp_path: Path) -> None:
    stage = WebSocketSessions(NoConnections(), max_text_chars=8, max_messages=3, max_text_bytes=12)
    flow = unit_flow(tmp_path)
    flow.metadata[flowmeta.TRAFFIC] = traffic = {"llm": {"model": "m"}}
    stage.websocket_start(flow)
    deliver(stage, flow, b"abcdefghij")
    deliver(stage, flow, "ééé".encode(), from_client=False)  # 6 bytes; 4 left in the session's budget
    deliver(stage, flow, bytes(10), text=False)
    deliver(stage, flow, b"not listed")
    record = flow.metadata[flowmeta.TRAFFIC]["websocket"]
    assert flow.metadata[flowmeta.TRAFFIC] is traffic and traffic["llm"] == {"model": "m"}
    assert [(m["type"], m["size"], m.get("text"), m.get("sha256"), m["cut"]) for m in record["messages"]] == [
        ("text", 10, "abcdefgh", None, True),
        ("text", 6, "éé", None, True),
        ("binary", 10, None, hashlib.sha256(bytes(10)).hexdigest(), False),
    ]
    assert (record["kept"], record["total"], record["bytes"]) == (3, 4, {"client": 30, "server": 6})


def test_close_reason_and_message_facts() -> None:
    assert cut_close_reason("Denied by rule x.") == "Denied by rule x."
    cut = cut_close_reason("ä" * 100)
    assert cut == "ä" * 61 and len(cut.encode()) == 122
    base = RequestFacts.from_url("POST", "wss://example.com/ws", body=b'{"a": 1}')
    assert base.json() == {"a": 1}
    facts = message_facts(base, b'{"a": 2}')
    assert facts.json() == {"a": 2} and facts.body == b'{"a": 2}' and facts.method == "POST"
    assert base.json() == {"a": 1}
