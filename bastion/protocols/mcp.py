"""What an MCP (Model Context Protocol) call asks for, read the way the server will read it, and how it ended.

MCP's streamable HTTP transport is JSON-RPC 2.0: the client POSTs one message per request to one endpoint, and
the server answers `application/json` or `text/event-stream` (SSE whose `data:` lines are JSON-RPC messages;
notifications and server-to-client requests may come before the response). Two protocol shapes share it: the
session one (2025-03-26 .. 2025-11-25: `initialize`, then `Mcp-Session-Id`) and the stateless 2026-07-28 one
(`server/discover`, `params._meta["io.modelcontextprotocol/protocolVersion"]` on every request and the routing
headers `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`).

Rules about tools only hold if Bastion reads a call exactly as the server does. Every place where JSON parsers
or MCP servers disagree is a way to show Bastion one call and the server another, so this module refuses
(`McpProblem`, answered with HTTP 400 and a JSON-RPC error) instead of guessing:

- batches (a call inside an array escapes per-message rules: the ToolHive/lobu bypass);
- duplicate member names anywhere (Python and Go keep the last, other parsers the first or refuse);
- envelope or name members spelled in another letter case (`"METHOD"`, `"Name"`, "json" with a long s): Go's
  encoding/json matches member names without regard to case, including the long-s and Kelvin-sign folds;
- bodies that are only JSON-RPC when read leniently (invalid UTF-8 that Node and Go replace with U+FFFD, data
  after the message that a streaming decoder ignores, numbers too long for Python's int);
- routing headers that disagree with the body (SEP-2243 `Mcp-Method` / `Mcp-Name`, and `MCP-Protocol-Version`
  against the `_meta` envelope), so a gateway routing on headers sees the call the server runs;
- nesting deeper than `MAX_DEPTH`, so nothing downstream recurses without bound.

Pure code: no I/O and no import of the `mcp` SDK (a test-only dependency); the few SDK rules needed (header value
codec, name-bearing methods) are mirrored from `mcp/shared/inbound.py`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final

from bastion.protocols.sse import SseParser

__all__ = [
    "HEADER_MISMATCH",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_DEPTH",
    "NAME_BEARING_METHODS",
    "PARSE_ERROR",
    "PROTOCOL_VERSION_META_KEY",
    "McpProblem",
    "McpRequest",
    "McpResponseObserver",
    "decode_header_value",
    "encode_header_value",
    "jsonrpc_error_body",
    "jsonrpc_id",
    "may_be_jsonrpc",
    "parse_jsonrpc",
]

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
INVALID_PARAMS: Final = -32602
HEADER_MISMATCH: Final = -32020
"""MCP 2026-07-28: the HTTP routing headers do not match the request body."""

MAX_DEPTH: Final = 64
"""Deepest nesting of objects/arrays accepted in a JSON-RPC message (the message itself is level 1)."""

PROTOCOL_VERSION_META_KEY: Final = "io.modelcontextprotocol/protocolVersion"
NAME_BEARING_METHODS: Final[Mapping[str, str]] = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
"""Method -> the params member the `Mcp-Name` header mirrors (as in mcp.shared.inbound)."""

_ARGUMENT_BEARING_METHODS: Final = frozenset({"tools/call", "prompts/get"})
_ENVELOPE_MEMBERS: Final = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
_NAME_PARAMS_MEMBERS: Final = frozenset({"name", "uri", "arguments", "_meta"})
_MCP_METHOD_PREFIXES: Final = (
    "tools/", "prompts/", "resources/", "notifications/", "completion/", "logging/", "sampling/", "roots/",
    "elicitation/", "server/", "tasks/", "subscriptions/", "initialize", "ping",
)
_METHOD_HEADER: Final = "mcp-method"
_NAME_HEADER: Final = "mcp-name"
_VERSION_HEADER: Final = "mcp-protocol-version"

_UTF8_BOM: Final = b"\xef\xbb\xbf"
_FIRST_SIGNIFICANT = re.compile(rb"[^ \t\r\n\f\v]")
# The member name "method" as JSON text can spell it: each letter itself or as a \u escape, in any case.
_METHOD_NAME = re.compile(
    rb'"(?:m|\\u00[46]d)(?:e|\\u00[46]5)(?:t|\\u00[57]4)(?:h|\\u00[46]8)(?:o|\\u00[46]f)(?:d|\\u00[46]4)"',
    re.IGNORECASE,
)
# The same for "id", as the response observer's cheap filter (exact case: the MCP SDKs read names exactly).
_ID_NAME = re.compile(r'"(?:i|\\u0069)(?:d|\\u0064)"')
_ENCODED_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")   # U+D800..U+DFFF written as UTF-8: invalid UTF-8
_DEPTH_STEPS = (bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff"), bytes(set(range(256)) - set(b"[]{}")))
_MAX_INT_DIGITS: Final = 4000            # below CPython's int/str conversion limit (4300)
_SHOWN_CHARS: Final = 80                 # how much of a hostile name a problem message quotes
_JSON_CAP: Final = 1024                  # longest string `McpRequest.to_json` keeps
_EVENT_CAP: Final = 1 << 20              # biggest SSE event the response observer reads
_BODY_CAP: Final = 4 << 20               # biggest application/json answer the response observer reads
_ERROR_MESSAGE_CAP: Final = 500
_INT64 = range(-(1 << 63), 1 << 63)


class McpProblem(ValueError):
    """The body cannot be governed as one unambiguous JSON-RPC call: refuse it (HTTP 400, JSON-RPC error `code`)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class McpRequest:
    """One JSON-RPC call, as the server will read it.

    `id` is None for a notification; `tool` is params.name of tools/call and prompts/get, `resource` params.uri
    of resources/read; `arguments` is params.arguments of tools/call and prompts/get (None when absent);
    `protocol_version` comes from the MCP-Protocol-Version header, else the 2026 `_meta` envelope, else
    initialize's params.protocolVersion.
    """

    method: str
    id: str | int | None
    tool: str | None
    resource: str | None
    arguments: Any
    protocol_version: str | None

    def to_json(self) -> dict[str, Any]:
        """The request half of the audit record's `extra["mcp"]` (the arguments stay in the recorded body)."""
        return {
            "method": _cap(self.method),
            "id": _cap(self.id) if isinstance(self.id, str) else self.id,
            "tool": _cap(self.tool),
            "resource": _cap(self.resource),
            "protocol_version": _cap(self.protocol_version),
        }


