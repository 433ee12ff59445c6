"""`bastion.policy.replay` on hand-made records: what counts as a change, what is undetermined and why."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from bastion.audit.record import AuditRecord, Body, DecisionFacts, ErrorFacts, Identity, LockFact, Request, Timings
from bastion.policy.load import load_policy
from bastion.policy.replay import Replay, Verdict, change_kind

HEAD = """\
version: 1
defaults: {effect: deny}
agents:
  bot: {roles: [worker]}
rules:
"""


def policy(tmp_path: Path, rules: str, extra: str = "") -> Any:
    path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(HEAD + rules + extra)
    return load_policy([path])


def record(method: str = "GET", url: str = "https://api.example.com/items", *, agent: str | None = "bot",
           headers: list[tuple[str, str]] | None = None, body: Any = None, effect: str = "allow",
           would: str | None = None, mode: str = "enforce", rules: tuple[str, ...] = ("items",),
           redactions: tuple[str, ...] = (), locks: tuple[LockFact, ...] = (), decided: bool = True,
           cut: bool = False, stored: bool = True, extra: dict[str, Any] | None = None) -> AuditRecord:
    raw = json.dumps(body).encode() if body is not None else b""
    kept = raw[: len(raw) // 2] if cut else raw
    b = Body(len(raw), None, "application/json", stored=len(kept) if stored else 0, truncated=cut,
             content=kept if stored else None) if raw else None
    return AuditRecord(
        id=f"r{next(_IDS)}", started_us=1, ended_us=2, identity=Identity(agent, "basic", "127.0.0.1:1"),
        request=Request(method, url, headers=list(headers or []), body=b), outcome="forwarded",
        timings=Timings(total_us=1),
        decision=DecisionFacts(effect, would or effect, mode, list(rules)) if decided else None,
        error=None if decided else ErrorFacts("bad_request", "Malformed request"),
        locks=list(locks), redactions=list(redactions), extra=extra or {})


_IDS = itertools.count()

ITEMS = """\
  - id: items
    effect: allow
    agents: [bot]
    match: {path: /items}
