"""The last stage that may refuse a request: nothing leaves that was not decided, and every answer carries its
request id.

- A request that reaches the gate without a policy decision (an addon failed, a hook was skipped) is refused
  with 500; one that still carries an obligation (a hold nobody approved, a lock nobody took, because the
  approval service or lock store is not wired in or failed) is refused with 503. Fail closed, always.
- Every response gets `X-Bastion-Request-Id`; CONNECT tunnels too (their 200 is built here).

The gate only refuses and stamps. How an answer travels (streamed or buffered: `bastion.proxy.streaming`) and
following each call until it ends (in-flight counting, request metrics, websocket trimming:
`bastion.proxy.flights`) are stages of their own, placed right after it, so each can be tested and changed
without the others.
"""

from __future__ import annotations

import time

from mitmproxy import http

from bastion.proxy import flowmeta, responses

_ID_HEADER = flowmeta.REQUEST_ID_HEADER.encode()
_ID_HEADER_LOWER = _ID_HEADER.lower()


class Gate:
    """Pipeline stage; keep it last among the stages that may refuse a request."""

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
        if resp is None or flowmeta.REFUSAL in meta:
            return  # our own answer: already carries the id
        request_id = meta.get(flowmeta.REQUEST_ID)
        if request_id is None:
            return
        for k, _ in resp.headers.fields:
            if len(k) == 20 and k.lower() == _ID_HEADER_LOWER:  # an upstream must not speak for Bastion
                resp.headers[flowmeta.REQUEST_ID_HEADER] = request_id
                return
        resp.headers.fields = (*resp.headers.fields, (_ID_HEADER, request_id.encode()))
