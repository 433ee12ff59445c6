"""The demo's fake upstreams: a ticket API, an OpenAI-style LLM API, a payments API and an MCP server.

Each is a small aiohttp app on its own free port of 127.0.0.1, on the demo's event loop, so the demo needs no
network and no other package. They answer in the shapes real clients parse (a chat completion stream with its
usage chunk, JSON-RPC results for MCP) because Bastion reads those answers for the audit: token usage, tool
outcomes. Nothing here enforces anything; every refusal the demo shows comes from Bastion.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

LLM_USAGE = {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43}
"""The usage every LLM answer reports, so the demo (and its test) know what Bastion should record."""

MCP_PROTOCOL = "2025-06-18"
MCP_TOOLS = [
    {"name": "search_kb", "description": "Search the support knowledge base.",
     "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}},
    {"name": "query_db", "description": "Run an SQL query on the support database.",
     "inputSchema": {"type": "object", "properties": {"sql": {"type": "string"}}, "required": ["sql"]}},
]


# -- tickets ------------------------------------------------------------------------------------------------------

def ticket_app() -> web.Application:
    """JSON CRUD on /tickets/ID, plus the actions the demo's rules gate (handoff, triage, close, comments).

    The answer echoes the `Bastion-Fence` header it received, so an agent can show the lock's fencing token.
    """
    tickets: dict[str, dict[str, Any]] = {}

    def ticket(tid: str) -> dict[str, Any]:
        return tickets.setdefault(tid, {"id": tid, "subject": "Charged twice for order 5521", "status": "open",
                                        "priority": "normal", "comments": []})

    async def body_of(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="the body is not JSON") from None
        return data if isinstance(data, dict) else {"value": data}

    def answer(request: web.Request, data: dict[str, Any], status: int = 200) -> web.Response:
        fence = request.headers.get("Bastion-Fence")
        return web.json_response({**data, "fence": fence} if fence else data, status=status)

    async def list_tickets(request: web.Request) -> web.Response:
        return web.json_response({"tickets": list(tickets.values())})

    async def get_ticket(request: web.Request) -> web.Response:
        return answer(request, ticket(request.match_info["id"]))

    async def update_ticket(request: web.Request) -> web.Response:
        t = ticket(request.match_info["id"])
        t.update({k: v for k, v in (await body_of(request)).items() if k not in ("id", "comments")})
        return answer(request, t)

    async def delete_ticket(request: web.Request) -> web.Response:
        tickets.pop(request.match_info["id"], None)
        return web.Response(status=204)

    async def action(request: web.Request) -> web.Response:
        t = ticket(request.match_info["id"])
        body = await body_of(request)
        verb = request.match_info["action"]
        if verb == "comments":
            t["comments"].append(str(body.get("text", "")))
            return answer(request, {"ticket": t["id"], "comments": len(t["comments"])}, 201)
        if verb == "close":
            t["status"] = "closed"
        elif verb == "triage":
            t.update(status="triaged", priority=body.get("priority", t["priority"]))
        elif verb == "handoff":
            t["assignee"] = body.get("to")
        return answer(request, t)

    app = web.Application()
    app.router.add_get("/tickets", list_tickets)
    app.router.add_get("/tickets/{id}", get_ticket)
    app.router.add_route("PATCH", "/tickets/{id}", update_ticket)
    app.router.add_put("/tickets/{id}", update_ticket)
    app.router.add_post("/tickets/{id}", update_ticket)
    app.router.add_delete("/tickets/{id}", delete_ticket)
    app.router.add_post("/tickets/{id}/{action:handoff|triage|close|comments}", action)
    return app


# -- LLM ------------------------------------------------------------------------------------------------------------

def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def llm_app(words: tuple[str, ...] = ("Customer", "was", "charged", "twice;", "refund", "the", "duplicate.")
            ) -> web.Application:
    """`POST /v1/chat/completions`, OpenAI style: JSON, or an event stream ending with the usage chunk when
    `stream_options.include_usage` asks for it (as the real API does)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", "")) + "-2026-01-01"  # the served model carries a date, as real APIs do
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-demo", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                             "finish_reason": "stop"}],
                "usage": LLM_USAGE})

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _sse({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": 1, "model": model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        def events() -> Iterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            for word in words:
                yield chunk({"content": word + " "})
            yield chunk({}, "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": 1,
                            "model": model, "choices": [], "usage": LLM_USAGE})
            yield b"data: [DONE]\n\n"

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for event in events():
            await resp.write(event)
            await asyncio.sleep(0.05)  # a visible stream, not one burst
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


# -- payments -------------------------------------------------------------------------------------------------------

def payments_app() -> web.Application:
    """`POST /v1/refunds {"ticket", "amount"}` -> the refund, as a payments API would book it."""

    async def refund(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"id": "re_" + secrets.token_hex(6), "object": "refund", "status": "succeeded",
                                  "amount": body.get("amount"), "ticket": body.get("ticket")}, status=201)

    app = web.Application()
    app.router.add_post("/v1/refunds", refund)
    return app


