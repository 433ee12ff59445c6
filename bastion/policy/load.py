"""Files and directories -> one immutable `Policy`, or every problem as `FILE:LINE: message`.

A directory contributes every `*.yaml`/`*.yml` directly inside it, in name order, skipping hidden files (so
Kubernetes ConfigMap mounts, whose real files sit in `..data/`, load once through their symlinks) and
`*_test.yaml` suites (so `bastion test` files may sit beside the rules). Files merge: agents, users and rules
from all of them, `defaults`, `audit`, `approvals` and `normalize` from exactly one, network allowances from
all. The loader collects every error before giving up, so one `bastion check` run shows them all. Each
error carries a stable code (`ISSUE_CODES`, docs/policy-errors.md) beside its message, for tools to act on.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import itertools
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from bastion.policy.decision import ApprovalSpec
from bastion.policy.engine import (
    AgentSpec,
    ApprovalSettings,
    AuditSettings,
    CompiledRule,
    Policy,
    UnlessBlock,
    UserSpec,
)
from bastion.policy.facts import NormalizeSettings
from bastion.policy.fleet_rules import CompiledBudget, GuardSpec
from bastion.policy.matchers import (
    CompileError,
    HostMatcher,
    Matcher,
    PathMatcher,
    build_set_matcher,
    compile_fields,
    compile_host,
    compile_path,
)
from bastion.policy.pacing import Pacer, release_paced
from bastion.policy.schema import NAME, ApprovalModel, CompleteModel, MatchModel, PolicyFile, RuleModel
from bastion.policy.schema_errors import explain_pydantic
from bastion.policy.templates import Template, compile_template
from bastion.policy.traffic_matchers import compile_llm, compile_mcp
from bastion.policy.yamlsource import YamlDocument, parse_yaml

POLICY_SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = ("_test.yaml", "_test.yml")
_METHOD_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~")
_SCHEMES = frozenset({"http", "https", "ws", "wss"})


# Every code a PolicyIssue may carry, and what it means (docs/policy-errors.md lists each with an example; a
# test keeps the two in step). Codes are stable: scripts and CI annotations act on them, so a message may be
# reworded but a code is never renamed or reused.
ISSUE_CODES: dict[str, str] = {
    "no_rules": "no rules path was given (--rules or BASTION_RULES)",
    "no_such_file": "a rules path does not exist",
    "no_policy_files": "a rules directory holds no *.yaml or *.yml file",
    "unreadable": "a rules file cannot be read, or is not UTF-8",
    "yaml_syntax": "the file is not YAML Bastion can read",
    "duplicate_key": "a mapping holds the same key twice",
    "empty_file": "the file holds no YAML document",
    "not_a_mapping": "the document is not a mapping",
    "unknown_key": "a key the format does not have (usually a typo)",
    "missing_key": "a required key is absent",
    "wrong_type": "a value of the wrong kind (a string where a list belongs)",
    "yaml_boolean": "an unquoted yes/no/on/off/true/false where a string belongs",
    "bad_value": "a value of the right kind that the key does not accept",
    "bad_duration": "a duration that is not like 30s, 15m, 1h30m, or is not positive",
    "bad_token": "a token_sha256 that is not 64 hex characters",
    "bad_name": "an agent or user name with characters a name may not have",
    "missing_defaults": "no file of the policy sets `defaults`",
    "duplicate_section": "a section only one file may hold is set in two",
    "duplicate_agent": "two agents share a name",
    "duplicate_user": "two users share a name",
    "duplicate_rule": "two rules share an id",
    "duplicate_budget": "two budgets share an id",
    "duplicate_guard": "two guards share an id",
    "undefined_agent": "an `agents` selector names an agent that is not defined",
    "undefined_role": "an `agents` selector names a role no agent has",
    "undefined_user": "an agent's owner is not a defined user",
    "undefined_approver": "an approver is not a defined user, or a role no user has",
    "effect_conflict": "a key that does not go with the rule's effect",
    "empty_unless": "an `unless` block with no condition, which would exempt every request",
    "bad_host": "a host pattern the matcher refuses",
    "bad_path": "a path pattern the matcher refuses",
    "bad_method": "an HTTP method that is not a token",
    "bad_scheme": "a scheme other than http, https, ws and wss",
    "bad_port": "a port outside 1-65535",
    "bad_condition": "a query, headers, json, llm or mcp condition the matcher refuses",
    "bad_regex": "a regular expression that does not compile",
    "bad_template": "a key template with a bad placeholder, or one the rule's path does not capture",
    "bad_cidr": "a network allowance that is not an IP network",
    "agent_not_in_policy": "the agent a sidecar is pinned to (--agent) is not defined in the policy",
    "internal_error": "the loader failed unexpectedly (a bug: please report it)",
}


@dataclass(frozen=True)
class PolicyIssue:
    """One problem of a policy: where, a message for people, and a stable code (`ISSUE_CODES`) for tools.

    str() is `FILE:LINE: message`, the form logs and editors' problem matchers read; `coded()` adds the code."""

    file: str
    line: int | None
    message: str
    code: str

    def __post_init__(self) -> None:
        if self.code not in ISSUE_CODES:  # a typo would publish a code no documentation explains
            raise ValueError(f"unknown policy issue code {self.code!r}")

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"

    def coded(self) -> str:
        """`FILE:LINE: [code] message`: what `bastion check` prints (still `FILE:LINE: ` first)."""
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: [{self.code}] {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "code": self.code, "message": self.message}


