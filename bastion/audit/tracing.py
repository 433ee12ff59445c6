"""OpenTelemetry traces of what agents do through Bastion: one CLIENT span per exchange, sent over OTLP/HTTP.

Why the spans are built here, from the audit record, in the audit worker process:
- The record is the one complete account of an exchange (identity, decision, outcome, times, the LLM and MCP
  facts), and the worker has it *after redaction*: a span can never carry a secret the audit log masks. Only a
  fixed list of attributes is taken from it: no headers, no bodies, no tool-call arguments.
- The proxy pays nothing: the worker runs on its own core (`bastion.audit.worker`), and the writer hands each
  record over on its spool thread once the record is spooled (`AuditWriter.on_record`).
- A collector that is slow, down or refusing never gets in the way: spans wait in the SDK's bounded queue
  (`MAX_QUEUE` spans; the newest are dropped when it is full), are exported in batches on the SDK's thread with
  a short timeout, and the last flush at shutdown is given at most `CLOSE_TIMEOUT` seconds. Records are never
  affected by tracing, whatever happens to it.
- With no endpoint configured nothing of OpenTelemetry is imported (`start_tracing` is never called), so the
  worker starts as fast as before.

Names and attributes follow the OpenTelemetry semantic conventions: HTTP client spans (`GET`), GenAI inference
spans (`chat gpt-4o-mini`, `gen_ai.*`) and MCP client spans (`tools/call send_email`, `mcp.*`), plus Bastion's
own facts under `bastion.*`. Every value is bounded (`MAX_TEXT`, `MAX_URL`, `MAX_ITEMS`, int64) because model
names, finish reasons and ids come from upstreams Bastion does not trust.

Problems (export failures, a full queue, a record a span cannot be built from) are logged at most once every
`LOG_EVERY` seconds, the SDK's own warnings included.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from bastion.audit.record import AuditRecord

log = logging.getLogger("bastion.audit")

DEFAULT_SERVICE_NAME = "bastion"
TRACES_PATH = "/v1/traces"
"""The OTLP/HTTP path for traces, appended to a collector's base URL."""
EXPORT_TIMEOUT = 5.0
"""Seconds one export request (with the SDK's retries) may take."""
MAX_QUEUE = 2048
"""Spans waiting for export; beyond this the newest are dropped."""
MAX_EXPORT_BATCH = 512
CLOSE_TIMEOUT = 2.0
"""Seconds the worker's exit waits for the last spans to reach the collector."""
LOG_EVERY = 60.0
"""Seconds between two log lines about tracing problems."""
MAX_TEXT = 256
MAX_URL = 2048
MAX_ITEMS = 64
_INT64_MAX = (1 << 63) - 1

_HTTP_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_USAGE_ATTRIBUTES = (
    ("input_tokens", "gen_ai.usage.input_tokens"),
    ("output_tokens", "gen_ai.usage.output_tokens"),
    ("cache_read_tokens", "gen_ai.usage.cache_read.input_tokens"),
    ("cache_creation_tokens", "gen_ai.usage.cache_creation.input_tokens"),
    ("reasoning_tokens", "gen_ai.usage.reasoning.output_tokens"),
)

AttributeValue = str | bool | int | float | list[str]


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Where spans go: `endpoint` is the full OTLP/HTTP traces URL (used as is)."""

    endpoint: str
    service_name: str = DEFAULT_SERVICE_NAME


# --- bounded readers: every value of `extra` may be missing, of the wrong type or too large ---------------------

def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value[:limit]


def _texts(value: Any) -> list[str] | None:
    if not isinstance(value, list | tuple):
        return None
    out = [text for text in (_text(v) for v in value[:MAX_ITEMS]) if text is not None]
    return out or None


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
        return None
    return value


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _section(extra: Any, key: str) -> Mapping[str, Any] | None:
    value = extra.get(key) if isinstance(extra, Mapping) else None
    return value if isinstance(value, Mapping) else None


def _put(attrs: dict[str, AttributeValue], key: str, value: AttributeValue | None) -> None:
    if value is not None:
        attrs[key] = value


def _without_userinfo(url: str) -> str:
    """`url` without `user:password@`: credentials never go into a span or a log line."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


