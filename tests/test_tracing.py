"""Tracing: one OpenTelemetry span per exchange, sent over OTLP/HTTP by the audit worker.

A local OTLP/HTTP collector (`OtlpReceiver`, on 127.0.0.1) decodes the protobuf export requests the real
exporter sends. Audit records of each kind (an LLM call, MCP calls, a refusal, upstream failures) go through
`bastion.audit.tracing` to it; then the real `bastion serve --otlp` sends the span of a call made through it,
and a dead collector changes nothing for the calls or the shutdown.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from support.bastion import BastionServer, run_bastion
from support.certs import CertFiles
from support.ports import free_port
from support.upstream import Upstream

from bastion import __version__
from bastion.audit.record import (
    ApprovalFact,
    AuditRecord,
    DecisionFacts,
    ErrorFacts,
    Identity,
    LockFact,
    Request,
    Response,
    Timings,
)
from bastion.audit.sample import sample_exchange
from bastion.audit.sinks import open_store
from bastion.audit.tracing import (
    MAX_ITEMS,
    MAX_TEXT,
    MAX_URL,
    Throttle,
    TracingSettings,
    error_type,
    span_attributes,
    span_name,
    start_tracing,
)
from bastion.audit.writer import AuditWriter
from bastion.config import ConfigError
from bastion.ids import new_request_id, now_us
from bastion.proxy.settings import tracing_settings

REPO = Path(__file__).resolve().parent.parent
PROXY_RULES = REPO / "tests" / "testdata" / "policy" / "proxy.yaml"
SUPPORT = ("support-bot", "sb-token:with:colons")


# --- a local OTLP/HTTP collector ---------------------------------------------------------------------------------

@dataclass
class ReceivedSpan:
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: int
    status_message: str
    resource: dict[str, Any]


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class OtlpReceiver:
    """Takes `POST /v1/traces` (protobuf), keeps every span with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_error(404)
                    return
                receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def take(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(ReceivedSpan(
                            span.name, span.kind, span.start_time_unix_nano, span.end_time_unix_nano,
                            _attributes(span.attributes), span.status.code, span.status.message, resource))

    def by_request_id(self) -> dict[str, ReceivedSpan]:
        with self._lock:
            return {s.attributes["bastion.request_id"]: s for s in self.spans}

    def wait_for(self, request_id: str, timeout: float = 30.0) -> ReceivedSpan:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            span = self.by_request_id().get(request_id)
            if span is not None:
                return span
            time.sleep(0.05)
        raise AssertionError(f"no span for {request_id} within {timeout}s; got {list(self.by_request_id())}")

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


# --- records of each kind ---------------------------------------------------------------------------------------

LLM_EXTRA: dict[str, Any] = {
    "provider": "openai", "api": "chat.completions", "operation": "chat",
    "request_model": "gpt-4o-mini", "response_model": "gpt-4o-mini-2024-07-18", "model": "gpt-4o-mini-2024-07-18",
    "stream": True, "tools": ["send_email", "lookup_order"],
    "tool_calls": [{"id": "call_abc", "name": "send_email", "arguments": '{"to": "ceo@example.com"}'},
                   {"id": "call_def", "name": "lookup_order", "arguments": "{}"}],
    "finish_reasons": ["tool_calls"], "response_id": "chatcmpl-123",
    "usage": {"input_tokens": 1200, "output_tokens": 80, "cache_read_tokens": 1024, "cache_creation_tokens": 0,
              "reasoning_tokens": 16},
    "usage_reported": True, "time_to_first_token_s": 0.42, "complete": True, "error": None,
}


def llm_record() -> AuditRecord:
    record, _, _ = sample_exchange(agent="support-bot", seed=1)
    record.extra = {"llm": copy.deepcopy(LLM_EXTRA)}
    return record


def plain_record(method: str = "POST", url: str = "https://mcp.example.com:8443/mcp", *, status: int | None = 200,
                 outcome: str = "forwarded", extra: dict[str, Any] | None = None) -> AuditRecord:
    start = now_us()
    return AuditRecord(
        id=new_request_id(), started_us=start, ended_us=start + 12_345,
        identity=Identity(agent="support-bot", auth="basic", client="127.0.0.1:50000"),
        request=Request(method, url, "HTTP/1.1", [("Mcp-Session-Id", "session-secret-1"),
                                                  ("Authorization", "Bearer sk-hidden")]),
        response=None if status is None else Response(status, "", "HTTP/1.1", []),
        outcome=outcome,  # type: ignore[arg-type]
        decision=DecisionFacts("allow", "allow", "enforce", ["mcp-tools"]),
        policy_revision="rev-1", timings=Timings(total_us=12_345), extra=extra or {})


def mcp_record(outcome: str = "tool_error") -> AuditRecord:
    return plain_record(extra={"mcp": {
        "method": "tools/call", "id": 7, "tool": "send_email", "resource": None, "protocol_version": "2025-06-18",
        "outcome": outcome, "error": None}})


def refused_record() -> AuditRecord:
    record = plain_record("DELETE", "http://erp.internal/orders/9?token=[REDACTED]", status=423, outcome="refused")
    record.response = Response(423, "Locked", "HTTP/1.1", [], source="bastion")
    record.error = ErrorFacts("lock_conflict", "order 9 is locked by billing-bot")
    record.decision = DecisionFacts("allow", "allow", "enforce", ["erp-writes", "orders-lock"])
    record.locks = [LockFact("order:9", "conflict", rule="orders-lock", holder="billing-bot")]
    record.approval = ApprovalFact("apr-1", "approved", decided_by="alice")
    return record


# --- what a record becomes ---------------------------------------------------------------------------------------

def test_llm_call_attributes_follow_the_genai_conventions() -> None:
    record = llm_record()
    attrs = span_attributes(record)
    assert span_name(record) == "chat gpt-4o-mini"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.response.id"] == "chatcmpl-123"
    assert attrs["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert attrs["gen_ai.usage.input_tokens"] == 1200
    assert attrs["gen_ai.usage.output_tokens"] == 80
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 1024
    assert attrs["gen_ai.usage.cache_creation.input_tokens"] == 0
    assert attrs["gen_ai.usage.reasoning.output_tokens"] == 16
    assert attrs["gen_ai.response.time_to_first_chunk"] == 0.42
    assert attrs["bastion.llm.tools"] == ["send_email", "lookup_order"]
    assert attrs["gen_ai.tool.name"] == "send_email"
    assert attrs["gen_ai.tool.call.id"] == "call_abc"
    assert attrs["gen_ai.agent.name"] == attrs["bastion.agent"] == "support-bot"
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.full"] == "https://api.openai.com/v1/chat/completions"
    assert (attrs["server.address"], attrs["server.port"]) == ("api.openai.com", 443)
    assert not any("ceo@example.com" in str(v) for v in attrs.values())  # tool arguments never leave
    assert error_type(record) is None


def test_mcp_calls_name_the_method_and_tool_and_never_the_session() -> None:
    record = mcp_record("result")
    attrs = span_attributes(record)
    assert span_name(record) == "tools/call send_email"
    assert attrs["mcp.method.name"] == "tools/call"
    assert attrs["mcp.protocol.version"] == "2025-06-18"
    assert attrs["jsonrpc.request.id"] == "7"
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["gen_ai.tool.name"] == "send_email"
    assert "mcp.session.id" not in attrs and "error.type" not in attrs
    assert (attrs["server.address"], attrs["server.port"]) == ("mcp.example.com", 8443)
    assert not any("session-secret-1" in str(v) or "sk-hidden" in str(v) for v in attrs.values())

    read = plain_record(extra={"mcp": {"method": "resources/read", "id": "r-1", "tool": None,
                                       "resource": "file:///srv/report.md", "protocol_version": None,
                                       "outcome": "result", "error": None}})
    assert span_name(read) == "resources/read"
    attrs = span_attributes(read)
    assert attrs["mcp.resource.uri"] == "file:///srv/report.md"
    assert attrs["jsonrpc.request.id"] == "r-1"
    assert "gen_ai.operation.name" not in attrs and "mcp.protocol.version" not in attrs

    failed = plain_record(extra={"mcp": {"method": "tools/call", "id": 8, "tool": "x", "resource": None,
                                         "protocol_version": None, "outcome": "error",
                                         "error": {"code": -32602, "message": "bad params"}}})
    assert error_type(failed) == "-32602"
    assert span_attributes(failed)["rpc.response.status_code"] == "-32602"
    assert error_type(mcp_record("tool_error")) == "tool_error"


def test_refusals_say_why_without_being_errors() -> None:
    record = refused_record()
    attrs = span_attributes(record)
    assert span_name(record) == "DELETE"
    assert error_type(record) is None and "error.type" not in attrs
    assert attrs["bastion.outcome"] == "refused"
    assert attrs["bastion.refusal"] == "lock_conflict"
    assert attrs["bastion.rules"] == ["erp-writes", "orders-lock"]
    assert attrs["bastion.locks"] == ["order:9"]
    assert attrs["bastion.approval.state"] == "approved"
    assert attrs["http.response.status_code"] == 423
    assert (attrs["server.address"], attrs["server.port"]) == ("erp.internal", 80)


@pytest.mark.parametrize(("status", "outcome", "error", "expected"), [
    (502, "forwarded", None, "502"),
    (404, "forwarded", None, None),
    (None, "upstream_error", ErrorFacts("upstream_timeout", "no answer"), "upstream_timeout"),
    (None, "upstream_error", None, "upstream_error"),
    (503, "refused", ErrorFacts("audit_unavailable"), None),
    (None, "client_gone", ErrorFacts("client_gone"), None),
])
def test_failures_are_upstream_errors_and_5xx(status: int | None, outcome: str, error: ErrorFacts | None,
                                              expected: str | None) -> None:
    record = plain_record("GET", "http://127.0.0.1:9/x", status=status, outcome=outcome)
    record.error = error
    assert error_type(record) == expected


def test_an_llm_5xx_reports_the_providers_error_type() -> None:
    record = llm_record()
    assert record.response is not None
    record.response.status = 529
    record.extra["llm"]["error"] = {"type": "overloaded_error", "message": "Overloaded"}
    assert error_type(record) == "overloaded_error"


def test_unknown_methods_and_hostile_extra_stay_bounded() -> None:
    record = plain_record("PROPFIND", "http://u:p@dav.example.com/" + "a" * 10_000, extra={
        "llm": {"provider": ["x"], "operation": "chat", "request_model": "m" * 10_000, "stream": "yes",
                "usage": {"input_tokens": 1 << 80, "output_tokens": -1, "cache_read_tokens": True,
                          "reasoning_tokens": "12"},
                "time_to_first_token_s": math.nan, "tools": ["t"] * 1000 + [None, 3],
                "finish_reasons": "stop", "tool_calls": [None], "response_id": 5},
        "mcp": "not a mapping"})
    attrs = span_attributes(record)
    assert span_name(record) == "chat " + "m" * MAX_TEXT
    assert attrs["http.request.method"] == "_OTHER"
    assert attrs["http.request.method_original"] == "PROPFIND"
    assert "u:p@" not in attrs["url.full"] and len(attrs["url.full"]) == MAX_URL
    assert len(attrs["gen_ai.request.model"]) == MAX_TEXT
    assert len(attrs["bastion.llm.tools"]) == MAX_ITEMS
    for absent in ("gen_ai.provider.name", "gen_ai.request.stream", "gen_ai.usage.input_tokens",
                   "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens",
                   "gen_ai.usage.reasoning.output_tokens", "gen_ai.response.time_to_first_chunk",
                   "gen_ai.response.finish_reasons", "gen_ai.tool.name", "gen_ai.response.id", "mcp.method.name"):
        assert absent not in attrs
    other = plain_record("PROPFIND", "not a url at all")
    assert span_name(other) == "HTTP"
    assert "server.address" not in span_attributes(other)


@pytest.mark.parametrize(("flag", "env", "expected"), [
    ("http://127.0.0.1:4318", {}, "http://127.0.0.1:4318/v1/traces"),
    ("https://otel.example.com/base/", {}, "https://otel.example.com/base/v1/traces"),
    ("http://127.0.0.1:4318/v1/traces", {}, "http://127.0.0.1:4318/v1/traces"),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"},
     "http://t/x"),
    ("http://f:1", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"}, "http://f:1/v1/traces"),
    ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
    ("http://f:1", {"OTEL_TRACES_EXPORTER": "none"}, "http://f:1/v1/traces"),
    ("http://f:1", {"OTEL_SDK_DISABLED": "true"}, None),
    (None, {}, None),
])
def test_where_spans_go(flag: str | None, env: dict[str, str], expected: str | None) -> None:
    settings = tracing_settings(flag, env)
    assert (settings.endpoint if settings else None) == expected


def test_service_name_and_bad_urls() -> None:
    named = tracing_settings("http://c:4318", {"OTEL_SERVICE_NAME": "support-sidecar"})
    assert named == TracingSettings("http://c:4318/v1/traces", "support-sidecar")
    assert tracing_settings("http://c:4318", {"OTEL_SERVICE_NAME": " "}) == TracingSettings("http://c:4318/v1/traces")
    for flag, env, message in [("grpc://c:4317", {}, "--otlp"), ("c:4318", {}, "--otlp"),
                               ("http://c:99999", {}, "--otlp"),
                               (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "nope"}, "OTEL_EXPORTER_OTLP_TRACES"),
                               ("http://c", {"OTEL_SERVICE_NAME": "x" * 300}, "OTEL_SERVICE_NAME")]:
        with pytest.raises(ConfigError, match=message):
            tracing_settings(flag, env)


def test_throttle_lets_one_event_through_per_period() -> None:
    now = [100.0]
    gate = Throttle(60.0, clock=lambda: now[0])
    assert gate.allow()
    assert not gate.allow()
    now[0] += 59.9
    assert not gate.allow()
    now[0] += 0.2
    assert gate.allow()
    assert gate.held_back == 2


# --- through the real exporter -------------------------------------------------------------------------------------

def test_records_become_spans_at_the_collector(receiver: OtlpReceiver) -> None:
    records = [llm_record(), mcp_record("tool_error"), refused_record()]
    tracer = start_tracing(TracingSettings(f"{receiver.base_url}/v1/traces", "bastion-test"), writer_id="w-test")
    for record in records:
        tracer.observe(record)
    assert tracer.close(timeout=10.0)
    spans = receiver.by_request_id()
    assert set(spans) == {r.id for r in records}
    for record in records:
        span = spans[record.id]
        assert span.kind == Span.SpanKind.SPAN_KIND_CLIENT
        assert (span.start_ns, span.end_ns) == (record.started_us * 1000, record.ended_us * 1000)
        assert span.attributes == span_attributes(record)
        assert span.resource["service.name"] == "bastion-test"
        assert span.resource["service.version"] == __version__
        assert span.resource["bastion.writer"] == "w-test"
    llm, mcp, refused = (spans[r.id] for r in records)
    assert llm.name == "chat gpt-4o-mini"
    llm_extra = records[0].extra["llm"]
    assert llm.attributes["gen_ai.request.model"] == llm_extra["request_model"]
    assert llm.attributes["gen_ai.response.model"] == llm_extra["response_model"]
    assert llm.attributes["gen_ai.usage.input_tokens"] == llm_extra["usage"]["input_tokens"]
    assert llm.attributes["gen_ai.usage.output_tokens"] == llm_extra["usage"]["output_tokens"]
    assert llm.attributes["gen_ai.response.finish_reasons"] == llm_extra["finish_reasons"]
    assert llm.attributes["gen_ai.response.time_to_first_chunk"] == llm_extra["time_to_first_token_s"]
    assert llm.status == Status.StatusCode.STATUS_CODE_UNSET
    assert mcp.name == "tools/call send_email"
    assert mcp.status == Status.StatusCode.STATUS_CODE_ERROR and mcp.status_message == "tool_error"
    assert mcp.attributes["error.type"] == "tool_error"
    assert refused.name == "DELETE"
    assert refused.status == Status.StatusCode.STATUS_CODE_UNSET
    assert refused.attributes["bastion.refusal"] == "lock_conflict"


def test_a_record_that_breaks_the_mapping_costs_only_its_span(receiver: OtlpReceiver) -> None:
    broken = plain_record()
    broken.started_us = "yesterday"  # type: ignore[assignment]
    good = plain_record()
    tracer = start_tracing(TracingSettings(f"{receiver.base_url}/v1/traces"), writer_id="w-test")
    tracer.observe(broken)
    tracer.observe(good)
    assert tracer.close(timeout=10.0)
    assert set(receiver.by_request_id()) == {good.id}


async def test_the_writer_hands_over_each_record_redacted_and_survives_a_failing_observer(tmp_path: Path) -> None:
    seen: list[AuditRecord] = []
    url = f"sqlite:///{tmp_path}/audit.db"
    writer = await AuditWriter.open(url, tmp_path / "spool")
    writer.on_record = seen.append
    ids = []
    for seed in range(3):
        record, req, resp = sample_exchange(seed=seed, body_words=20)
        assert writer.submit(record, req, resp)
        ids.append(record.id)
    assert await writer.flush()

    def explode(record: AuditRecord) -> None:
        raise RuntimeError("observer bug")

    writer.on_record = explode
    record, req, resp = sample_exchange(seed=9, body_words=20)
    assert writer.submit(record, req, resp)
    ids.append(record.id)
    assert await writer.flush()
    await writer.close()
    async with open_store(url) as store:
        stored = [rid for rid in ids if await store.get(rid) is not None]
    assert [r.id for r in seen] == ids[:3]
    assert stored == ids  # the failing observer changed nothing for the records
    for seen_record in seen:
        assert seen_record.chain is not None
        authorization = dict(seen_record.request.headers)["Authorization"]
        assert "sk-proj-" not in authorization  # what the tracer sees is what the audit log keeps


# --- the real `bastion serve --otlp` ------------------------------------------------------------------------------

def _serve(tmp_path: Path, bastion_home: Path, certs: CertFiles, otlp: str) -> AbstractContextManager[BastionServer]:
    return run_bastion(tmp_path / "bastion", [PROXY_RULES], home=bastion_home, upstream_ca=certs.ca_cert,
                       extra_args=["--otlp", otlp],
                       env={"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "bastion-e2e"})


def test_serve_sends_a_span_per_exchange(tmp_path: Path, bastion_home: Path, test_certs: CertFiles,
                                         upstream: Upstream, receiver: OtlpReceiver) -> None:
    with _serve(tmp_path, bastion_home, test_certs, receiver.base_url) as server:
        s = server.session(*SUPPORT)
        allowed = s.get(f"{upstream.http_url}/echo/traced?q=1", timeout=10)
        refused = s.get(f"{upstream.http_url}/admin/users", timeout=10)
        assert (allowed.status_code, refused.status_code) == (200, 403)
        span = receiver.wait_for(allowed.headers["X-Bastion-Request-Id"])
        assert span.name == "GET"
        assert span.kind == Span.SpanKind.SPAN_KIND_CLIENT
        assert span.status == Status.StatusCode.STATUS_CODE_UNSET
        attrs = span.attributes
        assert attrs["bastion.agent"] == "support-bot"
        assert attrs["bastion.decision"] == "allow"
        assert attrs["bastion.outcome"] == "forwarded"
        assert attrs["bastion.rules"] == ["local-upstream"]
        assert isinstance(attrs["bastion.policy_revision"], str)
        assert attrs["http.request.method"] == "GET"
        assert attrs["http.response.status_code"] == 200
        assert attrs["url.full"] == f"{upstream.http_url}/echo/traced?q=1"
        assert (attrs["server.address"], attrs["server.port"]) == ("127.0.0.1", int(upstream.http_url.rsplit(":")[-1]))
        assert span.end_ns >= span.start_ns > 0
        assert span.resource["service.name"] == "bastion-e2e"
        assert isinstance(span.resource["bastion.writer"], str)
        denied = receiver.wait_for(refused.headers["X-Bastion-Request-Id"])
        assert denied.attributes["bastion.outcome"] == "refused"
        assert denied.attributes["bastion.decision"] == "deny"
        assert denied.attributes["bastion.refusal"] == json.loads(refused.content)["error"]["type"]
        assert denied.status == Status.StatusCode.STATUS_CODE_UNSET
        assert server.stop() == 0


def test_an_llm_call_through_the_proxy_gets_genai_attributes(tmp_path: Path, bastion_home: Path,
                                                              test_certs: CertFiles, receiver: OtlpReceiver) -> None:
    """The real chain: the openai SDK streams a chat completion through `bastion serve --otlp`; the span the
    collector decodes carries what the upstream reported."""
    import httpx
    import openai
    from support.llm_upstream import OPENAI_USAGE, run_llm_upstream, served

    with run_llm_upstream() as llm, _serve(tmp_path, bastion_home, test_certs, receiver.base_url) as server:
        client = openai.OpenAI(base_url=f"{llm.url}/v1", api_key="sk-test", max_retries=0,
                               http_client=httpx.Client(proxy=server.proxy_url(*SUPPORT), trust_env=False))
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], stream=True,
            stream_options={"include_usage": True})
        assert [c for c in raw.parse()]
        span = receiver.wait_for(raw.headers["x-bastion-request-id"])
    attrs = span.attributes
    assert span.name == "chat gpt-4o-mini"  # {operation} {request model}, as the conventions name it
    assert attrs["gen_ai.provider.name"] == "openai" and attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == served("gpt-4o-mini")
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.usage.input_tokens"] == OPENAI_USAGE["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == OPENAI_USAGE["completion_tokens"]
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == OPENAI_USAGE["prompt_tokens_details"]["cached_tokens"]
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs["gen_ai.response.time_to_first_chunk"] >= 0
    assert attrs["gen_ai.agent.name"] == "support-bot"


def test_a_dead_collector_changes_nothing_for_calls_or_shutdown(tmp_path: Path, bastion_home: Path,
                                                               test_certs: CertFiles, upstream: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with _serve(tmp_path, bastion_home, test_certs, dead) as server:
        s = server.session(*SUPPORT)
        for i in range(5):
            resp = s.get(f"{upstream.http_url}/echo/dead-collector/{i}", timeout=10)
            assert resp.status_code == 200
            time.sleep(0.2)  # several export attempts fail meanwhile
        assert server.stop() == 0
    warnings = [line for line in server.logs().splitlines() if "WARNING bastion.audit: tracing:" in line]
    assert len(warnings) <= 1, warnings  # failures are logged at most once a minute
    assert not [line for line in server.logs().splitlines() if "Traceback" in line]


def test_no_collector_configured_imports_no_opentelemetry() -> None:
    code = ("import sys; import bastion.audit.worker, bastion.audit.client, bastion.proxy.settings; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                         check=True)
    assert out.stdout.strip() == "[]"

