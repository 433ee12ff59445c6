"""Holding quiet chunks of a streamed model answer: the facts must be exactly those of reading every event.

`LlmResponseObserver` holds small chunks once the first token is known and looks at a run of them at once
(`bastion.protocols.quiet`: a learned chunk template, or substring counts). The property that matters: for any
stream, cut into chunks any way, the facts equal those of one read of the whole stream (where everything is
parsed, since nothing is known before it). Streams are generated from the shapes real servers send (uniform
deltas, OpenAI's random `obfuscation` padding, Python's spaced JSON, tool calls mid-stream, a finish reason on
a content chunk, usage, errors, Anthropic's named events) and from hostile ones: a delta shaped like the
template but whose text holds raw line ends that smuggle in `data: [DONE]` or usage.
"""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.calls import counted

from bastion.protocols.llm import LlmRequest, LlmResponseObserver
from bastion.protocols.quiet import HOLD_CHUNKS, ChunkTemplate, anthropic_run_quiet, chat_run_quiet
from bastion.protocols.sse import SseParser


def request_of(api: str) -> LlmRequest:
    provider = "anthropic" if api == "messages" else "openai"
    return LlmRequest(provider=provider, api=api, operation="chat", model="m", stream=True, tools=())


def by_call(api: str, chunks: list[bytes]) -> LlmResponseObserver:
    """The observer as the proxy runs it: called with every chunk, then with b"" at the end."""
    observer = LlmResponseObserver(request_of(api), streamed=True)
    for chunk in [*chunks, b""]:
        assert observer(chunk) is chunk
    assert observer.failure is None
    return observer


def read_whole(api: str, chunks: list[bytes]) -> dict[str, Any]:
    """The reference: the whole stream in one chunk, so every event is parsed."""
    observer = LlmResponseObserver(request_of(api), streamed=True)
    observer.feed(b"".join(chunks))
    observer.feed(b"")
    return facts_of(observer)


def facts_of(observer: LlmResponseObserver) -> dict[str, Any]:
    facts = observer.result()
    del facts["time_to_first_token_s"]
    return facts


# -- stream shapes -------------------------------------------------------------------------------------------

