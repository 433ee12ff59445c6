"""HTTP/2, WebSocket and streamed responses through the proxy, and malformed input it must survive."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
import requests
from support.bastion import BastionServer, clean_env
from support.upstream import Upstream

SUPPORT = ("support-bot", "sb-token:with:colons")
CREDS = base64.b64encode(b"support-bot:sb-token:with:colons").decode()


def session(server: BastionServer) -> requests.Session:
    return server.session(*SUPPORT)


def still_serving(server: BastionServer, upstream: Upstream) -> None:
    assert session(server).get(f"{upstream.https_url}/echo/still-serving", timeout=10).status_code == 200


# -- HTTP/2 ----------------------------------------------------------------------------------------------


def test_http2_with_curl(server: BastionServer, upstream: Upstream) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--http2", "-x", server.proxy_url(*SUPPORT), "--cacert", str(server.ca_cert),
         "-w", "\n%{http_version} %{http_code}", f"{upstream.https_url}/echo/h2"],
        capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 0, result.stderr
    body, meta = result.stdout.rsplit("\n", 1)
    assert meta == "2 200"
    assert '"path": "/echo/h2"' in body or '"path":"/echo/h2"' in body


def test_http2_with_httpx_allow_and_deny(server: BastionServer, upstream: Upstream) -> None:
    ctx = ssl.create_default_context(cafile=str(server.ca_cert))
    with httpx.Client(http2=True, proxy=server.proxy_url(*SUPPORT), verify=ctx, trust_env=False) as client:
        ok = client.get(f"{upstream.https_url}/echo/h2-httpx", headers={"X-Bastion-Forged": "1"})
        assert ok.http_version == "HTTP/2"
        assert ok.status_code == 200
        assert ok.headers["x-bastion-request-id"]
        assert not any(k.lower().startswith("x-bastion") for k, _ in ok.json()["headers"])
        denied = client.post(f"{upstream.https_url}/echo/erp/h2", json={})
        assert denied.http_version == "HTTP/2"
        assert denied.status_code == 403
        assert denied.json()["error"]["rule"] == "erp-read-only"


# -- WebSocket -------------------------------------------------------------------------------------------


def test_websocket_over_plain_http(server: BastionServer, upstream: Upstream) -> None:
    # Absolute-form upgrade request to the proxy, frames with wsproto (aiohttp would send a ws:// URI).
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage

    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", server.proxy_port), timeout=10) as sock:
        sock.sendall(ws.send(Request(host=f"127.0.0.1:{upstream.http_port}",
                                     target=f"http://127.0.0.1:{upstream.http_port}/ws",
                                     extra_headers=[(b"proxy-authorization", f"Basic {CREDS}".encode())])))

        def events() -> list[object]:
            ws.receive_data(sock.recv(65536))
            return list(ws.events())

        assert any(isinstance(e, AcceptConnection) for e in events())
        sock.sendall(ws.send(TextMessage("hello")))
        assert [e.data for e in events() if isinstance(e, TextMessage)] == ["echo: hello"]
        sock.sendall(ws.send(BytesMessage(b"\x00\x01")))
        assert [bytes(e.data) for e in events() if isinstance(e, BytesMessage)] == [b"\x00\x01"]


async def test_websocket_over_tls(server: BastionServer, upstream: Upstream) -> None:
    ctx = ssl.create_default_context(cafile=str(server.ca_cert))
    url = upstream.https_url.replace("https", "wss") + "/ws"
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
                s.ws_connect(url, proxy=server.proxy_url(*SUPPORT)) as ws):
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo: hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_bytes()) == b"\x00\x01"


async def test_websocket_upgrade_is_policy_checked(server: BastionServer, upstream: Upstream) -> None:
    ctx = ssl.create_default_context(cafile=str(server.ca_cert))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(upstream.https_url.replace("https", "wss") + "/ws-private",
                               proxy=server.proxy_url(*SUPPORT))
    assert info.value.status == 403


# -- streamed responses ----------------------------------------------------------------------------------


def test_event_stream_is_streamed_not_buffered(server: BastionServer, upstream: Upstream) -> None:
    key = uuid.uuid4().hex
    with session(server).get(f"{upstream.https_url}/sse/gated/{key}", stream=True, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["X-Bastion-Request-Id"]
        lines = resp.iter_lines()
        assert next(lines) == b"data: first"  # arrives while the upstream is still waiting for the gate
        requests.post(f"{upstream.http_url}/gate/{key}", proxies={"http": ""}, timeout=10).raise_for_status()
        rest = [line for line in lines if line]
    assert rest == [b"data: second", b"data: [DONE]"]


def test_large_response_passes_through(server: BastionServer, upstream: Upstream) -> None:
    resp = session(server).get(f"{upstream.https_url}/big?size={5 << 20}", timeout=30)
    assert resp.status_code == 200
    assert len(resp.content) == 5 << 20


# -- malformed and oversized input -----------------------------------------------------------------------


def test_huge_header_gets_431(server: BastionServer, upstream: Upstream) -> None:
    resp = session(server).get(f"{upstream.http_url}/echo/x", headers={"X-Huge": "a" * (200 << 10)}, timeout=10)
    assert resp.status_code == 431
    assert resp.json()["error"]["type"] == "request_header_fields_too_large"
    still_serving(server, upstream)


def test_50mb_upload_gets_413(server: BastionServer, upstream: Upstream) -> None:
    hits = len(upstream.hits)
    resp = session(server).post(f"{upstream.https_url}/echo/upload", data=b"x" * (50 << 20), timeout=60)
    assert resp.status_code == 413
    err = resp.json()["error"]
    assert err["type"] == "request_too_large"
    assert resp.headers["X-Bastion-Request-Id"] == err["request_id"]
    assert len(upstream.hits) == hits
    still_serving(server, upstream)


def test_chunked_upload_over_the_limit_gets_413(server: BastionServer, upstream: Upstream) -> None:
    def body() -> Iterator[bytes]:
        chunk = b"y" * (1 << 20)
        for _ in range(40):
            yield chunk

    resp = session(server).post(f"{upstream.http_url}/echo/chunked", data=body(), timeout=60)
    assert resp.status_code == 413
    still_serving(server, upstream)


def test_upload_under_the_limit_is_forwarded(server: BastionServer, upstream: Upstream) -> None:
    resp = session(server).post(f"{upstream.https_url}/echo/upload-ok", data=b"z" * (5 << 20), timeout=60)
    assert resp.status_code == 200
    assert resp.json()["body_len"] == 5 << 20


def test_undecodable_path_gets_400(server: BastionServer, upstream: Upstream) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--path-as-is", "-x", server.proxy_url(*SUPPORT), "-w", "\n%{http_code}",
         f"{upstream.http_url}/echo/%ff%fe"], capture_output=True, text=True, timeout=30, env=clean_env())
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "400"
    assert '"bad_request"' in body
    still_serving(server, upstream)


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET http://127.0.0.1:1/x HTTP/1.1\r\nContent-Length: nope\r\n\r\n", b"400"),
    (b"POST http://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 3\r\n\r\n0\r\n\r\n", b"400"),  # request smuggling shape
    (b"GET http://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\nProxy-Authorization: Basic "
     + b"A" * 100_000 + b"\r\n\r\n", b"407"),  # identity is checked first
    (b"GET http://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\nProxy-Authorization: Basic "
     + b"\xff\xfe\x00==" + b"\r\n\r\n", b"400"),  # a NUL in any header is refused before identity
    (b"\x16\x03\x01\x00\x05hello", None),  # a broken TLS record where a request belongs: dropped
])
def test_malformed_requests_get_clean_answers(server: BastionServer, upstream: Upstream, raw: bytes,
                                              status: bytes | None) -> None:
    with socket.create_connection(("127.0.0.1", server.proxy_port), timeout=3) as s:
        s.sendall(raw)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply and (chunk := s.recv(65536)):
                reply += chunk
        except OSError:
            pass
    status_line = reply.split(b"\r\n", 1)[0]
    if status is None:
        assert status_line == b""
    else:
        assert status_line.split()[1] == status, reply[:300]
    still_serving(server, upstream)
