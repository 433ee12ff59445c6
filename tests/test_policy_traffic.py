"""Rules on what a request means: `match: {llm: ...}` and `match: {mcp: ...}` (policy side, no proxy).

What is pinned here: a request that is not such a call simply does not match (the MCP transport's GET and
DELETE pass tool rules by); a request that may be one but cannot be read fails closed (allow rules do not
allow, deny and hold rules still apply); conditions take values, lists and operator maps; bad rules name
their file and line; `explain` says why; `bastion test` reports a refused JSON-RPC batch as `bad_request`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from policyhelp import decide, policy_from

from bastion.policy.engine import Policy
from bastion.policy.facts import EvalError, RequestFacts
from bastion.policy.load import PolicyLoadError, load_policy
from bastion.protocols.mcp import McpProblem

OPENAI = "https://api.openai.com/v1/chat/completions"
ANTHROPIC = "https://api.anthropic.com/v1/messages"
MCP = "https://mcp.example.com/mcp"

POLICY = """\
version: 1
defaults: {effect: deny}
agents:
  bot: {roles: [worker]}
rules:
  - id: cheap-models
    effect: allow
    agents: ["*"]
    match: {llm: {provider: [openai, anthropic], model: {in: [gpt-4o-mini, claude-sonnet-4-5]}}}
  - id: no-code-tool
    effect: deny
    agents: ["*"]
    match: {llm: {tool: {prefix: code_}}}
    message: "Code tools are off."
  - id: streams-wait
    effect: hold
    agents: ["*"]
    match: {llm: {model: gpt-4o-mini, stream: true, api: chat.completions}}
  - id: any-embedding-call
    effect: allow
    agents: ["*"]
    match: {llm: {api: embeddings}}
  - id: mcp-transport
    effect: allow
    agents: ["*"]
    match: {host: mcp.example.com, path: /mcp}
    unless: {mcp: {method: tools/call}}
  - id: mcp-search
    effect: allow
    agents: ["*"]
    match: {host: mcp.example.com, mcp: {method: tools/call, tool: search}}
  - id: mcp-mail
    effect: hold
    agents: ["*"]
    match: {mcp: {tool: send_email}}
    unless: {mcp: {args: {to: {suffix: "@example.com"}, cc.*: {suffix: "@example.com"}}}}
  - id: mcp-mail-inside
    effect: allow
    agents: ["*"]
    match: {mcp: {tool: send_email}}
  - id: mcp-resources
    effect: allow
    agents: ["*"]
    match: {mcp: {method: resources/read, resource: {prefix: "file:///docs/"}}}
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return policy_from(tmp_path_factory.mktemp("traffic"), POLICY)


def _chat(model: str, **more: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **more}


def _call(tool: str, args: dict[str, object], method: str = "tools/call") -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": {"name": tool, "arguments": args}}


def test_llm_conditions_on_provider_model_tool_stream_and_api(policy: Policy) -> None:
    assert decide(policy, "bot", "POST", OPENAI, _chat("gpt-4o-mini")).rules == ("cheap-models",)
    assert decide(policy, "bot", "POST", ANTHROPIC, _chat("claude-sonnet-4-5", max_tokens=10)).effect == "allow"
    assert decide(policy, "bot", "POST", OPENAI, _chat("gpt-4.1")).effect == "deny"  # no rule: default
    tools = [{"type": "function", "function": {"name": "code_exec", "parameters": {}}}]
    d = decide(policy, "bot", "POST", OPENAI, _chat("gpt-4o-mini", tools=tools))
    assert (d.effect, d.rules, d.message) == ("deny", ("no-code-tool",), "Code tools are off.")
    assert decide(policy, "bot", "POST", OPENAI, _chat("gpt-4o-mini", stream=True)).effect == "hold"
    # Any host speaks these APIs: a gateway or a self-hosted model is recognised by its path and body.
    assert decide(policy, "bot", "POST", "http://10.0.0.5:8000/v1/embeddings",
                  {"model": "local-embed", "input": "x"}).rules == ("any-embedding-call",)


def test_a_request_that_is_not_an_llm_call_does_not_match_and_is_no_error(policy: Policy) -> None:
    d = decide(policy, "bot", "GET", "https://api.openai.com/v1/models")
    assert d.effect == "deny" and d.reason == "default" and not d.errors


def test_an_llm_call_whose_body_cannot_be_read_fails_closed(tmp_path: Path) -> None:
    p = policy_from(tmp_path, """\
        version: 1
        defaults: {effect: allow}
        agents: {bot: {}}
        rules:
          - {id: no-o1, effect: deny, agents: ["*"], match: {llm: {model: o1}}}
          - {id: cheap, effect: allow, agents: ["*"], match: {llm: {model: gpt-4o-mini}}}
        """)
    for body in (b"{not json", b""):
        d = p.evaluate(RequestFacts.from_url("POST", OPENAI, body=body), "bot")
        assert d.effect == "deny" and "no-o1" in d.rules and d.errors  # the deny applies, nothing allows
    big = json.dumps(_chat("o1", pad="x" * (2 << 20))).encode()
    d = p.evaluate(RequestFacts.from_url("POST", OPENAI, body=big), "bot")
    assert d.effect == "deny"


def test_mcp_tool_rules_apply_to_tool_calls_only(policy: Policy) -> None:
    assert decide(policy, "bot", "POST", MCP, _call("search", {"q": "x"})).rules == ("mcp-search",)
    d = decide(policy, "bot", "POST", MCP, _call("drop_db", {}))
    assert d.effect == "deny" and d.reason == "default"
    assert decide(policy, "bot", "POST", MCP, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).rules == (
        "mcp-transport",)
    for method in ("GET", "DELETE"):  # the transport's own requests carry no JSON-RPC message
        d = decide(policy, "bot", method, MCP, headers={"mcp-session-id": "abc"})
        assert d.rules == ("mcp-transport",) and not d.errors


