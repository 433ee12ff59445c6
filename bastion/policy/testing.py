"""`bastion test`: policy unit tests in YAML, run against a loaded policy.

A suite is a YAML list of cases:

    - name: support bot may chat with an approved model
      agent: support-bot
      method: POST
      url: https://api.openai.com/v1/chat/completions
      body: {model: gpt-4.1}          # a mapping (sent as JSON) or a string
      headers: {X-Trace: "1"}
      milestones: [extracted:42]      # milestones that exist for this case (default: none)
      expect:
        decision: allow               # allow | deny | hold: what Bastion enforces; bad_request: the proxy
                                      # refuses the request (400) before any rule runs (an ambiguous path)
        rules: [llm-chat]             # ids that must be among the determining rules
        # dependency_pending: a rule `requires` a milestone the case does not list
        # optional: would_decision, locks: [keys], releases: [keys], errors: N, reason: default|rule|...,
        # missing: [milestones], completes: [milestones], budgets: ["BUDGET:KEY", ...]

Every case is evaluated with the engine's `explain`, so the suite also learns which rules matched at least once:
rules no case exercised are listed, the way coverage tools list unexecuted lines. With `require_all_rules`
(`bastion test --require-all-rules`, which `make policy-tests` uses) they fail the run: a rule no case reaches
is a rule whose meaning nothing pins down, so an edit that breaks it would pass unnoticed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic

from bastion.policy.engine import Policy
from bastion.policy.facts import DEFAULT_NORMALIZE, EvalError, FactsError, NormalizeSettings, RequestFacts
from bastion.policy.schema import Strict
from bastion.policy.yamlsource import parse_yaml
from bastion.protocols.mcp import McpProblem


class Expect(Strict):
    decision: Literal["allow", "deny", "hold", "bad_request", "dependency_pending"]
    would_decision: Literal["allow", "deny", "hold"] | None = None
    rules: list[str] | None = None
    reason: str | None = None
    locks: list[str] | None = None
    releases: list[str] | None = None
    errors: int | None = None
    missing: list[str] | None = None
    completes: list[str] | None = None
    budgets: list[str] | None = None


class Case(Strict):
    name: str
    agent: str
    method: str
    url: str
    body: dict[str, Any] | list[Any] | str | None = None
    headers: dict[str, str] = pydantic.Field(default_factory=dict)
    milestones: list[str] = pydantic.Field(default_factory=list)
    expect: Expect


@dataclass
class CaseResult:
    file: str
    line: int | None
    name: str
    passed: bool
    problems: list[str] = field(default_factory=list)


@dataclass
class SuiteReport:
    results: list[CaseResult] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)
    unexercised: list[str] = field(default_factory=list)
    require_all_rules: bool = False  # unexercised rules fail the run, rather than only being listed

    @property
    def ok(self) -> bool:
        return (not self.load_errors and all(r.passed for r in self.results) and bool(self.results)
                and not (self.require_all_rules and self.unexercised))


def load_cases(path: Path) -> tuple[list[tuple[int | None, Case]], list[str]]:
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [], [f"{path}: cannot read: {e}"]
    doc = parse_yaml(text)
    if doc.issues:
        return [], [f"{path}:{i.line}: {i.message}" for i in doc.issues]
    if not isinstance(doc.data, list) or not doc.data:
        return [], [f"{path}: a test file is a non-empty YAML list of cases"]
    cases, errors = [], []
    for i, raw in enumerate(doc.data):
        try:
            cases.append((doc.line_of((i,)), Case.model_validate(raw)))
        except pydantic.ValidationError as e:
            for err in e.errors():
                where = ".".join(str(p) for p in err["loc"])
                errors.append(f"{path}:{doc.line_of((i, *err['loc']))}: case {i + 1}: {where}: {err['msg']}")
    return cases, errors


def request_facts(method: str, url: str, body: Any, headers: dict[str, str],
                  normalize: NormalizeSettings = DEFAULT_NORMALIZE) -> RequestFacts:
    """Facts for a tool-made request: a mapping/list body is JSON, and gets a JSON content type. `normalize`
    is the policy's section, so a case sees the same refusals as the proxy."""
    hdrs = {k.lower(): v for k, v in headers.items()}
    raw: bytes | None
    if body is None:
        raw = None
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = json.dumps(body).encode()
        hdrs.setdefault("content-type", "application/json")
    return check_jsonrpc(RequestFacts.from_url(method, url, headers=hdrs, body=raw, normalize=normalize))


