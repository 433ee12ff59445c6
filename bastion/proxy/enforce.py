"""Enforcement: request facts -> policy decision -> refuse, or forward exactly what the rules saw.

Runs in the `request` hook, i.e. after TLS interception and with the whole body read, so a denial is a normal
HTTP response the agent's SDK can read (a refusal at CONNECT only shows up as a connection error), and rules
may look at the JSON body. The body is parsed only if a rule asks for it (lazily, inside the engine).

What gets forwarded is `facts.forward_target`: the normalized path (dot segments resolved, `//` merged), so
`/public/../admin` is matched *and* forwarded as `/admin`, and no upstream can be tricked into serving a path
the rules never saw. For the same reason the `Host` header (or `:authority`) must name the host the request
goes to: a request to one host that claims another (domain fronting) is refused.

A decision that needs more than "forward" (a hold, a task lock) is recorded as an obligation on the flow; the
addons that can meet it (approvals, locks) remove it, and the gate refuses whatever is left.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http
from mitmproxy.net.http.url import parse_authority

from bastion.metrics import DECISION_SECONDS
from bastion.policy.decision import Decision
from bastion.policy.facts import DEFAULT_BODY_LIMIT, EvalError, FactsError, RequestFacts, canonical_host
from bastion.protocols.mcp import McpProblem
from bastion.proxy import flowmeta, responses
from bastion.proxy.httplimits import BodyLimit
from bastion.proxy.settings import MAX_HEADER_BYTES, MAX_REQUEST_BODY, STREAM_REQUEST_ABOVE

log = logging.getLogger("bastion.proxy")


def facts_headers(fields: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
    """Header fields -> {lower-case name: value}; repeated headers joined with ", " (as the engine expects)."""
    out: dict[str, str] = {}
    for k, v in fields:
        name = k.decode("latin-1").lower()
        value = v.decode("utf-8", "surrogateescape")
        prev = out.get(name)
        out[name] = value if prev is None else f"{prev}, {value}"
    return out


def drop_h2c_upgrade(headers: http.Headers, seen: dict[str, str]) -> None:
    """Remove an `Upgrade: h2c` offer (and its companions) from the request and from what the rules see.
    mitmproxy speaks HTTP/2 only over TLS; a server accepting the upgrade would break the connection."""
    names = (b"upgrade", b"connection", b"http2-settings")
    headers.fields = tuple((k, v) for k, v in headers.fields if k.lower() not in names)
    for name in ("upgrade", "connection", "http2-settings"):
        seen.pop(name, None)


def drop_websocket_extensions(headers: http.Headers, seen: dict[str, str]) -> None:
    """Remove the agent's `Sec-WebSocket-Extensions` offer, so that no extension (permessage-deflate) is
    negotiated: a compressed message is inflated whole by the proxy before any rule sees it, and a megabyte on
    the wire can inflate to gigabytes. Without the offer both sides speak plain frames."""
    if "sec-websocket-extensions" in seen:
        headers.fields = tuple((k, v) for k, v in headers.fields if k.lower() != b"sec-websocket-extensions")
        seen.pop("sec-websocket-extensions", None)


def host_header_matches(host_header: str, raw_host: str, port: int, facts: RequestFacts) -> bool:
    """Does the Host header / :authority name the host (and port, if given) the request is sent to?"""
    if host_header.startswith(raw_host):  # the usual case, without parsing: "host" or "host:port"
        rest = host_header[len(raw_host):]
        if not rest or rest == f":{port}":
            return True
    try:
        host, given_port = parse_authority(host_header, check=True)
        return canonical_host(host) == facts.host and (given_port is None or given_port == facts.port)
    except (ValueError, FactsError):
        return False


class Enforce:
    """mitmproxy addon: evaluates the policy for each agent request and enforces the decision."""

    def __init__(
        self,
        *,
        max_request_body: int = MAX_REQUEST_BODY,
        max_header_bytes: int = MAX_HEADER_BYTES,
        json_body_limit: int = DEFAULT_BODY_LIMIT,
    ) -> None:
        self.max_request_body = max_request_body
        self.max_header_bytes = max_header_bytes
        self.json_body_limit = json_body_limit
        self._body_limit = BodyLimit(max_request_body, self._too_large)
        self._stream_above = max(json_body_limit, STREAM_REQUEST_ABOVE)

    # -- hooks ----------------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse what is too big before the body is read into memory for the rules."""
        if flow.response is not None:
            return
        size = 0
        length = None
        for k, v in flow.request.headers.fields:
            size += len(k) + len(v) + 4
            if length is None and len(k) == 14 and k.lower() == b"content-length":
                length = v
        if size > self.max_header_bytes:
            responses.refuse(flow, 431, responses.HEADERS_TOO_LARGE,
                             f"Request headers are {size} bytes; Bastion accepts at most {self.max_header_bytes}.",
                             headers={"connection": "close"})
            return
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n > self.max_request_body:
                self._too_large(flow, n)
                return
        # A body without a length (chunked, HTTP/2) is counted while it arrives and refused at the limit.
        flow.metadata[flowmeta.BODY_LIMIT] = self._body_limit
        if (length is not None and n > self._stream_above and flow.request.method != "CONNECT"
                and "transfer-encoding" not in flow.request.headers):  # both framings: mitmproxy refuses it
            self._decide_before_body(flow)

    def _decide_before_body(self, flow: http.HTTPFlow) -> None:
        """Decide a large body's request before its body arrives, so that it can be streamed.

        Exact, not a guess: JSON conditions and `{json.*}` templates never read a body over the JSON limit
        (they fail closed, as for a missing body), so the rules give the same answer with or without it. Only
        a plain allow is taken early (a hold binds the body into its approval, a lock may be taken on it);
        anything else is decided again, as usual, once the body is read."""
        try:
            if self._decide(flow, early=True):
                flow.metadata[flowmeta.DECIDED_EARLY] = True
        except Exception:
            log.exception("policy enforcement failed (request_id=%s)", flow.metadata.get(flowmeta.REQUEST_ID))
            if flow.response is None:
                responses.refuse(flow, 500, responses.INTERNAL_ERROR,
                                 "Bastion could not evaluate this request; it was not forwarded.")

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flowmeta.DECISION in flow.metadata:  # refused, or decided early
            return
        try:
            self._decide(flow)
        except Exception:  # never forward a request whose decision failed
            log.exception("policy enforcement failed (request_id=%s)", flow.metadata.get(flowmeta.REQUEST_ID))
            if flow.response is None:
                responses.refuse(flow, 500, responses.INTERNAL_ERROR,
                                 "Bastion could not evaluate this request; it was not forwarded.")

    # -- the decision ---------------------------------------------------------------------------------------

    def _decide(self, flow: http.HTTPFlow, *, early: bool = False) -> bool:
        """Decide and enforce; True when a decision was taken. `early`: at `requestheaders`, without the
        body; only a plain allow is taken then (nothing is recorded or counted otherwise)."""
        meta = flow.metadata
        agent: str = meta[flowmeta.AGENT]
        policy = meta[flowmeta.POLICY]
        req = flow.request
        body = req.raw_content
        if body is not None and len(body) > self.max_request_body:  # chunked uploads have no length upfront
            self._too_large(flow, len(body))
            return True
        if req.method == "PRI":  # an HTTP/2 connection preface in cleartext: never a request to forward
            responses.refuse(flow, 400, responses.BAD_REQUEST,
                             "HTTP/2 without TLS (prior knowledge) is not supported; use https:// for HTTP/2.")
            return True
        raw_path, _, raw_query = req.path.partition("?")
        headers = facts_headers(req.headers.fields)
        if headers.get("upgrade", "").lower() == "h2c":  # cleartext HTTP/2 upgrade: neither side may switch
            drop_h2c_upgrade(req.headers, headers)
        scheme = req.scheme
        if headers.get("upgrade", "").lower() == "websocket":
            scheme = "wss" if scheme == "https" else "ws"
            drop_websocket_extensions(req.headers, headers)
        try:
            facts = RequestFacts.build(
                method=req.method, scheme=scheme, host=req.host, port=req.port, raw_path=raw_path,
                raw_query=raw_query, headers=headers, body=body, body_limit=self.json_body_limit,
                normalize=policy.normalize,
            )
        except FactsError as e:
            responses.refuse(flow, 400, responses.BAD_REQUEST, f"Malformed request: {e}.")
            return True
        host_header = req.host_header
        if host_header is not None and not host_header_matches(host_header, req.host, req.port, facts):
            responses.refuse(flow, 400, responses.BAD_REQUEST,
                             f"The Host header {host_header!r} does not name the host this request goes to "
                             f"({facts.host}:{facts.port}).")
            return True

        if self._refused_jsonrpc(flow, facts):
            return True

        started = time.perf_counter()
        decision = policy.evaluate(facts, agent)
        if early and (decision.effect != "allow" or decision.locks or decision.releases or decision.budgets):
            return False
        DECISION_SECONDS.observe(time.perf_counter() - started)
        meta[flowmeta.FACTS] = facts
        meta[flowmeta.DECISION] = decision

        if decision.mode == "report" and decision.would_effect != "allow":
            log.info("report mode: would %s %s %s://%s:%d%s (agent=%s rule=%s reason=%s request_id=%s)",
                     decision.would_effect, facts.method, facts.scheme, facts.host, facts.port, facts.path,
                     agent, decision.rule, decision.reason, meta[flowmeta.REQUEST_ID])
        if decision.effect == "deny":
            self._deny(flow, facts, decision)
            return True
        obligations = set()
        if decision.effect == "hold":
            obligations.add(flowmeta.OBLIGATION_APPROVAL)
        if decision.locks or decision.releases:
            obligations.add(flowmeta.OBLIGATION_LOCK)
        if decision.requires:
            obligations.add(flowmeta.OBLIGATION_MILESTONE)
        if decision.budgets:
            obligations.add(flowmeta.OBLIGATION_BUDGET)
        if obligations:
            meta[flowmeta.OBLIGATIONS] = obligations
        if facts.forward_target != req.path:
            req.path = facts.forward_target
        return True

    @staticmethod
    def _refused_jsonrpc(flow: http.HTTPFlow, facts: RequestFacts) -> bool:
        """Refuse (400) a JSON-RPC message no rule could judge safely: a batch holding a call, duplicate keys,
        routing headers (`Mcp-Method`, `Mcp-Name`) that disagree with the body. Otherwise note the message's
        id, so that any refusal answers it as a JSON-RPC error."""
        try:
            call = facts.mcp()
        except McpProblem as e:
            responses.refuse(flow, 400, responses.BAD_REQUEST, str(e), jsonrpc_code=e.code)
            return True
        except EvalError:  # the body is not available (decided early, or too large): `mcp` conditions fail closed
            return False
        if call is not None:
            flow.metadata[flowmeta.JSONRPC_ID] = call.id
        return False

    @staticmethod
    def _deny(flow: http.HTTPFlow, facts: RequestFacts, decision: Decision) -> None:
        if decision.reason == "agent_retired":
            responses.refuse(flow, 403, responses.AGENT_RETIRED,
                             f"Agent {decision.agent!r} is retired: Bastion no longer forwards its calls.")
            return
        rule = decision.rule
        if decision.message:
            message = decision.message
        elif rule is not None:
            message = f"Denied by rule {rule}."
        else:
            message = (f"No rule allows {facts.method} {facts.scheme}://{facts.host}:{facts.port}{facts.path} "
                       f"for agent {decision.agent} (default: deny).")
        responses.refuse(flow, 403, responses.POLICY_DENIED, message, rule=rule)

    # -- helpers --------------------------------------------------------------------------------------------

    def _too_large(self, flow: http.HTTPFlow, size: int) -> None:
        responses.refuse(flow, 413, responses.REQUEST_TOO_LARGE,
                         f"Request body is {size} bytes; Bastion accepts at most {self.max_request_body}.",
                         headers={"connection": "close"})
