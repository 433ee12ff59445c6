"""`bastion replay`: a day of mixed traffic recorded through a running proxy (SQLite and PostgreSQL audit sinks),
replayed against a stricter and a looser candidate. The changed calls it reports are checked one by one against
the candidate's own decision on each recorded request; what redaction or the body cap hid comes out
undetermined; exit codes 0 / 1 / 2 / 3."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from auditproxy import drop_schema, read_records
from services import require_postgres
from support.bastion import BastionServer, run_bastion, run_cli
from support.upstream import Upstream

from bastion.audit.record import AuditRecord
from bastion.policy.facts import RequestFacts
from bastion.policy.load import load_policy

TOKENS = {"support-bot": "support-token-1", "billing-bot": "billing-token-1"}
MAX_BODY = 2048

AGENTS = "\n".join(f"  {name}: {{roles: [{name.split('-')[0]}], token_sha256: "
                   f"{hashlib.sha256(token.encode()).hexdigest()}}}" for name, token in TOKENS.items())

BASE = f"""\
version: 1
defaults: {{effect: deny}}
agents:
{AGENTS}
rules:
  - id: tickets-read
    effect: allow
    agents: [role:support]
    match: {{method: GET, path: "/tickets/**"}}
  - id: ticket-comments
    effect: allow
    agents: [role:support]
    match: {{method: POST, path: "/tickets/{{ticket}}/comments"}}
  - id: search
    effect: allow
    agents: ["*"]
    match: {{method: GET, path: /search}}
  - id: refunds
    effect: allow
    agents: [role:billing]
    match: {{method: POST, path: /refunds}}
  - id: uploads
    effect: allow
    agents: [role:billing]
    match: {{method: POST, path: /uploads}}
  - id: no-admin
    effect: deny
    agents: ["*"]
    match: {{path: "/admin/**"}}
    message: Agents stay out of the admin API.
network:
  allow_private: ["127.0.0.0/8"]
audit:
  max_body_bytes: {MAX_BODY}
"""

def with_rules(policy: str, extra: str) -> str:
    """`policy` with `extra` rules inserted at the end of its `rules:` list."""
    head, sep, tail = policy.partition("network:")
    return head + extra + sep + tail


# Stricter: large refunds are denied, comments need a ticket lock, searches with an API key are refused, Basic
# credentials are refused, and uploads are judged on a body field the audit cut off.
STRICT_RULES = """\
  - id: big-refunds
    effect: deny
    agents: ["*"]
    match: {method: POST, path: /refunds, json: {amount: {gt: 500}}}
  - id: comments-locked
    effect: allow
    agents: [role:support]
    match: {method: POST, path: "/tickets/{ticket}/comments"}
    lock: {key: "ticket:{ticket}", ttl: 5m}
  - id: no-keyed-search
    effect: deny
    agents: ["*"]
    match: {path: /search, query: {api_key: {exists: true}}}
  - id: bearer-only
    effect: deny
    agents: [role:support]
    match: {path: "/tickets/**", headers: {authorization: {prefix: "Basic "}}}
  - id: upload-kind
    effect: deny
    agents: ["*"]
    match: {path: /uploads, json: {kind: secret}}
"""

# Looser: the admin API opens for reads (deny → allow), refunds are no longer billing's alone.
LOOSER = BASE.replace("""  - id: no-admin
    effect: deny
    agents: ["*"]
    match: {path: "/admin/**"}
    message: Agents stay out of the admin API.
""", """  - id: admin-reads
    effect: allow
    agents: ["*"]
    match: {method: GET, path: "/admin/**"}
  - id: no-admin-writes
    effect: deny
    agents: ["*"]
    match: {method: [POST, PUT, PATCH, DELETE], path: "/admin/**"}
