"""One finished mitmproxy flow -> one `AuditRecord`: who called, what they sent, what they got back, and what
Bastion decided on the way (policy decision, task locks, approval, timings).

The capture addon (`bastion.proxy.capture`) decides when an exchange is finished and how it ended; the
functions here only read the flow and the stages' `flow.metadata` (see `flowmeta`). They run on the event loop
once per exchange, so they copy references and small values only: body decoding, redaction and the hash chain
happen later, on the audit writer's thread.

"The request" in a record is what the agent sent: its headers and request target as they arrived (the writer
masks `Proxy-Authorization` and other credentials). When Bastion forwarded a normalized path instead, the
record says so in `extra["forwarded_path"]`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from mitmproxy import http

from bastion.audit.record import (
    ApprovalFact,
    AuditRecord,
    DecisionFacts,
    ErrorFacts,
    Header,
    Identity,
    LockFact,
    Outcome,
    Request,
    Response,
    Timings,
)
from bastion.ids import new_request_id
from bastion.proxy import flowmeta
from bastion.proxy.exchange import Exchange, HeaderFields
from bastion.proxy.identity import parse_basic


def _text(raw: bytes) -> str:
    """Header bytes as text: UTF-8 when valid, else Latin-1 (lossless; JSON cannot hold lone surrogates)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def header_list(fields: HeaderFields) -> list[Header]:
    return [(_text(k), _text(v)) for k, v in fields]


def header_value(fields: HeaderFields, name: bytes) -> str | None:
    """First value of header `name` (lower-case bytes) in `fields`."""
    n = len(name)
    for k, v in fields:
        if len(k) == n and k.lower() == name:
            return _text(v)
    return None


def address(peer: Any) -> str | None:
    """`ip:port` (`[v6]:port`) of a socket address tuple."""
    if not peer:
        return None
    host, port = str(peer[0]), peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _authority(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    if (scheme, port) in (("http", 80), ("https", 443)):
        return shown
    return f"{shown}:{port}"


def request_url(req: http.Request, target: str) -> str:
    """The URL the agent asked for. A CONNECT names no URL, only an authority: `//host:port` (RFC 3986's
    network-path form) keeps the host readable to URL parsers, listings and the `host` search column."""
    if req.method == "CONNECT":
        host = f"[{req.host}]" if ":" in req.host else req.host
        return f"//{host}:{req.port}"
    return f"{req.scheme}://{_authority(req.scheme, req.host, req.port)}{'' if target == '*' else target}"


def identity_of(flow: http.HTTPFlow, exchange: Exchange | None, pinned: str | None) -> Identity:
    """From the authenticated channel only. For a refused login, `claimed` is the name the credentials gave."""
    meta = flow.metadata
    client = address(flow.client_conn.peername) or ""
    agent: str | None = meta.get(flowmeta.AGENT)
    if pinned is not None:
        return Identity(agent or pinned, "pinned", client)
    if agent is not None:
        return Identity(agent, "basic", client)
    if flow.request.method == "CONNECT" or exchange is None:
        header = flow.request.headers.get("proxy-authorization")
    else:
        header = header_value(exchange.fields, b"proxy-authorization") or exchange.tunnel_auth
    if header is None:
        return Identity(None, "missing", client)
    creds = parse_basic(header)
    return Identity(None, "invalid", client, claimed=creds[0] if creds else None)


def refusal_message(resp: http.Response | None) -> str:
    """`error.message` of Bastion's own JSON refusal body (see `bastion.proxy.responses`)."""
    raw = resp.raw_content if resp is not None else None
    if not raw:
        return ""
    try:
        body = json.loads(raw)
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return message if isinstance(message, str) else ""


def decision_of(meta: Mapping[str, Any], refusal: str | None, message: str) -> DecisionFacts | None:
    """The policy's decision; for a call refused before the rules ran (407, a retired agent, a malformed
    request) a deny whose `reason` is the refusal's `error.type`, so such calls list with the other denials."""
    decision = meta.get(flowmeta.DECISION)
    if decision is not None:
        return DecisionFacts.from_decision(decision)
    if refusal is None:
        return None
    return DecisionFacts("deny", "deny", "enforce", [], refusal, message or None)


def _epoch_us(iso: Any) -> int | None:
    if not isinstance(iso, str):
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1_000_000)
    except ValueError:
        return None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def lock_facts(meta: Mapping[str, Any]) -> list[LockFact]:
    """The lock stage's events (`flowmeta.LOCK_EVENTS`), in order: the action is the event name."""
    out = []
    for event in meta.get(flowmeta.LOCK_EVENTS) or ():
        fence = event.get("fence")
        out.append(LockFact(
            key=str(event.get("key", "")), action=str(event.get("event", "")), rule=_opt_str(event.get("rule")),
            holder=_opt_str(event.get("holder")), fence=fence if isinstance(fence, int) else None,
            expires_us=_epoch_us(event.get("expires_at"))))
    return out


