"""Pipeline stage that follows each call from its request head to its end, without ever deciding it.

- Calls in flight are counted, so a graceful shutdown can wait for them (`inflight`, `wait_idle`).
- Each agent request is counted once in `bastion_requests_total{agent,decision}` when it is answered or ends,
  under its final outcome, and the upstream's latency is observed in `bastion_upstream_seconds`.
- Websocket flows keep only their newest message (see `websocket_message`), so long sessions stay bounded.

It sits right after the gate: by then every stage that could refuse a request has spoken, so the outcome it
counts is final, and the stages after it still see each websocket message.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mitmproxy import http

from bastion.metrics import REQUESTS, UPSTREAM_SECONDS
from bastion.outcomes import outcome_label
from bastion.proxy import flowmeta

_COUNTED = "bastion.flights.counted"


class Flights:
    """Pipeline stage; see the module docstring."""

    def __init__(self) -> None:
        self._inflight: set[Any] = set()
        self._counters: dict[tuple[str, str], Any] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    # -- hooks ----------------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._inflight.add(flow.id)
        self._idle.clear()

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

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """mitmproxy keeps every message of a websocket on the flow, which grows without bound on a long
        session (realtime APIs stream audio for hours). Keep only the newest: stages after this one still
        see it as `flow.websocket.messages[-1]`, as the hook's contract says."""
        ws = flow.websocket
        if ws is not None and len(ws.messages) > 1:
            del ws.messages[:-1]

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    # -- shutdown -------------------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()

    # -- helpers --------------------------------------------------------------------------------------------

    def _count(self, flow: http.HTTPFlow) -> None:
        """`bastion_requests_total{agent,decision}`, once per agent request, when it is answered or ends:
        by then every stage that could refuse it has spoken (see `bastion.outcomes`)."""
        meta = flow.metadata
        agent = meta.get(flowmeta.AGENT)
        if agent is None or _COUNTED in meta:
            return
        meta[_COUNTED] = True
        decision = meta.get(flowmeta.DECISION)
        label = outcome_label(decision.effect if decision is not None else None, meta.get(flowmeta.REFUSAL))
        if label is None:
            return  # ended before anything decided it (the agent went away): not a decided request
        counter = self._counters.get((agent, label))
        if counter is None:
            counter = self._counters[(agent, label)] = REQUESTS.labels(agent, label)
        counter.inc()

    def _done(self, flow: http.HTTPFlow) -> None:
        self._inflight.discard(flow.id)
        if not self._inflight:
            self._idle.set()