class PolicyLoadError(Exception):
    """The policy is invalid. `issues` holds every problem found; str() prints one per line."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("\n".join(map(str, issues)))
        self.issues = issues


def policy_files(paths: typing.Sequence[str | Path]) -> tuple[list[Path], list[PolicyIssue]]:
    files: list[Path] = []
    issues: list[PolicyIssue] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                c for c in p.iterdir()
                if c.name.endswith(POLICY_SUFFIXES) and not c.name.endswith(TEST_SUFFIXES)
                and not c.name.startswith(".") and c.is_file()
            )
            if not found:
                issues.append(PolicyIssue(str(p), None, "directory holds no *.yaml or *.yml policy files",
                                          "no_policy_files"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            issues.append(PolicyIssue(str(p), None, "no such file or directory", "no_such_file"))
    if not paths:
        issues.append(PolicyIssue("<rules>", None, "no rules given: pass --rules PATH or set BASTION_RULES",
                                  "no_rules"))
    return files, issues


def name_problem(kind: str, name: str) -> str | None:
    """Why `name` cannot be an agent or user name, or None. One rule for the rules files and `bastion token`:
    a name the policy refuses must never get a token line, and a ':' could never authenticate (it separates
    the name from the token in proxy credentials)."""
    if NAME.fullmatch(name):  # not match(): its `$` would let a trailing newline through
        return None
    why = ": ':' separates the name from the token in proxy credentials" if ":" in name else ""
    return (f"bad {kind} name {name!r}{why}; a name is 1-128 letters, digits and _ . @ -, starting with a letter "
            "or digit")


@dataclass
class _Source:
    file: str
    doc: YamlDocument
    model: PolicyFile

    def at(self, path: tuple[str | int, ...], code: str, message: str) -> PolicyIssue:
        return PolicyIssue(self.file, self.doc.line_of(path), message, code)


class _Revision:
    """The policy revision: what the rules say, however the paths to them were spelled.

    `--rules rules.yaml`, `--rules ./rules.yaml` and `--rules /srv/rules.yaml` are one policy and get one
    revision, so sidecars, audit records and approvals started from different directories agree. Each file
    counts with its own name (never its directory) and content, in load order: two files swapping contents
    change the revision, because what `explain`, the audit and every error message point at
    (`file:line`) changed. Lengths go before each part, so no choice of names and contents can collide."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256(b"bastion-policy-revision-2\0")

    def add(self, file: Path, raw: bytes) -> None:
        name = file.name.encode("utf-8", "surrogateescape")
        self._digest.update(f"{len(name)}:{len(raw)}:".encode() + name + raw)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def load_policy(paths: typing.Sequence[str | Path]) -> Policy:
    """Load, validate and compile. Raises PolicyLoadError listing every problem."""
    files, issues = policy_files(paths)
    sources: list[_Source] = []
    digest = _Revision()
    pacer = Pacer()  # a reload runs on a worker thread: let the event loop take the GIL (pacing.py)
    for f in files:
        name = str(f)
        try:
            raw = f.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            issues.append(PolicyIssue(name, None, f"cannot read: {e}", "unreadable"))
            continue
        digest.add(f, raw)
        src = _parse_file(name, text, issues, pacer.pace)
        if src is not None:
            sources.append(src)
    if issues:
        raise PolicyLoadError(issues)
    _release(sources, pacer.pace)
    policy = _compile(sources, issues, digest.hexdigest(), tuple(str(f) for f in files), pacer.pace)
    if issues or policy is None:
        raise PolicyLoadError(issues)
    # The files' documents, line maps and models, freed a piece at a time rather than in one cascade at return
    # (95 ms of GIL for 50,000 rules). The loop's `src` must not hold the last one.
    parsed: list[object] = [sources]
    src = None
    del sources
    release_paced(parsed)
    return policy


