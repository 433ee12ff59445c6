"""Evaluation semantics: precedence, modes, identities, fail-closed errors, actions, and the index."""

from __future__ import annotations

import hashlib
import random
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policyhelp import decide, policy_from

from bastion.policy.engine import Policy
from bastion.policy.facts import RequestFacts
from bastion.policy.load import load_policy

BASE = """
version: 1
defaults: {effect: deny}
agents:
  bot: {roles: [support]}
  other: {roles: [ops]}
  trial: {roles: [support], mode: report}
  old: {roles: [support], status: retired}
users:
  alice: {roles: [admin]}
  carol: {roles: [finance]}
"""


def test_precedence_deny_beats_hold_beats_allow(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + """
rules:
  - {id: a, effect: allow, agents: ["*"], match: {host: x.example}}
  - {id: h, effect: hold, agents: ["*"], match: {host: x.example, method: POST}}
  - {id: d, effect: deny, agents: ["*"], match: {host: x.example, method: POST, path: /danger}}
""")
    assert decide(p, "bot", "GET", "https://x.example/").rules == ("a",)
    d = decide(p, "bot", "POST", "https://x.example/")
    assert (d.effect, d.rules) == ("hold", ("h",))
    d = decide(p, "bot", "POST", "https://x.example/danger")
    assert (d.effect, d.rules) == ("deny", ("d",))
    d = decide(p, "bot", "GET", "https://y.example/")
    assert (d.effect, d.rules, d.reason, d.rule) == ("deny", (), "default", None)


def test_default_allow_and_all_determining_rules_are_named(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE.replace("effect: deny}", "effect: allow}") + """
rules:
  - {id: d2, effect: deny, agents: ["role:support"], match: {host: x.example}, message: "second"}
  - {id: d1, effect: deny, agents: [bot], match: {method: DELETE}, message: "first"}
""")
    assert decide(p, "bot", "GET", "https://free.example/").effect == "allow"
    d = decide(p, "bot", "DELETE", "https://x.example/")
    assert d.rules == ("d1", "d2") and d.message == "first"


def test_agent_selectors(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + """
rules:
  - {id: by-name, effect: allow, agents: [other], match: {host: a.example}}
  - {id: by-role, effect: allow, agents: ["role:support"], match: {host: b.example}}
  - {id: everyone, effect: allow, agents: ["*"], match: {host: c.example}}
""")
    assert decide(p, "other", "GET", "https://a.example/").effect == "allow"
    assert decide(p, "bot", "GET", "https://a.example/").effect == "deny"
    assert decide(p, "bot", "GET", "https://b.example/").effect == "allow"
    assert decide(p, "other", "GET", "https://b.example/").effect == "deny"
    assert decide(p, "other", "GET", "https://c.example/").effect == "allow"


def test_retired_and_unknown_agents_are_refused_whatever_the_rules(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + "rules:\n  - {id: all, effect: allow, agents: ['*']}\n")
    d = decide(p, "old", "GET", "https://x.example/")
    assert (d.effect, d.reason) == ("deny", "agent_retired")
    d = decide(p, "ghost", "GET", "https://x.example/")
    assert (d.effect, d.reason) == ("deny", "unknown_agent")


def test_report_mode_lets_everything_through_and_keeps_the_would_be_decision(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + """
rules:
  - {id: no-delete, effect: deny, agents: ["*"], match: {method: DELETE}}
  - id: reply
    effect: allow
    agents: ["*"]
    match: {path: "/t/{id}"}
    lock: {key: "t:{id}"}
""")
    d = decide(p, "trial", "DELETE", "https://x.example/")
    assert (d.effect, d.would_effect, d.mode, d.rules) == ("allow", "deny", "report", ("no-delete",))
    d = decide(p, "trial", "GET", "https://x.example/nothing")
    assert (d.effect, d.would_effect, d.reason) == ("allow", "deny", "default")
    d = decide(p, "trial", "POST", "https://x.example/t/1")
    assert d.locks == ()  # report mode takes no locks: it must never block anything
    assert decide(p, "bot", "POST", "https://x.example/t/1").locks[0].key == "t:1"


def test_default_mode_report(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE.replace("{effect: deny}", "{effect: deny, mode: report}") +
                    "rules: []\n")
    d = decide(p, "bot", "GET", "https://x.example/")
    assert (d.effect, d.would_effect, d.mode) == ("allow", "deny", "report")


