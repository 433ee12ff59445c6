"""WebSocket sessions through a running proxy: every message in the session's audit record, and the policy applied
to what the agent sends (a refused message closes the session with 1008 and never reaches the upstream).

Real pieces only: `bastion serve` (audit on its home's SQLite store), a `websockets` server as the upstream on
127.0.0.1 (plain and TLS with the test CA; it remembers what it received and how each session was closed), and
the `websockets` client connecting through the proxy (HTTP CONNECT with credentials in the proxy URL).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
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
from bastion.proxy.wsession import WebSocketSessions, cut_close_reason, message_facts

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


async def test_text_that_is_not_json_and_binary_pass_unchecked(proxy: Proxy, ws_upstream: WsUpstream) -> None:
    sid = uuid.uuid4().hex
    cut_call = rpc("drop_database")[:-1]  # not JSON any more
    as_binary = rpc("drop_database").encode()
    async with session(proxy, ws_upstream.url("ws", sid)) as ws:
        rid = request_id(ws)
        for text in ("drop_database", cut_call):
            await ws.send(text)
            assert await ws.recv() == f"echo: {text}"
        await ws.send(as_binary)
        assert await ws.recv() == as_binary
    assert ws_upstream.received[sid] == ["drop_database", cut_call, as_binary]
    got = (await record_of(proxy, rid)).extra["websocket"]
    assert not any(m["refused"] for m in got["messages"]) and got["total"] == 6
    assert got["close"] == {"code": 1000, "reason": "", "by": "client"}


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


def test_only_json_text_from_the_client_is_checked(tmp_path: Path) -> None:
    stage = WebSocketSessions(NoConnections())
    flow = unit_flow(tmp_path)
    stage.websocket_start(flow)
    # Every deny rule with a json condition fails closed on text that is not JSON: it must not be judged at all.
    assert not deliver(stage, flow, b"hello").dropped
    assert not deliver(stage, flow, b'{"type": "x"', text=True).dropped
    assert not deliver(stage, flow, b'{"type": "x"}', text=False).dropped  # binary
    assert not deliver(stage, flow, b'{"type": "x"}', from_client=False).dropped  # from the upstream
    assert not deliver(stage, flow, b'{"type": "z"}').dropped
    assert deliver(stage, flow, b'{"type": "x"}').dropped
    assert deliver(stage, flow, b"after the refusal", from_client=False).dropped  # nothing more goes through
    stage.websocket_end(flow)
    record = flow.metadata["bastion.traffic"]["websocket"]
    assert [m["refused"] for m in record["messages"]] == [False] * 5 + [True, True]
    # No live connection to send a close frame on: the connection is cut, and the record says so.
    assert record["close"] == {"code": None, "reason": "Denied by rule no-x.", "by": "bastion"}


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
