"""Every invalid policy under testdata/policy/invalid names its file, line and code, and `bastion check` exits 3.

Each file starts with one or more `# expect: LINE: [CODE] TEXT` lines (LINE 0: no line known; `[CODE] ` may be
left out): together they are exactly the errors `bastion check` must print, no more and no fewer, each an
output line `FILE:LINE: [CODE] message` whose message contains TEXT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.policy.load import ISSUE_CODES, PolicyIssue, PolicyLoadError, load_policy

INVALID = sorted((Path(__file__).parent / "testdata" / "policy" / "invalid").glob("*.yaml"))
EXAMPLES = Path(__file__).parent.parent / "rules"
ERRORS_DOC = Path(__file__).parent.parent / "docs" / "policy-errors.md"
_EXPECT = re.compile(r"# expect: (\d+): (?:\[([a-z_]+)\] )?(.*)")


@dataclass(frozen=True)
class Expected:
    line: int
    code: str | None
    text: str

    def matches(self, path: Path, out_line: str) -> bool:
        where = f"{path}:{self.line}: " if self.line else f"{path}: "
        if not out_line.startswith(where):
            return False
        m = re.match(r"\[([a-z_]+)\] (.*)", out_line[len(where):])
        return m is not None and self.code in (None, m.group(1)) and self.text in m.group(2)


def expectations(path: Path) -> list[Expected]:
    """The `# expect:` lines of the file's leading comment block."""
    found = []
    for raw in path.read_text().splitlines():
        if not raw.startswith("#"):
            break
        if raw.startswith("# expect:"):
            m = _EXPECT.fullmatch(raw)
            assert m, f"{path}: bad header {raw!r}: write '# expect: LINE: [CODE] TEXT'"
            found.append(Expected(int(m.group(1)), m.group(2), m.group(3).strip()))
    assert found, f"{path} lacks its '# expect: LINE: [CODE] TEXT' header"
    return found


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_policy_reports_exactly_the_expected_errors(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = expectations(path)
    unknown = {e.code for e in expected if e.code is not None} - set(ISSUE_CODES)
    assert not unknown, f"{path}: codes not in ISSUE_CODES: {unknown}"
    assert main(["check", str(path)]) == 3
    out = capsys.readouterr().out
    assert "Traceback" not in out
    printed = out.splitlines()
    unmatched = list(printed)
    for exp in expected:
        hit = next((ln for ln in unmatched if exp.matches(path, ln)), None)
        assert hit is not None, f"expected {exp} among the errors not yet matched:\n" + "\n".join(unmatched)
        unmatched.remove(hit)
    assert not unmatched, "errors no '# expect:' line names:\n" + "\n".join(unmatched)


def test_expect_header_mismatch_is_caught(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The exactness the parametrized test relies on: an unnamed error, or a wrong code, fails it."""
    f = tmp_path / "two.yaml"
    f.write_text("# expect: 3: [unknown_key] unknown key 'rule'\nversion: 1\nrule: []\nagnets: {}\n")
    with pytest.raises(AssertionError, match="errors no '# expect:' line names"):
        test_invalid_policy_reports_exactly_the_expected_errors(f, capsys)
    f.write_text("# expect: 3: [bad_value] unknown key 'rule'\nversion: 1\nrule: []\n")
    with pytest.raises(AssertionError, match="expected Expected"):
        test_invalid_policy_reports_exactly_the_expected_errors(f, capsys)


def test_every_code_is_documented() -> None:
    """docs/policy-errors.md has one `### code` section per code, and no other."""
    documented = re.findall(r"^### `([a-z_]+)`$", ERRORS_DOC.read_text(), re.MULTILINE)
    assert sorted(documented) == sorted(ISSUE_CODES)
    assert len(documented) == len(set(documented))


def test_issue_codes_are_checked_and_rendered() -> None:
    issue = PolicyIssue("p.yaml", 3, "duplicate rule id 'r'", "duplicate_rule")
    assert str(issue) == "p.yaml:3: duplicate rule id 'r'"  # what logs and tests of logs read
    assert issue.coded() == "p.yaml:3: [duplicate_rule] duplicate rule id 'r'"
    assert PolicyIssue("p.yaml", None, "m", "no_such_file").coded() == "p.yaml: [no_such_file] m"
    assert issue.to_json() == {"file": "p.yaml", "line": 3, "code": "duplicate_rule",
                               "message": "duplicate rule id 'r'"}
    with pytest.raises(ValueError, match="unknown policy issue code"):
        PolicyIssue("p.yaml", 3, "m", "duplicate_rules")


def test_directory_merges_files_and_skips_tests_and_hidden(tmp_path: Path) -> None:
    (tmp_path / "00-base.yaml").write_text("version: 1\ndefaults: {effect: deny}\nagents: {a: {}}\n")
    (tmp_path / "10-rules.yml").write_text("version: 1\nrules:\n  - {id: r, effect: allow, agents: [a]}\n")
    (tmp_path / "10-rules_test.yaml").write_text("- not: a policy\n")
    (tmp_path / ".hidden.yaml").write_text("garbage: [\n")
    (tmp_path / "notes.txt").write_text("ignored")
    policy = load_policy([tmp_path])
    assert [r.id for r in policy.rules] == ["r"]
    assert [Path(s).name for s in policy.sources] == ["00-base.yaml", "10-rules.yml"]


def test_duplicates_across_files_name_both_places(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("version: 1\ndefaults: {effect: deny}\nagents: {bot: {}}\n")
    (tmp_path / "b.yaml").write_text("version: 1\nagents:\n  bot: {roles: [x]}\n")
    with pytest.raises(PolicyLoadError) as e:
        load_policy([tmp_path])
    (issue,) = e.value.issues
    assert issue.file.endswith("b.yaml") and issue.line == 3 and issue.code == "duplicate_agent"
    assert "duplicate agent 'bot'" in issue.message and "a.yaml:3" in issue.message


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError) as e:
        load_policy([tmp_path / "nope.yaml", tmp_path])
    messages = [i.message for i in e.value.issues]
    assert "no such file or directory" in messages[0]
    assert "holds no *.yaml" in messages[1]
    assert [i.code for i in e.value.issues] == ["no_such_file", "no_policy_files"]


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    for name, text, code in (("empty.yaml", "the file is empty", "empty_file"),
                             ("list.yaml", "must be a mapping", "not_a_mapping")):
        with pytest.raises(PolicyLoadError) as e:
            load_policy([tmp_path / name])
        assert text in str(e.value)
        assert [i.code for i in e.value.issues] == [code]


def test_check_accepts_the_shipped_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLES / "default.yaml")]) == 0
    for example in sorted((EXAMPLES / "examples").glob("*.yaml")):
        if not example.name.endswith("_test.yaml"):
            assert main(["check", str(example)]) == 0, capsys.readouterr()
    assert "ok:" in capsys.readouterr().out


def test_check_json_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults: {effect: maybe}\n")
    assert main(["check", "--format", "json", str(bad)]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["errors"][0]["line"] == 2
    assert out["errors"][0]["code"] == "bad_value" and out["errors"][0]["message"].startswith("defaults.effect:")


def test_revision_changes_with_content(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("version: 1\ndefaults: {effect: deny}\n")
    r1 = load_policy([f]).revision
    f.write_text("version: 1\ndefaults: {effect: allow}\n")
    assert load_policy([f]).revision != r1


def test_normalize_defaults_and_section(tmp_path: Path) -> None:
    from bastion.policy.facts import NormalizeSettings

    f = tmp_path / "p.yaml"
    f.write_text("version: 1\ndefaults: {effect: deny}\n")
    assert load_policy([f]).normalize == NormalizeSettings("cautious", "reject", frozenset())
    (tmp_path / "p.yaml").write_text("version: 1\ndefaults: {effect: deny}\n")
    (tmp_path / "q.yaml").write_text("version: 1\nnormalize:\n  path_case: insensitive\n  escaped_slashes: decode\n"
                                     "  allow: [trailing_dot, semicolon, trailing_dot]\n")
    got = load_policy([tmp_path]).normalize
    assert got == NormalizeSettings("insensitive", "decode", frozenset({"semicolon", "trailing_dot"}))


def test_normalize_is_set_in_one_file_only(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("version: 1\ndefaults: {effect: deny}\nnormalize: {path_case: sensitive}\n")
    (tmp_path / "b.yaml").write_text("version: 1\n\nnormalize: {path_case: insensitive}\n")
    with pytest.raises(PolicyLoadError) as e:
        load_policy([tmp_path])
    (issue,) = e.value.issues
    assert issue.file.endswith("b.yaml") and issue.line == 3 and issue.code == "duplicate_section"
    assert "`normalize` is already set in" in issue.message and "a.yaml:3" in issue.message


@pytest.mark.parametrize(("rule", "code"), [
    ("match: {method: 'GET POST'}", "bad_method"),
    ("match: {scheme: ftp}", "bad_scheme"),
    ("match: {port: 70000}", "bad_port"),
    ("match: {headers: {x-a: {regex: '['}}}", "bad_regex"),
    ("match: {json: {regex: [1, 2]}}", "bad_condition"),  # a field named `regex` is not a regex
    ("match: {mcp: {args: {to: {regex: '('}}}}", "bad_regex"),
    ("unless: {}", "empty_unless"),
    ("unless: [{path: 'no-slash'}]", "bad_path"),
    ("lock: {key: '{nope'}", "bad_template"),
    ("lock: {key: k, ttl: 0}", "bad_duration"),
])
def test_compile_problems_carry_their_code(tmp_path: Path, rule: str, code: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(f"version: 1\ndefaults: {{effect: deny}}\nagents: {{a: {{}}}}\nrules:\n"
                 f"  - {{id: r, effect: hold, agents: [a], {rule[:rule.index(':')]}: {rule[rule.index(':') + 2:]}}}\n")
    with pytest.raises(PolicyLoadError) as e:
        load_policy([f])
    assert [i.code for i in e.value.issues] == [code], e.value.issues


def test_section_and_name_codes(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("version: 1\ndefaults: {effect: deny}\naudit: {}\nusers: {u: {}}\n"
                                     "agents: {'bad name': {}, b: {owner: nobody}}\n"
                                     "budgets: [{id: x, limit: {calls: 1, per: 1m}}, {id: x, limit: {calls: 2, "
                                     "per: 1m}}]\nguards: [{id: g, when: {denials: 1, per: 1m}}, {id: g, when: "
                                     "{denials: 2, per: 1m}}]\n")
    (tmp_path / "b.yaml").write_text("version: 1\ndefaults: {effect: deny}\naudit: {redact_patterns: ['(']}\n"
                                     "users: {u: {}}\nnetwork: {allow_private: [nope]}\n")
    with pytest.raises(PolicyLoadError) as e:
        load_policy([tmp_path])
    assert sorted(i.code for i in e.value.issues) == sorted([
        "duplicate_section", "duplicate_section", "duplicate_user", "bad_name", "undefined_user",
        "duplicate_budget", "duplicate_guard", "bad_cidr"]), e.value.issues
