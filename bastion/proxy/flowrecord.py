"""One finished mitmproxy flow -> one `ExchangeSnapshot`: who called, what they sent, what they got back, and
what Bastion decided on the way (policy decision, task locks, approval, times).

The capture stages (`bastion.proxy.capture`) decide when an exchange is finished and how it ended; the
function here only reads the flow and the stages' `flow.metadata` (see `flowmeta`). It runs on the event
loop once per exchange, so it copies references and small values only; turning them into an `AuditRecord`
(decoding, formatting, digesting, redacting, chaining) happens in the audit worker
(`bastion.audit.snapshot.to_record`).

"The request" in a record is what the agent sent: its headers and request target as they arrived (the writer
masks `Proxy-Authorization` and other credentials). When Bastion forwarded a normalized path instead, the
record says so in `extra["forwarded_path"]`.
"""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http

from bastion.audit.snapshot import Body, DecisionTuple, ExchangeSnapshot, ResponseFacts, header_value
from bastion.ids import new_request_id
from bastion.proxy import flowmeta
from bastion.proxy.exchange import Exchange
from bastion.proxy.identity import parse_basic


def identity_of(flow: http.HTTPFlow, exchange: Exchange | None, pinned: str | None) -> tuple[str | None, str,
                                                                                               str | None]:
    """(agent, auth, claimed) from the authenticated channel only. For a refused login, `claimed` is the name
    the credentials gave."""
    agent: str | None = flow.metadata.get(flowmeta.AGENT)
    if pinned is not None:
        return agent or pinned, "pinned", None
    if agent is not None:
        return agent, "basic", None
    if flow.request.method == "CONNECT" or exchange is None:
        header = flow.request.headers.get("proxy-authorization")
    else:
        header = header_value(exchange.fields, b"proxy-authorization") or exchange.tunnel_auth
    if header is None:
        return None, "missing", None
    creds = parse_basic(header)
    return None, "invalid", creds[0] if creds else None


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


def response_facts(resp: http.Response, *, source: str, streamed: bool = False) -> ResponseFacts:
    return ResponseFacts(resp.status_code, resp.reason, resp.http_version, resp.headers.fields, source, streamed)


def snapshot(flow: http.HTTPFlow, exchange: Exchange | None, *, outcome: str, response: ResponseFacts | None,
             error: tuple[str, str] | None, response_body: Body, pinned: str | None,
             ended_us: int) -> ExchangeSnapshot:
    """The snapshot of `flow`. Its request body is the request's content as received (or, for a body streamed to
    the upstream, what the capture's tap kept of it); the capture digests bodies too large to travel whole before
    submitting (`Capture._submit_large`)."""
    meta = flow.metadata
    req = flow.request
    refusal = meta.get(flowmeta.REFUSAL)
    refused = flowmeta.REFUSAL in meta
    # The request left for the upstream (or tried to) unless Bastion answered it; an agent gone while its call
    # was still held never reached the upstream.
    tried = outcome in ("forwarded", "upstream_error") or (
        outcome == "client_gone" and not refused and flow.server_conn.peername is not None)
    upstream = None  # a refused request's connection context may still name an earlier request's upstream
    if not refused:
        upstream = flow.server_conn.peername or meta.get(flowmeta.UPSTREAM_ADDRESS)
    forwarded_path = None
    if exchange is not None and not refused and req.path != exchange.target and req.method != "CONNECT":
        forwarded_path = req.path
    decision = meta.get(flowmeta.DECISION)
    policy = meta.get(flowmeta.POLICY)
    resp = flow.response
    agent, auth, claimed = identity_of(flow, exchange, pinned)
    return ExchangeSnapshot(
        id=meta.get(flowmeta.REQUEST_ID) or new_request_id(),
        outcome=outcome,  # type: ignore[arg-type]
        started=req.timestamp_start,
        ended_us=ended_us,
        request_end=req.timestamp_end,
        decided=exchange.decided if exchange is not None else None,
        response_end=resp.timestamp_end if resp is not None else None,
        agent=agent,
        auth=auth,
        claimed=claimed,
        client=flow.client_conn.peername,
        method=req.method,
        scheme=req.scheme,
        host=req.host,
        port=req.port,
        target=exchange.target if exchange is not None else req.path,
        http_version=req.http_version,
        request_fields=exchange.fields if exchange is not None else req.headers.fields,
        request_body=(exchange.request_tap.finish(complete=req.timestamp_end is not None)
                      if exchange is not None and exchange.request_tap is not None else req.raw_content or None),
        response=response,
        response_body=response_body,
        error=error,
        decision=DecisionTuple.of(decision) if decision is not None else None,
        refusal=refusal,
        locks=tuple(meta.get(flowmeta.LOCK_EVENTS) or ()),
        approval=meta.get(flowmeta.APPROVAL) or None,
        policy_revision=getattr(policy, "revision", None),
        upstream=upstream,
        upstream_tried=tried,
        forwarded_path=forwarded_path,
        extra=_extra(meta),
    )


def _extra(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What the traffic meant (`llm`, `mcp`, `websocket`) and what the fleet stages did (`fleet`)."""
    traffic, fleet = meta.get(flowmeta.TRAFFIC), meta.get(flowmeta.FLEET)
    if not fleet:
        return traffic
    return {**(traffic or {}), "fleet": fleet}