# --- what a record becomes -----------------------------------------------------------------------------------------

def http_method(method: Any) -> str:
    """`http.request.method`: a known method as it is, anything else "_OTHER" (HTTP semantic conventions)."""
    return method if isinstance(method, str) and method in _HTTP_METHODS else "_OTHER"


def span_name(record: AuditRecord) -> str:
    """`{operation} {model}` for LLM calls, `{method} {tool}` (or the method) for MCP, else the HTTP method."""
    llm = _section(record.extra, "llm")
    if llm is not None:
        operation = _text(llm.get("operation"))
        model = _text(llm.get("request_model")) or _text(llm.get("model"))
        if operation:
            return f"{operation} {model}" if model else operation
    mcp = _section(record.extra, "mcp")
    if mcp is not None:
        method = _text(mcp.get("method"))
        if method:
            tool = _text(mcp.get("tool"))
            return f"{method} {tool}" if tool else method
    method = http_method(record.request.method)
    return "HTTP" if method == "_OTHER" else method


def error_type(record: AuditRecord) -> str | None:
    """The span's `error.type`, and whether its status is ERROR (None: UNSET).

    Failed: the upstream could not be reached or broke off, answered 5xx, or an MCP call ended in a JSON-RPC
    error (its code) or a tool error. A refusal is Bastion doing its job, not a failure: its span stays UNSET
    and `bastion.refusal` says why.
    """
    if record.outcome == "refused":
        return None
    if record.outcome == "upstream_error":
        return (_text(record.error.type) if record.error is not None else None) or "upstream_error"
    mcp = _section(record.extra, "mcp")
    if mcp is not None:
        outcome = mcp.get("outcome")
        if outcome == "tool_error":
            return "tool_error"
        if outcome == "error":
            error = mcp.get("error")
            code = error.get("code") if isinstance(error, Mapping) else None
            return str(code) if isinstance(code, int) and not isinstance(code, bool) else "error"
    status = record.status
    if isinstance(status, int) and status >= 500:
        llm = _section(record.extra, "llm")
        llm_error = llm.get("error") if llm is not None else None
        return (_text(llm_error.get("type")) if isinstance(llm_error, Mapping) else None) or str(status)
    return None


def span_attributes(record: AuditRecord) -> dict[str, AttributeValue]:
    """The span's attributes: HTTP, `bastion.*`, then the MCP and LLM facts of `extra` when present."""
    attrs: dict[str, AttributeValue] = {}
    _http_attributes(attrs, record)
    _bastion_attributes(attrs, record)
    mcp = _section(record.extra, "mcp")
    if mcp is not None:
        _mcp_attributes(attrs, mcp)
    llm = _section(record.extra, "llm")
    if llm is not None:
        _llm_attributes(attrs, llm)
    _put(attrs, "error.type", error_type(record))
    return attrs


def _http_attributes(attrs: dict[str, AttributeValue], record: AuditRecord) -> None:
    method = http_method(record.request.method)
    attrs["http.request.method"] = method
    if method == "_OTHER":
        _put(attrs, "http.request.method_original", _text(record.request.method))
    url = record.request.url if isinstance(record.request.url, str) else ""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        full = _without_userinfo(url)
    except ValueError:  # not a URL: keep what can be kept
        host, port, full = None, None, ""
    _put(attrs, "url.full", _text(full, MAX_URL))
    _put(attrs, "server.address", _text(host))
    _put(attrs, "server.port", port)
    if record.response is not None:
        _put(attrs, "http.response.status_code", _count(record.response.status))


