"""`bastion audit tail | show | export | verify` as a user runs them: a real process, real output, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.audit.sample import sample_exchange
from bastion.audit.writer import AuditWriter

ROOT = Path(__file__).resolve().parent.parent
BOOT = ("import sys; from bastion import cli; "
        "cli.COMMAND_MODULES += tuple(m for m in ('bastion.audit.commands',) if m not in cli.COMMAND_MODULES); "
        "sys.exit(cli.main())")
T0 = 1_795_000_000_000_000  # 2026-11-18T11:06:40Z
MIN_US = 60_000_000


def bastion(*args: str, env: dict[str, str] | None = None,
            home: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    if home is not None:
        full_env["BASTION_HOME"] = str(home)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", BOOT, *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=full_env)


async def fill(url: str, spool: Path, plan: list[tuple[str, int]]) -> list[str]:
    """One record per (agent, minute after T0); returns ids in that order."""
    writer = await AuditWriter.open(url, spool)
    ids = []
    for i, (agent, minute) in enumerate(plan):
        rec, req, resp = sample_exchange(seed=i, agent=agent, body_words=20)
        rec.started_us = rec.ended_us = T0 + minute * MIN_US
        assert writer.submit(rec, req, resp)
        ids.append(rec.id)
    assert await writer.flush()
    await writer.close()
    return ids


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, list[str]]]:
    base = tmp_path_factory.mktemp("audit-cli")
    url = f"sqlite:///{base}/audit.db"
    plan = [("support-bot", 0), ("billing-bot", 1), ("support-bot", 2), ("billing-bot", 3), ("support-bot", 4)]
    ids = asyncio.run(fill(url, base / "home" / "spool", plan))
    yield url, base / "home", ids


def test_tail_prints_recent_records_oldest_first(populated: tuple[str, Path, list[str]]) -> None:
    url, home, ids = populated
    p = bastion("audit", "tail", "-n", "3", "--audit", url, home=home)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ids[2:]
    assert "POST https://api.openai.com/v1/chat/completions" in lines[0] and "  200  " in lines[0]
    assert lines[0].startswith("2026-11-18T11:0") and "allow" in lines[0] and "llm-chat" in lines[0]

    p = bastion("audit", "tail", "--agent", "billing-bot", "--format", "json", "--audit", url, home=home)
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["id"] for r in records] == [ids[1], ids[3]] and all(r["hash"] for r in records)


def test_show_prints_the_whole_exchange_redacted(populated: tuple[str, Path, list[str]]) -> None:
    url, home, ids = populated
    p = bastion("audit", "show", ids[1], "--audit", url, home=home)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"id         {ids[1]}" in out and "agent      billing-bot" in out
    assert "> POST https://api.openai.com/v1/chat/completions HTTP/1.1" in out
    assert "> Authorization: Bearer [REDACTED:" in out and "< HTTP/1.1 200 OK" in out
    assert '"object": "chat.completion"' in out and "redacted   /request/headers/authorization" in out

    p = bastion("audit", "show", ids[1], "--format", "json", "--audit", url, home=home)
    doc = json.loads(p.stdout)
    assert doc["id"] == ids[1] and doc["response"]["body"]["content"]["text"].startswith("{")


def test_show_of_an_unknown_id_exits_1(populated: tuple[str, Path, list[str]]) -> None:
    url, home, _ = populated
    p = bastion("audit", "show", "no-such-id", "--audit", url, home=home)
    assert p.returncode == 1 and "no record with id 'no-such-id'" in p.stderr and not p.stdout


def test_export_jsonl_filters_by_agent_and_time(populated: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    url, home, ids = populated
    out = tmp_path / "out.jsonl"
    p = bastion("audit", "export", "--format", "jsonl", "--agent", "support-bot", "--since",
                "2026-11-18T11:00:00Z", "-o", str(out), "--audit", url, home=home)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [ids[0], ids[2], ids[4]]
    assert all(r["identity"]["agent"] == "support-bot" and r["hash"] for r in records)

    since = (T0 + 1 * MIN_US) / 1e6
    until = (T0 + 4 * MIN_US) / 1e6
    fmt = "%Y-%m-%dT%H:%M:%S"
    p = bastion("audit", "export", "--format", "jsonl", "--since", time.strftime(fmt, time.gmtime(since)),
                "--until", time.strftime(fmt, time.gmtime(until)), "--audit", url, home=home)
    assert [json.loads(line)["id"] for line in p.stdout.splitlines()] == ids[1:4]

    p = bastion("audit", "export", "--since", "1h", "--audit", url, home=home)  # all records are older
    assert p.returncode == 0 and json.loads(p.stdout)["log"]["entries"] == []


def test_the_audit_url_comes_from_the_environment(populated: tuple[str, Path, list[str]]) -> None:
    url, home, ids = populated
    p = bastion("audit", "tail", "-n", "1", env={"BASTION_AUDIT": url}, home=home)
    assert p.returncode == 0 and p.stdout.split()[1] == ids[-1]


def test_verify_exit_codes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    home = tmp_path / "home"
    asyncio.run(fill(url, home / "spool", [("support-bot", m) for m in range(6)]))
    p = bastion("audit", "verify", "--audit", url, home=home)
    assert p.returncode == 0 and "intact (6 records in 1 chain)" in p.stdout

    with sqlite3.connect(tmp_path / "audit.db") as conn:
        conn.execute("UPDATE audit_records SET record = replace(record, '\"POST\"', '\"GET\"') WHERE seq = 4")
    p = bastion("audit", "verify", "--audit", url, home=home)
    assert p.returncode == 1 and "BROKEN (edited)" in p.stdout and "record 4" in p.stdout
    p = bastion("audit", "verify", "--format", "json", "--audit", url, home=home)
    doc = json.loads(p.stdout)
    assert p.returncode == 1 and not doc["intact"] and doc["chains"][0]["problem"]["seq"] == 4


def test_unusable_stores_and_bad_flags_exit_2(tmp_path: Path) -> None:
    p = bastion("audit", "verify", "--audit", "postgresql://postgres@127.0.0.1:9/none", home=tmp_path)
    assert p.returncode == 2 and "cannot connect" in p.stderr and "Traceback" not in p.stderr
    p = bastion("audit", "tail", "--audit", "ftp://example.com/x", home=tmp_path)
    assert p.returncode == 2 and "unsupported audit URL" in p.stderr
    p = bastion("audit", "tail", "--audit", f"sqlite:///{tmp_path}/nowhere/x.db", home=tmp_path)
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = bastion("audit", "export", "--since", "last tuesday", "--audit", f"sqlite:///{tmp_path}/a.db", home=tmp_path)
    assert p.returncode == 2 and "expected an ISO 8601 time" in p.stderr


def test_an_empty_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    asyncio.run(fill(url, tmp_path / "spool", []))  # a sidecar created it and recorded nothing yet
    p = bastion("audit", "tail", "--audit", url, home=tmp_path)
    assert p.returncode == 0 and p.stdout == ""
    p = bastion("audit", "verify", "--audit", url, home=tmp_path)
    assert p.returncode == 0 and "no audit records" in p.stdout


async def test_tail_follow_prints_records_as_they_arrive(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    first = await fill(url, tmp_path / "spool", [("support-bot", 0)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BOOT, "audit", "tail", "-n", "5", "--follow", "--audit", url, "--home", str(tmp_path),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.split()[1].decode() == first[0]
        later = await fill(url, tmp_path / "spool", [("billing-bot", 1), ("support-bot", 2)])
        got = [(await asyncio.wait_for(proc.stdout.readline(), 30)).split()[1].decode() for _ in later]
        assert got == later
    finally:
        proc.terminate()
        await proc.wait()