""").replace("""  - id: refunds
    effect: allow
    agents: [role:billing]""", """  - id: refunds
    effect: allow
    agents: ["*"]""")


@dataclass
class Day:
    """A recorded day: the audit URL and every record in it."""

    audit: str
    records: list[AuditRecord]
    rules: Path


def make_traffic(server: BastionServer, upstream: Upstream) -> int:
    """Calls a support desk and a billing agent make in a day, allowed and refused, with secrets in headers
    and query strings and one body larger than the audit keeps. Returns how many calls were made."""
    base = upstream.http_url
    support = server.session("support-bot", TOKENS["support-bot"])
    billing = server.session("billing-bot", TOKENS["billing-bot"])
    stranger = server.session()
    calls: list[tuple[requests.Session, str, str, dict[str, Any]]] = []
    for t in range(1, 6):
        calls.append((support, "GET", f"/tickets/{t}", {"headers": {"Authorization": f"Bearer sk-{'a' * 40}{t}"}}))
        calls.append((support, "POST", f"/tickets/{t}/comments", {"json": {"text": f"looking at {t}"}}))
    calls.append((support, "GET", "/tickets/9", {}))
    for amount in (20, 450, 700, 1200):
        calls.append((billing, "POST", "/refunds", {"json": {"amount": amount, "order": f"o-{amount}"}}))
    calls.append((support, "POST", "/refunds", {"json": {"amount": 5}}))
    calls.append((support, "GET", "/search?q=printer", {}))
    calls.append((billing, "GET", "/search?q=invoice&api_key=k-" + "z" * 30, {}))
    calls.append((support, "GET", "/admin/users", {}))
    calls.append((billing, "DELETE", "/admin/users/3", {}))
    calls.append((billing, "POST", "/uploads", {"json": {"kind": "report", "data": "x" * (MAX_BODY * 2)}}))
    calls.append((billing, "POST", "/uploads", {"json": {"kind": "note"}}))
    calls.append((stranger, "GET", "/tickets/1", {}))
    for session, method, path, kwargs in calls:
        session.request(method, base + path, timeout=30, **kwargs)
    return len(calls)


def record_day(tmp: Path, home: Path, upstream: Upstream, audit: str) -> Day:
    rules = tmp / "base.yaml"
    rules.write_text(BASE)
    with run_bastion(tmp / "srv", [rules], home=home, extra_args=["--audit", audit]) as server:
        n = make_traffic(server, upstream)
        records: list[AuditRecord] = []
        for _ in range(200):
            records = read_records(audit)
            if len(records) >= n:
                break
            time.sleep(0.1)
    assert len(records) == n
    return Day(audit, records, rules)


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "jsonl"])
def day(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, bastion_home: Path,
        upstream: Upstream) -> Iterator[Day]:
    tmp = tmp_path_factory.mktemp(f"replay-{request.param}")
    if request.param == "sqlite":
        yield record_day(tmp, bastion_home, upstream, f"sqlite:///{tmp / 'audit.db'}")
        return
    if request.param == "jsonl":
        yield record_day(tmp, bastion_home, upstream, f"jsonl:///{tmp / 'audit'}")
        return
    dsn = require_postgres()
    schema = f"bastion_replay_{secrets.token_hex(5)}"
    try:
        yield record_day(tmp, bastion_home, upstream, f"{dsn}?schema={schema}")
    finally:
        asyncio.run(drop_schema(dsn, schema))


def replay(day: Day, candidate: str, tmp: Path, *args: str) -> tuple[int, dict[str, Any]]:
    path = tmp / "candidate.yaml"
    path.write_text(candidate)
    done = run_cli("replay", "--rules", str(path), "--audit", day.audit, "--format", "json", "--examples", "1000",
                   *args)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def direct(candidate: str, record: AuditRecord, tmp: Path) -> tuple[str, tuple[str, ...]]:
    """The candidate's decision on the recorded request, built the way `bastion explain` builds one."""
    path = tmp / "direct.yaml"
    path.write_text(candidate)
    policy = load_policy([path])
    req = record.request
    headers: dict[str, str] = {}
    for k, v in req.headers:
        headers[k.lower()] = v if k.lower() not in headers else f"{headers[k.lower()]}, {v}"
    facts = RequestFacts.from_url(req.method, req.url, headers=headers,
                                  body=req.body.content if req.body is not None else None)
    d = policy.explain(facts, record.agent or "")
    return d.effect, tuple(sorted(d.rules))


def ids_of(report: dict[str, Any], key: str) -> set[str]:
    return {i for group in report[key] for i in group["examples"]}


def test_the_same_policy_changes_nothing(day: Day, tmp_path: Path) -> None:
    code, report = replay(day, BASE, tmp_path)
    assert code == 0
    assert report["changed"] == 0 and report["undetermined"] == 0
    assert report["records"] == len(day.records)
    assert report["skipped"] == 1  # the caller without credentials: no rule decided it
    assert report["replayed"] == report["unchanged"] == len(day.records) - 1
    assert report["records_per_second"] > 0


