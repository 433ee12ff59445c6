"""`bastion diff OLD NEW`: what changed between two policies in meaning, not in text.

Why semantic: a text diff of rules files answers the wrong question. Reordering keys, switching a rule to flow
style, editing comments, moving a rule to another file of a directory policy, or writing `method: GET` for
`method: [GET]` all change the text and not one decision, while a reviewer approving a policy change needs to
see exactly the decisions that change, and nothing else. So each side is loaded and validated as the proxy
loads it, turned into a canonical plain-data view merged across its files (every default filled in, so a
default written out equals one left out; "any of" lists sorted; hosts, methods and paths normalized as the
compiler normalizes them; durations in one spelling), and the two views are compared entry by entry: agents
and users by name, rules, budgets and guards by id, `defaults` and the other top-level sections key by key.

Rule order is never reported: a decision is the strongest effect among all matching rules (deny > hold >
allow), and every matching budget and guard applies, so no reordering changes a decision. File names and
lines are not compared either (they only say where an entry lives); they are shown next to entries so authors
can jump to them. Descriptions and owners are compared: they decide nothing, but people act on them. Token
hashes are never shown: a token appears as "set" or null.

Canonical forms, as found in `value` and in field changes:

- durations are strings like `500ms`, `15m`, `1h30m`, `7d`; whole numbers are integers (`5000.0` is `5000`);
- rule, budget and guard `agents`, approval `approvers`, roles, `host`, `method`, `scheme`, `port`, `path`,
  `unless` blocks, `release`, `requires`, `complete`, `network.allow_private`, `audit.redact_headers`,
  `audit.redact_json_keys` and `normalize.allow` are sorted lists without duplicates (a single value is a
  one-element list; a list holding `*` is `[*]`; an empty `release`, `requires`, `complete` or `unless` is left
  out, as it means nothing); `audit.redact_patterns` keeps its order (it names the masks `custom-N`);
- `match` is always a mapping (no `match` matches every request, as `match: {}` does): hosts are lower-case,
  IDNA and without a trailing dot, methods upper-case, schemes lower-case, paths without empty segments,
  header names lower-case; a condition `{eq: X}` or `{in: [X]}` is written `X`, `in`/`not_in` lists are
  sorted; `llm`/`mcp` lists (any of) are `{in: [...]}`;
- a `hold` rule without `approval` gets the default approval, as the compiler gives it;
- an agent's `mode` is its effective mode (its own, else `defaults.mode`); an agent that takes
  `defaults.mode` in both policies is not reported for a `defaults.mode` change (that is reported once, under
  `defaults`).

Text (`--format text`): `--- OLD (revision …)` and `+++ NEW (revision …)`, then by section one line per
entry added or removed and per field changed (`+ rule ID (FILE:LINE)`, `- agent NAME (FILE:LINE)`,
`~ rule ID (FILE:LINE): effect allow → hold`, `~ agent NAME (FILE:LINE): token changed`,
`~ audit.max_body_bytes: 1048576 → 2048`), then a line counting the changes, or `no semantic changes`.

JSON shape (`--format json`); ids, names and fields are sorted:

    {
      "changed": bool,                       # any semantic change
      "count": int,                          # entries added, removed or changed + settings changed
      "old": {"paths": [str], "revision": str, "files": [str]},
      "new": {"paths": [str], "revision": str, "files": [str]},
      "defaults": {FIELD: CHANGE},           # e.g. {"mode": {"old": "report", "new": "enforce"}}
      "agents": COLLECTION, "users": COLLECTION, "rules": COLLECTION,
      "budgets": COLLECTION, "guards": COLLECTION,
      "sections": {SECTION: {FIELD: CHANGE}} # approvals, audit, network, normalize: changed ones only
    }
    COLLECTION = {
      "added":   {ID: {"source": "FILE:LINE", "value": VIEW}},        # source in NEW
      "removed": {ID: {"source": "FILE:LINE", "value": VIEW}},        # source in OLD
      "changed": {ID: {"source": "FILE:LINE", "fields": {FIELD: CHANGE}}}  # source in NEW
    }
    CHANGE = {"old": VALUE, "new": VALUE}    # null: absent on that side

ID is the agent or user name, or the rule, budget or guard id. VIEW is the entry's canonical view (the forms
above; `id` left out, `token_sha256` as `token`). FIELD is a dotted path into it (`effect`, `match.method`,
`approval.wait`, `retention.records`); lists are compared and shown whole.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, BeforeValidator

from bastion.policy.engine import Policy
from bastion.policy.load import load_policy, parsed_files
from bastion.policy.matchers import CompileError, compile_host
from bastion.policy.schema import (
    AgentModel,
    ApprovalModel,
    ApprovalsModel,
    AuditModel,
    BudgetModel,
    GuardModel,
    MatchModel,
    NormalizeModel,
    PolicyFile,
    RuleModel,
    UserModel,
    parse_duration,
)
from bastion.policy.yamlsource import YamlDocument

ParsedFile = tuple[str, YamlDocument, PolicyFile]

COLLECTIONS = ("agents", "users", "rules", "budgets", "guards")
_SINGULAR = {"agents": "agent", "users": "user", "rules": "rule", "budgets": "budget", "guards": "guard"}
SECTIONS = ("approvals", "audit", "network", "normalize")
_TOKEN = "token"  # noqa: S105  (a field name: the hash itself is never shown)


# ---------------------------------------------------------------------------------------------------------
# The canonical view of one policy


@dataclass(frozen=True)
class PolicyView:
    """One policy as canonical plain data. Entries of `agents` ... `guards` map a name or id to its view;
    `sources` maps (collection, id) to `FILE:LINE`; `inherited_mode` names the agents without their own
    `mode` (they take `defaults.mode`)."""

    paths: tuple[str, ...]
    revision: str
    files: tuple[str, ...]
    defaults: dict[str, Any]
    agents: dict[str, dict[str, Any]]
    users: dict[str, dict[str, Any]]
    rules: dict[str, dict[str, Any]]
    budgets: dict[str, dict[str, Any]]
    guards: dict[str, dict[str, Any]]
    sections: dict[str, dict[str, Any]]
    sources: dict[tuple[str, str], str] = field(default_factory=dict)
    inherited_mode: frozenset[str] = frozenset()

    def collection(self, name: str) -> dict[str, dict[str, Any]]:
        return typing.cast(dict[str, dict[str, Any]], getattr(self, name))


def load_view(paths: Sequence[str | Path]) -> PolicyView:
    """Load and validate `paths` like `bastion check`, then build the view. Raises `PolicyLoadError`."""
    return policy_view(load_policy(paths), parsed_files(paths), paths)


def policy_view(policy: Policy, files: Sequence[ParsedFile], paths: Sequence[str | Path] = ()) -> PolicyView:
    """The canonical view of a validated policy from its parsed files (`load.parsed_files`), merged as
    `load_policy` merges them: agents, users, rules, budgets, guards and network allowances from every file,
    each other section from the one file that sets it (its defaults when none does)."""
    models = [m for _, _, m in files]
    defaults = next((m.defaults for m in models if m.defaults is not None), None)
    default_mode = defaults.mode if defaults is not None else policy.default_mode
    sources: dict[tuple[str, str], str] = {}
    agents: dict[str, dict[str, Any]] = {}
    users: dict[str, dict[str, Any]] = {}
    rules: dict[str, dict[str, Any]] = {}
    budgets: dict[str, dict[str, Any]] = {}
    guards: dict[str, dict[str, Any]] = {}
    inherited: set[str] = set()
    for name, doc, m in files:
        def where(*path: str | int, name: str = name, doc: YamlDocument = doc) -> str:
            return f"{name}:{doc.line_of(path)}"

        for agent, am in m.agents.items():
            agents.setdefault(agent, _agent(am, default_mode))
            sources.setdefault(("agents", agent), where("agents", agent))
            if am.mode is None:
                inherited.add(agent)
        for user, um in m.users.items():
            users.setdefault(user, _user(um))
            sources.setdefault(("users", user), where("users", user))
        for kind, entries, view, table in (("rules", m.rules, _rule, rules), ("budgets", m.budgets, _budget, budgets),
                                           ("guards", m.guards, _guard, guards)):
            for i, entry in enumerate(entries):
                table.setdefault(entry.id, view(entry))
                sources.setdefault((kind, entry.id), where(kind, i))
    sections = {
        "approvals": _plain(_first(models, "approvals") or ApprovalsModel()),
        "audit": _audit(_first(models, "audit") or AuditModel()),
        "network": {"allow_private": _networks(cidr for m in models if m.network for cidr in m.network.allow_private)},
        "normalize": _normalize(_first(models, "normalize") or NormalizeModel()),
    }
    known = {"version", "defaults", *COLLECTIONS, *SECTIONS}
    for extra in PolicyFile.model_fields:  # a section this module does not know yet still shows its changes
        if extra not in known:
            found = [getattr(m, extra) for m in models if getattr(m, extra)]
            merged = [x for v in found for x in v] if found and isinstance(found[0], list) else found[:1]
            sections[extra] = {"value": _plain(merged)}
    return PolicyView(
        paths=tuple(str(p) for p in paths), revision=policy.revision, files=tuple(policy.sources),
        defaults=_plain(defaults) if defaults is not None else {"effect": policy.default_effect,
                                                                 "mode": policy.default_mode},
        agents=_sorted(agents), users=_sorted(users), rules=_sorted(rules), budgets=_sorted(budgets),
        guards=_sorted(guards), sections=sections, sources=sources, inherited_mode=frozenset(inherited),
    )


def _first(models: Iterable[PolicyFile], name: str) -> Any:
    return next((v for m in models if (v := getattr(m, name)) is not None), None)


def _sorted(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return dict(sorted(table.items()))


def _agent(am: AgentModel, default_mode: str) -> dict[str, Any]:
    v = _plain(am)
    v["roles"] = _set(am.roles)
    v["mode"] = am.mode or default_mode
    if "token_sha256" in v:
        v[_TOKEN] = v.pop("token_sha256")
    return v


def _user(um: UserModel) -> dict[str, Any]:
    v = _plain(um)
    v["roles"] = _set(um.roles)
    if "token_sha256" in v:
        v[_TOKEN] = v.pop("token_sha256")
    return v


def _rule(rm: RuleModel) -> dict[str, Any]:
    v = _plain(rm)
    del v["id"]
    v["agents"] = _selectors(rm.agents)
    v["match"] = _match(rm.match)
    for key, value in (("unless", [_match(b) for b in _listed(rm.unless)]), ("release", _listed(rm.release)),
                       ("requires", _listed(rm.requires)), ("complete", [_plain(c) for c in _listed(rm.complete)])):
        if value:
            v[key] = _set(value)
        else:
            v.pop(key, None)
    if rm.effect == "hold":  # the compiler gives a hold rule without `approval` the default one
        v["approval"] = _approval(rm.approval or ApprovalModel())
    return v


def _approval(am: ApprovalModel) -> dict[str, Any]:
    v = _plain(am)
    v["approvers"] = _selectors(am.approvers)
    return v


def _budget(bm: BudgetModel) -> dict[str, Any]:
    v = _plain(bm)
    del v["id"]
    v["agents"] = _selectors(bm.agents)
    v["match"] = _match(bm.match)
    return v


def _guard(gm: GuardModel) -> dict[str, Any]:
    v = _plain(gm)
    del v["id"]
    v["agents"] = _selectors(gm.agents)
    return v


def _audit(am: AuditModel) -> dict[str, Any]:
    v = _plain(am)
    v["redact_headers"] = _set(h.strip().lower() for h in am.redact_headers)  # as the redactor reads them
    v["redact_json_keys"] = _set(k.strip().lower() for k in am.redact_json_keys)
    if not v.get("retention"):
        v.pop("retention", None)
    return v


def _normalize(nm: NormalizeModel) -> dict[str, Any]:
    v = _plain(nm)
    v["allow"] = _set(nm.allow)
    return v


def _networks(cidrs: Iterable[str]) -> list[str]:
    """`127.0.0.1` and `127.0.0.1/32` are one network, as the loader reads them."""
    def network(cidr: str) -> str:
        try:
            return str(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            return cidr  # unreachable on a validated policy

    return _set(map(network, cidrs))


def _selectors(selectors: Iterable[str]) -> list[str]:
    """Agent and approver selectors mean "any of", so `*` among them is all of them."""
    found = _set(selectors)
    return ["*"] if "*" in found else found


def _match(m: MatchModel | None) -> dict[str, Any]:
    """One `match` or `unless` block, normalized as `load._compile_match` reads it."""
    if m is None:
        return {}
    v = _plain(m)
    if m.host is not None:
        v["host"] = _set(_host(h) for h in _listed(m.host))
    if m.port is not None:
        v["port"] = _set(_listed(m.port))
    if m.scheme is not None:
        v["scheme"] = _set(s.lower() for s in _listed(m.scheme))
    if m.method is not None:
        v["method"] = _set(s.upper() for s in _listed(m.method))
    if m.path is not None:
        v["path"] = _set("/" + "/".join(s for s in p.split("/") if s) for p in _listed(m.path))
    for key, spec in (("query", m.query), ("json", m.json_)):
        if spec is not None:
            v[key] = {str(k): _condition(c) for k, c in sorted(spec.items(), key=lambda kv: str(kv[0]))}
    if m.headers is not None:
        names = {str(k).lower() for k in m.headers}
        fold = len(names) == len(m.headers)  # header names ignore case (two spellings of one name: kept apart)
        v["headers"] = {(str(k).lower() if fold else str(k)): _condition(c)
                        for k, c in sorted(m.headers.items(), key=lambda kv: str(kv[0]).lower())}
    for key, model in (("llm", m.llm), ("mcp", m.mcp)):
        if model is None:
            continue
        call: dict[str, Any] = {}
        for name in sorted(type(model).model_fields):
            spec = getattr(model, name)
            if spec is None:
                continue  # the compiler skips a condition given as null
            if name == "args":
                call[name] = {str(k): _condition(c) for k, c in sorted(spec.items(), key=lambda kv: str(kv[0]))}
            else:
                call[name] = _condition(spec, list_is_any=True)
        v[key] = call
    return v


def _host(text: str) -> str:
    try:
        pattern = compile_host(text)
    except CompileError:
        return text  # unreachable on a validated policy
    return pattern.exact if pattern.exact is not None else f"*.{pattern.suffix}"


def _condition(spec: Any, list_is_any: bool = False) -> Any:
    """A scalar (equality) or an operator map; `{eq: X}` and `{in: [X]}` are written X, as they mean X."""
    if list_is_any and isinstance(spec, list):
        spec = {"in": spec}
    if not isinstance(spec, dict):
        return _number(spec)
    ops: dict[str, Any] = {}
    for op, target in sorted(spec.items(), key=lambda kv: str(kv[0])):
        ops[str(op)] = _set(map(_number, target)) if op in ("in", "not_in") and isinstance(target, list) \
            else _number(target)
    if len(ops) == 1:
        ((op, target),) = ops.items()
        if op == "eq":
            return target
        if op == "in" and isinstance(target, list) and len(target) == 1:
            return target[0]
    return ops


def _number(value: Any) -> Any:
    """Rules compare numbers as numbers, so 5000 and 5000.0 are one value."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _key(value: Any) -> str:
    """A comparison key that tells true from 1 (rules do) and ignores mapping order (rules do too)."""
    return json.dumps(value, sort_keys=True, default=repr)


