"""Whether an upstream answer is streamed to the agent as it arrives or buffered whole first.

Buffering lets every later stage read the body at `response`; streaming keeps a large or endless answer (an
event stream, a download) from being held in memory, and lets the agent read events while they happen. The
choice is `should_stream`, a pure function of what the response head says, so that it can be tested as a
table; `ResponseStreaming` is the pipeline stage that applies it (`flow.response.stream = True`; a capture
stage placed after it may replace that with a tap that records chunks).
"""

from __future__ import annotations

from mitmproxy import http

from bastion.proxy import flowmeta

STREAM_ABOVE = 1 << 20
"""Upstream bodies larger than this (bytes, from Content-Length) are streamed instead of buffered."""

_NO_BODY_STATUS = frozenset({101, 204, 304})


def should_stream(method: str, status: int, content_length: bytes | None, content_type: bytes | None) -> bool:
    """True when the answer to a `method` request with this `status`, `Content-Length` and `Content-Type`
    (raw header values, None when absent) should be streamed.

    - No length: the body is as long as the upstream makes it (chunked, or until the connection closes), so it
      is streamed, unless the answer has no body at all (HEAD, 101, 204, 304).
    - An event stream: streamed whatever its announced length, so events reach the agent as they are sent.
    - Otherwise by size: above `STREAM_ABOVE` bytes; a length that is not a number cannot be trusted to be
      small, so it is streamed too."""
    if content_length is None:
        return method != "HEAD" and status not in _NO_BODY_STATUS
    if content_type is not None and content_type.startswith(b"text/event-stream"):
        return True
    try:
        return int(content_length) > STREAM_ABOVE
    except ValueError:
        return True


class ResponseStreaming:
    """Pipeline stage, after the gate and before the observers that tap a streamed body (traffic, capture)."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or resp.stream or flowmeta.REFUSAL in flow.metadata:
            return  # already streamed by someone, or Bastion's own answer: complete, small, in memory
        # One pass over the header fields (mitmproxy's header lookups scan the list on every call).
        length = ctype = None
        for k, v in resp.headers.fields:
            n = len(k)
            if n == 14 and k.lower() == b"content-length":
                length = v
            elif n == 12 and k.lower() == b"content-type":
                ctype = v
        resp.stream = should_stream(flow.request.method, resp.status_code, length, ctype)
