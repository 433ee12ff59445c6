"""The network guard with a real proxy: private destinations, Bastion's own listeners, CONNECT ports, non-HTTP.

Refused destinations are never contacted, so the private and metadata addresses below produce no traffic.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import TESTDATA_RULES
from services import REDIS_PORT, require_redis
from support.bastion import BastionServer, clean_env, run_bastion
from support.certs import CertFiles
from support.upstream import Upstream

GUARD = ("guard-bot", "guard-token")
SUPPORT = ("support-bot", "sb-token:with:colons")
PORT_BOT = ("port-bot", "port-token")


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, bastion_home: Path, test_certs: CertFiles,
           upstream: Upstream) -> Iterator[BastionServer]:
    """No network.allow_private at all."""
    with run_bastion(tmp_path_factory.mktemp("strict"), [TESTDATA_RULES / "guard.yaml"], home=bastion_home,
                     upstream_ca=test_certs.ca_cert) as srv:
        yield srv


@pytest.fixture(scope="module")
def lenient(server: BastionServer) -> BastionServer:
    """allow_private 127.0.0.0/8 and ::1 (the shared proxy.yaml server)."""
    return server


def get(server: BastionServer, agent: tuple[str, str], url: str) -> requests.Response:
    proxy = server.proxy_url(*agent)
    return requests.get(url, proxies={"http": proxy, "https": proxy}, verify=str(server.ca_cert), timeout=15)


def refusal(resp: requests.Response) -> str:
    assert resp.status_code == 403, resp.text
    err = resp.json()["error"]
    assert err["type"] == "destination_forbidden"
    assert resp.headers["X-Bastion-Request-Id"] == err["request_id"]
    return str(err["message"])


@pytest.mark.parametrize(("url", "kind"), [
    ("http://10.20.30.40/x", "private"),
    ("http://192.168.1.1/x", "private"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://100.64.1.2/x", "carrier-grade NAT"),
    ("http://0.0.0.0:9/x", "unspecified"),
    ("http://224.0.0.1/x", "multicast"),
    ("http://[::ffff:10.0.0.1]/x", "private"),
    ("http://[fe80::1]/x", "link-local"),
])
def test_special_addresses_are_refused(strict: BastionServer, url: str, kind: str) -> None:
    assert kind in refusal(get(strict, GUARD, url))


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_loopback_upstream_needs_allow_private(strict: BastionServer, lenient: BastionServer,
                                               upstream: Upstream, scheme: str) -> None:
    base = upstream.http_url if scheme == "http" else upstream.https_url
    hits = len(upstream.hits)
    message = refusal(get(strict, GUARD, f"{base}/echo/guarded"))
    assert "loopback" in message
    assert "network.allow_private" in message
    assert len(upstream.hits) == hits  # never contacted
    assert get(lenient, SUPPORT, f"{base}/echo/guarded").status_code == 200


def test_name_resolving_to_loopback_is_refused(strict: BastionServer, upstream: Upstream) -> None:
    assert "loopback" in refusal(get(strict, GUARD, f"http://localhost:{upstream.http_port}/echo/x"))


def test_embedded_ipv4_forms_are_refused(strict: BastionServer, upstream: Upstream) -> None:
    for host in ("[::ffff:127.0.0.1]", "[::127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::1]"):
        message = refusal(get(strict, GUARD, f"http://{host}:{upstream.http_port}/echo/x"))
        assert "127.0.0.1" in message or "loopback" in message, message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1.2.3", "[::1]", "0.0.0.0", "[::ffff:127.0.0.1]"])
def test_admin_listener_is_unreachable_even_with_allow_private(lenient: BastionServer, host: str) -> None:
    resp = get(lenient, SUPPORT, f"http://{host}:{lenient.admin_port}/healthz")
    assert "admin listener" in refusal(resp)


def test_admin_listener_unreachable_over_https_too(lenient: BastionServer) -> None:
    # The CONNECT is accepted and the refusal arrives after TLS interception, readable by the client.
    resp = get(lenient, SUPPORT, f"https://localhost:{lenient.admin_port}/metrics")
    assert "admin listener" in refusal(resp)


def test_proxy_cannot_be_looped_through_itself(lenient: BastionServer) -> None:
    resp = get(lenient, SUPPORT, f"http://127.0.0.1:{lenient.proxy_port}/")
    assert "proxy listener" in refusal(resp)


def test_the_store_is_unreachable_even_with_allow_private(tmp_path: Path, bastion_home: Path, prefix: str) -> None:
    """Every address form that reaches a store on this host is refused, even when allow_private lists it:
    0.0.0.0 and [::] connect to this host on Linux, and Redis listens on [::1] as well as 127.0.0.1."""
    redis_url = require_redis()
    rules = tmp_path / "rules.yaml"
    rules.write_text((TESTDATA_RULES / "proxy.yaml").read_text().replace(
        'allow_private: ["127.0.0.0/8", "::1/128"]', 'allow_private: ["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/96"]'
    ).replace('0.0.0.0]}', '0.0.0.0, "::", 127.0.0.2, "::ffff:0.0.0.0", "::127.0.0.1"]}'))
    store = redis_url.replace("127.0.0.1", "localhost") + f"?prefix={prefix}"  # audit checkpoints go under it
    with run_bastion(tmp_path, [rules], home=bastion_home, extra_args=["--store", store]) as server:
        for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0", "[::1]", "[::]", "127.0.0.2",
                     "[::ffff:0.0.0.0]", "[::127.0.0.1]"):
            assert "store" in refusal(get(server, SUPPORT, f"http://{host}:{REDIS_PORT}/")), host


def test_connect_to_a_port_no_rule_allows_is_refused(lenient: BastionServer, upstream: Upstream) -> None:
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_connect}", "--max-time", "10",
         "-x", lenient.proxy_url(*PORT_BOT), "--cacert", str(lenient.ca_cert),
         f"https://localhost:{upstream.https_port}/echo/x"],
        capture_output=True, text=True, timeout=20, env=clean_env())
    assert result.returncode == 56
    assert result.stdout == "403"


class _Listener:
    """A bare TCP listener that records whether anyone connected."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_raw_tcp_through_a_tunnel_is_not_relayed(lenient: BastionServer) -> None:
    listener = _Listener()
    try:
        with socket.create_connection(("127.0.0.1", lenient.proxy_port), timeout=10) as s:
            import base64

            creds = base64.b64encode(b"support-bot:sb-token:with:colons").decode()
            s.sendall(f"CONNECT 127.0.0.1:{listener.port} HTTP/1.1\r\nHost: 127.0.0.1:{listener.port}\r\n"
                      f"Proxy-Authorization: Basic {creds}\r\n\r\n".encode())
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"x-bastion-request-id: " in head.lower()
            s.sendall(b"SSH-2.0-OpenSSH_9.0\r\n\x00\x01\x02 binary junk\r\n\r\n")
            reply = b""
            try:
                while chunk := s.recv(4096):
                    reply += chunk
            except OSError:
                pass
        assert listener.connections == 0
        assert b"400" in reply.split(b"\r\n", 1)[0]
    finally:
        listener.close()


def test_connect_inside_a_tunnel_is_refused(lenient: BastionServer, upstream: Upstream) -> None:
    """A CONNECT sent inside an intercepted tunnel must never be passed on to the upstream."""
    import base64
    import ssl

    creds = base64.b64encode(b"support-bot:sb-token:with:colons").decode()
    ctx = ssl.create_default_context(cafile=str(lenient.ca_cert))
    with socket.create_connection(("127.0.0.1", lenient.proxy_port), timeout=10) as raw:
        raw.sendall(f"CONNECT localhost:{upstream.https_port} HTTP/1.1\r\nHost: localhost:{upstream.https_port}\r\n"
                    f"Proxy-Authorization: Basic {creds}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"CONNECT 10.0.0.1:22 HTTP/1.1\r\nHost: 10.0.0.1:22\r\n\r\n")
            reply = tls.recv(65536)
    assert reply.split(b" ", 2)[1] in (b"400", b"403")
    assert not any(method == "CONNECT" for method, _ in upstream.hits)