def test_errors_fail_closed_by_effect(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + """
rules:
  - {id: ok-model, effect: allow, agents: ["*"], match: {host: x.example, json: {model: gpt-4}}}
  - {id: big, effect: hold, agents: ["*"], match: {host: pay.example, json: {amount: {gt: 100}}}}
  - {id: no-tools, effect: deny, agents: ["*"], match: {host: y.example, json: {tools.*.type: shell}}}
  - {id: y-all, effect: allow, agents: ["*"], match: {host: y.example}}
""")
    d = decide(p, "bot", "POST", "https://x.example/", b"not json")
    assert (d.effect, d.reason) == ("deny", "default") and "rule ok-model" in d.errors[0]
    d = decide(p, "bot", "POST", "https://pay.example/", b"{oops")
    assert (d.effect, d.rules) == ("hold", ("big",))
    d = decide(p, "bot", "POST", "https://pay.example/", {"amount": "lots"})
    assert (d.effect, d.rules) == ("hold", ("big",)) and "expected a number" in d.errors[0]
    d = decide(p, "bot", "POST", "https://y.example/", b"[")
    assert (d.effect, d.rules) == ("deny", ("no-tools",))
    assert "could not evaluate" in (d.message or "")
    # A definite mismatch elsewhere in the rule means it does not apply, error or not.
    assert decide(p, "bot", "POST", "https://z.example/", b"[").errors == ()


def test_unless_carves_exceptions_and_fails_closed(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + """
rules:
  - id: read
    effect: allow
    agents: ["*"]
    match: {host: x.example, method: GET}
    unless:
      - {path: /admin/**}
      - {query: {debug: "1"}}
  - id: no-write
    effect: deny
    agents: ["*"]
    match: {host: x.example, method: POST}
    unless: {json: {dry_run: true}}
""")
    assert decide(p, "bot", "GET", "https://x.example/docs").effect == "allow"
    assert decide(p, "bot", "GET", "https://x.example/admin/users").effect == "deny"
    assert decide(p, "bot", "GET", "https://x.example/docs?debug=1").effect == "deny"
    d = decide(p, "bot", "GET", "https://x.example/docs?debug=1&debug=0")  # ambiguous: never allows
    assert d.effect == "deny" and d.errors
    assert decide(p, "bot", "POST", "https://x.example/", {"dry_run": True}).rules == ()
    d = decide(p, "bot", "POST", "https://x.example/", {"dry_run": False})
    assert d.rules == ("no-write",)
    d = decide(p, "bot", "POST", "https://x.example/", b"garbage")  # cannot tell: the deny still applies
    assert d.rules == ("no-write",) and d.errors


def test_query_headers_port_scheme(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + """
rules:
  - id: r
    effect: allow
    agents: ["*"]
    match:
      scheme: https
      port: [443, 8443]
      query: {limit: {lte: 100}}
      headers: {X-Tenant: acme}
""")
    h = {"x-tenant": "acme"}
    assert decide(p, "bot", "GET", "https://x.example/?limit=50", headers=h).effect == "allow"
    assert decide(p, "bot", "GET", "https://x.example:8443/?limit=50", headers=h).effect == "allow"
    assert decide(p, "bot", "GET", "https://x.example:9443/?limit=50", headers=h).effect == "deny"
    assert decide(p, "bot", "GET", "http://x.example:443/?limit=50", headers=h).effect == "deny"
    assert decide(p, "bot", "GET", "https://x.example/?limit=500", headers=h).effect == "deny"
    assert decide(p, "bot", "GET", "https://x.example/?limit=50", headers={"X-Tenant": "evil"}).effect == "deny"
    assert decide(p, "bot", "GET", "https://x.example/?limit=50").effect == "deny"
    assert p.connect_port_allowed("bot", 8443) and not p.connect_port_allowed("bot", 22)


def test_connect_ports_follow_allow_and_hold_rules(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + """
rules:
  - {id: r, effect: allow, agents: [other], match: {host: x.example, port: 443}}
  - {id: any, effect: allow, agents: [bot], match: {host: y.example}}
  - {id: d, effect: deny, agents: ["*"], match: {port: 22}}
""")
    assert p.connect_port_allowed("other", 443)
    assert not p.connect_port_allowed("other", 8080)
    assert p.connect_port_allowed("bot", 8080)  # a rule without `port` could allow any port
    assert not p.connect_port_allowed("ghost", 443)