def check_jsonrpc(facts: RequestFacts) -> RequestFacts:
    """`facts`, or FactsError when the proxy would refuse the request (400) before any rule: a JSON-RPC batch
    holding a call, duplicate keys, `Mcp-Method`/`Mcp-Name` headers that disagree with the body."""
    try:
        facts.mcp()
    except McpProblem as e:
        raise FactsError(str(e)) from None
    except EvalError:
        pass
    return facts


def run_suites(policy: Policy, files: list[Path], require_all_rules: bool = False) -> SuiteReport:
    """Every case of `files` against `policy`. `require_all_rules`: a rule no case matched fails the report."""
    report = SuiteReport(require_all_rules=require_all_rules)
    exercised: set[str] = set()
    for path in files:
        cases, errors = load_cases(path)
        report.load_errors.extend(errors)
        for line, case in cases:
            result = CaseResult(str(path), line, case.name, True)
            try:
                facts = request_facts(case.method, case.url, case.body, case.headers, policy.normalize)
            except FactsError as e:
                if case.expect.decision != "bad_request":
                    result.passed, result.problems = False, [f"decision: expected {case.expect.decision}, got "
                                                             f"bad_request ({e})"]
                report.results.append(result)
                continue
            if case.expect.decision == "bad_request":
                result.passed, result.problems = False, [
                    f"decision: expected bad_request, but the request is well-formed (path {facts.path})"]
                report.results.append(result)
                continue
            if case.agent not in policy.agents:
                result.passed, result.problems = False, [f"agent {case.agent!r} is not defined in the policy"]
                report.results.append(result)
                continue
            d = policy.explain(facts, case.agent)
            exercised.update(t.rule for t in d.trace if t.matched)
            result.problems = _compare(case.expect, d, set(case.milestones))
            result.passed = not result.problems
            report.results.append(result)
    report.unexercised = sorted(r.id for r in policy.rules if r.id not in exercised)
    return report


def _compare(exp: Expect, d: Any, milestones: set[str] | None = None) -> list[str]:
    problems = []
    got_rules = f" (rules: {', '.join(d.rules) or 'none, the default decided'})"
    missing = [m.key for m in d.requires if m.key not in (milestones or set())]
    effect = "dependency_pending" if missing and d.effect != "deny" else d.effect
    if effect != exp.decision:
        problems.append(f"decision: expected {exp.decision}, got {effect}{got_rules}"
                        + (f", missing milestones {missing}" if missing else ""))
    if exp.missing is not None and sorted(exp.missing) != sorted(missing):
        problems.append(f"missing: expected {exp.missing}, got {missing}")
    if exp.completes is not None and sorted(exp.completes) != sorted(c.key for c in d.completes):
        problems.append(f"completes: expected {exp.completes}, got {[c.key for c in d.completes]}")
    if exp.budgets is not None and sorted(exp.budgets) != sorted(f"{b.budget}:{b.key}" for b in d.budgets):
        problems.append(f"budgets: expected {exp.budgets}, got {[f'{b.budget}:{b.key}' for b in d.budgets]}")
    if exp.would_decision is not None and d.would_effect != exp.would_decision:
        problems.append(f"would_decision: expected {exp.would_decision}, got {d.would_effect}")
    if exp.rules is not None:
        absent = [r for r in exp.rules if r not in d.rules]
        if absent or (not exp.rules and d.rules):
            problems.append(f"rules: expected {exp.rules} among the determining rules, got {list(d.rules)}")
    if exp.reason is not None and d.reason != exp.reason:
        problems.append(f"reason: expected {exp.reason}, got {d.reason}")
    if exp.locks is not None and sorted(exp.locks) != sorted(lk.key for lk in d.locks):
        problems.append(f"locks: expected {exp.locks}, got {[lk.key for lk in d.locks]}")
    if exp.releases is not None and sorted(exp.releases) != sorted(r.key for r in d.releases):
        problems.append(f"releases: expected {exp.releases}, got {[r.key for r in d.releases]}")
    if exp.errors is not None and len(d.errors) != exp.errors:
        problems.append(f"errors: expected {exp.errors}, got {len(d.errors)}: {list(d.errors)}")
    return problems