def _bastion_attributes(attrs: dict[str, AttributeValue], record: AuditRecord) -> None:
    attrs["bastion.request_id"] = record.id
    agent = _text(record.identity.agent)
    _put(attrs, "bastion.agent", agent)
    _put(attrs, "gen_ai.agent.name", agent)
    _put(attrs, "bastion.outcome", _text(record.outcome))
    if record.decision is not None:
        _put(attrs, "bastion.decision", _text(record.decision.effect))
        _put(attrs, "bastion.rules", _texts(record.decision.rules))
    if record.outcome == "refused" and record.error is not None:
        _put(attrs, "bastion.refusal", _text(record.error.type))
    _put(attrs, "bastion.policy_revision", _text(record.policy_revision))
    if record.approval is not None:
        _put(attrs, "bastion.approval.state", _text(record.approval.state))
    if record.locks:
        _put(attrs, "bastion.locks", _texts([lock.key for lock in record.locks[:MAX_ITEMS]]))


def _mcp_attributes(attrs: dict[str, AttributeValue], mcp: Mapping[str, Any]) -> None:
    method = _text(mcp.get("method"))
    _put(attrs, "mcp.method.name", method)
    _put(attrs, "mcp.protocol.version", _text(mcp.get("protocol_version")))
    request_id = mcp.get("id")
    if isinstance(request_id, str | int) and not isinstance(request_id, bool):
        _put(attrs, "jsonrpc.request.id", _text(str(request_id)))
    if method == "tools/call":
        attrs["gen_ai.operation.name"] = "execute_tool"
        _put(attrs, "gen_ai.tool.name", _text(mcp.get("tool")))
    elif method == "resources/read":
        _put(attrs, "mcp.resource.uri", _text(mcp.get("resource"), MAX_URL))
    error = mcp.get("error")
    if mcp.get("outcome") == "error" and isinstance(error, Mapping):
        code = error.get("code")
        if isinstance(code, int) and not isinstance(code, bool):
            attrs["rpc.response.status_code"] = str(code)


def _llm_attributes(attrs: dict[str, AttributeValue], llm: Mapping[str, Any]) -> None:
    _put(attrs, "gen_ai.provider.name", _text(llm.get("provider")))
    _put(attrs, "gen_ai.operation.name", _text(llm.get("operation")))
    _put(attrs, "gen_ai.request.model", _text(llm.get("request_model")))
    _put(attrs, "gen_ai.response.model", _text(llm.get("response_model")))
    stream = llm.get("stream")
    if isinstance(stream, bool):
        attrs["gen_ai.request.stream"] = stream
    _put(attrs, "gen_ai.response.id", _text(llm.get("response_id")))
    _put(attrs, "gen_ai.response.finish_reasons", _texts(llm.get("finish_reasons")))
    usage = llm.get("usage")
    if isinstance(usage, Mapping):
        for key, attribute in _USAGE_ATTRIBUTES:
            _put(attrs, attribute, _count(usage.get(key)))
    _put(attrs, "gen_ai.response.time_to_first_chunk", _seconds(llm.get("time_to_first_token_s")))
    _put(attrs, "bastion.llm.tools", _texts(llm.get("tools")))
    calls = llm.get("tool_calls")
    first = calls[0] if isinstance(calls, list | tuple) and calls else None
    if isinstance(first, Mapping):  # its arguments are the agent's data: never exported
        _put(attrs, "gen_ai.tool.name", _text(first.get("name")))
        _put(attrs, "gen_ai.tool.call.id", _text(first.get("id")))


# --- logging: at most one line per LOG_EVERY seconds ------------------------------------------------------------

