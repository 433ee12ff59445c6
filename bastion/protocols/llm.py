"""LLM API awareness: which calls are model calls, and what their answers say (usage, tool calls, errors).

Agents talk to models through OpenAI-style APIs (chat completions, legacy completions, Responses, embeddings)
and Anthropic's Messages API, on any host: the vendors, gateways, Azure deployments, self-hosted servers. So
calls are recognised by shape (POST, path ending, JSON body), never by host name.

Two halves, both pure (no I/O, no mitmproxy):

- `llm_request` reads a request into an `LlmRequest`: the facts the policy matches on (model, tools offered,
  tool forced) and the request half of the audit's `extra["llm"]`. `may_be_llm` lets callers skip JSON
  parsing for every other request. Deny rules on a model or tool hold only if Bastion reads what the upstream
  will act on, so the request side reads like the most permissive upstream: path endings in any letter case
  (case-insensitive routers), the Azure deployment in the path as the model (Azure ignores the body's), every
  name a tool carries (chat servers read `function.name`, others `name`), every tool offered (up to
  MAX_TOOL_NAMES, beyond which `tools_complete` is False and rules must fail closed). `llm_body_problem` finds
  what no single reading can settle: deciding members given twice or in another letter case (Go's
  encoding/json matches member names without regard to case), which callers refuse.
- `LlmResponseObserver` reads the answer, streamed (SSE, chunk by chunk, on the proxy's event loop) or
  buffered (a JSON body), into the response half: models, token usage, tool calls with their arguments,
  finish reasons, time to first token, errors. Streams are the hot path: events that cannot change the facts
  (plain text deltas once the first token is known) are held and recognised a run at a time by byte tests
  (`bastion.protocols.quiet`), never parsed.

Everything read from the wire is hostile: strings, lists and counts are capped, wrong types give None, and
nothing here raises on malformed input.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from bastion.protocols.quiet import (
    ESCAPED_ASCII,
    HOLD_CHUNK_BYTES,
    HOLD_CHUNKS,
    ChunkTemplate,
    anthropic_run_quiet,
    bytes_show_every_name,
    chat_run_quiet,
)
from bastion.protocols.sse import SseEvent, SseParser

LLM_PATH_ENDS = frozenset({"completions", "responses", "embeddings", "messages"})
"""Last path segments of every generation or embedding endpoint we understand."""

MAX_TEXT = 200            # models, ids, tool names, finish reasons, error types
MAX_TOOLS = 64            # tool names of a request kept in the audit
MAX_TOOL_NAMES = 4096     # tool names of a request the rules see; a request offering more fails closed
MAX_TOOL_CALLS = 64       # tool calls kept from an answer
MAX_ARGUMENTS = 4096      # characters of arguments kept per tool call
MAX_FINISH_REASONS = 16
MAX_ERROR_MESSAGE = 500
MAX_ITEMS = 256           # list entries looked at in one document (choices, output items, tools...)
BIG_BODY = 1 << 20        # JSON answers larger than this are not parsed whole
BODY_EDGE = 64 << 10      # how much of a big body's head and tail is searched for usage and model

_MALFORMED = (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError)

# A chat/completions chunk needs parsing only if one of these keys carries a value (not null / []).
# Possessive quantifiers (Python 3.11+) keep every search linear: nothing is retried after a mismatch.
_CHAT_FACTS = re.compile(r'"(?:usage|finish_reason|tool_calls|function_call|error)"\s*+:\s*+(?!null|\[\s*\])')
# Whole chunks of a stream that cannot change the facts once the first token is known, by API (see
# `LlmResponseObserver._quiet`): what a chunk must hold to be parsed. A false alarm only costs a parse.
_CHAT_CHUNK_FACTS = re.compile(
    rb'"(?:usage|finish_reason|tool_calls|function_call|error)"\s*+:\s*+(?!null|\[\s*\])|\[DONE\]|event:')
_ANTHROPIC_CHUNK_FACTS = re.compile(rb"message_|content_block_st|input_json_delta|error")
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
# Chunks of Responses text deltas only: each event exactly its `event:` line and one `data:` line (a comment or a
# bare `event` line could otherwise rename an event that a count of `event:` lines took for a delta).
_RESPONSES_TEXT_DELTAS = re.compile(rb"(?:event: response\.output_text\.delta\ndata:[^\r\n]*+\n\n)++")
_ESCAPED_LETTER = re.compile(r"\\u00[4-7]")   # in decoded event data: see `quiet.ESCAPED_ASCII`
_BIG_USAGE = re.compile(rb'"usage"\s*+:\s*+(\{(?:[^{}]++|\{[^{}]*+\})*+\})')   # one level of nested details
_BIG_MODEL = re.compile(rb'"model"\s*+:\s*+("(?:[^"\\]|\\.){0,800}+")')

_RESPONSES_PARSED = frozenset({
    "response.created", "response.in_progress", "response.queued",
    "response.output_item.added", "response.output_item.done", "response.function_call_arguments.delta",
    "response.completed", "response.incomplete", "response.failed", "error",
})
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSES_TOKENS = frozenset({
    "response.output_text.delta", "response.refusal.delta", "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta", "response.function_call_arguments.delta",
    "response.custom_tool_call_input.delta",
})
_RESPONSES_CALL_ITEMS = {"function_call": "arguments", "custom_tool_call": "input", "mcp_call": "arguments"}
_CHAT_TOKEN_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


# ---------------------------------------------------------------------------------------------------------------
# Small typed readers: every value from the wire goes through one of these.

def _dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _list(value: Any) -> Iterable[Any]:
    return islice(value, MAX_ITEMS) if isinstance(value, list) else ()


def _text(value: Any, cap: int = MAX_TEXT) -> str | None:
    """A non-empty string, capped; anything else is None."""
    return value[:cap] if isinstance(value, str) and value else None


def _count(value: Any) -> int | None:
    """A token count: a non-negative integer (not a bool); anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value < 1 << 62 else None