def _release(sources: list[_Source], pace: typing.Callable[[], None]) -> None:
    """Free the files' YAML rules once validated: compiling reads the models (and the lines), never the data,
    and the models hold lists of their own. Freed before compiling, they are not walked by the garbage
    collections that compiling sets off (50,000 rules load 6% faster). Freed a slice at a time, because all
    at once, when `load_policy` returns, they are one cascade of deallocations that holds the GIL: 10 ms for
    10,000 rules, during which a reload's event loop cannot run."""
    for src in sources:
        rules = src.doc.data.get("rules") if isinstance(src.doc.data, dict) else None
        while isinstance(rules, list) and rules:
            del rules[-VALIDATE_CHUNK:]
            pace()


def _parse_file(name: str, text: str, issues: list[PolicyIssue],
                pace: typing.Callable[[], None] | None = None) -> _Source | None:
    doc = parse_yaml(text, pace)
    issues.extend(PolicyIssue(name, i.line, i.message, i.code) for i in doc.issues)
    if doc.issues:
        return None
    if doc.data is None:
        issues.append(PolicyIssue(name, None, "the file is empty: a policy needs at least `version: 1`",
                                  "empty_file"))
        return None
    if not isinstance(doc.data, dict):
        issues.append(PolicyIssue(name, doc.line_of(()), "a policy file must be a mapping with `version: 1`",
                                  "not_a_mapping"))
        return None
    model = _validate(doc.data, pace)
    if not isinstance(model, PolicyFile):
        for err in model:
            code, message = explain_pydantic(err)
            issues.append(PolicyIssue(name, doc.line_of(err["loc"]), message, code))
        return None
    return _Source(name, doc, model)


VALIDATE_CHUNK = 250  # rules per validation call: about 1 ms (2 vCPUs)
_RULE_LIST: pydantic.TypeAdapter[list[RuleModel]] = pydantic.TypeAdapter(list[RuleModel])
_BEFORE_RULES = frozenset(itertools.takewhile(lambda f: f != "rules", PolicyFile.model_fields))


def _validate(data: dict[str, Any], pace: typing.Callable[[], None] | None = None) -> PolicyFile | list[Any]:
    """`PolicyFile.model_validate(data)`, or its errors (`ValidationError.errors()`, in the same order).

    Validation is one call into pydantic-core that holds the GIL throughout: 38 ms for 10,000 rules, 200 ms
    for 50,000, during which a reload's event loop cannot run. So the rules are validated `VALIDATE_CHUNK` at
    a time, with `pace()` between chunks, and the rest of the file with an empty rule list. The result is
    the same model; errors are merged in pydantic's order: the fields before `rules`, the rules, then the
    fields after it and unknown keys."""
    rules = data.get("rules")
    if not isinstance(rules, list) or len(rules) <= VALIDATE_CHUNK:
        try:
            return PolicyFile.model_validate(data)
        except pydantic.ValidationError as e:
            return list(e.errors())
    head: PolicyFile | None = None
    errors: list[Any] = []
    try:
        head = PolicyFile.model_validate({**data, "rules": []})
    except pydantic.ValidationError as e:
        errors = list(e.errors())
    validated: list[RuleModel] = []
    rule_errors: list[Any] = []
    for start in range(0, len(rules), VALIDATE_CHUNK):
        if pace is not None:
            pace()
        try:
            validated.extend(_RULE_LIST.validate_python(rules[start:start + VALIDATE_CHUNK]))
        except pydantic.ValidationError as e:
            rule_errors.extend({**err, "loc": ("rules", start + err["loc"][0], *err["loc"][1:])}
                               for err in e.errors())
    if head is not None and not rule_errors:
        return head.model_copy(update={"rules": validated})
    cut = next((i for i, err in enumerate(errors) if not err["loc"] or err["loc"][0] not in _BEFORE_RULES),
               len(errors))
    return [*errors[:cut], *rule_errors, *errors[cut:]]


def parsed_files(paths: typing.Sequence[str | Path]) -> list[tuple[str, YamlDocument, PolicyFile]]:
    """Each policy file of `paths` as `load_policy` reads it: its name, its YAML with lines, its validated
    model. For tools that need what the compiled `Policy` drops (which file and line holds an entry, what was
    left to its default); call it on paths `load_policy` accepted (files that do not parse are left out)."""
    out: list[tuple[str, YamlDocument, PolicyFile]] = []
    for f in policy_files(paths)[0]:
        try:
            src = _parse_file(str(f), f.read_bytes().decode("utf-8"), [])
        except (OSError, UnicodeDecodeError):
            continue
        if src is not None:
            out.append((src.file, src.doc, src.model))
    return out


# ---------------------------------------------------------------------------------------------------------
# Merge and compile


