"""Command-line tools as users run them: `bastion run` with Node and git, control commands that must not make an
empty store, a policy revision that ignores how the path was spelled, and `bastion token` names."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, TESTDATA_RULES
from services import require_redis
from support.bastion import bastion_cmd, clean_env, run_bastion, run_cli
from support.certs import CertFiles
from support.upstream import Upstream

from bastion.cli import main
from bastion.policy.load import PolicyLoadError, load_policy
from bastion.proxy.identity import parse_basic
from bastion.proxy.run import agent_environment, node_proxy_warning, shebang_interpreter

PROXY_RULES = str(TESTDATA_RULES / "proxy.yaml")  # users alice "alice-token" (admin), bob "bob-token" (viewer)


# -- bastion run: what git and Node get --------------------------------------------------------------------------

def test_run_environment_sets_git_trust_and_basic_proxy_auth() -> None:
    env = agent_environment({"GIT_SSL_CAINFO": "/stale.pem", "GIT_HTTP_PROXY_AUTHMETHOD": "anyauth",
                             "NODE_USE_ENV_PROXY": "0", "NODE_EXTRA_CA_CERTS": "/other.pem"},
                            proxy_url="http://b:t@127.0.0.1:8080", bundle="/h/ca-bundle.pem",
                            ca_cert="/h/mitmproxy-ca-cert.pem", no_proxy="127.0.0.1:8081")
    assert env["GIT_SSL_CAINFO"] == "/h/ca-bundle.pem"
    assert env["GIT_HTTP_PROXY_AUTHMETHOD"] == "basic"
    assert env["NODE_USE_ENV_PROXY"] == "1" and env["NODE_EXTRA_CA_CERTS"] == "/h/mitmproxy-ca-cert.pem"


@pytest.mark.parametrize(("version", "warned", "says"), [
    ("v18.20.4", True, "ignores NODE_USE_ENV_PROXY"),
    ("v20.20.2", True, "ignores NODE_USE_ENV_PROXY"),
    ("v22.20.0", True, "ignores NODE_USE_ENV_PROXY"),
    ("v22.21.0", False, ""),
    ("v23.11.1", True, "ignores NODE_USE_ENV_PROXY"),
    ("v24.0.0", True, "only fetch()"),
    ("v24.4.1", True, "only fetch()"),
    ("v24.5.0", False, ""),
    ("v26.1.0", False, ""),
    ("not a version", True, "cannot tell the Node version"),
])
def test_node_versions_that_bypass_the_proxy_are_named(version: str, warned: bool, says: str) -> None:
    warning = node_proxy_warning(version + "\n")
    assert (warning is not None) == warned
    assert says in (warning or "")


@pytest.mark.parametrize(("first_line", "interpreter"), [
    (b"#!/usr/bin/env node", "node"),
    (b"#!/usr/bin/env -S node --no-warnings", "node"),
    (b"#!/usr/bin/env -u FOO NODE_ENV=production nodejs", "nodejs"),
    (b"#!/opt/node/bin/node", "/opt/node/bin/node"),
    (b"#!/bin/sh", "/bin/sh"),
    (b"\x7fELF\x02\x01", None),
    (b"#!", None),
])
def test_shebang_interpreter(tmp_path: Path, first_line: bytes, interpreter: str | None) -> None:
    script = tmp_path / "script"
    script.write_bytes(first_line + b"\nconsole.log(1)\n")
    assert shebang_interpreter(script) == interpreter


def fake_node(directory: Path, version: str) -> Path:
    """A `node` that answers --version like Node `version` would, logs each --version call, and otherwise prints
    what `bastion run` set for it."""
    directory.mkdir(parents=True, exist_ok=True)
    node = directory / "node"
    node.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo probed >> "{directory}/probes"; echo "{version}"; exit 0; fi
        echo "node ran $1 proxy=$NODE_USE_ENV_PROXY ca=$NODE_EXTRA_CA_CERTS"
        """))
    node.chmod(node.stat().st_mode | stat.S_IEXEC)
    return node