def _index(value: Any, fallback: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else fallback


def _has_text(doc: dict[str, Any], fields: tuple[str, ...]) -> bool:
    """Whether one of these fields holds a non-empty string (a token arrived)."""
    return any(isinstance(value := doc.get(field), str) and value for field in fields)


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Request side

@dataclass(frozen=True, slots=True)
class LlmRequest:
    """What a model call asks for. `model` is the Azure deployment when the path names one (Azure routes on it
    and ignores the body's), else the body's model; `body_model` is the body's own, kept for the audit.

    `tools` holds every name the offered tools carry, uncut, for the rules; `tools_complete` is False when the
    request offers more than MAX_TOOL_NAMES of them: rules then cannot see them all and must fail closed."""

    provider: str                  # "openai" | "anthropic" (API style, not vendor)
    api: str                       # "chat.completions" | "completions" | "responses" | "embeddings" | "messages"
    operation: str                 # OpenTelemetry gen_ai.operation.name: "chat" | "text_completion" | "embeddings"
    model: str | None
    stream: bool
    tools: tuple[str, ...] = ()
    tool_choice: str | None = None  # the tool the request forces, if it forces one
    tools_complete: bool = True
    body_model: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The request half of the audit's `extra["llm"]` (tool names capped: MAX_TOOLS of MAX_TEXT chars)."""
        facts: dict[str, Any] = {
            "provider": self.provider, "api": self.api, "operation": self.operation,
            "request_model": self.model, "stream": self.stream, "tools": self.audited_tools(),
        }
        if self.body_model is not None and self.body_model != self.model:
            facts["body_model"] = self.body_model
        return facts

    def audited_tools(self) -> list[str]:
        return [name[:MAX_TEXT] for name in self.tools[:MAX_TOOLS]]


_ASCII_CASE_PARTNERS = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})
_LONGEST_FOLDABLE = 64   # no segment longer than this folds to a path end or "deployments" (NFKC never shrinks
                         # a character to nothing; it only composes)


def _caseless(segment: str) -> str:
    """A path segment as a case-insensitive router may read it: ASCII lower-case, or for other text the NFKC case
    fold with the dotless i, long s and Kelvin sign taken as their ASCII letters (like the policy's `fold_case`,
    which this module cannot import: the policy imports it)."""
    if segment.isascii():
        return segment.lower()
    if len(segment) > _LONGEST_FOLDABLE:
        return segment
    nfkc = unicodedata.normalize("NFKC", segment).translate(_ASCII_CASE_PARTNERS)
    return unicodedata.normalize("NFKC", nfkc.casefold())


def _trimmed(segments: tuple[str, ...]) -> tuple[str, ...]:
    end = len(segments)
    while end and not segments[end - 1]:
        end -= 1
    return segments[:end]


def may_be_llm(method: str, segments: tuple[str, ...]) -> bool:
    """Cheap pre-check: could this request be a model call? False means no need to parse its body. The path's
    end is compared without regard to case: an upstream that routes case-insensitively serves /V1/Messages."""
    if method.upper() != "POST":
        return False
    path = _trimmed(segments)
    return bool(path) and _caseless(path[-1]) in LLM_PATH_ENDS


def _api_of(path: tuple[str, ...], doc: dict[str, Any]) -> tuple[str, str, str] | None:
    """(provider, api, operation) from the path ending (any case) and body shape, or None."""
    last = _caseless(path[-1])
    if last == "completions":
        if len(path) >= 2 and _caseless(path[-2]) == "chat":
            return "openai", "chat.completions", "chat"
        return ("openai", "completions", "text_completion") if "prompt" in doc else None
    if last == "responses":
        return "openai", "responses", "chat"
    if last == "embeddings":
        return "openai", "embeddings", "embeddings"
    if last == "messages" and isinstance(doc.get("messages"), list):
        return "anthropic", "messages", "chat"
    return None


def _azure_deployment(path: tuple[str, ...], api: str) -> str | None:
    """The deployment an Azure OpenAI path names: `.../deployments/{deployment}/chat/completions` (the segment
    just before the API's own), else the segment after the first `deployments` (any case)."""
    tail = 2 if api == "chat.completions" else 1
    if len(path) >= tail + 2 and _caseless(path[-tail - 2]) == "deployments":
        return _text(path[-tail - 1])
    for position, segment in enumerate(path[:-1]):
        if _caseless(segment) == "deployments":
            return _text(path[position + 1])
    return None


def _name(value: Any) -> str | None:
    """A non-empty string, uncut: what rules compare must be what the upstream reads."""
    return value if isinstance(value, str) and value else None


def _tool_names_of(tool: Any) -> list[str]:
    """Every name one tool carries, so that a rule on any of them matches whichever one the server reads: `name`
    (Responses, Anthropic, legacy `functions`), `function.name` / `custom.name` (chat completions), and the
    type of a built-in tool (`web_search`, Anthropic's `bash_20250124`...)."""
    tool = _dict(tool)
    if tool is None:
        return []
    found = [_name(tool.get("name"))]
    for key in ("function", "custom"):
        inner = _dict(tool.get(key))
        if inner is not None:
            found.append(_name(inner.get("name")))
    kind = tool.get("type")
    if kind not in ("function", "custom"):
        found.append(_name(kind))
    return list(dict.fromkeys(name for name in found if name is not None))


def _tool_names(doc: dict[str, Any]) -> tuple[tuple[str, ...], bool]:
    """The names of all tools offered, and whether that is all of them (no more than MAX_TOOL_NAMES)."""
    names: list[str] = []
    for key in ("tools", "functions"):   # `functions`: chat's deprecated form
        tools = doc.get(key)
        if not isinstance(tools, list):
            continue
        if len(tools) > MAX_TOOL_NAMES:
            return tuple(names), False
        for tool in tools:
            names.extend(_tool_names_of(tool))
            if len(names) > MAX_TOOL_NAMES:
                return tuple(names[:MAX_TOOL_NAMES]), False
    return tuple(names), True