class Throttle:
    """Lets one event through per `every` seconds (thread-safe); counts the ones it held back."""

    def __init__(self, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._next = -math.inf
        self._lock = threading.Lock()
        self.held_back = 0

    def allow(self) -> bool:
        now = self._clock()
        with self._lock:
            if now < self._next:
                self.held_back += 1
                return False
            self._next = now + self._every
            return True


_GATE = Throttle()


def report(message: str, *args: Any) -> None:
    """Log a tracing problem, unless one was logged less than `LOG_EVERY` seconds ago."""
    if _GATE.allow():
        log.warning("tracing: " + message + " (tracing problems are logged at most once every %gs)",
                    *args, LOG_EVERY)


class _SdkLogForwarder(logging.Handler):
    """The OpenTelemetry SDK warns once per failed batch and once per dropped span; Bastion passes its warnings
    on through the same once-a-minute gate as its own."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string in a library must not break the export thread
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            message = f"{message}: {record.exc_info[1]}"
        report("%s; spans are dropped while this lasts", message[:1000])


_forwarder_lock = threading.Lock()
_forwarder: _SdkLogForwarder | None = None


def _route_sdk_logs() -> None:
    global _forwarder
    with _forwarder_lock:
        if _forwarder is None:
            _forwarder = _SdkLogForwarder()
            sdk_log = logging.getLogger("opentelemetry")
            sdk_log.addHandler(_forwarder)
            sdk_log.propagate = False


# --- the tracer --------------------------------------------------------------------------------------------------

class RecordTracer:
    """Turns finished audit records into spans (`observe`, from any thread) until `close`."""

    def __init__(self, provider: Any, settings: TracingSettings) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._provider = provider
        self._tracer = provider.get_tracer("bastion.audit")
        self._client_kind = SpanKind.CLIENT
        self._error = lambda description: Status(StatusCode.ERROR, description)
        self.endpoint = _without_userinfo(settings.endpoint)

    def observe(self, record: AuditRecord) -> None:
        """Queue the span of one record. Never raises; never blocks (a full queue drops the span)."""
        try:
            start_ns = int(record.started_us) * 1000
            end_ns = max(int(record.ended_us) * 1000, start_ns)
            span = self._tracer.start_span(span_name(record), kind=self._client_kind,
                                           attributes=span_attributes(record), start_time=start_ns)
            failure = error_type(record)
            if failure is not None:
                span.set_status(self._error(failure))
            span.end(end_time=end_ns)
        except Exception as e:
            report("no span for record %s: %s", getattr(record, "id", "?"), e or type(e).__name__)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Export what is queued, waiting at most `timeout` seconds; True when that finished in time.

        The SDK's shutdown may wait much longer for a dead collector, so it runs on a daemon thread that
        the process does not wait for when it exits.
        """
        done = threading.Event()

        def shut_down() -> None:
            try:
                self._provider.shutdown()
            except Exception as e:
                report("error while sending the last spans to %s: %s", self.endpoint, e or type(e).__name__)
            finally:
                done.set()

        threading.Thread(target=shut_down, name="bastion-tracing-close", daemon=True).start()
        if done.wait(timeout):
            return True
        report("the last spans did not reach %s within %gs; they are dropped", self.endpoint, timeout)
        return False


def start_tracing(settings: TracingSettings, *, writer_id: str, version: str | None = None,
                  exporter: Any = None) -> RecordTracer:
    """A tracer exporting to `settings.endpoint` (or to `exporter`, an OpenTelemetry `SpanExporter`).

    The resource names the service (`OTEL_SERVICE_NAME` or "bastion"), Bastion's version and this writer
    (`bastion.writer`); `OTEL_RESOURCE_ATTRIBUTES` adds to it, and the OTLP exporter reads its usual variables
    (`OTEL_EXPORTER_OTLP_HEADERS`, `..._CERTIFICATE`, `..._COMPRESSION`). Raises ImportError when the
    OpenTelemetry packages are missing.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from bastion import __version__

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.endpoint, timeout=EXPORT_TIMEOUT)
    _route_sdk_logs()
    resource = Resource.create({"service.name": settings.service_name, "service.version": version or __version__,
                                "bastion.writer": writer_id})
    # No exit hook: the SDK's would wait up to 30 s for a dead collector; `RecordTracer.close` bounds it.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=MAX_QUEUE,
                                                   max_export_batch_size=MAX_EXPORT_BATCH))
    return RecordTracer(provider, settings)
