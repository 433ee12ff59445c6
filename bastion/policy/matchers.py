"""Compiled matchers: everything about one rule's `match:` block, built once per policy load.

Each matcher answers `test(facts, captures) -> bool` on the hot path and raises `EvalError` when it cannot
decide (the engine then fails closed according to the rule's effect). `explain(facts)` says in words why it
matched or not, for `bastion explain`; it is never called on the hot path.

Compile-time problems raise `CompileError(message, subpath)`; the compiler turns `subpath` into a line number.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bastion.policy.facts import MISSING, EvalError, FactsError, RequestFacts, canonical_host, fold_case

Captures = dict[str, str]
SubPath = tuple[str | int, ...]


class CompileError(ValueError):
    def __init__(self, message: str, subpath: SubPath = ()) -> None:
        super().__init__(message)
        self.message = message
        self.subpath = subpath


# ---------------------------------------------------------------------------------------------------------
# Hosts


@dataclass(frozen=True, slots=True)
class HostPattern:
    """`api.example.com` (exact) or `*.example.com` (any name below example.com, not the apex itself)."""

    text: str
    exact: str | None
    suffix: str | None  # "example.com" for "*.example.com"

    def matches(self, host: str) -> bool:
        if self.exact is not None:
            return host == self.exact
        assert self.suffix is not None
        return host.endswith("." + self.suffix)


def compile_host(text: Any) -> HostPattern:
    if not isinstance(text, str) or not text:
        raise CompileError("a host must be a non-empty string")
    raw = text.strip()
    if "/" in raw or "@" in raw:
        raise CompileError(f"host {text!r} must be a host name, not a URL")
    if raw.startswith("[") or raw.count(":") > 1:  # IPv6 literal
        return HostPattern(text, canonical_host(raw), None)
    if ":" in raw:
        raise CompileError(f"host {text!r} includes a port: use the separate `port:` matcher")
    if raw.startswith("*."):
        rest = raw[2:]
        if not rest or "*" in rest:
            raise CompileError(f"host {text!r}: a wildcard is only allowed as a leading `*.` before a domain")
        try:
            suffix = canonical_host(rest)
        except FactsError as e:
            raise CompileError(f"host {text!r}: {e}") from None
        if "." not in suffix:
            raise CompileError(f"host {text!r}: `*.{suffix}` would match whole top-level domains")
        return HostPattern(text, None, suffix)
    if "*" in raw:
        raise CompileError(f"host {text!r}: a wildcard is only allowed as a leading `*.` (like *.example.com)")
    try:
        return HostPattern(text, canonical_host(raw), None)
    except FactsError as e:
        raise CompileError(f"host {text!r}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Paths

_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_STAR, _GLOBSTAR = object(), object()


@dataclass(frozen=True, slots=True)
class PathPattern:
    """Literal segments, `{name}` (one segment, captured), `*` (one segment), `**` (the rest, zero or more).

    Matched against the request's decoded segments, so `%2F` inside a segment stays inside it, and a trailing
    slash is not significant. A folded pattern (`fold`) holds its literals in caseless form (`fold_case`) and
    is matched against the request's folded segments.
    """

    text: str
    parts: tuple[object, ...]  # str literal | ("cap", name) | _STAR | _GLOBSTAR
    captures: frozenset[str]
    fixed_len: int | None  # number of segments when there is no `**`
    fold: bool = False

    def match(self, segments: Sequence[str], spelled: Sequence[str] | None = None) -> Captures | None:
        """Captures if `segments` match, else None. Captured values come from `spelled` when given: the same
        segments as the request spelled them, while literals are compared against (folded) `segments`."""
        if self.fixed_len is not None and len(segments) != self.fixed_len:
            return None
        values = segments if spelled is None else spelled
        caps: Captures = {}
        for i, part in enumerate(self.parts):
            if part is _GLOBSTAR:
                return caps
            if i >= len(segments):
                return None
            if part is _STAR:
                continue
            if isinstance(part, tuple):
                caps[part[1]] = values[i]
            elif part != segments[i]:
                return None
        return caps if len(segments) == len(self.parts) else None


def compile_path(text: Any, fold: bool = False) -> PathPattern:
    if not isinstance(text, str) or not text.startswith("/"):
        raise CompileError(f"path {text!r} must be a string starting with '/'")
    raw = text.split("?", 1)[0]
    if raw != text:
        raise CompileError(f"path {text!r} must not contain a query: use the `query:` matcher")
    segs = [s for s in raw.split("/")[1:] if s != ""]
    parts: list[object] = []
    names: list[str] = []
    for i, seg in enumerate(segs):
        if seg == "**":
            if i != len(segs) - 1:
                raise CompileError(f"path {text!r}: `**` may only be the last segment")
            parts.append(_GLOBSTAR)
        elif seg == "*":
            parts.append(_STAR)
        elif m := _CAPTURE.match(seg):
            if m.group(1) in names:
                raise CompileError(f"path {text!r}: capture {{{m.group(1)}}} appears twice")
            names.append(m.group(1))
            parts.append(("cap", m.group(1)))
        elif "{" in seg or "}" in seg or "*" in seg:
            raise CompileError(f"path {text!r}: segment {seg!r} mixes text with a wildcard or capture; "
                               "a `{name}`, `*` or `**` must be a whole segment")
        elif seg in (".", ".."):
            raise CompileError(f"path {text!r}: dot segments are not allowed in patterns")
        else:
            parts.append(fold_case(seg) if fold else seg)
    fixed = None if parts and parts[-1] is _GLOBSTAR else len(parts)
    return PathPattern(text, tuple(parts), frozenset(names), fixed, fold)


# ---------------------------------------------------------------------------------------------------------
# Value conditions (query, headers, json)

OPERATORS = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "prefix", "suffix", "contains", "regex",
             "exists")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_number(v: Any, textual: bool) -> float:
    """Numbers compare as numbers; query and header values are text and are parsed when a number is asked."""
    if _is_number(v):
        return float(v)
    if textual and isinstance(v, str):
        try:
            n = float(v)
        except ValueError:
            raise EvalError(f"{v!r} is not a number") from None
        if math.isfinite(n):
            return n
    raise EvalError(f"expected a number, got {type(v).__name__} {v!r}")


def _equal(value: Any, target: Any, textual: bool) -> bool:
    """Equality without Python's surprises (True == 1) and with text-vs-number handled for query/headers."""
    if isinstance(target, bool) or isinstance(value, bool):
        if textual and isinstance(value, str) and isinstance(target, bool):
            return value.lower() == str(target).lower()
        return isinstance(value, bool) and isinstance(target, bool) and value is target
    if _is_number(target):
        if _is_number(value):
            return float(value) == float(target)
        if textual and isinstance(value, str):
            try:
                return float(value) == float(target)
            except ValueError:
                return False
        return False
    if target is None:
        return value is None
    return type(value) is type(target) and value == target


