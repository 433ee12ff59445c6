"""The fast paths of policy loading give exactly what the plain ones give.

- The plain YAML reader (events -> data, shallow lines) against the node reader (node tree -> data, every line).
- Rules validated in chunks against the whole file validated at once: same model, same errors in the same order.
- Hosts, methods and paths compiled once per spelling and shared between rules: rules that spell them
  differently (case, folding) still behave, and explain themselves, independently.
- Pacing: off on the main thread, a yield per slice on a worker thread, and the same policy either way.
"""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

import pydantic
import pytest
from policyhelp import decide, policy_from

from bastion.policy import load as loadmod
from bastion.policy import pacing
from bastion.policy.facts import RequestFacts
from bastion.policy.load import PolicyLoadError, load_policy
from bastion.policy.schema import PolicyFile
from bastion.policy.yamlsource import SHALLOW_DEPTH, _read_nodes, _read_plain, parse_yaml

# ---------------------------------------------------------------------------------------------------------
# YAML: the plain reader against the node reader

PLAIN = {
    "nested": """
        version: 1
        rules:
          - id: a
            match: {host: api.example.com, method: [GET, post], json: {amount: {gt: 10}}}
          - id: b
            unless:
              - path: /x/*
              - {query: {q: {in: [1, "2", 3.5]}}}
        agents: {bot: {roles: [x, y]}, other: {}}
    """,
    "scalars": """
        bools: [yes, no, on, off, true, False, Y, n]
        nulls: [~, null, Null, "null"]
        empty_value:
        ints: [0, -7, 0x1f, 0o17, 017, 1_000, 190:20:30, "12"]
        floats: [1.5, -.5, .inf, -.Inf, .nan, 1e3, 6.8523015e+5, 190:20:30.15]
        dates: [2024-01-02, 2024-01-02T03:04:05Z, 2001-12-14 21:59:43.10 -5]
        strings: ['single', "double\\tescaped", plain text, "yes", '1.0', ! 12, ! yes]
        block: |
          two
          lines
        folded: >
          one
          line
        empty_map: {}
        empty_list: []
    """,
    "odd_keys": """
        1: int key
        true: bool key
        ~: null key
        1.5: float key
        2024-01-02: date key
        "quoted": q
        ? explicit
        : value
    """,
    "document_markers": """
        %YAML 1.1
        ---
        a: [1, {b: c}]
        ...
    """,
    "scalar_root": "just text\n",
    "list_root": "- a\n- {b: 1}\n- [c, [d]]\n",
    "flow_only": "{version: 1, rules: [{id: a, effect: allow, agents: ['*']}]}\n",
    "unicode": "name: \"caf\\u00e9\"\nother: 日本語\nemoji: '🙂'\n",
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_reader_reads_what_the_node_reader_reads(name: str) -> None:
    text = textwrap.dedent(PLAIN[name])
    plain, nodes = _read_plain(text, SHALLOW_DEPTH), _read_nodes(text)
    assert plain is not None, "the plain reader declined a plain document"
    assert not nodes.issues
    assert plain.data == nodes.data and repr(plain.data) == repr(nodes.data)  # repr: 1 vs 1.0 vs True
    assert plain.lines == {p: n for p, n in nodes.lines.items() if len(p) <= SHALLOW_DEPTH}
    full = _read_plain(text, None)
    assert full is not None and full.lines == nodes.lines and full.text is None


DECLINED = {
    "anchor_alias": "a: &x {b: 1}\nc: *x\n",
    "scalar_anchor": "a: &x 1\nb: *x\n",
    "merge_key": "base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n",
    "explicit_tags": "a: !!str 12\nb: !!int '7'\nc: !!binary aGk=\n",
    "unknown_tag": "a: !custom 1\n",
    "duplicate_key": "a: 1\nb: 2\na: 3\n",
    "duplicate_after_str": "1: a\n'1': b\n",
    "collection_key": "? [a, b]\n: 1\n",
    "equals_key": "=: 1\n",
    "two_documents": "a: 1\n---\nb: 2\n",
    "syntax_error": "a: [1, 2\nb: 3\n",
    "bad_indent": "- a\nb: 1\n",
    "value_tag_scalar": "a: =\n",
    "empty": "",
    "comment_only": "# nothing here\n",
}


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_documents_the_plain_reader_declines_read_as_before(name: str) -> None:
    text = DECLINED[name]
    got, nodes = parse_yaml(text), _read_nodes(text)
    assert (got.data, got.lines, got.issues, got.text) == (nodes.data, nodes.lines, nodes.issues, None)


def test_values_pyyaml_cannot_construct_raise_as_before() -> None:
    text = "a: 2024-13-45\n"  # a timestamp by its shape, not a date
    with pytest.raises(ValueError) as plain:
        parse_yaml(text)
    with pytest.raises(ValueError) as nodes:
        _read_nodes(text)
    assert str(plain.value) == str(nodes.value)


def test_deep_lines_are_read_on_first_need() -> None:
    text = "version: 1\nrules:\n  - id: a\n    match:\n      host: x.example.com\n      path: /v1\n"
    doc = parse_yaml(text)
    assert doc.text is not None and ("rules", 0, "match") not in doc.lines
    assert doc.line_of(("rules", 0)) == 3 and doc.text is not None  # shallow: no re-read
    assert doc.line_of(("rules", 0, "match", "path")) == 6
    assert doc.line_of(("rules", 0, "match", "path", "deeper")) == 6
    assert doc.line_of(("rules", 0, "nope")) == 3
    assert doc.text is None and doc.lines == _read_nodes(text).lines


# ---------------------------------------------------------------------------------------------------------
# Validation in chunks

def _rule(i: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"r{i}", "effect": "allow", "agents": ["*"], "match": {"host": f"h{i}.example.com"}, **extra}


def _errors(data: dict[str, Any]) -> list[Any]:
    with pytest.raises(pydantic.ValidationError) as e:
        PolicyFile.model_validate(data)
    return list(e.value.errors())


def test_chunked_validation_builds_the_same_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadmod, "VALIDATE_CHUNK", 3)
    data = {"version": 1, "defaults": {"effect": "deny"}, "agents": {"a": {}},
            "rules": [_rule(i) for i in range(10)], "budgets": [{"id": "b", "limit": {"calls": 1, "per": "1h"}}]}
    paced: list[int] = []
    got = loadmod._validate(data, lambda: paced.append(1))
    whole = PolicyFile.model_validate(data)
    assert isinstance(got, PolicyFile) and got == whole
    assert got.model_fields_set == whole.model_fields_set
    assert [r.model_fields_set for r in got.rules] == [r.model_fields_set for r in whole.rules]
    assert len(paced) == 4  # once per chunk


