"""The proxy with real clients: identity, decisions, what the agent sees, what upstream receives.

One `bastion serve` subprocess (tests/testdata/policy/proxy.yaml) in front of local HTTP and HTTPS upstreams; clients
are curl, requests, httpx, aiohttp (trust_env) and the openai SDK.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess

import aiohttp
import httpx
import openai
import pytest
import requests
from support.bastion import BastionServer, clean_env
from support.upstream import Upstream

SUPPORT = ("support-bot", "sb-token:with:colons")
LEGACY = ("legacy-bot", "legacy-token")
SHADOW = ("shadow-bot", "shadow-token")
BILLING = ("billing-bot", "billing-token")


def session(server: BastionServer, agent: tuple[str, str] | None = SUPPORT) -> requests.Session:
    return server.session(*agent) if agent else server.session()


def echoed_headers(resp: requests.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.json()["headers"]}


def error_of(resp: requests.Response) -> dict[str, object]:
    body = resp.json()
    assert body["type"] == "error"
    return body["error"]


def curl(server: BastionServer, *args: str, proxy: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["curl", "-sS", "--max-time", "20", "-x", proxy or server.proxy_url(*SUPPORT),
           "--cacert", str(server.ca_cert), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=clean_env())


# -- allow, deny, default deny ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_allowed_request_is_forwarded_with_request_id(server: BastionServer, upstream: Upstream,
                                                      scheme: str) -> None:
    base = upstream.http_url if scheme == "http" else upstream.https_url
    resp = session(server).post(f"{base}/echo/hello?x=1", json={"hi": "there"}, timeout=10)
    assert resp.status_code == 200
    body = resp.json()
    assert body["method"] == "POST"
    assert body["path"] == "/echo/hello?x=1"
    assert json.loads(body["body"]) == {"hi": "there"}
    assert body["scheme"] == scheme
    assert len(resp.headers["X-Bastion-Request-Id"]) == 36


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_deny_rule_message_reaches_the_agent(server: BastionServer, upstream: Upstream, scheme: str) -> None:
    base = upstream.http_url if scheme == "http" else upstream.https_url
    before = list(upstream.hits)
    resp = session(server).post(f"{base}/echo/erp/orders", json={"x": 1}, timeout=10)
    assert resp.status_code == 403
    err = error_of(resp)
    assert err["type"] == "policy_denied"
    assert err["rule"] == "erp-read-only"
    assert err["message"] == "The ERP is read-only for agents."
    assert err["request_id"] == resp.headers["X-Bastion-Request-Id"]
    assert resp.headers["Content-Type"] == "application/json"
    assert ("POST", "/echo/erp/orders") not in upstream.hits[len(before):]


def test_default_deny_has_null_rule(server: BastionServer) -> None:
    # No rule covers this host, so the request is refused before any DNS lookup or connection.
    resp = session(server).get("http://not-allowed.invalid/anything", timeout=10)
    assert resp.status_code == 403
    err = error_of(resp)
    assert err["type"] == "policy_denied"
    assert err["rule"] is None
    assert "default: deny" in str(err["message"])


def test_agent_without_rules_is_denied_by_default(server: BastionServer, upstream: Upstream) -> None:
    resp = session(server, BILLING).get(f"{upstream.http_url}/echo/x", timeout=10)
    assert resp.status_code == 403
    assert error_of(resp)["rule"] is None
    # No rule could allow any port for this agent, so even the tunnel is refused (at CONNECT).
    with pytest.raises(requests.exceptions.ProxyError, match="403"):
        session(server, BILLING).get(f"{upstream.https_url}/echo/x", timeout=10)


def test_json_body_rule(server: BastionServer, upstream: Upstream) -> None:
    s = session(server)
    url = f"{upstream.https_url}/v1/chat/completions"
    denied = s.post(url, json={"model": "gpt-4-32k", "messages": []}, timeout=10)
    assert denied.status_code == 403
    assert error_of(denied)["rule"] == "no-big-model"
    allowed = s.post(url, json={"model": "gpt-4o-mini", "messages": []}, timeout=10)
    assert allowed.status_code == 200


def test_body_claiming_json_but_not_json(server: BastionServer, upstream: Upstream) -> None:
    # The deny rule's json condition cannot be evaluated: a deny rule that errors still applies.
    resp = session(server).post(f"{upstream.https_url}/v1/chat/completions", data=b"{not json",
                                headers={"Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 403
    assert error_of(resp)["rule"] == "no-big-model"
    ok = session(server).get(f"{upstream.https_url}/echo/after", timeout=10)
    assert ok.status_code == 200


# -- identity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_missing_credentials_get_407(server: BastionServer, upstream: Upstream, scheme: str) -> None:
    base = upstream.http_url if scheme == "http" else upstream.https_url
    result = curl(server, "-o", "/dev/null", "-w", "%{http_code} %{http_connect}", f"{base}/echo/x",
                  proxy=server.proxy_url())
    if scheme == "http":
        assert result.stdout.split()[0] == "407"
    else:  # the CONNECT is refused: curl reports the proxy's 407
        assert result.returncode == 56, result
        assert result.stdout.split()[1] == "407"


def test_407_response_details_plain_http(server: BastionServer, upstream: Upstream) -> None:
    resp = session(server, None).get(f"{upstream.http_url}/echo/x", timeout=10)
    assert resp.status_code == 407
    assert resp.headers["Proxy-Authenticate"] == 'Basic realm="bastion"'
    assert resp.headers["X-Bastion-Request-Id"]
    assert error_of(resp)["type"] == "proxy_auth_required"


@pytest.mark.parametrize("agent", [("support-bot", "wrong"), ("nobody", "sb-token:with:colons"),
                                   ("support-bot", "sb-token")])
def test_wrong_credentials_get_407(server: BastionServer, upstream: Upstream, agent: tuple[str, str]) -> None:
    resp = session(server, agent).get(f"{upstream.http_url}/echo/x", timeout=10)
    assert resp.status_code == 407
    with pytest.raises(requests.exceptions.ProxyError, match="407"):
        session(server, agent).get(f"{upstream.https_url}/echo/x", timeout=10)


@pytest.mark.parametrize("header", ["Basic !!!not-base64!!!", "Basic " + base64.b64encode(b"no-colon").decode(),
                                    "Bearer abc", "Basic", "Basic " + base64.b64encode(b"\xff\xfe:x").decode()])
def test_malformed_proxy_authorization_gets_407(server: BastionServer, upstream: Upstream, header: str) -> None:
    resp = requests.get(f"{upstream.http_url}/echo/x", proxies={"http": server.proxy_url()},
                        headers={"Proxy-Authorization": header}, timeout=10)
    assert resp.status_code == 407
    assert session(server).get(f"{upstream.http_url}/echo/still-serving", timeout=10).status_code == 200


def test_malformed_proxy_authorization_on_connect(server: BastionServer, upstream: Upstream) -> None:
    result = curl(server, "--proxy-header", "Proxy-Authorization: Basic %%%", "-o", "/dev/null",
                  "-w", "%{http_connect}", f"{upstream.https_url}/echo/x", proxy=server.proxy_url())
    assert result.stdout == "407"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_retired_agent_gets_403(server: BastionServer, upstream: Upstream, scheme: str) -> None:
    base = upstream.http_url if scheme == "http" else upstream.https_url
    resp = session(server, LEGACY).get(f"{base}/echo/x", timeout=10)
    assert resp.status_code == 403
    assert error_of(resp)["type"] == "agent_retired"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_private_headers_never_reach_upstream(server: BastionServer, upstream: Upstream, scheme: str) -> None:
    base = upstream.http_url if scheme == "http" else upstream.https_url
    resp = session(server).get(f"{base}/echo/headers", headers={
        "X-Bastion-Agent": "billing-bot", "x-bastion-request-id": "forged", "X-Other": "kept"}, timeout=10)
    assert resp.status_code == 200
    seen = echoed_headers(resp)
    assert "proxy-authorization" not in seen
    assert not any(name.startswith("x-bastion-") for name in seen)
    assert seen["x-other"] == "kept"
    assert resp.headers["X-Bastion-Request-Id"] != "forged"


# -- report mode ----------------------------------------------------------------------------


def test_report_mode_forwards_and_logs_would_be_decision(server: BastionServer, upstream: Upstream) -> None:
    resp = session(server, SHADOW).post(f"{upstream.https_url}/echo/erp/shadow", json={}, timeout=10)
    assert resp.status_code == 200
    assert resp.json()["path"] == "/echo/erp/shadow"
    line = server.wait_for_log(r"report mode: would deny POST https://localhost:\d+/echo/erp/shadow.*")
    assert "agent=shadow-bot" in line
    assert "rule=erp-read-only" in line


# -- path normalization, host header ---------------------------------------------------------------------


def test_dot_segments_are_matched_and_forwarded_normalized(server: BastionServer, upstream: Upstream) -> None:
    denied = curl(server, "--path-as-is", "-w", "\n%{http_code}", f"{upstream.https_url}/public/../admin")
    body, status = denied.stdout.rsplit("\n", 1)
    assert status == "403"
    assert json.loads(body)["error"]["rule"] == "no-admin-pages"
    allowed = curl(server, "--path-as-is", f"{upstream.https_url}/public/..//echo/./x/%2e%2e/y?q=1")
    assert json.loads(allowed.stdout)["path"] == "/echo/y?q=1"


def test_host_header_must_match_the_target(server: BastionServer, upstream: Upstream) -> None:
    resp = session(server).get(f"{upstream.http_url}/echo/x", headers={"Host": "elsewhere.example"}, timeout=10)
    assert resp.status_code == 400
    assert error_of(resp)["type"] == "bad_request"
    same = session(server).get(f"{upstream.http_url}/echo/x",
                               headers={"Host": f"LOCALHOST:{upstream.http_port}"}, timeout=10)
    assert same.status_code == 400  # localhost is another name than 127.0.0.1, even if it resolves there
    ok = session(server).get(f"{upstream.http_url}/echo/x", headers={"Host": f"127.0.0.1:{upstream.http_port}"},
                             timeout=10)
    assert ok.status_code == 200


# -- clients ---------------------------------------------------------------------------------------------


def test_curl_https_and_http(server: BastionServer, upstream: Upstream) -> None:
    for base in (upstream.http_url, upstream.https_url):
        result = curl(server, "-D", "-", f"{base}/echo/curl")
        assert result.returncode == 0, result.stderr
        assert "x-bastion-request-id:" in result.stdout.lower()
        assert '"path":"/echo/curl"' in result.stdout.replace(" ", "")


def test_httpx(server: BastionServer, upstream: Upstream) -> None:
    ctx = ssl.create_default_context(cafile=str(server.ca_cert))
    with httpx.Client(proxy=server.proxy_url(*SUPPORT), verify=ctx, trust_env=False) as client:
        for base in (upstream.http_url, upstream.https_url):
            resp = client.get(f"{base}/echo/httpx")
            assert resp.status_code == 200
            assert resp.json()["path"] == "/echo/httpx"
        denied = client.delete(f"{upstream.https_url}/echo/erp/1")
        assert denied.status_code == 403
        assert denied.json()["error"]["message"] == "The ERP is read-only for agents."


async def test_aiohttp_trust_env(server: BastionServer, upstream: Upstream,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = server.proxy_url(*SUPPORT)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    ctx = ssl.create_default_context(cafile=str(server.ca_cert))
    async with aiohttp.ClientSession(trust_env=True, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        for base in (upstream.http_url, upstream.https_url):
            async with s.get(f"{base}/echo/aiohttp") as resp:
                assert resp.status == 200
                assert (await resp.json())["path"] == "/echo/aiohttp"
                assert resp.headers["X-Bastion-Request-Id"]
        async with s.put(f"{upstream.https_url}/echo/erp/1") as resp:
            assert resp.status == 403


def test_openai_sdk_sees_the_rule_message(server: BastionServer, upstream: Upstream) -> None:
    ctx = ssl.create_default_context(cafile=str(server.ca_cert))
    http_client = openai.DefaultHttpxClient(proxy=server.proxy_url(*SUPPORT), verify=ctx, trust_env=False)
    client = openai.OpenAI(api_key="sk-test", base_url=f"{upstream.https_url}/v1", max_retries=0,
                           http_client=http_client)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="gpt-4-32k", messages=[{"role": "user", "content": "hi"}])
    assert "Model gpt-4-32k is not allowed for agents" in str(info.value)
    assert info.value.response.headers["x-bastion-request-id"]
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert raw.http_response.status_code == 200
    assert raw.http_response.json()["path"] == "/v1/chat/completions"
