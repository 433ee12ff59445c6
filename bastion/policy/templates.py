"""Key templates: the strings a rule renders from a request to name what it locks, releases, requires or
completes, and the key a budget counts under (`lock: {key: "ticket:{ticket}"}`, `release`, `requires`,
`complete`, `budgets[].key`).

Not part of `match:`: a template never decides whether a rule applies; it runs once a rule matched, on the
captures its path matcher took and on the request's facts. Compiled once per policy load like the matchers,
and raising the same `CompileError` so the loader reports it with a line number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bastion.policy.facts import MISSING, EvalError, RequestFacts
from bastion.policy.matchers import Captures, CompileError, compile_json_path

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True, slots=True)
class Template:
    """`ticket:{ticket}`, `{json.a.b}`, `{query.x}`, `{header.x-y}`, `{agent}`. Missing values are errors."""

    text: str
    pieces: tuple[tuple[str, str], ...]  # ("lit", text) | ("cap"|"json"|"query"|"header"|"agent", name)
    captures: frozenset[str]

    def render(self, facts: RequestFacts, caps: Captures, agent: str) -> str:
        out: list[str] = []
        for kind, name in self.pieces:
            if kind == "lit":
                out.append(name)
            elif kind == "agent":
                out.append(agent)
            elif kind == "cap":
                out.append(caps[name])
            elif kind == "query":
                out.append(_scalar(facts.query_value(name), f"query.{name}"))
            elif kind == "header":
                out.append(_scalar(facts.headers.get(name, MISSING), f"header.{name}"))
            else:
                vals = list(compile_json_path(name).values(facts.json()))
                out.append(_scalar(vals[0] if vals else MISSING, f"json.{name}"))
        return "".join(out)


def _scalar(value: Any, what: str) -> str:
    if value is MISSING:
        raise EvalError(f"template value {{{what}}} is missing from the request")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise EvalError(f"template value {{{what}}} is not a scalar")


def compile_template(text: Any) -> Template:
    if not isinstance(text, str) or not text:
        raise CompileError("a key template must be a non-empty string")
    pieces: list[tuple[str, str]] = []
    caps: set[str] = set()
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            pieces.append(("lit", text[pos:m.start()]))
        ref = m.group(1).strip()
        head, _, tail = ref.partition(".")
        if ref == "agent":
            pieces.append(("agent", ""))
        elif head in ("json", "query", "header") and tail:
            if head == "json" and "*" in tail.split("."):
                raise CompileError(f"key {text!r}: {{{ref}}} must name one value, not `*`")
            pieces.append((head, tail.lower() if head == "header" else tail))
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ref):
            pieces.append(("cap", ref))
            caps.add(ref)
        else:
            raise CompileError(f"key {text!r}: unknown placeholder {{{ref}}}; use a path capture, "
                               "{json.a.b}, {query.x}, {header.x-y} or {agent}")
        pos = m.end()
    if pos < len(text):
        pieces.append(("lit", text[pos:]))
    if "{" in "".join(p[1] for p in pieces if p[0] == "lit") or "}" in "".join(
            p[1] for p in pieces if p[0] == "lit"):
        raise CompileError(f"key {text!r}: unbalanced braces")
    return Template(text, tuple(pieces), frozenset(caps))