def _compile(
    sources: list[_Source], issues: list[PolicyIssue], revision: str, files: tuple[str, ...],
    pace: typing.Callable[[], None] | None = None,
) -> Policy | None:
    defaults_at: list[_Source] = [s for s in sources if s.model.defaults is not None]
    if not defaults_at:
        first = sources[0].file if sources else "<rules>"
        issues.append(PolicyIssue(first, None, "defaults.effect is required (add `defaults: {effect: deny}`)",
                                  "missing_defaults"))
        return None
    for extra in defaults_at[1:]:
        issues.append(extra.at(("defaults",), "duplicate_section",
                               f"`defaults` is already set in {defaults_at[0].file}:"
                               f"{defaults_at[0].doc.line_of(('defaults',))}"))
    audits = [s for s in sources if s.model.audit is not None]
    for extra in audits[1:]:
        issues.append(extra.at(("audit",), "duplicate_section", f"`audit` is already set in {audits[0].file}"))
    approval_blocks = [s for s in sources if s.model.approvals is not None]
    for extra in approval_blocks[1:]:
        issues.append(extra.at(("approvals",), "duplicate_section",
                               f"`approvals` is already set in {approval_blocks[0].file}"))
    normalize = _normalize_settings(sources, issues)
    defaults = defaults_at[0].model.defaults
    assert defaults is not None

    agents: dict[str, AgentSpec] = {}
    users: dict[str, UserSpec] = {}
    # Where each name was first defined; its FILE:LINE is only spelled out for a duplicate (a rule id's line
    # is three levels deep, which a valid policy never needs to look up: see yamlsource.SHALLOW_DEPTH).
    seen_at: dict[tuple[str, str], tuple[_Source, tuple[str | int, ...]]] = {}

    def first_time(kind: str, name: str, src: _Source, path: tuple[str | int, ...]) -> bool:
        first = seen_at.get((kind, name))
        if first is not None:
            where = f"{first[0].file}:{first[0].doc.line_of(first[1])}"
            issues.append(src.at(path, _DUPLICATE_CODES[kind],
                                 f"duplicate {kind} {name!r} (first defined at {where})"))
            return False
        seen_at[(kind, name)] = (src, path)
        return True

    for src in sources:
        for name, u in src.model.users.items():
            path = ("users", name)
            if problem := name_problem("user", name):
                issues.append(src.at(path, "bad_name", problem))
            elif first_time("user", name, src, path):
                users[name] = UserSpec(name, frozenset(u.roles), u.token_sha256)
        for name, a in src.model.agents.items():
            path = ("agents", name)
            if problem := name_problem("agent", name):
                issues.append(src.at(path, "bad_name", problem))
            elif first_time("agent", name, src, path):
                agents[name] = AgentSpec(name, frozenset(a.roles), a.token_sha256, a.status,
                                         a.mode or defaults.mode, a.owner, a.description)
    for src in sources:
        for name, a in src.model.agents.items():
            if a.owner is not None and a.owner not in users:
                issues.append(src.at(("agents", name, "owner"), "undefined_user",
                                     f"owner {a.owner!r} is not a defined user"))

    agent_roles = {r for a in agents.values() for r in a.roles}
    user_roles = {r for u in users.values() for r in u.roles} | {"approver", "admin"}
    rules: list[CompiledRule] = []
    shared: SharedBlocks = {}
    for src in sources:
        for i, rm in enumerate(src.model.rules):
            path: tuple[str | int, ...] = ("rules", i)
            if pace is not None:
                pace()
            if not first_time("rule id", rm.id, src, (*path, "id")):
                continue
            compiled = _compile_rule(rm, src, path, agents, agent_roles, users, user_roles, normalize.path_case,
                                     shared)
            if isinstance(compiled, CompiledRule):
                rules.append(compiled)
            else:
                found = [src.at((*path, *e.subpath), _problem_code(e), f"rule {rm.id}: {e.message}")
                         for e in compiled]
                issues.extend(sorted(found, key=lambda i: i.line or 0))

    budgets = _compile_budgets(sources, issues, agents, agent_roles, normalize.path_case, first_time, shared)
    guards = _compile_guards(sources, issues, agents, agent_roles, first_time)
    networks = []
    for src in sources:
        if src.model.network is None:
            continue
        for i, cidr in enumerate(src.model.network.allow_private):
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                issues.append(src.at(("network", "allow_private", i), "bad_cidr",
                                     f"{cidr!r} is not an IP network (like 127.0.0.0/8 or ::1/128)"))
    audit = AuditSettings()
    if audits:
        am = audits[0].model.audit
        assert am is not None
        for i, pattern in enumerate(am.redact_patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                issues.append(audits[0].at(("audit", "redact_patterns", i), "bad_regex", f"bad regex {pattern!r}: {e}"))
        audit = AuditSettings(
            max_body_bytes=am.max_body_bytes,
            redact_headers=tuple(h.lower() for h in am.redact_headers),
            redact_json_keys=tuple(am.redact_json_keys),
            redact_patterns=tuple(am.redact_patterns),
            on_failure=am.on_failure,
            retention_records=am.retention.records if am.retention else None,
            retention_bodies=am.retention.bodies if am.retention else None,
        )
    approvals = ApprovalSettings()
    if approval_blocks:
        block = approval_blocks[0].model.approvals
        assert block is not None
        hook = block.webhook
        approvals = ApprovalSettings(webhook_url=hook.url if hook else None,
                                     webhook_secret_env=hook.secret_env if hook else None,
                                     webhook_timeout=hook.timeout if hook else 5.0, link=block.link,
                                     max_open_per_minute=block.max_open_per_minute)
    while seen_at:  # 50,000 entries freed at once, when this returns, would hold the GIL for 10-20 ms
        seen_at.popitem()
        if pace is not None:
            pace()
    if issues:
        return None
    return Policy(default_effect=defaults.effect, default_mode=defaults.mode, agents=agents, users=users,
                  rules=rules, network_allow_private=tuple(networks), audit=audit, revision=revision,
                  sources=files, approvals=approvals, normalize=normalize, budgets=tuple(budgets),
                  guards=tuple(guards), pace=pace)


class _Problem(CompileError):
    """A problem the loader finds itself, with its code. The matchers' CompileErrors carry none: their code
    follows from where they sit (`_problem_code`)."""

    def __init__(self, code: str, message: str, subpath: tuple[str | int, ...] = ()) -> None:
        super().__init__(message, subpath)
        self.code = code


_DUPLICATE_CODES = {"user": "duplicate_user", "agent": "duplicate_agent", "rule id": "duplicate_rule",
                    "budget id": "duplicate_budget", "guard id": "duplicate_guard"}
# A `match`/`unless` key -> the code of a problem inside it (condition kinds take `bad_regex` for a regex).
_MATCH_CODES = {"host": "bad_host", "path": "bad_path", "method": "bad_method", "scheme": "bad_scheme",
                "port": "bad_port", "query": "bad_condition", "headers": "bad_condition", "json": "bad_condition",
                "llm": "bad_condition", "mcp": "bad_condition"}


def _problem_code(e: CompileError) -> str:
    """The code of a rule's, budget's or guard's compile problem.

    The loader's own problems are `_Problem`s. The rest come from the matchers through `_compile_match`, whose
    subpath is `(match | unless, [block], KEY, ...)`: KEY names the matcher. A condition's regex sits at
    `(KEY, field..., "regex")`, the operator last, so a field that happens to be called `regex` is not taken
    for one. `bad_value` is the fallback for a matcher problem with no recognizable place; every one found
    through `_compile_match` has one."""
    if isinstance(e, _Problem):
        return e.code
    rest = list(e.subpath)
    while rest and (rest[0] in ("match", "unless") or isinstance(rest[0], int)):
        rest.pop(0)
    if not rest or rest[0] not in _MATCH_CODES:
        return "bad_value"
    code = _MATCH_CODES[rest[0]]
    if code == "bad_condition" and len(rest) >= 3 and rest[-1] == "regex":
        return "bad_regex"
    return code


def _selector_problems(selectors: list[str], agents: dict[str, AgentSpec],
                       agent_roles: set[str]) -> list[CompileError]:
    """Rule, budget and guard `agents` lists name defined agents, roles some agent has, or `*`."""
    problems = []
    for j, sel in enumerate(selectors):
        sub = ("agents", j)
        if sel.startswith("role:"):
            if sel[5:] not in agent_roles:
                problems.append(_Problem("undefined_role", f"no agent has role {sel[5:]!r}", sub))
        elif sel != "*" and sel not in agents:
            close = difflib.get_close_matches(sel, list(agents), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(_Problem("undefined_agent", f"agent {sel!r} is not defined under `agents`{hint}", sub))
    return problems


def _compile_budgets(sources: list[_Source], issues: list[PolicyIssue], agents: dict[str, AgentSpec],
                     agent_roles: set[str], path_case: str, first_time: Any,
                     shared: SharedBlocks | None = None) -> list[CompiledBudget]:
    """Every `budgets:` entry of every file; ids are unique across files."""
    out: list[CompiledBudget] = []
    for src in sources:
        for i, bm in enumerate(src.model.budgets):
            path: tuple[str | int, ...] = ("budgets", i)
            if not first_time("budget id", bm.id, src, (*path, "id")):
                continue
            problems = _selector_problems(bm.agents, agents, agent_roles)
            matchers: list[Matcher] = []
            captures: frozenset[str] | None = None
            if bm.match is not None:
                try:
                    matchers, _, _, _, captures = _compile_match(bm.match, ("match",), path_case == "insensitive",
                                                                 path_case == "insensitive", shared)
                except CompileError as e:
                    problems.append(e)
            key = None
            try:
                key = compile_template(bm.key)
                missing = key.captures - (captures or frozenset())
                if missing:
                    raise CompileError(f"{{{sorted(missing)[0]}}} is not captured by this budget's `match.path`")
            except CompileError as e:
                problems.append(_Problem("bad_template", e.message, ("key",)))
            if problems or key is None:
                issues.extend(src.at((*path, *e.subpath), _problem_code(e), f"budget {bm.id}: {e.message}")
                              for e in problems)
                continue
            unit = "calls" if bm.limit.calls is not None else "tokens"
            out.append(CompiledBudget(
                id=bm.id, selectors=tuple(bm.agents), matchers=tuple(sorted(matchers, key=lambda m: m.cost)),
                key=key, unit=unit, limit=bm.limit.calls or bm.limit.tokens or 0, per=bm.limit.per,
                estimate=bm.estimate, source=f"{src.file}:{src.doc.line_of(path)}", model=bm))
    return out


def _compile_guards(sources: list[_Source], issues: list[PolicyIssue], agents: dict[str, AgentSpec],
                    agent_roles: set[str], first_time: Any) -> list[GuardSpec]:
    out: list[GuardSpec] = []
    for src in sources:
        for i, gm in enumerate(src.model.guards):
            path: tuple[str | int, ...] = ("guards", i)
            if not first_time("guard id", gm.id, src, (*path, "id")):
                continue
            problems = _selector_problems(gm.agents, agents, agent_roles)
            if problems:
                issues.extend(src.at((*path, *e.subpath), _problem_code(e), f"guard {gm.id}: {e.message}")
                              for e in problems)
                continue
            when = gm.when
            metric, limit = next((m, v) for m, v in (("denials", when.denials), ("errors", when.errors),
                                                     ("calls", when.calls)) if v is not None)
            out.append(GuardSpec(id=gm.id, selectors=tuple(gm.agents), metric=metric, limit=limit, per=when.per,
                                 action=gm.action, source=f"{src.file}:{src.doc.line_of(path)}"))
    return out


def _normalize_settings(sources: list[_Source], issues: list[PolicyIssue]) -> NormalizeSettings:
    """The one `normalize:` section (a second one is an error: it governs every rule of every file)."""
    blocks = [s for s in sources if s.model.normalize is not None]
    for extra in blocks[1:]:
        issues.append(extra.at(("normalize",), "duplicate_section",
                               f"`normalize` is already set in {blocks[0].file}:"
                               f"{blocks[0].doc.line_of(('normalize',))}"))
    if not blocks:
        return NormalizeSettings()
    nm = blocks[0].model.normalize
    assert nm is not None
    return NormalizeSettings(path_case=nm.path_case, escaped_slashes=nm.escaped_slashes, allow=frozenset(nm.allow))


def _path_folds(path_case: str, effect: str, exception: bool) -> bool:
    """Whether a rule's path patterns compare case-insensitively. `cautious` errs towards refusing both ways:
    a deny or hold rule's `match` folds (it catches /ADMIN on an upstream that folds case) and its `unless`
    does not; an allow rule's `match` does not fold (/PUBLIC may be another resource) and its `unless` does."""
    if path_case == "cautious":
        return (effect != "allow") != exception
    return path_case == "insensitive"


def _compile_rule(
    rm: RuleModel,
    src: _Source,
    path: tuple[str | int, ...],
    agents: dict[str, AgentSpec],
    agent_roles: set[str],
    users: dict[str, UserSpec],
    user_roles: set[str],
    path_case: str = "cautious",
    shared: SharedBlocks | None = None,
) -> CompiledRule | list[CompileError]:
    """One rule, compiled; or every problem found in it (so one `bastion check` run shows them all)."""
    problems: list[CompileError] = []
    fold_captures = path_case == "insensitive"

    def attempt(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except CompileError as e:
            problems.append(e)
            return None

    problems.extend(_selector_problems(rm.agents, agents, agent_roles))
    if rm.effect == "deny" and (rm.lock or rm.release):
        problems.append(_Problem("effect_conflict", "a deny rule cannot take or release a lock",
                                     ("lock" if rm.lock else "release",)))
    if rm.effect == "deny" and (rm.requires or rm.complete):
        problems.append(_Problem("effect_conflict", "a deny rule cannot require or complete a milestone",
                                     ("requires" if rm.requires else "complete",)))
    if rm.approval is not None and rm.effect != "hold":
        problems.append(_Problem("effect_conflict", "`approval` only belongs on a rule with effect: hold",
                                 ("approval",)))
    if rm.message is not None and rm.effect == "allow":
        problems.append(_Problem("effect_conflict",
                                 "`message` is shown to agents on refusals; an allow rule never shows it",
                                     ("message",)))

    hosts: tuple[Any, ...] = ()
    methods: frozenset[str] | None = None
    ports: frozenset[int] | None = None
    matchers: list[Matcher] = []
    captures: frozenset[str] | None = None
    if rm.match is not None:
        compiled = attempt(_compile_match, rm.match, ("match",), _path_folds(path_case, rm.effect, False),
                           fold_captures, shared)
        if compiled is not None:
            matchers, hosts, methods, ports, captures = compiled
    unless: list[UnlessBlock] = []
    blocks = rm.unless if isinstance(rm.unless, list) else [rm.unless] if rm.unless is not None else []
    for k, block in enumerate(blocks):
        sub = ("unless", k) if isinstance(rm.unless, list) else ("unless",)
        compiled = attempt(_compile_match, block, sub, _path_folds(path_case, rm.effect, True), fold_captures,
                           shared)
        if compiled is not None and not compiled[0]:
            problems.append(_Problem("empty_unless", "an empty `unless` block would exempt every request", sub))
        elif compiled is not None:
            unless.append(UnlessBlock(tuple(compiled[0])))
    match_ok = not any(e.subpath[:1] == ("match",) for e in problems)

    def template(text: str, sub: tuple[str | int, ...]) -> Template:
        try:
            tpl = compile_template(text)
        except CompileError as e:
            raise _Problem("bad_template", e.message, sub) from None
        missing = tpl.captures - (captures or frozenset())
        if missing and match_ok:
            name = sorted(missing)[0]
            raise _Problem("bad_template", f"{{{name}}} is not captured by this rule's `match.path` "
                           "(every path pattern must capture it)", sub)
        return tpl

    lock_tpl = attempt(template, rm.lock.key, ("lock", "key")) if rm.lock else None
    locks = ((lock_tpl, rm.lock.ttl),) if rm.lock and lock_tpl is not None else ()
    rel = [rm.release] if isinstance(rm.release, str) else rm.release or []
    releases = tuple(t for k, r in enumerate(rel) if (t := attempt(
        template, r, ("release", k) if isinstance(rm.release, list) else ("release",))) is not None)
    req = [rm.requires] if isinstance(rm.requires, str) else rm.requires or []
    requires = tuple(t for k, r in enumerate(req) if (t := attempt(
        template, r, ("requires", k) if isinstance(rm.requires, list) else ("requires",))) is not None)
    done = [rm.complete] if isinstance(rm.complete, CompleteModel) else rm.complete or []
    completes = tuple((t, c.ttl) for k, c in enumerate(done) if (t := attempt(
        template, c.key, ("complete", k, "key") if isinstance(rm.complete, list) else ("complete", "key")))
        is not None)
    approval = None
    if rm.effect == "hold":
        am = rm.approval or ApprovalModel()
        for j, sel in enumerate(am.approvers):
            sub = ("approval", "approvers", j)
            if sel.startswith("role:"):
                if sel[5:] not in user_roles:
                    problems.append(_Problem("undefined_approver", f"no user has role {sel[5:]!r}", sub))
            elif sel != "*" and sel not in users:
                problems.append(_Problem("undefined_approver", f"approver {sel!r} is not a defined user", sub))
        approval = ApprovalSpec((tuple(am.approvers),), am.wait, am.timeout, (rm.id,), am.required,
                                am.use_within, am.grants)
    if problems:
        return problems
    return CompiledRule(
        id=rm.id, effect=rm.effect, selectors=tuple(rm.agents), matchers=tuple(matchers),
        unless=tuple(unless), locks=locks, releases=releases, approval=approval, requires=requires,
        completes=completes, message=rm.message,
        source=f"{src.file}:{src.doc.line_of(path)}", spec=rm.model_dump_json(by_alias=True, exclude_none=True),
        description=rm.description,
        hosts=hosts, methods=methods, ports=ports,
    )


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


SharedBlocks = dict[tuple[Any, ...], tuple[Any, Matcher]]


def _shared_block(shared: SharedBlocks | None, kind: tuple[Any, ...], value: Any,
                  build: typing.Callable[[], tuple[Any, Matcher]]) -> tuple[Any, Matcher]:
    """`build()`, or what it returned for an earlier block of this load that spelled `value` the same way.

    Rules repeat hosts, methods and paths: 10,000 generated rules spell 2,238 distinct host lists, 25 method
    lists and 16 path lists (8 paths, each compiled folded and not). Compiling each spelling once, and
    sharing its immutable patterns and stateless matcher between the rules that spell it, takes compiling
    and indexing those rules from 0.34 s to 0.21 s, and the matcher objects the policy keeps (which every
    full garbage collection walks) from 35,000 to 6,600. The key is the exact text and the case folding
    the patterns are compiled with, so `API.example.com` and `api.example.com`, or a path folded for a deny
    rule and kept exact for an allow rule, stay separate (their explanations quote their own spelling).
    `GET` and `[GET]` share: they compile alike. Only successes are kept: a bad value fails again, with the
    path of the rule that holds it."""
    if shared is None:
        return build()
    if type(value) is str:
        key = (*kind, value)
    elif type(value) is list and all(type(item) is str for item in value):
        key = (*kind, *value)
    else:
        return build()
    found = shared.get(key)
    if found is None:
        found = shared[key] = build()
    return found


def _compile_match(
    m: MatchModel, base: tuple[str | int, ...], fold: bool = False, fold_captures: bool = False,
    shared: SharedBlocks | None = None,
) -> tuple[list[Matcher], tuple[Any, ...], frozenset[str] | None, frozenset[int] | None, frozenset[str] | None]:
    """One `match:` (or `unless:`) block -> matchers sorted cheapest first, plus index keys. `shared`: the
    blocks compiled so far in this load (see `_shared_block`)."""

    def sub(key: str, i: int | None = None, rest: tuple[str | int, ...] = ()) -> tuple[str | int, ...]:
        return (*base, key, *(() if i is None else (i,)), *rest)

    def each(key: str, value: Any, fn: Any) -> list[Any]:
        items = _as_list(value)
        if not items:
            raise CompileError(f"`{key}` is an empty list", sub(key))
        out = []
        for i, item in enumerate(items):
            try:
                out.append(fn(item))
            except CompileError as e:
                raise CompileError(e.message, sub(key, i if isinstance(value, list) else None)) from None
        return out

    def host_block() -> tuple[Any, Matcher]:
        hosts = tuple(each("host", m.host, compile_host))
        return hosts, HostMatcher(hosts)

    def method_block() -> tuple[Any, Matcher]:
        methods = frozenset(each("method", m.method, _method))
        return methods, build_set_matcher("method", methods)

    def path_block() -> tuple[Any, Matcher]:
        patterns = tuple(each("path", m.path, lambda text: compile_path(text, fold)))
        return frozenset.intersection(*(p.captures for p in patterns)), PathMatcher(patterns, fold, fold_captures)

    matchers: list[Matcher] = []
    hosts: tuple[Any, ...] = ()
    methods = ports = captures = None
    if m.host is not None:
        hosts, matcher = _shared_block(shared, ("host",), m.host, host_block)
        matchers.append(matcher)
    if m.method is not None:
        methods, matcher = _shared_block(shared, ("method",), m.method, method_block)
        matchers.append(matcher)
    if m.scheme is not None:
        matchers.append(build_set_matcher("scheme", frozenset(each("scheme", m.scheme, _scheme))))
    if m.port is not None:
        ports = frozenset(each("port", m.port, _port))
        matchers.append(build_set_matcher("port", ports))
    if m.path is not None:
        captures, matcher = _shared_block(shared, ("path", fold, fold_captures), m.path, path_block)
        matchers.append(matcher)
    for kind, spec in (("query", m.query), ("headers", m.headers), ("json", m.json_)):
        if spec is None:
            continue
        try:
            matchers.append(compile_fields(kind, spec))
        except CompileError as e:
            raise CompileError(e.message, sub(kind, None, e.subpath)) from None
    for kind, model, compile_call in (("llm", m.llm, compile_llm), ("mcp", m.mcp, compile_mcp)):
        if model is None:
            continue
        try:
            matchers.append(compile_call({key: getattr(model, key) for key in model.model_fields_set}))
        except CompileError as e:
            raise CompileError(e.message, sub(kind, None, e.subpath)) from None
    matchers.sort(key=lambda x: x.cost)
    return matchers, hosts, methods, ports, captures


def _method(v: Any) -> str:
    if not isinstance(v, str) or not v or not set(v.upper()) <= _METHOD_CHARS:
        raise CompileError(f"bad HTTP method {v!r}")
    return v.upper()


def _scheme(v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in _SCHEMES:
        raise CompileError(f"scheme must be one of {sorted(_SCHEMES)}, got {v!r}")
    return v.lower()


def _port(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
        raise CompileError(f"bad port {v!r}")
    return v
