"""What mitmproxy's HTTP and WebSocket layers lack for a proxy that faces hostile clients, added to its
`HttpStream`, `Http1Server`, `WebsocketLayer` (and `WebsocketConnection`) and `ConnectionHandler` classes
(`install()`, called once before the proxy starts).

mitmproxy reads a request's whole body into memory before the `request` hook, even when an addon already
answered the request at `requestheaders`; it has no bound on a request head still arriving; and it answers an
upstream it cannot reach with an HTML page. Each would let an agent (or anyone who can connect) take the
sidecar's memory or get an answer without a request id. The hooks an addon gets cannot change any of this, so
these behaviours are added to the layer itself, each as a small wrapper around mitmproxy's own method:

1. **Early answer.** A request refused at `requestheaders` (407 without credentials, 413 by `Content-Length`,
   400, 403 ...) whose body has not arrived is answered at once; the body that follows is read and thrown away
   (up to `DISCARD_LIMIT`, then the connection is closed), never buffered. Clients that wait for
   `100 Continue` (curl, for bodies over 1 MiB) never send it.
2. **Body limit while reading.** A body without `Content-Length` (chunked) is counted as it arrives and
   refused with 413 the moment it passes the flow's limit (`flowmeta.BODY_LIMIT`), then treated as in 1.
3. **Bounded request heads.** An HTTP/1 request head still incomplete after `HEAD_LIMIT` bytes gets 431 and
   the connection is closed (mitmproxy buffers it without limit).
4. **JSON 502.** An upstream that refuses, resets or breaks the connection before any response header reached
   the agent gets Bastion's JSON `upstream_unreachable` answer with `X-Bastion-Request-Id`, like every
   other refusal, instead of mitmproxy's HTML page (a JSON-RPC error for that request's id when the request
   is JSON-RPC, so that an MCP client shows Bastion's message).
5. **WebSocket message limit.** mitmproxy's `WebsocketLayer` joins the frames of a message in memory, without
   limit, before the `websocket_message` hook sees it: one fragmented message of a gigabyte is all buffered
   first. Each side's message is counted while it arrives (payload, plus `FRAME_COST` a frame, so that
   endless empty frames count too); past `WEBSOCKET_MESSAGE_LIMIT` the layer gets a close of its own
   (1009, "message too big") instead of the rest of the message: it closes both sides with 1009, calls
   `websocket_end` and relays nothing more; what was buffered is let go. The close is put on the flow as
   `BASTION_CLOSE`, so the session's record says Bastion closed it (`bastion.proxy.wsession`). The frame
   being assembled is also grown in place (mitmproxy appends to a `bytes`, copying it for every chunk: a
   single-frame message would cost its size squared in copying).
   A close Bastion started (`close_by_bastion`: this one, or a refused message's 1008) half-closes the TCP
   connections (a FIN after the close frame) instead of closing them as mitmproxy does when a session ends:
   closing a socket that still has data unread (a client still sending) resets the connection, and with the
   reset the client loses the close frame it has not read yet. What arrives afterwards is read and dropped
   (the layer is done: nothing is buffered) until the peer closes its side or the idle timeout closes it.

The wrapped methods exist in every mitmproxy 12 release; `install()` refuses to run on a layer that lacks
them, so an upgrade that changes them fails loudly at startup instead of silently dropping a limit.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands
from mitmproxy.proxy import server as mserver
from mitmproxy.proxy.layers import http as mhttp
from mitmproxy.proxy.layers import websocket as mwebsocket
from mitmproxy.proxy.layers.http import _http1
from wsproto import events as wsevents

from bastion.ids import new_request_id
from bastion.proxy import flowmeta, responses

log = logging.getLogger("bastion.proxy")

DISCARD_LIMIT = 256 << 20
"""Bytes of an answered request's body read and dropped before the connection is closed. Reading it lets a
client that sends its whole body before reading (python-requests does) see the answer; the limit bounds what
an endless upload can cost."""

HEAD_LIMIT = 128 << 10
"""Bytes an HTTP/1 request head may take before it is complete (header block limit plus the request line)."""

WEBSOCKET_MESSAGE_LIMIT = 16 << 20
"""Bytes one WebSocket message (all its frames) may take while mitmproxy assembles it. Half of the request body
limit (`settings.MAX_REQUEST_BODY`, 32 MiB): a message is held whole, then copied (joined, then split again to
be relayed), so it costs two to three times its size; realtime APIs send audio in chunks of kilobytes."""

FRAME_COST = 64
"""Bytes each frame (or part of one) counts for on top of its payload: mitmproxy keeps an entry per frame."""

MESSAGE_TOO_BIG = 1009
"""Close code of a session whose message passed `WEBSOCKET_MESSAGE_LIMIT` (RFC 6455: "message too big")."""

BASTION_CLOSE = "bastion.websocket_close"
"""`flow.metadata` key: `(code, reason)` of the close Bastion started on a WebSocket session (see
`close_by_bastion`)."""

_WATCH = "_bastion_message_watch"  # attribute of a WebsocketConnection: its `_MessageWatch`
_HALF_CLOSE_NEXT: weakref.WeakSet[Any] = weakref.WeakSet()  # connections whose next close is a half-close

_installed = False


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """Put on `flow.metadata[flowmeta.BODY_LIMIT]` at `requestheaders`: the most body bytes the flow may
    buffer, and what answers it (sets `flow.response`) when it sends more."""

    limit: int
    refuse: Callable[[http.HTTPFlow, int], None]


CommandGenerator = Generator[Any, Any, Any]


def install() -> None:
    """Wrap the layer methods (idempotent)."""
    global _installed
    if _installed:
        return
    stream = mhttp.HttpStream
    for name in ("state_wait_for_request_headers", "state_consume_request_body", "handle_protocol_error",
                 "send_response", "check_killed", "flow_done"):
        if not callable(getattr(stream, name, None)):
            raise RuntimeError(f"this mitmproxy has no HttpStream.{name}; Bastion's request limits cannot apply")
    if not callable(getattr(_http1.Http1Server, "read_headers", None)):
        raise RuntimeError("this mitmproxy has no Http1Server.read_headers; Bastion's head limit cannot apply")
    layer, conn = mwebsocket.WebsocketLayer, mwebsocket.WebsocketConnection
    handler = mserver.ConnectionHandler
    for cls, name in ((layer, "relay_messages"), (conn, "events"), (handler, "close_connection")):
        if not callable(getattr(cls, name, None)):
            raise RuntimeError(f"this mitmproxy has no {cls.__name__}.{name}; Bastion's WebSocket limit cannot apply")
    stream.state_wait_for_request_headers = _after_request_headers(stream.state_wait_for_request_headers)
    stream.state_consume_request_body = _counting_body(stream.state_consume_request_body)
    stream.handle_protocol_error = _json_upstream_error(stream.handle_protocol_error)
    _http1.Http1Server.read_headers = _bounded_head(_http1.Http1Server.read_headers)
    layer.relay_messages = _watched_relay(layer.relay_messages)
    conn.events = _bounded_events(conn.events)
    handler.close_connection = _half_closing(handler.close_connection)
    _installed = True


# -- 1. early answer ----------------------------------------------------------------------------------------


def _after_request_headers(original: Callable[..., CommandGenerator]) -> Callable[..., CommandGenerator]:
    def state_wait_for_request_headers(self: Any, event: Any) -> CommandGenerator:
        yield from original(self, event)
        flow = getattr(self, "flow", None)
        if (not event.end_stream and flow is not None and flow.response is not None and not flow.error
                and self.client_state == self.state_consume_request_body):
            yield from _answer_now(self)

    return state_wait_for_request_headers


def _answer_now(stream: Any) -> CommandGenerator:
    """Send the response an addon set while the request body is still to come; drop that body."""
    flow: http.HTTPFlow = stream.flow
    assert flow.response is not None
    _drop_buffer(stream)
    flow.response.timestamp_start = time.time()
    stream.client_state = _discarding(stream)  # before send_response: it must not end the stream yet
    yield mhttp.HttpResponseHeadersHook(flow)
    if (yield from stream.check_killed(True)):
        return
    yield from stream.send_response()


def _discarding(stream: Any) -> Callable[[Any], CommandGenerator]:
    """A client state that reads the rest of an answered request's body and keeps none of it."""
    dropped = 0

    def discard_request_body(event: Any) -> CommandGenerator:
        nonlocal dropped
        if isinstance(event, mhttp.RequestData):
            dropped += len(event.data)
            if dropped > DISCARD_LIMIT:
                log.info("closing a connection that kept sending a refused request's body (%d bytes)", dropped)
                stream.client_state = stream.state_errored
                yield commands.CloseConnection(stream.context.client)
        elif isinstance(event, mhttp.RequestEndOfMessage):
            stream.client_state = stream.state_done
            if stream.server_state == stream.state_done:
                yield from stream.flow_done()
        # RequestTrailers: nothing to keep

    discard_request_body.__name__ = "discard_request_body"  # mitmproxy's repr names the state
    return discard_request_body


