"""A hostile or runaway client against a running `bastion serve`: bodies refused before they are read, request
heads that could be read two ways, timeouts, upstreams that fail, CONNECT retried after a 407.

Most probes use a raw socket: the point is what a client that does not play by the rules can make the proxy do.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import TESTDATA_RULES
from support.bastion import BastionServer, clean_env, run_bastion
from support.certs import CertFiles
from support.ports import free_port
from support.upstream import Upstream

SUPPORT = ("support-bot", "sb-token:with:colons")
AUTH = "Basic " + base64.b64encode(b"support-bot:sb-token:with:colons").decode()
LIMIT = 32 << 20  # bastion serve's request body limit


@pytest.fixture(scope="module")
def strict_timeouts(tmp_path_factory: pytest.TempPathFactory, bastion_home: Path, test_certs: CertFiles,
                    upstream: Upstream) -> Iterator[BastionServer]:
    with run_bastion(tmp_path_factory.mktemp("timeouts"), [TESTDATA_RULES / "proxy.yaml"], home=bastion_home,
                     upstream_ca=test_certs.ca_cert,
                     extra_args=["--header-timeout", "2", "--idle-timeout", "4"]) as srv:
        yield srv


def connect(server: BastionServer) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.proxy_port), timeout=20)
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


def error_of(status: int, headers: dict[str, str], body: bytes) -> dict[str, str]:
    err = json.loads(body)["error"]
    assert headers["x-bastion-request-id"] == err["request_id"]
    return dict(err)


def post_head(upstream: Upstream, path: str, *extra: str, auth: bool = True) -> bytes:
    lines = [f"POST {upstream.http_url}{path} HTTP/1.1", f"Host: 127.0.0.1:{upstream.http_port}", *extra]
    if auth:
        lines.append(f"Proxy-Authorization: {AUTH}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- bodies ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["Content-Length: 700000000", "Transfer-Encoding: chunked"])
def test_a_call_without_credentials_is_answered_before_its_body(server: BastionServer, upstream: Upstream,
                                                               framing: str) -> None:
    """407 arrives while the 700 MB body is still unsent: the proxy never waits for (or buffers) it."""
    with connect(server) as s:
        s.sendall(post_head(upstream, "/echo/upload", framing, auth=False))
        if "chunked" in framing:
            s.sendall(b"10\r\n" + b"x" * 16 + b"\r\n")
        status, headers, body = read_response(s)
    assert status == 407
    assert error_of(status, headers, body)["type"] == "proxy_auth_required"


def test_a_body_over_the_limit_by_content_length_is_refused_before_it_is_read(
        server: BastionServer, upstream: Upstream) -> None:
    with connect(server) as s:
        s.sendall(post_head(upstream, "/echo/upload", "Content-Length: 200000000", "Expect: 100-continue"))
        status, headers, body = read_response(s)
    assert status == 413
    assert error_of(status, headers, body)["type"] == "request_too_large"
    assert headers["connection"] == "close"


def test_a_chunked_body_is_stopped_at_the_limit_while_it_arrives(server: BastionServer,
                                                                upstream: Upstream) -> None:
    """No end of the body is ever sent: the 413 can only come from counting the body as it arrives."""
    before = len(upstream.hits)
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"y" * (1 << 20))
    with connect(server) as s:
        s.sendall(post_head(upstream, "/echo/chunked-upload", "Transfer-Encoding: chunked"))
        for _ in range(LIMIT // (1 << 20) + 2):
            s.sendall(chunk)
        status, headers, body = read_response(s)
    assert status == 413
    assert error_of(status, headers, body)["type"] == "request_too_large"
    assert all(path != "/echo/chunked-upload" for _, path in upstream.hits[before:])


def test_a_client_that_sends_its_whole_body_first_still_reads_the_refusal(server: BastionServer,
                                                                          upstream: Upstream) -> None:
    """python-requests writes the whole body before it reads: the refusal must wait for it, not reset."""
    resp = requests.post(f"{upstream.http_url}/echo/upload", data=b"z" * (40 << 20),
                         proxies={"http": f"http://127.0.0.1:{server.proxy_port}"}, timeout=60)
    assert resp.status_code == 407
    assert resp.json()["error"]["type"] == "proxy_auth_required"


def test_a_body_under_the_limit_still_goes_through(server: BastionServer, upstream: Upstream) -> None:
    session = server.session(*SUPPORT)
    resp = session.post(f"{upstream.http_url}/echo/fine", data=iter([b"a" * (1 << 20)] * 3), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["body_len"] == 3 << 20


# -- request heads --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    b"X-Note: a\rX-Bastion-Agent: forged",
    b"X-Note: a\rBastion-Fence: 999",
    b"X-Note: a\x00b",
])
def test_line_breaks_and_nul_inside_a_header_are_refused(server: BastionServer, upstream: Upstream,
                                                         header: bytes) -> None:
    before = len(upstream.hits)
    with connect(server) as s:
        s.sendall(f"GET {upstream.http_url}/echo/injected HTTP/1.1\r\nHost: 127.0.0.1:{upstream.http_port}\r\n"
                  f"Proxy-Authorization: {AUTH}\r\n".encode() + header + b"\r\n\r\n")
        status, headers, body = read_response(s)
    assert status == 400, body
    assert error_of(status, headers, body)["type"] == "bad_request"  # Bastion's answer, not the upstream's
    assert all(path != "/echo/injected" for _, path in upstream.hits[before:])


def test_two_proxy_authorization_headers_are_refused(server: BastionServer, upstream: Upstream) -> None:
    other = "Basic " + base64.b64encode(b"billing-bot:billing-token").decode()
    with connect(server) as s:
        s.sendall(f"GET {upstream.http_url}/echo/two HTTP/1.1\r\nHost: 127.0.0.1:{upstream.http_port}\r\n"
                  f"Proxy-Authorization: {AUTH}\r\nProxy-Authorization: {other}\r\n\r\n".encode())
        status, headers, body = read_response(s)
    assert status == 400
    assert "more than one Proxy-Authorization" in error_of(status, headers, body)["message"]
    with connect(server) as s:
        s.sendall(f"CONNECT localhost:{upstream.https_port} HTTP/1.1\r\nHost: localhost:{upstream.https_port}\r\n"
                  f"Proxy-Authorization: {AUTH}\r\nProxy-Authorization: {other}\r\n\r\n".encode())
        status, _, _ = read_response(s)
    assert status == 400


def test_an_endless_request_head_is_cut(server: BastionServer) -> None:
    with connect(server) as s:
        s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\n")
        try:
            for _ in range(64):
                s.sendall(b"X-Pad: " + b"p" * 8000 + b"\r\n")
        except OSError:
            pass  # closed under us: that is the point
        status, _, _ = read_response(s)
    assert status == 431


def test_connect_may_be_retried_with_credentials_after_a_407(server: BastionServer, upstream: Upstream) -> None:
    """libcurl (and so git) sends CONNECT without credentials, reads the 407, and retries on the same socket."""
    with connect(server) as s:
        target = f"localhost:{upstream.https_port}"
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status, _, _ = read_response(s)
        assert status == 407
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {AUTH}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


def test_curl_with_proxy_anyauth_goes_through_a_407_first(server: BastionServer, upstream: Upstream) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--proxy-anyauth", "-x", f"http://127.0.0.1:{server.proxy_port}",
         "-U", "support-bot:sb-token:with:colons", "--cacert", str(server.ca_cert),
         f"https://localhost:{upstream.https_port}/echo/anyauth"],
        capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/echo/anyauth"


# -- upstream failures ----------------------------------------------------------------------------------------


def test_an_upstream_that_refuses_the_connection_gets_a_json_502(server: BastionServer) -> None:
    port = free_port()  # nothing listens there
    resp = server.session(*SUPPORT).get(f"http://127.0.0.1:{port}/x", timeout=20)
    assert resp.status_code == 502
    err = resp.json()["error"]
    assert err["type"] == "upstream_unreachable"
    assert resp.headers["X-Bastion-Request-Id"] == err["request_id"]


def test_a_json_rpc_call_to_an_unreachable_upstream_gets_a_json_rpc_502(server: BastionServer) -> None:
    """An MCP client reads a JSON-RPC error body whatever the status: it shows Bastion's message for its call."""
    port = free_port()  # nothing listens there
    call = {"jsonrpc": "2.0", "id": 41, "method": "tools/call", "params": {"name": "search", "arguments": {}}}
    resp = server.session(*SUPPORT).post(f"http://127.0.0.1:{port}/mcp", json=call, timeout=20,
                                         headers={"Accept": "application/json, text/event-stream"})
    assert resp.status_code == 502
    body = resp.json()
    assert (body["jsonrpc"], body["id"]) == ("2.0", 41) and set(body) == {"jsonrpc", "id", "error"}
    err = body["error"]
    assert err["type"] == "upstream_unreachable" and err["code"] == -32000
    assert err["message"].startswith(f"Bastion could not get an answer from 127.0.0.1:{port}")
    assert err["data"]["type"] == "upstream_unreachable"
    assert resp.headers["X-Bastion-Request-Id"] == err["data"]["request_id"]


