"""Fast tests of the proxy's pure parts and of its addons driven with in-memory mitmproxy flows."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import socket
import time
from pathlib import Path

import pytest
from conftest import TESTDATA_RULES
from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from bastion.config import ConfigError
from bastion.policy.facts import RequestFacts
from bastion.policy.load import load_policy
from bastion.proxy import flowmeta
from bastion.proxy.enforce import Enforce, facts_headers, host_header_matches
from bastion.proxy.flights import Flights
from bastion.proxy.gate import Gate
from bastion.proxy.guard import NetworkGuard, ResolveError, Resolver
from bastion.proxy.identity import Identity, parse_basic, strip_private_headers
from bastion.proxy.netcheck import ProtectedTargets, embedded_ipv4, forbidden_kind, special_kind
from bastion.proxy.pipeline import Pipeline
from bastion.proxy.reload import RulesWatcher, fingerprint
from bastion.proxy.run import admin_no_proxy, agent_environment, proxy_url_with_credentials
from bastion.proxy.settings import _AUDIT_SCHEMES, _STORE_SCHEMES, service_address
from bastion.proxy.state import PolicyState
from bastion.proxy.streaming import STREAM_ABOVE, ResponseStreaming, should_stream

ip = ipaddress.ip_address


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


# -- credentials and headers -----------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    (basic("bot:tok"), ("bot", "tok")),
    (basic("bot:to:k:en"), ("bot", "to:k:en")),
    (basic("bot:"), ("bot", "")),
    ("basic " + base64.b64encode(b"bot:x").decode(), ("bot", "x")),
    (basic("b\u00f6t:\u00fc"), ("b\u00f6t", "\u00fc")),
    (basic("no-colon"), None),
    (basic(":token-only"), None),
    ("Basic !!!", None),
    ("Basic " + base64.b64encode(b"\xff:\xfe").decode(), None),
    ("Bearer " + base64.b64encode(b"bot:tok").decode(), None),
    ("", None),
    ("Basic", None),
])
def test_parse_basic(header: str, expected: tuple[str, str] | None) -> None:
    assert parse_basic(header) == expected


def test_strip_private_headers() -> None:
    headers = http.Headers([(b"Host", b"a"), (b"Proxy-Authorization", b"Basic x"), (b"X-Bastion-Agent", b"evil"),
                            (b"x-bastion-request-id", b"forged"), (b"Proxy-Connection", b"keep-alive"),
                            (b"X-Other", b"1")])
    assert strip_private_headers(headers) == "Basic x"
    assert headers.fields == ((b"Host", b"a"), (b"X-Other", b"1"))
    clean = http.Headers([(b"Host", b"a")])
    before = clean.fields
    assert strip_private_headers(clean) is None
    assert clean.fields is before  # nothing removed, nothing copied


def test_facts_headers_join_repeats_and_lowercase() -> None:
    fields = ((b"Accept", b"a"), (b"accept", b"b"), (b"X-Y", b"\xc3\xa9"))
    assert facts_headers(fields) == {"accept": "a, b", "x-y": "\u00e9"}


@pytest.mark.parametrize(("host_header", "ok"), [
    ("api.example.com", True), ("API.Example.com.", True), ("api.example.com:443", True),
    ("api.example.com:8443", False), ("other.example.com", False), ("", False), ("a b", False),
    ("raw-name", True), ("raw-name:443", True), ("raw-name:444", False), ("raw-name.evil.example", False),
])
def test_host_header_matches(host_header: str, ok: bool) -> None:
    facts = RequestFacts.from_url("GET", "https://api.example.com/x")
    assert host_header_matches(host_header, "raw-name", 443, facts) is ok


# -- addresses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("addr", "kind"), [
    ("8.8.8.8", None), ("2606:4700::1111", None),
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.0.1", "private"), ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("100.64.0.1", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("fc00::1", "private"), ("192.0.2.1", "private"), ("240.0.0.1", "reserved"),
])
def test_special_kind(addr: str, kind: str | None) -> None:
    assert special_kind(ip(addr)) == kind


@pytest.mark.parametrize(("addr", "inner"), [
    ("::ffff:127.0.0.1", "127.0.0.1"), ("::127.0.0.1", "127.0.0.1"), ("64:ff9b::a00:1", "10.0.0.1"),
    ("2002:a9fe:a9fe::1", "169.254.169.254"), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),
    ("2606:4700::1111", None), ("::1", None),
])
def test_embedded_ipv4(addr: str, inner: str | None) -> None:
    found = embedded_ipv4(ip(addr))  # type: ignore[arg-type]
    assert (str(found) if found else None) == inner


def test_forbidden_kind_with_allow_list() -> None:
    allow = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.1.0.0/16"))
    assert forbidden_kind(ip("127.0.0.1"), allow) is None
    assert forbidden_kind(ip("10.1.2.3"), allow) is None
    assert forbidden_kind(ip("10.2.0.1"), allow) == "private"
    assert forbidden_kind(ip("::ffff:127.0.0.1"), allow) is None  # judged by the IPv4 inside
    assert forbidden_kind(ip("::ffff:10.2.0.1"), allow) == "private (10.2.0.1 embedded in IPv6)"
    assert forbidden_kind(ip("::1"), allow) == "loopback"
    assert forbidden_kind(ip("169.254.169.254"), allow) == "cloud metadata"
    assert forbidden_kind(ip("93.184.215.14"), ()) is None


def test_protected_targets() -> None:
    targets = ProtectedTargets()
    targets.local_ips.add(ip("10.0.0.5"))
    targets.add_local(8081, "Bastion's admin listener", "0.0.0.0")
    targets.add_service("redis.internal", 6379, "the store", [ip("10.0.0.9")])
    for addr in ("127.0.0.1", "127.9.9.9", "::1", "0.0.0.0", "::", "10.0.0.5", "::ffff:127.0.0.1"):
        assert targets.address_label(ip(addr), 8081) == "Bastion's admin listener", addr
    assert targets.address_label(ip("10.0.0.6"), 8081) is None
    assert targets.address_label(ip("127.0.0.1"), 8082) is None
    assert targets.address_label(ip("10.0.0.9"), 6379) == "the store"
    assert targets.address_label(ip("::ffff:10.0.0.9"), 6379) == "the store"
    assert targets.name_label("redis.internal", 6379) == "the store"


# -- settings and bastion run ----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "schemes", "expected"), [
    ("sqlite:///bastion.db", _STORE_SCHEMES, None),
    ("sqlite:////var/lib/bastion.db", _STORE_SCHEMES, None),
    ("redis://Redis.internal:6380/0", _STORE_SCHEMES, ("redis.internal", 6380)),
    ("rediss://user:pw@redis/1", _STORE_SCHEMES, ("redis", 6379)),
    ("postgresql://postgres@db/audit", _AUDIT_SCHEMES, ("db", 5432)),
    ("postgres://u@[::1]:6543/a", _AUDIT_SCHEMES, ("::1", 6543)),
    ("postgresql:///audit?host=/run/postgresql", _AUDIT_SCHEMES, None),
    ("jsonl:///var/log/bastion", _AUDIT_SCHEMES, None),
])
def test_service_address(url: str, schemes: dict[str, int | None], expected: tuple[str, int] | None) -> None:
    assert service_address(url, "--x", schemes) == expected


@pytest.mark.parametrize("url", ["mysql://db/x", "sqlite://relative.db", "sqlite:///", "redis:///0",
                                 "redis://host:99999/0", "jsonl://dir"])
def test_service_address_rejects(url: str) -> None:
    schemes = _STORE_SCHEMES if url.startswith(("redis", "mysql", "sqlite")) else _AUDIT_SCHEMES
    with pytest.raises(ConfigError):
        service_address(url, "--x", schemes)


def test_proxy_url_with_credentials_encodes_them() -> None:
    assert proxy_url_with_credentials("http://127.0.0.1:8080", "bot", "a:b@c/d") == \
        "http://bot:a%3Ab%40c%2Fd@127.0.0.1:8080"
    assert proxy_url_with_credentials("127.0.0.1:8080", "bot", None) == "http://127.0.0.1:8080"
    assert proxy_url_with_credentials("http://old:cred@[::1]:8080/", "b", "t") == "http://b:t@[::1]:8080"
    with pytest.raises(ConfigError):
        proxy_url_with_credentials("socks5://127.0.0.1:1080", "b", "t")


def test_agent_environment() -> None:
    env = agent_environment({"PATH": "/bin", "NO_PROXY": "*", "ALL_PROXY": "socks5://x"},
                            proxy_url="http://b:t@127.0.0.1:8080", bundle="/h/ca-bundle.pem",
                            ca_cert="/h/mitmproxy-ca-cert.pem", no_proxy=admin_no_proxy("127.0.0.1:8081"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name] == "http://b:t@127.0.0.1:8080"
    assert env["NO_PROXY"] == env["no_proxy"] == "127.0.0.1:8081,localhost:8081"
    assert "ALL_PROXY" not in env
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == env["CURL_CA_BUNDLE"] == "/h/ca-bundle.pem"
    assert env["NODE_EXTRA_CA_CERTS"] == "/h/mitmproxy-ca-cert.pem"
    assert env["NODE_USE_ENV_PROXY"] == "1"
    assert env["PATH"] == "/bin"


# -- the rules watcher -----------------------------------------------------------------------------------


def test_fingerprint_sees_symlink_swaps_renames_and_new_files(tmp_path: Path) -> None:
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "rules.yaml").write_text("a")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "rules.yaml").symlink_to("..data/rules.yaml")
    paths = [str(tmp_path)]
    first = fingerprint(paths)
    assert fingerprint(paths) == first
    (tmp_path / "..v2").mkdir()
    (tmp_path / "..v2" / "rules.yaml").write_text("a")  # same size and content, other file
    (tmp_path / "..tmp").symlink_to("..v2")
    os.replace(tmp_path / "..tmp", tmp_path / "..data")
    second = fingerprint(paths)
    assert second != first
    (tmp_path / "extra.yml").write_text("b")
    assert fingerprint(paths) != second
    single = tmp_path / "one.yaml"
    single.write_text("x")
    before = fingerprint([str(single)])
    (tmp_path / "new.yaml").write_text("x")
    os.replace(tmp_path / "new.yaml", single)
    assert fingerprint([str(single)]) != before
    single.unlink()
    assert "missing" in fingerprint([str(single)])[0]


async def test_watcher_calls_back_once_per_settled_change(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("v1")
    calls: list[float] = []

    async def changed() -> None:
        calls.append(time.monotonic())

    task = asyncio.create_task(RulesWatcher([str(f)], changed, interval=0.05, settle=0.05).run())
    try:
        await asyncio.sleep(0.15)
        assert calls == []
        f.write_text("v2")
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.02)
        assert len(calls) == 1
        await asyncio.sleep(0.2)
        assert len(calls) == 1
    finally:
        task.cancel()


# -- the policy state ------------------------------------------------------------------------------------


POLICY = """\
version: 1
defaults: {effect: deny}
agents:
  bot: {token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}
