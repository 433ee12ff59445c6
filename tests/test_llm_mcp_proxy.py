"""LLM and MCP calls through a running `bastion serve`, made by the real SDKs against local upstreams.

- The `openai` and `anthropic` SDKs (streamed and not, a tool call among them): the audit record's `llm` facts
  and `/metrics` equal what the upstream reported (Anthropic's input summed with its cache tokens); a rule on
  the model allows, denies and holds, and the SDK's exception carries Bastion's message.
- The `mcp` SDK (client and server, the session protocol and the stateless 2026-07-28 one): rules on the tool
  and on an argument allow, deny and hold; the client's error carries Bastion's message; the transport's GET
  and DELETE pass; a JSON-RPC batch hiding a denied call and routing headers that disagree with the body are
  refused, and the server never sees them; the record's `mcp` facts say how each call ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
import requests
from auditproxy import wait_for_record
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from support.bastion import BastionServer, run_bastion
from support.certs import CertFiles
from support.llm_upstream import (
    ANTHROPIC_USAGE,
    OPENAI_USAGE,
    RESPONSES_USAGE,
    TOOL_ARGUMENTS,
    LlmUpstream,
    run_llm_upstream,
    served,
)
from support.mcp_upstream import McpUpstream, run_mcp_upstream

TOKENS = {"llm-bot": "llm-bot-token-0123456789", "mcp-bot": "mcp-bot-token-0123456789"}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


POLICY = f"""\
version: 1
defaults: {{effect: deny}}
agents:
  llm-bot: {{roles: [llm], token_sha256: {_sha(TOKENS["llm-bot"])}}}
  mcp-bot: {{roles: [mcp], token_sha256: {_sha(TOKENS["mcp-bot"])}}}
rules:
  - id: llm-models
    effect: allow
    agents: ["role:llm"]
    match:
      host: [127.0.0.1, localhost]
      llm: {{model: {{in: [gpt-4o-mini, claude-sonnet-4-5, text-embedding-3-small]}}}}
  - id: llm-big-models-wait
    effect: hold
    agents: ["role:llm"]
    match: {{llm: {{model: {{prefix: gpt-5}}}}}}
    approval: {{wait: 1s}}
  - id: llm-no-o1
    effect: deny
    agents: ["*"]
    match: {{llm: {{model: o1-pro}}}}
    message: "o1-pro is too expensive for agents."
  - id: mcp-transport
    effect: allow
    agents: ["role:mcp"]
    match: {{host: 127.0.0.1, path: /mcp}}
    unless: {{mcp: {{method: tools/call}}}}
  - id: mcp-tools
    effect: allow
    agents: ["role:mcp"]
    match: {{host: 127.0.0.1, path: /mcp, mcp: {{method: tools/call, tool: [search_docs, fail]}}}}
  - id: mcp-mail-inside
    effect: allow
    agents: ["role:mcp"]
    match: {{host: 127.0.0.1, path: /mcp,
             mcp: {{method: tools/call, tool: send_email, args: {{to: {{suffix: "@example.com"}}}}}}}}
  - id: mcp-mail-outside
    effect: hold
    agents: ["role:mcp"]
    match: {{mcp: {{method: tools/call, tool: send_email}}}}
    unless: {{mcp: {{args: {{to: {{suffix: "@example.com"}}}}}}}}
    approval: {{wait: 1s}}
  - id: mcp-no-shell
    effect: deny
    agents: ["*"]
    match: {{mcp: {{method: tools/call, tool: run_shell}}}}
    message: "Shell tools are disabled for agents."
network:
  allow_private: ["127.0.0.0/8"]