def _set(values: Iterable[Any]) -> list[Any]:
    """An "any of" list: sorted, without duplicates."""
    return [v for _, v in sorted({_key(_number(v)): _number(v) for v in values}.items())]


def _plain(value: Any) -> Any:
    """A model as plain data with every field, defaults included (so a default written out equals one left
    out), None left out, keys by their YAML names and durations in canonical form."""
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name, info in type(value).model_fields.items():
            item = getattr(value, name)
            if item is None:
                continue
            if isinstance(item, float) and _is_duration(type(value), name):
                out[info.alias or name] = format_duration(item)
            else:
                out[info.alias or name] = _plain(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return _number(value)


@functools.cache
def _is_duration(model: type[BaseModel], name: str) -> bool:
    info = model.model_fields[name]
    return any(_duration_meta(m) for m in info.metadata) or _annotated_duration(info.annotation)


def _duration_meta(meta: Any) -> bool:
    return isinstance(meta, BeforeValidator) and meta.func is parse_duration


def _annotated_duration(annotation: Any) -> bool:
    if any(_duration_meta(m) for m in getattr(annotation, "__metadata__", ())):
        return True
    return any(_annotated_duration(a) for a in typing.get_args(annotation))


_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def format_duration(seconds: float) -> str:
    """One spelling per duration, in the rules' own syntax: 900 -> `15m`, 5400 -> `1h30m`, 0.5 -> `500ms`."""
    ms = round(seconds * 1000)
    if ms <= 0 or abs(ms - seconds * 1000) > 1e-6:
        return f"{seconds!r}s"
    parts = []
    for unit, size in _UNITS:
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------
# The diff


Change = dict[str, Any]  # {"old": ..., "new": ...}


@dataclass(frozen=True)
class CollectionDiff:
    """Entries of one collection (agents, users, rules, budgets, guards) by name or id."""

    added: dict[str, dict[str, Any]]  # id -> {"source", "value"}
    removed: dict[str, dict[str, Any]]
    changed: dict[str, dict[str, Any]]  # id -> {"source", "fields": {FIELD: CHANGE}}

    @property
    def count(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)

    def to_json(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}


@dataclass(frozen=True)
class PolicyDiff:
    old: PolicyView
    new: PolicyView
    defaults: dict[str, Change]
    collections: dict[str, CollectionDiff]
    sections: dict[str, dict[str, Change]]  # changed sections only

    @property
    def count(self) -> int:
        return (len(self.defaults) + sum(c.count for c in self.collections.values())
                + sum(len(f) for f in self.sections.values()))

    @property
    def changed(self) -> bool:
        return self.count > 0

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape (module docstring)."""
        def side(v: PolicyView) -> dict[str, Any]:
            return {"paths": list(v.paths), "revision": v.revision, "files": list(v.files)}

        return {"changed": self.changed, "count": self.count, "old": side(self.old), "new": side(self.new),
                "defaults": self.defaults, **{k: c.to_json() for k, c in self.collections.items()},
                "sections": self.sections}


def diff_views(old: PolicyView, new: PolicyView) -> PolicyDiff:
    """Everything that differs in meaning between two policy views."""
    collections = {}
    for kind in COLLECTIONS:
        before, after = old.collection(kind), new.collection(kind)
        added = {k: {"source": new.sources.get((kind, k)), "value": _redact(after[k])}
                 for k in after if k not in before}
        removed = {k: {"source": old.sources.get((kind, k)), "value": _redact(before[k])}
                   for k in before if k not in after}
        changed = {}
        for k in after:
            if k not in before:
                continue
            fields = field_changes(before[k], after[k])
            if kind == "agents" and k in old.inherited_mode and k in new.inherited_mode:
                fields.pop("mode", None)  # follows defaults.mode, reported there
            if fields:
                changed[k] = {"source": new.sources.get((kind, k)), "fields": _redact_changes(fields)}
        collections[kind] = CollectionDiff(added, removed, changed)
    sections = {}
    for name in sorted(set(old.sections) | set(new.sections)):
        fields = field_changes(old.sections.get(name, {}), new.sections.get(name, {}))
        if fields:
            sections[name] = fields
    return PolicyDiff(old, new, field_changes(old.defaults, new.defaults), collections, sections)


def field_changes(old: Any, new: Any, prefix: str = "") -> dict[str, Change]:
    """Dotted path -> {"old", "new"} for every difference. Mappings are walked key by key; any other value
    (lists included) is compared whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, Change] = {}
        for k in sorted(set(old) | set(new)):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out[path] = {"old": old.get(k), "new": new.get(k)}
            else:
                out.update(field_changes(old[k], new[k], path))
        return out
    return {} if _key(old) == _key(new) else {prefix: {"old": old, "new": new}}