@pytest.mark.parametrize("extra_first", [True, False])
def test_chunked_validation_reports_the_same_errors_in_the_same_order(monkeypatch: pytest.MonkeyPatch,
                                                                      extra_first: bool) -> None:
    monkeypatch.setattr(loadmod, "VALIDATE_CHUNK", 2)
    rules: list[Any] = [_rule(i) for i in range(9)]
    rules[0] = _rule(0, effect="maybe")
    rules[2] = _rule(2, bogus=1)
    rules[3] = "not a rule"
    rules[8] = {"effect": "deny"}
    data: dict[str, Any] = {"zzz": 1} if extra_first else {}
    data |= {"version": 2, "defaults": {"effect": "deny", "x": 1}, "agents": {"a": {"roles": "r"}},
             "users": {"u": {"roles": 5}}, "rules": rules, "budgets": [{"id": "b", "limit": {}}],
             "audit": {"bogus": 1}, "yyy": 2}
    assert loadmod._validate(data) == _errors(data)
    only_rules = {"version": 1, "rules": rules}
    assert loadmod._validate(only_rules) == _errors(only_rules)
    not_a_list = {"version": 1, "rules": {"a": 1}, "nope": 1}
    assert loadmod._validate(not_a_list) == _errors(not_a_list)


# ---------------------------------------------------------------------------------------------------------
# Shared hosts, methods and paths

def test_hosts_spelled_differently_stay_independent(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, """
        version: 1
        defaults: {effect: deny}
        agents: {a: {}}
        rules:
          - {id: upper, effect: allow, agents: [a], match: {host: API.Example.com, method: GET}}
          - {id: lower, effect: allow, agents: [a], match: {host: api.example.com, method: [GET]}}
          - {id: again, effect: allow, agents: [a], match: {host: api.example.com, method: [get]}}
    """)
    upper, lower, again = policy.rules
    assert upper.matchers[0] is not lower.matchers[0] and lower.matchers[0] is again.matchers[0]
    assert upper.hosts[0].text == "API.Example.com" and lower.hosts[0].text == "api.example.com"
    assert upper.methods == lower.methods == again.methods == frozenset({"GET"})
    d = policy.explain(RequestFacts.from_url("GET", "https://api.example.com/x"), "a")
    assert d.effect == "allow" and set(d.rules) == {"upper", "lower", "again"}
    reasons = {t.rule: t.reasons for t in d.trace}
    assert "host api.example.com matches API.Example.com" in reasons["upper"]
    assert "host api.example.com matches api.example.com" in reasons["lower"]


