"""Audit capture: exactly one audit record per HTTP exchange an agent makes through Bastion, whatever the outcome.

Two pipeline stages (see `server.build_proxy`):

- `Intake`, placed before identity: keeps what the agent sent (headers, request target) before other stages
  change the request, and refuses early, before policy, task locks or approvals act, when the audit cannot
  take records (503 `audit_unavailable`, `audit.on_failure: deny`): a lock taken or a human asked to approve
  for a call that is then refused anyway would be a side effect without a purpose.
- `Capture`, placed after the gate, so it sees each exchange's final outcome. It checks the audit once more
  right before forwarding (it may have failed while a call was held), taps streamed responses and submits the
  record when the exchange ends:

  | how it ends                                     | hook           | outcome        |
  |-------------------------------------------------|----------------|----------------|
  | the upstream answered, the answer went back     | `response`     | forwarded      |
  | Bastion answered itself (407, 403, 423, 503...) | `response`     | refused        |
  | a CONNECT refused (407, 403)                    | `http_connect` | refused        |
  | upstream unreachable, TLS failure, broke off    | `error`        | upstream_error |
  | the agent went away (held, waiting, streaming)  | `error`        | client_gone    |

  A CONNECT that opens a tunnel is not an exchange (the requests inside it are) and gets no record.

Bodies: the request is already buffered by mitmproxy (the rules may read it). A response the gate decided to
stream (`stream = True`: event streams, unknown or large length) gets a `StreamTap` instead, which passes
every chunk on at once and feeds a bounded `BodyCapture`; any other response is captured whole. Bodies keep
their Content-Encoding here; the writer decodes them for storage under its size cap (gzip bombs stay cut).
Everything on the event loop is O(size of what is kept): bodies larger than `LARGE_BODY` are digested on a
worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable

from mitmproxy import connection, http
from mitmproxy import flow as mflow

from bastion import metrics
from bastion.audit.bodies import CapturedBody, capture_bytes
from bastion.audit.record import AuditRecord, ErrorFacts, Outcome, Response
from bastion.audit.writer import AuditWriter
from bastion.ids import now_us
from bastion.proxy import flowmeta, flowrecord, responses
from bastion.proxy.exchange import Exchange, HeaderFields, StreamTap

log = logging.getLogger("bastion.audit")

AUDIT_UNAVAILABLE = "audit_unavailable"

LARGE_BODY = 1 << 20
"""Bodies above this many bytes are hashed for the record on a worker thread, not on the event loop."""

RETRY_AFTER = 5
"""`Retry-After` (seconds) of a 503 `audit_unavailable`."""

_CLIENT_GONE = ("Client disconnected", "stream reset by client")

# (request header fields, request body, response header fields, response body or its capture)
_Bodies = tuple[HeaderFields, bytes, HeaderFields, CapturedBody | bytes | None]


def refuse_unaudited(flow: http.HTTPFlow) -> None:
    responses.refuse(flow, 503, AUDIT_UNAVAILABLE,
                     "Bastion cannot record this call in its audit log right now, so it was not forwarded "
                     "(audit.on_failure: deny). Try again in a few seconds.",
                     headers={"retry-after": str(RETRY_AFTER)})


class Intake:
    """Pipeline stage before identity; see the module docstring."""

    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer
        # Credentials of each CONNECT, to name who a request inside the tunnel claimed to be when a reload
        # revoked them. Weak keys: nothing outlives the client connection.
        self._tunnels: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()

    def http_connect(self, flow: http.HTTPFlow) -> None:
        auth = flow.request.headers.get("proxy-authorization")
        if auth is not None:
            self._tunnels[flow.client_conn] = auth

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        flow.metadata[flowmeta.CAPTURE] = Exchange(req.headers.fields, req.path,
                                                    self._tunnels.get(flow.client_conn))

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and self._writer.must_refuse():
            refuse_unaudited(flow)


class Capture:
    """Pipeline stage after the gate; see the module docstring. `intake` is its partner stage."""

    def __init__(self, writer: AuditWriter, *, pinned: str | None = None) -> None:
        self.writer = writer
        self.pinned = pinned
        self.intake = Intake(writer)

    # -- requests -------------------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        resp = flow.response
        if resp is None or 200 <= resp.status_code < 300:
            return None  # a tunnel: the requests inside it are the exchanges
        return self._record(flow, None, "refused", flowrecord.response_of(resp, source="bastion"),
                            self._refusal(flow, resp), resp.raw_content)

    def request(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(flowmeta.CAPTURE)
        if exchange is not None:
            exchange.decided = time.time()
        if flow.response is None and self.writer.must_refuse():
            refuse_unaudited(flow)

    # -- responses ------------------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or resp.stream is not True:
            return  # buffered: captured whole in `response` (a callable belongs to someone else: left alone)
        exchange = flow.metadata.get(flowmeta.CAPTURE)
        if exchange is None:
            return
        fields = resp.headers.fields
        tap = StreamTap(self.writer.capture(
            content_encoding=flowrecord.header_value(fields, b"content-encoding") or "",
            content_type=flowrecord.header_value(fields, b"content-type") or ""))
        exchange.tap = tap
        resp.stream = tap

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        exchange = self._exchange(flow)
        resp = flow.response
        if exchange is None or resp is None:
            return None
        if flowmeta.REFUSAL in flow.metadata:
            return self._record(flow, exchange, "refused", flowrecord.response_of(resp, source="bastion"),
                                self._refusal(flow, resp), resp.raw_content)
        if exchange.tap is not None:
            body: CapturedBody | bytes | None = exchange.tap.finish(complete=True)
            record = flowrecord.response_of(resp, source="upstream", streamed=True)
        else:
            body = resp.raw_content
            record = flowrecord.response_of(resp, source="upstream")
        return self._record(flow, exchange, "forwarded", record, None, body)

    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        exchange = self._exchange(flow)
        if exchange is None:
            return None
        message = flow.error.msg if flow.error is not None else "unknown error"
        outcome: Outcome
        if message.startswith(_CLIENT_GONE) or not flow.client_conn.state & connection.ConnectionState.CAN_WRITE:
            outcome, facts = "client_gone", ErrorFacts("client_gone", message)
        elif message == mflow.Error.KILLED_MESSAGE:
            outcome, facts = "refused", ErrorFacts("killed", message)
        elif exchange.decided is None:  # mitmproxy refused the request before Bastion's stages saw it
            outcome, facts = "refused", ErrorFacts(responses.BAD_REQUEST, message)
        else:
            outcome, facts = "upstream_error", ErrorFacts("upstream_error", message)
        response: Response | None = None
        body: CapturedBody | None = None
        resp = flow.response
        if exchange.tap is not None and resp is not None:  # headers and part of the body reached the agent
            response = flowrecord.response_of(resp, source="upstream", streamed=True)
            body = exchange.tap.finish(complete=False)
        elif outcome == "upstream_error":  # mitmproxy answers 502 when nothing was sent to the agent yet
            response = Response(502, "Bad Gateway", flow.request.http_version, source="bastion")
        return self._record(flow, exchange, outcome, response, facts, body)

    # -- records --------------------------------------------------------------------------------------------

    def _exchange(self, flow: http.HTTPFlow) -> Exchange | None:
        """This flow's exchange, once: None when it has its record already (or is a tunnel's CONNECT)."""
        if flow.request.method == "CONNECT":
            return None
        exchange: Exchange | None = flow.metadata.get(flowmeta.CAPTURE)
        if exchange is None:  # no intake (a stage before it failed): record what is left
            exchange = flow.metadata[flowmeta.CAPTURE] = Exchange(flow.request.headers.fields, flow.request.path)
        if exchange.recorded:
            return None
        exchange.recorded = True
        return exchange

    @staticmethod
    def _refusal(flow: http.HTTPFlow, resp: http.Response) -> ErrorFacts:
        error_type = flow.metadata.get(flowmeta.REFUSAL) or f"http_{resp.status_code}"
        return ErrorFacts(error_type, flowrecord.refusal_message(resp))

    def _record(self, flow: http.HTTPFlow, exchange: Exchange | None, outcome: Outcome, response: Response | None,
                error: ErrorFacts | None, response_body: CapturedBody | bytes | None) -> Awaitable[None] | None:
        """Build and submit the record. Returns an awaitable only when a large body must be digested first."""
        try:
            record = flowrecord.build(flow, exchange, outcome=outcome, response=response, error=error,
                                      pinned=self.pinned, ended_us=now_us())
            req = flow.request
            request_fields = exchange.fields if exchange is not None else req.headers.fields
            response_fields = flow.response.headers.fields if flow.response is not None else ()
            bodies: _Bodies = (request_fields, req.raw_content or b"", response_fields, response_body)
            if len(bodies[1]) > LARGE_BODY or (isinstance(response_body, bytes) and len(response_body) > LARGE_BODY):
                return self._submit_large(record, bodies)
            self.writer.submit(record, *self._bodies(*bodies))  # a refusal is counted by the writer
        except Exception:  # a record that cannot be built must never break the agent's call
            self._lost(flow.metadata.get(flowmeta.REQUEST_ID))
        return None

    async def _submit_large(self, record: AuditRecord, bodies: _Bodies) -> None:
        try:
            self.writer.submit(record, *await asyncio.to_thread(self._bodies, *bodies))
        except Exception:
            self._lost(record.id)

    @staticmethod
    def _lost(request_id: str | None) -> None:
        metrics.AUDIT_DROPPED.labels(reason="capture_error").inc()
        log.exception("audit record for request %s could not be built", request_id)

    def _bodies(self, request_fields: HeaderFields, request_body: bytes, response_fields: HeaderFields,
                response_body: CapturedBody | bytes | None) -> tuple[CapturedBody | None, CapturedBody | None]:
        """Both bodies as the writer takes them; the response's may be captured already (a stream tap)."""
        if response_body is None or isinstance(response_body, CapturedBody):
            return self._capture(request_fields, request_body), response_body
        return self._capture(request_fields, request_body), self._capture(response_fields, response_body)

    def _capture(self, fields: HeaderFields, data: bytes) -> CapturedBody | None:
        if not data:
            return None
        return capture_bytes(data, self.writer.config.max_body_bytes,
                             content_encoding=flowrecord.header_value(fields, b"content-encoding") or "",
                             content_type=flowrecord.header_value(fields, b"content-type") or "")