def _redact(view: dict[str, Any]) -> dict[str, Any]:
    return {k: ("set" if k == _TOKEN and v is not None else v) for k, v in view.items()}


def _redact_changes(fields: dict[str, Change]) -> dict[str, Change]:
    out = dict(fields)
    if _TOKEN in out:
        out[_TOKEN] = {side: None if v is None else "set" for side, v in out[_TOKEN].items()}
    return out


# ---------------------------------------------------------------------------------------------------------
# Text


_PLAIN_TEXT = re.compile(r"^[\w.:/@*{}+\-^$]+$")


def show(value: Any) -> str:
    """A value in YAML flow style, quoted only where needed: `[GET, POST]`, `{gt: 5000}`, `"a message"`."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if _PLAIN_TEXT.match(value) and value not in ("true", "false", "null") else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(show, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(_number(value))


def render_text(diff: PolicyDiff) -> list[str]:
    """The readable summary: one line per added or removed entry and per changed field, grouped by section,
    then a line counting the changes."""
    def label(v: PolicyView) -> str:
        return f"{', '.join(v.paths) or ', '.join(v.files)} (revision {v.revision[:12]})"

    lines = [f"--- {label(diff.old)}", f"+++ {label(diff.new)}"]
    tally: list[str] = []

    def group(title: str, entries: list[str], counts: str) -> None:
        if entries:
            lines.append(f"{title}:")
            lines.extend(f"  {e}" for e in entries)
            tally.append(f"{title} {counts}")

    group("defaults", [f"~ defaults.{p}: {_change(c)}" for p, c in diff.defaults.items()],
          f"~{len(diff.defaults)}")
    for kind, c in diff.collections.items():
        what = _SINGULAR[kind]
        entries = [f"+ {what} {k} ({v['source']})" for k, v in c.added.items()]
        entries += [f"- {what} {k} ({v['source']})" for k, v in c.removed.items()]
        for k, v in c.changed.items():
            entries += [f"~ {what} {k} ({v['source']}): {_field_line(p, ch)}" for p, ch in v["fields"].items()]
        counts = " ".join(f"{sign}{n}" for sign, n in (("+", len(c.added)), ("-", len(c.removed)),
                                                       ("~", len(c.changed))) if n)
        group(kind, entries, counts)
    for name, fields in diff.sections.items():
        group(name, [f"~ {name}.{p}: {_change(c)}" for p, c in fields.items()], f"~{len(fields)}")
    if not diff.changed:
        same = diff.old.revision == diff.new.revision
        lines.append("no semantic changes" + ("" if same else " (the files differ in form only)"))
    else:
        lines.append(f"{diff.count} change{'s' if diff.count != 1 else ''} ({'; '.join(tally)})")
    return lines


def _change(c: Change) -> str:
    return f"{show(c['old'])} → {show(c['new'])}"


def _field_line(path: str, c: Change) -> str:
    if path == _TOKEN:
        return "token " + ("added" if c["old"] is None else "removed" if c["new"] is None else "changed")
    return f"{path} {_change(c)}"


__all__ = ["CollectionDiff", "PolicyDiff", "PolicyView", "diff_views", "field_changes", "format_duration",
           "load_view", "policy_view", "render_text", "show"]