def test_one_path_folded_for_deny_and_exact_for_allow(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, """
        version: 1
        defaults: {effect: deny}
        agents: {a: {}, b: {}}
        rules:
          - {id: allow-a, effect: allow, agents: [a], match: {path: '/Admin/{page}'}}
          - {id: allow-b, effect: allow, agents: [b], match: {path: /**}}
          - {id: deny-b, effect: deny, agents: [b], match: {path: '/Admin/{page}'}}
    """)
    allow_a, _, deny_b = policy.rules
    assert allow_a.matchers[0] is not deny_b.matchers[0]
    assert decide(policy, "a", "GET", "https://x.example.com/Admin/users").effect == "allow"
    assert decide(policy, "a", "GET", "https://x.example.com/admin/users").effect == "deny"  # exact case only
    assert decide(policy, "b", "GET", "https://x.example.com/ADMIN/users").rules == ("deny-b",)  # any case
    assert decide(policy, "b", "GET", "https://x.example.com/other").effect == "allow"


def test_unless_and_match_of_one_rule_fold_apart(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, """
        version: 1
        defaults: {effect: allow}
        agents: {a: {}}
        rules:
          - {id: d, effect: deny, agents: [a], match: {path: /Private/*}, unless: {path: /Private/*}}
    """)
    # cautious: the deny rule's match folds, its unless does not, so /private/x is denied but /Private/x exempt
    assert decide(policy, "a", "GET", "https://x.example.com/private/x").effect == "deny"
    assert decide(policy, "a", "GET", "https://x.example.com/Private/x").effect == "allow"


def test_selector_lists_are_judged_per_agent(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, """
        version: 1
        defaults: {effect: deny}
        agents: {a: {roles: [x]}, b: {roles: [y]}, c: {}}
        rules:
          - {id: r1, effect: allow, agents: ['role:x'], match: {path: /one}}
          - {id: r2, effect: allow, agents: ['role:x'], match: {path: /two}}
          - {id: r3, effect: allow, agents: ['role:y', c], match: {path: /two}}
          - {id: r4, effect: allow, agents: ['role:y', c], match: {path: /one}}
    """)
    seen = {(agent, path): decide(policy, agent, "GET", f"https://h.example.com{path}").rules
            for agent in "abc" for path in ("/one", "/two")}
    assert seen == {("a", "/one"): ("r1",), ("a", "/two"): ("r2",), ("b", "/one"): ("r4",),
                    ("b", "/two"): ("r3",), ("c", "/one"): ("r4",), ("c", "/two"): ("r3",)}


