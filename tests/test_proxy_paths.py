"""Path variants through a running `bastion serve`: a deny rule on /admin/** cannot be bypassed by spelling.

Behind the proxy sits a recording upstream that notes the raw request line of everything that reaches it,
before any parsing (so a request the upstream itself would reject still counts as having reached it). With
an allow-all rule and a deny rule on /admin/**, every variant an upstream may fold into /admin/a is refused
(400 bad_request) or denied (403 policy_denied) and never reaches the upstream. curl sends what it can with
--path-as-is; raw sockets send what curl cannot (a bare backslash, NUL, other raw bytes), in plain HTTP
(absolute-form) and inside an intercepted TLS tunnel (origin-form).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from support.bastion import BastionServer, clean_env, run_bastion
from support.certs import CertFiles

AGENT, TOKEN = "path-bot", "path-token"
CREDS = base64.b64encode(f"{AGENT}:{TOKEN}".encode()).decode()

RULES = f"""
version: 1
defaults: {{effect: deny}}
agents:
  {AGENT}: {{token_sha256: {hashlib.sha256(TOKEN.encode()).hexdigest()}}}
rules:
  - {{id: everything, effect: allow, agents: [{AGENT}]}}
  - {{id: no-admin, effect: deny, agents: ["*"], match: {{path: ["/admin", "/admin/**"]}}}}
network:
  allow_private: ["127.0.0.0/8"]
NORMALIZE
"""


# -- a recording upstream ------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Plain HTTP and HTTPS listeners that record each raw request target and answer 200 with it as JSON."""

    http_port: int = 0
    https_port: int = 0
    targets: list[bytes] = field(default_factory=list)

    def since(self, mark: int) -> list[bytes]:
        return list(self.targets[mark:])


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(65536)
        if not line:
            return
        parts = line.split(b" ")
        self.server.recorder.targets.append(parts[1] if len(parts) > 1 else line)
        length = 0
        while (header := self.rfile.readline(65536)) not in (b"\r\n", b"\n", b""):
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length:
            self.rfile.read(length)
        body = json.dumps({"target": (parts[1] if len(parts) > 1 else line).decode("latin-1")}).encode()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, recorder: Recorder, tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.recorder = recorder
        self.tls = tls

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        if self.tls is not None:
            sock.settimeout(10)
            sock = self.tls.wrap_socket(sock, server_side=True)
        return sock, addr

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gives up mid-handshake is not the test's concern


@pytest.fixture(scope="module")
def recorder(test_certs: CertFiles) -> Iterator[Recorder]:
    rec = Recorder()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(test_certs.server_cert, test_certs.server_key)
    servers = [_Server(rec, None), _Server(rec, ctx)]
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True) for s in servers]
    for t in threads:
        t.start()
    rec.http_port, rec.https_port = (s.server_address[1] for s in servers)
    try:
        yield rec
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def _serve(tmp_path_factory: pytest.TempPathFactory, home: Path, certs: CertFiles,
           normalize: str) -> Iterator[BastionServer]:
    d = tmp_path_factory.mktemp("paths")
    rules = d / "rules.yaml"
    rules.write_text(RULES.replace("NORMALIZE", normalize))
    with run_bastion(d / "run", [rules], home=home, upstream_ca=certs.ca_cert) as srv:
        yield srv


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, bastion_home: Path, test_certs: CertFiles) -> \
        Iterator[BastionServer]:
    """The default `normalize:` settings."""
    yield from _serve(tmp_path_factory, bastion_home, test_certs, "")


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory, bastion_home: Path, test_certs: CertFiles) -> \
        Iterator[BastionServer]:
    """Settings for case-insensitive upstreams that use %2F inside segments, `;` parameters and trailing dots."""
    yield from _serve(tmp_path_factory, bastion_home, test_certs,
                      "normalize: {path_case: insensitive, escaped_slashes: keep, allow: [semicolon, trailing_dot]}")


# -- clients -------------------------------------------------------------------------------------------------


def base_url(rec: Recorder, scheme: str) -> str:
    return f"http://127.0.0.1:{rec.http_port}" if scheme == "http" else f"https://localhost:{rec.https_port}"