"""


def test_change_kinds_in_order_of_importance() -> None:
    allow = Verdict("allow", "allow", ("a",))
    assert change_kind(allow, Verdict("deny", "deny", ("b",))) == "allow → deny"
    assert change_kind(Verdict("allow", "deny", ("a",)), Verdict("allow", "allow", ("a",))) == \
        "report: would deny → would allow"
    assert change_kind(allow, Verdict("allow", "allow", ("b",))) == "rules changed"
    assert change_kind(allow, Verdict("allow", "allow", ("a",), frozenset({"lock:t"}))) == "obligations changed"
    assert change_kind(allow, Verdict("allow", "allow", ("a",))) is None


def test_a_masked_header_matters_only_when_a_rule_reads_it(tmp_path: Path) -> None:
    rec = record(headers=[("Authorization", "Bearer [REDACTED]")], redactions=("/request/headers/authorization",))
    by_path = Replay(policy(tmp_path, ITEMS))
    assert by_path.add(rec) == "unchanged"
    by_header = Replay(policy(tmp_path, ITEMS.replace("{path: /items}",
                                                      "{path: /items, headers: {authorization: {exists: true}}}")))
    assert by_header.add(rec) == "undetermined"
    assert by_header.report()["undetermined_reasons"][0]["reason"] == "header 'authorization' was redacted"


def test_a_url_masked_by_value_leaves_every_decision_undetermined(tmp_path: Path) -> None:
    replay = Replay(policy(tmp_path, ITEMS))
    assert replay.add(record(redactions=("/request/url",))) == "undetermined"
    assert replay.add(record(redactions=("/request/url/password",))) == "unchanged"


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"cut": True}, "the body was cut at the audit's size cap"),
    ({"stored": False}, "the body was not stored"),
    ({"redactions": ("/request/body/api_key",)}, "the body was redacted"),
    ({"headers": [("Content-Encoding", "gzip")]}, "the body was stored decoded, the rules saw it gzip-encoded"),
])
def test_a_body_the_audit_does_not_hold_as_seen_is_undetermined_when_read(
        tmp_path: Path, kwargs: dict[str, Any], reason: str) -> None:
    rec = record("POST", body={"amount": 20, "note": "x" * 50}, **kwargs)
    reading = Replay(policy(tmp_path, ITEMS.replace("{path: /items}", "{path: /items, json: {amount: {lt: 50}}}")))
    assert reading.add(rec) == "undetermined"
    assert reading.report()["undetermined_reasons"][0]["reason"] == reason
    assert Replay(policy(tmp_path, ITEMS)).add(rec) == "unchanged"  # no rule reads the body


def test_skipped_records_are_counted_by_reason(tmp_path: Path) -> None:
    replay = Replay(policy(tmp_path, ITEMS))
    assert replay.add(record(agent=None, decided=False)) == "skipped"
    assert replay.add(record(decided=False)) == "skipped"
    report = replay.report()
    assert report["skipped_reasons"] == {"no identity (refused before the rules)": 1,
                                         "not decided by the rules (bad_request)": 1}
    assert report["replayed"] == 0


def test_an_agent_the_candidate_drops_is_refused(tmp_path: Path) -> None:
    replay = Replay(policy(tmp_path, ITEMS))
    assert replay.add(record(agent="old-bot")) == "changed"
    (change,) = replay.report()["changes"]
    assert (change["change"], change["to_rules"]) == ("allow → deny", "(agent not in the candidate)")


def test_a_path_the_candidate_normalizes_differently_is_a_refusal(tmp_path: Path) -> None:
    rec = record(url="https://api.example.com/items;v=1")
    loose = policy(tmp_path, ITEMS.replace("/items", "/items;v=1"), "normalize: {allow: [semicolon]}\n")
    assert Replay(loose).add(rec) == "unchanged"
    strict = Replay(policy(tmp_path, ITEMS))
    assert strict.add(rec) == "changed"
    assert strict.report()["changes"][0]["to_rules"] == "(malformed under the candidate)"


def test_store_backed_obligations(tmp_path: Path) -> None:
    locked = ITEMS + "    lock: {key: items, ttl: 1m}\n"
    with_lock = record(locks=(LockFact("items", "acquired", "items"),))
    assert Replay(policy(tmp_path, locked)).add(with_lock) == "unchanged"  # the recorded call took it then
    replay = Replay(policy(tmp_path, locked))
    assert replay.add(record()) == "undetermined"  # would it have got the lock then? unknown
    assert replay.report()["undetermined_reasons"][0]["reason"] == \
        "depends on the store's state then (lock of rule items)"
    dropped = Replay(policy(tmp_path, ITEMS))
    assert dropped.add(with_lock) == "changed"  # no lock any more: a call a lock refused would pass
    assert dropped.report()["changes"][0]["change"] == "obligations changed"
    budgeted = policy(tmp_path, ITEMS, "budgets:\n  - id: calls\n    limit: {calls: 10, per: 1h}\n")
    assert Replay(budgeted).add(record()) == "undetermined"
    charged = record(extra={"fleet": {"budgets": [{"budget": "calls", "key": "bot"}]}})
    assert Replay(budgeted).add(charged) == "unchanged"
    refused = record(extra={"fleet": {"exceeded": {"budget": "calls", "key": "bot"}}})
    assert Replay(budgeted).add(refused) == "unchanged"


def test_report_mode_and_enforce_mode(tmp_path: Path) -> None:
    deny = ITEMS.replace("effect: allow", "effect: deny")
    enforcing = Replay(policy(tmp_path, deny))
    assert enforcing.add(record(effect="allow", would="deny", mode="report")) == "changed"
    assert enforcing.report()["changes"][0]["change"] == "allow → deny"
    path = tmp_path / "report.yaml"
    path.write_text(HEAD.replace("{effect: deny}", "{effect: deny, mode: report}") + deny)
    reporting = Replay(load_policy([path]))
    assert reporting.add(record(effect="deny")) == "changed"
    assert reporting.report()["changes"][0]["change"] == "deny → allow"
    assert reporting.add(record(effect="allow", would="deny", mode="report")) == "unchanged"


def test_a_websocket_upgrade_is_judged_as_ws(tmp_path: Path) -> None:
    ws = ITEMS.replace("{path: /items}", "{path: /items, scheme: wss}")
    rec = record(url="https://api.example.com/items", headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")])
    assert Replay(policy(tmp_path, ws)).add(rec) == "unchanged"
