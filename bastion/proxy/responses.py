"""Bastion's own answers to agents: JSON shaped like the common LLM API error, so SDKs show the message.

The body carries both shapes at once: `{"type": "error", "error": {...}}` is what the Anthropic SDK expects,
and `error.message` is what the OpenAI SDK reads. Either way the model sees *why* it was refused and which
rule did it, instead of a generic connection error. Every refusal carries `X-Bastion-Request-Id`, and is
counted in `bastion_refusals_total{type}`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mitmproxy import http

from bastion.metrics import REFUSALS
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

_REFUSAL_COUNTERS: dict[str, Any] = {}


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
) -> http.Response:
    """A complete JSON error response. `headers` adds to (or overrides) the defaults."""
    fields: dict[str, str] = {
        "content-type": "application/json",
        "cache-control": "no-store",
        flowmeta.REQUEST_ID_HEADER: request_id,
    }
    if headers:
        fields.update(headers)
    return http.Response.make(status, error_body(error_type, message, request_id, rule, extra), fields)


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
) -> None:
    """Answer `flow` with a Bastion refusal (nothing is forwarded), record it and count it."""
    meta = flow.metadata
    request_id = meta.get(flowmeta.REQUEST_ID)
    if request_id is None:  # a refusal before identity ran (should not happen): still give the agent an id
        from bastion.ids import new_request_id

        request_id = meta[flowmeta.REQUEST_ID] = new_request_id()
    flow.response = make_error(status, error_type, message, request_id, rule=rule, extra=extra, headers=headers)
    meta[flowmeta.REFUSAL] = error_type
    count_refusal(error_type)
    if log.isEnabledFor(logging.INFO):
        req = flow.request
        log.info("refused %s %s %s %s%s: %s (agent=%s request_id=%s)", status, error_type, req.method,
                 req.pretty_host, req.path.partition("?")[0], message, meta.get(flowmeta.AGENT, "-"),
                 request_id)