def curl(proxy: BastionServer, url: str) -> tuple[int, dict[str, object]]:
    res = subprocess.run(
        ["curl", "-sS", "--path-as-is", "--max-time", "20", "-x", proxy.proxy_url(AGENT, TOKEN),
         "--cacert", str(proxy.ca_cert), "-w", "\n%{http_code}", url],
        capture_output=True, text=True, timeout=30, env=clean_env())
    assert res.returncode == 0, res.stderr
    body, status = res.stdout.rsplit("\n", 1)
    return int(status), json.loads(body)


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (OSError, ssl.SSLError):
        pass
    status_line = data.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), data[:200]
    return int(status_line.split(b" ")[1]), data.split(b"\r\n\r\n", 1)[-1]


def raw_request(proxy: BastionServer, rec: Recorder, scheme: str, path: bytes) -> tuple[int, bytes]:
    """GET `path` (raw bytes, unvalidated) through the proxy, in plain HTTP or inside a CONNECT tunnel."""
    with socket.create_connection(("127.0.0.1", proxy.proxy_port), timeout=10) as sock:
        if scheme == "http":
            host = f"127.0.0.1:{rec.http_port}".encode()
            sock.sendall(b"GET http://" + host + path + b" HTTP/1.1\r\nHost: " + host
                         + b"\r\nProxy-Authorization: Basic " + CREDS.encode() + b"\r\nConnection: close\r\n\r\n")
            return _read_response(sock)
        host = f"localhost:{rec.https_port}".encode()
        sock.sendall(b"CONNECT " + host + b" HTTP/1.1\r\nHost: " + host + b"\r\nProxy-Authorization: Basic "
                     + CREDS.encode() + b"\r\n\r\n")
        assert _read_head(sock).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(proxy.ca_cert))
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            return _read_response(tls)


