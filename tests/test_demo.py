"""`bastion demo` end to end: it runs as a newcomer would start it, its dashboard answers while it runs, and
afterwards the audit log holds every outcome its story promises.

One run of `bastion demo --duration 30 --auto-approve --home TMP` (about 35 s with start and stop) feeds every
test of this module, so the demo starts once.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support.bastion import REPO, bastion_cmd, clean_env, run_cli

DURATION = 30
DASHBOARD_LINE = re.compile(r"dashboard: (?P<url>http://127\.0\.0\.1:\d+)/ \(log in with the token (?P<token>\S+)\)")
PAGES = ("/", "/flows", "/approvals", "/locks", "/milestones", "/budgets", "/agents", "/rules")


@dataclass
class DemoRun:
    returncode: int
    output: str
    pages: dict[str, int]
    records: list[dict[str, Any]]
    verify: subprocess.CompletedProcess[str]


def _get(url: str, token: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    work = tmp_path_factory.mktemp("demo")
    home = work / "home"
    out_path = work / "demo.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(bastion_cmd("demo", "--duration", str(DURATION), "--auto-approve", "--home",
                                            str(home)), cwd=REPO, env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    pages: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 60
        match = None
        while match is None and proc.poll() is None and time.monotonic() < deadline:
            match = DASHBOARD_LINE.search(out_path.read_text(errors="replace"))
            time.sleep(0.1)
        assert match, "the demo printed no dashboard line:\n" + out_path.read_text(errors="replace")
        # Ask while the story plays (it takes well under the duration), so the pages have data to show.
        time.sleep(3)
        pages = {page: _get(match["url"] + page, match["token"]) for page in PAGES}
        returncode = proc.wait(DURATION + 60)
    finally:
        if proc.poll() is None:  # SIGTERM first: the demo then stops the `bastion serve` it started
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    exported = run_cli("audit", "export", "--format", "jsonl", "--home", str(home))
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines() if line.strip()]
    verify = run_cli("audit", "verify", "--home", str(home))
    yield DemoRun(returncode, out_path.read_text(errors="replace"), pages, records, verify)


def _status(r: dict[str, Any]) -> int | None:
    return (r.get("response") or {}).get("status")


def _error_type(r: dict[str, Any]) -> str | None:
    return (r.get("error") or {}).get("type")


def _find(demo: DemoRun, what: str, pred: Any) -> list[dict[str, Any]]:
    found = [r for r in demo.records if pred(r)]
    assert found, f"no audit record for {what}; the demo said:\n{demo.output}"
    return found


def test_demo_runs_and_stops_cleanly(demo: DemoRun) -> None:
    assert demo.returncode == 0, demo.output
    assert "every beat played" in demo.output, demo.output
    assert "Traceback" not in demo.output and "failed:" not in demo.output, demo.output
    assert "intact" in demo.verify.stdout, demo.verify.stdout + demo.verify.stderr


def test_dashboard_answers_during_the_run(demo: DemoRun) -> None:
    assert demo.pages == dict.fromkeys(PAGES, 200), demo.pages


def test_lock_conflict_then_handoff(demo: DemoRun) -> None:
    conflict = _find(demo, "a lock conflict",
                     lambda r: _status(r) == 423 and _error_type(r) == "lock_conflict")[0]
    assert conflict["identity"]["agent"] == "triage-bot"
    assert "resolver-bot" in conflict["error"]["message"]
    # After the handoff the same agent takes the ticket.
    _find(demo, "the lock taken after the handoff",
          lambda r: r["identity"]["agent"] == "triage-bot" and r["request"]["method"] == "PATCH"
          and _status(r) == 200 and r["started_us"] > conflict["started_us"])


def test_policy_denial_with_its_message(demo: DemoRun) -> None:
    denied = _find(demo, "a policy denial",
                   lambda r: _status(r) == 403 and _error_type(r) == "policy_denied"
                   and r["request"]["method"] == "DELETE")[0]
    assert denied["decision"]["rules"] == ["no-ticket-deletes"]
    assert "never delete tickets" in denied["error"]["message"]


def test_approval_held_then_approved_and_forwarded(demo: DemoRun) -> None:
    held = _find(demo, "an approved refund",
                 lambda r: (r["decision"] or {}).get("effect") == "hold" and r.get("approval"))
    approval = held[0]["approval"]
    assert approval["state"] == "approved" and approval["decided_by"] == "pat", approval
    assert held[0]["outcome"] == "forwarded" and _status(held[0]) == 201
    assert held[0]["decision"]["rules"] == ["large-refunds"]


def test_llm_call_with_token_usage(demo: DemoRun) -> None:
    llm = _find(demo, "an LLM call", lambda r: (r.get("extra") or {}).get("llm"))[0]["extra"]["llm"]
    assert llm["stream"] is True and llm["request_model"] == "gpt-4.1-mini"
    assert llm["usage"] == {"input_tokens": 31, "output_tokens": 12}, llm


def test_mcp_calls_allowed_and_denied(demo: DemoRun) -> None:
    def tool_call(tool: str) -> Any:
        return lambda r: (((r.get("extra") or {}).get("mcp") or {}).get("method") == "tools/call"
                          and r["extra"]["mcp"].get("tool") == tool)

    allowed = _find(demo, "an allowed MCP tool call", tool_call("search_kb"))[0]
    assert allowed["outcome"] == "forwarded" and _status(allowed) == 200
    denied = _find(demo, "a denied MCP tool call", tool_call("query_db"))[0]
    assert _status(denied) == 403 and _error_type(denied) == "policy_denied"
    assert denied["decision"]["rules"] == ["mcp-read-only-sql"]


def test_milestone_gate_424_then_200(demo: DemoRun) -> None:
    def close(r: dict[str, Any]) -> bool:
        return r["request"]["url"].endswith("/close")

    pending = _find(demo, "a 424 dependency_pending",
                    lambda r: close(r) and _status(r) == 424 and _error_type(r) == "dependency_pending")[0]
    _find(demo, "the same close passing later",
          lambda r: close(r) and r["request"]["url"] == pending["request"]["url"] and _status(r) == 200
          and r["started_us"] > pending["started_us"])


def test_budget_runs_out_429(demo: DemoRun) -> None:
    over = _find(demo, "a 429 budget_exceeded",
                 lambda r: _status(r) == 429 and _error_type(r) == "budget_exceeded")[0]
    assert "comments-per-ticket" in over["error"]["message"]
    comments = [r for r in demo.records if r["request"]["url"] == over["request"]["url"] and _status(r) == 201]
    assert len(comments) == 3, [_status(r) for r in comments]
