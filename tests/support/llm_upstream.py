"""A local stand-in for OpenAI- and Anthropic-style LLM APIs, for integration tests and benchmarks.

It answers like the real APIs do, in the shapes their SDKs parse, with fixed, known token usage, so a test
can check that what Bastion recorded equals what the upstream reported:

- `POST /v1/chat/completions` (OpenAI): JSON or a stream of `chat.completion.chunk` events (with the final
  usage chunk when `stream_options.include_usage`). When the request offers tools and the last message
  mentions "weather", the answer is a call of the first tool with `{"city": "Paris"}` (streamed in two
  argument fragments).
- `POST /v1/messages` (Anthropic): JSON or the event stream (`message_start` ... `message_stop`), with cache
  tokens in the usage; a tool call under the same condition.
- `POST /v1/responses` (OpenAI Responses): JSON or its event stream, ending in `response.completed`.
- `POST /v1/embeddings`: vectors and usage.

`?words=N` (or the request's `max_tokens` when smaller) sets how many content deltas a stream has; `gap` (query,
seconds) sleeps between deltas. The served model is the requested one with a date suffix, as real APIs do.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from support.certs import CertFiles
from support.upstream import serve_in_thread

# The usage every answer reports (so tests know the truth).
OPENAI_USAGE = {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43,
                "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": {"reasoning_tokens": 3}}
ANTHROPIC_USAGE = {"input_tokens": 25, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 40,
                   "output_tokens": 14}
RESPONSES_USAGE = {"input_tokens": 19, "output_tokens": 9, "total_tokens": 28,
                   "input_tokens_details": {"cached_tokens": 4}, "output_tokens_details": {"reasoning_tokens": 2}}
EMBEDDING_USAGE = {"prompt_tokens": 6, "total_tokens": 6}
SERVED_SUFFIX = "-2026-01-01"
TOOL_ARGUMENTS = {"city": "Paris"}


def served(model: str) -> str:
    return model + SERVED_SUFFIX


def _wants_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools") or []
    messages = body.get("messages") or body.get("input") or []
    text = json.dumps(messages[-1] if isinstance(messages, list) and messages else messages)
    if not tools or "weather" not in text:
        return None
    first = tools[0]
    return (first.get("function") or {}).get("name") or first.get("name")


def _words(request: web.Request, body: dict[str, Any]) -> int:
    n = int(request.query.get("words", "8"))
    return max(1, n)


async def _sse(request: web.Request, events: Any, gap: float) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for event in events:
        await resp.write(event)
        if gap:
            await asyncio.sleep(gap)
    await resp.write_eof()
    return resp


_PADDING = "qVx0rT3kLm9Z"


def _data(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


# -- OpenAI chat completions ----------------------------------------------------------------------------------

async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = served(body["model"])
    tool = _wants_tool(body)
    gap = float(request.query.get("gap", "0"))
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": None if tool else "Hello from the model."}
        if tool:
            message["tool_calls"] = [{"id": "call_1", "type": "function",
                                      "function": {"name": tool, "arguments": json.dumps(TOOL_ARGUMENTS)}}]
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop"}],
            "usage": OPENAI_USAGE})
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    padded = request.query.get("padded") == "1"  # as api.openai.com streams now: every chunk differs beyond its text

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if padded:
            if include_usage:
                doc["usage"] = None
            doc["obfuscation"] = _PADDING[: 1 + len(str(delta)) % 12]
        return _data(doc)

    def events() -> Iterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        if tool:
            args = json.dumps(TOOL_ARGUMENTS)
            yield chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": tool, "arguments": args[:5]}}]})
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[5:]}}]})
            yield chunk({}, "tool_calls")
        else:
            for i in range(_words(request, body)):
                yield chunk({"content": f"word{i} "})
            yield chunk({}, "stop")
        if include_usage:
            yield _data({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                         "choices": [], "usage": OPENAI_USAGE})
        yield b"data: [DONE]\n\n"

    return await _sse(request, events(), gap)


# -- Anthropic messages ---------------------------------------------------------------------------------------

async def messages(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = served(body["model"])
    tool = _wants_tool(body)
    gap = float(request.query.get("gap", "0"))
    usage = ANTHROPIC_USAGE
    if not body.get("stream"):
        content: list[dict[str, Any]] = [{"type": "text", "text": "Hello from the model."}]
        if tool:
            content.append({"type": "tool_use", "id": "toolu_1", "name": tool, "input": TOOL_ARGUMENTS})
        return web.json_response({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None, "usage": usage})

    def events() -> Iterator[bytes]:
        start_usage = {k: usage[k] for k in ("input_tokens", "cache_read_input_tokens",
                                             "cache_creation_input_tokens")} | {"output_tokens": 1}
        yield _data({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}, "message_start")
        yield _data({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    "content_block_start")
        for i in range(_words(request, body)):
            yield _data({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "text_delta", "text": f"word{i} "}}, "content_block_delta")
        yield _data({"type": "content_block_stop", "index": 0}, "content_block_stop")
        if tool:
            yield _data({"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": tool, "input": {}}}, "content_block_start")
            args = json.dumps(TOOL_ARGUMENTS)
            for part in (args[:5], args[5:]):
                yield _data({"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": part}}, "content_block_delta")
            yield _data({"type": "content_block_stop", "index": 1}, "content_block_stop")
        yield _data({"type": "message_delta", "delta": {"stop_reason": "tool_use" if tool else "end_turn",
                                                        "stop_sequence": None},
                     "usage": {"output_tokens": usage["output_tokens"]}}, "message_delta")
        yield _data({"type": "message_stop"}, "message_stop")

    return await _sse(request, events(), gap)


# -- OpenAI responses and embeddings --------------------------------------------------------------------------

async def responses(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = served(body["model"])
    tool = _wants_tool(body)
    output: list[dict[str, Any]] = [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                                     "content": [{"type": "output_text", "text": "Hello.", "annotations": []}]}]
    if tool:
        output = [{"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": tool,
                   "arguments": json.dumps(TOOL_ARGUMENTS), "status": "completed"}]
    final = {"id": "resp_1", "object": "response", "created_at": 1, "model": model, "status": "completed",
             "output": output, "usage": RESPONSES_USAGE}
    if not body.get("stream"):
        return web.json_response(final)

    def events() -> Iterator[bytes]:
        yield _data({"type": "response.created", "sequence_number": 0,
                     "response": {**final, "status": "in_progress", "output": [], "usage": None}},
                    "response.created")
        for i in range(_words(request, body)):
            yield _data({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_1",
                         "output_index": 0, "content_index": 0, "delta": f"word{i} "}, "response.output_text.delta")
        yield _data({"type": "response.completed", "sequence_number": 999, "response": final}, "response.completed")

    return await _sse(request, events(), float(request.query.get("gap", "0")))


async def embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    return web.json_response({
        "object": "list", "model": served(body["model"]), "usage": EMBEDDING_USAGE,
        "data": [{"object": "embedding", "index": i, "embedding": [0.001 * j for j in range(16)]}
                 for i in range(len(inputs))]})


def make_app() -> web.Application:
    app = web.Application(client_max_size=32 << 20)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


@dataclass
class LlmUpstream:
    http_port: int
    https_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://localhost:{self.https_port}"


@contextmanager
def run_llm_upstream(certs: CertFiles | None = None) -> Iterator[LlmUpstream]:
    """The fake LLM API on 127.0.0.1 (free ports; HTTPS too with `certs`), on its own event loop in a thread."""
    with serve_in_thread(make_app(), certs) as (http_port, https_port):
        yield LlmUpstream(http_port, https_port)