# -- MCP ------------------------------------------------------------------------------------------------------------

def mcp_app() -> web.Application:
    """An MCP server on the streamable HTTP transport, JSON answers only: initialize, notifications,
    tools/list, tools/call (search_kb and query_db), and DELETE to end the session."""

    def result(msg_id: Any, value: dict[str, Any]) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": msg_id, "result": value}

    def call_tool(name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "search_kb":
            text = f"3 articles match {args.get('q', '')!r}: 'Duplicate charges', 'Refund limits', 'Escalations'"
        elif name == "query_db":
            text = f"ran {args.get('sql', '')!r}: 1 row"
        else:
            return {"content": [{"type": "text", "text": f"unknown tool {name}"}], "isError": True}
        return {"content": [{"type": "text", "text": text}], "isError": False}

    async def post(request: web.Request) -> web.Response:
        msg = await request.json()
        method, msg_id = msg.get("method"), msg.get("id")
        if msg_id is None:  # a notification: accepted, nothing to answer
            return web.Response(status=202)
        headers: dict[str, str] = {}
        if method == "initialize":
            headers["Mcp-Session-Id"] = secrets.token_hex(8)
            value: dict[str, Any] = {"protocolVersion": MCP_PROTOCOL, "capabilities": {"tools": {}},
                                     "serverInfo": {"name": "demo-support-tools", "version": "1.0"}}
        elif method == "tools/list":
            value = {"tools": MCP_TOOLS}
        elif method == "tools/call":
            params = msg.get("params") or {}
            value = call_tool(str(params.get("name")), params.get("arguments") or {})
        else:
            return web.json_response({"jsonrpc": "2.0", "id": msg_id,
                                      "error": {"code": -32601, "message": f"method {method} not found"}})
        return web.json_response(result(msg_id, value), headers=headers)

    async def end_session(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def no_stream(request: web.Request) -> web.Response:
        return web.Response(status=405)  # this server sends no server-initiated messages

    app = web.Application()
    app.router.add_post("/mcp", post)
    app.router.add_delete("/mcp", end_session)
    app.router.add_get("/mcp", no_stream)
    return app


# -- running them ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Upstreams:
    """Base URLs of the running fakes (http://127.0.0.1:PORT)."""

    tickets: str
    llm: str
    payments: str
    mcp: str


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@asynccontextmanager
async def running_upstreams() -> AsyncIterator[Upstreams]:
    """Start the four fakes on free ports of 127.0.0.1; stop them on exit."""
    runners: list[web.AppRunner] = []
    try:
        urls: list[str] = []
        for app in (ticket_app(), llm_app(), payments_app(), mcp_app()):
            runner, url = await _start(app)
            runners.append(runner)
            urls.append(url)
        yield Upstreams(*urls)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