"""


@pytest.fixture(scope="module")
def llm_upstream(test_certs: CertFiles) -> Iterator[LlmUpstream]:
    with run_llm_upstream(test_certs) as up:
        yield up


@pytest.fixture(scope="module")
def mcp_upstream() -> Iterator[McpUpstream]:
    with run_mcp_upstream() as up:
        yield up


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, bastion_home: Path, test_certs: CertFiles,
          ) -> Iterator[BastionServer]:
    work = tmp_path_factory.mktemp("llm-mcp")
    rules = work / "rules.yaml"
    rules.write_text(POLICY)
    with run_bastion(work / "srv", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                     extra_args=["--audit", f"sqlite:///{work / 'audit.db'}"]) as srv:
        srv.audit_url = f"sqlite:///{work / 'audit.db'}"  # type: ignore[attr-defined]
        yield srv


def _record(server: BastionServer, request_id: str) -> Any:
    return wait_for_record(server.audit_url, request_id)  # type: ignore[attr-defined]


def _metrics(server: BastionServer) -> dict[str, float]:
    status, body = server.admin_get("/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(("bastion_llm_", "bastion_mcp_")) and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _delta(before: dict[str, float], after: dict[str, float], name: str, **labels: str) -> float:
    def pick(m: dict[str, float]) -> float:
        total = 0.0
        for key, value in m.items():
            if key.split("{")[0] != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', key))
            if all(got.get(k) == v for k, v in labels.items()):
                total += value
        return total
    return pick(after) - pick(before)


# -- OpenAI ---------------------------------------------------------------------------------------------------

def _openai(server: BastionServer, upstream: LlmUpstream, *, https: bool = False) -> openai.OpenAI:
    """The openai SDK with Bastion as its proxy; over HTTPS it trusts Bastion's CA (the interception)."""
    http = httpx.Client(proxy=server.proxy_url("llm-bot", TOKENS["llm-bot"]), trust_env=False,
                        verify=ssl.create_default_context(cafile=str(server.ca_cert)) if https else True)
    base = upstream.https_url if https else upstream.url
    return openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test-not-a-real-key", http_client=http, max_retries=0)


@pytest.mark.parametrize("https", [False, True])
def test_openai_chat_streamed_with_tool_call_facts_and_metrics(proxy: BastionServer, llm_upstream: LlmUpstream,
                                                               https: bool) -> None:
    client = _openai(proxy, llm_upstream, https=https)
    before = _metrics(proxy)
    stream = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True})
    request_id = stream.headers["x-bastion-request-id"]
    chunks = list(stream.parse())
    called = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert called and called[0].function.name == "get_weather"  # the agent got the whole stream

    llm = _record(proxy, request_id).extra["llm"]
    model = served("gpt-4o-mini")
    assert llm["provider"] == "openai" and llm["api"] == "chat.completions" and llm["stream"] is True
    assert llm["request_model"] == "gpt-4o-mini" and llm["response_model"] == model and llm["model"] == model
    assert llm["tools"] == ["get_weather"]
    assert [(c["name"], json.loads(c["arguments"])) for c in llm["tool_calls"]] == [("get_weather", TOOL_ARGUMENTS)]
    assert llm["finish_reasons"] == ["tool_calls"] and llm["complete"] is True
    assert llm["usage"] == {"input_tokens": OPENAI_USAGE["prompt_tokens"],
                            "output_tokens": OPENAI_USAGE["completion_tokens"],
                            "cache_read_tokens": OPENAI_USAGE["prompt_tokens_details"]["cached_tokens"],
                            "reasoning_tokens": OPENAI_USAGE["completion_tokens_details"]["reasoning_tokens"]}
    assert llm["time_to_first_token_s"] is not None and llm["time_to_first_token_s"] >= 0

    after = _metrics(proxy)
    tokens = "bastion_llm_tokens_total"
    assert _delta(before, after, tokens, agent="llm-bot", model=model, kind="input") == 31
    assert _delta(before, after, tokens, agent="llm-bot", model=model, kind="output") == 12
    assert _delta(before, after, tokens, agent="llm-bot", model=model, kind="cached") == 8
    assert _delta(before, after, tokens, agent="llm-bot", model=model, kind="reasoning") == 3
    assert _delta(before, after, "bastion_llm_time_to_first_token_seconds_count", model=model) == 1


