"""Bastion's own answers to agents: JSON shaped like the common LLM API error, so SDKs show the message.

The body carries both shapes at once: `{"type": "error", "error": {...}}` is what the Anthropic SDK expects,
and `error.message` is what the OpenAI SDK reads. Either way the model sees *why* it was refused and which
rule did it, instead of a generic connection error. Every refusal carries `X-Bastion-Request-Id`, and is
counted in `bastion_refusals_total{type}`.

A refused JSON-RPC request (MCP's streamable HTTP transport) gets a JSON-RPC error response for its `id`
instead: `{"jsonrpc": "2.0", "id": ..., "error": {"code", "message", "type", "data": {type, message, rule,
request_id, ...}}}`. MCP clients read a JSON-RPC error body whatever the HTTP status, so the model sees
Bastion's message instead of "Server returned an error response"; `error.type` stays where LLM SDKs look.
Codes: -32600 for a malformed request (and the code of an `McpProblem`, e.g. -32020 for routing headers that
disagree with the body), -32000 for every other refusal (`error.data.type` tells which).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mitmproxy import http

from bastion.metrics import REFUSALS
from bastion.protocols.mcp import jsonrpc_error_body, jsonrpc_id, may_be_jsonrpc
from bastion.proxy import flowmeta

log = logging.getLogger("bastion.proxy")

# error.type values (README "What the agent sees"), plus the protocol-level refusals of this module.
PROXY_AUTH_REQUIRED = "proxy_auth_required"
POLICY_DENIED = "policy_denied"
AGENT_RETIRED = "agent_retired"
DESTINATION_FORBIDDEN = "destination_forbidden"
APPROVAL_UNAVAILABLE = "approval_unavailable"
STORE_UNAVAILABLE = "store_unavailable"
BAD_REQUEST = "bad_request"
REQUEST_TOO_LARGE = "request_too_large"
HEADERS_TOO_LARGE = "request_header_fields_too_large"
UPSTREAM_UNREACHABLE = "upstream_unreachable"
INTERNAL_ERROR = "internal_error"
AGENT_PAUSED = "agent_paused"
DEPENDENCY_PENDING = "dependency_pending"
BUDGET_EXCEEDED = "budget_exceeded"

_REFUSAL_COUNTERS: dict[str, Any] = {}

JSONRPC_REFUSED = -32000
JSONRPC_INVALID_REQUEST = -32600
_MALFORMED = frozenset({BAD_REQUEST, REQUEST_TOO_LARGE, HEADERS_TOO_LARGE})
_SNIFF_LIMIT = 1 << 20  # bodies larger than this are not parsed to find a JSON-RPC id
_MCP_HINT_HEADERS = (b"mcp-method", b"mcp-protocol-version", b"mcp-session-id")


def error_body(error_type: str, message: str, request_id: str, rule: str | None = None,
               extra: dict[str, Any] | None = None) -> bytes:
    err: dict[str, Any] = {"type": error_type, "message": message, "rule": rule, "request_id": request_id}
    if extra:
        err.update(extra)
    return json.dumps({"type": "error", "error": err}, separators=(",", ":")).encode()


def make_error(
    status: int,
    error_type: str,
    message: str,
    request_id: str,
    *,
    rule: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    jsonrpc: tuple[Any] | None = None,
    jsonrpc_code: int | None = None,
) -> http.Response:
    """A complete JSON error response. `headers` adds to (or overrides) the defaults. `jsonrpc`: `(id,)` to
    answer a JSON-RPC request with a JSON-RPC error for that id (`jsonrpc_code`, or the default code)."""
    fields: dict[str, str] = {
        "content-type": "application/json",
        "cache-control": "no-store",
        flowmeta.REQUEST_ID_HEADER: request_id,
    }
    if headers:
        fields.update(headers)
    if jsonrpc is not None:
        data: dict[str, Any] = {"type": error_type, "message": message, "rule": rule, "request_id": request_id}
        if extra:
            data.update(extra)
        code = jsonrpc_code if jsonrpc_code is not None else (
            JSONRPC_INVALID_REQUEST if error_type in _MALFORMED else JSONRPC_REFUSED)
        return http.Response.make(status, jsonrpc_error_body(jsonrpc[0], code, message, data), fields)
    return http.Response.make(status, error_body(error_type, message, request_id, rule, extra), fields)


def jsonrpc_target(flow: http.HTTPFlow) -> tuple[Any] | None:
    """`(id,)` when `flow` is a JSON-RPC request (id None when unknown: a notification, or a refusal before
    the body was read), else None. The request's facts set `flowmeta.JSONRPC_ID` once known; before that the
    body (if read) or the MCP transport's headers tell."""
    meta = flow.metadata
    if flowmeta.JSONRPC_ID in meta:
        return (meta[flowmeta.JSONRPC_ID],)
    req = flow.request
    body = req.raw_content
    if body and len(body) <= _SNIFF_LIMIT and may_be_jsonrpc(body):
        is_rpc, request_id = jsonrpc_id(body)
        if is_rpc:
            return (request_id,)
    accept = b""
    encoded = False
    for k, v in req.headers.fields:
        name = k.lower()
        if name in _MCP_HINT_HEADERS:
            return (None,)
        if name == b"accept":
            accept += v
        elif name == b"content-encoding" and v.strip().lower() not in (b"", b"identity"):
            encoded = True
    if (not body or encoded) and b"text/event-stream" in accept and b"application/json" in accept:
        return (None,)  # the streamable HTTP transport's Accept, before its body is read (a 407 on `initialize`)
    return None


def count_refusal(error_type: str) -> None:
    """`bastion_refusals_total{type}` += 1."""
    counter = _REFUSAL_COUNTERS.get(error_type)
    if counter is None:
        counter = _REFUSAL_COUNTERS[error_type] = REFUSALS.labels(error_type)
    counter.inc()


def refuse(
    flow: http.HTTPFlow,
    status: int,
    error_type: str,
    message: str,
    *,
    rule: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    jsonrpc_code: int | None = None,
) -> None:
    """Answer `flow` with a Bastion refusal (nothing is forwarded), record it and count it. A JSON-RPC
    request gets a JSON-RPC error response (see the module docstring)."""
    meta = flow.metadata
    request_id = meta.get(flowmeta.REQUEST_ID)
    if request_id is None:  # a refusal before identity ran (should not happen): still give the agent an id
        from bastion.ids import new_request_id

        request_id = meta[flowmeta.REQUEST_ID] = new_request_id()
    flow.response = make_error(status, error_type, message, request_id, rule=rule, extra=extra, headers=headers,
                               jsonrpc=jsonrpc_target(flow), jsonrpc_code=jsonrpc_code)
    meta[flowmeta.REFUSAL] = error_type
    count_refusal(error_type)
    if log.isEnabledFor(logging.INFO):
        req = flow.request
        log.info("refused %s %s %s %s%s: %s (agent=%s request_id=%s)", status, error_type, req.method,
                 req.pretty_host, req.path.partition("?")[0], message, meta.get(flowmeta.AGENT, "-"),
                 request_id)
