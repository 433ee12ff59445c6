"""Matchers on what a request means, not only on its HTTP shape: `match: {llm: {...}}` and `match: {mcp: {...}}`.

- `llm`: an OpenAI- or Anthropic-style model call (chat completions, completions, responses, embeddings,
  messages), recognised by its path and body on any host. Keys: `provider` (openai | anthropic), `api`,
  `model`, `tool` (a tool the request offers or forces), `stream`. `llm: {}` matches every LLM call.
- `mcp`: a JSON-RPC message of MCP's streamable HTTP transport. Keys: `method`, `tool` (tools/call and
  prompts/get name), `resource` (resources/read uri), `args: {dotted.path: CONDITION}` (the call's arguments).
  `mcp: {}` matches every JSON-RPC call.

A request that is not such a call has no such facts: the condition does not match, and that is not an
evaluation error (the MCP transport's own `GET` and `DELETE` pass tool rules by). A request that may be one
but whose body cannot be read (too large, not JSON) raises `EvalError`: an allow rule then does not allow and a
deny or hold rule still applies, as for `json` conditions.

Values take the usual conditions: a scalar means equality, a list means any of, an operator map (`prefix`,
`regex`, `in`, ...) works as in `json`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from bastion.policy.facts import MISSING, EvalError, RequestFacts
from bastion.policy.matchers import (
    Captures,
    CompileError,
    JsonPath,
    Matcher,
    ValueCondition,
    any_satisfies,
    compile_condition,
    compile_json_path,
)
from bastion.protocols.mcp import McpProblem

LLM_KEYS = ("provider", "api", "model", "tool", "stream")
MCP_KEYS = ("method", "tool", "resource", "args")

Check = tuple[str, Callable[[Any], list[Any]], ValueCondition]


def value_condition(spec: Any) -> ValueCondition:
    """A scalar (equality), a list (any of) or an operator map."""
    if isinstance(spec, list):
        spec = {"in": spec}
    return compile_condition(spec, textual=False)


class _CallMatcher(Matcher):
    """Every named fact of the call must satisfy its condition; a fact with several values (tools offered)
    matches when any value does."""

    cost = 3  # reads the JSON body, like `json`
    what = ""  # "an LLM API call", for `explain`

    def __init__(self, checks: tuple[Check, ...]) -> None:
        self.checks = checks

    @abstractmethod
    def call(self, facts: RequestFacts) -> Any:
        """The request's LLM or MCP call, None when it is not one; raises EvalError when it cannot be read."""

    def test(self, facts: RequestFacts, caps: Captures) -> bool:
        call = self.call(facts)
        return call is not None and all(any_satisfies(values(call), cond) for _name, values, cond in self.checks)

    def explain(self, facts: RequestFacts, caps: Captures) -> tuple[bool | None, str]:
        try:
            call = self.call(facts)
        except EvalError as e:
            return None, f"{self.kind}: cannot evaluate ({e})"
        if call is None:
            return False, f"{self.kind}: the request is not {self.what}"
        for name, values, cond in self.checks:
            try:
                ok = any_satisfies(values(call), cond)
            except EvalError as e:
                return None, f"{self.kind}.{name}: cannot evaluate ({e})"
            if not ok:
                seen = [v for v in values(call) if v is not MISSING]
                shown = "missing" if not seen else repr(seen[0] if len(seen) == 1 else seen)
                return False, f"{self.kind}.{name} {shown} does not satisfy {cond.describe()}"
        names = ", ".join(f"{self.kind}.{n}" for n, _, _ in self.checks) or f"{self.kind} (any call)"
        return True, f"{names} satisfied"

    def describe_value(self, facts: RequestFacts) -> str:
        return ""

    def describe_pattern(self) -> str:
        return ""


class LlmMatcher(_CallMatcher):
    kind = "llm"
    what = "an LLM API call"

    def call(self, facts: RequestFacts) -> Any:
        return facts.llm()


class McpMatcher(_CallMatcher):
    kind = "mcp"
    what = "a JSON-RPC (MCP) call"

    def call(self, facts: RequestFacts) -> Any:
        try:
            return facts.mcp()
        except McpProblem as e:  # refused before any rule runs; fail closed if a tool reaches here anyway
            raise EvalError(str(e)) from None


def _one(value: Any) -> list[Any]:
    return [MISSING if value is None else value]


def compile_llm(spec: dict[str, Any]) -> LlmMatcher:
    """`spec`: the `llm:` mapping (keys validated by the schema)."""
    checks: list[Check] = []
    getters: dict[str, Callable[[Any], list[Any]]] = {
        "provider": lambda c: [c.provider],
        "api": lambda c: [c.api],
        "model": lambda c: _one(c.model),
        "tool": lambda c: [*c.tools, *([c.tool_choice] if c.tool_choice else [])] or [MISSING],
        "stream": lambda c: [c.stream],
    }
    for key in LLM_KEYS:
        if key in spec and spec[key] is not None:
            checks.append((key, getters[key], _compiled(key, spec[key])))
    return LlmMatcher(tuple(checks))


def compile_mcp(spec: dict[str, Any]) -> McpMatcher:
    """`spec`: the `mcp:` mapping (keys validated by the schema)."""
    checks: list[Check] = []
    getters: dict[str, Callable[[Any], list[Any]]] = {
        "method": lambda c: [c.method],
        "tool": lambda c: _one(c.tool),
        "resource": lambda c: _one(c.resource),
    }
    for key in ("method", "tool", "resource"):
        if key in spec and spec[key] is not None:
            checks.append((key, getters[key], _compiled(key, spec[key])))
    args = spec.get("args")
    if args is not None:
        if not isinstance(args, dict) or not args:
            raise CompileError("`args` maps dotted argument paths to conditions, like {to: {suffix: '@x.com'}}",
                               ("args",))
        for name, cond_spec in args.items():
            if not isinstance(name, str) or not name:
                raise CompileError("`args` keys must be dotted paths", ("args",))
            try:
                path = compile_json_path(name)
                cond = compile_condition(cond_spec, textual=False)
            except CompileError as e:
                raise CompileError(e.message, ("args", name, *e.subpath)) from None
            checks.append((f"args.{name}", _arguments(path), cond))
    return McpMatcher(tuple(checks))


def _arguments(path: JsonPath) -> Callable[[Any], list[Any]]:
    def values(call: Any) -> list[Any]:
        args = call.arguments
        if args is None:
            return [MISSING]
        return list(path.values(args))

    return values


def _compiled(key: str, spec: Any) -> ValueCondition:
    if key == "stream":
        if not isinstance(spec, bool):
            raise CompileError("`stream` is true or false", (key,))
        return compile_condition(spec, textual=False)
    try:
        return value_condition(spec)
    except CompileError as e:
        raise CompileError(e.message, (key, *e.subpath)) from None
