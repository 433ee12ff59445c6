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
  | a WebSocket session (upgraded with 101) ended   | `websocket_end`| forwarded      |
  | Bastion answered itself (407, 403, 423, 503...) | `response`     | refused        |
  | a CONNECT refused (407, 403)                    | `http_connect` | refused        |
  | upstream unreachable, TLS failure, broke off    | `error`        | upstream_error |
  | the agent went away (held, waiting, streaming)  | `error`        | client_gone    |

  A CONNECT that opens a tunnel is not an exchange (the requests inside it are) and gets no record.

  A WebSocket session is one exchange: its record is taken when the session ends, so that it holds every
  message (`extra["websocket"]`, kept by `bastion.proxy.wsession`); a session broken off by an `error` is
  recorded there instead, with the messages seen so far. Unlike an HTTP answer, the 101 goes back to the agent
  before the record exists: a proxy killed during a session leaves no record of it.

Bodies: the request is already buffered by mitmproxy (the rules may read it), except a large one decided
before it arrived, which is streamed to the upstream through a `StreamTap` like a streamed response. A response
the gate decided to stream (`stream = True`: event streams, unknown or large length) gets a `StreamTap`
instead, which passes every chunk on at once and feeds a bounded `BodyCapture`; any other response is captured
whole. Bodies keep their Content-Encoding here; the audit decodes them for storage under its size cap (gzip
bombs stay cut).

The record is handed over before the answer is released: `response` and `error` return what
`AuditClient.handed_over()` gives (mitmproxy sends the answer, or its last bytes for a streamed one, only once
the hook is done), so a call the agent saw answered is on record even if the proxy is killed right after.

What the stages hand over is an `ExchangeSnapshot` (`flowrecord.snapshot`): references and small values,
built in a few microseconds. Digesting bodies, building the record, redaction and the hash chain happen in the
audit worker process (`bastion.audit.client`), so they never hold the proxy's event loop or its GIL. Bodies
larger than `LARGE_BODY` are digested and cut on a worker thread first, so only what is stored travels.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable
from typing import Protocol

from mitmproxy import connection, http
from mitmproxy import flow as mflow

from bastion import metrics
from bastion.audit.bodies import BodyCapture, CapturedBody
from bastion.audit.settings import AuditConfig
from bastion.audit.snapshot import Body, ExchangeSnapshot, ResponseFacts, captured, header_value
from bastion.ids import now_us
from bastion.proxy import flowmeta, flowrecord, responses
from bastion.proxy.exchange import Exchange, StreamTap

log = logging.getLogger("bastion.audit")

AUDIT_UNAVAILABLE = "audit_unavailable"

LARGE_BODY = 1 << 20
"""Bodies above this many bytes are hashed for the record on a worker thread, not on the event loop."""

RETRY_AFTER = 5
"""`Retry-After` (seconds) of a 503 `audit_unavailable`."""

_CLIENT_GONE = ("Client disconnected", "stream reset by client")


class AuditSink(Protocol):
    """Where the capture sends exchanges: the audit worker's client in `bastion serve`
    (`bastion.audit.client.AuditClient`), or an in-process `AuditWriter`."""

    @property
    def config(self) -> AuditConfig: ...

    def must_refuse(self) -> bool: ...

    def capture(self, *, content_encoding: str = "", content_type: str = "") -> BodyCapture: ...

    def submit_exchange(self, snapshot: ExchangeSnapshot) -> bool: ...

    # Optional: `handed_over() -> Awaitable[None] | None`, awaited before the answer is released.


def refuse_unaudited(flow: http.HTTPFlow) -> None:
    responses.refuse(flow, 503, AUDIT_UNAVAILABLE,
                     "Bastion cannot record this call in its audit log right now, so it was not forwarded "
                     "(audit.on_failure: deny). Try again in a few seconds.",
                     headers={"retry-after": str(RETRY_AFTER)})


