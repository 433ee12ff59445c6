"""`bastion serve` startup and shutdown, `bastion ca` and `bastion run`, as a user runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO, TESTDATA_RULES
from services import require_command
from support.bastion import bastion_cmd, clean_env, run_bastion, run_cli
from support.certs import CertFiles
from support.ports import port_open
from support.upstream import Upstream

PROXY_RULES = str(TESTDATA_RULES / "proxy.yaml")


# -- startup refusals ------------------------------------------------------------------------------------


def test_invalid_policy_exits_3_with_file_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults: {effect: deny}\nrules:\n  - id: x\n    effect: allow\n    agents: [ghost]\n")
    result = run_cli("serve", "--rules", str(bad), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                     "--home", str(tmp_path / "home"))
    assert result.returncode == 3
    assert f"{bad}:6: rule x: agent 'ghost' is not defined" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    ([], "no rules"),
    (["--rules", PROXY_RULES, "--listen", "127.0.0.1:http"], "--listen: bad port"),
    (["--rules", PROXY_RULES, "--admin", "127.0.0.1:70000"], "--admin: port out of range"),
    (["--rules", PROXY_RULES, "--store", "mysql://db/x"], "--store: unsupported URL"),
    (["--rules", PROXY_RULES, "--store", "redis://:6379/0"], "--store: 'redis://:6379/0' has no host"),
    (["--rules", PROXY_RULES, "--upstream-ca", "/nonexistent/ca.pem"], "--upstream-ca: no such file"),
    (["--rules", PROXY_RULES, "--bogus"], "unrecognized arguments"),
])
def test_bad_flags_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("serve", "--home", str(tmp_path / "home"), *args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_upstream_ca_that_is_not_pem_exits_2(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    result = run_cli("serve", "--rules", PROXY_RULES, "--home", str(tmp_path / "home"), "--listen", "127.0.0.1:0",
                     "--admin", "127.0.0.1:0", "--upstream-ca", str(junk))
    assert result.returncode == 2
    assert "holds no PEM certificate" in result.stderr


def test_unknown_pinned_agent_exits_3(tmp_path: Path) -> None:
    result = run_cli("serve", "--rules", PROXY_RULES, "--agent", "ghost-bot", "--home", str(tmp_path / "home"),
                     "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    assert result.returncode == 3
    assert "agent 'ghost-bot' (--agent / BASTION_AGENT) is not defined" in result.stderr


def test_port_in_use_exits_1(tmp_path: Path, bastion_home: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("serve", "--rules", PROXY_RULES, "--home", str(bastion_home),
                         "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0")
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port} (--listen)" in result.stderr
        result = run_cli("serve", "--rules", PROXY_RULES, "--home", str(bastion_home),
                         "--listen", "127.0.0.1:0", "--admin", f"127.0.0.1:{port}")
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port} (--admin)" in result.stderr


def test_environment_variables_configure_serve(tmp_path: Path, bastion_home: Path, upstream: Upstream) -> None:
    env = {"BASTION_RULES": PROXY_RULES, "BASTION_AGENT": "support-bot",
           "BASTION_STORE": f"sqlite:///{tmp_path}/store.db", "BASTION_AUDIT": f"jsonl:///{tmp_path}/audit"}
    with run_bastion(tmp_path, [], home=bastion_home, env=env) as server:
        resp = requests.get(f"{upstream.http_url}/echo/env", proxies={"http": server.proxy_url()}, timeout=10)
        assert resp.status_code == 200


# -- pinned sidecar --------------------------------------------------------------------------------------


def test_pinned_agent_needs_no_credentials(tmp_path: Path, bastion_home: Path, test_certs: CertFiles,
                                           upstream: Upstream) -> None:
    with run_bastion(tmp_path, [TESTDATA_RULES / "proxy.yaml"], home=bastion_home, agent="support-bot",
                     upstream_ca=test_certs.ca_cert) as server:
        proxies = {"http": server.proxy_url(), "https": server.proxy_url()}
        resp = requests.get(f"{upstream.https_url}/echo/pinned", proxies=proxies, verify=str(server.ca_cert),
                            timeout=10)
        assert resp.status_code == 200
        assert "proxy-authorization" not in {k.lower() for k, _ in resp.json()["headers"]}
        denied = requests.post(f"{upstream.http_url}/echo/erp/x", proxies=proxies, timeout=10)
        assert denied.json()["error"]["rule"] == "erp-read-only"
        assert "every connection is agent 'support-bot'" in server.logs()


def test_sidecar_publishes_the_client_bundle_for_the_agent_container(tmp_path: Path, test_certs: CertFiles,
                                                                     upstream: Upstream) -> None:
    """An agent beside a pinned sidecar needs nothing but HTTPS_PROXY and SSL_CERT_FILE=<home>/ca-bundle.pem."""
    home = tmp_path / "sidecar-home"
    with run_bastion(tmp_path, [TESTDATA_RULES / "proxy.yaml"], home=home, agent="support-bot",
                     upstream_ca=test_certs.ca_cert) as server:
        bundle = home / "ca-bundle.pem"
        assert bundle.read_bytes().count(b"BEGIN CERTIFICATE") > 10  # system roots + Bastion's CA
        agent = ("import httpx, sys; r = httpx.get(sys.argv[1]); print(r.status_code, r.json()['path'])")
        env = {"PATH": os.environ.get("PATH", ""), "HTTPS_PROXY": server.proxy_url(), "SSL_CERT_FILE": str(bundle)}
        result = subprocess.run([sys.executable, "-c", agent, f"{upstream.https_url}/echo/from-agent"], env=env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["200", "/echo/from-agent"]


def test_pinned_retired_agent_is_refused(tmp_path: Path, bastion_home: Path, upstream: Upstream) -> None:
    with run_bastion(tmp_path, [TESTDATA_RULES / "proxy.yaml"], home=bastion_home, agent="legacy-bot") as server:
        resp = requests.get(f"{upstream.http_url}/echo/x", proxies={"http": server.proxy_url()}, timeout=10)
        assert resp.status_code == 403
        assert resp.json()["error"]["type"] == "agent_retired"


# -- graceful shutdown -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_finishes_the_call_in_flight(tmp_path: Path, bastion_home: Path, test_certs: CertFiles,
                                              upstream: Upstream, sig: int) -> None:
    with run_bastion(tmp_path, [TESTDATA_RULES / "proxy.yaml"], home=bastion_home,
                     upstream_ca=test_certs.ca_cert) as server:
        proxy = server.proxy_url("support-bot", "sb-token:with:colons")
        result: dict[str, object] = {}
        marker = f"/slow?seconds=1.5&sig={int(sig)}"

        def call() -> None:
            try:
                r = requests.get(f"{upstream.https_url}{marker}", proxies={"https": proxy},
                                 verify=str(server.ca_cert), timeout=20)
                result["status"], result["body"] = r.status_code, r.json()
            except Exception as e:
                result["error"] = e

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 10
        while ("GET", marker) not in upstream.hits:
            assert time.monotonic() < deadline, "the slow call never reached the upstream"
            time.sleep(0.02)
        server.proc.send_signal(sig)
        deadline = time.monotonic() + 5
        while port_open(server.proxy_port):  # the listener closes first ...
            assert time.monotonic() < deadline, "the proxy port stayed open after the signal"
            time.sleep(0.02)
        thread.join(20)
        assert result.get("status") == 200, result  # ... while the call in flight completes
        assert result["body"] == {"slow": True}
        assert server.proc.wait(20) == 0
        assert not port_open(server.admin_port)


# -- bastion ca ------------------------------------------------------------------------------------------


def test_ca_prints_the_certificate_path_never_the_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli("ca", "--home", str(home))
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == home / "mitmproxy-ca-cert.pem"
    pem = path.read_text()
    assert pem.count("BEGIN CERTIFICATE") == 1
    assert "PRIVATE KEY" not in pem
    assert (home / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0  # the key file is private
    again = run_cli("ca", "--home", str(home))
    assert again.stdout == result.stdout  # the same CA, not a new one


def test_ca_bundle_holds_system_roots_and_the_ca(tmp_path: Path) -> None:
    import certifi

    env = {"BASTION_HOME": str(tmp_path / "home")}
    result = run_cli("ca", "--bundle", env=env)
    assert result.returncode == 0, result.stderr
    bundle = Path(result.stdout.strip())
    assert bundle == tmp_path / "home" / "ca-bundle.pem"
    text = bundle.read_text()
    ca = (tmp_path / "home" / "mitmproxy-ca-cert.pem").read_text().strip()
    assert ca in text
    assert text.count("BEGIN CERTIFICATE") == Path(certifi.where()).read_text().count("BEGIN CERTIFICATE") + 1
    assert "PRIVATE KEY" not in text


# -- bastion run -----------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys, requests
    r = requests.get(sys.argv[1], timeout=10)
    print("status", r.status_code, r.json()["path"], r.headers["X-Bastion-Request-Id"] != "")
    admin = requests.get(sys.argv[2], timeout=10)   # NO_PROXY: straight to the admin listener
    print("admin", admin.status_code)
    print("node", os.environ["NODE_EXTRA_CA_CERTS"].endswith("mitmproxy-ca-cert.pem"),
          os.environ["NODE_USE_ENV_PROXY"])
    sys.exit(int(sys.argv[3]))
""")


