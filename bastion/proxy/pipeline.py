"""Bastion's addons as one ordered pipeline, registered with mitmproxy as a single addon.

Why not register each stage with mitmproxy directly: mitmproxy dispatches every event (and the `update` event
that follows each flow event) to every addon in its chain, through a generator, a context manager and a
`getattr` per addon; with eight events per request that bookkeeping cost more CPU than Bastion's own work.
The pipeline resolves each hook to its list of stage methods once, at construction.

It also makes two guarantees explicit:

- order: stages run in the order given, for every hook (identity, enforcement, network guard, then addons
  that satisfy obligations such as locks and approvals, then the gate, then observers such as audit capture);
- fail closed: a stage that raises is logged, and a request it was deciding is refused with 500 instead of
  being passed on (mitmproxy's own handling logs the error and carries on, which would forward it).

A stage is any object with mitmproxy hook methods (`requestheaders(flow)`, `request(flow)`, ...). A method may
return an awaitable (or be `async def`); the remaining stages then run after it completes. Returning None
from a synchronous method keeps the common path free of coroutine and task overhead.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mitmproxy import http

from bastion.proxy import flowmeta, responses

log = logging.getLogger("bastion.proxy")

HOOKS = (
    "running", "done",
    "client_connected", "client_disconnected",
    "http_connect", "http_connected", "http_connect_error",
    "requestheaders", "request", "responseheaders", "response", "error",
    "websocket_start", "websocket_message", "websocket_end",
    "server_connect", "server_connected", "server_connect_error", "server_disconnected",
    "next_layer", "tls_clienthello", "tls_start_client", "tls_start_server",
    "tls_established_client", "tls_failed_client", "tcp_start", "udp_start",
)
_DECIDING = frozenset({"http_connect", "requestheaders", "request"})

Method = Callable[..., Any]


class Pipeline:
    """One mitmproxy addon that runs `stages` in order for every hook any of them defines."""

    def __init__(self, stages: Sequence[object]) -> None:
        self.stages = tuple(stages)
        for hook in HOOKS:
            methods = [m for s in self.stages if callable(m := getattr(s, hook, None))]
            if methods:
                setattr(self, hook, self._runner(hook, methods))
        headers_run, request_run = getattr(self, "requestheaders", None), getattr(self, "request", None)
        if headers_run is not None and request_run is not None:
            self.requestheaders, self.request = _deciding_early(headers_run, request_run)

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(type(s).__name__ for s in self.stages)})"

    @staticmethod
    def _runner(hook: str, methods: list[Method]) -> Method:
        def run(*args: Any) -> Awaitable[None] | None:
            for i, method in enumerate(methods):
                try:
                    result = method(*args)
                except Exception:
                    _stage_failed(hook, method, args)
                    continue
                if result is not None and inspect.isawaitable(result):
                    return _finish(hook, result, methods[i], methods[i + 1:], args)
            return None

        run.__name__ = hook
        return run


def _deciding_early(headers_run: Method, request_run: Method) -> tuple[Method, Method]:
    """For a flow decided at `requestheaders` (`flowmeta.DECIDED_EARLY`: a large body no rule can read), run
    every stage's `request` step right after its `requestheaders` step, then stream the body to the upstream
    (`flow.request.stream`; the audit capture may have put a tap there); the `request` hook that mitmproxy
    calls once the body has gone through then has nothing left to do."""

    def stream(flow: http.HTTPFlow) -> None:
        if flow.response is None and not flow.request.stream:
            flow.request.stream = True

    def request_phase(flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response is not None or not flow.metadata.get(flowmeta.DECIDED_EARLY):
            return None
        pending = request_run(flow)
        if pending is None:
            stream(flow)
            return None
        return _then(pending, stream, flow)

    def requestheaders(flow: http.HTTPFlow) -> Awaitable[None] | None:
        pending = headers_run(flow)
        if pending is None:
            return request_phase(flow)
        return _then(pending, request_phase, flow)

    def request(flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.metadata.get(flowmeta.DECIDED_EARLY):
            return None
        return request_run(flow)

    return requestheaders, request


async def _then(pending: Awaitable[Any], after: Callable[[http.HTTPFlow], Any], flow: http.HTTPFlow) -> None:
    await pending
    more = after(flow)
    if more is not None and inspect.isawaitable(more):
        await more


async def _finish(hook: str, pending: Awaitable[Any], method: Method, rest: list[Method],
                  args: tuple[Any, ...]) -> None:
    try:
        await pending
    except Exception:
        _stage_failed(hook, method, args)
    for method in rest:
        try:
            result = method(*args)
            if result is not None and inspect.isawaitable(result):
                await result
        except Exception:
            _stage_failed(hook, method, args)


def _stage_failed(hook: str, method: Method, args: tuple[Any, ...]) -> None:
    name = getattr(method, "__qualname__", repr(method))
    log.exception("%s failed in %s", name, hook)
    flow = args[0] if args else None
    if hook in _DECIDING and isinstance(flow, http.HTTPFlow) and flow.response is None:
        responses.refuse(flow, 500, responses.INTERNAL_ERROR,
                         "Bastion failed while checking this request; it was not forwarded.")
    server = getattr(flow, "server", None)
    if hook == "server_connect" and server is not None:
        server.error = "Bastion failed to vet this connection"