def test_locks_releases_and_approvals(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + """
rules:
  - id: reply
    effect: allow
    agents: ["role:support"]
    match: {host: t.example, method: POST, path: "/tickets/{t}/comments"}
    lock: {key: "ticket:{t}:{agent}", ttl: 10m}
  - id: close
    effect: allow
    agents: ["role:support"]
    match: {host: t.example, method: POST, path: "/tickets/{t}/close"}
    release: ["ticket:{t}:{agent}", "audit:{json.case}"]
  - id: refund
    effect: hold
    agents: ["*"]
    match: {host: pay.example, json: {amount: {gt: 10}}}
    approval: {approvers: ["role:finance"], wait: 5s, timeout: 2h}
  - id: refund-eu
    effect: hold
    agents: ["*"]
    match: {host: pay.example, json: {region: eu}}
    approval: {approvers: [alice], wait: 20s, timeout: 1h}
""")
    d = decide(p, "bot", "POST", "https://t.example/tickets/7/comments")
    assert [(lk.key, lk.ttl, lk.rule) for lk in d.locks] == [("ticket:7:bot", 600.0, "reply")]
    d = decide(p, "bot", "POST", "https://t.example/tickets/7/close", {"case": 99})
    assert [r.key for r in d.releases] == ["ticket:7:bot", "audit:99"]
    d = decide(p, "bot", "POST", "https://t.example/tickets/7/close", {})  # a key we cannot compute
    assert d.effect == "deny" and "lock key" in (d.message or "")
    d = decide(p, "bot", "POST", "https://pay.example/", {"amount": 50, "region": "eu"})
    assert d.effect == "hold" and d.approval is not None
    assert d.approval.approvers == (("role:finance",), ("alice",))  # both rules' approvers must agree
    assert (d.approval.wait, d.approval.timeout) == (5.0, 3600.0)
    assert d.approval.rules == ("refund", "refund-eu")
    carol, alice = p.users["carol"], p.users["alice"]
    assert p.user_matches(carol, ["role:finance"]) and not p.user_matches(alice, ["role:finance"])


def test_authentication_is_by_token_hash(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"s3cret:with:colons").hexdigest()
    p = policy_from(tmp_path, f"""
version: 1
defaults: {{effect: deny}}
agents:
  bot: {{token_sha256: "{digest}"}}
  pinned-only: {{}}
users:
  alice: {{token_sha256: "{digest.upper()}"}}
""")
    assert p.authenticate_agent("bot", "s3cret:with:colons") is p.agents["bot"]
    assert p.authenticate_agent("bot", "wrong") is None
    assert p.authenticate_agent("ghost", "s3cret:with:colons") is None
    assert p.authenticate_agent("pinned-only", "") is None
    assert p.authenticate_user("s3cret:with:colons") is p.users["alice"]
    assert p.authenticate_user("nope") is None


def test_explain_traces_every_rule(tmp_path: Path) -> None:
    p = policy_from(tmp_path, BASE + """
rules:
  - {id: a, effect: allow, agents: ["role:support"], match: {host: x.example, method: GET}}
  - {id: b, effect: allow, agents: [other], match: {host: x.example}}
  - {id: c, effect: deny, agents: ["*"], match: {host: x.example, json: {k: v}}}
""")
    d = p.explain(RequestFacts.from_url("GET", "https://x.example/"), "bot")
    by_rule = {t.rule: t for t in d.trace}
    assert by_rule["a"].matched and any("matches" in r for r in by_rule["a"].reasons)
    assert not by_rule["b"].matched and "not selected" in by_rule["b"].reasons[0]
    assert by_rule["c"].matched and by_rule["c"].error and d.effect == "deny"
    assert d.to_json()["trace"][0]["rule"] == "a"


# ---------------------------------------------------------------------------------------------------------
# Properties over generated policies

HOSTS = ["a.ex.test", "b.ex.test", "*.ex.test", "*.b.ex.test", "x.b.ex.test"]
PATHS = ["/", "/v1/items", "/v1/items/{id}", "/v1/*", "/v1/**", "/admin/**"]
REQ_HOSTS = ["a.ex.test", "b.ex.test", "x.b.ex.test", "y.b.ex.test", "other.test"]
REQ_PATHS = ["/", "/v1/items", "/v1/items/7", "/v1/x/y", "/admin/users", "/v1/items/7/../../admin/x"]


