"""The audit log through a running proxy: one complete record for every way an exchange can end, with real
clients (requests, httpx, curl, the openai SDK), on the embedded SQLite store and on a real PostgreSQL.

Every test runs once per sink: `bastion serve` on a fresh home, with the default audit URL (the home's SQLite
file) or `--audit postgresql://...?schema=<unique>` (dropped afterwards). Records are read back the way
`bastion audit` and the dashboard read them: from the store.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import requests
from auditproxy import (
    MAX_BODY,
    SSE_EVENTS,
    TOKENS,
    USERS,
    AuditUpstream,
    chat_chunk,
    drop_schema,
    read_records,
    run_audit_upstream,
    wait_for_record,
    write_policy,
)
from services import require_postgres
from support.bastion import BastionServer, clean_env, run_bastion, run_cli
from support.certs import CertFiles
from support.ports import free_port

from bastion.audit.record import AuditRecord


@dataclass
class Audited:
    server: BastionServer
    url: str  # the audit store, as `bastion audit --audit URL` reads it
    home: Path


@pytest.fixture(scope="module")
def audit_upstream(test_certs: CertFiles) -> Iterator[AuditUpstream]:
    with run_audit_upstream(test_certs) as up:
        yield up


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def audited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_certs: CertFiles,
            audit_upstream: AuditUpstream) -> Iterator[Audited]:
    work = tmp_path_factory.mktemp(f"audit-{request.param}")
    home = work / "home"
    rules = write_policy(work / "rules.yaml")
    if request.param == "sqlite":  # the default: the home's database
        with run_bastion(work / "srv", [rules], home=home, upstream_ca=test_certs.ca_cert) as server:
            yield Audited(server, f"sqlite:///{home / 'bastion.db'}", home)
        return
    dsn = require_postgres()
    schema = f"bastiontest_{uuid.uuid4().hex[:12]}"
    url = f"{dsn}?schema={schema}"
    try:
        with run_bastion(work / "srv", [rules], home=home, upstream_ca=test_certs.ca_cert,
                         extra_args=["--audit", url]) as server:
            yield Audited(server, url, home)
    finally:
        asyncio.run(drop_schema(dsn, schema))


def session(a: Audited, agent: str | None = "support-bot", token: str | None = None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    url = a.server.proxy_url(agent, token or TOKENS[agent]) if agent else a.server.proxy_url()
    s.proxies = {"http": url, "https": url}
    s.verify = str(a.server.ca_cert)
    return s


def record_of(a: Audited, resp: requests.Response | httpx.Response) -> AuditRecord:
    return wait_for_record(a.url, resp.headers["X-Bastion-Request-Id"])


def header(record_headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in record_headers if k.lower() == name.lower()), None)


def curl_id(result: subprocess.CompletedProcess[str]) -> str:
    """The request id of a refused CONNECT, from curl's verbose output (the tunnel's answer headers)."""
    m = re.search(r"X-Bastion-Request-Id: ([0-9a-f-]{36})", result.stderr, re.IGNORECASE)
    assert m, result.stderr
    return m.group(1)


def curl(a: Audited, proxy: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "-v", "--max-time", "20", "-x", proxy, "--cacert", str(a.server.ca_cert),
                           *args], capture_output=True, text=True, timeout=30, env=clean_env())


# -- forwarded -------------------------------------------------------------------------------------------


def test_allowed_call_is_recorded_in_full(audited: Audited, audit_upstream: AuditUpstream) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    resp = session(audited).post(f"{audit_upstream.https_url}/v1/items?x=1", json=body, timeout=10,
                                 headers={"X-Trace": "abc"})
    assert resp.status_code == 200
    r = record_of(audited, resp)

    assert r.id == resp.headers["X-Bastion-Request-Id"]
    assert r.outcome == "forwarded" and r.error is None
    assert r.identity.agent == "support-bot" and r.identity.auth == "basic"
    assert r.identity.client.startswith("127.0.0.1:")
    assert r.request.method == "POST"
    assert r.request.url == f"{audit_upstream.https_url}/v1/items?x=1"
    assert r.request.http_version == "HTTP/1.1"
    assert header(r.request.headers, "X-Trace") == "abc"
    assert r.request.body is not None and json.loads(r.request.body.content or b"") == body
    assert r.request.body.size == len(resp.request.body or b"")
    assert r.response is not None
    assert (r.response.status, r.response.source, r.response.streamed) == (200, "upstream", False)
    assert header(r.response.headers, "X-Bastion-Request-Id") == r.id
    assert r.response.body is not None and r.response.body.content == resp.content
    assert r.response.body.size == len(resp.content) and not r.response.body.truncated
    assert r.decision is not None
    assert (r.decision.effect, r.decision.rules, r.decision.reason) == ("allow", ["local-upstream"], "rule")
    status, rules = audited.server.admin_get("/api/rules", USERS["bob"])
    assert status == 200 and r.policy_revision == json.loads(rules)["revision"]
    assert r.upstream == f"127.0.0.1:{audit_upstream.https_port}"
    assert r.timings.decision_us is not None and r.timings.upstream_us is not None
    assert r.timings.total_us >= max(r.timings.decision_us, r.timings.upstream_us)
    assert r.ended_us - r.started_us == r.timings.total_us
    assert r.chain is not None and r.hash


def test_sse_reaches_the_client_event_by_event_and_is_stored_whole(audited: Audited,
                                                                   audit_upstream: AuditUpstream) -> None:
    """The upstream sends each event only after the client has read the previous one: buffering anywhere in
    the proxy would stall the stream (and fail the test) instead of passing it."""
    key = uuid.uuid4().hex
    ctx = ssl.create_default_context(cafile=str(audited.server.ca_cert))
    http_client = openai.DefaultHttpxClient(proxy=audited.server.proxy_url("support-bot", TOKENS["support-bot"]),
                                            verify=ctx, trust_env=False)
    client = openai.OpenAI(api_key="sk-test", base_url=f"{audit_upstream.https_url}/step/{key}/v1", max_retries=0,
                           http_client=http_client, timeout=30)
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[{"role": "user", "content": "count"}])
    got = []
    for i, chunk in enumerate(stream):
        got.append(chunk.choices[0].delta.content)
        assert audit_upstream.sent[key] == i + 1  # event i arrived before the upstream sent event i + 1
        audit_upstream.step(key)
    assert got == [f"tok{i} " for i in range(SSE_EVENTS)]

    r = record_of(audited, stream.response)
    assert r.outcome == "forwarded"
    assert r.response is not None and r.response.streamed and r.response.status == 200
    body = r.response.body
    assert body is not None and body.complete and not body.truncated
    assert body.content == audit_upstream.stream_bytes[key]
    assert body.mime_type.startswith("text/event-stream")


def test_gzip_bomb_is_stored_cut_and_the_proxy_stays_up(audited: Audited, audit_upstream: AuditUpstream) -> None:
    bomb = audit_upstream.bomb()
    ctx = ssl.create_default_context(cafile=str(audited.server.ca_cert))
    proxy = audited.server.proxy_url("support-bot", TOKENS["support-bot"])
    with httpx.Client(proxy=proxy, verify=ctx, trust_env=False, timeout=60) as client, \
            client.stream("GET", f"{audit_upstream.https_url}/bomb") as resp:
        received = sum(len(chunk) for chunk in resp.iter_raw())  # as sent, not inflated
        assert resp.status_code == 200 and received == len(bomb)
        request_id = resp.headers["X-Bastion-Request-Id"]
    r = wait_for_record(audited.url, request_id)
    body = r.response.body if r.response else None
    assert body is not None and body.encoding == "gzip"
    assert body.size == len(bomb)  # what crossed the proxy
    assert body.truncated and body.stored == MAX_BODY and body.content == bytes(MAX_BODY)

    after = session(audited).get(f"{audit_upstream.http_url}/after-bomb", timeout=10)
    assert after.status_code == 200 and after.json()["ok"] is True


# -- refused ---------------------------------------------------------------------------------------------


def test_rule_denial_and_default_deny(audited: Audited, audit_upstream: AuditUpstream) -> None:
    denied = session(audited).post(f"{audit_upstream.http_url}/erp/orders", json={"x": 1}, timeout=10)
    assert denied.status_code == 403
    r = record_of(audited, denied)
    assert r.outcome == "refused" and r.error is not None
    assert (r.error.type, r.error.message) == ("policy_denied", "The ERP is read-only for agents.")
    assert r.decision is not None and (r.decision.effect, r.decision.rules) == ("deny", ["erp-read-only"])
    assert r.response is not None and (r.response.status, r.response.source) == (403, "bastion")
    assert r.response.body is not None and json.loads(r.response.body.content or b"") == denied.json()
    assert r.request.body is not None and json.loads(r.request.body.content or b"") == {"x": 1}
    assert r.upstream is None and r.timings.upstream_us is None

    default = session(audited).get("http://not-allowed.invalid/anything", timeout=10)
    assert default.status_code == 403
    d = record_of(audited, default)
    assert d.decision is not None and (d.decision.effect, d.decision.reason, d.decision.rules) == (
        "deny", "default", [])
    assert d.request.url == "http://not-allowed.invalid/anything"


def test_proxy_auth_failures(audited: Audited, audit_upstream: AuditUpstream) -> None:
    missing = session(audited, agent=None).get(f"{audit_upstream.http_url}/x", timeout=10)
    assert missing.status_code == 407
    m = record_of(audited, missing)
    assert (m.identity.agent, m.identity.auth, m.identity.claimed) == (None, "missing", None)
    assert m.outcome == "refused" and m.error is not None and m.error.type == "proxy_auth_required"
    assert m.decision is not None and (m.decision.effect, m.decision.reason) == ("deny", "proxy_auth_required")
    assert m.response is not None and header(m.response.headers, "Proxy-Authenticate") == 'Basic realm="bastion"'

    wrong = session(audited, "support-bot", "not-the-token").get(f"{audit_upstream.http_url}/x", timeout=10)
    assert wrong.status_code == 407
    w = record_of(audited, wrong)
    assert (w.identity.agent, w.identity.auth, w.identity.claimed) == (None, "invalid", "support-bot")
    assert (header(w.request.headers, "Proxy-Authorization") or "").startswith("Basic [REDACTED")

    # HTTPS: refused at CONNECT, where the agent sees only the status. Still an exchange: recorded.
    result = curl(audited, f"http://support-bot:nope@127.0.0.1:{audited.server.proxy_port}",
                  f"{audit_upstream.https_url}/x")
    assert result.returncode != 0 and "407" in result.stderr
    c = wait_for_record(audited.url, curl_id(result))
    assert (c.request.method, c.request.url) == ("CONNECT", f"//localhost:{audit_upstream.https_port}")
    assert (c.identity.auth, c.identity.claimed) == ("invalid", "support-bot")
    assert c.response is not None and c.response.status == 407 and c.outcome == "refused"


def test_retired_agent_and_connect_without_rules(audited: Audited, audit_upstream: AuditUpstream) -> None:
    retired = session(audited, "legacy-bot").get(f"{audit_upstream.http_url}/x", timeout=10)
    assert retired.status_code == 403
    r = record_of(audited, retired)
    assert r.identity.agent == "legacy-bot" and r.error is not None and r.error.type == "agent_retired"
    assert r.decision is not None and (r.decision.effect, r.decision.reason) == ("deny", "agent_retired")

    result = curl(audited, audited.server.proxy_url("billing-bot", TOKENS["billing-bot"]),
                  f"{audit_upstream.https_url}/x")
    assert result.returncode != 0 and "403" in result.stderr
    c = wait_for_record(audited.url, curl_id(result))
    assert c.request.method == "CONNECT" and c.identity.agent == "billing-bot"
    assert c.error is not None and c.error.type == "policy_denied" and c.response is not None
    assert c.response.status == 403


def test_held_call(audited: Audited, audit_upstream: AuditUpstream) -> None:
    resp = session(audited).post(f"{audit_upstream.http_url}/refunds", json={"amount": 9000}, timeout=60)
    assert resp.status_code >= 400  # held, then refused (no approver decided it, or no approval service)
    r = record_of(audited, resp)
    assert r.decision is not None
    assert (r.decision.effect, r.decision.rules) == ("hold", ["refunds-need-approval"])
    assert r.outcome == "refused" and r.error is not None and r.error.type == resp.json()["error"]["type"]
    assert r.response is not None and r.response.status == resp.status_code


def test_task_lock_taken_and_conflict(audited: Audited, audit_upstream: AuditUpstream) -> None:
    ticket = uuid.uuid4().hex[:8]
    url = f"{audit_upstream.http_url}/tickets/{ticket}/comments"
    first = session(audited, "support-bot").post(url, json={"text": "on it"}, timeout=10)
    assert first.status_code == 200
    r = record_of(audited, first)
    assert [(lk.key, lk.action, lk.rule) for lk in r.locks] == [(f"ticket:{ticket}", "acquired", "ticket-comments")]
    assert isinstance(r.locks[0].fence, int) and r.locks[0].expires_us is not None

    second = session(audited, "helper-bot").post(url, json={"text": "me too"}, timeout=10)
    assert second.status_code == 423
    c = record_of(audited, second)
    assert c.outcome == "refused" and c.error is not None and c.error.type == "lock_conflict"
    assert [(lk.key, lk.action, lk.holder) for lk in c.locks] == [(f"ticket:{ticket}", "conflict", "support-bot")]
    assert c.decision is not None and c.decision.effect == "allow"  # the rules allowed it; the lock did not


# -- upstream errors and clients that go away --------------------------------------------------------------


def test_upstream_unreachable_and_tls_failure(audited: Audited, audit_upstream: AuditUpstream) -> None:
    # mitmproxy answers these 502s itself, without the request id: the records are found by URL.
    tag = uuid.uuid4().hex
    refused = session(audited).get(f"http://127.0.0.1:{free_port()}/refused-{tag}", timeout=10)
    assert refused.status_code == 502
    [r] = wait_for_url(audited, f"/refused-{tag}")
    assert r.outcome == "upstream_error" and r.error is not None and r.error.type == "upstream_error"
    assert r.error.message and r.response is not None and (r.response.status, r.response.source) == (502, "bastion")
    assert r.decision is not None and r.decision.effect == "allow" and r.identity.agent == "support-bot"

    # TLS to a port that speaks plain HTTP: the upstream handshake fails.
    bad_tls = session(audited).get(f"https://127.0.0.1:{audit_upstream.http_port}/tls-{tag}", timeout=10)
    assert bad_tls.status_code == 502
    [t] = wait_for_url(audited, f"/tls-{tag}")
    assert t.outcome == "upstream_error" and t.error is not None and t.error.message
    assert t.request.url == f"https://127.0.0.1:{audit_upstream.http_port}/tls-{tag}"


def test_client_gone_while_waiting_for_the_upstream(audited: Audited, audit_upstream: AuditUpstream) -> None:
    tag = uuid.uuid4().hex
    with pytest.raises(requests.exceptions.ReadTimeout):
        session(audited).get(f"{audit_upstream.http_url}/slow?seconds=3&tag={tag}", timeout=0.5)
    [r] = wait_for_url(audited, tag)
    assert r.outcome == "client_gone" and r.error is not None and r.error.type == "client_gone"
    assert r.response is None and r.identity.agent == "support-bot"


def test_client_gone_mid_stream(audited: Audited, audit_upstream: AuditUpstream) -> None:
    key = uuid.uuid4().hex
    ctx = ssl.create_default_context(cafile=str(audited.server.ca_cert))
    proxy = audited.server.proxy_url("support-bot", TOKENS["support-bot"])
    with httpx.Client(proxy=proxy, verify=ctx, trust_env=False, timeout=30) as client, \
            client.stream("POST", f"{audit_upstream.https_url}/step/{key}/v1/chat/completions",
                          json={"model": "gpt-4o-mini", "stream": True, "messages": []}) as resp:
        first = next(resp.iter_lines())
        assert first == chat_chunk(0).decode().strip()
        request_id = resp.headers["X-Bastion-Request-Id"]
    # closed after one event: an unread streaming response takes its connection with it
    audit_upstream.step(key)  # let the upstream notice
    r = wait_for_record(audited.url, request_id)
    assert r.outcome == "client_gone" and r.error is not None and r.error.type == "client_gone"
    assert r.response is not None and r.response.streamed and r.response.status == 200
    body = r.response.body
    assert body is not None and not body.complete and (body.content or b"").startswith(chat_chunk(0))


def wait_for_url(a: Audited, text: str, timeout: float = 20.0) -> list[AuditRecord]:
    """The records whose URL contains `text`, for calls whose answer carried no request id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = read_records(a.url, text=text)
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no record with {text!r} in its URL")