def test_openai_chat_plain_and_responses_and_embeddings(proxy: BastionServer, llm_upstream: LlmUpstream) -> None:
    client = _openai(proxy, llm_upstream)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert raw.parse().choices[0].message.content == "Hello from the model."
    llm = _record(proxy, raw.headers["x-bastion-request-id"]).extra["llm"]
    assert llm["stream"] is False and llm["finish_reasons"] == ["stop"] and llm["tool_calls"] == []
    assert llm["usage"]["input_tokens"] == 31 and llm["usage"]["output_tokens"] == 12
    assert llm["time_to_first_token_s"] is None

    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="What is the weather?",
                                                    tools=[{"type": "function", "name": "get_weather",
                                                            "parameters": {"type": "object", "properties": {}}}])
    llm = _record(proxy, raw.headers["x-bastion-request-id"]).extra["llm"]
    assert llm["api"] == "responses" and [c["name"] for c in llm["tool_calls"]] == ["get_weather"]
    assert llm["usage"]["input_tokens"] == RESPONSES_USAGE["input_tokens"]
    assert llm["usage"]["reasoning_tokens"] == 2

    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(raw.parse().data) == 2
    llm = _record(proxy, raw.headers["x-bastion-request-id"]).extra["llm"]
    assert llm["operation"] == "embeddings" and llm["usage"] == {"input_tokens": 6}


def test_a_rule_on_the_model_denies_and_holds_with_bastions_message(proxy: BastionServer,
                                                                    llm_upstream: LlmUpstream) -> None:
    client = _openai(proxy, llm_upstream)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="o1-pro", messages=[{"role": "user", "content": "hi"}])
    assert "o1-pro is too expensive for agents." in str(denied.value)
    assert denied.value.body["type"] == "policy_denied" and denied.value.body["rule"] == "llm-no-o1"
    record = _record(proxy, denied.value.response.headers["x-bastion-request-id"])
    assert record.extra["llm"]["request_model"] == "o1-pro" and record.outcome == "refused"

    with pytest.raises(openai.ConflictError) as held:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert held.value.body["type"] == "approval_pending"

    with pytest.raises(openai.PermissionDeniedError) as unlisted:  # no rule allows this model: default deny
        client.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}])
    assert unlisted.value.body["rule"] is None


# -- Anthropic ------------------------------------------------------------------------------------------------

def _anthropic(server: BastionServer, upstream: LlmUpstream) -> anthropic.Anthropic:
    http = anthropic.DefaultHttpxClient(proxy=server.proxy_url("llm-bot", TOKENS["llm-bot"]), trust_env=False)
    return anthropic.Anthropic(base_url=upstream.url, api_key="sk-ant-test-not-real", http_client=http,
                               max_retries=0)


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_messages_sum_cache_tokens_into_input(proxy: BastionServer, llm_upstream: LlmUpstream,
                                                        stream: bool) -> None:
    client = _anthropic(proxy, llm_upstream)
    before = _metrics(proxy)
    args: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 100,
                            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}
    if stream:
        with client.messages.with_streaming_response.create(stream=True, **args) as resp:
            request_id = resp.headers["x-bastion-request-id"]
            events = [e for e in resp.parse()]
        assert events[-1].type == "message_stop"
    else:
        raw = client.messages.with_raw_response.create(**args)
        request_id = raw.headers["x-bastion-request-id"]
        assert raw.parse().stop_reason == "tool_use"
    llm = _record(proxy, request_id).extra["llm"]
    u = ANTHROPIC_USAGE
    assert llm["provider"] == "anthropic" and llm["stream"] is stream
    assert llm["usage"] == {
        "input_tokens": u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"],
        "output_tokens": u["output_tokens"], "cache_read_tokens": u["cache_read_input_tokens"],
        "cache_creation_tokens": u["cache_creation_input_tokens"]}
    assert [(c["name"], json.loads(c["arguments"])) for c in llm["tool_calls"]] == [("get_weather", TOOL_ARGUMENTS)]
    assert llm["finish_reasons"] == ["tool_use"]
    model = served("claude-sonnet-4-5")
    after = _metrics(proxy)
    assert _delta(before, after, "bastion_llm_tokens_total", model=model, kind="input") == 165
    assert _delta(before, after, "bastion_llm_tokens_total", model=model, kind="cache_creation") == 40


# -- MCP ------------------------------------------------------------------------------------------------------

