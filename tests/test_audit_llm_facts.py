"""The LLM, MCP and WebSocket facts of audit records (`extra.llm`, `extra.mcp`, `extra.websocket`) as people
search and read them: the `model` and `tool` filters on every store (SQLite, PostgreSQL, JSONL) agree exactly,
including the traps (a tool only offered, a tool only in the second tool call, LIKE wildcards, quotes and
control characters in names, malformed facts); the flows API and pages show them; the CLI prints them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from services import require_postgres

from bastion import cli
from bastion.audit.chain import Chain, ChainHead
from bastion.audit.display import llm_view, printable, tail_facts, websocket_view
from bastion.audit.entry import Entry
from bastion.audit.sample import sample_exchange
from bastion.audit.sinks import AuditStore, RecordQuery, open_store
from bastion.audit.sinks.base import called_tools, record_models
from bastion.audit.writer import AuditWriter
from bastion.dashboard.app import create_app
from bastion.policy.load import load_policy
from bastion.proxy.state import PolicyState

T0 = 1_795_000_000_000_000  # 2026-11-18T11:06:40Z
MIN_US = 60_000_000
OPENAI = "https://api.openai.com/v1/chat/completions"
ANTHROPIC = "https://api.anthropic.com/v1/messages"
MCP = "https://mcp.example.com/mcp"
VIEWER = {"Authorization": "Bearer viewer-token"}
ESCAPE_MODEL = "evil\x1b[2J\nmodel"


def _call(name: Any, arguments: str = "{}", call_id: str | None = None) -> dict[str, Any]:
    return {"id": call_id, "name": name, "arguments": arguments}


def _llm(model: str, *, request_model: str | None = None, response_model: str | None = None,
         tools: list[str] | None = None, tool_calls: list[Any] | None = None, usage: dict[str, int] | None = None,
         provider: str = "openai", api: str = "chat.completions", **more: Any) -> dict[str, Any]:
    return {"provider": provider, "api": api, "operation": "chat", "request_model": request_model or model,
            "response_model": response_model, "model": model, "stream": False, "tools": tools or [],
            "tool_calls": tool_calls or [], "finish_reasons": ["stop"], "response_id": None, "usage": usage or {},
            "usage_reported": usage is not None, "time_to_first_token_s": None, "complete": True, "error": None,
            **more}


# (name, agent, url, extra): one record each, one minute apart, in this order.
SPECS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("plain", "support-bot", "https://erp.example.com/orders/7", {}),
    ("chat_tools", "support-bot", OPENAI, {"llm": _llm(
        "gpt-4o-mini-2024-07-18", request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18",
        tools=["lookup_order", "send_email"], usage={"input_tokens": 120, "output_tokens": 45, "cache_read_tokens": 20},
        tool_calls=[_call("lookup_order", '{"order": 7}', "call_1"),
                    _call("send_email", '{"to": "<script>alert(1)</script>"}', "call_2")], stream=True)}),
    ("offered_only", "billing-bot", ANTHROPIC, {"llm": _llm(
        "claude-sonnet-4", provider="anthropic", api="messages", tools=["send_email", "lookup_order"],
        usage={"input_tokens": 900, "output_tokens": 12})}),
    ("mcp_call", "billing-bot", MCP, {"mcp": {
        "method": "tools/call", "id": 7, "tool": "send_email", "resource": None, "protocol_version": "2025-06-18",
        "outcome": "tool_error", "error": None}}),
    ("mcp_read", "support-bot", MCP, {"mcp": {
        "method": "resources/read", "id": "r-1", "tool": None, "resource": "file:///srv/notes.md",
        "protocol_version": "2025-06-18", "outcome": "error", "error": {"code": -32602, "message": "no such file"}}}),
    ("wildcards", "support-bot", OPENAI, {"llm": _llm("50%_off", tool_calls=[_call("do_%_x")])}),
    ("lookalike", "support-bot", OPENAI, {"llm": _llm("50abcXoff", tool_calls=[_call("do_anything_x")])}),
    ("aliased", "billing-bot", OPENAI, {"llm": _llm(
        "gpt-4o-2024-08-06", request_model="alias-latest", response_model="gpt-4o-2024-08-06")}),
    ("quoted", "support-bot", OPENAI, {"llm": _llm('we"ird\\model', tool_calls=[_call('say "hi"')])}),
    ("escape", "support-bot", OPENAI, {"llm": _llm(ESCAPE_MODEL, tool_calls=[_call("tool\x1b]0;pwned\x07")])}),
    ("malformed", "support-bot", OPENAI, {
        "llm": {"model": 5, "request_model": ["gpt-4o-mini"], "response_model": {"name": "gpt-4o-mini"},
                "tool_calls": ["send_email", {"name": ["send_email"]}, None, 7, [{"name": "send_email"}]],
                "usage": "lots"},
        "mcp": {"tool": {"name": "send_email"}, "method": 9}, "websocket": {"messages": "many"}}),
    ("odd_calls", "support-bot", OPENAI, {"llm": {"model": "m-odd", "tool_calls": {"name": "send_email"}}}),
    ("websocket", "support-bot", "wss://ws.example.com/chat", {"websocket": {
        "messages": [
            {"dir": "client", "t": 0.0, "type": "text", "size": 5, "text": "hello", "cut": False, "refused": False},
            {"dir": "server", "t": 0.125, "type": "binary", "size": 1024, "sha256": "ab" * 32, "cut": False,
             "refused": False},
            {"dir": "client", "t": 0.5, "type": "text", "size": 30, "text": "<b>rm -rf /</b>", "cut": True,
             "refused": True}],
        "kept": 3, "total": 4, "bytes": {"client": 35, "server": 1024},
        "close": {"code": 1008, "reason": "policy violation", "by": "bastion"}}}),
]
NAMES = [name for name, *_ in SPECS]
# Facts whose names the writer's name-based redaction masks today ("…token…", "code"): shown from a record
# stored as the proxy shapes it, written past the writer (`store_unredacted`).
FULL_EXTRA: dict[str, Any] = {
    "llm": _llm("gpt-4o", response_model="gpt-4o-2024-08-06", stream=True, time_to_first_token_s=0.412,
                usage={"input_tokens": 10, "output_tokens": 3, "reasoning_tokens": 2}, complete=False,
                error={"type": "overloaded_error", "message": "Overloaded"}),
    "mcp": {"method": "tools/call", "id": 3, "tool": "deploy", "resource": None, "protocol_version": None,
            "outcome": "error", "error": {"code": -32602, "message": "bad arguments"}},
    "websocket": {"messages": [], "kept": 0, "total": 0, "bytes": {"client": 0, "server": 0},
                  "close": {"code": 1008, "reason": "policy violation", "by": "bastion"}},
}


async def write_records(url: str, spool: Path) -> dict[str, str]:
    """The SPECS records through the real writer (redaction, chain, spool, sink); returns name -> id."""
    writer = await AuditWriter.open(url, spool)
    ids: dict[str, str] = {}
    for i, (name, agent, target, extra) in enumerate(SPECS):
        rec, req, resp = sample_exchange(seed=i, agent=agent, body_words=20)
        rec.started_us, rec.ended_us = T0 + i * MIN_US, T0 + i * MIN_US + 850_000
        rec.request.url = target
        rec.extra = extra
        assert writer.submit(rec, req, resp)
        ids[name] = rec.id
    assert await writer.flush()
    await writer.close()
    return ids


async def store_unredacted(url: str, extra: dict[str, Any]) -> str:
    """One record with `extra` exactly as given, linked in a chain of its own and written to the store
    directly (the writer would redact it); returns its id."""
    rec, _, _ = sample_exchange(seed=99, body_words=5)
    rec.started_us, rec.ended_us = T0 + 100 * MIN_US, T0 + 100 * MIN_US + 1000
    rec.extra = extra
    data, head = Chain(ChainHead.empty("display-test")).link(rec)
    async with open_store(url) as s:
        await s.write([Entry("display-test", head.seq, head.hash, data, None, None, rec)])
    return rec.id


@pytest.fixture(params=["sqlite", "postgres", "jsonl"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[AuditStore, dict[str, str]]]:
    """Each store kind holding the SPECS records (PostgreSQL in a schema of this test's own, dropped after)."""
    schema = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/audit.db"
    elif request.param == "jsonl":
        (tmp_path / "logs").mkdir()
        url = f"jsonl:///{tmp_path}/logs"
    else:
        dsn = require_postgres()
        schema = f"bastion_llm_facts_{secrets.token_hex(6)}"
        url = f"{dsn}?schema={schema}"
    try:
        ids = await write_records(url, tmp_path / "spool")
        async with open_store(url) as opened:
            yield opened, ids
    finally:
        if schema is not None:
            conn = await asyncpg.connect(require_postgres())
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()


async def _names(store: AuditStore, ids: dict[str, str], **filters: Any) -> set[str]:
    by_id = {v: k for k, v in ids.items()}
    page = await store.query(RecordQuery(limit=100, **filters))
    assert page.next is None
    return {by_id[r.id] for r in page.records}


MODEL_CASES = [
    ("gpt-4o-mini", {"chat_tools"}),  # the model asked for (request_model); not the malformed record's list
    ("gpt-4o-mini-2024-07-18", {"chat_tools"}),  # the model that answered
    ("alias-latest", {"aliased"}),
    ("gpt-4o-2024-08-06", {"aliased"}),
    ("claude-sonnet-4", {"offered_only"}),
    ("50%_off", {"wildcards"}),  # % and _ are characters, not LIKE wildcards
    ("50%", set()),
    ("50%off", set()),
    ("5", set()),  # the malformed record's model is the number 5, not the string
    ('we"ird\\model', {"quoted"}),
    (ESCAPE_MODEL, {"escape"}),
    ("GPT-4O-MINI", set()),  # exact, case included
    ("gpt-4o", set()),  # exact, not a prefix
]
TOOL_CASES = [
    ("send_email", {"chat_tools", "mcp_call"}),  # tool_calls[1], and an MCP tools/call; offered_only only offered
    ("lookup_order", {"chat_tools"}),
    ("do_%_x", {"wildcards"}),
    ("do_anything_x", {"lookalike"}),
    ("do__x", set()),
    ('say "hi"', {"quoted"}),
    ("tool\x1b]0;pwned\x07", {"escape"}),
    ("Send_Email", set()),
]


async def test_model_filter_matches_asked_or_served_model_exactly(store: tuple[AuditStore, dict[str, str]]) -> None:
    s, ids = store
    for model, expected in MODEL_CASES:
        assert await _names(s, ids, model=model) == expected, model


async def test_tool_filter_matches_called_tools_not_offered_ones(store: tuple[AuditStore, dict[str, str]]) -> None:
    s, ids = store
    for tool, expected in TOOL_CASES:
        assert await _names(s, ids, tool=tool) == expected, tool


async def test_filters_combine_and_page_like_the_others(store: tuple[AuditStore, dict[str, str]]) -> None:
    s, ids = store
    assert await _names(s, ids, model="gpt-4o-mini", tool="send_email") == {"chat_tools"}
    assert await _names(s, ids, model="claude-sonnet-4", tool="send_email") == set()
    assert await _names(s, ids, agent="billing-bot", tool="send_email") == {"mcp_call"}
    assert await _names(s, ids, tool="send_email", since_us=T0 + 2 * MIN_US) == {"mcp_call"}
    assert await _names(s, ids, text="chat/completions", model="50%_off") == {"wildcards"}
    for ascending, order in ((False, ["mcp_call", "chat_tools"]), (True, ["chat_tools", "mcp_call"])):
        first = await s.query(RecordQuery(tool="send_email", limit=1, ascending=ascending))
        assert [r.id for r in first.records] == [ids[order[0]]] and first.next is not None
        second = await s.query(RecordQuery(tool="send_email", limit=1, ascending=ascending, cursor=first.next))
        assert [r.id for r in second.records] == [ids[order[1]]] and second.next is None
    walked = [r.id async for r in s.iter_records(RecordQuery(tool="send_email", limit=1))]
    assert walked == [ids["mcp_call"], ids["chat_tools"]]
    everything = await s.query(RecordQuery(limit=100))
    assert len(everything.records) == len(SPECS)  # malformed facts break no query


def test_python_predicates_agree_with_the_stores() -> None:
    extras = {name: extra for name, _, _, extra in SPECS}
    for model, expected in MODEL_CASES:
        assert {n for n, e in extras.items() if model in record_models(e)} == expected, model
    for tool, expected in TOOL_CASES:
        assert {n for n, e in extras.items() if tool in called_tools(e)} == expected, tool
    assert called_tools(extras["chat_tools"]) == ["lookup_order", "send_email"]


def test_views_of_malformed_facts_are_empty_not_errors() -> None:
    extra = dict(SPECS[NAMES.index("malformed")][3])
    llm = llm_view(extra)
    assert llm is not None and llm["model"] is None and llm["tool_calls"] == [] and llm["usage"] == {}
    ws = websocket_view(extra)
    assert ws is not None and ws["messages"] == [] and ws["close"] is None
    assert tail_facts(extra) == ""
    assert printable("a\x1b[2J\nb\u2028c", 100) == "a\\x1b[2J\\nb\\u2028c"
    assert printable("x" * 10, 4) == "xxxx…"


# --- the flows API and pages -----------------------------------------------------------------------------------

@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient, dict[str, str]]]:
    url = f"sqlite:///{tmp_path}/audit.db"
    ids = await write_records(url, tmp_path / "spool")
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(f"""\
        version: 1
        defaults: {{effect: deny}}
        agents:
          support-bot: {{roles: [w]}}
          billing-bot: {{roles: [w]}}
        users:
          vera: {{roles: [viewer], token_sha256: {hashlib.sha256(b"viewer-token").hexdigest()}}}
        rules: []
        """))
    ids["full"] = await store_unredacted(url, FULL_EXTRA)
    audit = open_store(url)
    app = create_app(PolicyState([str(rules)], load_policy([rules])), audit_store=audit)
    async with TestClient(TestServer(app)) as client:
        yield client, ids
    await audit.close()