def refused(status: int, body: bytes | dict[str, object]) -> str:
    """'bad_request' or 'policy_denied' for Bastion's own refusals (never the upstream's), else ''."""
    doc = json.loads(body) if isinstance(body, bytes) else body
    error = doc.get("error") if isinstance(doc, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    expected = {400: "bad_request", 403: "policy_denied"}.get(status)
    return kind if kind == expected and kind is not None else ""


# -- the defaults: no variant of /admin/a reaches the upstream ------------------------------------------------

CURL_VARIANTS = [
    # (path as sent, Bastion's answer)
    ("/admin/a", "policy_denied"),
    ("/ADMIN/a", "policy_denied"),
    ("/Admin/A", "policy_denied"),
    ("/%41dmin/a", "policy_denied"),
    ("/%61dmin/a", "policy_denied"),
    ("/%EF%BC%A1dmin/a", "policy_denied"),  # fullwidth A
    ("/adm%C4%B1n/a", "policy_denied"),  # dotless i: equal to ADMIN for Java's equalsIgnoreCase
    ("//admin//a", "policy_denied"),
    ("/./admin/./a", "policy_denied"),
    ("/public/../admin/a", "policy_denied"),
    ("/public/%2e%2e/admin/a", "policy_denied"),
    ("/public/%2E%2E/admin/a", "policy_denied"),
    ("/admin;x/a", "bad_request"),
    ("/admin%3bx/a", "bad_request"),
    ("/admin./a", "bad_request"),
    ("/admin%2e/a", "bad_request"),
    ("/admin%20/a", "bad_request"),
    ("/admin%C2%A0/a", "bad_request"),
    ("/admin%5ca", "bad_request"),
    ("/admin%5Ca", "bad_request"),
    ("/admin%00/a", "bad_request"),
    ("/admin%0a/a", "bad_request"),
    ("/admin%7f/a", "bad_request"),
    ("/admin%2fa", "bad_request"),
    ("/admin%2Fa", "bad_request"),
    ("/admin%252fa", "bad_request"),
    ("/public/..;/admin/a", "bad_request"),
    ("/public/..%3b/admin/a", "bad_request"),
    ("/public/...%2fadmin/a", "bad_request"),
    ("/public/%252e%252e/admin/a", "bad_request"),
    ("/public/..%5cadmin/a", "bad_request"),
    ("/public/%C0%AE%C0%AE/admin/a", "bad_request"),
    ("/admin%zz/a", "bad_request"),
]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_no_variant_of_a_denied_path_reaches_the_upstream(proxy: BastionServer, recorder: Recorder,
                                                          scheme: str) -> None:
    base = base_url(recorder, scheme)
    mark = len(recorder.targets)
    answers = {path: refused(*curl(proxy, base + path)) for path, _ in CURL_VARIANTS}
    assert answers == dict(CURL_VARIANTS)
    assert recorder.since(mark) == []
    status, body = curl(proxy, base + "/public/a")  # the control: the same client, an allowed path
    assert (status, body) == (200, {"target": "/public/a"})


RAW_VARIANTS = [b"/admin\\a", b"/ADMIN\\a", b"/admin\x00/a", b"/admin\x01/a", b"/admin\x7f/a", b"/admin\x1f/a",
                b"/public/..\\admin/a", b"/admin#/a", b"/public#/../admin/a", b"/admin\xff/a", b"/admin\xc2\x85/a",
                b"/admin;/a", b"/admin./a"]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_raw_bytes_curl_cannot_send_never_reach_the_upstream(proxy: BastionServer, recorder: Recorder,
                                                              scheme: str) -> None:
    mark = len(recorder.targets)
    for path in RAW_VARIANTS:
        status, body = raw_request(proxy, recorder, scheme, path)
        assert status == 400, (path, status, body[:300])
        if body.startswith(b"{"):  # Bastion's own refusal; mitmproxy refuses some request lines itself
            assert refused(status, body) == "bad_request", (path, body[:300])
    assert recorder.since(mark) == []
    status, body = raw_request(proxy, recorder, scheme, b"/public/%70ath/./x")
    assert status == 200 and json.loads(body) == {"target": "/public/path/x"}  # escaped unreserved: decoded


def test_http2_requests_get_the_same_treatment(proxy: BastionServer, recorder: Recorder) -> None:
    base = base_url(recorder, "https")
    mark = len(recorder.targets)
    ctx = ssl.create_default_context(cafile=str(proxy.ca_cert))
    with httpx.Client(http2=True, proxy=proxy.proxy_url(AGENT, TOKEN), verify=ctx, trust_env=False) as client:
        for path, answer in (("/ADMIN/a", "policy_denied"), ("/admin;x/a", "bad_request"),
                             ("/admin%2Fa", "bad_request"), ("/admin%00/a", "bad_request")):
            resp = client.get(base + path)
            assert resp.http_version == "HTTP/2"
            assert refused(resp.status_code, resp.content) == answer, path
        assert client.get(base + "/public/%61").json() == {"target": "/public/a"}
    assert recorder.since(mark) == [b"/public/a"]


def test_refusal_names_the_problem(proxy: BastionServer, recorder: Recorder) -> None:
    status, body = curl(proxy, base_url(recorder, "http") + "/admin;x/a")
    assert status == 400
    message = body["error"]["message"]  # type: ignore[index]
    assert "'admin;x'" in message and "';' path parameter" in message and "normalize.allow" in message


# -- other settings: what the policy lets through is forwarded exactly as sent --------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_lenient_settings_forward_allowed_forms_as_sent(lenient: BastionServer, recorder: Recorder,
                                                        scheme: str) -> None:
    base = base_url(recorder, scheme)
    mark = len(recorder.targets)
    for path in ("/projects/group%2Fproject/issues", "/files/a;v=1", "/zones/example.org.", "/PUBLIC/Mixed"):
        assert curl(lenient, base + path) == (200, {"target": path})
    for path, answer in (("/ADMIN/a", "policy_denied"), ("/Admin/a/", "policy_denied"),
                         ("/admin%20/a", "bad_request"), ("/admin%5ca", "bad_request"),
                         ("/public/..;/admin/a", "bad_request"), ("/public/..%2Fadmin/a", "bad_request"),
                         ("/admin%00/a", "bad_request")):
        assert refused(*curl(lenient, base + path)) == answer, path
    assert [t.decode() for t in recorder.since(mark)] == [
        "/projects/group%2Fproject/issues", "/files/a;v=1", "/zones/example.org.", "/PUBLIC/Mixed"]