# -- secrets ---------------------------------------------------------------------------------------------


def test_secrets_never_reach_the_store_or_an_export(audited: Audited, audit_upstream: AuditUpstream) -> None:
    bearer = f"bearer-{uuid.uuid4().hex}"
    api_key = f"key-{uuid.uuid4().hex}"
    resp = session(audited).post(f"{audit_upstream.https_url}/v1/embeddings", timeout=10,
                                 headers={"Authorization": f"Bearer {bearer}"},
                                 json={"api_key": api_key, "input": "hello"})
    assert resp.status_code == 200
    seen = audit_upstream.received[-1]
    assert seen["headers"]["Authorization"] == f"Bearer {bearer}" and api_key.encode() in seen["body"]
    r = record_of(audited, resp)
    assert "/request/headers/authorization" in r.redactions and "/request/body/api_key" in r.redactions
    assert (header(r.request.headers, "Authorization") or "").startswith("Bearer [REDACTED")
    assert r.request.body is not None and json.loads(r.request.body.content or b"")["input"] == "hello"

    secrets = (bearer.encode(), api_key.encode())
    for blob in stored_bytes(audited):
        for secret in secrets:
            assert secret not in blob
    for fmt in ("har", "jsonl"):
        out = run_cli("audit", "export", "--format", fmt, "--audit", audited.url, "--home", str(audited.home))
        assert out.returncode == 0, out.stderr
        assert r.id in out.stdout and bearer not in out.stdout and api_key not in out.stdout
    shown = run_cli("audit", "show", r.id, "--format", "json", "--audit", audited.url, "--home", str(audited.home))
    assert shown.returncode == 0 and bearer not in shown.stdout and api_key not in shown.stdout