rules:
  - id: r
    effect: allow
    agents: [bot]
"""


async def test_policy_state_reload(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY)
    swaps = []
    state = await PolicyState.load([str(f)])
    state.on_swap(swaps.append)
    first = state.policy
    unchanged = await state.reload("api")
    assert unchanged.ok and not unchanged.changed and state.policy is first
    f.write_text(POLICY.replace("id: r", "id: r2"))
    changed = await state.reload("watch")
    assert changed.ok and changed.changed and state.policy is not first
    assert swaps == [state.policy]
    good = state.policy
    f.write_text(POLICY.replace("effect: allow", "effect: perhaps"))
    failed = await state.reload("sighup")
    assert not failed.ok
    assert state.policy is good
    assert failed.issues[0].line == 7
    assert state.to_json()["last_reload"]["errors"][0]["line"] == 7


async def test_pinned_agent_must_stay_in_the_policy(tmp_path: Path) -> None:
    from bastion.proxy.server import pinned_agent_validator

    f = tmp_path / "p.yaml"
    f.write_text(POLICY)
    state = await PolicyState.load([str(f)], pinned_agent_validator("bot"))
    f.write_text(POLICY.replace("bot", "robot"))
    result = await state.reload("watch")
    assert not result.ok
    assert "'bot' (--agent / BASTION_AGENT) is not defined" in result.issues[0].message


# -- addons with in-memory flows -------------------------------------------------------------------------


def client() -> connection.Client:
    return connection.Client(peername=("127.0.0.1", 40000), sockname=("127.0.0.1", 8080),
                             timestamp_start=time.time())


def flow_for(url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
             conn: connection.Client | None = None, body: bytes = b"") -> http.HTTPFlow:
    f = http.HTTPFlow(conn or client(), connection.Server(address=None))
    f.request = http.Request.make(method, url, body, headers or {})
    return f


def connect_flow(host: str, port: int, conn: connection.Client, header: str | None) -> http.HTTPFlow:
    f = http.HTTPFlow(conn, connection.Server(address=None))
    f.request = http.Request(host, port, b"CONNECT", b"", f"{host}:{port}".encode(), b"", b"HTTP/1.1",
                             http.Headers([(b"Proxy-Authorization", header.encode())] if header else []), b"",
                             None, time.time(), time.time())
    return f


@pytest.fixture
def state() -> PolicyState:
    return PolicyState([str(TESTDATA_RULES / "proxy.yaml")], load_policy([TESTDATA_RULES / "proxy.yaml"]))


def run_request(f: http.HTTPFlow, identity: Identity, guard: NetworkGuard | None = None) -> None:
    """What mitmproxy does with a request, hook by hook, without sockets: through the pipeline, in the order
    `build_proxy` gives these stages."""
    pipeline = Pipeline([s for s in (identity, Enforce(), guard, Gate()) if s is not None])
    assert pipeline.requestheaders(f) is None
    assert pipeline.request(f) is None  # IP literal hosts: no DNS, nothing to wait for


async def test_identity_binds_the_tunnel_and_rechecks_after_a_reload(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text((TESTDATA_RULES / "proxy.yaml").read_text())
    state = await PolicyState.load([str(rules)])
    identity = Identity(state)
    conn = client()
    connect = connect_flow("localhost", 443, conn, basic("support-bot:sb-token:with:colons"))
    identity.http_connect(connect)
    assert connect.response is None
    assert connect.metadata[flowmeta.AGENT] == "support-bot"
    inner = flow_for("https://localhost/echo/x", conn=conn)
    identity.requestheaders(inner)
    assert inner.response is None and inner.metadata[flowmeta.AGENT] == "support-bot"
    # A reload that changes the agent's token revokes the open tunnel.
    rules.write_text(rules.read_text().replace(
        "f153f5b988c999f9e82cdeb61dd14021cfbd7e9c91cc2da0e453f29c01fc7500", "a" * 64))
    assert (await state.reload("api")).changed
    again = flow_for("https://localhost/echo/y", conn=conn)
    identity.requestheaders(again)
    assert again.response is not None and again.response.status_code == 407


def test_identity_on_a_keep_alive_connection_rechecks_changed_credentials(state: PolicyState) -> None:
    identity = Identity(state)
    conn = client()
    good = basic("support-bot:sb-token:with:colons")
    for header, status in ((good, None), (good, None), ("Basic \xff\xfe", 407), (basic("support-bot:x"), 407),
                           (good, None)):
        f = flow_for("http://127.0.0.1/echo", conn=conn, headers={"Proxy-Authorization": header})
        identity.requestheaders(f)
        assert (f.response.status_code if f.response else None) == status, header


def test_identity_refuses_bad_connect_and_retired(state: PolicyState) -> None:
    identity = Identity(state)
    bad = connect_flow("localhost", 443, client(), "Basic %%%")
    identity.http_connect(bad)
    assert bad.response is not None and bad.response.status_code == 407
    assert bad.response.headers["Proxy-Authenticate"] == 'Basic realm="bastion"'
    retired = flow_for("http://127.0.0.1/echo", headers={"Proxy-Authorization": basic("legacy-bot:legacy-token")})
    identity.requestheaders(retired)
    assert retired.response is not None and retired.response.status_code == 403
    assert b"agent_retired" in (retired.response.content or b"")


def test_enforce_forwards_the_normalized_path(state: PolicyState) -> None:
    guard = NetworkGuard(ProtectedTargets())
    f = flow_for("http://127.0.0.1:9000/echo/a/./b/../c//d?x=1",
                 headers={"Proxy-Authorization": basic("support-bot:sb-token:with:colons")})
    run_request(f, Identity(state), guard)
    assert f.response is None
    assert f.request.path == "/echo/a/c/d?x=1"
    assert f.metadata[flowmeta.UPSTREAM_ADDRESS] == ("127.0.0.1", 9000)
    assert f.metadata[flowmeta.DECISION].effect == "allow"


@pytest.mark.parametrize(("url", "obligation", "error_type", "named"), [
    ("https://localhost/echo/refunds", flowmeta.OBLIGATION_APPROVAL, "approval_unavailable",
     "refunds-need-approval"),
    ("https://localhost/echo/tickets/42/comments", flowmeta.OBLIGATION_LOCK, "store_unavailable", "ticket:42"),
])
def test_gate_refuses_unmet_obligations(state: PolicyState, url: str, obligation: str, error_type: str,
                                        named: str) -> None:
    """Nothing in the pipeline met the hold or the lock: the gate refuses, 503 with x-should-retry: false."""
    f = flow_for(url, method="POST", headers={"Proxy-Authorization": basic("support-bot:sb-token:with:colons")})
    identity, enforce = Identity(state), Enforce()
    identity.requestheaders(f)
    enforce.request(f)
    assert f.response is None
    assert f.metadata[flowmeta.OBLIGATIONS] == {obligation}
    f.metadata[flowmeta.UPSTREAM_ADDRESS] = ("127.0.0.1", 443)  # as the network guard leaves it
    Gate().request(f)
    assert f.response is not None and f.response.status_code == 503
    assert f.response.headers["x-should-retry"] == "false"
    body = json.loads(f.response.content or b"")
    assert body["error"]["type"] == error_type
    assert named in body["error"]["message"]


def test_flights_keep_only_the_newest_websocket_message() -> None:
    from mitmproxy import websocket

    f = flow_for("https://localhost/ws")
    f.websocket = websocket.WebSocketData()
    flights = Flights()
    for i in range(100):
        f.websocket.messages.append(websocket.WebSocketMessage(1, True, f"m{i}".encode()))
        flights.websocket_message(f)
        assert f.websocket.messages[-1].content == f"m{i}".encode()
    assert len(f.websocket.messages) == 1


def test_gate_fails_closed_without_a_decision() -> None:
    f = flow_for("http://127.0.0.1/x")
    f.metadata[flowmeta.REQUEST_ID] = "rid"
    Gate().request(f)
    assert f.response is not None and f.response.status_code == 500
    assert f.response.headers[flowmeta.REQUEST_ID_HEADER] == "rid"


async def test_flights_count_what_is_in_flight_until_it_ends() -> None:
    """A graceful shutdown waits for `wait_idle`: it returns once every request answered, failed or (for a
    websocket) ended."""
    from mitmproxy import websocket

    flights = Flights()
    plain, failed, ws = flow_for("http://127.0.0.1/a"), flow_for("http://127.0.0.1/b"), flow_for("http://127.0.0.1/c")
    ws.websocket = websocket.WebSocketData()
    for f in (plain, failed, ws):
        flights.requestheaders(f)
    assert flights.inflight == 3
    idle = asyncio.create_task(flights.wait_idle())
    plain.response = ws.response = http.Response.make(200)
    flights.response(plain)
    flights.error(failed)
    flights.response(ws)  # the upgrade's answer: the session goes on
    await asyncio.sleep(0)
    assert flights.inflight == 1 and not idle.done()
    flights.websocket_end(ws)
    await asyncio.wait_for(idle, 1)
    assert flights.inflight == 0


def test_gate_stamps_the_request_id_on_upstream_answers() -> None:
    """Added when absent; replaced when the upstream sent one of its own (it must not speak for Bastion)."""
    gate = Gate()
    for upstream_headers in ({}, {"x-bastion-request-id": "forged"}):
        f = flow_for("http://127.0.0.1/x")
        f.metadata[flowmeta.REQUEST_ID] = "rid"
        f.response = http.Response.make(200, b"ok", upstream_headers)
        gate.responseheaders(f)
        assert f.response.headers.get_all(flowmeta.REQUEST_ID_HEADER) == ["rid"]


_MB = str(STREAM_ABOVE).encode()
_OVER = str(STREAM_ABOVE + 1).encode()


@pytest.mark.parametrize(("method", "status", "length", "ctype", "streamed"), [
    ("GET", 200, b"12", b"application/json", False),
    ("GET", 200, _MB, None, False),
    ("GET", 200, _OVER, None, True),
    ("GET", 200, None, b"application/json", True),
    ("POST", 500, None, None, True),
    ("HEAD", 200, None, None, False),
    ("GET", 101, None, None, False),
    ("GET", 204, None, None, False),
    ("GET", 304, None, None, False),
    ("GET", 200, b"0", b"text/event-stream", True),
    ("HEAD", 200, b"5", b"text/event-stream; charset=utf-8", True),
    ("GET", 200, None, b"text/event-stream", True),
    ("HEAD", 200, None, b"text/event-stream", False),
    ("GET", 200, b"12", b"text/html", False),
    ("GET", 200, b"abc", None, True),
    ("GET", 200, b"", None, True),
    ("GET", 200, b" 42 ", None, False),
], ids=["small-json", "exactly-the-limit", "over-the-limit", "no-length", "no-length-error", "head-no-length",
        "101-no-length", "204-no-length", "304-no-length", "event-stream-with-length", "head-event-stream",
        "event-stream-no-length", "head-event-stream-no-length", "small-html", "length-not-a-number",
        "length-empty", "length-with-spaces"])
def test_should_stream(method: str, status: int, length: bytes | None, ctype: bytes | None,
                       streamed: bool) -> None:
    assert should_stream(method, status, length, ctype) is streamed


def test_response_streaming_reads_the_head_and_leaves_refusals_and_taps_alone() -> None:
    stage = ResponseStreaming()
    f = flow_for("http://127.0.0.1/x")
    f.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream", "Content-Length": "3"})
    stage.responseheaders(f)
    assert f.response.stream is True
    mine = flow_for("http://127.0.0.1/x")
    mine.response = http.Response.make(500, b"{}", {})
    del mine.response.headers["content-length"]
    mine.metadata[flowmeta.REFUSAL] = "internal_error"
    stage.responseheaders(mine)
    assert mine.response.stream is False  # Bastion's own answer: complete, in memory

    def tap(chunk: bytes) -> bytes:
        return chunk

    tapped = flow_for("http://127.0.0.1/x")
    tapped.response = http.Response.make(200, b"", {"Content-Length": "3"})
    tapped.response.stream = tap
    stage.responseheaders(tapped)
    assert tapped.response.stream is tap


def test_guard_pins_the_vetted_address_and_restores_the_name(state: PolicyState) -> None:
    guard = NetworkGuard(ProtectedTargets())
    guard.resolver._cache["upstream.test"] = (time.monotonic() + 60, (ip("127.0.0.7"),))
    conn = client()
    f = flow_for("https://upstream.test:8443/echo/x", conn=conn)
    f.metadata[flowmeta.POLICY] = state.policy
    f.metadata[flowmeta.REQUEST_ID] = "rid"
    f.metadata[flowmeta.FACTS] = RequestFacts.from_url("GET", "https://upstream.test:8443/echo/x")
    assert guard.request(f) is None
    assert f.response is None
    server = connection.Server(address=("upstream.test", 8443), sni="client-claimed.example")
    data = server_hooks.ServerConnectionHookData(client=conn, server=server)
    guard.server_connect(data)
    assert server.address == ("127.0.0.7", 8443)  # the connection goes to the vetted IP ...
    assert server.sni == "upstream.test"  # ... and TLS names the host the rules saw
    server.state = connection.ConnectionState.OPEN
    guard.server_connected(data)
    assert server.address == ("upstream.test", 8443)  # reusable for later requests to the host
    stray = connection.Server(address=("never-vetted.test", 443))
    guard.server_connect(server_hooks.ServerConnectionHookData(client=conn, server=stray))
    assert stray.error and "not vetted" in stray.error


async def test_resolver_caches_shares_lookups_and_reports_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    calls: list[str] = []

    async def fake_getaddrinfo(host: str, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        calls.append(host)
        await asyncio.sleep(0.01)
        if host == "nx.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.10", 0)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.10", 0))]

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    resolver = Resolver(ttl=60)
    results = await asyncio.gather(*(resolver.resolve("ok.test") for _ in range(5)))
    assert results[0] == (ip("192.0.2.10"), ip("2001:db8::1"))
    assert calls == ["ok.test"]
    assert resolver.cached("ok.test") == results[0]
    with pytest.raises(ResolveError, match=r"cannot resolve nx\.test: Name or service not known"):
        await resolver.resolve("nx.test")
    assert resolver.cached("nx.test") is None


def test_the_approval_preview_masks_a_secret_echoed_elsewhere_in_the_call() -> None:
    """The approver's preview redacts as the audit does: a token masked in its header is masked where the
    body repeats it too."""
    from types import SimpleNamespace

    from mitmproxy.test import tflow

    from bastion.policy.engine import AuditSettings
    from bastion.proxy.approvals import _Preview

    secret = "sk-live-abcdefgh12345678"
    flow = tflow.tflow()
    flow.request.headers["authorization"] = f"Bearer {secret}"
    flow.request.headers["content-type"] = "application/json"
    flow.request.content = f'{{"note": "my key is {secret}", "n": 1}}'.encode()
    preview = _Preview().build(flow, f"http://example.com/x?echo={secret}", SimpleNamespace(audit=AuditSettings()))
    assert secret not in str(preview)
    assert "my key is" in preview["body"]