class Intake:
    """Pipeline stage before identity; see the module docstring."""

    def __init__(self, writer: AuditSink) -> None:
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

    def __init__(self, writer: AuditSink, *, pinned: str | None = None) -> None:
        self.writer = writer
        self.pinned = pinned
        self.intake = Intake(writer)

    # -- requests -------------------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        resp = flow.response
        if resp is None or 200 <= resp.status_code < 300:
            return None  # a tunnel: the requests inside it are the exchanges
        return self._record(flow, None, "refused", flowrecord.response_facts(resp, source="bastion"),
                            self._refusal(flow, resp), resp.raw_content)

    def request(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(flowmeta.CAPTURE)
        if exchange is not None:
            exchange.decided = time.time()
        if flow.response is None and self.writer.must_refuse():
            refuse_unaudited(flow)
        elif flow.response is None and exchange is not None and flow.metadata.get(flowmeta.DECIDED_EARLY):
            # The body will be streamed to the upstream (see `Pipeline`): keep what the audit keeps of it.
            fields = flow.request.headers.fields
            exchange.request_tap = tap = StreamTap(self.writer.capture(
                content_encoding=header_value(fields, b"content-encoding") or "",
                content_type=header_value(fields, b"content-type") or ""))
            flow.request.stream = tap

    # -- responses ------------------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or not resp.stream:
            return  # buffered: captured whole in `response`
        exchange = flow.metadata.get(flowmeta.CAPTURE)
        if exchange is None:
            return
        fields = resp.headers.fields
        inner = resp.stream if callable(resp.stream) else None  # an observer before us: the tap calls it first
        tap = StreamTap(self.writer.capture(
            content_encoding=header_value(fields, b"content-encoding") or "",
            content_type=header_value(fields, b"content-type") or ""), inner)
        exchange.tap = tap
        resp.stream = tap

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if _websocket_session(flow):
            return None  # recorded at `websocket_end`, with the whole session
        exchange = self._exchange(flow)
        resp = flow.response
        if exchange is None or resp is None:
            return None
        if flowmeta.REFUSAL in flow.metadata:
            return self._record(flow, exchange, "refused", flowrecord.response_facts(resp, source="bastion"),
                                self._refusal(flow, resp), resp.raw_content)
        if exchange.tap is not None:
            body: Body = exchange.tap.finish(complete=True)
            facts = flowrecord.response_facts(resp, source="upstream", streamed=True)
        else:
            body = resp.raw_content
            facts = flowrecord.response_facts(resp, source="upstream")
        return self._record(flow, exchange, "forwarded", facts, None, body)

    def websocket_end(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        exchange = self._exchange(flow)
        resp = flow.response
        if exchange is None or resp is None:
            return None
        return self._record(flow, exchange, "forwarded", flowrecord.response_facts(resp, source="upstream"),
                            None, resp.raw_content)

    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        exchange = self._exchange(flow)
        if exchange is None:
            return None
        message = flow.error.msg if flow.error is not None else "unknown error"
        if message.startswith(_CLIENT_GONE) or not flow.client_conn.state & connection.ConnectionState.CAN_WRITE:
            outcome, facts = "client_gone", ("client_gone", message)
        elif message == mflow.Error.KILLED_MESSAGE:
            outcome, facts = "refused", ("killed", message)
        elif exchange.decided is None:  # mitmproxy refused the request before Bastion's stages saw it
            outcome, facts = "refused", (responses.BAD_REQUEST, message)
        else:
            outcome, facts = "upstream_error", ("upstream_error", message)
        response: ResponseFacts | None = None
        body: CapturedBody | None = None
        resp = flow.response
        if exchange.tap is not None and resp is not None:  # headers and part of the body reached the agent
            response = flowrecord.response_facts(resp, source="upstream", streamed=True)
            body = exchange.tap.finish(complete=False)
        elif outcome == "upstream_error":  # mitmproxy answers 502 when nothing was sent to the agent yet
            response = ResponseFacts(502, "Bad Gateway", flow.request.http_version, (), "bastion")
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
    def _refusal(flow: http.HTTPFlow, resp: http.Response) -> tuple[str, str]:
        error_type = flow.metadata.get(flowmeta.REFUSAL) or f"http_{resp.status_code}"
        return error_type, flowrecord.refusal_message(resp)

    def _record(self, flow: http.HTTPFlow, exchange: Exchange | None, outcome: str, response: ResponseFacts | None,
                error: tuple[str, str] | None, response_body: Body) -> Awaitable[None] | None:
        """Snapshot the exchange and submit it. Returns an awaitable only when a large body is digested first."""
        try:
            snap = flowrecord.snapshot(flow, exchange, outcome=outcome, response=response, error=error,
                                       response_body=response_body, pinned=self.pinned, ended_us=now_us())
            if _large(snap.request_body) or _large(snap.response_body):
                return self._submit_large(snap)
            if self.writer.submit_exchange(snap):  # a refusal is counted by the writer
                return self._handed_over()
        except Exception:  # a record that cannot be built must never break the agent's call
            self._lost(flow.metadata.get(flowmeta.REQUEST_ID))
        return None

    def _handed_over(self) -> Awaitable[None] | None:
        """What the answer waits for: the record out of this process (see `AuditClient.handed_over`)."""
        handed_over = getattr(self.writer, "handed_over", None)
        return handed_over() if handed_over is not None else None

    async def _submit_large(self, snap: ExchangeSnapshot) -> None:
        """Digest and cut large bodies on a thread (hashing releases the GIL), so only what is kept travels."""
        limit = self.writer.config.max_body_bytes
        resp_fields = snap.response.fields if snap.response is not None else ()
        try:
            req_body, resp_body = await asyncio.to_thread(
                lambda: (captured(snap.request_body, snap.request_fields, limit),
                         captured(snap.response_body, resp_fields, limit)))
            if self.writer.submit_exchange(snap._replace(request_body=req_body, response_body=resp_body)):
                pending = self._handed_over()
                if pending is not None:
                    await pending
        except Exception:
            self._lost(snap.id)

    @staticmethod
    def _lost(request_id: str | None) -> None:
        metrics.AUDIT_DROPPED.labels(reason="capture_error").inc()
        log.exception("audit record for request %s could not be built", request_id)


def _websocket_session(flow: http.HTTPFlow) -> bool:
    """Did the upstream open a WebSocket session (101) for this flow?"""
    resp = flow.response
    return (flow.websocket is not None and resp is not None and resp.status_code == 101
            and flowmeta.REFUSAL not in flow.metadata)


def _large(body: Body) -> bool:
    return isinstance(body, bytes) and len(body) > LARGE_BODY