def test_an_upstream_that_resets_before_answering_gets_a_json_502(server: BastionServer) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def reset_everyone() -> None:
        for _ in range(4):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # RST

    thread = threading.Thread(target=reset_everyone, daemon=True)
    thread.start()
    try:
        resp = server.session(*SUPPORT).get(f"http://127.0.0.1:{port}/x", timeout=20)
    finally:
        listener.close()
    assert resp.status_code == 502
    assert resp.json()["error"]["type"] == "upstream_unreachable"
    assert "X-Bastion-Request-Id" in resp.headers


# -- timeouts -------------------------------------------------------------------------------------------------


def closed_by_proxy(s: socket.socket) -> bytes:
    """What the proxy sent before it closed the connection (the socket's own timeout fails the test)."""
    received = b""
    while chunk := s.recv(65536):
        received += chunk
    return received


def test_a_slow_request_head_is_closed_by_the_header_timeout(strict_timeouts: BastionServer) -> None:
    with connect(strict_timeouts) as s:
        s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(3):  # keep trickling: the idle timeout alone would never fire
            s.sendall(b"X-Slow: 1\r\n")
            threading.Event().wait(1)
        closed_by_proxy(s)


def test_a_silent_connection_is_closed(strict_timeouts: BastionServer) -> None:
    with connect(strict_timeouts) as s:
        assert closed_by_proxy(s) == b""