@st.composite
def rules(draw: Any) -> dict[str, Any]:
    match: dict[str, Any] = {}
    if draw(st.booleans()):
        match["host"] = draw(st.sampled_from(HOSTS))
    if draw(st.booleans()):
        match["method"] = draw(st.lists(st.sampled_from(["GET", "POST", "DELETE"]), min_size=1, max_size=2))
    if draw(st.booleans()):
        match["path"] = draw(st.sampled_from(PATHS))
    if draw(st.integers(0, 3)) == 0:
        match["json"] = {"amount": {"gt": draw(st.integers(0, 100))}}
    rule: dict[str, Any] = {
        "effect": draw(st.sampled_from(["allow", "deny", "hold"])),
        "agents": [draw(st.sampled_from(["*", "bot", "role:support", "role:ops"]))],
        "match": match,
    }
    if draw(st.integers(0, 4)) == 0:
        rule["unless"] = {"method": "GET"}
    return rule


@st.composite
def policies(draw: Any) -> dict[str, Any]:
    rs = draw(st.lists(rules(), min_size=0, max_size=12))
    for i, r in enumerate(rs):
        r["id"] = f"r{i}"
    return {
        "version": 1,
        "defaults": {"effect": draw(st.sampled_from(["allow", "deny"]))},
        "agents": {"bot": {"roles": ["support"]}, "other": {"roles": ["ops"]}},
        "rules": rs,
    }


requests_ = st.tuples(
    st.sampled_from(["bot", "other"]),
    st.sampled_from(["GET", "POST", "DELETE"]),
    st.sampled_from(REQ_HOSTS),
    st.sampled_from(REQ_PATHS),
    st.sampled_from([None, b'{"amount": 50}', b'{"amount": "x"}', b"{bad"]),
)


def load_dict(data: dict[str, Any]) -> Policy:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "p.yaml"
        f.write_text(yaml.safe_dump(data))
        return load_policy([f])


def outcome(p: Policy, req: tuple[Any, ...]) -> tuple[Any, ...]:
    agent, method, host, path, body = req
    d = p.evaluate(RequestFacts.from_url(method, f"https://{host}{path}", body=body), agent)
    return d.effect, d.rules, d.reason, tuple(sorted(d.errors)), d.locks


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(policies(), st.lists(requests_, min_size=1, max_size=5), st.randoms())
def test_rule_order_never_matters(data: dict[str, Any], reqs: list[Any], rnd: random.Random) -> None:
    p1 = load_dict(data)
    shuffled = dict(data, rules=rnd.sample(data["rules"], len(data["rules"])))
    p2 = load_dict(shuffled)
    for req in reqs:
        assert outcome(p1, req) == outcome(p2, req)


@FAST
@given(policies(), st.lists(requests_, min_size=1, max_size=5))
def test_index_agrees_with_a_full_scan(data: dict[str, Any], reqs: list[Any]) -> None:
    p = load_dict(data)
    for agent, method, host, path, body in reqs:
        facts = RequestFacts.from_url(method, f"https://{host}{path}", body=body)
        fast, full = p.evaluate(facts, agent), p.explain(facts, agent)
        assert (fast.effect, fast.rules, fast.reason) == (full.effect, full.rules, full.reason)
        assert fast.errors == full.errors
        assert {t.rule for t in full.trace if t.matched} >= set(fast.rules)


@FAST
@given(policies(), requests_, st.sampled_from(["*", "bot", "role:support"]))
def test_adding_a_matching_deny_always_denies(data: dict[str, Any], req: Any, selector: str) -> None:
    agent, method, host, _path, _body = req
    data["rules"].append({"id": "zz-deny", "effect": "deny", "agents": [selector],
                          "match": {"host": host, "method": method}})
    p = load_dict(data)
    effect, rules_, *_ = outcome(p, req)
    selected = selector == "*" or agent == "bot"
    if selected:
        assert effect == "deny" and "zz-deny" in rules_
    else:  # a deny for other agents never touches this one
        assert "zz-deny" not in rules_


@FAST
@given(policies(), requests_)
def test_report_mode_never_refuses_and_reports_the_same_decision(data: dict[str, Any], req: Any) -> None:
    enforce = load_dict(data)
    data["defaults"]["mode"] = "report"
    report = load_dict(data)
    agent, method, host, path, body = req
    facts = lambda: RequestFacts.from_url(method, f"https://{host}{path}", body=body)  # noqa: E731
    e, r = enforce.evaluate(facts(), agent), report.evaluate(facts(), agent)
    assert r.effect == "allow" and r.would_effect == e.effect and r.rules == e.rules