def chat_doc(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "served-model",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def encode(doc: Any, style: str) -> bytes:
    text = json.dumps(doc) if style == "spaced" else json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode()


TEXTS = st.one_of(
    st.sampled_from(["word ", " the", "", "\u00e9t\u00e9 \u2603", 'say "hi"', "back\\slash", "line\nbreak", "tab\t"]),
    st.text(max_size=12),
)


@st.composite
def chat_streams(draw: st.DrawFn) -> list[bytes]:
    """One event per chunk, as servers send them."""
    style = draw(st.sampled_from(["compact", "spaced"]))
    padded = draw(st.booleans())  # OpenAI's obfuscation: every chunk differs in more than its text
    with_usage_null = draw(st.booleans())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        if padded:
            extra["obfuscation"] = draw(st.text(alphabet="abcdefXYZ0123", min_size=1, max_size=8))
        if with_usage_null and "usage" not in extra:
            extra["usage"] = None
        return encode(chat_doc(delta, finish, **extra), style)

    chunks = [chunk({"role": "assistant", "content": ""})]
    for _ in range(draw(st.integers(0, 3 * HOLD_CHUNKS))):
        kind = draw(st.sampled_from(["text"] * 8 + ["tool", "finish_on_text", "hostile", "hidden", "escaped",
                                                    "reasoning", "error"]))
        if kind == "text":
            chunks.append(chunk({"content": draw(TEXTS)}))
        elif kind == "reasoning":
            chunks.append(chunk({"reasoning_content": draw(TEXTS)}))
        elif kind == "tool":
            chunks.append(chunk({"tool_calls": [{"index": draw(st.integers(0, 2)), "id": "call_x",
                                                 "function": {"name": "lookup", "arguments": draw(TEXTS)}}]}))
        elif kind == "finish_on_text":
            chunks.append(chunk({"content": draw(TEXTS)}, "length"))
        elif kind == "error":
            chunks.append(encode({"error": {"type": "server_error", "message": draw(TEXTS)}}, style))
        elif kind == "hidden":  # a fact key a byte search cannot see: split over data lines, or escaped
            chunks.append(draw(st.sampled_from([
                b'data: {"choices":[],"usage"\ndata: :{"prompt_tokens":7,"completion_tokens":3}}\n\n',
                b'data: {"choices":[{"index":0,"delta":{},"fin\\u0069sh_reason":"stop"}]}\n\n',
                b'data: {"choices":[{"index":0,"delta":{"t\\u006fol_calls":[{"index":0,"id":"c9",'
                b'"function":{"name":"rm","arguments":"{}"}}]}}]}\n\n'])))
        elif kind == "escaped":  # template-shaped bytes whose raw "text" plays with backslashes and quotes
            raw = draw(st.sampled_from([
                b"x\\", b"x\\\\", b"x\\\\\\", b'x\\"', b'x\\"},"finish_reason":"stop',
                b'x\\\\"},"finish_reason":"stop","z":"', b'x"},"finish_reason":"stop","z":"', b"x\\u0022y"]))
            head, _, tail = chunk({"content": "\x00"}).partition(b"\\u0000")
            chunks.append(head + raw + tail)
        else:  # template-shaped bytes whose "text" ends the line and smuggles in an event of its own
            smuggled = draw(st.sampled_from([
                b"data: [DONE]", b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}',
                b"event: error\ndata: {}", b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}']))
            head, _, tail = chunk({"content": "\x00"}).partition(b"\\u0000")
            chunks.append(head + b"x\n\n" + smuggled + b"\n\n" + tail)
    if draw(st.booleans()):
        chunks.append(chunk({}, "stop"))
    if draw(st.booleans()):
        chunks.append(encode(chat_doc({}, None, usage={"prompt_tokens": 11, "completion_tokens": 5}) | {
            "choices": []}, style))
    if draw(st.booleans()):
        chunks.append(b"data: [DONE]\n\n")
    return chunks


def named(name: str, doc: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


@st.composite
def anthropic_streams(draw: st.DrawFn) -> list[bytes]:
    chunks = [named("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 9, "output_tokens": 1}}}),
        named("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})]
    for _ in range(draw(st.integers(0, 3 * HOLD_CHUNKS))):
        kind = draw(st.sampled_from(["text"] * 8 + ["ping", "tool", "hostile"]))
        if kind == "text":
            chunks.append(named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                        "delta": {"type": "text_delta", "text": draw(TEXTS)}}))
        elif kind == "ping":
            chunks.append(named("ping", {"type": "ping"}))
        elif kind == "tool":
            chunks.append(named("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                "type": "input_json_delta", "partial_json": draw(TEXTS)}}))
        else:
            head, _, tail = named("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "text_delta", "text": "\x00"}}).partition(b"\\u0000")
            chunks.append(head + b"x\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":"
                          b"{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":2}}\n\n" + tail)
    chunks += [named("content_block_stop", {"type": "content_block_stop", "index": 0}),
               named("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                       "usage": {"output_tokens": 40}})]
    if draw(st.booleans()):
        chunks.append(named("message_stop", {"type": "message_stop"}))
    return chunks


def regrouped(chunks: list[bytes], cuts: list[int]) -> list[bytes]:
    """The same bytes cut elsewhere (inside events too)."""
    stream = b"".join(chunks)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in pairwise(points) if b > a]


# -- the property --------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(chunks=chat_streams())
def test_chat_facts_are_those_of_reading_every_event(chunks: list[bytes]) -> None:
    assert facts_of(by_call("chat.completions", chunks)) == read_whole("chat.completions", chunks)


@settings(max_examples=150, deadline=None)
@given(chunks=anthropic_streams())
def test_anthropic_facts_are_those_of_reading_every_event(chunks: list[bytes]) -> None:
    assert facts_of(by_call("messages", chunks)) == read_whole("messages", chunks)


@settings(max_examples=150, deadline=None)
@given(chunks=chat_streams(), cuts=st.lists(st.integers(0, 20_000), max_size=12))
def test_chat_facts_do_not_depend_on_where_the_stream_was_cut(chunks: list[bytes], cuts: list[int]) -> None:
    assert facts_of(by_call("chat.completions", regrouped(chunks, cuts))) == read_whole("chat.completions", chunks)


def test_an_answer_cut_short_still_counts_what_was_held() -> None:
    """No `feed(b"")` when the agent went away: `result()` settles what is held."""
    chunks = [encode(chat_doc({"content": f"w{i}"}), "compact") for i in range(5)]
    chunks.append(encode(chat_doc({"content": "x"}, "length"), "compact"))
    observer = LlmResponseObserver(request_of("chat.completions"), streamed=True)
    for chunk in chunks:
        observer(chunk)
    assert observer.result(complete=False)["finish_reasons"] == ["length"]


# -- what is skipped is really skipped -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["uniform", "padded", "numbered"])
def test_content_deltas_are_held_and_never_parsed(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uniform deltas and OpenAI's padded ones fit a template; deltas that differ in another way (a number
    that counts up, before the text) are found quiet by the substring counts, and the useless template is
    dropped after two of them in a row."""
    counter = iter(range(10_000))

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        if shape == "padded":
            extra["obfuscation"] = "pad" * (len(delta.get("content", "")) % 4)
        doc = chat_doc(delta, finish, usage=None, **extra)
        if shape == "numbered":
            doc["created"] = next(counter)
        return encode(doc, "compact")

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": f"w{i} "}) for i in range(400)]
    chunks += [chunk({}, "stop"), encode({"id": "c", "choices": [], "usage": {"prompt_tokens": 5,
                                                                             "completion_tokens": 400}}, "compact"),
               b"data: [DONE]\n\n"]
    loads = counted(monkeypatch, json, "loads")
    observer = by_call("chat.completions", chunks)
    assert loads() <= 5   # the role, the first token, the finish and the usage
    assert (observer._template is not None) is (shape != "numbered")
    facts = facts_of(observer)
    assert facts["usage"] == {"input_tokens": 5, "output_tokens": 400} and facts["finish_reasons"] == ["stop"]
    assert facts["complete"] is True


# -- the tests' building blocks ------------------------------------------------------------------------------

DELTA = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hello"},"finish_reason":null}]}\n\n'
KEYS = (b"content", b"obfuscation")


def test_a_template_is_learned_only_from_a_plain_single_event() -> None:
    template = ChunkTemplate.learn(DELTA, KEYS)
    assert template is not None and template.head.endswith(b'"content":"') and template.tail.startswith(b'"}')
    assert ChunkTemplate.learn(DELTA + DELTA, KEYS) is None                     # two events
    assert ChunkTemplate.learn(DELTA.replace(b"\n\n", b"\r\n\r\n"), KEYS) is None
    escaped = ChunkTemplate.learn(DELTA.replace(b"hello", b'he\\"llo'), KEYS)   # an escaped quote in the text
    assert escaped is not None and escaped.head == template.head and escaped.tail == template.tail
    assert ChunkTemplate.learn(DELTA.replace(b"hello", b"hel\tlo"), KEYS) is None
    assert ChunkTemplate.learn(DELTA, (b"text",)) is None
    assert ChunkTemplate.learn(DELTA.replace(b'"id":"c"', b'"content":"c"'), KEYS) is None  # twice


@pytest.mark.parametrize(("text", "fits"), [
    (b"other words", True), (b"", True), (b"\xc3\xa9t\xc3\xa9", True),
    (b"a\\u0022", True), (b"code\\n\\tindented", True), (b"back\\\\slash", True), (b'say \\"hi\\"', True),
    (b"ends in an escaped backslash\\\\", True),
    (b'a"b', False), (b"ends in a lone backslash\\", False), (b"three\\\\\\", False), (b"a\nb", False),
    (b"a\rb", False), (b"a\x00", False),
])
def test_a_chunk_fits_only_if_its_text_cannot_end_the_string_or_the_line(text: bytes, fits: bool) -> None:
    template = ChunkTemplate.learn(DELTA, KEYS)
    assert template is not None
    chunk = DELTA.replace(b"hello", text)
    assert template.fits(chunk) is fits
    run = [DELTA] * 5 + [chunk] + [DELTA] * 5
    assert template.fits_all(run, b"".join(run)) is fits


PADDED = DELTA.replace(b"}]}", b'}],"usage":null,"obfuscation":"Zx81"}')


@pytest.mark.parametrize(("text", "pad", "fits"), [
    (b"other words", b"q", True), (b"", b"longer-padding", True),
    (b"a", b"Zx\\81", True), (b'a \\"quoted\\"', b"q", True), (b"a\\\\", b"q", True),
    (b"a", b'Zx"81', False), (b"a", b"Zx81\\", False), (b"a\\", b"q", False), (b"a", b"Zx\n81", False),
    # a text that ends itself and forges the rest of the event: the real middle follows, so quotes are left over
    (b'a"},"finish_reason":"stop"}],"usage":null,"obfuscation":"x', b"q", False),
])
def test_a_padded_template_lets_the_text_and_the_padding_vary(text: bytes, pad: bytes, fits: bool) -> None:
    template = ChunkTemplate.learn(PADDED, KEYS)
    assert template is not None and len(template.middles) == 1
    chunk = PADDED.replace(b"hello", text).replace(b"Zx81", pad)
    assert template.fits(chunk) is fits
    run = [PADDED, chunk, PADDED]
    assert template.fits_all(run, b"".join(run)) is fits
    assert not template.fits(DELTA)   # no padding at all: another shape


def test_head_and_tail_may_not_overlap() -> None:
    """A chunk may start with the head and end with the tail by sharing their quote: one special byte short,
    which a quote in another chunk's text would make up for in the run's count."""
    template = ChunkTemplate.learn(DELTA, KEYS)
    assert template is not None
    overlapped = template.head + template.tail[1:]
    assert overlapped.startswith(template.head) and overlapped.endswith(template.tail)
    assert not template.fits(overlapped)
    run = [overlapped, DELTA.replace(b"hello", b'he"llo')]
    assert not template.fits_all(run, b"".join(run))


@pytest.mark.parametrize(("run", "quiet"), [
    (DELTA * 3, True),
    (DELTA.replace(b":null", b": null") * 2, True),
    (DELTA + DELTA.replace(b'"finish_reason":null', b'"finish_reason":"stop"'), False),
    (DELTA.replace(b'"finish_reason":null', b'"finish_reason" : null'), False),   # unusual: look closer
    (DELTA + b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n', False),
    (DELTA + b"data: [DONE]\n\n", False),
    (DELTA.replace(b'"content":"hello"', b'"tool_calls":[{"index":0}]'), False),
    (b"event: error\n" + DELTA, False),
])
def test_chat_run_quiet(run: bytes, quiet: bool) -> None:
    assert chat_run_quiet(run) is quiet


def test_anthropic_run_quiet() -> None:
    delta = named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": "hi"}})
    assert anthropic_run_quiet(delta * 3 + named("ping", {"type": "ping"}))
    assert not anthropic_run_quiet(delta + named("message_delta", {"type": "message_delta"}))
    assert not anthropic_run_quiet(delta + named("content_block_stop", {"type": "content_block_stop"}))


@pytest.mark.parametrize(("chunk", "taken"), [
    (b"data: x\n\n", True), (b"data:x\n\n", True), (b"data:  two spaces\n\n", True),
    (b"data: \xff\xfe bad utf-8\n\n", True), (b"data:\n\n", True),
    (b"data: x\r\n\r\n", False), (b"event: a\ndata: x\n\n", False), (b"data: a\n\ndata: b\n\n", False),
    (b": comment\n\n", False), (b"data: x\n", False), (b"\xef\xbb\xbfdata: bom\n\n", False),
    (b"id: 7\ndata: x\n\n", False), (b"data: " + b"y" * 200 + b"\n\n", False),
])
def test_lone_data_is_what_feed_would_give(chunk: bytes, taken: bool) -> None:
    """The short way takes exactly the one-line events, and gives what `feed` gives; the rest go to `feed`."""
    short, full = SseParser(max_event=100), SseParser(max_event=100)
    data = short.lone_data(chunk)
    events = full.feed(chunk)
    assert (data is not None) is taken
    if data is not None:
        assert [(e.event, e.data, e.id) for e in events] == [("message", data, None)]
        assert short.idle and full.idle


def test_lone_data_needs_an_idle_parser() -> None:
    parser = SseParser()
    parser.feed(b"data: unfinished")
    assert parser.lone_data(b"data: x\n\n") is None


def test_a_failing_observer_passes_the_rest_on_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    observer = LlmResponseObserver(request_of("chat.completions"), streamed=True)
    first = encode(chat_doc({"role": "assistant", "content": "hi"}), "compact")
    assert observer(first) is first

    def broken(doc: dict[str, Any]) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(observer, "_take_chat_chunk", broken)
    finish = encode(chat_doc({}, "stop"), "compact")
    assert observer(finish) is finish and isinstance(observer.failure, RuntimeError)
    later = b"data: [DONE]\n\n"
    assert observer(later) is later and observer(b"") == b""
    facts = observer.result()
    assert facts["response_model"] == "served-model" and facts["finish_reasons"] == []


def test_a_ping_now_and_then_does_not_cost_the_template(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [named("message_start", {"type": "message_start", "message": {"id": "m", "model": "claude-x"}})]
    for i in range(300):
        chunks.append(named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": f"w{i} "}}))
        if i % 10 == 9:
            chunks.append(named("ping", {"type": "ping"}))
    chunks.append(named("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                          "usage": {"output_tokens": 300}}))
    parsed = counted(monkeypatch, SseParser, "feed")
    observer = by_call("messages", chunks)
    assert observer._template is not None and parsed() <= 5
    assert facts_of(observer) == read_whole("messages", chunks)


FIRST = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
MS = named("message_start", {"type": "message_start", "message": {
    "id": "msg", "model": "claude", "usage": {"input_tokens": 5, "output_tokens": 1}}})
TEXT = named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "Hi"}})
RC = (b'event: response.created\ndata: {"type":"response.created","response":{"id":"r","model":"gpt",'
      b'"status":"in_progress"}}\n\n')
RD = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
COMPLETED = b'data: {"type":"response.completed","response":{"id":"r","status":"completed","usage":{"input_tokens":3,' \
            b'"output_tokens":4}}}\n\n'


@pytest.mark.parametrize(("api", "chunks", "fact", "value"), [
    ("chat.completions", [FIRST, FIRST, b'data: {"id":"c","choices":[],"usage"\ndata: :{"prompt_tokens":7,'
                          b'"completion_tokens":3}}\n\n'], "usage", {"input_tokens": 7, "output_tokens": 3}),
    ("chat.completions", [FIRST, FIRST, b'data: {"choices":[{"index":0,"delta":{},"fin\\u0069sh_reason":"stop"}]}'
                          b"\n\n"], "finish_reasons", ["stop"]),
    ("chat.completions", [FIRST, b'data: {"choices":[],"usage"\rdata: :{"prompt_tokens":7}}\r\r'], "usage",
     {"input_tokens": 7}),
    ("messages", [MS, TEXT, TEXT, b'data: {"type":"content_block_\\u0073tart","index":1,"content_block":'
                  b'{"type":"tool_use","id":"toolu_1","name":"delete_all"}}\n\n'], "tool_calls",
     [{"id": "toolu_1", "name": "delete_all", "arguments": ""}]),
    ("messages", [MS, TEXT, TEXT, b'event: content_block_delta\ndata: {"type":"message\\u005fdelta","delta":'
                  b'{"stop_reason":"tool_use"},"usage":{"output_tokens":999}}\n\n'], "finish_reasons", ["tool_use"]),
    ("responses", [RC, RD, b": event: response.output_text.delta\n" + COMPLETED], "complete", True),
    ("responses", [RC, RD, b"event: response.output_text.delta\nevent\n" + COMPLETED], "complete", True),
], ids=["chat-key-split-over-lines", "chat-escaped-key", "chat-cr-lines", "anthropic-escaped-type",
        "anthropic-escaped-type-in-a-delta", "responses-comment", "responses-bare-event-line"])
def test_names_hidden_from_byte_searches_are_still_read(api: str, chunks: list[bytes], fact: str, value: Any) -> None:
    """A key split over `data:` lines, a JSON escape spelling a name, a comment or bare `event` line renaming an
    event: none of it hides a fact (tool calls from the audit, usage from the budgets)."""
    facts = facts_of(by_call(api, [*chunks, *chunks[-1:]]))
    assert facts == read_whole(api, [*chunks, *chunks[-1:]])
    assert facts[fact] == value or (fact == "finish_reasons" and facts[fact] == value * 2)


def test_a_quote_now_and_then_does_not_cost_the_template(monkeypatch: pytest.MonkeyPatch) -> None:
    """A delta whose text holds a quote (`\\"` in the JSON) does not fit; its run is read by the counts, and the
    template is kept for the runs after it."""
    chunks = [encode(chat_doc({"role": "assistant", "content": ""}), "compact")]
    chunks += [encode(chat_doc({"content": 'say "hi" ' if i % 40 == 5 else f"w{i}\n"}), "compact")
               for i in range(400)]
    chunks.append(encode(chat_doc({}, "stop"), "compact"))
    loads = counted(monkeypatch, json, "loads")
    observer = by_call("chat.completions", chunks)
    assert observer._template is not None and loads() <= 4
    assert facts_of(observer) == read_whole("chat.completions", chunks)


def test_an_escaped_closing_quote_is_not_made_up_for_by_a_bare_quote_elsewhere() -> None:
    """One text ending in a lone backslash (its closing quote escaped: one quote short) and another holding a
    bare quote (one too many): the run's count balances, the shapes do not."""
    template = ChunkTemplate.learn(DELTA, KEYS)
    assert template is not None
    run = [DELTA.replace(b"hello", b"hello\\"), DELTA.replace(b"hello", b'he"llo')]
    assert not template.fits_all(run, b"".join(run))
    padded = ChunkTemplate.learn(PADDED, KEYS)
    assert padded is not None
    run = [PADDED.replace(b"Zx81", b"Zx81\\"), PADDED.replace(b"Zx81", b'Z"x81')]
    assert not padded.fits_all(run, b"".join(run))


def test_the_last_middle_and_the_tail_may_not_overlap() -> None:
    padded = ChunkTemplate.learn(PADDED, KEYS)
    assert padded is not None
    overlapped = PADDED.replace(b'"Zx81"}', b'"}')   # the middle's last quote is the tail's first
    assert overlapped.endswith(padded.tail)
    run = [overlapped, PADDED.replace(b"Zx81", b'Z"x81')]   # one quote short, one too many
    assert not padded.fits_all(run, b"".join(run))