def test_a_kept_alive_connection_serves_calls_until_the_timeout(strict_timeouts: BastionServer,
                                                                upstream: Upstream) -> None:
    with connect(strict_timeouts) as s:
        for i in range(3):
            s.sendall(f"GET {upstream.http_url}/echo/k{i} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.http_port}\r\n"
                      f"Proxy-Authorization: {AUTH}\r\n\r\n".encode())
            status, _, _ = read_response(s)
            assert status == 200
        closed_by_proxy(s)


def test_a_slow_upstream_answer_is_not_cut_by_the_header_timeout(strict_timeouts: BastionServer,
                                                                 upstream: Upstream) -> None:
    resp = strict_timeouts.session(*SUPPORT).get(f"{upstream.http_url}/slow?seconds=3", timeout=30)
    assert resp.status_code == 200


# -- streaming a body no rule reads ---------------------------------------------------------------------------


class _RawUpstream:
    """A one-shot upstream on a raw socket: it tells when the request head arrived, before any body."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(20)
        self.port = self.sock.getsockname()[1]
        self.conn: socket.socket | None = None

    def read_head(self) -> bytes:
        self.conn, _ = self.sock.accept()
        self.conn.settimeout(20)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.conn.recv(65536)
        return data

    def read_body_and_answer(self, head: bytes, length: int) -> bytes:
        assert self.conn is not None
        body = head.partition(b"\r\n\r\n")[2]
        while len(body) < length:
            body += self.conn.recv(1 << 20)
        self.conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
        return body

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.sock.close()


def test_a_large_body_no_rule_reads_is_streamed_and_audited(server: BastionServer) -> None:
    """8 MiB announced, 1 MiB sent: the upstream already has the request. A proxy that buffered the body
    would forward nothing before the last byte. The audit record still describes the whole body."""
    import hashlib

    from auditproxy import wait_for_record

    body = bytes(range(256)) * (8 << 12)  # 8 MiB
    upstream = _RawUpstream()
    try:
        with connect(server) as s:
            s.sendall(f"POST http://127.0.0.1:{upstream.port}/upload HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                      f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
                      f"Proxy-Authorization: {AUTH}\r\n\r\n".encode())
            s.sendall(body[: 1 << 20])
            head = upstream.read_head()  # arrives while 7 MiB are still unsent
            assert head.startswith(b"POST /upload HTTP/1.1")
            got: list[bytes] = []  # the upstream reads while the client sends: the proxy keeps no backlog
            reader = threading.Thread(target=lambda: got.append(upstream.read_body_and_answer(head, len(body))))
            reader.start()
            s.sendall(body[1 << 20:])
            reader.join(30)
            received = got[0]
            status, headers, _ = read_response(s)
    finally:
        upstream.close()
    assert received == body
    assert status == 200
    record = wait_for_record(f"sqlite:///{server.home / 'bastion.db'}", headers["x-bastion-request-id"])
    assert record.request.body is not None
    assert record.request.body.size == len(body)
    assert record.request.body.sha256 == hashlib.sha256(body).hexdigest()