async def _mcp_session(server: BastionServer, upstream: McpUpstream, mode: str, calls: list[tuple[str, dict]],
                       ) -> list[Any]:
    """Each call's result, or the MCPError it raised."""
    proxy_url = server.proxy_url("mcp-bot", TOKENS["mcp-bot"])
    out: list[Any] = []
    async with (httpx2.AsyncClient(proxy=proxy_url, trust_env=False, timeout=20) as http,
                Client(streamable_http_client(upstream.url, http_client=http), mode=mode) as client):
        for name, args in calls:
            try:
                out.append(await client.call_tool(name, args))
            except MCPError as e:
                out.append(e)
    return out


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_mcp_tool_rules_allow_deny_and_hold(proxy: BastionServer, mcp_upstream: McpUpstream, mode: str) -> None:
    mcp_upstream.calls.clear()
    before = _metrics(proxy)
    results = asyncio.run(_mcp_session(proxy, mcp_upstream, mode, [
        ("search_docs", {"q": "rate limits"}),
        ("run_shell", {"cmd": "id"}),
        ("send_email", {"to": "ann@example.com", "subject": "hi"}),
        ("send_email", {"to": "eve@elsewhere.example", "subject": "hi"}),
        ("fail", {"why": "boom"}),
    ]))
    ok, shell, inside, outside, failed = results
    assert not isinstance(ok, MCPError) and ok.content[0].text == "3 results for rate limits"
    assert isinstance(shell, MCPError) and "Shell tools are disabled for agents." in str(shell)
    assert shell.error.data["type"] == "policy_denied" and shell.error.data["rule"] == "mcp-no-shell"
    assert not isinstance(inside, MCPError)
    assert isinstance(outside, MCPError) and outside.error.data["type"] == "approval_pending"
    assert not isinstance(failed, MCPError) and failed.is_error
    # Only what was allowed reached the server.
    assert [name for name, _ in mcp_upstream.calls] == ["search_docs", "send_email", "fail"]
    assert mcp_upstream.calls[1][1]["to"] == "ann@example.com"

    after = _metrics(proxy)
    calls = "bastion_mcp_calls_total"
    assert _delta(before, after, calls, method="tools/call", tool="search_docs", outcome="result") == 1
    assert _delta(before, after, calls, method="tools/call", tool="run_shell", outcome="refused") == 1
    assert _delta(before, after, calls, method="tools/call", tool="fail", outcome="tool_error") == 1


def _post_mcp(server: BastionServer, upstream: McpUpstream, body: Any, headers: dict[str, str] | None = None,
              ) -> requests.Response:
    s = server.session("mcp-bot", TOKENS["mcp-bot"])
    hdrs = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"}
    hdrs.update(headers or {})
    return s.post(upstream.url, data=json.dumps(body), headers={**hdrs, "Content-Type": "application/json"},
                  timeout=20)


def test_a_batch_hiding_a_denied_call_is_refused_as_jsonrpc(proxy: BastionServer, mcp_upstream: McpUpstream) -> None:
    mcp_upstream.calls.clear()
    resp = _post_mcp(proxy, mcp_upstream, [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "run_shell", "arguments": {}}}])
    assert resp.status_code == 400
    body = resp.json()
    assert body["jsonrpc"] == "2.0" and body["error"]["code"] == -32600
    assert "batch" in body["error"]["message"].lower() and body["error"]["type"] == "bad_request"
    assert mcp_upstream.calls == []


def test_routing_headers_that_disagree_with_the_body_are_refused(proxy: BastionServer,
                                                                 mcp_upstream: McpUpstream) -> None:
    mcp_upstream.calls.clear()
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "run_shell", "arguments": {}}}
    resp = _post_mcp(proxy, mcp_upstream, call, {"Mcp-Method": "tools/call", "Mcp-Name": "search_docs"})
    assert resp.status_code == 400
    body = resp.json()
    assert body["id"] == 7 and body["error"]["code"] == -32020
    assert mcp_upstream.calls == []


