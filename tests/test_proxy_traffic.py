"""The traffic stage's bounds, on its own (the behaviour through a running proxy is in test_llm_mcp_proxy.py):
compressed event streams are inflated under a budget without losing data, metric labels cannot be used up by
names an agent makes up, and Bastion's own numeric facts survive redaction."""

from __future__ import annotations

import json
import zlib

from mitmproxy import http
from mitmproxy.http import Headers
from mitmproxy.test import tflow

from bastion.audit.redact import Redactor
from bastion.protocols.llm import LlmRequest, LlmResponseObserver
from bastion.proxy.traffic import _STATE, BoundedLabel, Traffic, _Inflate, _Observation, _observing


def _gzip_stream() -> zlib._Compress:
    return zlib.compressobj(6, zlib.DEFLATED, 31)


def test_a_compressed_stream_is_read_whole() -> None:
    """An honest stream, compressed some 20 times, split anywhere: it all comes out."""
    events = b"".join(b'data: {"choices":[{"delta":{"content":"word%d "}}]}\n\n' % i for i in range(200_000))
    packer = _gzip_stream()
    wire = packer.compress(events) + packer.flush()
    inflate = _Inflate("gzip")
    out = b"".join(inflate(wire[i:i + 16_384]) for i in range(0, len(wire), 16_384))
    assert not inflate.failed and out == events


def test_a_compression_bomb_stops_being_read_at_the_budget() -> None:
    packer = _gzip_stream()
    wire = packer.compress(b"\0" * (256 << 20)) + packer.flush()  # 256 MiB in about 250 KB
    inflate = _Inflate("gzip")
    total = sum(len(inflate(wire[i:i + 4096])) for i in range(0, len(wire), 4096))
    assert inflate.failed
    assert total <= len(wire) * _Inflate.RATIO + _Inflate.ALLOWANCE
    assert inflate(wire[:4096]) == b""  # once stopped, nothing more is inflated


def test_labels_are_bounded_and_made_up_names_cannot_use_up_real_ones() -> None:
    label = BoundedLabel(limit=3, width=5)
    assert [label(v) for v in ("a", "b", "a", "c", "d", None)] == ["a", "b", "a", "c", "other", "unknown"]
    assert label("longer-than-five") == "other" and BoundedLabel(width=5)("longer") == "longe"

    stage = Traffic()
    for i in range(500):  # refused calls of invented tools
        stage._count_mcp("bot", {"method": "tools/call", "tool": f"invented_{i}", "outcome": "refused"})
    stage._count_mcp("bot", {"method": "tools/call", "tool": "search_docs", "outcome": "result"})
    assert stage.tools("search_docs") == "search_docs"
    assert stage.unanswered_tools("invented_499") == "other"


def test_numeric_facts_and_jsonrpc_codes_are_not_masked_by_their_names() -> None:
    found: list[str] = []
    redactor = Redactor()
    extra = {"llm": {"time_to_first_token_s": 0.25, "usage": {"input_tokens": 5}},
             "mcp": {"error": {"code": -32000, "message": "token sk-ant-api03-" + "x" * 90}}}
    out = redactor.value(extra, "/extra", found)
    assert out["llm"]["time_to_first_token_s"] == 0.25 and out["mcp"]["error"]["code"] == -32000
    assert "sk-ant" not in json.dumps(out)  # strings are still scanned
    body = redactor.value({"error": {"code": -32600}, "code": "an-oauth-authorization-code"}, "/response/body", [])
    assert body["error"]["code"] == -32600 and body["code"] != "an-oauth-authorization-code"


def _observation_of(*encodings: bytes) -> tuple[http.HTTPFlow, _Observation]:
    flow = tflow.tflow(resp=True)
    assert flow.response is not None
    flow.response.headers = Headers([(b"content-type", b"text/event-stream"),
                                     *((b"content-encoding", e) for e in encodings)])
    flow.response.stream = True
    obs = _Observation(obs_request(), None)
    flow.metadata[_STATE] = obs
    return flow, obs


def test_an_answer_with_two_content_encodings_is_left_unread() -> None:
    """`identity` then `gzip`: the agent's client decodes the gzip, so reading the bytes as text would let an
    upstream show the audit one answer (in the gzip header's comment) and the agent another."""
    flow, obs = _observation_of(b"identity", b"gzip")
    Traffic().responseheaders(flow)
    assert obs.llm_observer is None and flow.response is not None and flow.response.stream is True
    flow, obs = _observation_of(b"gzip")
    Traffic().responseheaders(flow)
    assert obs.llm_observer is not None and flow.response is not None and callable(flow.response.stream)


def test_a_compressed_stream_read_in_pieces_that_inflate_to_nothing_keeps_its_facts() -> None:
    """A chunk of only the gzip header, or a flush, inflates to nothing: that is not the end of the answer."""
    events = [
        b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n',
        b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n',
        b"data: [DONE]\n\n",
    ]
    packer = _gzip_stream()
    first = packer.compress(events[0]) + packer.flush(zlib.Z_SYNC_FLUSH)
    rest = packer.compress(b"".join(events[1:])) + packer.flush()
    assert first.endswith(b"\x00\x00\xff\xff")   # the flush marker: an empty block
    pieces = [first[:10], first[10:-4], first[-4:], rest]   # the gzip header alone, the marker alone
    observer = LlmResponseObserver(obs_request(), streamed=True)
    stream = _observing(observer.feed, _Inflate("gzip"))
    for piece in [*pieces, b""]:
        assert stream(piece) == piece
    facts = observer.result()
    assert facts["finish_reasons"] == ["stop"] and facts["usage"] == {"input_tokens": 3, "output_tokens": 1}
    assert facts["complete"] is True


def obs_request() -> LlmRequest:
    return LlmRequest(provider="openai", api="chat.completions", operation="chat", model="m", stream=True,
                      tools=())
