"""The capture stages driven hook by hook with in-memory mitmproxy flows, writing to a real audit writer
(SQLite store, spool in a temporary directory): what the proxy tests cannot provoke on demand, such as an
audit that cannot take records."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy import connection, flow, http

from bastion.audit import snapshot
from bastion.audit.record import AuditRecord
from bastion.audit.settings import AuditConfig
from bastion.audit.sinks import RecordQuery
from bastion.audit.writer import AuditWriter
from bastion.metrics import REGISTRY
from bastion.proxy import flowmeta
from bastion.proxy.capture import Capture


def client() -> connection.Client:
    return connection.Client(peername=("127.0.0.1", 40000), sockname=("127.0.0.1", 8080),
                             timestamp_start=time.time())


def agent_flow(url: str = "https://api.example.com/v1/chat", body: bytes = b'{"q": 1}') -> http.HTTPFlow:
    f = http.HTTPFlow(client(), connection.Server(address=None))
    f.request = http.Request.make("POST", url, body, {"content-type": "application/json",
                                                       "Proxy-Authorization": "Basic Ym90OnRvaw=="})
    f.request.timestamp_end = time.time()
    f.metadata[flowmeta.REQUEST_ID] = "01a20d4e-0000-7000-8000-000000000001"
    f.metadata[flowmeta.AGENT] = "bot"
    return f


async def records(writer: AuditWriter) -> list[AuditRecord]:
    assert await writer.flush()
    page = await writer.store.query(RecordQuery(bodies=True, ascending=True))
    return page.records


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[AuditWriter]:
    w = await AuditWriter.open(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path / "spool")
    yield w
    await w.close(drain_for=5)


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("bastion_audit_dropped_total", {"reason": reason}) or 0.0


async def test_an_audit_that_cannot_take_records_refuses_before_anything_acts(tmp_path: Path) -> None:
    # A spool limit the spool exceeds from the start: records cannot be taken.
    w = await AuditWriter.open(f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "spool", max_spool_bytes=1,
                               config=AuditConfig(on_failure="deny"))
    try:
        capture = Capture(w)
        f = agent_flow()
        capture.intake.requestheaders(f)
        capture.intake.request(f)  # runs before identity, policy, locks and approvals act on the request
        assert f.response is not None and f.response.status_code == 503
        err = json.loads(f.response.content or b"")["error"]
        assert err["type"] == "audit_unavailable" and f.response.headers["retry-after"] == "5"
        assert f.metadata[flowmeta.REFUSAL] == "audit_unavailable"

        # Fails while a call is held: refused right before forwarding.
        late = agent_flow()
        capture.intake.requestheaders(late)
        capture.request(late)
        assert late.response is not None and late.response.status_code == 503

        # audit.on_failure: allow serves the call and counts the record it could not keep.
        w.configure(AuditConfig(on_failure="allow"))
        served = agent_flow()
        capture.intake.requestheaders(served)
        capture.intake.request(served)
        capture.request(served)
        assert served.response is None
        before = dropped("spool_full")
        served.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
        capture.responseheaders(served)
        capture.response(served)
        assert dropped("spool_full") == before + 1
    finally:
        await w.close(drain_for=1)


async def test_stream_tap_passes_chunks_on_and_one_record_per_exchange(writer: AuditWriter) -> None:
    capture = Capture(writer)
    f = agent_flow()
    capture.intake.requestheaders(f)
    capture.request(f)
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    f.response.stream = True  # as the gate leaves an event stream
    capture.responseheaders(f)
    tap = f.response.stream
    assert callable(tap)
    chunks = [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert all(tap(c) is c for c in chunks)  # the agent gets each chunk itself, at once
    capture.response(f)
    f.error = flow.Error("Client disconnected.")
    capture.error(f)  # mitmproxy may report an error after the response: still one record
    assert tap(b"late data") == b"late data"  # after the record: passed on, not captured

    [r] = await records(writer)
    assert r.outcome == "forwarded" and r.response is not None and r.response.streamed
    assert r.response.body is not None and r.response.body.content == b"data: 1\n\ndata: 2\n\n"
    assert r.identity.agent == "bot" and r.request.body is not None and r.request.body.content == b'{"q": 1}'
    assert "/request/headers/proxy-authorization" in r.redactions


async def test_client_gone_mid_stream_keeps_what_was_sent(writer: AuditWriter) -> None:
    capture = Capture(writer)
    f = agent_flow()
    capture.intake.requestheaders(f)
    capture.request(f)
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    f.response.stream = True
    capture.responseheaders(f)
    f.response.stream(b"data: partial\n\n")
    f.error = flow.Error("Client disconnected.")
    capture.error(f)
    [r] = await records(writer)
    assert r.outcome == "client_gone" and r.error is not None and r.error.type == "client_gone"
    assert r.response is not None and r.response.body is not None
    assert r.response.body.content == b"data: partial\n\n" and not r.response.body.complete


async def test_a_refused_connect_is_an_exchange_an_open_tunnel_is_not(writer: AuditWriter) -> None:
    capture = Capture(writer)

    def connect(status: int) -> http.HTTPFlow:
        f = http.HTTPFlow(client(), connection.Server(address=None))
        f.request = http.Request("api.example.com", 443, b"CONNECT", b"", b"api.example.com:443", b"", b"HTTP/1.1",
                                 http.Headers([(b"Proxy-Authorization", b"Basic Ym90Om5vcGU=")]), b"", None,
                                 time.time(), time.time())
        f.metadata[flowmeta.REQUEST_ID] = f"01a20d4e-0000-7000-8000-00000000000{status // 100}"
        f.response = http.Response.make(status, b"")
        if status >= 400:
            f.metadata[flowmeta.REFUSAL] = "proxy_auth_required"
        return f

    capture.http_connect(connect(200))
    capture.http_connect(connect(407))
    [r] = await records(writer)
    assert (r.request.method, r.request.url, r.status) == ("CONNECT", "//api.example.com:443", 407)
    assert (r.identity.auth, r.identity.claimed) == ("invalid", "bot")


def test_request_url_and_facts_from_the_other_stages() -> None:
    f = agent_flow("http://[::1]:8080/a?b=1")
    assert snapshot.request_url("POST", "http", "::1", 8080, "/orig/../a?b=1") == "http://[::1]:8080/orig/../a?b=1"
    assert snapshot.request_url("GET", "https", "h.example", 443, "/x") == "https://h.example/x"
    assert snapshot.request_url("CONNECT", "http", "h.example", 443, "h.example:443") == "//h.example:443"
    f.metadata[flowmeta.LOCK_EVENTS] = [
        {"event": "acquired", "key": "ticket:1", "rule": "r", "fence": 7, "expires_at": "2026-11-24T10:00:00.000Z"},
        {"event": "conflict", "key": "ticket:2", "rule": "r", "holder": "other", "expires_at": None}]
    locks = snapshot.lock_facts(f.metadata[flowmeta.LOCK_EVENTS])
    assert [(lk.key, lk.action, lk.fence, lk.holder) for lk in locks] == [
        ("ticket:1", "acquired", 7, None), ("ticket:2", "conflict", None, "other")]
    assert locks[0].expires_us == 1795514400000000
    f.metadata[flowmeta.APPROVAL] = {"id": "ap-1", "state": "approved", "decided_by": "alice", "note": "ok",
                                     "waited_s": 2.5}
    approval = snapshot.approval_fact(f.metadata[flowmeta.APPROVAL])
    assert approval is not None and (approval.id, approval.state, approval.decided_by, approval.waited_us) == (
        "ap-1", "approved", "alice", 2_500_000)


async def test_client_gone_while_held_keeps_the_decision_and_the_approval(writer: AuditWriter) -> None:
    from types import SimpleNamespace

    capture = Capture(writer, pinned="bot")
    f = agent_flow()
    capture.intake.requestheaders(f)
    f.metadata[flowmeta.DECISION] = SimpleNamespace(effect="hold", would_effect="hold", mode="enforce",
                                                    rules=("big-refund",), reason="rule", message=None, errors=())
    f.metadata[flowmeta.APPROVAL] = {"id": "ap-9", "state": "pending", "decided_by": None, "note": None,
                                     "waited_s": 1.5}
    capture.request(f)  # the hold ended (the approval stage returned) ...
    f.error = flow.Error("Client disconnected.")  # ... after the agent had gone
    capture.error(f)
    [r] = await records(writer)
    assert r.outcome == "client_gone" and r.response is None
    assert r.decision is not None and (r.decision.effect, r.decision.rules) == ("hold", ["big-refund"])
    assert r.approval is not None and (r.approval.id, r.approval.state, r.approval.waited_us) == (
        "ap-9", "pending", 1_500_000)
    assert (r.identity.agent, r.identity.auth) == ("bot", "pinned")


async def test_a_large_body_is_digested_off_the_event_loop(writer: AuditWriter) -> None:
    capture = Capture(writer)
    big = b'{"blob": "' + b"a" * (3 << 20) + b'"}'
    f = agent_flow(body=big)
    capture.intake.requestheaders(f)
    capture.request(f)
    f.response = http.Response.make(200, b'{"ok": true}', {"content-type": "application/json"})
    capture.responseheaders(f)
    pending = capture.response(f)
    assert pending is not None  # the caller (the pipeline) awaits it before the answer goes out
    await pending
    [r] = await records(writer)
    body = r.request.body
    assert body is not None and body.size == len(big) and body.truncated and body.stored == 1 << 20
    assert r.response is not None and r.response.body is not None and r.response.body.content == b'{"ok": true}'