# -- 2. body limit while reading ----------------------------------------------------------------------------


def _counting_body(original: Callable[..., CommandGenerator]) -> Callable[..., CommandGenerator]:
    def state_consume_request_body(self: Any, event: Any) -> CommandGenerator:
        if isinstance(event, mhttp.RequestData):
            bound: BodyLimit | None = self.flow.metadata.get(flowmeta.BODY_LIMIT)
            size = len(self.request_body_buf) + len(event.data)
            if bound is not None and size > bound.limit and self.flow.response is None:
                _drop_buffer(self)
                bound.refuse(self.flow, size)
                if self.flow.response is not None:
                    yield from _answer_now(self)
                    return
        yield from original(self, event)

    return state_consume_request_body


def _drop_buffer(stream: Any) -> None:
    """A new, empty body buffer: `clear()` would keep the old one's allocation for the connection's life."""
    stream.request_body_buf = type(stream.request_body_buf)()


# -- 3. bounded request heads -------------------------------------------------------------------------------


def _bounded_head(original: Callable[..., CommandGenerator]) -> Callable[..., CommandGenerator]:
    def read_headers(self: Any, event: Any) -> CommandGenerator:
        yield from original(self, event)
        if self.state == self.read_headers and len(self.buf) > HEAD_LIMIT:
            log.info("closing a connection whose request head passed %d bytes", HEAD_LIMIT)
            self.buf.maybe_extract_at_most(len(self.buf))  # free it now, not when the connection goes
            body = responses.make_error(431, responses.HEADERS_TOO_LARGE,
                                        f"The request head passed {HEAD_LIMIT} bytes before it was complete.",
                                        _new_id(), headers={"connection": "close"})
            yield commands.SendData(self.conn, _assemble(body))
            yield commands.CloseConnection(self.conn)
            self.state = self.done

    return read_headers


