"""Every invalid policy under testdata/policy/invalid names its file and line, and `bastion check` exits 3.

Each file starts with `# expect: LINE: TEXT`: the error `bastion check` must print (LINE 0: no line known).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.policy.load import PolicyLoadError, load_policy

INVALID = sorted((Path(__file__).parent / "testdata" / "policy" / "invalid").glob("*.yaml"))
EXAMPLES = Path(__file__).parent.parent / "rules"


def expectation(path: Path) -> tuple[int, str]:
    m = re.match(r"# expect: (\d+): (.*)", path.read_text().splitlines()[0])
    assert m, f"{path} lacks its '# expect: LINE: TEXT' header"
    return int(m.group(1)), m.group(2).strip()


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_policy_reports_file_and_line(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line, text = expectation(path)
    assert main(["check", str(path)]) == 3
    out = capsys.readouterr().out
    prefix = f"{path}:{line}: " if line else f"{path}: "
    assert any(ln.startswith(prefix) and text in ln for ln in out.splitlines()), out
    assert "Traceback" not in out


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(
        "version: 1\ndefaults: {effect: deny}\nagents: {a: {}}\nrules:\n"
        "  - {id: r1, effect: allow, agents: [nobody]}\n"
        "  - {id: r2, effect: allow, agents: ['role:ghost']}\n"
        "  - {id: r3, effect: deny, agents: [a], match: {json: {x: {regex: '('}}}}\n"
        "  - id: r4\n"
        "    effect: allow\n"
        "    agents: [ghost]\n"
        "    match: {host: 'a.*.com'}\n"
        "    message: never shown\n"
    )
    with pytest.raises(PolicyLoadError) as e:
        load_policy([f])
    assert [(i.line, i.message.split(":")[0]) for i in e.value.issues] == [
        (5, "rule r1"), (6, "rule r2"), (7, "rule r3"), (10, "rule r4"), (11, "rule r4"), (12, "rule r4")]


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
    assert issue.file.endswith("b.yaml") and issue.line == 3
    assert "duplicate agent 'bot'" in issue.message and "a.yaml:3" in issue.message


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError) as e:
        load_policy([tmp_path / "nope.yaml", tmp_path])
    messages = [i.message for i in e.value.issues]
    assert "no such file or directory" in messages[0]
    assert "holds no *.yaml" in messages[1]


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    for name, text in (("empty.yaml", "the file is empty"), ("list.yaml", "must be a mapping")):
        with pytest.raises(PolicyLoadError) as e:
            load_policy([tmp_path / name])
        assert text in str(e.value)


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
    assert issue.file.endswith("b.yaml") and issue.line == 3
    assert "`normalize` is already set in" in issue.message and "a.yaml:3" in issue.message
