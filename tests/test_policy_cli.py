"""The policy author's commands as a user runs them: `bastion explain`, `bastion test`, `bastion token`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.cli import main

RULES = Path(__file__).parent.parent / "rules" / "examples"
SUPPORT = str(RULES / "support-desk.yaml")


def test_explain_allow_exits_0_and_names_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", "--rules", SUPPORT, "--agent", "support-bot", "POST",
                 "https://api.openai.com/v1/chat/completions", "--body", '{"model": "gpt-4.1"}'])
    out = capsys.readouterr().out
    assert code == 0
    assert "MATCH llm-chat (allow)" in out
    assert "decision: allow" in out
    assert "no    erp-read-only (deny)" in out  # every rule considered is listed


def test_explain_deny_and_hold_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--rules", SUPPORT, "--agent", "billing-bot", "POST",
                 "https://erp.example.com/api/x"]) == 2
    out = capsys.readouterr().out
    assert "decision: deny" in out and "The ERP is read-only for agents." in out
    assert main(["explain", "--rules", SUPPORT, "--agent", "billing-bot", "POST",
                 "https://payments.example.com/v1/refunds", "--body", '{"amount": 9000, "currency": "EUR"}']) == 2
    out = capsys.readouterr().out
    assert "decision: hold" in out and "approval: any of role:finance-lead" in out


def test_explain_json_body_from_file_and_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = tmp_path / "body.json"
    body.write_text('{"text": "hello"}')
    code = main(["explain", "--rules", SUPPORT, "--agent", "support-bot", "--format", "json", "POST",
                 "https://tickets.example.com/api/tickets/12/comments", "--body", f"@{body}",
                 "--header", "X-Trace: 1"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["decision"] == "allow" and out["rules"] == ["ticket-reply"]
    assert out["locks"] == [{"key": "ticket:12", "ttl": 900.0, "rule": "ticket-reply"}]
    assert {t["rule"] for t in out["trace"]} >= {"ticket-reply", "erp-read"}


def test_explain_reads_rules_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BASTION_RULES", SUPPORT)
    assert main(["explain", "--agent", "triage-bot", "GET", "https://tickets.example.com/api/tickets/1"]) == 0


def test_explain_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--rules", SUPPORT, "--agent", "nobody", "GET", "https://x.example/"]) == 1
    assert "not defined in the policy" in capsys.readouterr().err
    assert main(["explain", "--rules", SUPPORT, "--agent", "support-bot", "GET", "not-a-url"]) == 1
    assert "absolute" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\n")
    assert main(["explain", "--rules", str(bad), "--agent", "a", "GET", "https://x.example/"]) == 3
    assert "defaults.effect is required" in capsys.readouterr().err


def test_test_command_reports_failures_with_expected_and_actual(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    suite = tmp_path / "suite_test.yaml"
    suite.write_text("""
- name: passes
  agent: support-bot
  method: GET
  url: https://tickets.example.com/api/tickets/1
  expect: {decision: allow, rules: [ticket-read]}
- name: wrong on purpose
  agent: support-bot
  method: DELETE
  url: https://erp.example.com/api/x
  expect: {decision: allow, rules: [erp-read]}
""")
    assert main(["test", "--rules", SUPPORT, str(suite)]) == 1
    out = capsys.readouterr().out
    assert "PASS passes" in out
    assert f"FAIL wrong on purpose  ({suite}:7)" in out
    assert "decision: expected allow, got deny (rules: erp-read-only)" in out
    assert "rules: expected ['erp-read'] among the determining rules, got ['erp-read-only']" in out
    assert "rules no test exercised:" in out and "llm-chat" in out
    assert "1 passed, 1 failed" in out


def test_require_all_rules_fails_on_a_rule_no_case_reaches(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\ndefaults: {effect: deny}\nagents: {a: {}}\nrules:\n"
                     "  - {id: reads, effect: allow, agents: [a], match: {method: GET}}\n"
                     "  - {id: no-admin, effect: deny, agents: [a], match: {path: /admin/**}}\n"
                     "  - {id: never-reached, effect: allow, agents: [a], match: {host: other.example}}\n")
    suite = tmp_path / "rules_test.yaml"
    suite.write_text("- {name: read, agent: a, method: GET, url: 'https://x.example/a', expect: {decision: allow}}\n"
                     "- {name: admin, agent: a, method: GET, url: 'https://x.example/admin/1', "
                     "expect: {decision: deny}}\n")
    assert main(["test", "--rules", str(rules), str(suite)]) == 0
    out = capsys.readouterr().out
    assert "rules no test exercised: never-reached" in out and "FAIL" not in out
    assert main(["test", "--require-all-rules", "--rules", str(rules), str(suite)]) == 1
    out = capsys.readouterr().out
    assert "FAIL --require-all-rules: 1 rule(s) matched in no test case: never-reached" in out
    assert "2 passed, 0 failed" in out
    with suite.open("a") as f:
        f.write("- {name: other, agent: a, method: GET, url: 'https://other.example/', expect: {decision: allow}}\n")
    assert main(["test", "--require-all-rules", "--rules", str(rules), str(suite)]) == 0
    assert "no test exercised" not in capsys.readouterr().out


def test_require_all_rules_is_documented_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    assert "--require-all-rules" in capsys.readouterr().out


def test_test_command_rejects_malformed_suites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = tmp_path / "bad_test.yaml"
    suite.write_text("- name: x\n  agent: support-bot\n  method: GET\n  url: https://a.example/\n"
                     "  expect: {decison: allow}\n")
    assert main(["test", "--rules", SUPPORT, str(suite)]) == 1
    assert f"{suite}:5: case 1: expect.decison: Extra inputs are not permitted" in capsys.readouterr().out


def test_token_prints_a_token_and_its_hash() -> None:
    out = subprocess.run([sys.executable, "-m", "bastion", "token", "support-bot"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    token, line = out[0], out[1]
    assert token.startswith("bst_") and len(token) > 40
    assert line == f'support-bot: {{token_sha256: "{hashlib.sha256(token.encode()).hexdigest()}"}}'


def test_check_exit_codes_from_a_real_process(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "bastion", "check", SUPPORT], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 1 file(s), 11 rule(s)")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults: {effect: deny}\nagents: {a: {}}\nrules:\n  - {id: r, effect: allow, "
                   "agents: [b]}\n")
    res = subprocess.run([sys.executable, "-m", "bastion", "check", str(bad)], capture_output=True, text=True)
    assert res.returncode == 3
    assert res.stdout == f"{bad}:5: [undefined_agent] rule r: agent 'b' is not defined under `agents`\n"