def _forced_tool(doc: dict[str, Any]) -> str | None:
    choice = _dict(doc.get("tool_choice"))
    if choice is not None:
        kind = choice.get("type")
        if kind in ("function", "custom"):
            inner = _dict(choice.get(kind)) or choice
            return _name(inner.get("name"))
        return _name(choice.get("name")) if kind == "tool" else None
    legacy = _dict(doc.get("function_call"))
    return _name(legacy.get("name")) if legacy is not None else None


def llm_request(method: str, segments: tuple[str, ...], headers: Mapping[str, str], doc: Any) -> LlmRequest | None:
    """The model call this request makes, or None if it is not one. `headers` is accepted for callers'
    symmetry and future shapes; detection today needs only the method, path and body. Callers that act on the
    result should also ask `llm_body_problem` about the raw body, and refuse when `tools_complete` is False."""
    del headers
    if not may_be_llm(method, segments) or not isinstance(doc, dict):
        return None
    path = _trimmed(segments)
    kind = _api_of(path, doc)
    if kind is None:
        return None
    provider, api, operation = kind
    body_model = _text(doc.get("model"))
    tools, tools_complete = _tool_names(doc)
    return LlmRequest(
        provider=provider, api=api, operation=operation,
        model=_azure_deployment(path, api) or body_model,
        stream=doc.get("stream") is True,
        tools=tools,
        tool_choice=_forced_tool(doc),
        tools_complete=tools_complete,
        body_model=body_model,
    )


# ---------------------------------------------------------------------------------------------------------------
# The raw body: members that parsers read differently

_DECIDING_MEMBERS = frozenset({
    "model", "tools", "tool_choice", "stream", "functions", "function_call", "messages", "input", "prompt",
})
_TOOL_MEMBERS = ("tools", "functions", "tool_choice", "function_call")   # whose values name tools
_NAME_MEMBERS = frozenset({"name", "function", "type", "custom"})        # members of a tool that name it

# Go's encoding/json matches a member to a field ignoring case by Unicode simple case folding; for the ASCII
# names above that folds A-Z, the long s (U+017F, as s) and the Kelvin sign (U+212A, as k), nothing else.
_GO_FOLD = str.maketrans({**{chr(code): chr(code + 32) for code in range(ord("A"), ord("Z") + 1)},
                          "\u017f": "s", "\u212a": "k"})

_LONGEST_MEMBER = max(map(len, _DECIDING_MEMBERS | _NAME_MEMBERS))

# Deciding members spelled plainly, anywhere in the raw body (one regex pass; where each one's value starts).
_PLAIN_MEMBER = re.compile(rb'"(' + "|".join(sorted(_DECIDING_MEMBERS)).encode() + rb')"\s*+:')
# A string that starts like one of these names spelled with a \u escape of a lower-case letter or "_" (all in
# \u0050..\u007f): such a spelling decodes to the very same name, invisible in the parsed document. Serializers
# never escape ASCII letters, so a hit is practically only ever hostile; it sends the body to the exact check.
_ESCAPED_NAME = re.compile(rb'"[a-z_]{0,%d}+\\u00[5-7]' % (_LONGEST_MEMBER - 1))
_JSON_SPACE = re.compile(r"[ \t\r\n]*+")
_NON_ASCII_FOLDS = ("\u017f".encode(), "\u212a".encode())   # the long s and Kelvin sign in UTF-8


class _Members(list):  # type: ignore[type-arg]
    """A JSON object read as its (name, value) pairs in order, duplicates kept."""

    __slots__ = ()


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_Members)


def _members_of(value: Any) -> _Members | None:
    return value if isinstance(value, _Members) else None


def _array(value: Any) -> list[Any] | None:
    return value if isinstance(value, list) and not isinstance(value, _Members) else None


def _members_problem(members: Iterable[tuple[str, Any]], names: frozenset[str], where: str) -> str | None:
    """A member of `names` given twice, or spelled in another case (which Go reads as that member)."""
    seen: set[str] = set()
    for key, _value in members:
        if key in names:
            if key in seen:
                return (f"member {key!r}{where} is given more than once: some parsers keep the first, others the "
                        "last")
            seen.add(key)
        elif len(key) <= _LONGEST_MEMBER and (folded := _go_folded(key)) in names:
            return (f"member {key!a}{where} is {folded!r} in another letter case: Go servers read it as "
                    f"{folded!r} and others ignore it")
    return None


def _go_folded(key: str) -> str:
    return key.lower() if key.isascii() else key.translate(_GO_FOLD)


def _tool_object_problem(tool: Any, where: str) -> str | None:
    members = _members_of(tool)
    if members is None:
        return None
    problem = _members_problem(members, _NAME_MEMBERS, where)
    for key, inner in members:
        if problem is not None:
            break
        if key in ("function", "custom") and (inner_members := _members_of(inner)) is not None:
            problem = _members_problem(inner_members, _NAME_MEMBERS, f"{where}.{key}")
    return problem


def _tool_member_problem(key: str, value: Any) -> str | None:
    """Names given twice or in another case inside the tools offered or the tool forced (`key` is one of
    _TOOL_MEMBERS, `value` its value with objects read as _Members)."""
    tools = _array(value)
    if tools is None:
        return _tool_object_problem(value, f" of {key}")
    for position, tool in enumerate(islice(tools, MAX_TOOL_NAMES)):
        if (problem := _tool_object_problem(tool, f" of {key}[{position}]")) is not None:
            return problem
    return None


def _exact_body_problem(body: bytes) -> str | None:
    """Every member that matters, read from the body with its duplicates: the slow and sure way."""
    try:
        top = json.loads(body, object_pairs_hook=_Members)
    except (ValueError, RecursionError):
        return "the body is not JSON that can be checked for ambiguous members"
    if not isinstance(top, _Members):
        return None
    problem = _members_problem(top, _DECIDING_MEMBERS, " at the top level")
    for key, value in top:
        if problem is not None:
            break
        if key in _TOOL_MEMBERS:
            problem = _tool_member_problem(key, value)
    return problem


