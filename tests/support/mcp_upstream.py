"""A local MCP server (the `mcp` SDK's own, over streamable HTTP) for integration tests.

Tools: `search_docs(q)`, `send_email(to, subject)`, `run_shell(cmd)`, `fail(why)` (answers with isError).
Every tool call that reaches the server is appended to `calls`, so a test can check that a refused call never
arrived. Served by uvicorn on 127.0.0.1 (a free port) in a thread; `/mcp` speaks both the session protocol
(initialize, `Mcp-Session-Id`) and the stateless 2026-07-28 one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer

from support.ports import free_port


@dataclass
class McpUpstream:
    port: int
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


def make_server(calls: list[tuple[str, dict[str, Any]]]) -> MCPServer:
    server = MCPServer("bastion-test")

    @server.tool()
    def search_docs(q: str) -> str:
        """Search the documentation."""
        calls.append(("search_docs", {"q": q}))
        return f"3 results for {q}"

    @server.tool()
    def send_email(to: str, subject: str) -> str:
        """Send an email."""
        calls.append(("send_email", {"to": to, "subject": subject}))
        return f"sent to {to}"

    @server.tool()
    def run_shell(cmd: str) -> str:
        """Run a shell command."""
        calls.append(("run_shell", {"cmd": cmd}))
        return "ran"

    @server.tool()
    def fail(why: str) -> str:
        """Always fails."""
        calls.append(("fail", {"why": why}))
        raise ValueError(why)

    return server


@contextmanager
def run_mcp_upstream(*, stateless: bool = False) -> Iterator[McpUpstream]:
    up = McpUpstream(free_port())
    app = make_server(up.calls).streamable_http_app(stateless_http=stateless)
    config = uvicorn.Config(app, host="127.0.0.1", port=up.port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name="mcp-upstream", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the MCP test server did not start")
        time.sleep(0.02)
    try:
        yield up
    finally:
        server.should_exit = True
        thread.join(10)