# --- the cheap pre-check ---------------------------------------------------------------------------------------


def may_be_jsonrpc(body: bytes) -> bool:
    """False only for bodies that no JSON parser can read as carrying a JSON-RPC call (request or notification).

    Sound because a call is an object, alone or inside a batch array, with a member named "method":

    - a JSON text holding one starts with `{` or `[` after whitespace and an optional UTF-8 BOM (UTF-16/32
      bodies, which Python's json detects by their BOM or NUL bytes, are passed on to the parser);
    - in JSON a member name is a string token, and a letter inside a string is either the letter itself or its
      `\\uXXXX` escape (JSON has no other escape for letters). So the raw text of a member named "method" is a
      quote, six units each `m` or `\\u006d` (and so on), a quote: exactly what `_METHOD_NAME` matches. It
      also ignores the case of letters and hex digits, for parsers that match names case-insensitively (Go's
      encoding/json; "method" has none of the letters with non-ASCII case folds, k and s) and for a lenient
      `\\U`. In UTF-8 these are ASCII bytes, which never occur inside a multi-byte character, and lenient
      decoding (invalid bytes replaced) leaves them alone.

    Ordinary JSON (an LLM request full of `\\u00e9`) passes only if it really has such a member. The body must
    be the decoded one (Content-Encoding removed). One C-level regex scan: about 1 ms per MiB.
    """
    if _wide_encoding(body):
        return True
    start = len(_UTF8_BOM) if body.startswith(_UTF8_BOM) else 0
    first = _FIRST_SIGNIFICANT.search(body, start)
    if first is None or body[first.start()] not in b"{[":
        return False
    return _METHOD_NAME.search(body, first.start()) is not None