def test_run_sets_proxy_and_trust_and_passes_the_exit_code(tmp_path: Path, bastion_home: Path,
                                                           test_certs: CertFiles, upstream: Upstream) -> None:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    with run_bastion(tmp_path / "srv", [TESTDATA_RULES / "proxy.yaml"], home=bastion_home,
                     upstream_ca=test_certs.ca_cert) as server:
        result = subprocess.run(
            bastion_cmd("run", "--agent", "support-bot", "--proxy", server.proxy_url(), "--home", str(bastion_home),
                        "--", sys.executable, str(child), f"{upstream.https_url}/echo/from-run",
                        f"http://localhost:{server.admin_port}/healthz", "7"),
            cwd=REPO, env=clean_env({"BASTION_AGENT_TOKEN": "sb-token:with:colons",
                                     "BASTION_ADMIN": f"127.0.0.1:{server.admin_port}"}),
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 7, result.stderr
    assert "status 200 /echo/from-run True" in result.stdout
    assert "admin 200" in result.stdout
    assert "node True 1" in result.stdout


def test_run_without_token_against_a_pinned_sidecar(tmp_path: Path, bastion_home: Path, test_certs: CertFiles,
                                                    upstream: Upstream) -> None:
    script = "import requests,sys; r=requests.get(sys.argv[1], timeout=10); print(r.status_code); sys.exit(0)"
    with run_bastion(tmp_path / "srv", [TESTDATA_RULES / "proxy.yaml"], home=bastion_home, agent="support-bot",
                     upstream_ca=test_certs.ca_cert) as server:
        result = subprocess.run(
            bastion_cmd("run", "--agent", "support-bot", "--proxy", server.proxy_url(), "--home", str(bastion_home),
                        "--", sys.executable, "-c", script, f"{upstream.https_url}/echo/pinned-run"),
            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "200"


def test_run_curl_uses_lowercase_proxy_variables(tmp_path: Path, bastion_home: Path, upstream: Upstream) -> None:
    require_command("curl")
    with run_bastion(tmp_path / "srv", [TESTDATA_RULES / "proxy.yaml"], home=bastion_home) as server:
        result = subprocess.run(
            bastion_cmd("run", "--agent", "support-bot", "--token", "sb-token:with:colons", "--proxy",
                        server.proxy_url(), "--home", str(bastion_home), "--", "curl", "-sS", "-D", "-",
                        f"{upstream.http_url}/echo/curl-run"),
            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "x-bastion-request-id" in result.stdout.lower()


def test_run_without_a_ca_explains(tmp_path: Path) -> None:
    result = run_cli("run", "--agent", "a", "--home", str(tmp_path / "empty"), "--", "true")
    assert result.returncode == 1
    assert "no Bastion CA in" in result.stderr
    assert "bastion serve" in result.stderr


def test_run_reports_missing_command(bastion_home: Path) -> None:
    result = run_cli("run", "--agent", "a", "--home", str(bastion_home), "--", "no-such-command-xyz")
    assert result.returncode == 127
    assert "command not found: no-such-command-xyz" in result.stderr
    assert run_cli("run", "--home", str(bastion_home), "--", "true").returncode == 2  # no --agent