def test_a_bad_value_shared_by_rules_is_reported_for_each(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("version: 1\ndefaults: {effect: deny}\nagents: {a: {}}\nrules:\n"
                 "  - {id: r1, effect: allow, agents: [a], match: {host: 'a.*.com', path: /x}}\n"
                 "  - {id: r2, effect: allow, agents: [a], match: {host: ok.example.com, path: /x}}\n"
                 "  - {id: r3, effect: allow, agents: [a], match: {host: ['a.*.com']}}\n")
    with pytest.raises(PolicyLoadError) as e:
        load_policy([f])
    assert [str(i) for i in e.value.issues] == [
        f"{f}:5: rule r1: host 'a.*.com': a wildcard is only allowed as a leading `*.` (like *.example.com)",
        f"{f}:7: rule r3: host 'a.*.com': a wildcard is only allowed as a leading `*.` (like *.example.com)",
    ]


def test_duplicate_ids_name_the_first_definition(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("version: 1\ndefaults: {effect: deny}\nagents: {a: {}}\nrules:\n"
                                     "  - id: r\n    effect: allow\n    agents: [a]\n")
    (tmp_path / "b.yaml").write_text("version: 1\nrules:\n  - {id: x, effect: allow, agents: [a]}\n"
                                     "  - {id: r, effect: deny, agents: [a]}\n")
    with pytest.raises(PolicyLoadError) as e:
        load_policy([tmp_path])
    assert [str(i) for i in e.value.issues] == [
        f"{tmp_path / 'b.yaml'}:4: duplicate rule id 'r' (first defined at {tmp_path / 'a.yaml'}:5)"]


# ---------------------------------------------------------------------------------------------------------
# Pacing

def test_pacer_is_off_on_the_main_thread_and_on_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(pacing.time, "sleep", sleeps.append)
    now = [0.0]
    monkeypatch.setattr(pacing.time, "perf_counter", lambda: now[0])
    main = pacing.Pacer()
    found: list[pacing.Pacer] = []
    worker = threading.Thread(target=lambda: found.append(pacing.Pacer()))
    worker.start()
    worker.join()
    now[0] = 10.0
    main.pace()
    assert sleeps == []
    paced = found[0]
    now[0] = pacing.SLICE_S / 2
    paced.pace()
    assert sleeps == []
    now[0] = pacing.SLICE_S
    paced.pace()
    paced.pace()  # the next slice starts after the yield
    assert sleeps == [0]


def test_a_paced_load_on_a_worker_thread_is_the_same_policy(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadmod, "VALIDATE_CHUNK", 2)
    monkeypatch.setattr(pacing, "SLICE_S", 0.0)  # yield at every chance
    rules = "".join(f"  - {{id: r{i}, effect: allow, agents: [a], match: {{host: h{i % 3}.example.com, "
                    f"method: [GET], path: '/v1/{{x}}'}}, lock: {{key: 'k:{{x}}'}}}}\n" for i in range(7))
    f = tmp_path / "p.yaml"
    f.write_text("version: 1\ndefaults: {effect: deny}\nagents: {a: {}}\nrules:\n" + rules)
    here = load_policy([f])
    there: list[Any] = []
    worker = threading.Thread(target=lambda: there.append(load_policy([f])))
    worker.start()
    worker.join()
    assert there[0].to_json() == here.to_json()
    facts = RequestFacts.from_url("GET", "https://h1.example.com/v1/9")
    assert there[0].evaluate(facts, "a") == here.evaluate(facts, "a")


# ---------------------------------------------------------------------------------------------------------
# Releasing a policy a piece at a time, and the collector during a reload

class _Node:
    """A weak-referenceable stand-in for a policy's objects."""

    def __init__(self, *children: Any) -> None:
        self.children = list(children)


def _in_worker(fn: Any) -> Any:
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def test_release_paced_frees_what_only_it_holds_and_leaves_the_rest() -> None:
    import weakref

    shared = _Node("kept")
    leaves = [_Node() for _ in range(50)]
    root = _Node({"a": leaves[:25], "b": (leaves[25:], shared)}, leaves[0])  # a leaf reached twice
    refs = [weakref.ref(n) for n in (root, *leaves)]
    holder: list[object] = [root]
    del root, leaves
    freed = _in_worker(lambda: pacing.release_paced(holder))
    assert holder == []
    assert all(r() is None for r in refs)
    assert freed > 50
    assert shared.children == ["kept"]  # held elsewhere: untouched, alive


def test_release_paced_on_the_main_thread_just_drops_the_reference() -> None:
    import weakref

    root = _Node(_Node())
    ref = weakref.ref(root)
    holder: list[object] = [root]
    del root
    assert pacing.release_paced(holder) == 0
    assert holder == [] and ref() is None


def test_full_collections_are_deferred_inside_the_block_and_restored_after() -> None:
    import gc

    from bastion.proxy.longlived import full_collections_deferred

    before = gc.get_threshold()
    with full_collections_deferred():
        inside = gc.get_threshold()
        with full_collections_deferred():
            assert gc.get_threshold() == inside
        assert gc.get_threshold() == inside
    assert inside[0] == before[0] and inside[2] > 10**6
    assert gc.get_threshold() == before


async def test_a_reload_frees_the_old_policy_once_no_request_holds_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import weakref

    from bastion.proxy import state as statemod

    monkeypatch.setattr(statemod, "RETIRE_POLL_S", 0.01)
    f = tmp_path / "p.yaml"
    text = "version: 1\ndefaults: {effect: deny}\nagents: {a: {}}\nrules:\n  - {id: r, effect: allow, agents: [a]}\n"
    f.write_text(text)
    st = await statemod.PolicyState.load([str(f)])
    first = weakref.ref(st.policy)
    in_flight = st.policy  # a request that started under the first policy
    f.write_text(text.replace("id: r", "id: r2"))
    assert (await st.reload("test")).changed
    await asyncio.sleep(0.05)
    assert first() is in_flight  # still in use: not taken apart
    assert [r.id for r in in_flight.rules] == ["r"]
    del in_flight
    await st.retired()
    assert first() is None
    second = weakref.ref(st.policy)
    assert not (await st.reload("test")).changed  # the same files: the fresh copy is freed, the active one kept
    await st.retired()
    assert second() is st.policy
