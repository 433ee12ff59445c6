"""Readable views of the facts the proxy adds to a record's `extra`: LLM calls (`llm`), MCP requests (`mcp`)
and WebSocket sessions (`websocket`), shared by `bastion audit tail/show` and the dashboard.

Those facts are stored JSON shaped by what hostile agents and upstreams sent, and a record written by another
version may lack a key or carry it in another type. So every reader here checks types, bounds lengths and
counts, and gives None (or leaves the item out) for what is missing or malformed; none of them raises.
Text meant for a terminal goes through `printable`, so a model name or a WebSocket message cannot move the
cursor or rewrite earlier lines; the dashboard's templates escape HTML themselves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from bastion.audit.sinks.base import called_tools

MAX_NAME = 200
"""Model, tool, method and resource names are shown up to this many characters."""
MAX_ARGUMENTS = 4096
MAX_LIST = 64
"""Offered tools, tool calls and finish reasons shown per record."""
MAX_MESSAGES = 1000
"""WebSocket messages listed per record (the proxy keeps fewer; this bounds a hostile record)."""
MAX_MESSAGE_TEXT = 4096
MAX_TAIL_TOOLS = 4

USAGE_KINDS = (("input_tokens", "input"), ("output_tokens", "output"), ("cache_read_tokens", "cache read"),
               ("cache_creation_tokens", "cache creation"), ("reasoning_tokens", "reasoning"))

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


# --- typed readers -------------------------------------------------------------------------------------------

def _obj(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def _str(value: Any, cap: int = MAX_NAME) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= cap else value[:cap] + "…"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _strs(value: Any, cap: int = MAX_LIST) -> list[str]:
    if not isinstance(value, list):
        return []
    return [s for v in value[:cap] if (s := _str(v)) is not None]


def printable(text: str, cap: int = MAX_NAME) -> str:
    """`text` cut to `cap` characters, with control and other non-printing characters escaped (`\\n`,
    `\\x1b`), so it stays on its line and cannot drive the terminal."""
    cut = len(text) > cap
    out = []
    for ch in text[:cap]:
        if ch.isprintable():
            out.append(ch)
        else:
            out.append(_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"))
    return "".join(out) + ("…" if cut else "")


# --- facts for listings ------------------------------------------------------------------------------------------

def _usage(llm: Mapping[str, Any]) -> dict[str, int]:
    usage = _obj(llm.get("usage"))
    if usage is None:  # records written before `usage` grouped the counts kept them beside `model`
        usage = {k: llm[k] for k in ("input_tokens", "output_tokens") if k in llm}
    return {key: n for key, _ in USAGE_KINDS if (n := _int(usage.get(key))) is not None}


def llm_brief(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """`{"model", "input_tokens", "output_tokens"}` of an LLM call (None values where not known), or None when
    the record is not one. The model is the one that answered, else the one asked for."""
    llm = _obj(extra.get("llm"))
    if llm is None:
        return None
    model = next((m for k in ("model", "response_model", "request_model") if (m := _str(llm.get(k))) is not None),
                 None)
    usage = _usage(llm)
    return {"model": model, "input_tokens": usage.get("input_tokens"), "output_tokens": usage.get("output_tokens")}


def first_tool(extra: Mapping[str, Any]) -> str | None:
    """The tool called: the MCP tool, else the first tool call the model made."""
    tools = called_tools(extra)
    return _str(tools[0]) if tools else None


def mcp_method(extra: Mapping[str, Any]) -> str | None:
    mcp = _obj(extra.get("mcp"))
    return None if mcp is None else _str(mcp.get("method"))


def tail_facts(extra: Mapping[str, Any]) -> str:
    """The facts `bastion audit tail` adds to a line: `gpt-4o-mini 120→45 tok  mcp=tools/call  tool=send_email`
    (only the parts that are known; empty for other records)."""
    parts: list[str] = []
    brief = llm_brief(extra)
    if brief is not None:
        words = [printable(brief["model"])] if brief["model"] else []
        if brief["input_tokens"] is not None or brief["output_tokens"] is not None:
            words.append(f"{_count(brief['input_tokens'])}→{_count(brief['output_tokens'])} tok")
        if words:
            parts.append(" ".join(words))
    method = mcp_method(extra)
    if method:
        parts.append(f"mcp={printable(method)}")
    tools = list(dict.fromkeys(called_tools(extra)))
    if tools:
        more = ",…" if len(tools) > MAX_TAIL_TOOLS else ""
        parts.append("tool=" + ",".join(printable(t) for t in tools[:MAX_TAIL_TOOLS]) + more)
    return "  ".join(parts)


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


# --- facts for one record --------------------------------------------------------------------------------------

def llm_view(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """Everything known about an LLM call, typed and bounded, or None when the record is not one."""
    llm = _obj(extra.get("llm"))
    if llm is None:
        return None
    calls = []
    raw_calls = llm.get("tool_calls")
    for call in raw_calls[:MAX_LIST] if isinstance(raw_calls, list) else []:
        if (c := _obj(call)) is not None and (name := _str(c.get("name"))) is not None:
            calls.append({"id": _str(c.get("id")), "name": name,
                          "arguments": _str(c.get("arguments"), MAX_ARGUMENTS) or ""})
    error = _obj(llm.get("error"))
    brief = llm_brief(extra) or {}
    return {
        "provider": _str(llm.get("provider")), "api": _str(llm.get("api")), "operation": _str(llm.get("operation")),
        "model": brief.get("model"), "request_model": _str(llm.get("request_model")),
        "response_model": _str(llm.get("response_model")), "stream": _bool(llm.get("stream")),
        "complete": _bool(llm.get("complete")), "usage": _usage(llm),
        "usage_reported": _bool(llm.get("usage_reported")),
        "time_to_first_token_s": _float(llm.get("time_to_first_token_s")),
        "finish_reasons": _strs(llm.get("finish_reasons")), "response_id": _str(llm.get("response_id")),
        "tools": _strs(llm.get("tools")), "tool_calls": calls,
        "error": None if error is None else {"type": _str(error.get("type")) or "error",
                                             "message": _str(error.get("message"), MAX_ARGUMENTS) or ""},
    }


def mcp_view(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """An MCP (JSON-RPC) request's facts, typed and bounded, or None when the record is not one."""
    mcp = _obj(extra.get("mcp"))
    if mcp is None:
        return None
    rpc_id = mcp.get("id")
    error = _obj(mcp.get("error"))
    return {
        "method": _str(mcp.get("method")), "id": _str(rpc_id) if isinstance(rpc_id, str) else _int(rpc_id),
        "tool": _str(mcp.get("tool")), "resource": _str(mcp.get("resource"), MAX_ARGUMENTS),
        "protocol_version": _str(mcp.get("protocol_version")), "outcome": _str(mcp.get("outcome")),
        "error": None if error is None else {"code": _int(error.get("code")),
                                             "message": _str(error.get("message"), MAX_ARGUMENTS) or ""},
    }