def run_with_path(bin_dir: Path, home: Path, *command: str) -> subprocess.CompletedProcess[str]:
    env = clean_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})
    return subprocess.run(bastion_cmd("run", "--agent", "bot", "--proxy", "http://127.0.0.1:9", "--home", str(home),
                                      "--", *command), cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_run_warns_when_node_is_too_old_to_honour_the_proxy(tmp_path: Path, bastion_home: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_node(bin_dir, "v20.11.1")
    result = run_with_path(bin_dir, bastion_home, "node", "agent.js")
    assert result.returncode == 0, result.stderr
    assert "bastion run: warning: Node v20.11.1 ignores NODE_USE_ENV_PROXY" in result.stderr
    assert "connect directly" in result.stderr and "24.5" in result.stderr
    assert result.stdout.strip() == f"node ran agent.js proxy=1 ca={bastion_home / 'mitmproxy-ca-cert.pem'}"


def test_run_checks_node_behind_a_shebang_script(tmp_path: Path, bastion_home: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_node(bin_dir, "v22.12.0")
    script = bin_dir / "my-agent"
    script.write_text("#!/usr/bin/env node\nconsole.log('hi')\n")
    script.chmod(0o755)
    result = run_with_path(bin_dir, bastion_home, "my-agent")
    assert result.returncode == 0, result.stderr
    assert "Node v22.12.0 ignores NODE_USE_ENV_PROXY" in result.stderr
    assert result.stdout.startswith(f"node ran {script} proxy=1")


def test_run_is_quiet_for_a_current_node_and_never_asks_other_programs(tmp_path: Path, bastion_home: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_node(bin_dir, "v24.5.0")
    result = run_with_path(bin_dir, bastion_home, "node", "agent.js")
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    assert (bin_dir / "probes").read_text().count("probed") == 1
    (bin_dir / "probes").unlink()
    result = run_with_path(bin_dir, bastion_home, sys.executable, "-c", "print('python agent')")
    assert result.returncode == 0 and result.stdout.strip() == "python agent"
    assert "warning" not in result.stderr and not (bin_dir / "probes").exists()  # node was never run


# -- control commands never create the store they are pointed at -------------------------------------------------

def files_under(path: Path) -> list[Path]:
    return list(path.rglob("*"))


@pytest.mark.parametrize("argv", [
    ["locks", "list", "--rules", PROXY_RULES, "--user-token", "bob-token"],
    ["locks", "release", "k", "--rules", PROXY_RULES, "--user-token", "alice-token"],
    ["approvals", "list", "--rules", PROXY_RULES, "--user-token", "bob-token"],
    ["approvals", "grants", "--rules", PROXY_RULES, "--user-token", "bob-token"],
    ["audit", "tail"],
    ["audit", "verify"],
    ["audit", "export", "--format", "jsonl"],
], ids=lambda a: " ".join(a[:2]))
def test_control_commands_refuse_a_home_that_holds_no_store(tmp_path: Path, argv: list[str]) -> None:
    """No --home, no BASTION_HOME: the default ~/.bastion of a user who never ran Bastion."""
    result = run_cli(*argv, env={"HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path}/.bastion/bastion.db does not exist" in result.stderr
    assert "--home" in result.stderr and "BASTION_HOME" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert files_under(tmp_path) == []  # nothing created: no directory, no empty database


def test_a_store_or_audit_url_naming_a_missing_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    result = run_cli("locks", "list", "--store", f"sqlite:///{missing}", "--rules", PROXY_RULES,
                     "--user-token", "bob-token", env={"HOME": str(tmp_path)})
    assert result.returncode == 2 and f"{missing} does not exist" in result.stderr
    assert "--store" in result.stderr
    result = run_cli("audit", "tail", "--audit", f"jsonl:///{tmp_path}/no-dir", env={"HOME": str(tmp_path)})
    assert result.returncode == 2 and "no-dir does not exist" in result.stderr and "--audit" in result.stderr
    assert files_under(tmp_path) == []


def test_redis_stores_are_not_checked_for_files(tmp_path: Path) -> None:
    url = require_redis() + "?prefix=bastiontest-cli-tools-empty:"
    result = run_cli("locks", "list", "--store", url, "--rules", PROXY_RULES, "--user-token", "bob-token",
                     env={"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "no live locks" in result.stderr


def test_control_commands_read_the_store_a_sidecar_created(tmp_path: Path, test_certs: CertFiles,
                                                           upstream: Upstream) -> None:
    home = tmp_path / "home"
    with run_bastion(tmp_path / "srv", [TESTDATA_RULES / "proxy.yaml"], home=home,
                     upstream_ca=test_certs.ca_cert) as server:
        with server.session("support-bot", "sb-token:with:colons") as s:
            assert s.post(f"{upstream.http_url}/echo/tickets/7/comments", json={}, timeout=10).status_code == 200
        listed = run_cli("locks", "list", "--home", str(home), "--rules", PROXY_RULES, "--user-token", "bob-token")
        assert listed.returncode == 0 and listed.stdout.startswith("ticket:7 holder=support-bot"), listed.stderr
    tail = run_cli("audit", "tail", "--home", str(home))
    assert tail.returncode == 0 and "/echo/tickets/7/comments" in tail.stdout


# -- the policy revision is the content, not the path --------------------------------------------------------------

POLICY = "version: 1\ndefaults: {effect: deny}\nagents: {bot: {}}\n"
RULES = "version: 1\nrules:\n  - {id: r1, effect: allow, agents: [bot], match: {host: example.com}}\n"


def test_revision_ignores_how_the_path_is_spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a-base.yaml").write_text(POLICY)
    (rules / "b-rules.yaml").write_text(RULES)
    (tmp_path / "link").symlink_to(rules)
    monkeypatch.chdir(tmp_path)
    by_dir = {load_policy([spelling]).revision for spelling in ("rules", "./rules/", str(rules), "link", "../"
                                                                 + tmp_path.name + "/rules")}
    assert len(by_dir) == 1
    by_file = {load_policy(spelling).revision for spelling in (
        ["rules/a-base.yaml", "rules/b-rules.yaml"], [str(rules / "a-base.yaml"), "link/b-rules.yaml"])}
    assert by_file == by_dir
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    for f in rules.iterdir():
        (elsewhere / f.name).write_bytes(f.read_bytes())
    assert load_policy([elsewhere]).revision in by_dir


def test_revision_follows_content_and_which_file_holds_it(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.yaml").write_text(POLICY)
    (rules / "b.yaml").write_text(RULES)
    before = load_policy([rules]).revision
    (rules / "b.yaml").write_text(RULES.replace("example.com", "example.org"))
    assert load_policy([rules]).revision != before
    (rules / "b.yaml").write_text(RULES)
    assert load_policy([rules]).revision == before
    # Same texts, swapped between the files: the rules now come from other places (explain, the audit and
    # error messages point at FILE:LINE), so this is another revision.
    (rules / "a.yaml").write_text(RULES.replace("version: 1\n", "version: 1\ndefaults: {effect: deny}\n"
                                                "agents: {bot: {}}\n"))
    (rules / "b.yaml").write_text("version: 1\n")
    swapped = load_policy([rules]).revision
    (rules / "a.yaml").write_text("version: 1\n")
    (rules / "b.yaml").write_text(RULES.replace("version: 1\n", "version: 1\ndefaults: {effect: deny}\n"
                                                "agents: {bot: {}}\n"))
    assert load_policy([rules]).revision != swapped


def test_check_prints_one_revision_from_any_working_directory(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + RULES.removeprefix("version: 1\n"))
    env = clean_env()
    relative = subprocess.run(bastion_cmd("check", "--format", "json", "policy.yaml"), cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    absolute = subprocess.run(bastion_cmd("check", "--format", "json", str(policy)), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    assert relative.returncode == absolute.returncode == 0, relative.stderr + absolute.stderr
    assert json.loads(relative.stdout)["revision"] == json.loads(absolute.stdout)["revision"]


# -- bastion token: exactly the names the rules accept, and that can authenticate ----------------------------------

NAMES = [
    ("support-bot", True),
    ("ops@team.bot-1_x", True),
    ("A", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("bad name:x", False),
    ("a:b", False),
    ("-leading-dash", False),
    (".hidden", False),
    ("", False),
    ("bot\n", False),
    ("bot ", False),
    ("böt", False),
    ("a/b", False),
    ("a%3Ab", False),
]


def token_for(name: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, str] | None:
    """(token, YAML line) from `bastion token NAME`, or None when it refused the name (exit 2, nothing on
    stdout)."""
    capsys.readouterr()
    try:
        code = main(["token", "--", name])
    except SystemExit as e:
        out, err = capsys.readouterr()
        assert e.code == 2 and out == "" and "bad agent or user name" in err
        return None
    out, _ = capsys.readouterr()
    assert code == 0
    token, line = out.splitlines()
    return token, line


@pytest.mark.parametrize(("name", "valid"), NAMES, ids=[repr(n)[:24] for n, _ in NAMES])
def test_token_accepts_exactly_the_names_the_rules_accept(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          name: str, valid: bool) -> None:
    made = token_for(name, capsys)
    assert (made is not None) == valid
    policy = tmp_path / "p.yaml"
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    policy.write_text(f"version: 1\ndefaults: {{effect: deny}}\nagents:\n  {quoted}: {{}}\n")
    try:
        load_policy([policy])
        accepted = True
    except PolicyLoadError as e:
        accepted = False
        assert "bad agent name" in str(e)
    assert accepted == valid
    if made is not None:  # the printed line, pasted under `agents:`, authenticates with the printed token
        token, line = made
        policy.write_text(f"version: 1\ndefaults: {{effect: deny}}\nagents:\n  {line}\n")
        header = "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()
        parsed = parse_basic(header)
        assert parsed == (name, token)
        assert load_policy([policy]).authenticate_agent(*parsed) is not None


def test_the_rules_refuse_an_agent_name_with_a_colon(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text('version: 1\ndefaults: {effect: deny}\nagents:\n  "ci:bot": {}\nusers:\n  "a:b": {}\n')
    with pytest.raises(PolicyLoadError) as caught:
        load_policy([policy])
    messages = [i.message for i in caught.value.issues]
    assert any("bad agent name 'ci:bot'" in m and "':' separates" in m for m in messages), messages
    assert any("bad user name 'a:b'" in m for m in messages), messages
    assert all(i.line for i in caught.value.issues)


def test_an_agent_named_with_every_allowed_character_authenticates_through_the_proxy(
        tmp_path: Path, bastion_home: Path, upstream: Upstream, capsys: pytest.CaptureFixture[str]) -> None:
    name = "ops@team.bot-1_x"
    made = token_for(name, capsys)
    assert made is not None
    token, line = made
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"version: 1\ndefaults: {{effect: deny}}\nagents:\n  {line}\nrules:\n"
                     f"  - {{id: local, effect: allow, agents: [{name}], match: {{host: 127.0.0.1}}}}\n"
                     "network: {allow_private: [127.0.0.0/8]}\n")
    with run_bastion(tmp_path / "srv", [rules], home=bastion_home) as server:
        with server.session(name, token) as s:  # percent-encoded in the proxy URL, as `bastion run` does
            ok = s.get(f"{upstream.http_url}/echo/named", timeout=10)
        with server.session(name, token + "x") as s:
            refused = s.get(f"{upstream.http_url}/echo/named", timeout=10)
    assert ok.status_code == 200 and ok.json()["path"] == "/echo/named"
    assert refused.status_code == 407
