"""LLM awareness: request detection, SSE parsing, and what each API's answer tells the audit.

The fixtures are built the way the real APIs send them (OpenAI chat chunks with `"usage":null` on every chunk,
Responses lifecycle events, Anthropic's named events with pings), then cut into chunks anywhere: the facts must
not depend on where the network split the stream. Junk (random bytes, random JSON in every event) must never
raise, and the streaming fast path must really skip parsing for plain content deltas.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.calls import counted

from bastion.protocols import llm as llm_module
from bastion.protocols.llm import (
    BIG_BODY,
    LLM_PATH_ENDS,
    MAX_ARGUMENTS,
    MAX_TOOL_CALLS,
    MAX_TOOL_NAMES,
    MAX_TOOLS,
    LlmRequest,
    LlmResponseObserver,
    llm_body_problem,
    llm_request,
    may_be_llm,
    usage_tokens,
)
from bastion.protocols.sse import SseEvent, SseParser

# ---------------------------------------------------------------------------------------------------------------
# helpers


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def data_events(*objs: Any) -> bytes:
    """OpenAI chat style: unnamed `data:` events."""
    return "".join(f"data: {obj if isinstance(obj, str) else compact(obj)}\n\n" for obj in objs).encode()


def named_events(*pairs: tuple[str, Any]) -> bytes:
    """Anthropic / Responses style: `event:` then `data:` (Anthropic's ping has a space after the colon)."""
    return "".join(f"event: {name}\ndata: {compact(obj)}\n\n" for name, obj in pairs).encode()


class Ticks:
    """A clock that advances one second per reading, so the first-token reading is identifiable."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def request_of(api: str, *, model: str | None = "m", stream: bool = True, tools: tuple[str, ...] = ()) -> LlmRequest:
    provider = "anthropic" if api == "messages" else "openai"
    operation = {"completions": "text_completion", "embeddings": "embeddings"}.get(api, "chat")
    return LlmRequest(provider=provider, api=api, operation=operation, model=model, stream=stream, tools=tools)


def observe(request: LlmRequest, chunks: list[bytes], clock: Callable[[], float] | None = None) -> LlmResponseObserver:
    observer = LlmResponseObserver(request, streamed=True, clock=clock or Ticks())
    for chunk in chunks:
        observer.feed(chunk)
    observer.feed(b"")
    return observer


def splits(stream: bytes) -> Iterator[list[bytes]]:
    """The stream in two pieces at every offset, then byte by byte (never an empty piece: `b""` ends a body)."""
    for offset in range(1, len(stream)):
        yield [stream[:offset], stream[offset:]]
    yield [stream[i:i + 1] for i in range(len(stream))]


def without_timing(facts: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in facts.items() if key != "time_to_first_token_s"}


# ---------------------------------------------------------------------------------------------------------------
# fixtures as the APIs send them

CHAT_ID = "chatcmpl-AbC123"
CHAT_MODEL = "gpt-4o-2024-08-06"


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": CHAT_ID, "object": "chat.completion.chunk", "created": 1727000000, "model": CHAT_MODEL,
        "system_fingerprint": "fp_abc", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": finish}], "usage": None, **extra,
    }


CHAT_TOOL_STREAM = data_events(
    chat_chunk({"role": "assistant", "content": "", "refusal": None}),
    chat_chunk({"content": "Checking the wéather ☀ "}),
    chat_chunk({"content": "for you."}),
    chat_chunk({"tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                                "function": {"name": "get_weather", "arguments": ""}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"loc'}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ation": "Par'}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}),
    chat_chunk({"tool_calls": [{"index": 1, "id": "call_def", "type": "function",
                                "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}]}),
    chat_chunk({}, finish="tool_calls"),
    {**chat_chunk({}), "choices": [], "usage": {
        "prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99,
        "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}},
    "[DONE]",
)

RESPONSE_ID = "resp_67ccd2bed1ec8190"


def response_object(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": RESPONSE_ID, "object": "response", "created_at": 1741476542, "status": status,
            "model": "gpt-4.1-2025-04-14", "output": [], "usage": None, "error": None,
            "incomplete_details": None, **extra}


RESPONSES_INCOMPLETE_STREAM = named_events(
    ("response.created", {"type": "response.created", "sequence_number": 0,
                          "response": response_object("in_progress")}),
    ("response.in_progress", {"type": "response.in_progress", "sequence_number": 1,
                              "response": response_object("in_progress")}),
    ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
                                    "item": {"id": "msg_1", "type": "message", "status": "in_progress",
                                             "role": "assistant", "content": []}}),
    ("response.content_part.added", {"type": "response.content_part.added", "sequence_number": 3,
                                     "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                     "part": {"type": "output_text", "text": "", "annotations": []}}),
    *[("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 4 + i,
                                      "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                      "delta": word}) for i, word in enumerate(["Once", " upon", " a"])],
    ("response.incomplete", {"type": "response.incomplete", "sequence_number": 7, "response": response_object(
        "incomplete", incomplete_details={"reason": "max_output_tokens"},
        output=[{"id": "msg_1", "type": "message", "status": "incomplete", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Once upon a", "annotations": []}]}],
        usage={"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 16,
               "output_tokens_details": {"reasoning_tokens": 13}, "total_tokens": 52})}),
)

RESPONSES_TOOL_STREAM = named_events(
    ("response.created", {"type": "response.created", "sequence_number": 0,
                          "response": response_object("in_progress")}),
    ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
                                    "item": {"id": "fc_1", "type": "function_call", "status": "in_progress",
                                             "arguments": "", "call_id": "call_xyz", "name": "search_docs"}}),
    ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta",
                                                "sequence_number": 2, "item_id": "fc_1", "output_index": 0,
                                                "delta": '{"q":'}),
    ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta",
                                                "sequence_number": 3, "item_id": "fc_1", "output_index": 0,
                                                "delta": '"bastion"}'}),
    ("response.function_call_arguments.done", {"type": "response.function_call_arguments.done",
                                               "sequence_number": 4, "item_id": "fc_1", "output_index": 0,
                                               "arguments": '{"q":"bastion"}'}),
    ("response.output_item.done", {"type": "response.output_item.done", "sequence_number": 5, "output_index": 0,
                                   "item": {"id": "fc_1", "type": "function_call", "status": "completed",
                                            "arguments": '{"q":"bastion"}', "call_id": "call_xyz",
                                            "name": "search_docs"}}),
    ("response.completed", {"type": "response.completed", "sequence_number": 6, "response": response_object(
        "completed", output=[{"id": "fc_1", "type": "function_call", "status": "completed",
                              "arguments": '{"q":"bastion"}', "call_id": "call_xyz", "name": "search_docs"}],
        usage={"input_tokens": 50, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 9,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 59})}),
)

CLAUDE_MODEL = "claude-sonnet-4-5-20250929"

ANTHROPIC_TOOL_STREAM = (
    named_events(("message_start", {"type": "message_start", "message": {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": CLAUDE_MODEL,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 3000,
                  "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}))
    + b'event: ping\ndata: {"type": "ping"}\n\n'
    + named_events(
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Let me look that up"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": " — one moment."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": '{"location": "San Fra'}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": 'ncisco, CA"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"output_tokens": 89}}),
        ("message_stop", {"type": "message_stop"}),
    )
)


# ---------------------------------------------------------------------------------------------------------------
# SSE parser


def parse_all(stream: bytes, chunks: list[bytes] | None = None, max_event: int = 1 << 20) -> list[SseEvent]:
    parser = SseParser(max_event=max_event)
    events: list[SseEvent] = []
    for chunk in chunks if chunks is not None else [stream]:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_sse_line_ends_split_anywhere(newline: bytes) -> None:
    stream = (b"\xef\xbb\xbf: a comment\n" + b"event: delta\ndata: h\xc3\xa9llo\ndata:  two spaces\nid: 7\n\n"
              + b"data:no space\ndata\n\n" + b"retry: 10\nunknown: x\n\n").replace(b"\n", newline)
    expected = [SseEvent(event="delta", data="héllo\n two spaces", id="7"),
                SseEvent(event="message", data="no space\n", id="7")]
    for chunks in splits(stream):
        assert parse_all(stream, chunks) == expected


def test_sse_cr_then_lf_in_next_chunk_is_one_line_end() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == [SseEvent(data="a")]
    assert parser.feed(b"\ndata: b\r\r") == [SseEvent(data="b")]
    assert parser.close() == []


def test_sse_unterminated_last_event_is_returned_on_close() -> None:
    assert parse_all(b"data: one\n\ndata: two") == [SseEvent(data="one"), SseEvent(data="two")]
    assert parse_all(b"data: one\n\ndata: two\n") == [SseEvent(data="one"), SseEvent(data="two")]
    assert parse_all(b"event: x\n\n") == []   # no data: nothing dispatched


def test_sse_oversize_event_and_line_are_skipped() -> None:
    big_line = b"data: " + b"x" * 5000 + b"\n\n"
    many_lines = b"".join(b"data: " + b"y" * 50 + b"\n" for _ in range(40)) + b"\n"
    stream = b"data: before\n\n" + big_line + many_lines + b"data: after\n\n"
    for chunks in ([stream], [stream[i:i + 7] for i in range(0, len(stream), 7)]):
        parser = SseParser(max_event=1000)
        events = [event for chunk in chunks for event in parser.feed(chunk)] + parser.close()
        assert events == [SseEvent(data="before"), SseEvent(data="after")]
        assert parser.overflowed
    unterminated = SseParser(max_event=1000)
    for _ in range(100):
        assert unterminated.feed(b"z" * 100) == []
    assert unterminated._pending_size <= 1000
    assert unterminated.feed(b"\n\ndata: ok\n\n") == [SseEvent(data="ok")]
    assert unterminated.overflowed


def test_sse_bom_only_at_start_and_split() -> None:
    assert parse_all(b"", [b"\xef", b"\xbb", b"\xbfdata: a\n\n"]) == [SseEvent(data="a")]
    assert parse_all(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [SseEvent(data="a")]   # mid-stream BOM: a field


def test_sse_invalid_utf8_is_replaced_not_raised() -> None:
    assert parse_all(b"data: \xff\xfe ok\n\n") == [SseEvent(data="\ufffd\ufffd ok")]


# ---------------------------------------------------------------------------------------------------------------
# request detection


@pytest.mark.parametrize(
    ("method", "path", "doc", "expected"),
    [
        ("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": []},
         ("openai", "chat.completions", "chat", "gpt-4o")),
        ("POST", "/v1/chat/completions/", {"model": "gpt-4o", "messages": []},
         ("openai", "chat.completions", "chat", "gpt-4o")),
        ("POST", "/api/proxy/openai/v1/chat/completions", {"model": "llama3", "messages": []},
         ("openai", "chat.completions", "chat", "llama3")),
        ("POST", "/openai/deployments/prod-gpt4/chat/completions", {"messages": []},
         ("openai", "chat.completions", "chat", "prod-gpt4")),
        ("POST", "/openai/deployments/prod-gpt4/chat/completions", {"model": 5, "messages": []},
         ("openai", "chat.completions", "chat", "prod-gpt4")),
        ("POST", "/openai/deployments/embed-dep/embeddings", {"input": "x"},
         ("openai", "embeddings", "embeddings", "embed-dep")),
        ("POST", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"},
         ("openai", "completions", "text_completion", "gpt-3.5-turbo-instruct")),
        ("POST", "/v1/completions", {"model": "x", "messages": []}, None),
        ("POST", "/v1/responses", {"model": "gpt-4.1", "input": "hi"}, ("openai", "responses", "chat", "gpt-4.1")),
        ("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a"]},
         ("openai", "embeddings", "embeddings", "text-embedding-3-small")),
        ("POST", "/v1/messages", {"model": CLAUDE_MODEL, "max_tokens": 10, "messages": []},
         ("anthropic", "messages", "chat", CLAUDE_MODEL)),
        ("POST", "/v1/messages", {"model": CLAUDE_MODEL, "messages": "not a list"}, None),
        ("POST", "/v1/threads/t1/messages", {"role": "user", "content": "hi"}, None),
        ("POST", "/v1/messages/count_tokens", {"model": CLAUDE_MODEL, "messages": []}, None),
        ("GET", "/v1/chat/completions", {"model": "gpt-4o", "messages": []}, None),
        ("PUT", "/v1/messages", {"model": CLAUDE_MODEL, "messages": []}, None),
        ("POST", "/v1/chat/completions", ["not", "a", "dict"], None),
        ("POST", "/v1/chat/completions", None, None),
        ("POST", "/v1/models", {"model": "x"}, None),
        ("POST", "/", {"model": "x"}, None),
    ],
)
def test_request_detection(method: str, path: str, doc: Any, expected: tuple[str, str, str, str] | None) -> None:
    segments = tuple(path.split("/")[1:])
    request = llm_request(method, segments, {"content-type": "application/json"}, doc)
    if expected is None:
        assert request is None
        return
    assert may_be_llm(method, segments)
    assert request is not None
    assert (request.provider, request.api, request.operation, request.model) == expected


def test_may_be_llm_is_the_cheap_gate() -> None:
    assert {"completions", "responses", "embeddings", "messages"} == LLM_PATH_ENDS
    assert may_be_llm("POST", ("v1", "messages"))
    assert not may_be_llm("GET", ("v1", "messages"))
    assert not may_be_llm("POST", ("v1", "files"))
    assert not may_be_llm("POST", ())


def test_request_tools_stream_and_forced_tool() -> None:
    chat = llm_request("POST", ("v1", "chat", "completions"), {}, {
        "model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}, "messages": [],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
                  {"type": "custom", "custom": {"name": "grammar_tool"}}, "junk", {"type": "function"}, 7],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    })
    assert chat is not None
    assert chat.stream is True and chat.tools == ("get_weather", "grammar_tool")
    assert chat.tool_choice == "get_weather"
    assert chat.to_json() == {"provider": "openai", "api": "chat.completions", "operation": "chat",
                              "request_model": "gpt-4o", "stream": True, "tools": ["get_weather", "grammar_tool"]}

    responses = llm_request("POST", ("v1", "responses"), {}, {
        "model": "gpt-4.1", "stream": "yes", "input": "hi",
        "tools": [{"type": "function", "name": "lookup", "parameters": {}}, {"type": "web_search"},
                  {"type": "file_search", "vector_store_ids": []}],
        "tool_choice": {"type": "function", "name": "lookup"},
    })
    assert responses is not None
    assert responses.stream is False
    assert responses.tools == ("lookup", "web_search", "file_search")
    assert responses.tool_choice == "lookup"

    anthropic = llm_request("POST", ("v1", "messages"), {}, {
        "model": "claude-x", "messages": [], "stream": True,
        "tools": [{"name": "get_weather", "input_schema": {}},
                  {"type": "web_search_20250305", "name": "web_search"}, {"name": 5}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    })
    assert anthropic is not None
    assert anthropic.tools == ("get_weather", "web_search", "web_search_20250305")   # a built-in: name and type
    assert anthropic.tool_choice == "get_weather"

    for choice in ("auto", "required", {"type": "auto"}, {"type": "any"}, {"type": "none"}, None, 3):
        plain = llm_request("POST", ("v1", "messages"), {}, {"messages": [], "tool_choice": choice})
        assert plain is not None and plain.tool_choice is None and plain.model is None


def test_request_caps_hostile_sizes() -> None:
    request = llm_request("POST", ("v1", "chat", "completions"), {}, {
        "model": "m" * 10_000, "messages": [],
        "tools": [{"type": "function", "function": {"name": f"tool{i}" + "x" * 1000}} for i in range(500)],
    })
    assert request is not None
    assert request.model is not None and len(request.model) == 200
    # Rules see every tool, uncut; the audit keeps the first MAX_TOOLS, cut at 200 characters.
    assert len(request.tools) == 500 and request.tools_complete
    assert request.tools[499] == "tool499" + "x" * 1000
    audited = request.to_json()["tools"]
    assert len(audited) == MAX_TOOLS and all(len(name) == 200 for name in audited)
    observed = LlmResponseObserver(request, streamed=False).result()["tools"]
    assert observed == audited


# ---------------------------------------------------------------------------------------------------------------
# request detection against hostile shapes: what a deny rule on a model or tool must see


def _chat_tools(tools: list[Any], key: str = "tools") -> LlmRequest:
    request = llm_request("POST", ("v1", "chat", "completions"), {}, {"model": "m", "messages": [], key: tools})
    assert request is not None
    return request


def test_rules_see_every_tool_offered_and_fail_closed_beyond_the_limit() -> None:
    offered = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(MAX_TOOLS)]
    last = _chat_tools([*offered, {"type": "function", "function": {"name": "delete_everything"}}])
    assert last.tools[-1] == "delete_everything" and last.tools_complete
    assert "delete_everything" not in last.to_json()["tools"]   # the audit keeps the first MAX_TOOLS only
    legacy = _chat_tools([{"name": f"f{i}"} for i in range(100)] + [{"name": "delete_everything"}], "functions")
    assert legacy.tools[-1] == "delete_everything" and legacy.tools_complete

    at_limit = _chat_tools([{"type": "function", "function": {"name": f"t{i}"}} for i in range(MAX_TOOL_NAMES)])
    assert len(at_limit.tools) == MAX_TOOL_NAMES and at_limit.tools_complete
    for too_many in ([{"name": f"t{i}"} for i in range(MAX_TOOL_NAMES + 1)],
                     [0] * (MAX_TOOL_NAMES + 1),   # junk entries count: nobody can say what the server makes of them
                     [{"type": "function", "name": f"a{i}", "function": {"name": f"b{i}"}}
                      for i in range(MAX_TOOL_NAMES // 2 + 1)]):   # two names each: more names than the limit
        request = _chat_tools(too_many)
        assert not request.tools_complete and len(request.tools) <= MAX_TOOL_NAMES


def test_every_name_a_tool_carries_is_a_tool_name() -> None:
    two_names = _chat_tools([{"type": "function", "name": "x", "function": {"name": "delete_everything"}}])
    assert two_names.tools == ("x", "delete_everything")   # Responses servers read `name`, chat servers the other
    custom = _chat_tools([{"type": "custom", "name": "a", "custom": {"name": "b"}, "function": {"name": "c"}}])
    assert custom.tools == ("a", "c", "b")
    same = _chat_tools([{"type": "function", "name": "same", "function": {"name": "same"}}])
    assert same.tools == ("same",)
    built_in = llm_request("POST", ("v1", "messages"), {}, {"messages": [], "tools": [
        {"type": "bash_20250124", "name": "bash"}, {"type": "web_search"}, {"type": "custom", "name": "mine"}]})
    assert built_in is not None and built_in.tools == ("bash", "bash_20250124", "web_search", "mine")
    long_name = "x" * 5000 + "delete_everything"
    uncut = _chat_tools([{"type": "function", "function": {"name": long_name}}],)
    assert uncut.tools == (long_name,) and uncut.to_json()["tools"] == ["x" * 200]   # rules see it all
    forced = llm_request("POST", ("v1", "chat", "completions"), {}, {
        "messages": [], "tool_choice": {"type": "function", "function": {"name": long_name}}})
    assert forced is not None and forced.tool_choice == long_name


@pytest.mark.parametrize(("path", "doc", "model"), [
    ("/openai/deployments/o1-pro/chat/completions", {"model": "gpt-4o-mini", "messages": []}, "o1-pro"),
    ("/openai/deployments/o1-pro/completions", {"model": "gpt-4o-mini", "prompt": "x"}, "o1-pro"),
    ("/openai/deployments/embed/embeddings", {"model": "gpt-4o-mini", "input": "x"}, "embed"),
    ("/openai/Deployments/o1-pro/Chat/Completions", {"model": "gpt-4o-mini", "messages": []}, "o1-pro"),
    # The segment just before the API's own is the one Azure routes on, whatever comes earlier in the path.
    ("/gw/deployments/cheap/openai/deployments/o1-pro/chat/completions", {"model": "x", "messages": []}, "o1-pro"),
    ("/openai/deployments/o1-pro/extensions/chat/completions", {"model": "x", "messages": []}, "o1-pro"),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, "gpt-4o-mini"),
])
def test_azure_routes_on_the_deployment_in_the_path(path: str, doc: dict[str, Any], model: str) -> None:
    request = llm_request("POST", tuple(path.split("/")[1:]), {}, doc)
    assert request is not None and request.model == model
    assert request.body_model == doc["model"]
    facts = request.to_json()
    answer = LlmResponseObserver(request, streamed=False).result()
    assert facts["request_model"] == answer["request_model"] == model
    if model == doc["model"]:
        assert "body_model" not in facts and "body_model" not in answer
    else:
        assert facts["body_model"] == answer["body_model"] == doc["model"]


@pytest.mark.parametrize(("path", "api"), [
    ("/v1/chat/Completions", "chat.completions"),
    ("/V1/CHAT/COMPLETIONS", "chat.completions"),
    ("/V1/Messages", "messages"),
    ("/v1/me\u017f\u017fages", "messages"),              # long s: a .NET router upper-cases it to S
    ("/v1/\uff45\uff4d\uff42\uff45\uff44\uff44\u0131ngs", "embeddings"),   # fullwidth letters, dotless i
    ("/v1/Responses/", "responses"),
    ("/v1/Completions", "completions"),
])
def test_path_endings_are_recognised_in_any_letter_case(path: str, api: str) -> None:
    segments = tuple(path.split("/")[1:])
    assert may_be_llm("POST", segments)
    doc = {"model": "o1-pro", "messages": [], "prompt": "x", "input": "x"}
    request = llm_request("POST", segments, {}, doc)
    assert request is not None and request.api == api and request.model == "o1-pro"


def test_long_odd_segments_are_not_folded() -> None:
    assert not may_be_llm("POST", ("v1", "\u00e9" * 10_000))
    assert not may_be_llm("POST", ("v1", "messages\u00e9"))


# ---------------------------------------------------------------------------------------------------------------
# llm_body_problem: members that parsers read differently

MSG = '[{"role":"user","content":"hi"}]'
TOOL = '{"type":"function","function":{"name":"x","parameters":{}}}'


def _filled(body: str) -> str:
    """Bodies below are written with @M for a messages list and @T for a tool object."""
    return body.replace("@M", MSG).replace("@T", TOOL)


@pytest.mark.parametrize(("body", "member"), [
    ('{"model":"gpt-4o-mini","Model":"o1-pro","messages":@M}', "'Model'"),
    ('{"MODEL":"o1-pro","messages":@M}', "'MODEL'"),
    ('{"model":"o1-pro","model":"gpt-4o-mini","messages":@M}', "'model'"),
    ('{"model":"o1-pro","messages":@M,"model":"gpt-4o-mini"}', "'model'"),
    ('{"mod\\u0065l":"o1-pro","model":"gpt-4o-mini","messages":@M}', "'model'"),
    ('{"\\u006d\\u006f\\u0064\\u0065\\u006c":"o1-pro","model":"x","messages":@M}', "'model'"),
    ('{"model":"x","messages":@M,"\u017ftream":true}', "'\\u017ftream'"),
    ('{"model":"x","messages":@M,"\\u017ftream":true}', "'\\u017ftream'"),
    ('{"model":"x","messages":"no","messages":@M}', "'messages'"),
    ('{"model":"x","Messages":@M}', "'Messages'"),
    ('{"model":"x","input":"a","input":"b"}', "'input'"),
    ('{"model":"x","Prompt":"a"}', "'Prompt'"),
    ('{"model":"x","stream":false,"stream":true,"messages":[]}', "'stream'"),
    ('{"model":"x","messages":[],"tools":[],"tools":[@T]}', "'tools'"),
    ('{"model":"x","messages":[],"TOOLS":[@T]}', "'TOOLS'"),
    ('{"model":"x","messages":[],"tool_choice":"auto","Tool_Choice":"none"}', "'Tool_Choice'"),
    ('{"model":"x","messages":[],"function_call":"auto","function_call":{"name":"y"}}', "'function_call'"),
    # inside a tool, the members that name it
    ('{"model":"x","messages":[],"tools":[{"type":"function","function":{"name":"delete_everything","name":"x"}}]}',
     "'name' of tools[0].function"),
    ('{"model":"x","messages":[],"tools":[@T,{"type":"function","function":{"name":"x","Name":"delete"}}]}',
     "'Name' of tools[1].function"),
    ('{"model":"x","messages":[],"tools":[{"type":"function","function":{"name":"x"},"function":{"name":"y"}}]}',
     "'function' of tools[0]"),
    ('{"model":"x","messages":[],"tools":[{"type":"function","Function":{"name":"y"},"function":{"name":"x"}}]}',
     "'Function' of tools[0]"),
    ('{"model":"x","messages":[],"tools":[{"type":"web_search","type":"function","name":"x"}]}', "'type' of tools[0]"),
    ('{"model":"x","messages":[],"tools":[{"name":"a","NAME":"b","input_schema":{}}]}', "'NAME' of tools[0]"),
    ('{"model":"x","messages":[],"tools":[{"type":"custom","cu\u017ftom":{"name":"b"}}]}', "of tools[0]"),
    ('{"model":"x","messages":[],"tools":[{"type":"custom","custom":{"n\\u0061me":"a","name":"b"}}]}',
     "'name' of tools[0].custom"),
    ('{"model":"x","messages":[],"functions":[{"name":"a","name":"b"}]}', "'name' of functions[0]"),
    ('{"model":"x","messages":[],"tool_choice":{"type":"function","function":{"name":"a","name":"b"}}}',
     "'name' of tool_choice.function"),
    ('{"model":"x","messages":[],"tool_choice":{"type":"tool","name":"a","Name":"b"}}', "'Name' of tool_choice"),
    ('{"model":"x","messages":[],"function_call":{"name":"a","name":"b"}}', "'name' of function_call"),
])
def test_body_problems_are_found(body: str, member: str) -> None:
    raw = _filled(body).encode()
    for problem in (llm_body_problem(raw, json.loads(raw)), llm_body_problem(raw)):
        assert problem is not None and member in problem


@pytest.mark.parametrize("body", [
    '{"model":"x","messages":@M,"tools":[@T],"tool_choice":"auto","stream":true}',
    '{ "model" : "x" ,\n "messages" :\t@M , "tools" : [ @T ] }',
    # duplicates and other cases below the members that decide, or outside the tools: not ours to judge
    '{"model":"x","messages":[{"role":"user","content":"hi","name":"a","name":"b"}],"metadata":{"Model":"y"}}',
    '{"model":"x","messages":[],"tools":[{"type":"function","function":{"name":"x","parameters":'
    '{"properties":{"model":{"type":"string"},"Name":{"type":"string","type":"number"}}}}}]}',
    '{"model":"x","messages":[{"role":"user","content":"say \\"model\\": \\"o1-pro\\" \\u00e9\\u4e2d"}]}',
    '{"model":"x","messages":[{"role":"user","content":"\\u0041 \\u006dodel"}],"n\\u0061me_of_it":1}',
    '{"model":"x","input":[{"type":"mcp_list_tools","tools":[{"name":"a"}]}],"tools":[{"type":"mcp"}]}',
    '{"model":"x","messages":[],"tools":[{"type":"function","name":"x","function":{"name":"y"}}]}',
    '{"model":"x","tools":[@T],"messages":[{"role":"user","content":"5 \u212a, \u017f"}]}',   # read as UTF-8
    '[{"model":"a"},{"model":"b"}]',
    '"model"',
])
def test_plain_bodies_have_no_problem(body: str) -> None:
    raw = _filled(body).encode()
    assert llm_body_problem(raw, json.loads(raw)) is None
    assert llm_body_problem(raw) is None


def test_bodies_in_utf16_are_checked_too() -> None:
    for encoding in ("utf-16", "utf-16-be", "utf-32"):
        plain = json.dumps({"model": "x", "messages": []}).encode(encoding)
        assert llm_body_problem(plain, json.loads(plain)) is None
        twice = '{"model":"x","Model":"o1-pro","messages":[]}'.encode(encoding)
        assert llm_body_problem(twice, json.loads(twice)) is not None
    with_bom = b"\xef\xbb\xbf" + b'{"model":"x","model":"y"}'
    assert llm_body_problem(with_bom, json.loads(with_bom.decode("utf-8-sig"))) is not None


def _agent_body(size: int) -> tuple[bytes, dict[str, Any]]:
    """A chat request as agents send them: tools, history with tool calls and results, non-ASCII text."""
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "Reads a file. " * 10,
                                               "parameters": {"type": "object", "properties": {
                                                   "path": {"type": "string"}, "name": {"type": "string"}}}}}
             for i in range(20)]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are helpful, naïve, 東京. " * 40}]
    while len(json.dumps(messages)) < size:
        n = len(messages)
        messages += [
            {"role": "user", "content": [{"type": "text", "text": "Please look at the résumé. " * 20}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{n}", "type": "function", "function": {
                "name": "tool_1", "arguments": json.dumps({"path": "/a/b", "name": "x\ny"})}}]},
            {"role": "tool", "tool_call_id": f"call_{n}", "content": "line one\nline \"two\"\n" * 30},
        ]
    doc = {"model": "gpt-4o", "messages": messages, "tools": tools, "tool_choice": "auto", "stream": True}
    return json.dumps(doc).encode(), doc


def test_typical_bodies_take_the_cheap_path(monkeypatch: pytest.MonkeyPatch) -> None:
    exact: list[bytes] = []
    real = llm_module._exact_body_problem
    monkeypatch.setattr(llm_module, "_exact_body_problem", lambda body: exact.append(body) or real(body))
    body, doc = _agent_body(200_000)
    anthropic = json.dumps({"model": "claude", "max_tokens": 100, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": f"t{i}", "name": "read", "input": {"p": i}}]}
        for i in range(50)], "tools": [{"name": "read", "input_schema": {"type": "object"}}]},
        ensure_ascii=False).encode()
    for raw in (body, json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode(), anthropic):
        assert llm_body_problem(raw, json.loads(raw)) is None
    assert exact == []
    hostile = body.replace(b'"tool_choice": "auto"', b'"tool_choice": "auto", "tool\\u005fchoice": "none"')
    assert llm_body_problem(hostile, json.loads(hostile)) is not None and exact == [hostile]


NAMES = ["model", "Model", "mod\\u0065l", "stream", "\u017ftream", "messages", "tools", "TOOLS", "metadata"]
TOOL_NAMES = ["name", "Name", "n\\u0061me", "type", "function", "Function", "description"]


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f'"{key}":{value}' for key, value in pairs) + "}"


@st.composite
def raw_bodies(draw: st.DrawFn) -> str:
    """Small bodies written by hand, so members can repeat or differ in case and escapes as a hostile agent's do."""
    def tool_object(depth: int) -> str:
        keys = draw(st.lists(st.sampled_from(TOOL_NAMES), max_size=4))
        pairs = [(key, tool_object(depth + 1) if key.lower() == "function" and depth == 0 else '"v"') for key in keys]
        return _object(pairs)

    pairs = []
    for key in draw(st.lists(st.sampled_from(NAMES), max_size=6)):
        if key.lower() == "tools":
            value = "[" + ",".join(tool_object(0) for _ in range(draw(st.integers(0, 2)))) + "]"
        else:
            value = draw(st.sampled_from(['"o1-pro"', "true", "[]", '{"model":"a","model":"b"}']))
        pairs.append((key, value))
    return _object(pairs)


@settings(max_examples=300, deadline=None)
@given(raw_bodies())
def test_the_cheap_path_agrees_with_the_exact_check(body: str) -> None:
    raw = body.encode()
    assert (llm_body_problem(raw, json.loads(raw)) is None) == (llm_body_problem(raw) is None)


# ---------------------------------------------------------------------------------------------------------------
# OpenAI chat completions


CHAT_TOOL_FACTS = {
    "provider": "openai", "api": "chat.completions", "operation": "chat",
    "request_model": "gpt-4o", "response_model": CHAT_MODEL, "model": CHAT_MODEL, "stream": True,
    "tools": ["get_weather", "get_time"],
    "tool_calls": [{"id": "call_abc", "name": "get_weather", "arguments": '{"location": "Paris"}'},
                   {"id": "call_def", "name": "get_time", "arguments": '{"tz":"CET"}'}],
    "finish_reasons": ["tool_calls"], "response_id": CHAT_ID,
    "usage": {"input_tokens": 82, "output_tokens": 17, "cache_read_tokens": 64, "reasoning_tokens": 0},
    "usage_reported": True, "complete": True, "error": None,
}


def test_chat_stream_tool_calls_usage_at_every_split() -> None:
    request = request_of("chat.completions", model="gpt-4o", tools=("get_weather", "get_time"))
    whole = observe(request, [CHAT_TOOL_STREAM])
    assert whole.result(sent_at=100.5) == {**CHAT_TOOL_FACTS, "time_to_first_token_s": 0.5}
    assert whole.malformed_events == 0
    for chunks in splits(CHAT_TOOL_STREAM):
        assert without_timing(observe(request, chunks).result()) == CHAT_TOOL_FACTS


def test_chat_stream_first_token_is_the_first_non_empty_delta() -> None:
    readings: list[float] = []

    def clock() -> float:
        readings.append(200.0 + len(readings))
        return readings[-1]

    observer = LlmResponseObserver(request_of("chat.completions"), streamed=True, clock=clock)
    observer.feed(data_events(chat_chunk({"role": "assistant", "content": ""})))
    assert observer.first_token_at is None
    observer.feed(data_events(chat_chunk({"reasoning_content": "Thinking"})))
    assert observer.first_token_at == 200.0
    observer.feed(data_events(chat_chunk({"content": "later"})))
    assert observer.first_token_at == 200.0 and len(readings) == 1
    assert observer.result(sent_at=199.75)["time_to_first_token_s"] == 0.25


def test_chat_stream_without_done_or_usage_is_incomplete() -> None:
    cut = CHAT_TOOL_STREAM[:CHAT_TOOL_STREAM.index(b'"finish_reason":"tool_calls"')]
    facts = observe(request_of("chat.completions"), [cut]).result()
    assert facts["complete"] is False and facts["usage_reported"] is False and facts["usage"] == {}
    assert facts["tool_calls"][0] == {"id": "call_abc", "name": "get_weather", "arguments": '{"location": "Paris"}'}
    assert observe(request_of("chat.completions"), [cut]).result(complete=True)["complete"] is True


def test_chat_stream_fast_path_skips_json_for_content_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    deltas = [chat_chunk({"content": f"word{i} "}) for i in range(500)]
    stream = data_events(chat_chunk({"role": "assistant", "content": ""}), *deltas, chat_chunk({}, finish="stop"),
                         {**chat_chunk({}), "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 500}},
                         "[DONE]")
    loads = counted(monkeypatch, json, "loads")
    observer = observe(request_of("chat.completions"), [stream[i:i + 4096] for i in range(0, len(stream), 4096)])
    facts = observer.result()
    assert loads() <= 5
    assert facts["usage"] == {"input_tokens": 5, "output_tokens": 500}
    assert facts["finish_reasons"] == ["stop"] and facts["complete"] is True


@pytest.mark.parametrize("api", ["chat.completions", "messages", "responses"])
def test_whole_content_chunks_are_not_even_split_into_events(api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One event per chunk, as real streams arrive: once the first token is known, content chunks pass by a
    few byte searches; the facts are the same as when every chunk is parsed."""
    request = request_of(api)
    if api == "chat.completions":
        stream = [data_events(chat_chunk({"role": "assistant", "content": ""}))]
        stream += [data_events(chat_chunk({"content": f"w{i} "})) for i in range(300)]
        stream += [data_events(chat_chunk({}, finish="stop")), data_events(
            {**chat_chunk({}), "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 300}}, "[DONE]")]
    elif api == "messages":
        start = {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "usage": {
            "input_tokens": 5, "cache_read_input_tokens": 2, "output_tokens": 1}}}
        stream = [_named("message_start", start), _named("content_block_start", {
            "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
        stream += [_named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta", "text": f"w{i} "}})
                   for i in range(300)]
        stream += [_named("ping", {"type": "ping"}),
                   _named("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   _named("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                            "usage": {"output_tokens": 300}}),
                   _named("message_stop", {"type": "message_stop"})]
    else:
        final = {"id": "resp_1", "model": "gpt-x", "status": "completed", "output": [],
                 "usage": {"input_tokens": 5, "output_tokens": 300}}
        stream = [_named("response.created", {"type": "response.created", "response": {**final, "usage": None}})]
        stream += [_named("response.output_text.delta", {"type": "response.output_text.delta", "delta": f"w{i} "})
                   for i in range(300)]
        stream += [_named("response.completed", {"type": "response.completed", "response": final})]
    expected = observe(request, [b"".join(stream)]).result()

    fed = counted(monkeypatch, SseParser, "feed")
    facts = observe(request, stream).result()
    assert fed() <= 10
    assert {k: v for k, v in facts.items() if k != "time_to_first_token_s"} == {
        k: v for k, v in expected.items() if k != "time_to_first_token_s"}
    assert facts["usage"]["output_tokens"] == 300 and facts["complete"] is True


def _named(name: str, obj: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()


def test_chat_stream_fast_path_does_not_miss_facts_with_spaces() -> None:
    spaced = "".join(f"data: {json.dumps(obj)}\n\n" for obj in [
        chat_chunk({"content": "hi"}),
        chat_chunk({"content": " there"}),
        chat_chunk({}, finish="length"),
        {**chat_chunk({}), "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    ]).encode() + b"data: [DONE]\n\n"
    facts = observe(request_of("chat.completions"), [spaced]).result()
    assert facts["finish_reasons"] == ["length"]
    assert facts["usage"] == {"input_tokens": 3, "output_tokens": 2}


def test_chat_json_answer() -> None:
    body = compact({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion", "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {
            "role": "assistant", "content": None, "refusal": None, "annotations": [],
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            "logprobs": None, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
                  "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 12, "audio_tokens": 0}},
        "service_tier": "default", "system_fingerprint": "fp_fc9f1d7035",
    }).encode()
    observer = LlmResponseObserver(request_of("chat.completions", stream=False), streamed=False)
    observer.feed_body(body)
    facts = observer.result(sent_at=1.0)
    assert facts["response_model"] == "gpt-4o-2024-08-06" and facts["model"] == "gpt-4o-2024-08-06"
    assert facts["response_id"] == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
    assert facts["tool_calls"] == [{"id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'}]
    assert facts["finish_reasons"] == ["tool_calls"]
    assert facts["usage"] == {"input_tokens": 1117, "output_tokens": 46, "cache_read_tokens": 1024,
                              "reasoning_tokens": 12}
    assert facts["stream"] is False and facts["complete"] is True and facts["time_to_first_token_s"] is None
    assert usage_tokens(facts) == {"input": 1117, "output": 46, "cached": 1024, "reasoning": 12}


def test_legacy_completions_stream_and_json() -> None:
    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct",
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    stream = data_events(chunk("Hello"), chunk(" world"), chunk("", "stop"), "[DONE]")
    streamed = observe(request_of("completions"), [stream])
    assert streamed.first_token_at is not None
    facts = streamed.result()
    assert facts["finish_reasons"] == ["stop"] and facts["complete"] and facts["operation"] == "text_completion"

    observer = LlmResponseObserver(request_of("completions", stream=False), streamed=False)
    observer.feed_body(compact({**chunk("Hello world", "length"),
                                "usage": {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}}).encode())
    assert observer.result()["usage"] == {"input_tokens": 2, "output_tokens": 7}


def test_tool_call_caps() -> None:
    huge = "a" * 3000
    fragments = [chat_chunk({"tool_calls": [{"index": 0, "id": "call_big", "function": {"name": "write"}}]})]
    fragments += [chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": huge}}]}) for _ in range(4)]
    fragments += [chat_chunk({"tool_calls": [{"index": i, "id": f"c{i}", "function": {"name": f"t{i}"}}]})
                  for i in range(1, 200)]
    facts = observe(request_of("chat.completions"), [data_events(*fragments)]).result()
    calls = facts["tool_calls"]
    assert len(calls) == MAX_TOOL_CALLS
    assert calls[0] == {"id": "call_big", "name": "write", "arguments": "a" * MAX_ARGUMENTS, "cut": True}
    assert "cut" not in calls[1]


# ---------------------------------------------------------------------------------------------------------------
# OpenAI Responses


def test_responses_stream_incomplete_keeps_usage_at_every_split() -> None:
    expected = {
        "provider": "openai", "api": "responses", "operation": "chat", "request_model": "gpt-4.1",
        "response_model": "gpt-4.1-2025-04-14", "model": "gpt-4.1-2025-04-14", "stream": True, "tools": [],
        "tool_calls": [], "finish_reasons": ["max_output_tokens"], "response_id": RESPONSE_ID,
        "usage": {"input_tokens": 36, "output_tokens": 16, "cache_read_tokens": 0, "reasoning_tokens": 13},
        "usage_reported": True, "complete": True, "error": None,
    }
    request = request_of("responses", model="gpt-4.1")
    whole = observe(request, [RESPONSES_INCOMPLETE_STREAM])
    assert whole.first_token_at is not None and whole.malformed_events == 0
    assert whole.result(sent_at=whole.first_token_at - 0.125)["time_to_first_token_s"] == 0.125
    for chunks in splits(RESPONSES_INCOMPLETE_STREAM):
        assert without_timing(observe(request, chunks).result()) == expected


def test_responses_stream_function_call() -> None:
    facts = observe(request_of("responses"), [RESPONSES_TOOL_STREAM]).result()
    assert facts["tool_calls"] == [{"id": "call_xyz", "name": "search_docs", "arguments": '{"q":"bastion"}'}]
    assert facts["finish_reasons"] == ["completed"]
    assert facts["usage"] == {"input_tokens": 50, "output_tokens": 9, "cache_read_tokens": 10, "reasoning_tokens": 0}
    done_at = RESPONSES_TOOL_STREAM.index(b"event: response.function_call_arguments.done")
    cut_before_done = RESPONSES_TOOL_STREAM[:done_at]
    partial = observe(request_of("responses"), [cut_before_done]).result()
    assert partial["tool_calls"] == [{"id": "call_xyz", "name": "search_docs", "arguments": '{"q":"bastion"}'}]
    assert partial["complete"] is False and partial["usage_reported"] is False


def test_responses_stream_failed_and_error_events() -> None:
    failed = named_events(("response.failed", {"type": "response.failed", "sequence_number": 1, "response":
                                               response_object("failed", error={"code": "server_error",
                                                                                "message": "The model crashed"})}))
    facts = observe(request_of("responses"), [failed]).result()
    assert facts["error"] == {"type": "server_error", "message": "The model crashed"}
    assert facts["finish_reasons"] == ["failed"]
    error = named_events(("error", {"type": "error", "code": "rate_limit_exceeded", "message": "Slow down",
                                    "param": None, "sequence_number": 1}))
    assert observe(request_of("responses"), [error]).result()["error"] == {
        "type": "rate_limit_exceeded", "message": "Slow down"}


def test_responses_json_answer() -> None:
    body = compact(response_object(
        "completed",
        output=[{"id": "rs_1", "type": "reasoning", "summary": []},
                {"id": "ws_1", "type": "web_search_call", "status": "completed"},
                {"id": "fc_1", "type": "function_call", "call_id": "call_9", "name": "lookup",
                 "arguments": '{"id":1}', "status": "completed"}],
        usage={"input_tokens": 328, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 52,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 380})).encode()
    observer = LlmResponseObserver(request_of("responses", stream=False), streamed=False)
    observer.feed_body(body)
    facts = observer.result()
    assert facts["tool_calls"] == [{"id": "call_9", "name": "lookup", "arguments": '{"id":1}'}]
    assert facts["usage"]["input_tokens"] == 328 and facts["complete"] is True and facts["error"] is None


# ---------------------------------------------------------------------------------------------------------------
# Anthropic messages


ANTHROPIC_TOOL_FACTS = {
    "provider": "anthropic", "api": "messages", "operation": "chat", "request_model": "claude-sonnet-4-5",
    "response_model": CLAUDE_MODEL, "model": CLAUDE_MODEL, "stream": True, "tools": ["get_weather"],
    "tool_calls": [{"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
                    "arguments": '{"location": "San Francisco, CA"}'}],
    "finish_reasons": ["tool_use"], "response_id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "usage": {"input_tokens": 3212, "output_tokens": 89, "cache_read_tokens": 3000, "cache_creation_tokens": 200},
    "usage_reported": True, "complete": True, "error": None,
}


def test_anthropic_stream_tool_use_and_cache_tokens_at_every_split() -> None:
    request = request_of("messages", model="claude-sonnet-4-5", tools=("get_weather",))
    whole = observe(request, [ANTHROPIC_TOOL_STREAM])
    assert whole.malformed_events == 0
    facts = whole.result(sent_at=whole.first_token_at - 1 if whole.first_token_at else None)
    assert facts == {**ANTHROPIC_TOOL_FACTS, "time_to_first_token_s": 1.0}
    assert usage_tokens(facts) == {"input": 3212, "output": 89, "cached": 3000, "cache_creation": 200}
    for chunks in splits(ANTHROPIC_TOOL_STREAM):
        assert without_timing(observe(request, chunks).result()) == ANTHROPIC_TOOL_FACTS


def test_anthropic_stream_cut_short_reports_usage_seen() -> None:
    cut = ANTHROPIC_TOOL_STREAM[:ANTHROPIC_TOOL_STREAM.index(b"event: message_delta")]
    facts = observe(request_of("messages"), [cut]).result()
    assert facts["complete"] is False and facts["usage_reported"] is True
    assert facts["usage"] == {"input_tokens": 3212, "output_tokens": 1, "cache_read_tokens": 3000,
                              "cache_creation_tokens": 200}
    assert facts["finish_reasons"] == []


def test_anthropic_message_delta_usage_takes_the_latest_of_each() -> None:
    stream = named_events(
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x",
                                                                 "usage": {"input_tokens": 0, "output_tokens": 1}}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"input_tokens": 40, "cache_read_input_tokens": 7, "output_tokens": 30,
                                     "output_tokens_details": {"thinking_tokens": 12}}}),
        ("message_stop", {"type": "message_stop"}),
    )
    facts = observe(request_of("messages"), [stream]).result()
    assert facts["usage"] == {"input_tokens": 47, "output_tokens": 30, "cache_read_tokens": 7, "reasoning_tokens": 12}
    assert facts["time_to_first_token_s"] is None


def test_anthropic_stream_error_event() -> None:
    stream = named_events(
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x",
                                                                 "usage": {"input_tokens": 9, "output_tokens": 1}}}),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded " * 100}}),
    )
    facts = observe(request_of("messages"), [stream]).result()
    assert facts["error"]["type"] == "overloaded_error" and len(facts["error"]["message"]) == 500
    assert facts["complete"] is False and facts["usage"]["input_tokens"] == 9


def test_anthropic_json_answer() -> None:
    body = compact({
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
        "model": "claude-opus-4-1-20250805",
        "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_9", "name": "read_file",
                     "input": {"path": "/etc/hosts", "lines": [1, 2], "note": "ünïcode"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 2095, "output_tokens": 503, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 1800, "service_tier": "standard"},
    }).encode()
    observer = LlmResponseObserver(request_of("messages", stream=False), streamed=False)
    observer.feed_body(body)
    facts = observer.result()
    assert facts["tool_calls"] == [{"id": "toolu_9", "name": "read_file",
                                    "arguments": '{"path":"/etc/hosts","lines":[1,2],"note":"ünïcode"}'}]
    assert facts["usage"] == {"input_tokens": 3895, "output_tokens": 503, "cache_read_tokens": 1800,
                              "cache_creation_tokens": 0}
    assert usage_tokens(facts) == {"input": 3895, "output": 503, "cached": 1800}
    assert facts["finish_reasons"] == ["tool_use"] and facts["response_id"] == "msg_013Zva2CMHLNnXjNJJKqJ2EF"


@pytest.mark.parametrize(
    ("api", "body", "error"),
    [
        ("chat.completions", {"error": {"message": "The model `gpt-5x` does not exist", "type": "invalid_request_error",
                                        "param": None, "code": "model_not_found"}},
         {"type": "invalid_request_error", "message": "The model `gpt-5x` does not exist"}),
        ("chat.completions", {"error": {"message": "Rate limited", "type": None, "code": 429}},
         {"type": "429", "message": "Rate limited"}),
        ("messages", {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"},
                      "request_id": "req_1"},
         {"type": "authentication_error", "message": "invalid x-api-key"}),
        ("embeddings", {"error": "upstream timeout"}, {"type": "error", "message": "upstream timeout"}),
    ],
)
def test_error_bodies(api: str, body: dict[str, Any], error: dict[str, str]) -> None:
    observer = LlmResponseObserver(request_of(api, stream=False), streamed=False)
    observer.feed_body(compact(body).encode())
    facts = observer.result()
    assert facts["error"] == error and facts["usage_reported"] is False and facts["tool_calls"] == []


# ---------------------------------------------------------------------------------------------------------------
# embeddings


def test_embeddings_small_and_large_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    def body(rows: int) -> bytes:
        return compact({"object": "list", "data": [
            {"object": "embedding", "index": i, "embedding": [0.0023064255, -0.009327292] * 384}
            for i in range(rows)], "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8 * rows, "total_tokens": 8 * rows}}).encode()

    small = LlmResponseObserver(request_of("embeddings", stream=False), streamed=False)
    small.feed_body(body(2))
    assert small.result()["usage"] == {"input_tokens": 16}

    large_body = body(200)
    assert len(large_body) > BIG_BODY
    parsed_lengths: list[int] = []
    real_loads = json.loads

    def watching_loads(text: str | bytes, **kwargs: Any) -> Any:
        parsed_lengths.append(len(text))
        return real_loads(text, **kwargs)

    monkeypatch.setattr(json, "loads", watching_loads)
    large = LlmResponseObserver(request_of("embeddings", model="embed", stream=False), streamed=False)
    large.feed_body(large_body)
    facts = large.result()
    assert max(parsed_lengths) < 1000
    assert facts["usage"] == {"input_tokens": 1600} and facts["usage_reported"] is True
    assert facts["response_model"] == "text-embedding-3-small" and facts["model"] == "text-embedding-3-small"
    assert facts["complete"] is True
    assert usage_tokens(facts) == {"input": 1600}


def test_large_chat_body_finds_nested_usage_and_leading_model() -> None:
    content = "x" * (BIG_BODY + 10)
    body = compact({"id": "chatcmpl-9", "object": "chat.completion", "model": "big-model",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 300000,
                              "prompt_tokens_details": {"cached_tokens": 4},
                              "completion_tokens_details": {"reasoning_tokens": 0}}}).encode()
    observer = LlmResponseObserver(request_of("chat.completions", stream=False), streamed=False)
    observer.feed_body(body)
    facts = observer.result()
    assert facts["response_model"] == "big-model"
    assert facts["usage"] == {"input_tokens": 10, "output_tokens": 300000, "cache_read_tokens": 4,
                              "reasoning_tokens": 0}
    truncated = LlmResponseObserver(request_of("chat.completions", stream=False), streamed=False)
    truncated.feed_body(body[: BIG_BODY + 100])
    assert truncated.result()["complete"] is False and truncated.result()["usage_reported"] is False


# ---------------------------------------------------------------------------------------------------------------
# junk never raises (with the safety net removed, so the typed readers themselves are what is tested)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "delta", "choices", "usage", "tool_calls", "function", "index", "id", "name",
                         "arguments", "model", "message", "content_block", "partial_json", "response", "output",
                         "item", "output_index", "item_id", "error", "finish_reason", "stop_reason", "status",
                         "prompt_tokens", "input_tokens", "content", "text", "incomplete_details", "code"]),
        inner, max_size=6),
    max_leaves=20,
)
EVENT_NAMES = st.sampled_from([
    "message", "error", "ping", "message_start", "content_block_start", "content_block_delta", "message_delta",
    "message_stop", "response.created", "response.output_item.added", "response.output_item.done",
    "response.function_call_arguments.delta", "response.completed", "response.incomplete", "response.failed",
    "response.output_text.delta",
])
APIS = ["chat.completions", "completions", "responses", "messages", "embeddings"]


@contextmanager
def no_safety_net() -> Iterator[None]:
    """Exceptions the observer would count as malformed events propagate instead."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm_module, "_MALFORMED", ())
        yield


@settings(max_examples=200, deadline=None)
@given(api=st.sampled_from(APIS), events=st.lists(st.tuples(EVENT_NAMES, JSON_VALUES), max_size=8))
def test_random_json_events_never_raise(api: str, events: list[tuple[str, Any]]) -> None:
    with no_safety_net():
        facts = observe(request_of(api), [named_events(*events)]).result(sent_at=0.0)
        assert set(facts) == set(CHAT_TOOL_FACTS) | {"time_to_first_token_s"}
        json.dumps(facts)
        for _name, doc in events:
            body = LlmResponseObserver(request_of(api, stream=False), streamed=False)
            body.feed_body(compact(doc).encode())
            json.dumps(body.result())


@settings(max_examples=200, deadline=None)
@given(api=st.sampled_from(APIS), chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_never_raise(api: str, chunks: list[bytes]) -> None:
    with no_safety_net():
        json.dumps(observe(request_of(api), chunks).result())
        buffered = LlmResponseObserver(request_of(api, stream=False), streamed=False)
        buffered.feed_body(b"".join(chunks))
        json.dumps(buffered.result())


@pytest.mark.parametrize("api", APIS)
def test_hand_made_junk_never_raises(api: str) -> None:
    junk = [
        b"data: {not json}\n\n", b"data: [1,2,3]\n\n", b"data: " + b"[" * 100_000 + b"\n\n",
        b'data: {"choices": "x", "usage": {"prompt_tokens": "5", "completion_tokens": true}}\n\n',
        b'data: {"choices": [{"delta": [], "finish_reason": 5}, null]}\n\n',
        b'data: {"choices": [{"delta": {"tool_calls": [null, 1, {"index": "x", "function": []}]}}]}\n\n',
        b'event: content_block_delta\ndata: {"index": [], "delta": {"type": "input_json_delta"}}\n\n',
        b'event: response.completed\ndata: {"response": {"usage": [], "output": [null, {"type": "function_call"}]}}'
        b"\n\n",
        b'event: error\ndata: {"error": {"type": ["x"], "message": 5}}\n\n',
        b'data: {"usage": {"prompt_tokens": 1e400, "completion_tokens": -3}}\n\n',
        b'data: {"usage": {"prompt_tokens": ' + b"9" * 5000 + b"}}\n\n",
        b"\xff\xfe\x00garbage", b"data: [DONE]\n\n",
    ]
    with no_safety_net():
        facts = observe(request_of(api), junk).result()
        assert facts["usage"] == {} and facts["usage_reported"] is False
        json.dumps(facts)
        for body in [*junk, b"", b"null", b"[" * 100_000, b"{" + b'"usage":{' * 200_000]:
            buffered = LlmResponseObserver(request_of(api, stream=False), streamed=False)
            buffered.feed_body(body)
            json.dumps(buffered.result())


def test_usage_tokens_only_positive_reported_kinds() -> None:
    assert usage_tokens({"usage": {"input_tokens": 5, "output_tokens": 0, "reasoning_tokens": 2}}) == {
        "input": 5, "reasoning": 2}
    assert usage_tokens({"usage": {"input_tokens": True, "output_tokens": "3"}}) == {}
    assert usage_tokens({}) == {}
    assert usage_tokens({"usage": None}) == {}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([None, {}, {"tools": [{}]}, {"tool_choice": {}, "model": "m"}, []]))
def test_body_problem_never_raises_on_junk(junk: bytes, doc: Any) -> None:
    for body in (junk, b'{"tools":' + junk, b'{"model":"m","tools":[' + junk + b"]}"):
        problem = llm_body_problem(body, doc)
        assert problem is None or isinstance(problem, str)


def test_body_problem_fails_closed_on_nesting_too_deep_to_read() -> None:
    deep = b'{"model":"m","tools":[' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    assert llm_body_problem(deep) is not None
    assert llm_body_problem(deep, {"model": "m", "tools": []}) is not None
