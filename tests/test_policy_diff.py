"""`bastion diff`: changes in meaning are reported field by field; changes in form (layout, key order,
comments, file placement, a scalar for a one-element list, a default written out) are not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.policy.diff import PolicyDiff, diff_views, field_changes, format_duration, load_view, render_text

EXAMPLES = Path(__file__).parent.parent / "rules" / "examples"
BASTION = Path(sys.executable).with_name("bastion")
TOKEN_A = "a" * 64
TOKEN_B = "b" * 64

BASE = """\
version: 1
defaults: {effect: deny, mode: report}
agents:
  bot-1: {roles: [support]}
  bot-2: {roles: [billing, support], mode: enforce}
users:
  carol: {roles: [approver]}
rules:
  - id: read
    effect: allow
    agents: ["role:support"]
    match: {host: api.example.com, method: GET, path: /v1/**}
  - id: refunds
    effect: allow
    agents: ["role:billing"]
    match: {host: pay.example.com, method: POST, path: /v1/refunds, json: {amount: {lte: 5000}}}
    lock: {key: refunds, ttl: 15m}
  - id: no-delete
    effect: deny
    agents: ["*"]
    match: {method: DELETE}
    message: "Never delete."
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def diff_texts(tmp_path: Path, old: str, new: str) -> PolicyDiff:
    a = write(tmp_path / "old" / "rules.yaml", old)
    b = write(tmp_path / "new" / "rules.yaml", new)
    return diff_views(load_view([a]), load_view([b]))


def rule_fields(d: PolicyDiff, rule: str) -> dict[str, Any]:
    fields: dict[str, Any] = d.collections["rules"].changed[rule]["fields"]
    return fields


# ---------------------------------------------------------------------------------------------------------
# Form is not meaning


def test_identical_policies_have_no_changes(tmp_path: Path) -> None:
    d = diff_texts(tmp_path, BASE, BASE)
    assert not d.changed and d.count == 0
    assert d.to_json()["changed"] is False
    assert render_text(d)[-1] == "no semantic changes"


def test_reformatted_and_reordered_policy_is_unchanged(tmp_path: Path) -> None:
    reordered = """\
    # the same policy: other key order, block style, rules in another order, comments
    rules:
      - id: no-delete
        message: Never delete.
        match:
          method: [delete]            # a one-element list, lower case
        agents: ["*", bot-1]          # `*` already selects bot-1
        effect: deny
      - effect: allow
        id: refunds
        lock: {ttl: 900, key: refunds}  # 15m in seconds
        match:
          json: {amount: {lte: 5000.0}}
          path: /v1//refunds/
          method: [POST]
          host: PAY.example.com.
        agents: ["role:billing", "role:billing"]
      - id: read
        agents: ["role:support"]
        effect: allow
        match: {path: [/v1/**], method: [GET], host: [api.example.com]}
    users:
      carol: {roles: [approver, approver]}
    agents:
      bot-2: {mode: enforce, roles: [support, billing], status: active}
      bot-1: {roles: [support]}
    defaults: {mode: report, effect: deny}
    version: 1
    """
    d = diff_texts(tmp_path, BASE, reordered)
    assert not d.changed, render_text(d)
    assert render_text(d)[-1] == "no semantic changes (the files differ in form only)"


def test_defaults_written_out_equal_defaults_left_out(tmp_path: Path) -> None:
    old = """\
    version: 1
    defaults: {effect: deny}
    agents: {bot: {roles: [r]}}
    users: {carol: {roles: [approver]}}
    rules:
      - {id: hold-it, effect: hold, agents: [bot], match: {host: x.example.com}}
      - {id: lock-it, effect: allow, agents: [bot], match: {path: "/t/{t}"}, lock: {key: "t:{t}"}}
    """
    new = """\
    version: 1
    defaults: {effect: deny, mode: enforce}
    agents: {bot: {roles: [r], status: active, mode: enforce}}
    users: {carol: {roles: [approver]}}
    rules:
      - id: hold-it
        effect: hold
        agents: [bot]
        match: {host: x.example.com}
        unless: []
        approval: {approvers: ["role:approver"], wait: 30s, timeout: 1h, required: 1, use_within: 15m}
      - {id: lock-it, effect: allow, agents: [bot], match: {path: "/t/{t}"}, lock: {key: "t:{t}", ttl: 15m},
         release: []}
    normalize: {path_case: cautious, escaped_slashes: reject, allow: []}
    audit: {max_body_bytes: 1048576, on_failure: deny}
    approvals: {max_open_per_minute: 60}
    network: {allow_private: []}
    """
    d = diff_texts(tmp_path, old, new)
    assert not d.changed, render_text(d)


def test_equivalent_conditions_are_equal(tmp_path: Path) -> None:
    old = """\
    version: 1
    defaults: {effect: deny}
    agents: {bot: {roles: [r]}}
    rules:
      - id: r1
        effect: allow
        agents: [bot]
        match:
          method: GET
          port: 443
          scheme: HTTPS
          headers: {X-Team: {eq: blue}}
          query: {q: {in: [b, a, a]}}
          llm: {model: [gpt-4.1, gpt-4o], stream: null}
        unless: {path: /private/**}
      - {id: r2, effect: allow, agents: [bot], match: {path: "/r/{r}"}, release: "x:{r}", requires: "d:{r}",
         complete: {key: "c:{r}"}}
    network: {allow_private: [127.0.0.1]}
    audit: {redact_headers: [X-Key]}
    """
    new = """\
    version: 1
    defaults: {effect: deny}
    agents: {bot: {roles: [r]}}
    rules:
      - id: r1
        effect: allow
        agents: [bot]
        match:
          method: [GET]
          port: [443]
          scheme: [https]
          headers: {x-team: blue}
          query: {q: {in: [a, b]}}
          llm: {model: {in: [gpt-4o, gpt-4.1]}}
        unless: [{path: [/private/**]}]
      - {id: r2, effect: allow, agents: [bot], match: {path: "/r/{r}/"}, release: ["x:{r}"], requires: ["d:{r}"],
         complete: [{key: "c:{r}", ttl: 7d}]}
    network: {allow_private: [127.0.0.1/32]}
    audit: {redact_headers: [x-key]}
    """
    d = diff_texts(tmp_path, old, new)
    assert not d.changed, render_text(d)


def test_values_that_differ_in_type_are_changes(tmp_path: Path) -> None:
    """Rules tell true from 1 and "5" from 5 in a JSON body, so the diff does too."""
    old = BASE.replace("{amount: {lte: 5000}}", "{amount: 5, paid: true}")
    new = BASE.replace("{amount: {lte: 5000}}", "{amount: '5', paid: 1}")
    d = diff_texts(tmp_path, old, new)
    assert set(rule_fields(d, "refunds")) == {"match.json.amount", "match.json.paid"}


def test_a_rule_moved_to_another_file_of_a_directory_is_unchanged(tmp_path: Path) -> None:
    old = tmp_path / "old"
    write(old / "00-base.yaml", BASE)
    write(old / "10-extra.yaml", """\
    version: 1
    rules:
      - {id: extra, effect: allow, agents: [bot-1], match: {host: extra.example.com}}
    """)
    new = tmp_path / "new"
    moved = BASE + "  - {id: extra, effect: allow, agents: [bot-1], match: {host: extra.example.com}}\n"
    write(new / "a.yaml", moved.split("rules:")[0])
    write(new / "b.yaml", "version: 1\nrules:" + moved.split("rules:")[1])
    d = diff_views(load_view([old]), load_view([new]))
    assert d.old.revision != d.new.revision
    assert not d.changed, render_text(d)


# ---------------------------------------------------------------------------------------------------------
# Meaning is reported


def test_rule_added_removed_and_changed_field_by_field(tmp_path: Path) -> None:
    new = (BASE.replace("effect: allow\n    agents: [\"role:billing\"]", "effect: hold\n    agents: [\"role:billing\"]")
           .replace("lock: {key: refunds, ttl: 15m}", "lock: {key: refunds, ttl: 10m}")
           .replace('  - id: no-delete\n    effect: deny\n    agents: ["*"]\n    match: {method: DELETE}\n'
                    '    message: "Never delete."\n', "")
           + "  - {id: refund-small, effect: allow, agents: [bot-2], match: {method: [POST, GET]}}\n")
    d = diff_texts(tmp_path, BASE, new)
    rules = d.collections["rules"]
    assert list(rules.added) == ["refund-small"]
    assert rules.added["refund-small"]["source"] == f"{tmp_path / 'new' / 'rules.yaml'}:18"
    assert rules.added["refund-small"]["value"]["match"] == {"method": ["GET", "POST"]}
    assert list(rules.removed) == ["no-delete"]
    assert rules.removed["no-delete"]["source"] == f"{tmp_path / 'old' / 'rules.yaml'}:18"
    fields = rule_fields(d, "refunds")
    assert fields["effect"] == {"old": "allow", "new": "hold"}
    assert fields["lock.ttl"] == {"old": "15m", "new": "10m"}
    assert fields["approval"] == {"old": None, "new": {"approvers": ["role:approver"], "wait": "30s",
                                                       "timeout": "1h", "required": 1, "use_within": "15m",
                                                       "grants": True}}
    text = render_text(d)
    src = f"{tmp_path / 'new' / 'rules.yaml'}:13"
    assert f"  ~ rule refunds ({src}): effect allow → hold" in text
    assert f"  ~ rule refunds ({src}): lock.ttl 15m → 10m" in text
    assert f"  + rule refund-small ({tmp_path / 'new' / 'rules.yaml'}:18)" in text
    assert text[-1] == "3 changes (rules +1 -1 ~1)"


def test_match_conditions_agents_message_and_unless_changes(tmp_path: Path) -> None:
    new = (BASE.replace("{amount: {lte: 5000}}", "{amount: {lte: 2000}}")
           .replace("match: {method: DELETE}\n    message: \"Never delete.\"",
                    "match: {method: [DELETE, PATCH]}\n    message: \"No.\"\n    unless: {path: /tmp/**}")
           .replace('agents: ["role:support"]', 'agents: ["role:support", bot-2]'))
    d = diff_texts(tmp_path, BASE, new)
    assert rule_fields(d, "refunds") == {"match.json.amount.lte": {"old": 5000, "new": 2000}}
    assert rule_fields(d, "no-delete") == {
        "match.method": {"old": ["DELETE"], "new": ["DELETE", "PATCH"]},
        "message": {"old": "Never delete.", "new": "No."},
        "unless": {"old": None, "new": [{"path": ["/tmp/**"]}]},
    }
    assert rule_fields(d, "read") == {"agents": {"old": ["role:support"], "new": ["bot-2", "role:support"]}}
    text = "\n".join(render_text(d))
    assert 'message "Never delete." → No.' in text
    assert "match.method [DELETE] → [DELETE, PATCH]" in text


def test_agent_role_change_added_and_removed(tmp_path: Path) -> None:
    new = (BASE.replace("bot-1: {roles: [support]}", "bot-1: {roles: [support, triage]}\n  bot-3: {roles: [x]}")
           .replace("  bot-2: {roles: [billing, support], mode: enforce}\n", "")
           .replace('agents: ["role:billing"]', "agents: [bot-1]"))
    d = diff_texts(tmp_path, BASE, new)
    agents = d.collections["agents"]
    assert agents.changed["bot-1"]["fields"] == {"roles": {"old": ["support"], "new": ["support", "triage"]}}
    assert list(agents.added) == ["bot-3"] and list(agents.removed) == ["bot-2"]
    assert agents.added["bot-3"]["value"] == {"roles": ["x"], "status": "active", "mode": "report"}
    text = render_text(d)
    assert f"  ~ agent bot-1 ({tmp_path / 'new' / 'rules.yaml'}:4): roles [support] → [support, triage]" in text
    assert f"  - agent bot-2 ({tmp_path / 'old' / 'rules.yaml'}:5)" in text


def test_defaults_mode_change_is_reported_once(tmp_path: Path) -> None:
    """bot-1 takes defaults.mode: its mode follows, and is reported under defaults only. bot-2 has its own."""
    d = diff_texts(tmp_path, BASE, BASE.replace("mode: report}", "mode: enforce}"))
    assert d.defaults == {"mode": {"old": "report", "new": "enforce"}}
    assert d.count == 1
    assert "  ~ defaults.mode: report → enforce" in render_text(d)
    assert render_text(d)[-1] == "1 change (defaults ~1)"


def test_agent_mode_written_out_or_inherited(tmp_path: Path) -> None:
    # bot-2 drops its own `mode: enforce` and now inherits report: its effective mode changed.
    d = diff_texts(tmp_path, BASE, BASE.replace(", mode: enforce}", "}"))
    assert d.collections["agents"].changed["bot-2"]["fields"] == {"mode": {"old": "enforce", "new": "report"}}
    # bot-1 writes out the mode it inherited: nothing changed.
    d = diff_texts(tmp_path, BASE, BASE.replace("bot-1: {roles: [support]}", "bot-1: {roles: [support], mode: report}"))
    assert not d.changed


def test_token_changes_never_show_the_hash(tmp_path: Path) -> None:
    old = BASE.replace("bot-1: {roles: [support]}", f'bot-1: {{roles: [support], token_sha256: "{TOKEN_A}"}}')
    new = (BASE.replace("bot-1: {roles: [support]}", f'bot-1: {{roles: [support], token_sha256: "{TOKEN_B}"}}')
           .replace("carol: {roles: [approver]}", f'carol: {{roles: [approver], token_sha256: "{TOKEN_A}"}}')
           + "  - {id: new-rule, effect: allow, agents: [bot-1], match: {host: a.example.com}}\n")
    new = new.replace("users:\n", f'users:\n  dan: {{roles: [x], token_sha256: "{TOKEN_B.upper()}"}}\n')
    d = diff_texts(tmp_path, old, new)
    assert d.collections["agents"].changed["bot-1"]["fields"] == {"token": {"old": "set", "new": "set"}}
    assert d.collections["users"].changed["carol"]["fields"] == {"token": {"old": None, "new": "set"}}
    assert d.collections["users"].added["dan"]["value"]["token"] == "set"
    text = "\n".join(render_text(d))
    assert "token changed" in text and "token added" in text
    out = text + json.dumps(d.to_json())
    assert TOKEN_A not in out and TOKEN_B not in out and TOKEN_B.upper() not in out
    # the same token, spelled in upper case, is the same token
    same = old.replace(TOKEN_A, TOKEN_A.upper())
    assert not diff_texts(tmp_path, old, same).changed


def test_sections_are_compared_key_by_key(tmp_path: Path) -> None:
    new = BASE + textwrap.dedent("""\
    audit: {max_body_bytes: 2048, retention: {records: 30d}}
    approvals: {webhook: {url: "https://hooks.example.com/x"}}
    network: {allow_private: [10.0.0.0/8]}
    normalize: {allow: [semicolon]}
    budgets:
      - {id: calls, limit: {calls: 10, per: 1h}}
    guards:
      - {id: storm, when: {denials: 5, per: 1m}}
    """)
    d = diff_texts(tmp_path, BASE, new)
    assert d.sections == {
        "approvals": {"webhook": {"old": None, "new": {"url": "https://hooks.example.com/x", "timeout": "5s"}}},
        "audit": {"max_body_bytes": {"old": 1048576, "new": 2048},
                  "retention": {"old": None, "new": {"records": "30d"}}},
        "network": {"allow_private": {"old": [], "new": ["10.0.0.0/8"]}},
        "normalize": {"allow": {"old": [], "new": ["semicolon"]}},
    }
    assert d.collections["budgets"].added["calls"]["value"] == {
        "agents": ["*"], "match": {}, "limit": {"calls": 10, "per": "1h"}, "key": "{agent}"}
    assert d.collections["guards"].added["storm"]["value"] == {
        "agents": ["*"], "when": {"denials": 5, "per": "1m"}, "action": "pause"}
    d2 = diff_texts(tmp_path, new, new.replace("per: 1h", "per: 2h").replace("retention: {records: 30d}",
                                                                            "retention: {records: 7d}"))
    assert d2.collections["budgets"].changed["calls"]["fields"] == {"limit.per": {"old": "1h", "new": "2h"}}
    assert d2.sections == {"audit": {"retention.records": {"old": "30d", "new": "7d"}}}
    assert "  ~ audit.retention.records: 30d → 7d" in render_text(d2)


def test_rule_order_is_never_reported(tmp_path: Path) -> None:
    """Decisions take the strongest matched effect over every rule, so order cannot change one."""
    head, rules = BASE.split("rules:\n")
    blocks = ["  - id:" + b for b in rules.split("  - id:")[1:]]
    d = diff_texts(tmp_path, BASE, head + "rules:\n" + "".join(reversed(blocks)))
    assert not d.changed


# ---------------------------------------------------------------------------------------------------------
# Helpers


def test_format_duration_is_the_rules_own_syntax() -> None:
    assert [format_duration(s) for s in (900, 5400, 0.5, 86400 * 7, 90, 1.25)] == [
        "15m", "1h30m", "500ms", "7d", "1m30s", "1s250ms"]


def test_field_changes_walks_mappings_and_compares_lists_whole() -> None:
    assert field_changes({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"b": 2, "c": [1]}, "e": {}}) == {
        "a.b": {"old": 1, "new": 2}, "a.c": {"old": [1, 2], "new": [1]},
        "d": {"old": 1, "new": None}, "e": {"old": None, "new": {}}}
    assert field_changes({"x": {}}, {"x": {}}) == {}
    assert field_changes({"x": True}, {"x": 1}) == {"x": {"old": True, "new": 1}}


# ---------------------------------------------------------------------------------------------------------
# The real examples


def _reordered(data: Any) -> Any:
    """Every mapping's keys reversed, every list of rules reversed: the same policy in another order."""
    if isinstance(data, dict):
        return {k: _reordered(data[k]) for k in reversed(list(data))}
    if isinstance(data, list):
        items = [_reordered(x) for x in data]
        return list(reversed(items)) if items and all(isinstance(x, dict) and "id" in x for x in items) else items
    return data


@pytest.mark.parametrize("name", ["support-desk", "coding-agent", "mcp-tools", "report-pipeline", "tour"])
def test_every_example_rewritten_in_another_layout_is_unchanged(tmp_path: Path, name: str) -> None:
    src = EXAMPLES / f"{name}.yaml"
    data = yaml.safe_load(src.read_text())
    copy = tmp_path / f"{name}.yaml"
    copy.write_text(yaml.safe_dump(_reordered(data), sort_keys=False, default_flow_style=False))
    d = diff_views(load_view([src]), load_view([copy]))
    assert not d.changed, render_text(d)


def test_support_desk_against_an_edited_copy(tmp_path: Path) -> None:
    src = EXAMPLES / "support-desk.yaml"
    text = src.read_text()
    edited = (text.replace("approval: {approvers: [\"role:finance-lead\"], wait: 30s, timeout: 1h}",
                           "approval: {approvers: [\"role:finance-lead\"], wait: 30s, timeout: 2h, required: 2}")
              .replace("billing-bot: {roles: [support, billing], owner: carol}",
                       "billing-bot: {roles: [billing], owner: dave}")
              .replace("  mode: enforce\n", "  mode: report\n")
              .replace("  - id: erp-read-only\n", "  - id: erp-no-writes\n"))
    copy = write(tmp_path / "support-desk.yaml", edited)
    d = diff_views(load_view([src]), load_view([copy]))
    assert rule_fields(d, "refund-big") == {"approval.required": {"old": 1, "new": 2},
                                            "approval.timeout": {"old": "1h", "new": "2h"}}
    assert d.collections["agents"].changed["billing-bot"]["fields"] == {
        "owner": {"old": "carol", "new": "dave"}, "roles": {"old": ["billing", "support"], "new": ["billing"]}}
    assert d.defaults == {"mode": {"old": "enforce", "new": "report"}}
    assert list(d.collections["rules"].added) == ["erp-no-writes"]
    assert list(d.collections["rules"].removed) == ["erp-read-only"]
    # support-bot and the others inherit defaults.mode: reported once, under defaults; trial-bot has its own
    assert set(d.collections["agents"].changed) == {"billing-bot"}
    assert d.count == 5


def test_report_pipeline_split_into_a_directory_and_edited(tmp_path: Path) -> None:
    src = EXAMPLES / "report-pipeline.yaml"
    data = yaml.safe_load(src.read_text())
    split = tmp_path / "split"
    parts = {"00-main.yaml": {k: v for k, v in data.items() if k not in ("rules", "budgets", "guards")},
             "10-rules.yaml": {"version": 1, "rules": data["rules"]},
             "20-fleet.yaml": {"version": 1, "budgets": data["budgets"], "guards": data["guards"]}}
    for fname, part in parts.items():
        write(split / fname, yaml.safe_dump(part, sort_keys=True))
    assert not diff_views(load_view([src]), load_view([split])).changed
    fleet = split / "20-fleet.yaml"
    fleet.write_text(fleet.read_text().replace("action: hold", "action: pause").replace("tokens: 200000",
                                                                                       "tokens: 100000"))
    d = diff_views(load_view([src]), load_view([split]))
    assert d.collections["guards"].changed["error-storm"]["fields"] == {"action": {"old": "hold", "new": "pause"}}
    assert d.collections["budgets"].changed["llm-tokens"]["fields"] == {
        "limit.tokens": {"old": 200000, "new": 100000}}
    assert d.collections["budgets"].changed["llm-tokens"]["source"].startswith(f"{fleet}:")


# ---------------------------------------------------------------------------------------------------------
# The command


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = [str(BASTION)] if BASTION.exists() else [sys.executable, "-m", "bastion"]
    return subprocess.run([*exe, "diff", *map(str, args)], capture_output=True, text=True, timeout=60)


def test_cli_exit_0_when_nothing_changed(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", BASE)
    b = write(tmp_path / "b.yaml", "# a comment\n" + BASE.replace("method: GET", "method: [GET]"))
    res = run(a, b)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"--- {a} (revision ") and lines[1].startswith(f"+++ {b} (revision ")
    assert lines[-1] == "no semantic changes (the files differ in form only)"


def test_cli_exit_1_and_text_lines(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", BASE)
    b = write(tmp_path / "b.yaml", BASE.replace("effect: allow\n    agents: [\"role:billing\"]",
                                                 "effect: hold\n    agents: [\"role:billing\"]")
              .replace("  bot-2: {roles: [billing, support], mode: enforce}\n",
                       "  bot-2: {roles: [billing], mode: enforce}\n"))
    res = run(a, b)
    assert res.returncode == 1, res.stderr
    assert f"  ~ rule refunds ({b}:13): effect allow → hold" in res.stdout.splitlines()
    assert f"  ~ agent bot-2 ({b}:5): roles [billing, support] → [billing]" in res.stdout.splitlines()
    assert res.stdout.splitlines()[-1] == "2 changes (agents ~1; rules ~1)"


def test_cli_json_shape(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", BASE)
    b = write(tmp_path / "b.yaml", BASE.replace("mode: report}", "mode: enforce}")
              + "  - {id: extra, effect: allow, agents: [bot-1], match: {host: extra.example.com}}\n")
    res = run("--format", "json", a, b)
    assert res.returncode == 1, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"changed", "count", "old", "new", "defaults", "agents", "users", "rules", "budgets",
                        "guards", "sections"}
    assert out["changed"] is True and out["count"] == 2
    assert set(out["old"]) == {"paths", "revision", "files"} and out["new"]["paths"] == [str(b)]
    assert out["defaults"] == {"mode": {"old": "report", "new": "enforce"}}
    for kind in ("agents", "users", "rules", "budgets", "guards"):
        assert set(out[kind]) == {"added", "removed", "changed"}
    assert out["rules"]["added"] == {"extra": {"source": f"{b}:23", "value": {
        "effect": "allow", "agents": ["bot-1"], "match": {"host": ["extra.example.com"]}}}}
    assert out["sections"] == {}
    same = run("--format", "json", a, a)
    assert same.returncode == 0 and json.loads(same.stdout)["changed"] is False


def test_cli_exit_3_for_an_invalid_policy(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", BASE)
    bad = write(tmp_path / "bad.yaml", BASE.replace("effect: deny\n    agents", "effect: block\n    agents"))
    res = run(a, bad)
    assert res.returncode == 3
    assert f"{bad}:19: " in res.stderr and res.stdout == ""
    both = run(bad, tmp_path / "missing.yaml")
    assert both.returncode == 3
    assert f"{bad}:19: " in both.stderr
    assert f"{tmp_path / 'missing.yaml'}: [no_such_file] no such file or directory" in both.stderr


def test_cli_on_directories(tmp_path: Path) -> None:
    """A policy split differently across the files of a directory is the same policy."""
    text = (EXAMPLES / "support-desk.yaml").read_text()
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(EXAMPLES / "support-desk.yaml", old)
    shutil.copy(EXAMPLES / "support-desk_test.yaml", old)  # test suites beside the rules are skipped
    new = tmp_path / "new"
    head, rules = text.split("\nrules:\n")
    write(new / "agents.yaml", head)
    write(new / "rules.yaml", "version: 1\nrules:\n" + rules)
    res = run(old, new)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1] == "no semantic changes (the files differ in form only)"


def test_cli_json_shows_a_yaml_date_condition(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", BASE)
    b = write(tmp_path / "b.yaml", BASE.replace("{amount: {lte: 5000}}", "{day: 2024-01-31}"))
    res = run("--format", "json", a, b)
    assert res.returncode == 1, res.stderr
    fields = json.loads(res.stdout)["rules"]["changed"]["refunds"]["fields"]
    assert fields["match.json.day"] == {"old": None, "new": "2024-01-31"}