def _need_str(value: Any, op: str) -> str:
    if not isinstance(value, str):
        raise EvalError(f"`{op}` needs a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class ValueCondition:
    """A scalar (equality) or an operator map (all operators must hold)."""

    ops: tuple[tuple[str, Any], ...]
    textual: bool  # query/header values are strings

    def test(self, value: Any) -> bool:
        for op, target in self.ops:
            if op == "exists":
                if (value is not MISSING) != target:
                    return False
                continue
            if value is MISSING:
                return False
            if not _check(op, target, value, self.textual):
                return False
        return True

    def describe(self) -> str:
        return ", ".join(f"{op} {t.pattern if isinstance(t, re.Pattern) else t!r}" for op, t in self.ops)


def _check(op: str, target: Any, value: Any, textual: bool) -> bool:
    match op:
        case "eq":
            return _equal(value, target, textual)
        case "ne":
            return not _equal(value, target, textual)
        case "in":
            return any(_equal(value, t, textual) for t in target)
        case "not_in":
            return not any(_equal(value, t, textual) for t in target)
        case "gt":
            return _as_number(value, textual) > target
        case "gte":
            return _as_number(value, textual) >= target
        case "lt":
            return _as_number(value, textual) < target
        case "lte":
            return _as_number(value, textual) <= target
        case "prefix":
            return _need_str(value, op).startswith(target)
        case "suffix":
            return _need_str(value, op).endswith(target)
        case "contains":
            if isinstance(value, str):
                if not isinstance(target, str):
                    raise EvalError("`contains` on a string needs a string")
                return target in value
            if isinstance(value, list):
                return any(_equal(v, target, textual) for v in value)
            raise EvalError(f"`contains` needs a string or a list, got {type(value).__name__}")
        case "regex":
            return target.search(_need_str(value, op)) is not None
    raise EvalError(f"unknown operator {op}")  # unreachable: compile rejects unknown operators


def compile_condition(spec: Any, textual: bool) -> ValueCondition:
    if isinstance(spec, list):
        raise CompileError("a list is ambiguous here: write {in: [...]} for any of several values")
    if not isinstance(spec, dict):
        return ValueCondition((("eq", spec),), textual)
    if not spec:
        raise CompileError("an empty condition matches nothing useful: give a value or an operator")
    ops: list[tuple[str, Any]] = []
    for op, target in spec.items():
        sub: SubPath = (op,)
        if op not in OPERATORS:
            from difflib import get_close_matches

            close = get_close_matches(str(op), OPERATORS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; operators: {', '.join(OPERATORS)}"
            raise CompileError(f"unknown operator {op!r}{hint}", sub)
        if op in ("in", "not_in"):
            if not isinstance(target, list) or not target:
                raise CompileError(f"`{op}` needs a non-empty list", sub)
        elif op in ("gt", "gte", "lt", "lte"):
            if not _is_number(target):
                raise CompileError(f"`{op}` needs a number, got {target!r}", sub)
            target = float(target)
        elif op in ("prefix", "suffix"):
            if not isinstance(target, str):
                raise CompileError(f"`{op}` needs a string", sub)
        elif op == "regex":
            if not isinstance(target, str):
                raise CompileError("`regex` needs a string", sub)
            try:
                target = re.compile(target)
            except re.error as e:
                raise CompileError(f"bad regex {target!r}: {e}", sub) from None
        elif op == "exists":
            if not isinstance(target, bool):
                raise CompileError("`exists` needs true or false", sub)
        elif op in ("eq", "ne", "contains") and isinstance(target, (dict, list)):
            raise CompileError(f"`{op}` compares with a scalar value", sub)
        ops.append((op, target))
    return ValueCondition(tuple(ops), textual)


# ---------------------------------------------------------------------------------------------------------
# JSON paths


@dataclass(frozen=True, slots=True)
class JsonPath:
    """Dotted path: `a.b.0.c`; `*` is any element of a list (or any value of an object)."""

    text: str
    parts: tuple[str, ...]
    fans_out: bool

    def values(self, doc: Any) -> Iterator[Any]:
        """Every value the path reaches; MISSING once if it reaches none (and does not fan out)."""
        found = False
        for v in _walk(doc, self.parts):
            found = True
            yield v
        if not found and not self.fans_out:
            yield MISSING


def _walk(node: Any, parts: tuple[str, ...]) -> Iterator[Any]:
    if not parts:
        yield node
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        children = node if isinstance(node, list) else node.values() if isinstance(node, dict) else ()
        for child in children:
            yield from _walk(child, rest)
    elif isinstance(node, dict):
        if head in node:
            yield from _walk(node[head], rest)
    elif isinstance(node, list) and head.isdigit():
        i = int(head)
        if i < len(node):
            yield from _walk(node[i], rest)


def compile_json_path(text: str) -> JsonPath:
    parts = tuple(text.split("."))
    if not text or any(p == "" for p in parts):
        raise CompileError(f"bad JSON path {text!r}: use dotted keys like a.b.0.c")
    return JsonPath(text, parts, "*" in parts)


# ---------------------------------------------------------------------------------------------------------
# The matchers a rule is made of. Each: test(facts, caps) -> bool, explain(facts, caps) -> (bool|None, text).


class Matcher(ABC):
    kind: str = ""
    cost: int = 0  # cheaper matchers run first

    @abstractmethod
    def test(self, facts: RequestFacts, caps: Captures) -> bool: ...

    @abstractmethod
    def describe_value(self, facts: RequestFacts) -> str: ...

    @abstractmethod
    def describe_pattern(self) -> str: ...

    def explain(self, facts: RequestFacts, caps: Captures) -> tuple[bool | None, str]:
        try:
            ok = self.test(facts, caps)
        except EvalError as e:
            return None, f"{self.kind}: cannot evaluate ({e})"
        verb = "matches" if ok else "does not match"
        return ok, f"{self.kind} {self.describe_value(facts)} {verb} {self.describe_pattern()}"


class HostMatcher(Matcher):
    kind = "host"
    cost = 0

    def __init__(self, patterns: tuple[HostPattern, ...]) -> None:
        self.patterns = patterns

    def test(self, facts: RequestFacts, caps: Captures) -> bool:
        return any(p.matches(facts.host) for p in self.patterns)

    def describe_value(self, facts: RequestFacts) -> str:
        return facts.host

    def describe_pattern(self) -> str:
        return " | ".join(p.text for p in self.patterns)


class SetMatcher(Matcher):
    """method, scheme and port: membership in a small set."""

    cost = 0

    def __init__(self, kind: str, allowed: frozenset[Any], get: Callable[[RequestFacts], Any]) -> None:
        self.kind = kind
        self.allowed = allowed
        self.get = get

    def test(self, facts: RequestFacts, caps: Captures) -> bool:
        return self.get(facts) in self.allowed

    def describe_value(self, facts: RequestFacts) -> str:
        return str(self.get(facts))

    def describe_pattern(self) -> str:
        return " | ".join(sorted(map(str, self.allowed)))


class PathMatcher(Matcher):
    """Any of the patterns. `fold`: compare case-insensitively (the patterns are compiled folded);
    `fold_captures`: captured values are case-folded too, so that one resource spelled two ways takes one
    lock when the upstream folds case (`path_case: insensitive`)."""

    kind = "path"
    cost = 1

    def __init__(self, patterns: tuple[PathPattern, ...], fold: bool = False, fold_captures: bool = False) -> None:
        if any(p.fold != fold for p in patterns):
            raise ValueError("path patterns must be compiled with the matcher's `fold`")
        self.patterns = patterns
        self.fold = fold
        self.fold_captures = fold_captures

    def test(self, facts: RequestFacts, caps: Captures) -> bool:
        if self.fold:
            segments = facts.folded_segments()
            spelled = segments if self.fold_captures else facts.segments
        else:
            segments = spelled = facts.segments
        for p in self.patterns:
            got = p.match(segments, spelled)
            if got is not None:
                caps.update(got)
                return True
        return False

    def describe_value(self, facts: RequestFacts) -> str:
        return facts.path

    def describe_pattern(self) -> str:
        shown = " | ".join(p.text for p in self.patterns)
        return f"{shown} (any case)" if self.fold else shown


def any_satisfies(values: Iterable[Any], cond: ValueCondition) -> bool:
    """Any of the values satisfies the condition (`*` paths, several tools); an error counts only if none does."""
    error: EvalError | None = None
    for v in values:
        try:
            if cond.test(v):
                return True
        except EvalError as e:
            error = e
    if error is not None:
        raise error
    return False


def websocket_upgrade(facts: RequestFacts) -> bool:
    """A WebSocket upgrade request (ws/wss, no body): `json` conditions do not apply to it; the session's client
    messages are checked against them instead (`bastion.proxy.wsession`), each as the body of these facts."""
    return not facts.body and facts.scheme in ("ws", "wss")


class FieldsMatcher(Matcher):
    """query / headers / json: every named field must satisfy its condition."""

    def __init__(self, kind: str, fields: tuple[tuple[str, Any, ValueCondition], ...]) -> None:
        self.kind = kind
        self.fields = fields  # (name, accessor: query/header name or JsonPath, condition)
        self.cost = 3 if kind == "json" else 2  # the JSON body is parsed only if cheaper matchers pass

    def _values(self, facts: RequestFacts, key: Any) -> list[Any]:
        if self.kind == "query":
            return [facts.query_value(key)]
        if self.kind == "headers":
            return [facts.headers.get(key, MISSING)]
        return list(key.values(facts.json()))

    def test(self, facts: RequestFacts, caps: Captures) -> bool:
        if self.kind == "json" and websocket_upgrade(facts):
            return False
        return all(self._any(facts, key, cond) for _name, key, cond in self.fields)

    def _any(self, facts: RequestFacts, key: Any, cond: ValueCondition) -> bool:
        return any_satisfies(self._values(facts, key), cond)

    def explain(self, facts: RequestFacts, caps: Captures) -> tuple[bool | None, str]:
        if self.kind == "json" and websocket_upgrade(facts):
            return False, "json: does not apply to a WebSocket upgrade (each client message is checked instead)"
        for name, key, cond in self.fields:
            try:
                ok = self._any(facts, key, cond)
            except EvalError as e:
                return None, f"{self.kind}.{name}: cannot evaluate ({e})"
            if not ok:
                try:
                    seen = [v for v in self._values(facts, key) if v is not MISSING]
                except EvalError as e:
                    seen = [f"<{e}>"]
                shown = "missing" if not seen else repr(seen[0] if len(seen) == 1 else seen)
                return False, f"{self.kind}.{name} {shown} does not satisfy {cond.describe()}"
        names = ", ".join(f"{self.kind}.{n}" for n, _, _ in self.fields)
        return True, f"{names} satisfied"

    def describe_value(self, facts: RequestFacts) -> str:
        return ""

    def describe_pattern(self) -> str:
        return ""


_FACT_GETTERS: dict[str, Callable[[RequestFacts], Any]] = {
    "method": lambda f: f.method, "scheme": lambda f: f.scheme, "port": lambda f: f.port}


def build_set_matcher(kind: str, values: frozenset[Any]) -> SetMatcher:
    """method, scheme or port in `values`."""
    return SetMatcher(kind, values, _FACT_GETTERS[kind])


def compile_fields(kind: str, spec: dict[str, Any]) -> FieldsMatcher:
    if not spec:
        raise CompileError(f"`{kind}` is empty: remove it or name at least one field")
    fields = []
    for name, cond_spec in spec.items():
        if not isinstance(name, str) or not name:
            raise CompileError(f"`{kind}` field names must be strings", (name,))
        try:
            cond = compile_condition(cond_spec, textual=kind != "json")
        except CompileError as e:
            raise CompileError(e.message, (name, *e.subpath)) from None
        if kind == "json":
            try:
                key: Any = compile_json_path(name)
            except CompileError as e:
                raise CompileError(e.message, (name,)) from None
        elif kind == "headers":
            key = name.lower()
        else:
            key = name
        fields.append((name, key, cond))
    return FieldsMatcher(kind, tuple(fields))