def _value_at(body: bytes, offset: int) -> Any:
    """The JSON value starting at `offset` (after blanks), objects as _Members. Decoded as Latin-1, a cheap and
    byte-for-byte decoding: names equal in UTF-8 are equal in Latin-1, and ASCII names read the same. Only the
    non-ASCII letters Go folds into ASCII ones would read differently: ValueError when the rest has any."""
    if any(body.find(letter, offset) >= 0 for letter in _NON_ASCII_FOLDS):
        raise ValueError("a long s or Kelvin sign: read it as UTF-8")
    text = str(memoryview(body)[offset:], "latin-1")
    space = _JSON_SPACE.match(text)
    return _PAIRS_DECODER.raw_decode(text, space.end() if space else 0)[0]


def llm_body_problem(body: bytes, doc: Any = None) -> str | None:
    """Why this model call's raw body cannot be read unambiguously, or None when it can.

    A rule on the model or a tool holds only if the upstream reads the same member Bastion reads. Parsers
    disagree on a member given twice (most keep the last, some the first), and Go's encoding/json (Ollama, many
    gateways) reads `"Model"`, or `"stream"` spelled with a long s (U+017F), as `model` / `stream`. So this
    reports the deciding members of the top-level object (_DECIDING_MEMBERS) given twice or in another letter
    case, and the same for the members that name a tool (_NAME_MEMBERS) inside `tools`, `functions`,
    `tool_choice` and `function_call`.

    `doc` is the body as `json.loads` read it. With it, the top-level case variants show in `doc` itself; two
    regex passes over the raw body find every plain spelling of a deciding member and any member name with an
    escaped letter; and only the value of `tools` (and the other _TOOL_MEMBERS) is parsed again, keeping
    duplicates. Bodies that give a hint of a problem (a deciding member spelled plainly more than once anywhere,
    an escaped letter in a member name, a non-UTF-8 encoding) get the exact check: a full parse keeping
    duplicates. Without `doc`, the exact check runs at once. Never raises on malformed input."""
    if not isinstance(doc, dict):
        return None if doc is not None else _exact_body_problem(body)
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return _exact_body_problem(body)
    problem = _members_problem(doc.items(), _DECIDING_MEMBERS, " at the top level")
    if problem is not None:
        return problem
    if b"\\u00" in body and _ESCAPED_NAME.search(body) is not None:
        return _exact_body_problem(body)
    plain: dict[str, list[int]] = {}
    for member in _PLAIN_MEMBER.finditer(body):
        plain.setdefault(member.group(1).decode(), []).append(member.end())
    if any(len(plain.get(key, ())) > 1 for key in doc.keys() & _DECIDING_MEMBERS):
        return _exact_body_problem(body)
    for key in _TOOL_MEMBERS:
        if not isinstance(doc.get(key), (dict, list)):
            continue
        # The one plain spelling is the top-level member (no escaped one exists): read its value with duplicates.
        try:
            problem = _tool_member_problem(key, _value_at(body, plain[key][0]))
        except (KeyError, ValueError, RecursionError):
            return _exact_body_problem(body)
        if problem is not None:
            return problem
    return None


# ---------------------------------------------------------------------------------------------------------------
# Response side

class _ToolCall:
    """One tool call the model made; arguments are kept up to MAX_ARGUMENTS characters, their length counted."""

    __slots__ = ("_kept", "_parts", "id", "length", "name")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name = ""
        self._parts: list[str] = []
        self._kept = 0
        self.length = 0

    def name_it(self, call_id: Any, name: Any) -> None:
        if self.id is None:
            self.id = _text(call_id)
        if not self.name:
            self.name = _text(name) or ""

    def add(self, fragment: Any) -> None:
        if not isinstance(fragment, str) or not fragment:
            return
        self.length += len(fragment)
        room = MAX_ARGUMENTS - self._kept
        if room > 0:
            kept = fragment[:room]
            self._parts.append(kept)
            self._kept += len(kept)

    def replace(self, arguments: Any) -> None:
        """The whole arguments at once (a final event or a buffered answer), replacing the fragments."""
        if isinstance(arguments, str):
            self._parts, self._kept, self.length = [], 0, 0
            self.add(arguments)

    def to_json(self) -> dict[str, Any]:
        call: dict[str, Any] = {"id": self.id, "name": self.name, "arguments": "".join(self._parts)}
        if self.length > MAX_ARGUMENTS:
            call["cut"] = True
        return call


_Reading = tuple[str, Callable[[bytes], bool] | None, tuple[bytes, ...], bool]
_STREAM_READING: dict[str, _Reading] = {   # see `LlmResponseObserver.__init__`
    "chat.completions": ("_chat_event", chat_run_quiet, (b"content", b"obfuscation"), True),
    "completions": ("_chat_event", chat_run_quiet, (b"text", b"obfuscation"), True),
    "messages": ("_anthropic_event", anthropic_run_quiet, (b"text",), False),
    "responses": ("_responses_event", None, (), False),
}
_OTHER_READING: _Reading = ("_other_event", None, (), False)