def websocket_view(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """A WebSocket session's kept messages and totals, typed and bounded, or None when the record is not one."""
    ws = _obj(extra.get("websocket"))
    if ws is None:
        return None
    raw = ws.get("messages")
    raw = raw if isinstance(raw, list) else []
    messages = [m for item in raw[:MAX_MESSAGES] if (m := _message(item)) is not None]
    sizes = _obj(ws.get("bytes")) or {}
    close = _obj(ws.get("close"))
    return {
        "messages": messages, "unlisted": max(0, len(raw) - len(messages)),
        "kept": _int(ws.get("kept")), "total": _int(ws.get("total")),
        "bytes": {"client": _int(sizes.get("client")), "server": _int(sizes.get("server"))},
        "close": None if close is None else {"code": _int(close.get("code")), "reason": _str(close.get("reason")) or "",
                                             "by": _str(close.get("by"))},
    }


def _message(item: Any) -> dict[str, Any] | None:
    m = _obj(item)
    if m is None:
        return None
    return {"dir": _str(m.get("dir")), "t": _float(m.get("t")), "type": _str(m.get("type")),
            "size": _int(m.get("size")), "text": _str(m.get("text"), MAX_MESSAGE_TEXT),
            "sha256": _str(m.get("sha256"), 64), "cut": m.get("cut") is True, "refused": m.get("refused") is True}


# --- `bastion audit show` ------------------------------------------------------------------------------------

def fact_sections(extra: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    """The LLM, MCP and WebSocket sections of `bastion audit show`, and the `extra` keys they covered (the
    rest is printed as JSON)."""
    lines: list[str] = []
    shown: set[str] = set()
    sections = (("llm", llm_view, _llm_lines), ("mcp", mcp_view, _mcp_lines),
                ("websocket", websocket_view, _websocket_lines))
    for key, view_of, render in sections:
        view = view_of(extra)
        if view is not None:
            lines += ["", *render(view)]
            shown.add(key)
    return lines, shown


def _row(label: str, value: str) -> str:
    return f"  {label:<13}{value}"


def _opt(value: Any) -> str:
    return "-" if value is None else printable(str(value))


def _llm_lines(v: dict[str, Any]) -> list[str]:
    kind = " ".join(printable(x) for x in (v["provider"], v["api"]) if x) or "unknown API"
    flags = [f"operation {printable(v['operation'])}" if v["operation"] else "",
             "streamed" if v["stream"] else "", "complete" if v["complete"] else
             "incomplete" if v["complete"] is False else ""]
    lines = ["LLM", _row("api", ", ".join(x for x in (kind, *flags) if x)),
             _row("model", f"{_opt(v['model'])} (requested {_opt(v['request_model'])}, "
                           f"served {_opt(v['response_model'])})")]
    if v["usage"]:
        lines.append(_row("tokens", ", ".join(f"{label} {v['usage'][key]}" for key, label in USAGE_KINDS
                                             if key in v["usage"])))
    elif v["usage_reported"] is False:
        lines.append(_row("tokens", "not reported (the answer ended without usage)"))
    if v["time_to_first_token_s"] is not None:
        lines.append(_row("first token", f"{v['time_to_first_token_s']:.3f} s"))
    if v["finish_reasons"]:
        lines.append(_row("finish", ", ".join(printable(r) for r in v["finish_reasons"])))
    if v["response_id"]:
        lines.append(_row("response id", printable(v["response_id"])))
    if v["tools"]:
        lines.append(_row("offered", ", ".join(printable(t) for t in v["tools"])))
    for call in v["tool_calls"]:
        ident = f" [{printable(call['id'])}]" if call["id"] else ""
        arguments = printable(call["arguments"], MAX_ARGUMENTS)
        lines.append(_row("tool call", f"{printable(call['name'])}{ident} {arguments}"))
    if v["error"] is not None:
        lines.append(_row("error", f"{printable(v['error']['type'])}: {printable(v['error']['message'], 500)}"))
    return lines


def _mcp_lines(v: dict[str, Any]) -> list[str]:
    protocol = f"   protocol {printable(v['protocol_version'])}" if v["protocol_version"] else ""
    lines = ["MCP", _row("method", f"{_opt(v['method'])}   id {_opt(v['id'])}{protocol}")]
    if v["tool"]:
        lines.append(_row("tool", printable(v["tool"])))
    if v["resource"]:
        lines.append(_row("resource", printable(v["resource"], 500)))
    lines.append(_row("outcome", _opt(v["outcome"])))
    if v["error"] is not None:
        lines.append(_row("error", f"{_opt(v['error']['code'])}: {printable(v['error']['message'], 500)}"))
    return lines


def _websocket_lines(v: dict[str, Any]) -> list[str]:
    sizes = v["bytes"]
    lines = ["WebSocket", _row("messages", f"{_opt(v['total'])} in all, {_opt(v['kept'])} kept; bytes from client "
                                           f"{_opt(sizes['client'])}, from server {_opt(sizes['server'])}")]
    close = v["close"]
    if close is not None:
        reason = f" {json.dumps(printable(close['reason']), ensure_ascii=False)}" if close["reason"] else ""
        lines.append(_row("closed", f"code {_opt(close['code'])}{reason} by {_opt(close['by'])}"))
    for m in v["messages"]:
        at = "?" if m["t"] is None else f"+{m['t']:.3f}s"
        what = (printable(m["text"], MAX_MESSAGE_TEXT) if m["text"] is not None
                else f"sha256 {printable(m['sha256'])}" if m["sha256"] else "")
        marks = "".join((" (cut)" if m["cut"] else "", " REFUSED" if m["refused"] else ""))
        lines.append(f"  {at:>10}  {_opt(m['dir']):<6} {_opt(m['type']):<6} {_opt(m['size']):>8} B  {what}{marks}")
    if v["unlisted"]:
        lines.append(f"  ({v['unlisted']} more not listed)")
    return lines