async def _flows(client: TestClient, query: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/flows?{query}", headers=VIEWER)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["flows"]  # type: ignore[no-any-return]


async def test_api_filters_and_summarizes_llm_and_mcp_facts(api: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = api
    flows = await _flows(client, "tool=send_email")
    assert [f["id"] for f in flows] == [ids["mcp_call"], ids["chat_tools"]]
    mcp, chat = flows
    assert chat["llm"] == {"model": "gpt-4o-mini-2024-07-18", "input_tokens": 120, "output_tokens": 45}
    assert chat["tool"] == "lookup_order" and chat["mcp_method"] is None
    assert mcp["llm"] is None and mcp["tool"] == "send_email" and mcp["mcp_method"] == "tools/call"
    assert [f["id"] for f in await _flows(client, "model=50%25_off")] == [ids["wildcards"]]
    assert [f["id"] for f in await _flows(client, "model=gpt-4o-mini&agent=support-bot")] == [ids["chat_tools"]]
    assert await _flows(client, "model=gpt-4o-mini&agent=billing-bot") == []
    offered = (await _flows(client, "model=claude-sonnet-4"))[0]
    assert offered["tool"] is None and offered["llm"]["input_tokens"] == 900  # offered tools are not calls
    plain = next(f for f in await _flows(client, "limit=100") if f["id"] == ids["plain"])
    assert plain["llm"] is None and plain["tool"] is None and plain["mcp_method"] is None
    malformed = next(f for f in await _flows(client, "limit=100") if f["id"] == ids["malformed"])
    assert malformed["llm"] == {"model": None, "input_tokens": None, "output_tokens": None}
    assert malformed["tool"] is None and malformed["mcp_method"] is None
    too_long = await client.get("/api/flows?tool=" + "x" * 1001, headers=VIEWER)
    assert too_long.status == 400 and "tool" in (await too_long.json())["error"]["message"]


async def test_flows_page_filters_and_shows_model_tokens_and_tool(api: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = api
    resp = await client.get("/flows?tool=send_email", headers=VIEWER)
    html = await resp.text()
    assert resp.status == 200, html
    assert 'name="model"' in html and 'name="tool"' in html and 'value="send_email"' in html
    assert ids["chat_tools"] in html and ids["mcp_call"] in html and ids["offered_only"] not in html
    assert "gpt-4o-mini-2024-07-18" in html and "120→45 tok" in html
    assert "tool lookup_order" in html and "tool send_email" in html and "tools/call" in html
    page = await (await client.get("/flows?model=claude-sonnet-4", headers=VIEWER)).text()
    assert ids["offered_only"] in page and ids["chat_tools"] not in page and "900→12 tok" in page


async def test_flow_detail_shows_llm_mcp_and_websocket_sections(api: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = api
    chat = await (await client.get(f"/flows/{ids['chat_tools']}", headers=VIEWER)).text()
    assert "LLM call" in chat and "requested gpt-4o-mini · served gpt-4o-mini-2024-07-18" in chat
    assert "input <strong>120</strong>" in chat and "cache read <strong>20</strong>" in chat
    assert "streamed · complete" in chat and "call_2" in chat
    assert "Tools offered</dt><dd>lookup_order, send_email" in chat
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in chat and "<script>alert(1)" not in chat
    mcp = await (await client.get(f"/flows/{ids['mcp_read']}", headers=VIEWER)).text()
    assert "resources/read" in mcp and "file:///srv/notes.md" in mcp and "no such file" in mcp
    ws = await (await client.get(f"/flows/{ids['websocket']}", headers=VIEWER)).text()
    assert "WebSocket" in ws and "hello" in ws and "ab" * 32 in ws and "+0.125 s" in ws
    assert "&lt;b&gt;rm -rf /&lt;/b&gt;" in ws and 'class="refused"' in ws and "pill deny\">refused" in ws
    assert "closed by bastion" in ws and "policy violation" in ws and "4 messages, 3 kept" in ws
    full = await (await client.get(f"/flows/{ids['full']}", headers=VIEWER)).text()
    assert "0.412 s" in full and "reasoning <strong>2</strong>" in full and "pill err\">incomplete" in full
    assert "overloaded_error: Overloaded" in full and "-32602: bad arguments" in full
    assert "closed by bastion, code 1008 “policy violation”" in full and "No messages kept." in full
    odd = await client.get(f"/flows/{ids['malformed']}", headers=VIEWER)
    assert odd.status == 200  # malformed facts render as unknowns


async def test_live_flows_follow_the_model_and_tool_filters(api: tuple[TestClient, dict[str, str]],
                                                            tmp_path: Path) -> None:
    client, _ = api
    stream = await client.get("/flows/stream?tool=send_email", headers=VIEWER)
    assert stream.status == 200
    more = await write_records(f"sqlite:///{tmp_path}/audit.db", tmp_path / "spool-2")
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        while len(seen) < 2:
            line = (await stream.content.readline()).decode()
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    stream.close()
    assert [f["id"] for f in seen] == [more["chat_tools"], more["mcp_call"]]
    assert seen[0]["llm"]["model"] == "gpt-4o-mini-2024-07-18" and seen[1]["mcp_method"] == "tools/call"


# --- the CLI -------------------------------------------------------------------------------------------------------

@pytest.fixture
def cli_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[str], dict[str, str]]]:
    for name in [k for k in os.environ if k.startswith("BASTION_")]:
        monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path}/audit.db"
    ids = asyncio.run(write_records(url, tmp_path / "spool"))
    ids["full"] = asyncio.run(store_unredacted(url, FULL_EXTRA))
    yield ["--audit", url, "--home", str(tmp_path / "home")], ids


def _bastion(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_tail_shows_model_tokens_and_tools(cli_store: tuple[list[str], dict[str, str]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    where, ids = cli_store
    lines = {line.split()[1]: line for line in _bastion(capsys, "audit", "tail", "-n", "50", *where).splitlines()}
    assert lines[ids["chat_tools"]].endswith("  gpt-4o-mini-2024-07-18 120→45 tok  tool=lookup_order,send_email")
    assert lines[ids["mcp_call"]].endswith("  mcp=tools/call  tool=send_email")
    assert lines[ids["offered_only"]].endswith("  claude-sonnet-4 900→12 tok")
    assert lines[ids["plain"]].endswith("llm-chat")  # no facts, no suffix
    escaped = lines[ids["escape"]]
    assert "evil\\x1b[2J\\nmodel" in escaped and "\x1b" not in escaped and "tool=tool\\x1b]0;pwned\\x07" in escaped
    only = _bastion(capsys, "audit", "tail", "--tool", "send_email", *where).splitlines()
    assert [line.split()[1] for line in only] == [ids["chat_tools"], ids["mcp_call"]]
    wild = _bastion(capsys, "audit", "tail", "--model", "50%_off", "--format", "json", *where).splitlines()
    assert len(wild) == 1 and ids["wildcards"] in wild[0]
    both = _bastion(capsys, "audit", "tail", "--model", "gpt-4o-mini", "--tool", "lookup_order", *where)
    assert [line.split()[1] for line in both.splitlines()] == [ids["chat_tools"]]


def test_export_takes_the_same_filters(cli_store: tuple[list[str], dict[str, str]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    where, ids = cli_store
    out = _bastion(capsys, "audit", "export", "--format", "jsonl", "--tool", "send_email", *where)
    assert [json.loads(line)["id"] for line in out.splitlines()] == [ids["chat_tools"], ids["mcp_call"]]
    out = _bastion(capsys, "audit", "export", "--format", "jsonl", "--model", "alias-latest", *where)
    assert [json.loads(line)["id"] for line in out.splitlines()] == [ids["aliased"]]


def test_show_prints_llm_mcp_and_websocket_sections(cli_store: tuple[list[str], dict[str, str]],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    where, ids = cli_store
    chat = _bastion(capsys, "audit", "show", ids["chat_tools"], *where)
    assert "\nLLM\n" in chat and "extra      " not in chat  # the facts are shown, not dumped again as JSON
    assert "  api          openai chat.completions, operation chat, streamed, complete" in chat
    assert "  model        gpt-4o-mini-2024-07-18 (requested gpt-4o-mini, served gpt-4o-mini-2024-07-18)" in chat
    assert "  tokens       input 120, output 45, cache read 20" in chat
    assert "  offered      lookup_order, send_email" in chat
    assert '  tool call    send_email [call_2] {"to": "<script>alert(1)</script>"}' in chat
    mcp = _bastion(capsys, "audit", "show", ids["mcp_read"], *where)
    assert "\nMCP\n" in mcp and "  method       resources/read   id r-1   protocol 2025-06-18" in mcp
    assert "  resource     file:///srv/notes.md" in mcp and "  outcome      error" in mcp
    ws = _bastion(capsys, "audit", "show", ids["websocket"], *where)
    assert "\nWebSocket\n" in ws and "\"policy violation\" by bastion" in ws
    assert "4 in all, 3 kept; bytes from client 35, from server 1024" in ws
    assert "     +0.000s  client text          5 B  hello" in ws and f"binary     1024 B  sha256 {'ab' * 32}" in ws
    assert "<b>rm -rf /</b> (cut) REFUSED" in ws
    full = _bastion(capsys, "audit", "show", ids["full"], *where)
    assert "  api          openai chat.completions, operation chat, streamed, incomplete" in full
    assert "  tokens       input 10, output 3, reasoning 2" in full and "  first token  0.412 s" in full
    assert "  error        overloaded_error: Overloaded" in full and "  error        -32602: bad arguments" in full
    assert "  closed       code 1008 \"policy violation\" by bastion" in full
    odd = _bastion(capsys, "audit", "show", ids["malformed"], *where)
    assert "\nLLM\n" in odd and "extra      " not in odd
