"""`bastion agents | milestones | budgets`: as an operator runs them, against real SQLite and Redis stores."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lockhistory import delete_prefix
from services import require_redis

from bastion import cli
from bastion.coord import open_fleet_store

MODULE = "bastion.coord.fleet_commands"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


RULES = f"""\
version: 1
defaults: {{effect: deny}}
agents:
  support-bot: {{roles: [support], token_sha256: "{sha('support-token')}"}}
  billing-bot: {{roles: [billing, support], token_sha256: "{sha('billing-token')}"}}
  legacy-bot: {{status: retired}}
users:
  alice: {{roles: [admin], token_sha256: "{sha('alice-token')}"}}
  bob: {{roles: [viewer], token_sha256: "{sha('bob-token')}"}}
rules: []
budgets:
  - id: calls-per-agent
    limit: {{calls: 100, per: 1h}}
  - id: llm-tokens
    agents: [role:billing]
    limit: {{tokens: 20000, per: 1d}}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("BASTION_USER_TOKEN", "BASTION_RULES", "BASTION_STORE", "BASTION_HOME", "BASTION_AUDIT"):
        monkeypatch.delenv(var, raising=False)
    if MODULE not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, MODULE))


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The store the commands act on, given the way operators do: BASTION_STORE (or the --home default)."""
    if request.param == "sqlite":
        (tmp_path / "home").mkdir()
        monkeypatch.setenv("BASTION_HOME", str(tmp_path / "home"))
        url = f"sqlite:///{tmp_path / 'home' / 'bastion.db'}"
        store_call(url, "list_pauses")  # the sidecar creates the store; the commands only open it
        yield url
        return
    base = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    url = f"{base}?prefix={prefix}"
    monkeypatch.setenv("BASTION_STORE", url)
    yield url
    delete_prefix(base, prefix)


def store_call(url: str, method: str, *args: object) -> object:
    async def go() -> object:
        async with open_fleet_store(url) as store:
            return await getattr(store, method)(*args)

    return asyncio.run(go())


def bastion(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def as_user(rules: Path, user: str) -> list[str]:
    return ["--rules", str(rules), "--user-token", f"{user}-token"]


def test_agents_list_shows_each_agent_and_its_pause(capsys, rules: Path, store_url: str) -> None:
    code, out, err = bastion(capsys, "agents", "list", *as_user(rules, "bob"))
    assert code == 0, err
    assert out.splitlines() == [
        "billing-bot roles=billing,support status=active paused=no",
        "legacy-bot roles=- status=retired paused=no",
        "support-bot roles=support status=active paused=no",
    ]
    store_call(store_url, "pause", "support-bot", "loops on ticket 42", "guard:runaway", "hold")
    code, out, _ = bastion(capsys, "agents", "list", *as_user(rules, "bob"))
    lines = out.splitlines()
    assert lines[0] == "billing-bot roles=billing,support status=active paused=no"
    assert lines[2].startswith("support-bot roles=support status=active paused=hold paused_by=guard:runaway since=")
    assert lines[2].endswith(' reason="loops on ticket 42"')


def test_agents_list_json_with_an_all_agents_pause(capsys, rules: Path, store_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store_call(store_url, "pause", "support-bot", "own", "user:alice")
    store_call(store_url, "pause", "*", "incident 7", "user:alice")
    monkeypatch.setenv("BASTION_USER_TOKEN", "bob-token")
    monkeypatch.setenv("BASTION_RULES", str(rules))
    code, out, _ = bastion(capsys, "agents", "list", "--format", "json")
    assert code == 0
    report = json.loads(out)
    agents = {a["name"]: a for a in report["agents"]}
    assert (agents["support-bot"]["paused"]["agent"], agents["support-bot"]["paused"]["reason"]) == (
        "support-bot", "own")
    assert agents["billing-bot"]["paused"]["agent"] == "*"  # the * pause applies to every agent
    assert (agents["billing-bot"]["roles"], agents["legacy-bot"]["status"]) == (["billing", "support"], "retired")
    assert report["all_paused"]["reason"] == "incident 7"
    assert [p["agent"] for p in report["pauses"]] == ["*", "support-bot"]
    code, out, _ = bastion(capsys, "agents", "list")
    assert out.splitlines()[0].startswith("* (every agent) paused=pause via=* paused_by=user:alice since=")
    assert "billing-bot roles=billing,support status=active paused=pause via=* " in out


def test_admin_pauses_and_resumes(capsys, rules: Path, store_url: str) -> None:
    code, out, err = bastion(capsys, "agents", "pause", "billing-bot", "--reason", "spending spree",
                             *as_user(rules, "alice"))
    assert code == 0, err
    assert out.strip() == 'paused billing-bot on every sidecar, by user:alice: "spending spree"'
    [pause] = store_call(store_url, "list_pauses")  # type: ignore[misc]
    assert (pause.agent, pause.reason, pause.paused_by, pause.action) == (
        "billing-bot", "spending spree", "user:alice", "pause")
    code, out, _ = bastion(capsys, "agents", "resume", "billing-bot", *as_user(rules, "alice"))
    assert code == 0 and out.startswith("resumed billing-bot (paused by user:alice since ")
    assert store_call(store_url, "list_pauses") == []
    code, out, err = bastion(capsys, "agents", "resume", "billing-bot", *as_user(rules, "alice"))
    assert (code, out) == (1, "") and "agent billing-bot is not paused" in err


def test_pause_every_agent_and_resume_one_under_it(capsys, rules: Path, store_url: str) -> None:
    code, out, _ = bastion(capsys, "agents", "pause", "*", "--action", "hold", *as_user(rules, "alice"))
    assert code == 0 and out.strip() == "holding every call of every agent (*) on every sidecar, by user:alice"
    bastion(capsys, "agents", "pause", "support-bot", *as_user(rules, "alice"))
    code, out, err = bastion(capsys, "agents", "resume", "support-bot", *as_user(rules, "alice"))
    assert code == 0 and "every agent is still paused by user:alice (*)" in err
    code, out, _ = bastion(capsys, "agents", "resume", "*", *as_user(rules, "alice"))
    assert code == 0 and out.startswith("resumed every agent (*)")
    code, _, err = bastion(capsys, "agents", "resume", "*", *as_user(rules, "alice"))
    assert code == 1 and "every agent (*) is not paused" in err


def test_pause_needs_an_agent_of_the_rules_and_a_short_reason(capsys, rules: Path, store_url: str) -> None:
    code, out, err = bastion(capsys, "agents", "pause", "nobody", *as_user(rules, "alice"))
    assert (code, out) == (1, "") and "unknown agent 'nobody'" in err
    code, _, err = bastion(capsys, "agents", "pause", "support-bot", "--reason", "x" * 501, *as_user(rules, "alice"))
    assert code == 1 and "longer than 500 characters" in err
    assert store_call(store_url, "list_pauses") == []


def test_changes_need_the_admin_role(capsys, rules: Path, store_url: str) -> None:
    store_call(store_url, "complete_milestone", "extracted:42", 600, "support-bot")
    store_call(store_url, "pause", "support-bot", "why", "user:alice")
    for argv in (["agents", "pause", "billing-bot"], ["agents", "resume", "support-bot"],
                 ["milestones", "complete", "m:1"], ["milestones", "clear", "extracted:42"]):
        code, out, err = bastion(capsys, *argv, *as_user(rules, "bob"))
        assert (code, out) == (1, ""), argv
        assert "user 'bob' may not" in err and "'admin' role" in err
    assert [p.agent for p in store_call(store_url, "list_pauses")] == ["support-bot"]  # type: ignore[attr-defined]
    assert [m.key for m in store_call(store_url, "list_milestones")] == ["extracted:42"]  # type: ignore[attr-defined]
    for argv in (["agents", "list"], ["milestones", "list"], ["budgets", "list"]):
        code, _, err = bastion(capsys, *argv, "--rules", str(rules))
        assert code == 1 and "pass --user-token TOKEN or set BASTION_USER_TOKEN" in err


def test_milestones_complete_list_and_clear(capsys, rules: Path, store_url: str) -> None:
    code, out, err = bastion(capsys, "milestones", "list", *as_user(rules, "bob"))
    assert (code, out) == (0, "") and "no live milestones" in err
    key = "repo:acme/widgets issue 7"
    code, out, _ = bastion(capsys, "milestones", "complete", key, "--ttl", "2h", *as_user(rules, "alice"))
    assert code == 0 and out.startswith(f'completed "{key}" by user:alice; it lives until ')
    code, out, _ = bastion(capsys, "milestones", "complete", "extracted:42", *as_user(rules, "alice"))
    assert code == 0
    code, out, _ = bastion(capsys, "milestones", "list", *as_user(rules, "bob"))
    lines = out.splitlines()
    assert [line.split(" by=")[0] for line in lines] == ["extracted:42", json.dumps(key)]
    assert " by=user:alice completed_at=" in lines[0] and " expires_in=" in lines[0]
    assert lines[1].split(" expires_in=")[1] in ("2h", "1h59m59s")
    code, out, _ = bastion(capsys, "milestones", "list", "--format", "json", *as_user(rules, "bob"))
    listed = json.loads(out)["milestones"]
    assert [(m["key"], m["by"]) for m in listed] == [("extracted:42", "user:alice"), (key, "user:alice")]
    code, out, _ = bastion(capsys, "milestones", "clear", key, *as_user(rules, "alice"))
    assert code == 0 and out.startswith(f'cleared "{key}" (completed by user:alice at ')
    code, out, err = bastion(capsys, "milestones", "clear", key, *as_user(rules, "alice"))
    assert (code, out) == (1, "") and f'no live milestone "{key}"' in err
    code, _, err = bastion(capsys, "milestones", "complete", "k", "--ttl", "60d", *as_user(rules, "alice"))
    assert code == 1 and "milestone ttl" in err


def test_budgets_list_with_and_without_usage(capsys, rules: Path, store_url: str) -> None:
    store_call(store_url, "reserve", "calls-per-agent", "support-bot", "calls", 100, 3600, 3)
    code, out, err = bastion(capsys, "budgets", "list", *as_user(rules, "bob"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "calls-per-agent unit=calls limit=100 per=1h agents=* key={agent}"
    assert lines[1].startswith("  key=support-bot used=3 reserved=0 remaining=97 resets_at=")
    assert lines[2] == "llm-tokens unit=tokens limit=20000 per=1d agents=role:billing key={agent}"
    assert lines[3] == "  used=0 reserved=0 remaining=20000 (nothing used in the current window)"
    code, out, _ = bastion(capsys, "budgets", "list", "--format", "json", *as_user(rules, "bob"))
    budgets = {b["id"]: b for b in json.loads(out)["budgets"]}
    [window] = budgets["calls-per-agent"]["usage"]
    assert (window["key"], window["used"], window["remaining"], window["limit"]) == ("support-bot", 3, 97, 100)
    assert (budgets["llm-tokens"]["unit"], budgets["llm-tokens"]["per"], budgets["llm-tokens"]["usage"]) == (
        "tokens", 86400, [])


def test_values_from_the_store_cannot_break_a_line(capsys, rules: Path, store_url: str) -> None:
    store_call(store_url, "pause", "support-bot", "line one\nline two \x1b[31mred\u009b", "guard:g")
    code, out, _ = bastion(capsys, "agents", "list", *as_user(rules, "bob"))
    assert code == 0 and len(out.splitlines()) == 3
    assert "\x1b" not in out and "\u009b" not in out
    assert 'reason="line one\\nline two \\u001b[31mred\\u009b"' in out


def test_a_missing_store_is_never_created(rules: Path, tmp_path: Path) -> None:
    """Through the real entry point, in a fresh process: exit 2 with a clear line, no traceback, no file."""
    env = {**os.environ, "BASTION_USER_TOKEN": "alice-token", "BASTION_RULES": str(rules)}
    env.pop("BASTION_STORE", None)
    env.pop("BASTION_HOME", None)
    home = tmp_path / "nohome"
    for argv in (["agents", "list"], ["agents", "pause", "support-bot"], ["agents", "resume", "*"],
                 ["milestones", "list"], ["milestones", "complete", "k"], ["milestones", "clear", "k"],
                 ["budgets", "list"]):
        done = subprocess.run([sys.executable, "-m", "bastion", *argv, "--home", str(home)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.startswith("error: the store ") and "does not exist" in done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert not home.exists()


def test_the_installed_command_pauses_an_agent(rules: Path, tmp_path: Path) -> None:
    """`python -m bastion agents pause` in a fresh process: the command is registered in the CLI."""
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'bastion.db'}"
    store_call(url, "list_pauses")
    env = {**os.environ, "BASTION_USER_TOKEN": "alice-token", "BASTION_RULES": str(rules), "BASTION_HOME": str(home)}
    env.pop("BASTION_STORE", None)
    done = subprocess.run([sys.executable, "-m", "bastion", "agents", "pause", "support-bot", "--reason", "stop"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "paused support-bot on every sidecar, by user:alice: stop"
    assert [p.agent for p in store_call(url, "list_pauses")] == ["support-bot"]  # type: ignore[attr-defined]
