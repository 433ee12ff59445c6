"""Per-exchange audit state the capture keeps on a flow (`flow.metadata[flowmeta.CAPTURE]`), and the response
body tap.

Why a separate snapshot of the request: by the time an exchange ends, other stages have changed the request
(identity removed `Proxy-Authorization`, enforcement normalized the path, the lock stage added
`Bastion-Fence`). The audit records what the agent sent, so the capture's intake stage keeps references to
the header fields and the request target as they arrived. mitmproxy replaces `headers.fields` (an immutable
tuple) when a header changes, so keeping the old tuple costs nothing and cannot be changed behind our back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bastion.audit.bodies import BodyCapture, CapturedBody
from bastion.audit.snapshot import HeaderFields


class StreamTap:
    """`flow.response.stream` callable: hands every chunk to the agent unchanged, at once, and feeds a copy to
    the audit's `BodyCapture` (one hash update and a bounded copy: O(chunk), no I/O, nothing awaited).

    mitmproxy calls it once more with `b""` at the end of the body. After `finish` it only passes chunks on:
    the upstream may still send data after the agent went away, and the record is already made by then.

    `inner`: a stream callable an earlier stage put there (the traffic observer, which reads LLM and MCP
    answers as they pass); it runs first, and the audit records what it returns.
    """

    __slots__ = ("_capture", "_feed", "_inner", "_open")

    def __init__(self, capture: BodyCapture, inner: Callable[[bytes], bytes] | None = None) -> None:
        self._capture = capture
        self._feed = capture.feed
        self._inner = inner
        self._open = True

    def __call__(self, chunk: bytes) -> bytes:
        if self._inner is not None:
            chunk = self._inner(chunk)
        if self._open:
            self._feed(chunk)
        return chunk

    def finish(self, *, complete: bool) -> CapturedBody:
        self._open = False
        return self._capture.finish(complete=complete)


@dataclass(slots=True)
class Exchange:
    """What the capture needs to know about one agent request beyond the flow itself.

    `fields` and `target`: the request headers and target (path and query) as the agent sent them.
    `tunnel_auth`: the `Proxy-Authorization` of the CONNECT this request came through, if any (to name the
    agent a refused request claimed to be). `decided`: wall-clock time when every request stage had run, i.e.
    when the request was forwarded or refused. `tap`: set once streamed response headers went to the agent.
    `recorded`: the exchange has its record (mitmproxy can report an error after a response, or the reverse).
    `request_tap`: set when the request body is streamed to the upstream instead of buffered (decided early).
    """

    fields: HeaderFields
    target: str
    tunnel_auth: str | None = None
    decided: float | None = None
    tap: StreamTap | None = None
    recorded: bool = False
    request_tap: StreamTap | None = None