def approval_fact(meta: Mapping[str, Any]) -> ApprovalFact | None:
    approval = meta.get(flowmeta.APPROVAL)
    if not approval:
        return None
    waited = approval.get("waited_s")
    return ApprovalFact(
        id=str(approval.get("id", "")), state=str(approval.get("state", "pending")),
        decided_by=_opt_str(approval.get("decided_by")), note=_opt_str(approval.get("note")),
        waited_us=int(waited * 1_000_000) if isinstance(waited, (int, float)) else 0)


def response_of(resp: http.Response, *, source: str, streamed: bool = False) -> Response:
    return Response(status=resp.status_code, reason=resp.reason, http_version=resp.http_version,
                    headers=header_list(resp.headers.fields), source=source,  # type: ignore[arg-type]
                    streamed=streamed)


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def build(flow: http.HTTPFlow, exchange: Exchange | None, *, outcome: Outcome, response: Response | None,
          error: ErrorFacts | None, pinned: str | None, ended_us: int) -> AuditRecord:
    """The record of `flow`, bodies not yet attached (they go to `AuditWriter.submit` beside it)."""
    meta = flow.metadata
    req = flow.request
    started = req.timestamp_start
    started_us = _us(started)
    target = exchange.target if exchange is not None else req.path
    fields = exchange.fields if exchange is not None else req.headers.fields

    decided = exchange.decided if exchange is not None else None
    decision_us = upstream_us = None
    if decided is not None and req.timestamp_end is not None:
        decision_us = max(0, _us(decided - req.timestamp_end))
    refused = flowmeta.REFUSAL in meta
    # Upstream time: from the moment the request left (all stages done) to the last byte from upstream, for
    # requests that went out (or tried to); an agent gone while its call was still held never reached it.
    sent = outcome in ("forwarded", "upstream_error") or (
        outcome == "client_gone" and not refused and flow.server_conn.peername is not None)
    if decided is not None and sent:
        resp = flow.response
        done = resp.timestamp_end if outcome == "forwarded" and resp is not None else None
        upstream_us = max(0, (_us(done) if done else ended_us) - _us(decided))

    extra: dict[str, Any] = {}
    if exchange is not None and not refused and req.path != exchange.target and req.method != "CONNECT":
        extra["forwarded_path"] = req.path
    policy = meta.get(flowmeta.POLICY)
    upstream = None  # a refused request's connection context may still name an earlier request's upstream
    if not refused:
        upstream = address(flow.server_conn.peername) or address(meta.get(flowmeta.UPSTREAM_ADDRESS))
    refusal = meta.get(flowmeta.REFUSAL)

    return AuditRecord(
        id=meta.get(flowmeta.REQUEST_ID) or new_request_id(),
        started_us=started_us,
        ended_us=max(ended_us, started_us),
        identity=identity_of(flow, exchange, pinned),
        request=Request(req.method, request_url(req, target), req.http_version, header_list(fields)),
        outcome=outcome,
        timings=Timings(max(0, ended_us - started_us), decision_us, upstream_us),
        response=response,
        error=error,
        decision=decision_of(meta, refusal, error.message if error is not None and error.type == refusal else ""),
        locks=lock_facts(meta),
        approval=approval_fact(meta),
        policy_revision=getattr(policy, "revision", None),
        upstream=upstream,
        extra=extra,
    )