def _assemble(response: http.Response) -> bytes:
    return http1.assemble_response(response)


def _new_id() -> str:
    return new_request_id()


# -- 4. JSON 502 --------------------------------------------------------------------------------------------


def _json_upstream_error(original: Callable[..., CommandGenerator]) -> Callable[..., CommandGenerator]:
    def handle_protocol_error(self: Any, event: Any) -> CommandGenerator:
        flow = getattr(self, "flow", None)
        if (not isinstance(event, mhttp.ResponseProtocolError) or flow is None or flow.response is not None
                or event.code == mhttp.ErrorCode.KILL or self.client_state != self.state_done
                or self.server_state == self.state_errored):
            yield from original(self, event)
            return
        # The upstream failed before a response header reached the agent: answer like any other refusal.
        if self.server_state != self.state_done:
            flow.error = mflow.Error(event.message)
            yield mhttp.HttpErrorHook(flow)
        if (yield from self.check_killed(False)):
            return
        request_id = flow.metadata.get(flowmeta.REQUEST_ID) or _new_id()
        req = flow.request
        answer = responses.make_error(
            502, responses.UPSTREAM_UNREACHABLE,
            f"Bastion could not get an answer from {req.pretty_host}:{req.port}: {event.message}",
            request_id, headers={"connection": "close"}, jsonrpc=responses.jsonrpc_target(flow))
        responses.count_refusal(responses.UPSTREAM_UNREACHABLE)
        client = self.context.client
        yield mhttp.SendHttp(mhttp.ResponseHeaders(self.stream_id, answer, False), client)
        yield mhttp.SendHttp(mhttp.ResponseData(self.stream_id, answer.raw_content or b""), client)
        yield mhttp.SendHttp(mhttp.ResponseEndOfMessage(self.stream_id), client)
        self.server_state = self.state_errored
        flow.live = False
        yield mhttp.DropStream(self.stream_id)

    return handle_protocol_error