def stored_bytes(a: Audited) -> Iterator[bytes]:
    """Everything the audit keeps: the raw database (SQLite files or PostgreSQL rows, bodies inflated) and the
    spool files, so a secret cannot hide in a compressed body or a not-yet-drained record."""
    for path in sorted(a.home.rglob("*")):
        if path.is_file() and (path.name.startswith("bastion.db") or path.parent.name.startswith("spool")):
            yield path.read_bytes()
    rows = asyncio.run(_rows(a.url)) if a.url.startswith("postgresql") else _sqlite_rows(a.url)
    for record, *bodies in rows:
        yield record.encode()
        for body in bodies:
            if body is not None:
                yield zlib.decompress(bytes(body))


def _sqlite_rows(url: str) -> list[tuple[str, bytes | None, bytes | None]]:
    import sqlite3

    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        return conn.execute("SELECT record, request_body, response_body FROM audit_records").fetchall()
    finally:
        conn.close()


async def _rows(url: str) -> list[tuple[str, bytes | None, bytes | None]]:
    import asyncpg

    dsn, _, query = url.partition("?schema=")
    conn = await asyncpg.connect(dsn)
    try:
        # the schema name is the test's own uuid-based identifier
        rows = await conn.fetch(f'SELECT record, request_body, response_body FROM "{query}".audit_records')  # noqa: S608
    finally:
        await conn.close()
    return [tuple(r) for r in rows]  # type: ignore[misc]


