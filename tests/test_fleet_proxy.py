"""Fleet coordination through two real sidecars sharing one store (a SQLite file, real Redis): milestones,
budgets, the fleet-wide pause and guards, as agents and operators meet them.

Two `bastion serve` processes share the store and the rules; agents authenticate with proxy credentials, so
either sidecar serves any agent. Upstreams are the local echo app and the local OpenAI-style API (known token
usage). Each test works on names of its own (milestones, budget keys, agents it pauses), so tests share the
sidecars without seeing each other's state.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import requests
from lockhistory import RedisServer, delete_prefix
from services import require_redis
from support.bastion import BastionServer, run_bastion, run_cli
from support.certs import CertFiles
from support.llm_upstream import OPENAI_USAGE, LlmUpstream, run_llm_upstream
from support.upstream import Upstream, run_upstream

ALICE = "alice-token"  # admin
TOKENS = {name: f"{name}-secret" for name in ("extractor", "reporter", "spender", "stormer", "idler")}
LLM_TOKENS_PER_CALL = OPENAI_USAGE["prompt_tokens"] + OPENAI_USAGE["completion_tokens"]  # 43
TOKEN_LIMIT = 100  # three calls: 43, 86 (< 100: admitted), 129; the fourth is refused


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def rules_text() -> str:
    agents = "\n".join(f"  {name}: {{roles: [{role}], token_sha256: {_sha(token)}}}" for (name, token), role in
                       zip(TOKENS.items(), ("extraction", "reporting", "worker", "worker", "worker"), strict=True))
    return "version: 1\ndefaults: {effect: deny}\nagents:\n" + agents + "\n" + textwrap.dedent(f"""\
    users:
      alice: {{roles: [admin], token_sha256: {_sha(ALICE)}}}
    rules:
      - id: extraction-finished
        effect: allow
        agents: ["role:extraction"]
        match: {{method: POST, path: "/extracts/{{report}}/finish"}}
        complete: {{key: "extracted:{{report}}", ttl: 1h}}
      - id: compliance-report
        effect: allow
        agents: ["role:reporting"]
        match: {{method: POST, path: "/reports/{{report}}/compliance"}}
        requires: ["extracted:{{report}}"]
      - id: work
        effect: allow
        agents: ["*"]
        match: {{path: "/work/**"}}
      - id: llm
        effect: allow
        agents: ["*"]
        match: {{llm: {{}}}}
      - id: forbidden
        effect: deny
        agents: ["*"]
        match: {{path: "/forbidden/**"}}
        message: "Not for agents."
    budgets:
      - id: run-calls
        match: {{path: "/work/budget/{{run}}"}}
        limit: {{calls: 5, per: 1h}}
        key: "run:{{run}}"
      - id: run-tokens
        match: {{llm: {{}}}}
        limit: {{tokens: {TOKEN_LIMIT}, per: 1h}}
        key: "tokens:{{header.x-run}}"
        estimate: 10
    guards:
      - id: deny-storm
        agents: [stormer]
        when: {{denials: 5, per: 1m}}
        action: pause
    network:
      allow_private: ["127.0.0.0/8"]
    """)


@dataclass
class Fleet:
    a: BastionServer
    b: BastionServer
    store: str
    rules: Path
    upstream: Upstream
    llm: LlmUpstream


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('fleet-store') / 'bastion.db'}"
        return
    url = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    try:
        yield f"{url}?prefix={prefix}"
    finally:
        delete_prefix(url, prefix)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, bastion_home: Path, store_url: str,
          test_certs: CertFiles) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    rules = workdir / "rules.yaml"
    rules.write_text(rules_text())
    args = ["--store", store_url]
    with run_upstream(test_certs) as upstream, run_llm_upstream() as llm, \
            run_bastion(workdir / "a", [rules], home=bastion_home, extra_args=args) as a, \
            run_bastion(workdir / "b", [rules], home=bastion_home, extra_args=args) as b:
        yield Fleet(a, b, store_url, rules, upstream, llm)


def call(server: BastionServer, agent: str, url: str, *, json_body: object = None,
         headers: dict[str, str] | None = None) -> requests.Response:
    proxy = server.proxy_url().replace("http://", f"http://{agent}:{TOKENS[agent]}@")
    with requests.Session() as s:
        s.trust_env = False
        return s.post(url, json=json_body if json_body is not None else {}, proxies={"http": proxy, "https": proxy},
                      headers=headers or {}, timeout=30)


def admin(server: BastionServer, path: str, body: dict | None = None) -> requests.Response:
    return requests.post(server.admin_url + path, json=body or {}, headers={"Authorization": f"Bearer {ALICE}"},
                         timeout=10)


def error(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    return resp.json()["error"]


def run_id() -> str:
    return uuid.uuid4().hex[:10]


def seconds_to(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - time.time()


# -- milestones --------------------------------------------------------------------------------------------------


def test_a_finished_extraction_unlocks_the_report_on_the_other_sidecar(fleet: Fleet) -> None:
    report = run_id()
    up = fleet.upstream.http_url
    refused = error(call(fleet.b, "reporter", f"{up}/reports/{report}/compliance"), 424)
    assert refused["type"] == "dependency_pending"
    assert refused["missing"] == [f"extracted:{report}"]
    assert refused["rule"] == "compliance-report"
    assert f"extracted:{report}" in refused["message"]

    assert call(fleet.a, "extractor", f"{up}/extracts/{report}/finish").status_code == 200
    assert call(fleet.b, "reporter", f"{up}/reports/{report}/compliance").status_code == 200

    listed = requests.get(fleet.a.admin_url + "/api/milestones", headers={"Authorization": f"Bearer {ALICE}"},
                          timeout=10).json()["milestones"]
    mine = next(m for m in listed if m["key"] == f"extracted:{report}")
    assert mine["by"] == "extractor"
    assert mine["request_id"]


def test_a_failed_extraction_records_no_milestone_and_clearing_closes_the_gate(fleet: Fleet) -> None:
    report = run_id()
    up = fleet.upstream.http_url
    # No 2xx (the upstream cannot be reached): the milestone is not recorded.
    failed = call(fleet.a, "extractor", f"http://127.0.0.1:1/extracts/{report}/finish")
    assert failed.status_code == 502
    assert error(call(fleet.b, "reporter", f"{up}/reports/{report}/compliance"), 424)["missing"]

    done = run_cli("milestones", "complete", f"extracted:{report}", "--store", fleet.store, "--rules",
                   str(fleet.rules), "--user-token", ALICE)
    assert done.returncode == 0, done.stderr
    assert call(fleet.b, "reporter", f"{up}/reports/{report}/compliance").status_code == 200
    cleared = admin(fleet.b, f"/api/milestones/extracted:{report}/clear")
    assert cleared.status_code == 200, cleared.text
    # At once on the sidecar that cleared it; within a second on the other (it trusts what it found for 1s).
    assert error(call(fleet.b, "reporter", f"{up}/reports/{report}/compliance"), 424)["missing"]
    deadline = time.monotonic() + 2.0
    while (resp := call(fleet.a, "reporter", f"{up}/reports/{report}/compliance")).status_code == 200:
        assert time.monotonic() < deadline, "the other sidecar still passes a cleared milestone"
        time.sleep(0.1)
    assert error(resp, 424)["missing"] == [f"extracted:{report}"]


# -- budgets -----------------------------------------------------------------------------------------------------


def test_a_call_budget_refuses_exactly_past_its_limit_across_both_sidecars(fleet: Fleet) -> None:
    run = run_id()
    url = f"{fleet.upstream.http_url}/work/budget/{run}"
    for i in range(5):
        server = fleet.a if i % 2 else fleet.b
        assert call(server, "spender", url).status_code == 200, i
    resp = call(fleet.a, "spender", url)
    refused = error(resp, 429)
    assert refused["type"] == "budget_exceeded"
    assert (refused["budget"], refused["key"], refused["limit"], refused["used"]) == ("run-calls", f"run:{run}", 5, 5)
    # Retry-After is the time to the window's reset (windows of 1h aligned to the epoch), not the window length.
    to_reset = seconds_to(refused["resets_at"])
    assert abs(int(resp.headers["Retry-After"]) - to_reset) <= 2
    assert datetime.fromisoformat(refused["resets_at"].replace("Z", "+00:00")).timestamp() % 3600 == 0
    assert error(call(fleet.b, "spender", url), 429)["type"] == "budget_exceeded"

    usage = requests.get(fleet.b.admin_url + "/api/budgets", headers={"Authorization": f"Bearer {ALICE}"},
                         timeout=10).json()["budgets"]
    calls = next(b for b in usage if b["id"] == "run-calls")
    window = next(u for u in calls["usage"] if u["key"] == f"run:{run}")
    assert (window["used"], window["remaining"]) == (5, 0)


def test_concurrent_calls_against_a_nearly_spent_budget_never_overshoot(fleet: Fleet) -> None:
    run = run_id()
    url = f"{fleet.upstream.http_url}/work/budget/{run}"
    for _ in range(3):
        assert call(fleet.a, "spender", url).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: call(fleet.a if i % 2 else fleet.b, "spender", url).status_code,
                                 range(16)))
    assert sorted(statuses) == [200, 200] + [429] * 14  # exactly the 2 calls left, wherever they came in


def test_a_token_budget_settles_real_usage_and_refuses_past_it(fleet: Fleet) -> None:
    run = run_id()
    url = f"{fleet.llm.url}/v1/chat/completions"
    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}
    for i in range(3):  # 0 -> 43 -> 86 -> 129 tokens: each admitted while some of the 100 were left
        resp = call(fleet.a if i % 2 else fleet.b, "spender", url, json_body=body, headers={"x-run": run})
        assert resp.status_code == 200, resp.text
    resp = call(fleet.b, "spender", url, json_body=body, headers={"x-run": run})
    refused = error(resp, 429)
    assert (refused["budget"], refused["unit"], refused["limit"]) == ("run-tokens", "tokens", TOKEN_LIMIT)
    assert refused["used"] == 3 * LLM_TOKENS_PER_CALL  # the real usage, not the estimates (3 x 10)
    assert int(resp.headers["Retry-After"]) >= 1


def test_a_call_refused_by_a_later_stage_gives_its_reservation_back(fleet: Fleet) -> None:
    run = run_id()
    url = f"{fleet.llm.url}/v1/chat/completions"
    dead = url.replace(str(fleet.llm.http_port), "1")
    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(4):  # no answer: nothing spent, whatever the estimate
        assert call(fleet.a, "spender", dead, json_body=body, headers={"x-run": run}).status_code == 502
    usage = run_cli("budgets", "list", "--format", "json", "--store", fleet.store, "--rules", str(fleet.rules),
                    "--user-token", ALICE)
    assert usage.returncode == 0, usage.stderr
    tokens = next(b for b in json.loads(usage.stdout)["budgets"] if b["id"] == "run-tokens")
    window = next(u for u in tokens["usage"] if u["key"] == f"tokens:{run}")
    assert (window["used"], window["reserved"]) == (0, 0)


# -- pause -------------------------------------------------------------------------------------------------------


def test_pause_through_one_sidecar_refuses_the_agent_on_the_other_within_a_second(fleet: Fleet) -> None:
    url = f"{fleet.upstream.http_url}/work/pause"
    assert call(fleet.b, "idler", url).status_code == 200
    paused = admin(fleet.a, "/api/agents/idler/pause", {"reason": "runaway loop"})
    assert paused.status_code == 200, paused.text
    try:
        assert error(call(fleet.a, "idler", url), 403)["type"] == "agent_paused"  # at once on the one paused it
        deadline = time.monotonic() + 1.0
        while (resp := call(fleet.b, "idler", url)).status_code == 200:
            assert time.monotonic() < deadline, "the other sidecar still lets the paused agent through"
            time.sleep(0.05)
        refused = error(resp, 403)
        assert refused["type"] == "agent_paused"
        assert refused["reason"] == "runaway loop"
        assert refused["paused_by"] == "user:alice"
        assert resp.headers["x-should-retry"] == "false"
        assert call(fleet.b, "spender", url).status_code == 200  # other agents go on
        listed = run_cli("agents", "list", "--format", "json", "--store", fleet.store, "--rules", str(fleet.rules),
                         "--user-token", ALICE)
        agents = {a["name"]: a for a in json.loads(listed.stdout)["agents"]}
        assert agents["idler"]["paused"]["reason"] == "runaway loop"
    finally:
        resumed = run_cli("agents", "resume", "idler", "--store", fleet.store, "--rules", str(fleet.rules),
                          "--user-token", ALICE)
        assert resumed.returncode == 0, resumed.stderr
    for server in (fleet.a, fleet.b):
        deadline = time.monotonic() + 1.0
        while call(server, "idler", url).status_code != 200:
            assert time.monotonic() < deadline, "resume did not reach the sidecar"
            time.sleep(0.05)


def test_pause_needs_an_admin(fleet: Fleet) -> None:
    resp = requests.post(fleet.a.admin_url + "/api/agents/idler/pause", json={}, timeout=10)
    assert resp.status_code == 401


# -- guards ------------------------------------------------------------------------------------------------------


def test_a_deny_storm_trips_the_guard_and_pauses_the_agent_fleet_wide(fleet: Fleet) -> None:
    up = fleet.upstream.http_url
    try:
        for i in range(5):
            server = fleet.a if i % 2 else fleet.b
            assert error(call(server, "stormer", f"{up}/forbidden/{i}"), 403)["type"] == "policy_denied"
        for server in (fleet.a, fleet.b):  # the counts reach the store in batches, the pause every sidecar
            deadline = time.monotonic() + 3.0
            while (resp := call(server, "stormer", f"{up}/work/x")).status_code == 200:
                assert time.monotonic() < deadline, "the guard did not pause the agent"
                time.sleep(0.1)
            refused = error(resp, 403)
            assert refused["type"] == "agent_paused"
            assert refused["paused_by"] == "guard:deny-storm"
            assert "5 denials within 1m" in refused["reason"]
        metrics = requests.get(fleet.a.admin_url + "/metrics", timeout=10).text + requests.get(
            fleet.b.admin_url + "/metrics", timeout=10).text
        assert 'bastion_guard_trips_total{guard="deny-storm"} 1.0' in metrics
    finally:
        run_cli("agents", "resume", "stormer", "--store", fleet.store, "--rules", str(fleet.rules),
                "--user-token", ALICE)


# -- the store down ----------------------------------------------------------------------------------------------


def test_store_down_refuses_budgeted_and_gated_calls_and_recovers(tmp_path: Path, bastion_home: Path,
                                                                   test_certs: CertFiles) -> None:
    redis_server = RedisServer()
    redis_server.start()
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text())
    try:
        with run_upstream(test_certs) as upstream, \
                run_bastion(tmp_path / "s", [rules], home=bastion_home,
                            extra_args=["--store", redis_server.url]) as server:
            run = run_id()
            budgeted = f"{upstream.http_url}/work/budget/{run}"
            gated = f"{upstream.http_url}/reports/{run}/compliance"
            assert call(server, "spender", budgeted).status_code == 200
            redis_server.stop()
            down = error(call(server, "spender", budgeted), 503)
            assert down["type"] == "store_unavailable"
            assert error(call(server, "reporter", gated), 503)["type"] == "store_unavailable"
            assert call(server, "spender", f"{upstream.http_url}/work/plain").status_code == 200  # no store needed
            redis_server.start()
            deadline = time.monotonic() + 10
            while (resp := call(server, "spender", budgeted)).status_code != 200:
                assert time.monotonic() < deadline, resp.text
                time.sleep(0.2)
            assert error(call(server, "reporter", gated), 424)["type"] == "dependency_pending"
    finally:
        redis_server.stop()