# -- 5. WebSocket message limit -----------------------------------------------------------------------------


@dataclass(slots=True)
class _MessageWatch:
    """One side of a session: the bytes of the message it is sending so far."""

    flow: http.HTTPFlow
    side: str  # "client" | "server"
    pending: int = 0


def _watched_relay(original: Callable[..., CommandGenerator]) -> Callable[..., CommandGenerator]:
    def relay_messages(self: Any, event: Any) -> CommandGenerator:
        for ws, side in ((self.client_ws, "client"), (self.server_ws, "server")):
            if _WATCH not in vars(ws):
                setattr(ws, _WATCH, _MessageWatch(self.flow, side))
        return (yield from original(self, event))

    return relay_messages


def _bounded_events(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def events(self: Any) -> Any:
        watch: _MessageWatch | None = vars(self).get(_WATCH)
        if watch is None:  # not relaying yet (the layer binds both sides before it reads a byte)
            yield from original(self)
            return
        for event in original(self):
            if isinstance(event, wsevents.Message):
                watch.pending += _payload_size(event.data) + FRAME_COST
                if watch.pending > WEBSOCKET_MESSAGE_LIMIT:
                    yield _too_big(self, watch)
                    return  # the rest of what arrived is never read: the layer is done
                _grow_in_place(self.frame_buf)
                if event.message_finished:
                    watch.pending = 0
            yield event

    return events


def _payload_size(data: str | bytes | bytearray) -> int:
    """Bytes this part of a message adds to mitmproxy's buffer (text is kept as UTF-8)."""
    if isinstance(data, str):
        return len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
    return len(data)


def _grow_in_place(frame_buf: list[Any]) -> None:
    """Make the frame being assembled a bytearray, so that mitmproxy's `frame_buf[-1] += data` appends to it
    instead of copying it whole for every chunk."""
    last = frame_buf[-1]
    if last and type(last) is bytes:
        frame_buf[-1] = bytearray(last)


def _too_big(ws: Any, watch: _MessageWatch) -> wsevents.CloseConnection:
    """What the layer gets instead of the rest of an oversized message: a close (1009) it relays to both sides."""
    flow = watch.flow
    reason = f"Message too big: WebSocket messages through Bastion are limited to {WEBSOCKET_MESSAGE_LIMIT} bytes."
    close_by_bastion(flow, MESSAGE_TOO_BIG, reason)
    ws.frame_buf = [b""]  # let go of what was buffered now, not when the connection goes
    watch.pending = 0
    log.info("closing websocket %s%s: a %s message passed %d bytes (request_id=%s)", flow.request.pretty_host,
             flow.request.path.partition("?")[0], watch.side, WEBSOCKET_MESSAGE_LIMIT,
             flow.metadata.get(flowmeta.REQUEST_ID))
    return wsevents.CloseConnection(code=MESSAGE_TOO_BIG, reason=reason)


def close_by_bastion(flow: http.HTTPFlow, code: int, reason: str) -> None:
    """Bastion is about to close `flow`'s WebSocket session with `code` and `reason` (call it before the close
    frames are sent): the session's record will say Bastion closed it (`BASTION_CLOSE`), and the next close of
    each of its connections is a half-close (see 5)."""
    flow.metadata[BASTION_CLOSE] = (code, reason)
    for conn in (flow.client_conn, flow.server_conn):
        if conn is not None:
            _HALF_CLOSE_NEXT.add(conn)


def _half_closing(original: Callable[..., None]) -> Callable[..., None]:
    """`ConnectionHandler.close_connection`, which makes the first close of a connection `close_by_bastion`
    named a half-close. The layers above the WebSocket one (the upgraded HTTP stream, a CONNECT tunnel) all turn
    a close into a full one: only here, where the socket is closed, does the half-close survive."""

    def close_connection(self: Any, connection: Any, half_close: bool = False) -> None:
        if not half_close and connection in _HALF_CLOSE_NEXT:
            _HALF_CLOSE_NEXT.discard(connection)
            half_close = True
        original(self, connection, half_close)

    return close_connection


__all__ = ["BASTION_CLOSE", "DISCARD_LIMIT", "HEAD_LIMIT", "MESSAGE_TOO_BIG", "WEBSOCKET_MESSAGE_LIMIT", "BodyLimit",
           "close_by_bastion", "install"]
