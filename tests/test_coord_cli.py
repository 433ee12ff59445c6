"""`bastion locks list | release | handoff`: as an operator runs them, against real SQLite and Redis stores."""

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
from lockhistory import delete_prefix, free_port
from services import require_redis

from bastion import cli
from bastion.coord import Conflict, Lease, LockInfo, open_store

MODULE = "bastion.coord.commands"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


RULES = f"""\
version: 1
defaults: {{effect: deny}}
agents:
  support-bot: {{roles: [support], token_sha256: "{sha('support-token')}"}}
  billing-bot: {{roles: [support], token_sha256: "{sha('billing-token')}"}}
  legacy-bot: {{status: retired}}
users:
  alice: {{roles: [admin], token_sha256: "{sha('alice-token')}"}}
  bob: {{roles: [approver], token_sha256: "{sha('bob-token')}"}}
rules: []
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
        store_call(url, "list_locks")  # the sidecar creates the store; the commands only open it
        yield url
        return
    base = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    url = f"{base}?prefix={prefix}"
    monkeypatch.setenv("BASTION_STORE", url)
    yield url
    delete_prefix(base, prefix)


def seed_locks(url: str, *grants: tuple[str, str]) -> list[Lease]:
    async def go() -> list[Lease]:
        async with open_store(url) as store:
            leases = [await store.acquire(key, agent, 600) for key, agent in grants]
        assert all(isinstance(lease, Lease) for lease in leases)
        return leases  # type: ignore[return-value]

    return asyncio.run(go())


def store_call(url: str, method: str, *args: object) -> object:
    async def go() -> object:
        async with open_store(url) as store:
            return await getattr(store, method)(*args)

    return asyncio.run(go())


def bastion(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_one_lock_a_line(capsys, rules: Path, store_url: str) -> None:
    leases = seed_locks(store_url, ("ticket:42", "support-bot"), ("ticket:7", "billing-bot"))
    code, out, err = bastion(capsys, "locks", "list", "--rules", str(rules), "--user-token", "bob-token")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["ticket:42", "ticket:7"]
    assert f"holder=support-bot fence={leases[0].fence} " in lines[0]
    assert "expires_in=" in lines[0] and "handoff_to" not in lines[0]


def test_list_json_for_scripts(capsys, rules: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    [lease] = seed_locks(store_url, ("ticket:42", "support-bot"))
    store_call(store_url, "handoff", "ticket:42", "billing-bot")
    monkeypatch.setenv("BASTION_USER_TOKEN", "bob-token")
    monkeypatch.setenv("BASTION_RULES", str(rules))
    code, out, _ = bastion(capsys, "locks", "list", "--format", "json")
    assert code == 0
    [item] = json.loads(out)["locks"]
    assert (item["key"], item["holder"], item["fence"], item["handoff_to"]) == (
        "ticket:42", "support-bot", lease.fence, "billing-bot")


def test_empty_list_prints_no_lines(capsys, rules: Path, store_url: str) -> None:
    code, out, err = bastion(capsys, "locks", "list", "--rules", str(rules), "--user-token", "bob-token")
    assert (code, out) == (0, "")
    assert "no live locks" in err
    code, out, _ = bastion(capsys, "locks", "list", "--format", "json", "--rules", str(rules),
                           "--user-token", "bob-token")
    assert json.loads(out) == {"locks": []}


def test_admin_releases_a_lock(capsys, rules: Path, store_url: str) -> None:
    [lease] = seed_locks(store_url, ("ticket:42", "support-bot"))
    code, out, _ = bastion(capsys, "locks", "release", "ticket:42", "--rules", str(rules),
                           "--user-token", "alice-token")
    assert code == 0
    assert out.strip() == f"released ticket:42 (held by support-bot, fence {lease.fence})"
    assert store_call(store_url, "get", "ticket:42") is None
    code, _, err = bastion(capsys, "locks", "release", "ticket:42", "--rules", str(rules),
                           "--user-token", "alice-token")
    assert code == 1 and "no live lock ticket:42" in err


def test_admin_hands_a_lock_off(capsys, rules: Path, store_url: str) -> None:
    [lease] = seed_locks(store_url, ("ticket:42", "support-bot"))
    code, out, _ = bastion(capsys, "locks", "handoff", "ticket:42", "--to", "billing-bot", "--ttl", "10m",
                           "--rules", str(rules), "--user-token", "alice-token")
    assert code == 0
    assert "from support-bot to billing-bot" in out
    refused = store_call(store_url, "acquire", "ticket:42", "support-bot", 60)
    assert isinstance(refused, Conflict) and (refused.holder, refused.pending) == ("billing-bot", True)
    claimed = store_call(store_url, "acquire", "ticket:42", "billing-bot", 60)
    assert isinstance(claimed, Lease) and claimed.fence > lease.fence


def test_handoff_needs_a_live_lock_and_an_active_agent(capsys, rules: Path, store_url: str) -> None:
    base = ["--rules", str(rules), "--user-token", "alice-token"]
    code, _, err = bastion(capsys, "locks", "handoff", "ticket:42", "--to", "billing-bot", *base)
    assert code == 1 and "no live lock ticket:42" in err
    seed_locks(store_url, ("ticket:42", "support-bot"))
    code, _, err = bastion(capsys, "locks", "handoff", "ticket:42", "--to", "nobody", *base)
    assert code == 1 and "unknown agent 'nobody'" in err
    code, _, err = bastion(capsys, "locks", "handoff", "ticket:42", "--to", "legacy-bot", *base)
    assert code == 1 and "retired" in err
    info = store_call(store_url, "get", "ticket:42")
    assert isinstance(info, LockInfo) and (info.holder, info.handoff_to) == ("support-bot", None)


def test_release_and_handoff_need_the_admin_role(capsys, rules: Path, store_url: str) -> None:
    seed_locks(store_url, ("ticket:42", "support-bot"))
    base = ["--rules", str(rules), "--user-token", "bob-token"]
    for argv in (["release", "ticket:42"], ["handoff", "ticket:42", "--to", "billing-bot"]):
        code, out, err = bastion(capsys, "locks", *argv, *base)
        assert (code, out) == (1, "")
        assert "user 'bob' may not" in err and "'admin' role" in err
    info = store_call(store_url, "get", "ticket:42")
    assert isinstance(info, LockInfo) and (info.holder, info.handoff_to) == ("support-bot", None)


@pytest.mark.parametrize(("argv", "message"), [
    (["--rules", "RULES"], "pass --user-token TOKEN or set BASTION_USER_TOKEN"),
    (["--rules", "RULES", "--user-token", "wrong"], "the user token is not valid"),
    (["--rules", "RULES", "--user-token", "support-token"], "the user token is not valid"),  # an agent's
    (["--user-token", "bob-token"], "pass --rules PATH or set BASTION_RULES"),
])
def test_missing_or_invalid_user_is_refused(capsys, rules: Path, tmp_path: Path, argv: list[str],
                                            message: str) -> None:
    argv = [str(rules) if a == "RULES" else a for a in argv]
    code, out, err = bastion(capsys, "locks", "list", "--home", str(tmp_path / "home"), *argv)
    assert (code, out) == (1, "")
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "home").exists()  # refused before touching the store


def test_invalid_rules_are_reported(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: [\n")
    code, _, err = bastion(capsys, "locks", "list", "--rules", str(bad), "--user-token", "bob-token",
                           "--home", str(tmp_path))
    assert code == 1 and "the rules are invalid" in err and "bad.yaml" in err


def test_store_down_is_one_clear_line(rules: Path, tmp_path: Path) -> None:
    """Through the real entry point, in a fresh process: exit 1, a message naming the store, no traceback."""
    port = free_port()
    program = (f"import sys; from bastion import cli; cli.COMMAND_MODULES += ({MODULE!r},) "
               f"if {MODULE!r} not in cli.COMMAND_MODULES else (); sys.exit(cli.main())")
    env = {**os.environ, "BASTION_USER_TOKEN": "alice-token", "BASTION_RULES": str(rules)}
    for store in (f"redis://127.0.0.1:{port}/0", f"sqlite:///{tmp_path}/missing/dir/bastion.db"):
        for action in (["list"], ["release", "ticket:42"], ["handoff", "ticket:42", "--to", "billing-bot"]):
            done = subprocess.run([sys.executable, "-c", program, "locks", *action, "--store", store],
                                  env=env, capture_output=True, text=True, timeout=60)
            if store.startswith("sqlite"):  # a store that does not exist is never created (exit 2)
                assert done.returncode == 2, done.stderr
                assert done.stderr.startswith("error: the store ") and "does not exist" in done.stderr
            else:
                assert done.returncode == 1, done.stderr
                assert done.stderr.startswith("error: lock store ") and "unavailable" in done.stderr
            assert "Traceback" not in done.stderr and done.stdout == ""


def test_bad_store_url_is_refused(capsys, rules: Path) -> None:
    code, _, err = bastion(capsys, "locks", "list", "--store", "mysql://app:s3cret@db/x", "--rules", str(rules),
                           "--user-token", "bob-token")
    assert code == 1 and "unsupported store URL" in err and "s3cret" not in err


def test_default_store_lives_under_home(capsys, rules: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    seed_home = f"sqlite:///{home / 'bastion.db'}"
    code, _, err = bastion(capsys, "locks", "list", "--home", str(home), "--rules", str(rules),
                           "--user-token", "bob-token")
    assert code == 2 and str(home / "bastion.db") in err and not home.exists()  # never created by a reader
    home.mkdir()
    seed_locks(seed_home, (f"ticket:{uuid.uuid4().hex[:6]}", "support-bot"))
    code, out, _ = bastion(capsys, "locks", "list", "--home", str(home), "--rules", str(rules),
                           "--user-token", "bob-token")
    assert code == 0 and "holder=support-bot" in out
