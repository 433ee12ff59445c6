"""The header-read timeout: a client connection must send a complete request head within `timeout` seconds of
opening (or of its last exchange ending), or it is closed.

Without it a client that trickles a request head byte by byte (slowloris), or that opens connections and sends
nothing, holds a connection and its buffers forever: mitmproxy's own inactivity timeout (`tcp_timeout`, which
`bastion serve --idle-timeout` sets) only fires when *no* byte arrives for that long.

The clock runs only while the connection owes a request head: from `client_connected` (and from the end of each
exchange, or of a CONNECT's answer) until the next `requestheaders`/`http_connect`. It stops while any call on
the connection is in flight (held for approval, streaming, a websocket), so a long call is never cut by it. One
sweeper task checks all connections once a second; nothing runs per byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, http

log = logging.getLogger("bastion.proxy")


@dataclass(slots=True)
class _Clock:
    inflight: int = 0
    since: float | None = None  # monotonic time since which a request head is owed; None: not owed


class HeaderTimeout:
    """Pipeline stage; `proxyserver` is mitmproxy's Proxyserver addon (it knows each connection's handler)."""

    def __init__(self, proxyserver: Any, timeout: float) -> None:
        self._proxyserver = proxyserver
        self.timeout = timeout
        self._clocks: weakref.WeakKeyDictionary[connection.Client, _Clock] = weakref.WeakKeyDictionary()
        self._sweeper: asyncio.Task[None] | None = None
        self.closed = 0

    # -- lifecycle ------------------------------------------------------------------------------------------

    def running(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="header-timeout")

    async def stop(self) -> None:
        task, self._sweeper = self._sweeper, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- connections and exchanges --------------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        self._clocks[client] = _Clock(since=time.monotonic())

    def client_disconnected(self, client: connection.Client) -> None:
        self._clocks.pop(client, None)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._started(flow.client_conn)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._ended(flow.client_conn)  # the tunnel is open: the first request inside it is owed now

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow.client_conn)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._started(flow.client_conn)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:  # a websocket's exchange lasts until websocket_end
            self._ended(flow.client_conn)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow.client_conn)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._ended(flow.client_conn)

    def _started(self, client: connection.Client) -> None:
        clock = self._clocks.get(client)
        if clock is None:
            clock = self._clocks[client] = _Clock()
        clock.inflight += 1
        clock.since = None

    def _ended(self, client: connection.Client) -> None:
        clock = self._clocks.get(client)
        if clock is None:
            return
        clock.inflight = max(0, clock.inflight - 1)
        if clock.inflight == 0:
            clock.since = time.monotonic()

    # -- the sweeper ----------------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        interval = min(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(interval)
            deadline = time.monotonic() - self.timeout
            late = [c for c, clock in list(self._clocks.items())
                    if clock.since is not None and clock.since < deadline]
            for client in late:
                clock = self._clocks.get(client)
                if clock is None or clock.since is None or clock.since >= deadline:
                    continue  # a request head arrived meanwhile
                clock.since = None
                self._close(client)

    def _close(self, client: connection.Client) -> None:
        handler = self._proxyserver.connections.get(client.id)
        if handler is None:
            return
        log.info("closing connection from %s: no complete request head within %gs",
                 _peer(client), self.timeout)
        self.closed += 1
        # What mitmproxy's own inactivity timeout does (`on_timeout`), done now rather than in a task: a request
        # head arriving in the meantime must not be forwarded on a connection that is being closed.
        io = handler.transports.get(client)
        if io is not None and io.handler is not None:
            io.handler.cancel("header timeout")


def _peer(client: connection.Client) -> str:
    peer = client.peername
    return f"{peer[0]}:{peer[1]}" if peer else "?"