# -- reading it back: admin API, metrics, CLI --------------------------------------------------------------


def test_flows_api(audited: Audited, audit_upstream: AuditUpstream) -> None:
    tag = uuid.uuid4().hex
    s = session(audited)
    ids = [s.get(f"{audit_upstream.http_url}/api-{tag}/{i}", timeout=10).headers["X-Bastion-Request-Id"]
           for i in range(3)]
    denied = s.post(f"{audit_upstream.http_url}/erp/api-{tag}", timeout=10)
    wait_for_record(audited.url, denied.headers["X-Bastion-Request-Id"])
    bob = USERS["bob"]

    assert audited.server.admin_get("/api/flows")[0] == 401
    status, raw = audited.server.admin_get(f"/api/flows?q=api-{tag}&limit=2", bob)
    assert status == 200
    page = json.loads(raw)
    assert [f["id"] for f in page["flows"]] == [denied.headers["X-Bastion-Request-Id"], ids[2]]  # newest first
    status, raw = audited.server.admin_get(f"/api/flows?q=api-{tag}&limit=2&before={page['next']}", bob)
    rest = json.loads(raw)
    assert [f["id"] for f in rest["flows"]] == [ids[1], ids[0]] and rest["next"] is None

    status, raw = audited.server.admin_get(f"/api/flows?q=api-{tag}&decision=deny", bob)
    [flow] = json.loads(raw)["flows"]
    assert (flow["decision"], flow["status"], flow["error"], flow["rules"]) == (
        "deny", 403, "policy_denied", ["erp-read-only"])
    assert flow["agent"] == "support-bot" and flow["outcome"] == "refused" and flow["host"] == "127.0.0.1"
    status, raw = audited.server.admin_get(f"/api/flows?agent=helper-bot&q=api-{tag}", bob)
    assert json.loads(raw)["flows"] == []
    status, raw = audited.server.admin_get(f"/api/flows?host=127.0.0.1&outcome=forwarded&q=api-{tag}", bob)
    assert sorted(f["id"] for f in json.loads(raw)["flows"]) == sorted(ids)

    status, raw = audited.server.admin_get(f"/api/flows/{ids[0]}", bob)
    full = json.loads(raw)
    assert status == 200 and full["id"] == ids[0] and full["hash"]
    assert full["request"]["url"].endswith(f"/api-{tag}/0")
    assert json.loads(full["response"]["body"]["content"]["text"])["ok"] is True
    status, raw = audited.server.admin_get(f"/api/flows/{ids[0]}/har", bob)
    har = json.loads(raw)
    assert status == 200 and har["log"]["entries"][0]["_bastion"]["id"] == ids[0]
    assert har["log"]["entries"][0]["response"]["status"] == 200

    assert audited.server.admin_get(f"/api/flows/{uuid.uuid4()}", bob)[0] == 404
    for bad in ("limit=0", "limit=x", "decision=maybe", "outcome=lost", "before=nonsense"):
        status, raw = audited.server.admin_get(f"/api/flows?{bad}", bob)
        assert status == 400 and json.loads(raw)["error"]["type"] == "bad_request", bad