def test_the_transports_get_and_delete_pass_tool_rules_by(proxy: BastionServer, mcp_upstream: McpUpstream) -> None:
    """A session client opens the server's event stream (GET) and ends the session (DELETE); with the
    transport rule's `unless: {mcp: {method: tools/call}}`, neither is refused."""
    results = asyncio.run(_mcp_session(proxy, mcp_upstream, "legacy", [("search_docs", {"q": "x"})]))
    assert not isinstance(results[0], MCPError)
    s = proxy.session("mcp-bot", TOKENS["mcp-bot"])
    resp = s.delete(mcp_upstream.url, headers={"Mcp-Session-Id": "no-such-session"}, timeout=10)
    assert resp.status_code != 403 and "x-bastion-request-id" in resp.headers  # the server's own answer
    record = _record(proxy, resp.headers["x-bastion-request-id"])
    assert record.decision is not None and record.decision.rules == ["mcp-transport"]
    assert "mcp" not in record.extra


def test_mcp_facts_in_the_record(proxy: BastionServer, mcp_upstream: McpUpstream) -> None:
    resp = _post_mcp(proxy, mcp_upstream, {"jsonrpc": "2.0", "id": 41, "method": "tools/call", "params": {
        "name": "search_docs", "arguments": {"q": "facts"},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "1"},
                  "io.modelcontextprotocol/clientCapabilities": {}}}},
        {"Mcp-Method": "tools/call", "Mcp-Name": "search_docs"})
    assert resp.status_code == 200, resp.text
    mcp = _record(proxy, resp.headers["x-bastion-request-id"]).extra["mcp"]
    assert mcp["method"] == "tools/call" and mcp["tool"] == "search_docs" and mcp["id"] == 41
    assert mcp["protocol_version"] == "2026-07-28" and mcp["outcome"] == "result" and mcp["error"] is None


def test_a_refusal_before_the_body_is_read_is_still_a_jsonrpc_error(proxy: BastionServer,
                                                                   mcp_upstream: McpUpstream) -> None:
    """Wrong credentials are refused (407) from the request head alone; the MCP client still gets a JSON-RPC
    error it can show, not "Server returned an error response"."""
    async def main() -> MCPError:
        proxy_url = proxy.proxy_url("mcp-bot", "not-the-token")
        async with (httpx2.AsyncClient(proxy=proxy_url, trust_env=False, timeout=20) as http,
                    Client(streamable_http_client(mcp_upstream.url, http_client=http), mode="2026-07-28") as client):
            try:
                await client.call_tool("search_docs", {"q": "x"})
            except MCPError as e:
                return e
        raise AssertionError("the call passed with wrong credentials")

    error = asyncio.run(main())
    assert error.error.data["type"] == "proxy_auth_required"
    assert error.error.message == "Proxy authentication failed: unknown agent or wrong token."


def test_a_large_mcp_call_is_still_judged(proxy: BastionServer, mcp_upstream: McpUpstream) -> None:
    """A body over 1 MiB is decided before it arrives when a plain allow covers it; a tool call that large
    cannot be read by the rules, so the deny on the tool applies and nothing reaches the server."""
    mcp_upstream.calls.clear()
    call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
            "params": {"name": "run_shell", "arguments": {"cmd": "x" * (2 << 20)}}}
    resp = _post_mcp(proxy, mcp_upstream, call)
    # Too large to parse for its id: answered with id null, which MCP clients match to the request they sent.
    assert resp.status_code == 403 and resp.json()["id"] is None
    assert resp.json()["error"]["data"]["rule"] == "mcp-no-shell"
    assert mcp_upstream.calls == []


def test_a_compressed_tool_call_cannot_slip_past_the_tool_rules(proxy: BastionServer,
                                                                mcp_upstream: McpUpstream) -> None:
    """Express-style servers inflate a gzip request body before parsing it: the rules cannot read it, so the
    tool rules fail closed (the deny on run_shell applies) rather than seeing "not a call"."""
    import gzip

    mcp_upstream.calls.clear()
    call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "run_shell", "arguments": {}}}
    s = proxy.session("mcp-bot", TOKENS["mcp-bot"])
    resp = s.post(mcp_upstream.url, data=gzip.compress(json.dumps(call).encode()), timeout=20,
                  headers={"Content-Type": "application/json", "Content-Encoding": "gzip",
                           "Accept": "application/json, text/event-stream"})
    assert resp.status_code == 403 and resp.json()["error"]["data"]["rule"] == "mcp-no-shell"
    assert mcp_upstream.calls == []
