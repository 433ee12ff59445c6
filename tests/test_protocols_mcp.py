"""Bastion's reading of MCP / JSON-RPC calls: hostile bodies and headers, the cheap pre-check's soundness,
the response observer, and the exact traffic of the real `mcp` client (captured from a local server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import httpx
import httpx2
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared import inbound
from mcp_types.jsonrpc import JSONRPCError
from mitmproxy.http import Headers
from multidict import CIMultiDict

from bastion.protocols.mcp import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_DEPTH,
    PARSE_ERROR,
    McpProblem,
    McpRequest,
    McpResponseObserver,
    decode_header_value,
    encode_header_value,
    jsonrpc_error_body,
    jsonrpc_id,
    may_be_jsonrpc,
    parse_jsonrpc,
)

V2026 = "2026-07-28"
META_VERSION = "io.modelcontextprotocol/protocolVersion"


def dump(value: Any) -> bytes:
    return json.dumps(value).encode()


def call(method: str = "tools/call", params: Any = None, **envelope: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        message["params"] = params
    message.update(envelope)
    return message


def tool_call(name: Any = "rm", arguments: Any = None, **params: Any) -> bytes:
    p: dict[str, Any] = {"name": name, **params}
    if arguments is not None:
        p["arguments"] = arguments
    return dump(call("tools/call", p))


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


# --- hostile variants -----------------------------------------------------------------------------------------

PROBLEMS: list[tuple[str, bytes, dict[str, str], int]] = [
    ("batch hiding a tools/call", dump([call("tools/list"), call("tools/call", {"name": "rm"})]), {}, INVALID_REQUEST),
    ("batch with one call", dump([call("tools/call", {"name": "rm"})]), {}, INVALID_REQUEST),
    ("batch of notifications", dump([{"jsonrpc": "2.0", "method": "notifications/initialized"}]), {},
     INVALID_REQUEST),
    ("batch element with METHOD in another case", b'[{"jsonrpc":"2.0","id":1,"METHOD":"tools/call"}]', {},
     INVALID_REQUEST),
    ("empty batch", b"[]", {}, INVALID_REQUEST),
    ("duplicate method, last wins in Python",
     b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"tools/list"}', {}, INVALID_REQUEST),
    ("duplicate method, the string copy first and no jsonrpc", b'{"method":"tools/call","id":1,"method":5}', {},
     INVALID_REQUEST),
    ("duplicate method behind an escape", b'{"jsonrpc":"2.0","id":1,"method":"tools/list","m\\u0065thod":"tools/call"}',
     {}, INVALID_REQUEST),
    ("duplicate name in params", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ls","name":"rm"}}',
     {}, INVALID_REQUEST),
    ("duplicate arguments",
     b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm","arguments":{},"arguments":{"p":"/"}}}',
     {}, INVALID_REQUEST),
    ("duplicate key deep inside arguments",
     b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm","arguments":{"a":[{"p":"x","p":"/"}]}}}',
     {}, INVALID_REQUEST),
    ("duplicate id", b'{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/list"}', {}, INVALID_REQUEST),
    ("METHOD beside method", b'{"jsonrpc":"2.0","id":1,"method":"tools/list","METHOD":"tools/call"}', {},
     INVALID_REQUEST),
    ("only METHOD, with jsonrpc", b'{"jsonrpc":"2.0","id":1,"METHOD":"tools/call","params":{"name":"rm"}}', {},
     INVALID_REQUEST),
    ("case variants only, MCP method, no jsonrpc", b'{"Method":"tools/call","ID":1,"Params":{"Name":"rm"}}', {},
     INVALID_REQUEST),
    ("json with a long s", '{"j\u017fonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm"}}'.encode(), {},
     INVALID_REQUEST),
    ("Name beside name in params", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ls","Name":"rm"}}',
     {}, INVALID_REQUEST),
    ("URI beside uri in params",
     b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"a://x","URI":"a://y"}}', {},
     INVALID_REQUEST),
    ("header method differs", tool_call(), {"Mcp-Method": "tools/list"}, HEADER_MISMATCH),
    ("header method differs in case", tool_call(), {"mcp-method": "Tools/Call"}, HEADER_MISMATCH),
    ("header name differs", tool_call("rm"), {"Mcp-Method": "tools/call", "Mcp-Name": "ls"}, HEADER_MISMATCH),
    ("header name differs in case", tool_call("rm"), {"Mcp-Name": "RM"}, HEADER_MISMATCH),
    ("base64 header name differs", tool_call("résumé"), {"Mcp-Name": encode_header_value("resume")},
     HEADER_MISMATCH),
    ("malformed base64 sentinel", tool_call("rm"), {"Mcp-Name": "=?base64?cm0?="}, HEADER_MISMATCH),
    ("orphan Mcp-Name on tools/list", dump(call("tools/list")), {"Mcp-Name": "rm"}, HEADER_MISMATCH),
    ("Mcp-Name but the body has no name", dump(call("tools/call", {"arguments": {}})), {"Mcp-Name": "rm"},
     HEADER_MISMATCH),
    ("Mcp-Name on a resource whose uri differs",
     dump(call("resources/read", {"uri": "file:///a"})), {"mcp-name": "file:///b"}, HEADER_MISMATCH),
    ("protocol version header against the envelope",
     dump(call("tools/list", {"_meta": {META_VERSION: V2026}})), {"MCP-Protocol-Version": "2025-11-25"},
     HEADER_MISMATCH),
    ("Mcp-Method on a body that is not JSON", b"method=tools/call&name=rm", {"Mcp-Method": "tools/call"}, PARSE_ERROR),
    ("Mcp-Method on an empty body", b"", {"Mcp-Method": "tools/call"}, PARSE_ERROR),
    ("Mcp-Name on a JSON body that is not JSON-RPC", b'{"name":"rm"}', {"Mcp-Name": "rm"}, HEADER_MISMATCH),
    ("Mcp-Method on a response", dump({"jsonrpc": "2.0", "id": 1, "result": {}}), {"Mcp-Method": "tools/call"},
     HEADER_MISMATCH),
    ("Mcp-Method on a batch of responses", dump([{"jsonrpc": "2.0", "id": 1, "result": {}}]),
     {"Mcp-Method": "tools/call"}, HEADER_MISMATCH),
    ("nesting one level too deep", tool_call(arguments={"a": nested(MAX_DEPTH - 2)}), {}, INVALID_REQUEST),
    ("nesting too deep for the parser", b'{"jsonrpc":"2.0","id":1,"method":"x","params":' + b"[" * 200_000, {},
     INVALID_REQUEST),
    ("invalid UTF-8 in the arguments",
     b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm","arguments":{"p":"\xff/"}}}', {},
     PARSE_ERROR),
    ("invalid UTF-8 in the tool name", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"r\xc3m"}}',
     {}, PARSE_ERROR),
    ("UTF-8-encoded surrogate, which only Python reads as is",
     b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm\xed\xa0\x80"}}', {}, PARSE_ERROR),
    ("data after the message", tool_call() + b'\n{"jsonrpc":"2.0","id":2,"method":"tools/list"}', {}, PARSE_ERROR),
    ("number too long for Python's int",
     b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm","arguments":{"n":' + b"9" * 5000 + b"}}}",
     {}, PARSE_ERROR),
    ("raw control character in a string", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"r\x01m"}}',
     {}, PARSE_ERROR),
    ("params an array on tools/call", dump(call("tools/call", ["rm"])), {}, INVALID_PARAMS),
    ("params a string", dump(call("tools/list", "all")), {}, INVALID_PARAMS),
    ("positional params with an Mcp-Method header", dump(call("eth_call", [1])), {"Mcp-Method": "eth_call"},
     INVALID_PARAMS),
    ("tools/call name not a string", tool_call(["rm"]), {}, INVALID_PARAMS),
    ("tools/call without a name", dump(call("tools/call", {"arguments": {}})), {}, INVALID_PARAMS),
    ("tools/call without params", dump(call("tools/call")), {}, INVALID_PARAMS),
    ("prompts/get name not a string", dump(call("prompts/get", {"name": 1})), {}, INVALID_PARAMS),
    ("resources/read without a uri", dump(call("resources/read", {})), {}, INVALID_PARAMS),
    ("arguments not an object", tool_call(arguments=["/"]), {}, INVALID_PARAMS),
    ("prompt arguments not an object", dump(call("prompts/get", {"name": "p", "arguments": "x"})), {},
     INVALID_PARAMS),
    ("jsonrpc without method or result", b'{"jsonrpc":"2.0","id":1}', {}, INVALID_REQUEST),
    ("method not a string", b'{"jsonrpc":"2.0","id":1,"method":["tools/call"]}', {}, INVALID_REQUEST),
    ("id a float", dump(call("tools/list", id=1.5)), {}, INVALID_REQUEST),
    ("id a boolean", dump(call("tools/list", id=True)), {}, INVALID_REQUEST),
    ("id an object", dump(call("tools/list", id={"a": 1})), {}, INVALID_REQUEST),
]


@pytest.mark.parametrize(("body", "headers", "code"), [p[1:] for p in PROBLEMS], ids=[p[0] for p in PROBLEMS])
def test_hostile_variants_are_refused(body: bytes, headers: dict[str, str], code: int) -> None:
    with pytest.raises(McpProblem) as problem:
        parse_jsonrpc(body, headers)
    assert problem.value.code == code
    assert problem.value.message and str(problem.value) == problem.value.message
    assert len(problem.value.message) < 400


NOT_CALLS: list[tuple[str, bytes]] = [
    ("batch of responses only", dump([{"jsonrpc": "2.0", "id": 1, "result": {}}, {"jsonrpc": "2.0", "id": 2,
                                                                                   "error": {"code": 1}}])),
    ("array of plain objects", dump([{"a": 1}, {"method": 1}]) .replace(b'{"method": 1}', b'{"b": 1}')),
    ("a response", dump({"jsonrpc": "2.0", "id": 1, "result": {"isError": False}})),
    ("an error response", dump({"jsonrpc": "2.0", "id": None, "error": {"code": -1, "message": "x"}})),
    ("plain JSON object", b'{"name":"rm","arguments":{}}'),
    ("REST body with a method member", b'{"method":"card","amount":5}'),
    ("REST body with capitalized members", b'{"Method":"GET","Id":3}'),
    ("method not a string and no jsonrpc", b'{"id":1,"method":5}'),
    ("deep JSON that is not JSON-RPC", dump({"a": nested(200)})),
    ("invalid JSON", b'{"method": "tools/call", '),
    ("invalid UTF-8 in a body that is not JSON-RPC", b'{"name":"\xff"}'),
    ("not JSON", b"method=tools/call"),
    ("empty", b""),
    ("a JSON string", b'"{\\"method\\":\\"tools/call\\"}"'),
    ("a JSON number", b"12"),
    ("duplicates in a body that is not JSON-RPC", b'{"a":1,"a":2}'),
]


@pytest.mark.parametrize("body", [b for _, b in NOT_CALLS], ids=[n for n, _ in NOT_CALLS])
def test_bodies_without_a_call_give_none(body: bytes) -> None:
    assert parse_jsonrpc(body, {}) is None
    assert parse_jsonrpc(body, {"MCP-Protocol-Version": "2025-11-25", "Mcp-Session-Id": "s"}) is None


ACCEPTED: list[tuple[str, bytes, dict[str, str], McpRequest]] = [
    ("tools/call", tool_call("rm", {"p": "/"}), {},
     McpRequest("tools/call", 1, "rm", None, {"p": "/"}, None)),
    ("escaped envelope member names",
     b'{"jsonrp\\u0063":"2.0","\\u0069d":"a","m\\u0065thod":"tools/c\\u0061ll","params":{"n\\u0061me":"r\\u006d"}}',
     {}, McpRequest("tools/call", "a", "rm", None, None, None)),
    ("notification without id", dump({"jsonrpc": "2.0", "method": "notifications/initialized"}), {},
     McpRequest("notifications/initialized", None, None, None, None, None)),
    ("tools/call as a notification", dump({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "rm"}}), {},
     McpRequest("tools/call", None, "rm", None, None, None)),
    ("MCP method without jsonrpc or id", dump({"method": "tools/call", "params": {"name": "rm"}}), {},
     McpRequest("tools/call", None, "rm", None, None, None)),
    ("method and id without jsonrpc", dump({"method": "tools/call", "id": 9, "params": {"name": "rm"}}), {},
     McpRequest("tools/call", 9, "rm", None, None, None)),
    ("null id", dump(call("tools/list", id=None)), {}, McpRequest("tools/list", None, None, None, None, None)),
    ("initialize with protocolVersion",
     dump(call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "a"}})),
     {}, McpRequest("initialize", 1, None, None, None, "2025-06-18")),
    ("stateless request with the _meta protocol version",
     dump(call("server/discover", {"_meta": {META_VERSION: V2026}})),
     {"MCP-Protocol-Version": V2026, "Mcp-Method": "server/discover"},
     McpRequest("server/discover", 1, None, None, None, V2026)),
    ("_meta version without headers", dump(call("tools/list", {"_meta": {META_VERSION: V2026}})), {},
     McpRequest("tools/list", 1, None, None, None, V2026)),
    ("session header version", tool_call("rm"), {"mcp-protocol-version": "2025-06-18"},
     McpRequest("tools/call", 1, "rm", None, None, "2025-06-18")),
    ("base64 Mcp-Name that matches", tool_call("résumé", {}, _meta={META_VERSION: V2026}),
     {"MCP-Protocol-Version": V2026, "Mcp-Method": "tools/call", "Mcp-Name": "=?base64?csOpc3Vtw6k=?="},
     McpRequest("tools/call", 1, "résumé", None, {}, V2026)),
    ("plain Mcp-Name that matches", tool_call("rm"), {"mcp-method": "tools/call", "mcp-name": "rm"},
     McpRequest("tools/call", 1, "rm", None, None, None)),
    ("resources/read", dump(call("resources/read", {"uri": "file:///données"})),
     {"Mcp-Name": encode_header_value("file:///données")},
     McpRequest("resources/read", 1, None, "file:///données", None, None)),
    ("prompts/get", dump(call("prompts/get", {"name": "p", "arguments": {"topic": "x"}})), {"Mcp-Name": "p"},
     McpRequest("prompts/get", 1, "p", None, {"topic": "x"}, None)),
    ("null params and arguments", dump(call("tools/call", {"name": "rm", "arguments": None})), {},
     McpRequest("tools/call", 1, "rm", None, None, None)),
    ("positional params of a JSON-RPC API that is not MCP", dump(call("eth_call", [{"to": "0x0"}, "latest"])), {},
     McpRequest("eth_call", 1, None, None, None, None)),
    ("nesting at the limit", tool_call(arguments={"a": nested(MAX_DEPTH - 3)}), {},
     McpRequest("tools/call", 1, "rm", None, {"a": nested(MAX_DEPTH - 3)}, None)),
    ("NaN that Python's json reads", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm"},"x":NaN}',
     {}, McpRequest("tools/call", 1, "rm", None, None, None)),
    ("UTF-8 BOM and whitespace", b"\xef\xbb\xbf \r\n" + tool_call("rm"), {},
     McpRequest("tools/call", 1, "rm", None, None, None)),
    ("UTF-16 body, which Python servers decode", json.dumps(call("tools/call", {"name": "rm"})).encode("utf-16"), {},
     McpRequest("tools/call", 1, "rm", None, None, None)),
    ("UTF-16-LE body without BOM", json.dumps(call("tools/call", {"name": "rm"})).encode("utf-16-le"), {},
     McpRequest("tools/call", 1, "rm", None, None, None)),
    ("duplicate keys in a response-free request only at a different depth are still fine when distinct",
     b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm","arguments":{"name":"x"}}}', {},
     McpRequest("tools/call", 1, "rm", None, {"name": "x"}, None)),
    ("Name inside arguments is data", tool_call("rm", {"Name": "a", "name": "b"}), {},
     McpRequest("tools/call", 1, "rm", None, {"Name": "a", "name": "b"}, None)),
]


@pytest.mark.parametrize(("body", "headers", "expected"), [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_calls_are_read_as_the_server_reads_them(body: bytes, headers: dict[str, str], expected: McpRequest) -> None:
    assert may_be_jsonrpc(body)
    assert parse_jsonrpc(body, headers) == expected


def test_header_names_are_matched_without_case_in_every_mapping_kind() -> None:
    body = tool_call("rm")
    for headers in (
        {"MCP-METHOD": "tools/call", "Mcp-Name": "rm"},
        Headers([(b"mcp-method", b"tools/call"), (b"MCP-Name", b"rm")]),
        CIMultiDict([("Mcp-Method", "tools/call"), ("mcp-name", "rm")]),
    ):
        assert parse_jsonrpc(body, headers) == McpRequest("tools/call", 1, "rm", None, None, None)


@pytest.mark.parametrize(
    "headers",
    [
        Headers([(b"Mcp-Name", b"rm"), (b"mcp-name", b"ls")]),
        Headers([(b"Mcp-Name", b"rm"), (b"mcp-name", b"rm")]),
        CIMultiDict([("Mcp-Name", "rm"), ("Mcp-Name", "rm")]),
        {"Mcp-Name": "rm", "mcp-name": "rm"},
    ],
    ids=["mitmproxy different", "mitmproxy identical", "aiohttp identical", "dict case variants"],
)
def test_a_repeated_routing_header_never_matches(headers: Mapping[str, str]) -> None:
    with pytest.raises(McpProblem) as problem:
        parse_jsonrpc(tool_call("rm"), headers)
    assert problem.value.code == HEADER_MISMATCH


def test_problem_messages_quote_hostile_names_short() -> None:
    with pytest.raises(McpProblem) as problem:
        parse_jsonrpc(tool_call("rm"), {"Mcp-Method": "x" * 10_000})
    assert len(problem.value.message) < 300


def test_to_json_is_the_request_part_of_extra_mcp() -> None:
    request = McpRequest("tools/call", "7", "rm", None, {"secret": "s"}, V2026)
    assert request.to_json() == {"method": "tools/call", "id": "7", "tool": "rm", "resource": None,
                                 "protocol_version": V2026}
    long = McpRequest("resources/read", 3, None, "u" * 5000, None, None).to_json()
    assert len(long["resource"]) < 1100 and long["resource"].startswith("uuu")
    with pytest.raises(AttributeError):
        request.method = "x"  # type: ignore[misc]


# --- the pre-check --------------------------------------------------------------------------------------------

PRECHECK: list[tuple[bytes, bool]] = [
    (tool_call(), True),
    (b'  \n\t{"METHOD":"tools/call"}', True),
    (b'{"m\\u0065thod":"tools/call"}', True),
    (b'{"m\\U0065thod":"tools/call"}', True),
    (b"\xef\xbb\xbf" + tool_call(), True),
    (json.dumps(call()).encode("utf-16-be"), True),
    (json.dumps(call()).encode("utf-32"), True),
    (dump([call()]), True),
    (b'{"jsonrpc":"2.0","id":1,"result":{}}', False),
    (b'{"name":"rm"}', False),
    (b"method=tools/call", False),
    (b'"method"', False),
    (b"<xml method='tools/call'/>", False),
    (b"", False),
    (b"   ", False),
    (b"[]", False),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": "h\u00e9 \"method\""}]}).encode(), False),
    (b'{"content":"\\u006dethods","methods":[1],"method_":2}', False),
    (b'{"\\u006d\\u0045thod":1}', True),
]


@pytest.mark.parametrize(("body", "expected"), PRECHECK)
def test_may_be_jsonrpc_examples(body: bytes, expected: bool) -> None:
    assert may_be_jsonrpc(body) is expected


def escaped_name(text: str, style: str, upper_hex: bool) -> str:
    """`text` as a JSON string literal with all, every other, or none of its characters as \\u escapes."""
    form = "\\u{:04X}" if upper_hex else "\\u{:04x}"
    units = []
    for index, char in enumerate(text):
        escape = style == "all" or (style == "alternate" and index % 2 == 0)
        units.append(form.format(ord(char)) if escape and ord(char) < 0x10000 else json.dumps(char)[1:-1])
    return '"' + "".join(units) + '"'


def serialize(value: Any, ensure_ascii: bool, key_style: str, upper_hex: bool, spaced: bool) -> str:
    """JSON text of `value`, member names spelled with escapes as `key_style` says (parsers read the same value)."""
    if isinstance(value, dict):
        sep = ", " if spaced else ","
        colon = ": " if spaced else ":"
        members = (
            escaped_name(k, key_style, upper_hex) + colon + serialize(v, ensure_ascii, key_style, upper_hex, spaced)
            for k, v in value.items()
        )
        return "{" + sep.join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(serialize(v, ensure_ascii, key_style, upper_hex, spaced) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


json_scalars = st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.text(max_size=12)
member_names = st.sampled_from(["method", "jsonrpc", "id", "params", "name", "arguments", "Method", "a", "é"])
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(member_names | st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
methods = st.sampled_from(["tools/call", "tools/list", "prompts/get", "resources/read", "initialize", "x"]) | st.text(
    max_size=20
)


@st.composite
def jsonrpc_calls(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"method": draw(methods)}
    if draw(st.booleans()):
        message["jsonrpc"] = "2.0"
        if draw(st.booleans()):
            message["id"] = draw(st.integers() | st.text(max_size=8))
    else:
        message["id"] = draw(st.integers() | st.text(max_size=8))
    if draw(st.booleans()):
        message["params"] = draw(st.dictionaries(member_names | st.text(max_size=6), json_values, max_size=4))
    keys = draw(st.permutations(list(message)))
    return {k: message[k] for k in keys}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=jsonrpc_calls(),
    ensure_ascii=st.booleans(),
    key_style=st.sampled_from(["none", "all", "alternate"]),
    upper_hex=st.booleans(),
    spaced=st.booleans(),
    in_batch=st.booleans(),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"]),
)
def test_may_be_jsonrpc_never_misses_a_call(
    message: dict[str, Any], ensure_ascii: bool, key_style: str, upper_hex: bool, spaced: bool, in_batch: bool,
    encoding: str,
) -> None:
    text = serialize([message] if in_batch else message, ensure_ascii, key_style, upper_hex, spaced)
    body = text.encode(encoding, "surrogatepass")
    assert may_be_jsonrpc(body)
    try:
        request = parse_jsonrpc(body, {})
    except McpProblem:
        return   # refused: governed either way
    assert request is not None and request.method == message["method"]


@settings(max_examples=200)
@given(value=json_values, ensure_ascii=st.booleans())
def test_a_body_the_precheck_rejects_never_yields_a_call(value: Any, ensure_ascii: bool) -> None:
    body = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    if may_be_jsonrpc(body):
        return
    try:
        request = parse_jsonrpc(body, {})
    except McpProblem:
        return   # malformed JSON-RPC without a call (e.g. an empty batch): nothing escapes the rules
    assert request is None


@given(value=st.text())
def test_header_codec_mirrors_the_sdk(value: str) -> None:
    assert encode_header_value(value) == inbound.encode_header_value(value)
    assert decode_header_value(encode_header_value(value)) == value
    for header in (value, f"=?base64?{value}?="):
        try:
            expected = inbound.decode_header_value(header)
        except ValueError:   # the SDK raises on a non-ASCII payload; Bastion calls it malformed
            expected = None
        assert decode_header_value(header) == expected


def reference_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(reference_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(reference_depth, value), default=0)
    return 0


tricky_text = st.text(alphabet='[]{}"\\ab\u00e9\u4e00', max_size=6)


@st.composite
def deep_values(draw: st.DrawFn) -> Any:
    value: Any = draw(tricky_text | st.integers())
    for _ in range(draw(st.integers(MAX_DEPTH - 6, MAX_DEPTH + 2))):
        noise = draw(st.lists(tricky_text, max_size=2))
        if draw(st.booleans()):
            value = {draw(tricky_text): value, **{f"n{i}{t}": t for i, t in enumerate(noise)}}
        else:
            value = [*noise, value]
    return value


@settings(max_examples=150)
@given(arguments=deep_values(), ensure_ascii=st.booleans(), encoding=st.sampled_from(["utf-8", "utf-16"]))
def test_depth_limit_matches_a_walk_of_the_value(arguments: Any, ensure_ascii: bool, encoding: str) -> None:
    message = call("tools/call", {"name": "t", "arguments": {"a": arguments}})
    body = json.dumps(message, ensure_ascii=ensure_ascii).encode(encoding, "surrogatepass")
    if reference_depth(message) > MAX_DEPTH:
        with pytest.raises(McpProblem, match="nests deeper"):
            parse_jsonrpc(body, {})
    else:
        request = parse_jsonrpc(body, {})
        assert request is not None and request.arguments == {"a": arguments}


# --- refusal helpers ------------------------------------------------------------------------------------------

IDS: list[tuple[str, bytes, tuple[bool, Any]]] = [
    ("request with an integer id", tool_call(), (True, 1)),
    ("request with a string id", dump(call("tools/list", id="abc")), (True, "abc")),
    ("notification", dump({"jsonrpc": "2.0", "method": "notifications/initialized"}), (True, None)),
    ("batch", dump([call(), call(id=2)]), (True, None)),
    ("empty batch", b"[]", (True, None)),
    ("response", dump({"jsonrpc": "2.0", "id": 4, "result": {}}), (True, None)),
    ("duplicate id", b'{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/list"}', (True, None)),
    ("case variant of id", b'{"jsonrpc":"2.0","id":1,"ID":2,"method":"tools/list"}', (True, None)),
    ("float id", dump(call(id=1.5)), (True, None)),
    ("boolean id", dump(call(id=False)), (True, None)),
    ("invalid UTF-8 in a call", b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"\xff"}}',
     (True, None)),
    ("data after a call", tool_call() + b"{}", (True, None)),
    ("too deep for the parser", b'{"jsonrpc":"2.0","id":1,"method":"x","params":' + b"[" * 200_000, (True, None)),
    ("UTF-16 call", json.dumps(call(id=5)).encode("utf-16"), (True, 5)),
    ("plain JSON", b'{"a":1}', (False, None)),
    ("array of plain values", b"[1,2]", (False, None)),
    ("not JSON", b"hello", (False, None)),
    ("invalid JSON", b'{"jsonrpc":', (False, None)),
    ("empty", b"", (False, None)),
]


@pytest.mark.parametrize(("body", "expected"), [i[1:] for i in IDS], ids=[i[0] for i in IDS])
def test_jsonrpc_id(body: bytes, expected: tuple[bool, Any]) -> None:
    assert jsonrpc_id(body) == expected


@given(body=st.binary(max_size=200))
def test_jsonrpc_id_never_raises(body: bytes) -> None:
    known, request_id = jsonrpc_id(body)
    assert isinstance(known, bool)
    assert request_id is None or isinstance(request_id, str | int)


def test_jsonrpc_error_body_is_compact_and_valid_for_the_mcp_sdk() -> None:
    data = {"type": "bastion_denied", "rule": "no-rm", "request_id": "r1"}
    body = jsonrpc_error_body(7, -32600, "denied by rule no-rm", data)
    assert b" " not in body.replace(b"denied by rule no-rm", b"")
    parsed = json.loads(body)
    assert parsed == {"jsonrpc": "2.0", "id": 7, "error": {"code": -32600, "message": "denied by rule no-rm",
                                                            "type": "bastion_denied", "data": data}}
    error = JSONRPCError.model_validate_json(body)
    assert error.id == 7 and error.error.code == -32600 and error.error.data == data
    assert json.loads(jsonrpc_error_body(None, -32020, "m", {}))["error"]["type"] is None


# --- the response observer ------------------------------------------------------------------------------------


def sse(*messages: Any, event: str | None = None, newline: str = "\n") -> bytes:
    parts = []
    for message in messages:
        head = f"event: {event}{newline}" if event else ""
        parts.append(f"{head}data: {json.dumps(message)}{newline}{newline}")
    return "".join(parts).encode()


NOTIFICATION = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
SERVER_REQUEST = {"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}}


def observe(request_id: Any, stream: bytes, pieces: Callable[[bytes], Iterator[bytes]] | None = None) -> dict[str, Any]:
    observer = McpResponseObserver(request_id)
    for piece in (pieces or (lambda b: iter([b])))(stream):
        observer.feed(piece)
    observer.feed(b"")
    return observer.result()


def test_sse_response_after_a_notification_and_a_server_request_at_every_split() -> None:
    stream = b": keepalive\r\n\r\nid: e1\r\ndata:\r\n\r\n" + sse(
        NOTIFICATION, SERVER_REQUEST, {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": False}},
        newline="\r\n",
    )
    expected = {"outcome": "result", "error": None}
    for cut in range(1, len(stream)):   # b"" means the end of the stream, so no empty piece
        assert observe(1, stream, lambda b, cut=cut: iter([b[:cut], b[cut:]])) == expected, cut
    assert observe(1, stream, lambda b: (b[i:i + 1] for i in range(len(b)))) == expected


def test_tool_error_error_and_missing_outcomes() -> None:
    tool_error = sse({"jsonrpc": "2.0", "id": "a", "result": {"content": [], "isError": True}})
    assert observe("a", tool_error) == {"outcome": "tool_error", "error": None}
    error = sse(NOTIFICATION, {"jsonrpc": "2.0", "id": 2, "error": {"code": -32602, "message": "bad " * 300}})
    result = observe(2, error)
    assert result["outcome"] == "error" and result["error"]["code"] == -32602
    assert len(result["error"]["message"]) == 500
    assert observe(3, sse(NOTIFICATION)) == {"outcome": "none", "error": None}
    assert observe(3, b"") == {"outcome": "none", "error": None}


def test_error_fields_of_the_wrong_type_are_normalized() -> None:
    for error in ({"code": "x", "message": 5}, {"code": True}, "oops", {"code": 10**30, "message": "m"}):
        result = observe(1, sse({"jsonrpc": "2.0", "id": 1, "error": error}))
        assert result["outcome"] == "error"
        assert isinstance(result["error"]["code"], int) and isinstance(result["error"]["message"], str)


@pytest.mark.parametrize(("request_id", "response_id"), [(1, "1"), ("1", 1), (1, True), (True, 1), (1, 1.0),
                                                          (1, None), (None, None)])
def test_ids_are_compared_with_their_type(request_id: Any, response_id: Any) -> None:
    stream = sse({"jsonrpc": "2.0", "id": response_id, "error": {"code": 1, "message": "m"}})
    assert observe(request_id, stream)["outcome"] == "none"
    observer = McpResponseObserver(request_id)
    observer.feed_body(stream.split(b"data: ")[1])
    assert observer.result()["outcome"] == "none"


def test_member_names_are_read_exactly_and_through_escapes() -> None:
    escaped = b'data: {"jsonrpc":"2.0","\\u0069d":1,"result":{"isError":true}}\n\n'
    assert observe(1, escaped) == {"outcome": "tool_error", "error": None}
    assert observe(1, sse({"jsonrpc": "2.0", "ID": 1, "result": {}}))["outcome"] == "none"
    assert observe(1, sse({"jsonrpc": "2.0", "id": 1, "result": {}, "method": "x"}))["outcome"] == "none"


def test_only_message_events_count_and_the_first_answer_wins() -> None:
    other = sse({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "m"}}, event="other")
    ok = sse({"jsonrpc": "2.0", "id": 1, "result": {}}, event="message")
    later = sse({"jsonrpc": "2.0", "id": 1, "error": {"code": 2, "message": "late"}})
    assert observe(1, other + ok + later) == {"outcome": "result", "error": None}


def test_oversized_events_are_skipped() -> None:
    big = sse({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x" * 400}})
    small = sse({"jsonrpc": "2.0", "id": 1, "result": {}})
    observer = McpResponseObserver(1, max_event=300)
    observer.feed(big)
    observer.feed(small)
    assert observer.result() == {"outcome": "result", "error": None}
    default = McpResponseObserver(1)
    default.feed(sse({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x" * (1 << 20)}}))
    default.feed(b"")
    assert default.result()["outcome"] == "none"


def test_feed_body_single_batch_and_garbage() -> None:
    observer = McpResponseObserver(5)
    observer.feed_body(dump({"jsonrpc": "2.0", "id": 5, "result": {"isError": True}}))
    assert observer.result()["outcome"] == "tool_error"
    batch = McpResponseObserver(5)
    batch.feed_body(dump([{"jsonrpc": "2.0", "id": 4, "result": {}}, {"jsonrpc": "2.0", "id": 5, "result": {}}]))
    assert batch.result()["outcome"] == "result"
    for garbage in (b"", b"\xff\xfe\x00", b"[" * 100_000, b"not json", dump({"id": 5}), b"7"):
        observer = McpResponseObserver(5)
        observer.feed_body(garbage)
        assert observer.result() == {"outcome": "none", "error": None}
    capped = McpResponseObserver(5, max_body=10)
    capped.feed_body(dump({"jsonrpc": "2.0", "id": 5, "result": {}}))
    assert capped.result()["outcome"] == "none"


def test_a_notification_has_no_answer_and_hostile_streams_never_raise() -> None:
    notification = McpResponseObserver(None)
    notification.feed(sse({"jsonrpc": "2.0", "id": None, "result": {}}))
    assert notification.result()["outcome"] == "none"
    observer = McpResponseObserver(1, max_event=64)
    for chunk in (b"\xff\xfe\r", b"\ndata: " + b"[" * 5000, b"\r\n\r\n", b"data: {\n\n", b"\x00" * 100, b"data: 1\n\n"):
        observer.feed(chunk)
    observer.feed(b"")
    observer.feed(sse({"jsonrpc": "2.0", "id": 1, "result": {}}))   # after the end: ignored
    assert observer.result() == {"outcome": "none", "error": None}


# --- the real client ------------------------------------------------------------------------------------------

RESUME_TOOL = "résumé_tool"
RESOURCE_URI = "file:///données/é.txt"


def build_server() -> MCPServer:
    server = MCPServer("bastion-test")

    @server.tool(name=RESUME_TOOL)
    async def resume_tool(x: int, ctx: Context) -> str:
        await ctx.info("working")
        return f"ok {x}"

    @server.tool()
    def fails() -> str:
        raise ValueError("boom")

    @server.resource(RESOURCE_URI)
    def resource() -> str:
        return "hello"

    @server.prompt(name="plain")
    def prompt(topic: str) -> str:
        return f"talk about {topic}"

    return server


class QuietServer(uvicorn.Server):
    """uvicorn without signal handlers (they belong to pytest)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def recording(app: Any, records: list[dict[str, Any]]) -> Any:
    """ASGI wrapper keeping each exchange: method, headers and body in, content type and body out."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        record: dict[str, Any] = {
            "method": scope["method"],
            "headers": Headers([(k, v) for k, v in scope["headers"]]),
            "body": b"",
            "content_type": "",
            "response": b"",
        }
        records.append(record)

        async def receive_recorded() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                record["body"] += message.get("body", b"")
            return message

        async def send_recorded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record["content_type"] = dict(message["headers"]).get(b"content-type", b"").decode()
            elif message["type"] == "http.response.body":
                record["response"] += message.get("body", b"")
            await send(message)

        await app(scope, receive_recorded, send_recorded)

    return wrapped


@contextlib.asynccontextmanager
async def mcp_client(url: str, mode: str, log_level: Any = None) -> AsyncIterator[Client]:
    """The real client, on an HTTP client that ignores proxy settings from the environment."""
    async with (
        httpx2.AsyncClient(trust_env=False, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, log_level=log_level) as client,
    ):
        yield client


@contextlib.asynccontextmanager
async def recorded_mcp_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    records: list[dict[str, Any]] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = recording(build_server().streamable_http_app(), records)
    server = QuietServer(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}/mcp", records
    finally:
        server.should_exit = True
        await task
        sock.close()


def observed(record: dict[str, Any], request_id: Any) -> dict[str, Any]:
    observer = McpResponseObserver(request_id)
    if record["content_type"].startswith("text/event-stream"):
        stream = record["response"]
        for start in range(0, len(stream), 7):
            observer.feed(stream[start:start + 7])
        observer.feed(b"")
    else:
        observer.feed_body(record["response"])
    return observer.result()


@pytest.mark.filterwarnings("ignore::mcp.MCPDeprecationWarning")   # ctx.info: the notification we want
@pytest.mark.parametrize(("mode", "version"), [("legacy", "2025-11-25"), (V2026, V2026)])
async def test_the_real_mcp_client_traffic(mode: str, version: str) -> None:
    async with (
        recorded_mcp_server() as (url, records),
        mcp_client(url, mode, log_level="info" if mode == V2026 else None) as client,
    ):
        assert not (await client.call_tool(RESUME_TOOL, {"x": 3})).is_error
        assert (await client.call_tool("fails", {})).is_error
        await client.read_resource(RESOURCE_URI)
        await client.get_prompt("plain", {"topic": "x"})

    posts = [r for r in records if r["method"] == "POST"]
    requests: list[tuple[McpRequest, dict[str, Any]]] = []
    for record in records:
        if record["method"] != "POST":
            assert parse_jsonrpc(record["body"], record["headers"]) is None
            continue
        assert may_be_jsonrpc(record["body"])
        request = parse_jsonrpc(record["body"], record["headers"])
        assert request is not None
        message = json.loads(record["body"])
        assert request.method == message["method"] and request.id == message.get("id")
        assert jsonrpc_id(record["body"]) == (True, message.get("id"))
        if request.method != "initialize":
            assert request.protocol_version == version
        requests.append((request, record))

    by_method = {request.method: (request, record) for request, record in requests if request.tool != "fails"}
    assert by_method["tools/call"][0].tool == RESUME_TOOL
    resume_answer = by_method["tools/call"][1]["response"]
    assert resume_answer.index(b"notifications/message") < resume_answer.index(b'"result"')
    assert by_method["tools/call"][0].arguments == {"x": 3}
    assert by_method["resources/read"][0].resource == RESOURCE_URI
    assert by_method["prompts/get"][0].tool == "plain"
    assert by_method["prompts/get"][0].arguments == {"topic": "x"}
    if mode == "legacy":
        assert by_method["initialize"][0].protocol_version == version
        assert by_method["notifications/initialized"][0].id is None
    else:
        headers = by_method["tools/call"][1]["headers"]
        assert headers["mcp-name"].startswith("=?base64?") and headers["mcp-method"] == "tools/call"

    outcomes = {(request.method, request.tool): observed(record, request.id)["outcome"]
                for request, record in requests if request.id is not None}
    assert outcomes[("tools/call", RESUME_TOOL)] == "result"
    assert outcomes[("tools/call", "fails")] == "tool_error"
    assert outcomes[("resources/read", None)] == "result"
    assert outcomes[("prompts/get", "plain")] == "result"
    assert len(posts) == len(requests)


@pytest.mark.filterwarnings("ignore::mcp.MCPDeprecationWarning")
async def test_bastion_refuses_the_header_mismatch_the_real_server_refuses() -> None:
    async with recorded_mcp_server() as (url, records):
        async with mcp_client(url, V2026) as client:
            await client.call_tool(RESUME_TOOL, {"x": 1})
        sent = next(r for r in records if b'"tools/call"' in r["body"])
        tampered = {k: v for k, v in sent["headers"].items() if k.lower() not in ("host", "content-length")}
        tampered["mcp-name"] = "fails"
        with pytest.raises(McpProblem) as problem:
            parse_jsonrpc(sent["body"], tampered)
        async with httpx.AsyncClient(trust_env=False) as http:
            answer = await http.post(url, content=sent["body"], headers=tampered)
    assert problem.value.code == HEADER_MISMATCH
    assert answer.status_code == 400 and answer.json()["error"]["code"] == HEADER_MISMATCH