class LlmResponseObserver:
    """Reads one model answer into the facts of `extra["llm"]`.

    Streams: `feed(chunk)` for every chunk of a text/event-stream body, `feed(b"")` at its end. Buffered
    answers: `feed_body(body)` once, with the body already decoded from its Content-Encoding. Then `result()`.
    Never raises on malformed input; events it could not read are counted in `malformed_events`.
    """

    def __init__(self, request: LlmRequest, *, streamed: bool, clock: Callable[[], float] = time.time) -> None:
        self.request = request
        self.streamed = streamed
        self.first_token_at: float | None = None
        self.response_model: str | None = None
        self.response_id: str | None = None
        self.malformed_events = 0
        self._clock = clock
        self._parser = SseParser()
        self._ended = False
        self._complete = False
        self._finish_reasons: list[str] = []
        self._tool_calls: dict[Any, _ToolCall] = {}
        self._usage: dict[str, int] = {}
        self._usage_reported = False
        self._error: dict[str, str] | None = None
        # Per API: the event reader, the test for a run of held chunks and the members that vary between
        # content deltas, for a template (see `feed`), and whether events of one `data:` line go straight to
        # the data reader.
        reader, run_quiet, self._varying, lone = _STREAM_READING.get(request.api, _OTHER_READING)
        self._on_event: Callable[[SseEvent], None] = getattr(self, reader)
        self._run_quiet: Callable[[bytes], bool] | None = run_quiet
        self._on_data: Callable[[str, bool], None] | None = self._chat_data if lone else None
        self._template: ChunkTemplate | None = None
        self._head = b""           # held chunks start with this: the template's head (every chunk does b"")
        self._misses = 0           # quiet chunks in a row that did not start with it
        self._held: list[bytes] = []
        self._holding = False      # the next small chunk of whole events may be held
        self.failure: Exception | None = None

    # -- feeding -------------------------------------------------------------------------------------------------

    def __call__(self, chunk: bytes) -> bytes:
        """The observer as a `flow.response.stream` function: reads `chunk` (see `feed`) and passes it on
        unchanged. A chunk to hold is held right here, the cheapest path a chunk can take. If reading ever
        fails, the rest passes on unread and `failure` says why: the answer is never held up by its facts."""
        try:
            if self._holding and len(chunk) <= HOLD_CHUNK_BYTES and chunk.endswith(_EVENT_ENDS) \
                    and chunk.startswith(self._head):
                held = self._held
                held.append(chunk)
                if len(held) >= HOLD_CHUNKS:
                    self._settle()
            else:
                self.feed(chunk)
        except Exception as e:   # a bug here must not break the agent's stream
            self.failure = e
            self._ended, self._holding, self._held = True, False, []
        return chunk

    def feed(self, chunk: bytes) -> None:
        """One chunk of a streamed answer; `b""` is the end of the body.

        Once the first token is known, small chunks of whole events are held (references to bytes already
        passed on, not copies) and looked at HOLD_CHUNKS at a time (`bastion.protocols.quiet`): one test over
        the run says whether any of them can change the facts, and most runs of a long answer are only
        content deltas. Only when the run may hold facts are its chunks tested one by one, and those that may
        are parsed, in their order. Held chunks are settled before any other chunk is parsed, at the end of
        the body and in `result()`, so the facts are the same as if every chunk had been parsed.
        """
        if self._ended:
            return
        if chunk:
            holdable = self._holding and len(chunk) <= HOLD_CHUNK_BYTES and chunk.endswith(_EVENT_ENDS)
            if holdable and chunk.startswith(self._head):
                held = self._held
                held.append(chunk)
                if len(held) >= HOLD_CHUNKS:
                    self._settle()
                return
            self._settle()
            if self.first_token_at is not None and self._quiet(chunk):
                if holdable:   # quiet, but not the template's shape: a ping, or deltas that vary in more ways
                    self._misses += 1
                    if self._misses >= 2:   # in a row: the template does not describe this stream
                        self._template, self._head = None, b""
                return
            before = self.first_token_at
            events = self._parse(chunk)
            if before is None and self.first_token_at is not None and self._run_quiet is not None \
                    and events == 1 and self._quiet(chunk):
                self._template = ChunkTemplate.learn(chunk, self._varying)
                self._head = self._template.head if self._template is not None else b""
            # While chunks are held the parser is fed nothing, so it stays idle until they are settled.
            self._holding = self.first_token_at is not None and self._run_quiet is not None and self._parser.idle
        else:
            self._settle()
            self._ended, self._holding = True, False
            self._take_events(self._parser.close())

    def _parse(self, chunk: bytes) -> int:
        """Read every event of `chunk`; returns how many there were. One `data:` line takes the short way."""
        on_data = self._on_data
        lone = self._parser.lone_data(chunk) if on_data is not None else None
        if on_data is None or lone is None:
            events = self._parser.feed(chunk)
            self._take_events(events)
            return len(events)
        try:
            on_data(lone, False)
        except _MALFORMED:
            self.malformed_events += 1
        return 1

    def _take_events(self, events: list[SseEvent]) -> None:
        for event in events:
            try:
                self._on_event(event)
            except _MALFORMED:
                self.malformed_events += 1

    def _settle(self) -> None:
        """Look at the held chunks: nothing to do when the run is quiet as a whole, else each chunk is tested
        and those that may carry facts are parsed (the parser is idle between them: each is whole events)."""
        held = self._held
        if not held:
            return
        self._held, self._misses = [], 0
        run = held[0] if len(held) == 1 else b"".join(held)
        template = self._template
        if template is not None and template.fits_all(held, run):
            return
        assert self._run_quiet is not None
        if self._run_quiet(run):
            return   # (the template stays: one delta with a quote in its text does not fit, the next ones may)
        for chunk in held:
            if (template is not None and template.fits(chunk)) or self._quiet(chunk):
                continue
            self._parse(chunk)

    def _quiet(self, chunk: bytes) -> bool:
        """Is `chunk` whole events (the parser holds nothing, the chunk ends with a blank line) that cannot change
        the facts: content deltas once the model and the first token are known? Most chunks of a long answer
        are; they are then not parsed at all (a few regex searches in C instead of decoding, splitting and
        dispatching events), which keeps reading an answer cheap beside forwarding it."""
        if not (chunk.endswith(_EVENT_ENDS) and self._parser.idle):
            return False
        api = self.request.api
        if api in ("chat.completions", "completions"):
            return _CHAT_CHUNK_FACTS.search(chunk) is None and bytes_show_every_name(chunk)
        if api == "messages":
            return _ANTHROPIC_CHUNK_FACTS.search(chunk) is None and ESCAPED_ASCII.search(chunk) is None
        if api == "responses":
            return _RESPONSES_TEXT_DELTAS.fullmatch(chunk) is not None
        return False

    def feed_body(self, body: bytes) -> None:
        """A whole buffered JSON answer. Bodies over BIG_BODY are searched at both ends, not parsed whole."""
        try:
            if len(body) > BIG_BODY:
                self._take_big_body(body)
                return
            doc = _loads(body)
            if not isinstance(doc, dict):
                if body.strip():
                    self.malformed_events += 1
                return
            self._complete = True
            self._take_error(doc)
            self._take_body(doc)
        except _MALFORMED:
            self.malformed_events += 1

    def _take_body(self, doc: dict[str, Any]) -> None:
        api = self.request.api
        if api in ("chat.completions", "completions"):
            self._take_chat_doc(doc)
        elif api == "responses":
            self._take_response(doc, with_calls=True)
        elif api == "messages":
            self._take_anthropic_message(doc)
        else:
            self._take_identity(doc)
            self._take_openai_usage(doc.get("usage"))

    def _take_big_body(self, body: bytes) -> None:
        head, tail = body[:BODY_EDGE], body[-BODY_EDGE:]
        usage = _last_match(_BIG_USAGE, tail) or _first_match(_BIG_USAGE, head)
        if usage is not None:
            self._take_usage(_loads(usage))
        model = _last_match(_BIG_MODEL, tail) or _first_match(_BIG_MODEL, head)
        if model is not None and self.response_model is None:
            self.response_model = _text(_loads(model))
        self._complete = body.lstrip()[:1] == b"{" and body.rstrip()[-1:] == b"}"

    # -- facts shared by all formats ---------------------------------------------------------------------------

    def _first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = self._clock()

    def _take_identity(self, doc: dict[str, Any]) -> None:
        if self.response_model is None:
            self.response_model = _text(doc.get("model"))
        if self.response_id is None:
            self.response_id = _text(doc.get("id"))

    def _finish(self, reason: Any) -> None:
        reason = _text(reason)
        if reason is not None and len(self._finish_reasons) < MAX_FINISH_REASONS:
            self._finish_reasons.append(reason)

    def _call(self, key: Any) -> _ToolCall | None:
        """The tool call under this key, created if there is room."""
        call = self._tool_calls.get(key)
        if call is None and len(self._tool_calls) < MAX_TOOL_CALLS:
            call = self._tool_calls[key] = _ToolCall()
        return call

    def _take_error(self, doc: dict[str, Any]) -> None:
        """OpenAI `{"error": {...}}`, Anthropic `{"type": "error", "error": {...}}`, Responses' error event
        `{"type": "error", "code", "message"}`, or a gateway's `{"error": "text"}`."""
        error = doc.get("error")
        if isinstance(error, str):
            error = {"message": error}
        elif not isinstance(error, dict):
            if doc.get("type") != "error":
                return
            error = doc
        kind = error.get("type")
        if not isinstance(kind, str) or kind == "error":
            kind = error.get("code", kind)
        message = error.get("message")
        self._error = {
            "type": _text(str(kind) if isinstance(kind, (str, int)) and not isinstance(kind, bool) else "") or "error",
            "message": message[:MAX_ERROR_MESSAGE] if isinstance(message, str) else "",
        }

    def _take_usage(self, usage: Any) -> None:
        if self.request.provider == "anthropic":
            self._take_anthropic_usage(usage)
        else:
            self._take_openai_usage(usage)

    def _set_counts(self, pairs: Iterable[tuple[str, Any]]) -> None:
        for kind, value in pairs:
            if (count := _count(value)) is not None:
                self._usage[kind] = count
                self._usage_reported = True

    def _take_openai_usage(self, usage: Any) -> None:
        """Chat/completions/embeddings (`prompt_tokens`...) and Responses (`input_tokens`...) usage."""
        usage = _dict(usage)
        if usage is None:
            return
        inputs = _dict(usage.get("prompt_tokens_details")) or _dict(usage.get("input_tokens_details")) or {}
        outputs = _dict(usage.get("completion_tokens_details")) or _dict(usage.get("output_tokens_details")) or {}
        self._set_counts((
            ("input", usage.get("prompt_tokens", usage.get("input_tokens"))),
            ("output", usage.get("completion_tokens", usage.get("output_tokens"))),
            ("cache_read", inputs.get("cached_tokens")),
            ("reasoning", outputs.get("reasoning_tokens")),
        ))

    def _take_anthropic_usage(self, usage: Any) -> None:
        """Anthropic usage; `input` here excludes cache reads and writes (added back in `result`)."""
        usage = _dict(usage)
        if usage is None:
            return
        details = _dict(usage.get("output_tokens_details")) or {}
        self._set_counts((
            ("input", usage.get("input_tokens")),
            ("output", usage.get("output_tokens")),
            ("cache_read", usage.get("cache_read_input_tokens")),
            ("cache_creation", usage.get("cache_creation_input_tokens")),
            ("reasoning", details.get("thinking_tokens")),
        ))

    # -- OpenAI chat completions and legacy completions ----------------------------------------------------------

    def _chat_event(self, event: SseEvent) -> None:
        self._chat_data(event.data, event.event == "error")

    def _chat_data(self, data: str, named_error: bool) -> None:
        """One chat event's data (`named_error`: the stream named the event `error`)."""
        if len(data) < 16 and data.strip() == "[DONE]":
            self._complete = True
            return
        if self.first_token_at is not None and not named_error and not _CHAT_FACTS.search(data) \
                and not _ESCAPED_LETTER.search(data):
            return   # a content delta: every chunk repeats the model and id, both read from the first ones
        doc = _dict(_loads(data))
        if doc is None:
            self.malformed_events += 1
            return
        if doc.get("error") is not None or doc.get("type") == "error":
            self._take_error(doc)
        self._take_chat_chunk(doc)

    def _take_chat_doc(self, doc: dict[str, Any]) -> None:
        """A whole (buffered) chat or completions answer."""
        self._take_identity(doc)
        self._take_openai_usage(doc.get("usage"))
        for position, choice in enumerate(_list(doc.get("choices"))):
            choice = _dict(choice)
            if choice is None:
                continue
            self._take_chat_message(_index(choice.get("index"), position), _dict(choice.get("message")) or {})
            self._finish(choice.get("finish_reason"))

    def _take_chat_chunk(self, doc: dict[str, Any]) -> None:
        """One streamed chat or completions chunk. The few chunks of an answer that are parsed (its first
        ones, tool calls, the finish and the usage) each come here, so the usual case (one choice with a
        text delta, nulls elsewhere) takes as few calls as it can."""
        if self.response_model is None or self.response_id is None:
            self._take_identity(doc)
        usage = doc.get("usage")
        if usage is not None:
            self._take_openai_usage(usage)
        choices = doc.get("choices")
        if not isinstance(choices, list):
            return
        for position, choice in enumerate(islice(choices, MAX_ITEMS)):
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            calls = delta.get("tool_calls")
            legacy = delta.get("function_call")
            if self.first_token_at is None and (
                    (isinstance(calls, list) and calls) or isinstance(legacy, dict) or _has_text(choice, ("text",))
                    or _has_text(delta, _CHAT_TOKEN_FIELDS)):
                self._first_token()
            if calls or legacy:
                self._take_call_fragments(_index(choice.get("index"), position), calls, _dict(legacy))
            reason = choice.get("finish_reason")
            if reason is not None:
                self._finish(reason)

    def _take_call_fragments(self, choice_index: int, calls: Any, legacy: dict[str, Any] | None) -> None:
        """Tool call fragments of a streamed chat delta (and the legacy `function_call`)."""
        for position, fragment in enumerate(_list(calls)):
            fragment = _dict(fragment)
            if fragment is None:
                continue
            call = self._call((choice_index, _index(fragment.get("index"), position)))
            if call is not None:
                function = _dict(fragment.get("function")) or {}
                call.name_it(fragment.get("id"), function.get("name"))
                call.add(function.get("arguments"))
        if legacy is not None and (call := self._call((choice_index, "function_call"))) is not None:
            call.name_it(None, legacy.get("name"))
            call.add(legacy.get("arguments"))

    def _take_chat_message(self, choice_index: int, message: dict[str, Any]) -> None:
        for position, tool_call in enumerate(_list(message.get("tool_calls"))):
            tool_call = _dict(tool_call)
            if tool_call is None or (call := self._call((choice_index, position))) is None:
                continue
            function = _dict(tool_call.get("function")) or _dict(tool_call.get("custom")) or {}
            call.name_it(tool_call.get("id"), function.get("name"))
            call.replace(function.get("arguments", function.get("input")))
        legacy = _dict(message.get("function_call"))
        if legacy is not None and (call := self._call((choice_index, "function_call"))) is not None:
            call.name_it(None, legacy.get("name"))
            call.replace(legacy.get("arguments"))

    # -- OpenAI Responses ----------------------------------------------------------------------------------------

    def _responses_event(self, event: SseEvent) -> None:
        name = event.event
        if name != "message" and name not in _RESPONSES_PARSED:
            if name in _RESPONSES_TOKENS:
                self._first_token()
            return   # text deltas, content parts, annotations...: nothing we record
        doc = _dict(_loads(event.data))
        if doc is None:
            self.malformed_events += 1
            return
        kind = doc.get("type") if isinstance(doc.get("type"), str) else name
        if kind in _RESPONSES_TOKENS:
            self._first_token()
        if kind == "error":
            self._take_error(doc)
        elif kind == "response.output_item.added" or kind == "response.output_item.done":
            self._take_response_item(doc, done=kind.endswith("done"))
        elif kind == "response.function_call_arguments.delta":
            call = self._tool_calls.get(_item_key(doc))
            if call is not None:
                call.add(doc.get("delta"))
        elif (response := _dict(doc.get("response"))) is not None:
            terminal = kind in _RESPONSES_TERMINAL
            self._take_response(response, with_calls=terminal and not self._tool_calls)
            self._complete = self._complete or terminal

    def _take_response_item(self, doc: dict[str, Any], *, done: bool) -> None:
        item = _dict(doc.get("item")) or {}
        field = _RESPONSES_CALL_ITEMS.get(item.get("type"))
        if field is None:
            return
        call = self._call(_item_key(doc, item))
        if call is None:
            return
        self._first_token()
        call.name_it(item.get("call_id") or item.get("id"), item.get("name"))
        if done:
            call.replace(item.get(field))

    def _take_response(self, response: dict[str, Any], *, with_calls: bool) -> None:
        """A Responses object: a buffered answer, or the one carried by lifecycle events."""
        self._take_identity(response)
        self._take_openai_usage(response.get("usage"))
        if _dict(response.get("error")) is not None:
            self._take_error(response)
        status = response.get("status")
        if status in ("completed", "incomplete", "failed", "cancelled"):
            details = _dict(response.get("incomplete_details")) or {}
            self._finish(details.get("reason") or status)
        if not with_calls:
            return
        for position, item in enumerate(_list(response.get("output"))):
            item = _dict(item)
            field = _RESPONSES_CALL_ITEMS.get(item.get("type")) if item is not None else None
            if field is not None and item is not None and (call := self._call(position)) is not None:
                call.name_it(item.get("call_id") or item.get("id"), item.get("name"))
                call.replace(item.get(field))

    # -- Anthropic Messages --------------------------------------------------------------------------------------

    def _anthropic_event(self, event: SseEvent) -> None:
        name = event.event
        if name == "ping" or (name == "content_block_delta" and self.first_token_at is not None
                              and "input_json_delta" not in event.data and not _ESCAPED_LETTER.search(event.data)):
            return   # keep-alives, and text/thinking deltas once the first token is known
        doc = _dict(_loads(event.data))
        if doc is None:
            self.malformed_events += 1
            return
        kind = doc.get("type") if isinstance(doc.get("type"), str) else name
        if kind == "message_start":
            message = _dict(doc.get("message")) or {}
            self._take_identity(message)
            self._take_anthropic_usage(message.get("usage"))
        elif kind == "content_block_start":
            self._take_block_start(doc)
        elif kind == "content_block_delta":
            self._take_block_delta(doc)
        elif kind == "message_delta":
            self._finish((_dict(doc.get("delta")) or {}).get("stop_reason"))
            self._take_anthropic_usage(doc.get("usage"))
        elif kind == "message_stop":
            self._complete = True
        elif kind == "error":
            self._take_error(doc)

    def _take_block_start(self, doc: dict[str, Any]) -> None:
        block = _dict(doc.get("content_block")) or {}
        kind = block.get("type")
        if isinstance(kind, str) and kind.endswith("tool_use"):
            self._first_token()
            call = self._call(_index(doc.get("index"), -1))
            if call is not None:
                call.name_it(block.get("id"), block.get("name"))
        elif _has_text(block, ("text",)):
            self._first_token()

    def _take_block_delta(self, doc: dict[str, Any]) -> None:
        delta = _dict(doc.get("delta")) or {}
        kind = delta.get("type")
        if kind == "input_json_delta":
            call = self._tool_calls.get(_index(doc.get("index"), -1))
            if call is not None:
                call.add(delta.get("partial_json"))
        elif kind in ("text_delta", "thinking_delta") and _has_text(delta, ("text", "thinking")):
            self._first_token()

    def _take_anthropic_message(self, doc: dict[str, Any]) -> None:
        self._take_identity(doc)
        self._take_anthropic_usage(doc.get("usage"))
        self._finish(doc.get("stop_reason"))
        for position, block in enumerate(_list(doc.get("content"))):
            block = _dict(block)
            kind = block.get("type") if block is not None else None
            if block is None or not isinstance(kind, str) or not kind.endswith("tool_use"):
                continue
            if (call := self._call(position)) is not None:
                call.name_it(block.get("id"), block.get("name"))
                call.replace(_compact_json(block.get("input", {})))

    # -- anything else streamed (embeddings are not): only errors ------------------------------------------------

    def _other_event(self, event: SseEvent) -> None:
        if event.event == "error" and (doc := _dict(_loads(event.data))) is not None:
            self._take_error(doc)

    # -- the facts -----------------------------------------------------------------------------------------------

    def _usage_json(self) -> dict[str, int]:
        usage = self._usage
        result: dict[str, int] = {}
        if "input" in usage:
            result["input_tokens"] = usage["input"]
            if self.request.provider == "anthropic":   # OpenTelemetry: input includes cache reads and writes
                result["input_tokens"] += usage.get("cache_read", 0) + usage.get("cache_creation", 0)
        for kind, key in (("output", "output_tokens"), ("cache_read", "cache_read_tokens"),
                          ("cache_creation", "cache_creation_tokens"), ("reasoning", "reasoning_tokens")):
            if kind in usage:
                result[key] = usage[kind]
        return result

    def result(self, *, complete: bool | None = None, sent_at: float | None = None) -> dict[str, Any]:
        """The whole `extra["llm"]`: the request's facts merged with the answer's. `complete` overrides whether
        the answer reached its end; `sent_at` (same clock) gives time_to_first_token_s."""
        if not self._ended:
            self._settle()   # an answer cut short ends without `feed(b"")`
        request = self.request
        first_token = None
        if self.first_token_at is not None and sent_at is not None:
            first_token = round(self.first_token_at - sent_at, 6)
        facts: dict[str, Any] = {
            "provider": request.provider, "api": request.api, "operation": request.operation,
            "request_model": request.model,
            "response_model": self.response_model,
            "model": self.response_model or request.model,
            "stream": request.stream or self.streamed,
            "tools": request.audited_tools(),
            "tool_calls": [call.to_json() for call in self._tool_calls.values()],
            "finish_reasons": list(self._finish_reasons),
            "response_id": self.response_id,
            "usage": self._usage_json(),
            "usage_reported": self._usage_reported,
            "time_to_first_token_s": first_token,
            "complete": self._complete if complete is None else complete,
            "error": dict(self._error) if self._error is not None else None,
        }
        if request.body_model is not None and request.body_model != request.model:
            facts["body_model"] = request.body_model
        return facts