def _wide_encoding(body: bytes) -> bool:
    """UTF-16/32, as `json.detect_encoding` recognizes it: a BOM or a NUL among the first four bytes."""
    return body.startswith((b"\xfe\xff", b"\xff\xfe")) or b"\x00" in body[:4]


# --- decoding -------------------------------------------------------------------------------------------------


class _TooDeep(Exception):
    """The JSON parser gave up on the nesting (RecursionError)."""


@dataclass(frozen=True, slots=True)
class _Decoded:
    value: Any
    duplicate: str | None   # the first member name seen twice in one object, anywhere
    strict: bool            # False: read leniently (bad UTF-8, trailing data, huge number)


class _DuplicateTracker:
    """`object_pairs_hook` that builds dicts as json does (last value wins) and remembers the first duplicate."""

    __slots__ = ("first",)

    def __init__(self) -> None:
        self.first: str | None = None

    def hook(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs) and self.first is None:
            seen: set[str] = set()
            for key, _value in pairs:
                if key in seen:
                    self.first = key
                    break
                seen.add(key)
        return obj


def _lenient_int(digits: str) -> int | float:
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else float(digits)


def _decode(body: bytes) -> _Decoded | None:
    """The JSON value of the body, strictly as Python reads it, else as lenient servers would; None if neither.

    Raises `_TooDeep` when the nesting defeats the parser.
    """
    if _ENCODED_SURROGATE.search(body) is not None and not _wide_encoding(body):
        return _decode_leniently(body)   # Python reads surrogates in UTF-8 ("surrogatepass"), others replace them
    tracker = _DuplicateTracker()
    try:
        return _Decoded(json.loads(body, object_pairs_hook=tracker.hook), tracker.first, strict=True)
    except RecursionError:
        raise _TooDeep from None
    except ValueError:   # invalid JSON, invalid UTF-8 (UnicodeDecodeError), a number past the int limit
        pass
    return _decode_leniently(body)


def _decode_leniently(body: bytes) -> _Decoded | None:
    """Invalid bytes replaced, control characters in strings allowed, anything after the first value ignored."""
    try:
        text = body.decode(json.detect_encoding(body), "replace").removeprefix("\ufeff")
    except LookupError:
        return None
    tracker = _DuplicateTracker()
    decoder = json.JSONDecoder(object_pairs_hook=tracker.hook, parse_int=_lenient_int, strict=False)
    start = len(text) - len(text.lstrip(" \t\r\n"))
    try:
        value, _end = decoder.raw_decode(text, start)
    except RecursionError:
        raise _TooDeep from None
    except ValueError:
        return None
    return _Decoded(value, tracker.first, strict=False)


def _deeper_than(body: bytes, limit: int) -> bool:
    """Whether objects/arrays in `body`, strictly valid JSON, nest more than `limit` levels.

    Works on the text, not on the parsed value: drop escaped backslashes and quotes, so every quote left delimits
    a string; keep what lies outside strings; turn brackets into +1/-1 steps and drop the rest; the deepest level
    is the highest running sum. Bytes methods run in C; the running sum costs ~90 ns per bracket, and a body
    with no more opening brackets than `limit` skips it all.
    """
    if body.count(b"{") + body.count(b"[") <= limit:
        return False
    if _wide_encoding(body):
        body = body.decode(json.detect_encoding(body), "surrogatepass").encode("utf-8", "surrogatepass")
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    steps = b"".join(unescaped.split(b'"')[::2]).translate(*_DEPTH_STEPS)
    return max(accumulate(memoryview(steps).cast("b")), default=0) > limit


# --- message shape --------------------------------------------------------------------------------------------


def _is_mcp_method(method: str) -> bool:
    return method.startswith(_MCP_METHOD_PREFIXES)


