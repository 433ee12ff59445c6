"""The last addon in the chain: nothing leaves that was not decided, and every answer carries its request id.

- A request that reaches the gate without a policy decision (an addon failed, a hook was skipped) is refused
  with 500; one that still carries an obligation (a hold nobody approved, a lock nobody took, because the
  approval service or lock store is not wired in or failed) is refused with 503. Fail closed, always.
- Every response gets `X-Bastion-Request-Id`; CONNECT tunnels too (their 200 is built here).
- Upstream responses that are event streams, of unknown length or large are streamed to the agent as they
  arrive instead of being buffered (`flow.response.stream = True`; a capture addon placed after the gate may
  replace it with a tap that records chunks).
- In-flight requests are counted so a graceful shutdown can wait for them, and each agent request is counted in
  `bastion_requests_total` once it is answered, under its final outcome.
- Websocket flows keep only their newest message (see `websocket_message`), so long sessions stay bounded.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mitmproxy import http

from bastion.metrics import REQUESTS, UPSTREAM_SECONDS
from bastion.outcomes import outcome_label
from bastion.proxy import flowmeta, responses

STREAM_ABOVE = 1 << 20
"""Upstream bodies larger than this (bytes, from Content-Length) are streamed instead of buffered."""

_COUNTED = "bastion.gate.counted"
_ID_HEADER = flowmeta.REQUEST_ID_HEADER.encode()
_ID_HEADER_LOWER = _ID_HEADER.lower()


class Gate:
    """mitmproxy addon; keep it last among the addons that may refuse a request."""

    def __init__(self) -> None:
        self._inflight: set[Any] = set()
        self._counters: dict[tuple[str, str], Any] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    # -- tunnels --------------------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            flow.response = http.Response(
                http_version=flow.request.data.http_version,
                status_code=200,
                reason=b"Connection established",
                headers=http.Headers(
                    [(flowmeta.REQUEST_ID_HEADER.encode(), flow.metadata[flowmeta.REQUEST_ID].encode())]),
                content=b"",
                trailers=None,
                timestamp_start=time.time(),
                timestamp_end=time.time(),
            )

    # -- requests -------------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._inflight.add(flow.id)
        self._idle.clear()
        if flow.response is not None:  # answered already: the body must not be asked for (`100 Continue`)
            flow.request.headers.pop("expect", None)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        meta = flow.metadata
        if flowmeta.DECISION not in meta:
            responses.refuse(flow, 500, responses.INTERNAL_ERROR,
                             "Bastion could not decide on this request; it was not forwarded.")
            return
        if flowmeta.UPSTREAM_ADDRESS not in meta:
            responses.refuse(flow, 500, responses.INTERNAL_ERROR,
                             "Bastion could not vet this request's destination; it was not forwarded.")
            return
        pending = meta.get(flowmeta.OBLIGATIONS)
        if not pending:
            return
        decision = meta[flowmeta.DECISION]
        no_retry = {"x-should-retry": "false"}
        if flowmeta.OBLIGATION_APPROVAL in pending:
            rules = ", ".join(decision.rules) or "?"
            responses.refuse(flow, 503, responses.APPROVAL_UNAVAILABLE,
                             f"This call needs human approval (rule {rules}), but no approval service is "
                             "available, so it was refused.", rule=decision.rule, headers=no_retry)
        elif flowmeta.OBLIGATION_LOCK not in pending:  # milestones or budgets: the fleet store's stages
            responses.refuse(flow, 503, responses.STORE_UNAVAILABLE,
                             f"This call needs the shared store ({', '.join(sorted(pending))}), which is not "
                             "available, so it was refused.", rule=decision.rule, headers=no_retry)
        else:
            keys = ", ".join(a.key for a in (*decision.locks, *decision.releases)) or "?"
            rule = next((a.rule for a in (*decision.locks, *decision.releases)), decision.rule)
            responses.refuse(flow, 503, responses.STORE_UNAVAILABLE,
                             f"This call needs the task lock store (lock {keys}, rule {rule}), which is not "
                             "available, so it was refused.", rule=rule, headers=no_retry)

    # -- responses ------------------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        resp = flow.response
        assert resp is not None
        if flowmeta.REFUSAL in meta:
            return  # our own answer: complete, and already carries the id
        # One pass over the header fields (mitmproxy's header lookups scan the list on every call).
        length = ctype = None
        has_id = False
        for k, v in resp.headers.fields:
            n = len(k)
            if n == 14 and k.lower() == b"content-length":
                length = v
            elif n == 12 and k.lower() == b"content-type":
                ctype = v
            elif n == 20 and k.lower() == _ID_HEADER_LOWER:
                has_id = True
        request_id = meta.get(flowmeta.REQUEST_ID)
        if request_id is not None:
            if has_id:  # an upstream must not be able to speak for Bastion
                resp.headers[flowmeta.REQUEST_ID_HEADER] = request_id
            else:
                resp.headers.fields = (*resp.headers.fields, (_ID_HEADER, request_id.encode()))
        if resp.stream:
            return
        if length is None:
            resp.stream = flow.request.method != "HEAD" and resp.status_code not in (101, 204, 304)
        elif ctype is not None and ctype.startswith(b"text/event-stream"):
            resp.stream = True
        else:
            try:
                resp.stream = int(length) > STREAM_ABOVE
            except ValueError:
                resp.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        if flowmeta.REFUSAL not in meta and flow.response is not None:
            sent = flow.request.timestamp_end
            done = flow.response.timestamp_end
            if sent is not None and done is not None:
                UPSTREAM_SECONDS.observe(max(0.0, done - sent))
        self._count(flow)
        if flow.websocket is None:
            self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)
        self._done(flow)

    def _count(self, flow: http.HTTPFlow) -> None:
        """`bastion_requests_total{agent,decision}`, once per agent request, when it is answered or ends:
        by then every stage that could refuse it has spoken (see `bastion.outcomes`)."""
        meta = flow.metadata
        agent = meta.get(flowmeta.AGENT)
        if agent is None or _COUNTED in meta:
            return
        meta[_COUNTED] = True
        decision = meta.get(flowmeta.DECISION)
        label = outcome_label(decision.effect if decision is not None else None,
                                        meta.get(flowmeta.REFUSAL))
        if label is None:
            return  # ended before anything decided it (the agent went away): not a decided request
        counter = self._counters.get((agent, label))
        if counter is None:
            counter = self._counters[(agent, label)] = REQUESTS.labels(agent, label)
        counter.inc()

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """mitmproxy keeps every message of a websocket on the flow, which grows without bound on a long
        session (realtime APIs stream audio for hours). Keep only the newest: stages after the gate still
        see it as `flow.websocket.messages[-1]`, as the hook's contract says."""
        ws = flow.websocket
        if ws is not None and len(ws.messages) > 1:
            del ws.messages[:-1]

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def _done(self, flow: http.HTTPFlow) -> None:
        self._inflight.discard(flow.id)
        if not self._inflight:
            self._idle.set()

    # -- shutdown -------------------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()