def _item_key(doc: dict[str, Any], item: dict[str, Any] | None = None) -> Any:
    """Responses output items are keyed by their output index (their item id when it is missing)."""
    index = doc.get("output_index")
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    item_id = doc.get("item_id") if item is None else item.get("id")
    return item_id if isinstance(item_id, str) else None


def _compact_json(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return ""


def _first_match(pattern: re.Pattern[bytes], data: bytes) -> bytes | None:
    match = pattern.search(data)
    return match.group(1) if match else None


def _last_match(pattern: re.Pattern[bytes], data: bytes) -> bytes | None:
    last = None
    for match in pattern.finditer(data):
        last = match
    return last.group(1) if last else None


_USAGE_KINDS = (
    ("input", "input_tokens"), ("output", "output_tokens"), ("cached", "cache_read_tokens"),
    ("cache_creation", "cache_creation_tokens"), ("reasoning", "reasoning_tokens"),
)


def usage_tokens(facts: Mapping[str, Any]) -> dict[str, int]:
    """Token counts to publish as metrics, by kind (`input`, `output`, `cached`, `cache_creation`, `reasoning`):
    only the kinds reported and above zero."""
    usage = facts.get("usage") if isinstance(facts, Mapping) else None
    if not isinstance(usage, dict):
        return {}
    counts: dict[str, int] = {}
    for kind, key in _USAGE_KINDS:
        value = _count(usage.get(key))
        if value:
            counts[kind] = value
    return counts