def _envelope_values(obj: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The values of members named, ignoring case as Go does, like an envelope member: folded name -> values."""
    found: dict[str, list[Any]] = {}
    for key, value in obj.items():
        folded = key if key in _ENVELOPE_MEMBERS else key.casefold()
        if folded in _ENVELOPE_MEMBERS:
            found.setdefault(folded, []).append(value)
    return found


def _looks_like_message(obj: Mapping[str, Any], duplicate: bool) -> bool:
    """Whether some server reads `obj` as a JSON-RPC message.

    Yes with a "jsonrpc" member, or a string "method" with an "id" or an MCP method name. Also yes when one of
    these hides behind another letter case (Go), or when the body has duplicate members and any "method" (a
    parser keeping the other copy may see a string): such bodies are then refused, not ignored.
    """
    method = obj.get("method")
    if "jsonrpc" in obj or (isinstance(method, str) and ("id" in obj or _is_mcp_method(method))):
        return True
    members = _envelope_values(obj)
    if "jsonrpc" in members:
        return True
    methods = members.get("method", [])
    if duplicate and methods:
        return True
    return any(isinstance(candidate, str) and _is_mcp_method(candidate) for candidate in methods)


def _has_method_member(element: Any) -> bool:
    return isinstance(element, dict) and "method" in _envelope_values(element)


def _check_member_case(obj: Mapping[str, Any], canonical: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in canonical and (folded := key.casefold()) in canonical:
            raise McpProblem(
                INVALID_REQUEST,
                f"member {_shown(key)}{where} differs from {folded!r} only in letter case: some servers read it as "
                f"{folded!r} and others ignore it, so it is refused",
            )


def _shown(text: str) -> str:
    """A hostile string, quoted and cut for an error message."""
    return repr(text[:_SHOWN_CHARS] + ("..." if len(text) > _SHOWN_CHARS else ""))


def _cap(text: str | None) -> str | None:
    if text is None or len(text) <= _JSON_CAP:
        return text
    return text[:_JSON_CAP] + "..."


# --- routing headers ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RoutingHeaders:
    method: str | None
    name: str | None
    version: str | None

    @property
    def claim_mcp(self) -> bool:
        return self.method is not None or self.name is not None

    @classmethod
    def read(cls, headers: Mapping[str, str]) -> _RoutingHeaders:
        """The three headers, names matched without case; copies of one header are joined with ", " (as HTTP
        folds them), so a repeated header never equals the body value unless it is a single copy."""
        found: dict[str, list[str]] = {}
        for name, value in headers.items():
            lowered = name.lower()
            if lowered in (_METHOD_HEADER, _NAME_HEADER, _VERSION_HEADER):
                found.setdefault(lowered, []).append(value)
        joined = {name: ", ".join(values) for name, values in found.items()}
        return cls(joined.get(_METHOD_HEADER), joined.get(_NAME_HEADER), joined.get(_VERSION_HEADER))


_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")
_HEADER_SAFE = re.compile(r"^[\x20-\x7E]*$")


def encode_header_value(value: str) -> str:
    """As mcp.shared.inbound: plain visible ASCII without edge spaces as is, anything else `=?base64?...?=`."""
    if _HEADER_SAFE.fullmatch(value) and value == value.strip() and not _B64_SENTINEL.fullmatch(value):
        return value
    return f"=?base64?{base64.b64encode(value.encode('utf-8')).decode('ascii')}?="


def decode_header_value(value: str | None) -> str | None:
    """As mcp.shared.inbound: undo the base64 sentinel; a malformed or non-canonical sentinel gives None."""
    if value is None:
        return None
    match = _B64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(decoded).decode("ascii") != payload:
        return None
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- the parser -----------------------------------------------------------------------------------------------


def parse_jsonrpc(body: bytes, headers: Mapping[str, str]) -> McpRequest | None:
    """The JSON-RPC call in `body` (decoded, already size-bounded), None when there is no call to govern.

    None: not JSON-RPC at all, a response (or a batch of responses: nothing to govern), and no `Mcp-Method` /
    `Mcp-Name` header claims otherwise. Raises `McpProblem` when the body is a call that cannot be read
    unambiguously (see the module docstring), when the routing headers disagree with it, or when they claim MCP
    for a body that is not a call. Bodies `may_be_jsonrpc` says no to never yield an `McpRequest`.
    """
    routing = _RoutingHeaders.read(headers)
    try:
        decoded = _decode(body)
    except _TooDeep:
        raise McpProblem(INVALID_REQUEST, f"the JSON body nests deeper than {MAX_DEPTH} levels") from None
    if decoded is None:
        if routing.claim_mcp:
            raise McpProblem(PARSE_ERROR, "the body is not valid JSON, but its Mcp-Method/Mcp-Name headers say "
                                          "it is an MCP request")
        return None
    value = decoded.value
    if isinstance(value, list):
        _refuse_batch_with_calls(value)
        return _not_a_call(routing)
    if not isinstance(value, dict) or not _looks_like_message(value, decoded.duplicate is not None):
        return _not_a_call(routing)
    _check_unambiguous(decoded, body)
    _check_member_case(value, _ENVELOPE_MEMBERS, "")
    method = value.get("method")
    if not isinstance(method, str):
        if "result" in value or "error" in value:
            return _not_a_call(routing)
        raise McpProblem(INVALID_REQUEST, "a JSON-RPC request needs a string 'method' (a response needs "
                                          "'result' or 'error')")
    params = _params(value, method, routing)
    _check_headers(method, params, routing)
    return _read_call(value, method, params, routing)


def _not_a_call(routing: _RoutingHeaders) -> None:
    if routing.claim_mcp:
        raise McpProblem(HEADER_MISMATCH, "Mcp-Method/Mcp-Name header on a body that is not a JSON-RPC request")
    return None


def _refuse_batch_with_calls(batch: list[Any]) -> None:
    if not batch:
        raise McpProblem(INVALID_REQUEST, "empty JSON-RPC batch: send one message per request")
    if any(_has_method_member(element) for element in batch):
        raise McpProblem(INVALID_REQUEST, "JSON-RPC batches are not accepted: each call must be checked on its "
                                          "own, so send one message per request")


def _check_unambiguous(decoded: _Decoded, body: bytes) -> None:
    if not decoded.strict:
        raise McpProblem(PARSE_ERROR, "the body is a JSON-RPC message only when read leniently (invalid UTF-8, "
                                      "data after the message, or a number too long): servers disagree on such "
                                      "bodies, so it is refused")
    if decoded.duplicate is not None:
        raise McpProblem(INVALID_REQUEST, f"duplicate member {_shown(decoded.duplicate)} in the JSON body: "
                                          "parsers disagree on which copy counts, so it is refused")
    if _deeper_than(body, MAX_DEPTH):
        raise McpProblem(INVALID_REQUEST, f"the JSON-RPC message nests deeper than {MAX_DEPTH} levels")


def _request_id(message: Mapping[str, Any]) -> str | int | None:
    if "id" not in message:
        return None
    request_id = message["id"]
    if request_id is None or (isinstance(request_id, str | int) and not isinstance(request_id, bool)):
        return request_id
    raise McpProblem(INVALID_REQUEST, "the JSON-RPC id must be a string or an integer")


def _params(message: Mapping[str, Any], method: str, routing: _RoutingHeaders) -> dict[str, Any]:
    params = message.get("params")
    if params is None or isinstance(params, dict):
        return params or {}
    if _is_mcp_method(method) or routing.claim_mcp:
        raise McpProblem(INVALID_PARAMS, f"params of {_shown(method)} must be an object")
    return {}   # positional params of a JSON-RPC API that is not MCP (e.g. eth_call): nothing named to read


def _read_call(
    message: Mapping[str, Any], method: str, params: Mapping[str, Any], routing: _RoutingHeaders
) -> McpRequest:
    request_id = _request_id(message)
    name_key = NAME_BEARING_METHODS.get(method)
    name: str | None = None
    if name_key is not None:
        _check_member_case(params, _NAME_PARAMS_MEMBERS, " in params")
        candidate = params.get(name_key)
        if not isinstance(candidate, str):
            raise McpProblem(INVALID_PARAMS, f"{method} needs a string params.{name_key}")
        name = candidate
    arguments = params.get("arguments") if method in _ARGUMENT_BEARING_METHODS else None
    if arguments is not None and not isinstance(arguments, dict):
        raise McpProblem(INVALID_PARAMS, f"params.arguments of {method} must be an object")
    return McpRequest(
        method=method,
        id=request_id,
        tool=name if name_key == "name" else None,
        resource=name if name_key == "uri" else None,
        arguments=arguments,
        protocol_version=routing.version or _body_protocol_version(method, params),
    )


def _meta_protocol_version(params: Mapping[str, Any]) -> Any:
    meta = params.get("_meta")
    return meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None


def _body_protocol_version(method: str, params: Mapping[str, Any]) -> str | None:
    version = _meta_protocol_version(params)
    if version is None and method == "initialize":
        version = params.get("protocolVersion")
    return version if isinstance(version, str) else None


def _check_headers(method: str, params: Mapping[str, Any], routing: _RoutingHeaders) -> None:
    """SEP-2243: the routing headers must say what the body says, or a header-routing gateway is fooled.

    Values are compared exactly (case-sensitive); a repeated header arrives joined with ", " and so differs.
    """
    if routing.method is not None and routing.method != method:
        raise McpProblem(HEADER_MISMATCH, f"Mcp-Method header {_shown(routing.method)} does not match the body's "
                                          f"method {_shown(method)}")
    if routing.name is not None:
        name_key = NAME_BEARING_METHODS.get(method)
        if name_key is None:
            raise McpProblem(HEADER_MISMATCH, f"Mcp-Name header on {_shown(method)}, a method that names nothing")
        body_name = params.get(name_key)
        if not isinstance(body_name, str):
            raise McpProblem(HEADER_MISMATCH, f"Mcp-Name header, but the body has no string params.{name_key}")
        if decode_header_value(routing.name) != body_name:
            raise McpProblem(HEADER_MISMATCH, f"Mcp-Name header does not match the body's params.{name_key}")
    envelope_version = _meta_protocol_version(params)
    if routing.version is not None and envelope_version is not None and routing.version != envelope_version:
        raise McpProblem(HEADER_MISMATCH, "MCP-Protocol-Version header does not match the request's _meta "
                                          "protocol version")


# --- refusals -------------------------------------------------------------------------------------------------


def jsonrpc_id(body: bytes) -> tuple[bool, str | int | None]:
    """For refusals: (True, id) for a single JSON-RPC request with an id, (True, None) for other JSON-RPC bodies
    (notification, batch, response, ambiguous or too deep), (False, None) for anything else. Never raises.

    Headers are not consulted: a body that is not JSON but whose headers claim MCP is the caller's case.
    """
    try:
        return _jsonrpc_id(body)
    except Exception:
        return False, None


def _jsonrpc_id(body: bytes) -> tuple[bool, str | int | None]:
    start = len(_UTF8_BOM) if body.startswith(_UTF8_BOM) else 0
    first = _FIRST_SIGNIFICANT.search(body, start)
    if not _wide_encoding(body) and (first is None or body[first.start()] not in b"{["):
        return False, None
    try:
        decoded = _decode(body)
    except _TooDeep:
        return True, None
    if decoded is None:
        return False, None
    value = decoded.value
    if isinstance(value, list):
        duplicate = decoded.duplicate is not None
        is_jsonrpc = not value or any(isinstance(e, dict) and _looks_like_message(e, duplicate) for e in value)
        return is_jsonrpc, None
    if not isinstance(value, dict) or not _looks_like_message(value, decoded.duplicate is not None):
        return False, None
    request_id = value.get("id")
    known = (
        decoded.strict and decoded.duplicate is None and isinstance(value.get("method"), str)
        and isinstance(request_id, str | int) and not isinstance(request_id, bool)
        and all(key in _ENVELOPE_MEMBERS or key.casefold() not in _ENVELOPE_MEMBERS for key in value)
    )
    return True, request_id if known else None


def jsonrpc_error_body(id: str | int | None, code: int, message: str, data: dict[str, Any]) -> bytes:
    """A compact JSON-RPC error response. `error.type` repeats `data["type"]` so LLM SDKs that read `error.type`
    see Bastion's refusal type; MCP's ErrorData ignores members it does not know."""
    error = {"code": code, "message": message, "type": data.get("type"), "data": data}
    return json.dumps({"jsonrpc": "2.0", "id": id, "error": error}, separators=(",", ":"), default=str).encode()


# --- the answer -----------------------------------------------------------------------------------------------


class McpResponseObserver:
    """Finds the response to one request in the server's answer and says how it ended. Never raises.

    Feed an SSE answer chunk by chunk with `feed` (b"" = end of stream), or a whole application/json answer with
    `feed_body`. Only a message with no "method" whose id equals `request_id` (same JSON type: 1 is not "1")
    counts; notifications and server-to-client requests before it are skipped, as are SSE events that are not
    `message` events or are larger than `max_event`. Parsing stops once the response is found.
    """

    __slots__ = ("_closed", "_done", "_error", "_outcome", "_parser", "_request_id", "max_body", "max_event")

    def __init__(self, request_id: str | int | None, max_event: int = _EVENT_CAP, max_body: int = _BODY_CAP) -> None:
        self._request_id = request_id
        self.max_event = max_event
        self.max_body = max_body
        self._parser = SseParser(max_event)
        self._outcome = "none"
        self._error: dict[str, Any] | None = None
        self._done = request_id is None or isinstance(request_id, bool)   # nothing answers a notification
        self._closed = False

    def feed(self, chunk: bytes) -> None:
        """The next piece of an SSE answer; b"" ends it."""
        if self._done or self._closed:
            return
        try:
            if chunk:
                events = self._parser.feed(chunk)
            else:
                self._closed = True
                events = self._parser.close()
            for event in events:
                if event.event == "message" and self._take_text(event.data, self.max_event):
                    return
        except Exception:
            self._done = True

    def feed_body(self, body: bytes) -> None:
        """A whole (decoded) application/json answer: one message or a batch of them."""
        if self._done:
            return
        try:
            self._take_text(body, self.max_body)
        except Exception:
            self._done = True

    def result(self) -> dict[str, Any]:
        """{"outcome": "result" | "error" | "tool_error" | "none", "error": {"code", "message"} | None}."""
        return {"outcome": self._outcome, "error": dict(self._error) if self._error else None}

    def _take_text(self, text: str | bytes, cap: int) -> bool:
        if len(text) > cap:
            return False
        if isinstance(text, bytes):
            text = text.decode(json.detect_encoding(text), "replace")
        if _ID_NAME.search(text) is None:   # notifications and progress: no "id", nothing to parse
            return False
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return False
        messages = value if isinstance(value, list) else [value]
        return any(self._take_message(message) for message in messages)

    def _take_message(self, message: Any) -> bool:
        if not isinstance(message, dict) or "method" in message or "id" not in message:
            return False
        if not self._is_ours(message["id"]):
            return False
        if "error" in message:
            self._outcome = "error"
            self._error = _error_summary(message["error"])
        elif "result" in message:
            result = message["result"]
            self._outcome = "tool_error" if isinstance(result, dict) and result.get("isError") is True else "result"
        else:
            return False
        self._done = True
        return True

    def _is_ours(self, response_id: Any) -> bool:
        return type(response_id) is type(self._request_id) and response_id == self._request_id


def _error_summary(error: Any) -> dict[str, Any]:
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    valid_code = isinstance(code, int) and not isinstance(code, bool) and code in _INT64
    return {
        "code": code if valid_code else 0,
        "message": message[:_ERROR_MESSAGE_CAP] if isinstance(message, str) else "",
    }