def test_a_stricter_policy_reports_exactly_the_changed_calls(day: Day, tmp_path: Path) -> None:
    candidate = with_rules(BASE, STRICT_RULES)
    code, report = replay(day, candidate, tmp_path)
    assert code == 1
    by_id = {r.id: r for r in day.records}
    changed, undetermined = ids_of(report, "changes"), ids_of(report, "undetermined_reasons")
    reasons = {u["reason"]: set(u["examples"]) for u in report["undetermined_reasons"]}

    # Undetermined, never guessed: the candidate reads what the audit masked, cut or cannot know.
    def ids(method: str, fragment: str) -> set[str]:
        return {r.id for r in day.records if r.request.method == method and fragment in r.request.url
                and r.agent is not None}

    assert reasons["header 'authorization' was redacted"] == {
        r.id for r in day.records if r.agent and r.request.method == "GET" and "/tickets/" in r.request.url
        and any(k.lower() == "authorization" for k, _ in r.request.headers)}
    assert reasons["query parameter 'api_key' was redacted"] == ids("GET", "api_key=")
    assert reasons["the body was cut at the audit's size cap"] == {
        r.id for r in day.records if r.request.url.endswith("/uploads") and r.request.body and r.request.body.truncated}
    assert reasons["depends on the store's state then (lock of rule comments-locked)"] == ids("POST", "/comments")

    # Every other call: changed exactly when the candidate's own decision differs from the recorded one.
    expected_changed = set()
    for r in day.records:
        if r.agent is None or r.id in undetermined:
            continue
        assert r.decision is not None
        effect, rules = direct(candidate, r, tmp_path)
        if (effect, rules) != (r.decision.effect, tuple(sorted(r.decision.rules))):
            expected_changed.add(r.id)
    assert changed == expected_changed
    assert {by_id[i].request.url.rsplit("/", 1)[-1] for i in changed} == {"refunds"}
    big = [c for c in report["changes"] if c["change"] == "allow → deny"]
    assert [(c["from_rules"], c["to_rules"], c["count"]) for c in big] == [("refunds", "big-refunds", 2)]
    assert report["agents"]["billing-bot"]["changed"] == {"allow → deny": 2}
    assert report["unchanged"] + report["changed"] + report["undetermined"] == report["replayed"]


def test_a_looser_policy_reports_what_it_lets_through(day: Day, tmp_path: Path) -> None:
    code, report = replay(day, LOOSER, tmp_path)
    assert code == 1
    kinds = {(c["change"], c["from_rules"], c["to_rules"]): c["count"] for c in report["changes"]}
    assert kinds == {("deny → allow", "no-admin", "admin-reads"): 1, ("deny → allow", "(default)", "refunds"): 1,
                     ("rules changed", "no-admin", "no-admin-writes"): 1}
    for c in report["changes"]:
        for record_id in c["examples"]:
            record = next(r for r in day.records if r.id == record_id)
            assert direct(LOOSER, record, tmp_path)[0] == c["change"].rsplit(" ", 1)[-1] or \
                c["change"] == "rules changed"
    assert report["undetermined"] == 0


def test_filters_and_text_output(day: Day, tmp_path: Path) -> None:
    path = tmp_path / "candidate.yaml"
    path.write_text(with_rules(BASE, STRICT_RULES))
    done = run_cli("replay", "--rules", str(path), "--audit", day.audit, "--agent", "support-bot")
    assert done.returncode == 0, done.stdout + done.stderr  # support-bot's calls only: nothing decided differently
    assert "undetermined" in done.stdout and "header 'authorization' was redacted" in done.stdout
    assert "records/s" in done.stdout
    done = run_cli("replay", "--rules", str(path), "--audit", day.audit, "--until", "2000-01-01T00:00Z",
                   "--format", "json")
    assert done.returncode == 0 and json.loads(done.stdout)["records"] == 0
    done = run_cli("replay", "--rules", str(path), "--audit", day.audit)
    assert done.returncode == 1
    assert "allow → deny" in done.stdout and "rule refunds → big-refunds" in done.stdout


def test_an_invalid_candidate_exits_3_and_a_missing_store_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults: {effect: maybe}\n")
    done = run_cli("replay", "--rules", str(bad), "--audit", f"sqlite:///{tmp_path / 'audit.db'}")
    assert done.returncode == 3 and "bad.yaml:2" in done.stderr
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    done = run_cli("replay", "--rules", str(good), "--audit", f"sqlite:///{tmp_path / 'nowhere.db'}")
    assert done.returncode == 2 and "nowhere.db" in done.stderr