def test_mcp_argument_conditions(policy: Policy) -> None:
    inside = _call("send_email", {"to": "ann@example.com", "cc": ["bo@example.com"]})
    assert decide(policy, "bot", "POST", MCP, inside).rules == ("mcp-mail-inside",)
    outside = _call("send_email", {"to": "eve@evil.example", "cc": []})
    assert decide(policy, "bot", "POST", MCP, outside).effect == "hold"
    cc_outside = _call("send_email", {"to": "ann@example.com", "cc": ["eve@evil.example"]})
    # Every condition of the `unless` must hold: a copy outside the company is enough to wait for a person.
    assert decide(policy, "bot", "POST", MCP, cc_outside).effect == "hold"
    read = {"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": "file:///docs/a.md"}}
    assert decide(policy, "bot", "POST", "https://other.example/mcp", read).rules == ("mcp-resources",)


def test_a_batch_or_disagreeing_headers_are_never_judged_by_rules() -> None:
    batch = json.dumps([_call("search", {}), _call("send_email", {"to": "eve@evil.example"})]).encode()
    facts = RequestFacts.from_url("POST", MCP, body=batch)
    with pytest.raises(McpProblem):
        facts.mcp()
    facts = RequestFacts.from_url("POST", MCP, body=json.dumps(_call("send_email", {})).encode(),
                                  headers={"mcp-method": "tools/call", "mcp-name": "search"})
    with pytest.raises(McpProblem) as problem:
        facts.mcp()
    assert problem.value.code == -32020


def test_an_mcp_body_not_read_yet_fails_closed() -> None:
    """At `requestheaders` (a large body decided before it arrives) the body is not there: `mcp` conditions
    cannot be known, which must not read as "not an MCP call"."""
    facts = RequestFacts.from_url("POST", MCP, headers={"content-length": "5000000"})
    with pytest.raises(EvalError):
        facts.mcp()


def test_explain_says_why(policy: Policy) -> None:
    facts = RequestFacts.from_url("POST", MCP, body=json.dumps(_call("send_email", {"to": "x@evil.example"})).encode())
    d = policy.explain(facts, "bot")
    text = "\n".join(line for t in d.trace for line in t.reasons)
    assert "mcp.tool" in text and "mcp.args.to" in text
    facts = RequestFacts.from_url("GET", MCP)
    text = "\n".join(line for t in policy.explain(facts, "bot").trace for line in t.reasons)
    assert "not a JSON-RPC (MCP) call" in text


@pytest.mark.parametrize(("rule", "message"), [
    ("match: {llm: {modle: gpt-4o}}", "modle"),
    ("match: {llm: {model: {startswith: gpt}}}", "unknown operator 'startswith'"),
    ("match: {llm: {stream: maybe}}", "stream"),
    ("match: {mcp: {args: {to: {regex: '('}}}}", "bad regex"),
    ("match: {mcp: {args: {}}}", "args"),
    ("match: {mcp: {tool: []}}", "in"),
])
def test_bad_traffic_conditions_name_file_and_line(tmp_path: Path, rule: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("version: 1\ndefaults: {effect: deny}\nagents: {bot: {}}\nrules:\n"
                 f"  - id: r\n    effect: allow\n    agents: ['*']\n    {rule}\n")
    with pytest.raises(PolicyLoadError) as e:
        load_policy([f])
    text = str(e.value)
    assert f"{f}:8" in text and message in text


def test_an_empty_llm_block_matches_every_llm_call(tmp_path: Path) -> None:
    p = policy_from(tmp_path, """\
        version: 1
        defaults: {effect: deny}
        agents: {bot: {}}
        rules:
          - {id: any-llm, effect: allow, agents: ["*"], match: {llm: {}}}
        """)
    assert decide(p, "bot", "POST", ANTHROPIC, _chat("whatever", max_tokens=1)).effect == "allow"
    assert decide(p, "bot", "POST", "https://api.example.com/v1/orders", {"model": "x"}).effect == "deny"


@pytest.mark.parametrize("headers", [{"content-encoding": "gzip"}, {"content-encoding": "deflate"},
                                     {"content-type": "application/json; charset=base64"},
                                     {"content-type": "application/json; charset=utf-7"}])
def test_an_encoded_body_is_never_read_as_not_a_call(policy: Policy, headers: dict[str, str]) -> None:
    """Servers decode a Content-Encoding or a charset before parsing (Express inflates gzip, the MCP
    TypeScript SDK honours the charset): bytes the rules cannot read as JSON-RPC may still be a call, so
    `mcp` conditions fail closed on them instead of reading "not a call"."""
    import base64
    import gzip

    raw = json.dumps(_call("send_email", {"to": "eve@evil.example"})).encode()
    body = gzip.compress(raw) if headers.get("content-encoding") == "gzip" else base64.b64encode(raw)
    facts = RequestFacts.from_url("POST", MCP, headers=headers, body=body)
    with pytest.raises(EvalError):
        facts.mcp()
    d = policy.evaluate(facts, "bot")
    assert d.effect == "hold" and d.errors  # the mail rule still holds it; no allow rule lets it through


def test_a_body_nested_too_deeply_fails_closed(policy: Policy) -> None:
    body = b'{"model": "gpt-4o-mini", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    facts = RequestFacts.from_url("POST", OPENAI, body=body)
    with pytest.raises(EvalError):
        facts.json()
    assert policy.evaluate(facts, "bot").effect != "allow"