def test_metrics_and_readiness_report_the_audit(audited: Audited) -> None:
    status, raw = audited.server.admin_get("/metrics")
    text = raw.decode()
    assert status == 200
    for name in ("bastion_audit_records_total", "bastion_audit_backlog", "bastion_audit_write_errors_total"):
        assert re.search(rf"^{name} \d", text, re.MULTILINE), name
    status, raw = audited.server.admin_get("/readyz")
    checks = json.loads(raw)["checks"]
    assert status == 200 and checks["audit"]["ok"] is True


def test_cli_reads_and_verifies_the_result(audited: Audited, audit_upstream: AuditUpstream) -> None:
    resp = session(audited).get(f"{audit_upstream.http_url}/cli-check", timeout=10)
    record_of(audited, resp)
    rid = resp.headers["X-Bastion-Request-Id"]
    args = ("--audit", audited.url, "--home", str(audited.home))
    verify = run_cli("audit", "verify", *args)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    tail = run_cli("audit", "tail", "-n", "5", *args)
    assert tail.returncode == 0 and rid in tail.stdout
    show = run_cli("audit", "show", rid, *args)
    assert show.returncode == 0 and "/cli-check" in show.stdout
    export = run_cli("audit", "export", "--format", "jsonl", "--agent", "support-bot", *args)
    assert export.returncode == 0
    ids = [json.loads(line)["id"] for line in export.stdout.splitlines() if line.strip()]
    assert rid in ids


def test_a_policy_reload_applies_new_audit_settings(tmp_path: Path, test_certs: CertFiles,
                                                    audit_upstream: AuditUpstream) -> None:
    rules = write_policy(tmp_path / "rules.yaml")
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'bastion.db'}"
    body = {"text": "x" * 5000}
    with run_bastion(tmp_path / "srv", [rules], home=home) as server:
        a = Audited(server, url, home)
        before = record_of(a, session(a).post(f"{audit_upstream.http_url}/reload-1", json=body, timeout=10))
        assert before.request.body is not None and not before.request.body.truncated

        rules.write_text(rules.read_text().replace(f"max_body_bytes: {MAX_BODY}", "max_body_bytes: 100"))
        status, _ = server.admin_post("/api/rules/reload", USERS["alice"])  # (the file watcher may be first)
        assert status == 200
        after = record_of(a, session(a).post(f"{audit_upstream.http_url}/reload-2", json=body, timeout=10))
        assert after.request.body is not None and after.request.body.truncated and after.request.body.stored == 100
        assert after.policy_revision != before.policy_revision
