"""Held calls through a running `bastion serve`, decided by people through the API, the CLI and another sidecar.

Every behaviour runs on both stores: SQLite (the embedded default) and a real Redis shared by two sidecars, where
the decision is taken through the *other* sidecar's API. Agents are real clients (requests, curl, the openai SDK)
going through the proxy to the local echo upstream, which records every request it gets, so "the upstream saw
it once" is checked on the upstream itself. Each test uses paths of its own (a uuid), so tests never see each
other's approvals.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from lockhistory import RedisServer, delete_prefix
from services import require_redis
from support.bastion import BastionServer, run_bastion, run_cli
from support.certs import CertFiles
from support.upstream import Upstream

TOKENS = {"support-bot": "sb-approval-token", "billing-bot": "bb-approval-token", "flood-bot": "fb-approval-token"}
USERS = {"alice": "alice-approval-token", "carol": "carol-approval-token", "olga": "olga-approval-token",
         "bob": "bob-approval-token", "nemo": "nemo-approval-token"}
SECRET = "webhook-test-secret"
WAIT = 2  # seconds a held call waits (approval.wait of the `refunds` rule)
MAX_OPEN = 30  # approvals.max_open_per_minute: more than any agent but flood-bot opens in a module run


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_policy(path: Path, webhook_port: int) -> Path:
    path.write_text(f"""\
version: 1
defaults: {{effect: deny}}
agents:
  support-bot: {{roles: [support], owner: olga, token_sha256: {_sha(TOKENS["support-bot"])}}}
  billing-bot: {{roles: [support], token_sha256: {_sha(TOKENS["billing-bot"])}}}
  flood-bot: {{roles: [support], token_sha256: {_sha(TOKENS["flood-bot"])}}}
users:
  alice: {{roles: [approver], token_sha256: {_sha(USERS["alice"])}}}
  carol: {{roles: [approver, admin], token_sha256: {_sha(USERS["carol"])}}}
  olga: {{roles: [approver], token_sha256: {_sha(USERS["olga"])}}}
  bob: {{roles: [viewer], token_sha256: {_sha(USERS["bob"])}}}
  nemo: {{roles: [], token_sha256: {_sha(USERS["nemo"])}}}
rules:
  - id: local-upstream
    effect: allow
    agents: ["*"]
    match: {{host: [127.0.0.1, localhost]}}
  - id: refunds
    effect: hold
    agents: ["*"]
    match: {{method: POST, path: "/refunds/**"}}
    approval: {{wait: {WAIT}s, timeout: 1h, use_within: 10m}}
  - id: expiring
    effect: hold
    agents: ["*"]
    match: {{method: POST, path: "/expiring/**"}}
    approval: {{wait: 10s, timeout: 1s}}
  - id: gold-refunds
    effect: hold
    agents: ["*"]
    match: {{method: POST, path: "/refunds/**", headers: {{x-tier: gold}}}}
    approval: {{wait: {WAIT}s, required: 2}}
  - id: ticket-work
    effect: allow
    agents: ["*"]
    match: {{method: POST, path: "/work/{{ticket}}"}}
    lock: {{key: "ticket:{{ticket}}", ttl: 15m}}
  - id: ticket-payout
    effect: hold
    agents: ["*"]
    match: {{method: POST, path: "/locked/{{ticket}}"}}
    lock: {{key: "ticket:{{ticket}}", ttl: 15m}}
    approval: {{wait: {WAIT}s}}
  - id: payouts
    effect: hold
    agents: ["*"]
    match: {{method: POST, path: "/payouts/**"}}
    approval: {{wait: {WAIT}s, required: 2}}
  - id: llm
    effect: hold
    agents: ["*"]
    match: {{method: POST, path: "/llm/v1/chat/completions"}}
    approval: {{wait: 1s}}
approvals:
  webhook: {{url: "http://127.0.0.1:{webhook_port}/hook", secret_env: BASTION_TEST_WEBHOOK_SECRET}}
  link: https://bastion.example.com
  max_open_per_minute: {MAX_OPEN}
network:
  allow_private: ["127.0.0.0/8"]
""")
    return path


# -- a webhook receiver -----------------------------------------------------------------------------------------


class Hook:
    """Records every webhook delivery: (headers, raw body)."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, approval_id: str) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.calls if json.loads(body)["approval_id"] == approval_id]

    def wait_for(self, approval_id: str, event: str, timeout: float = 10.0) -> tuple[dict[str, str], bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for headers, body in list(self.calls):
                doc = json.loads(body)
                if doc["approval_id"] == approval_id and doc["event"] == f"approval.{event}":
                    return headers, body
            time.sleep(0.05)
        raise AssertionError(f"no webhook {event} for {approval_id}: {self.calls}")


# -- sidecars -------------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Where agents call (`near`) and where people decide (`far`: the other sidecar on Redis, the same one on
    SQLite), plus what the CLI needs to reach the same store."""

    store: str
    near: BastionServer
    far: BastionServer
    rules: Path
    home: Path
    hook: Hook
    upstream: Upstream

    def agent(self, name: str = "support-bot") -> requests.Session:
        return self.near.session(name, TOKENS[name])

    def cli(self, *args: str, user: str = "carol") -> Any:
        return run_cli("approvals", *args, "--rules", str(self.rules), "--store", self.store, "--home",
                       str(self.home), env={"BASTION_USER_TOKEN": USERS[user],
                                            "BASTION_TEST_WEBHOOK_SECRET": SECRET})


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.server.shutdown()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, bastion_home: Path,
          test_certs: CertFiles, upstream: Upstream, hook: Hook) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp(f"approvals-{request.param}")
    rules = write_policy(work / "rules.yaml", hook.port)
    env = {"BASTION_TEST_WEBHOOK_SECRET": SECRET}
    if request.param == "sqlite":
        store = f"sqlite:///{work / 'store.db'}"
        with run_bastion(work / "a", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                         extra_args=["--store", store], env=env) as a:
            yield Fleet(store, a, a, rules, bastion_home, hook, upstream)
        return
    url = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    store = f"{url}?prefix={prefix}"
    try:
        with run_bastion(work / "a", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                         extra_args=["--store", store, "--audit", f"sqlite:///{work / 'a.db'}"], env=env) as a, \
             run_bastion(work / "b", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                         extra_args=["--store", store, "--audit", f"sqlite:///{work / 'b.db'}"], env=env) as b:
            yield Fleet(store, a, b, rules, bastion_home, hook, upstream)
    finally:
        delete_prefix(url, prefix)


def api(server: BastionServer, method: str, path: str, user: str | None = "carol",
        body: dict[str, Any] | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {USERS[user]}"} if user else {}
    return requests.request(method, server.admin_url + path, json=body, headers=headers, timeout=10,
                            proxies={"http": "", "https": ""})


def pending_for(fleet: Fleet, path: str, timeout: float = 10.0) -> dict[str, Any]:
    """The pending approval of the held call to `path`, as the deciding side's API lists it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = api(fleet.far, "GET", "/api/approvals?state=pending", "bob")
        assert resp.status_code == 200, resp.text
        found = [a for a in resp.json()["approvals"] if a["preview"]["url"].endswith(path)]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no pending approval for {path}")


def post_later(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run `fn(*args)` in a thread (a held call); the dict gets its "response" or "error"."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["response"] = fn(*args, **kwargs)
        except Exception as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def hits(fleet: Fleet, path: str) -> int:
    return sum(1 for p in fleet.upstream.paths() if p == path)


def refund_path() -> str:
    return f"/refunds/{uuid.uuid4().hex[:12]}"


# -- the behaviours ---------------------------------------------------------------------------------------------


def test_approve_while_held_forwards_exactly_once(fleet: Fleet) -> None:
    path = refund_path()
    call = post_later(fleet.agent().post, fleet.upstream.http_url + path, json={"amount": 9000}, timeout=30)
    pending = pending_for(fleet, path)
    assert pending["agent"] == "support-bot" and pending["rules"] == ["refunds"]
    assert json.loads(pending["preview"]["body"]) == {"amount": 9000}
    decided = api(fleet.far, "POST", f"/api/approvals/{pending['id']}/approve", "alice", {"comment": "ok"})
    assert decided.status_code == 200, decided.text
    call["thread"].join(20)
    resp = call["response"]
    assert resp.status_code == 200 and resp.json()["path"] == path
    assert hits(fleet, path) == 1
    shown = api(fleet.far, "GET", f"/api/approvals/{pending['id']}", "bob").json()
    assert (shown["state"], shown["decided_by"], shown["note"]) == ("executed", "alice", "ok")
    assert shown["executed_request_id"] == resp.headers["X-Bastion-Request-Id"]
    again = api(fleet.far, "POST", f"/api/approvals/{pending['id']}/deny", "carol", {"reason": "late"})
    assert again.status_code == 409  # the first decision won


def test_deny_reaches_the_agent_with_the_reason(fleet: Fleet) -> None:
    path = refund_path()
    call = post_later(fleet.agent().post, fleet.upstream.http_url + path, json={"amount": 7}, timeout=30)
    pending = pending_for(fleet, path)
    assert api(fleet.far, "POST", f"/api/approvals/{pending['id']}/deny", "alice",
               {"reason": "Refunds above 5000 need a ticket"}).status_code == 200
    call["thread"].join(20)
    resp = call["response"]
    assert resp.status_code == 403 and resp.headers["x-should-retry"] == "false"
    err = resp.json()["error"]
    assert err["type"] == "approval_denied" and err["approval_id"] == pending["id"]
    assert err["reason"] == "Refunds above 5000 need a ticket" and "need a ticket" in err["message"]
    resend = fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 7}, timeout=30)
    assert resend.status_code == 403 and resend.json()["error"]["type"] == "approval_denied"
    assert hits(fleet, path) == 0


def test_undecided_409_then_cli_approval_passes_one_resend(fleet: Fleet) -> None:
    path = refund_path()
    agent = fleet.agent()
    body = b'{"amount": 9000, "memo": "\x1b[2K\rall fine"}'  # a raw escape sequence: must not reach a terminal
    headers = {"content-type": "application/json"}
    first = agent.post(fleet.upstream.http_url + path, data=body, headers=headers, timeout=30)
    assert first.status_code == 409
    assert first.headers["x-should-retry"] == "false" and int(first.headers["Retry-After"]) == WAIT
    err = first.json()["error"]
    assert err["type"] == "approval_pending" and err["approval_id"].startswith("apr_")
    listed = fleet.cli("list", "--state", "pending", user="bob")
    assert listed.returncode == 0 and err["approval_id"] in listed.stdout
    shown = fleet.cli("show", err["approval_id"], user="bob")
    assert shown.returncode == 0 and '"amount": 9000' in shown.stdout
    assert "\\x1b[2K\\x0dall fine" in shown.stdout and "\x1b" not in shown.stdout
    approved = fleet.cli("approve", err["approval_id"], "--comment", "ticket 42", user="alice")
    assert approved.returncode == 0, approved.stderr
    assert f"{err['approval_id']} approved by alice" in approved.stdout
    second = agent.post(fleet.upstream.http_url + path, data=body, headers=headers, timeout=30)
    assert second.status_code == 200 and hits(fleet, path) == 1
    third = agent.post(fleet.upstream.http_url + path, data=body, headers=headers, timeout=30)
    assert third.status_code == 409 and third.json()["error"]["approval_id"] != err["approval_id"]
    assert hits(fleet, path) == 1


def test_retries_join_one_approval_and_a_changed_body_needs_its_own(fleet: Fleet) -> None:
    path = refund_path()
    calls = [post_later(fleet.agent().post, fleet.upstream.http_url + path, json={"amount": 9000, "to": "x"},
                        timeout=30) for _ in range(10)]
    for c in calls:
        c["thread"].join(30)
    ids = {c["response"].json()["error"]["approval_id"] for c in calls}
    assert len(ids) == 1 and all(c["response"].status_code == 409 for c in calls)
    # the same call with its keys in another order is the same call; another amount is not
    same = fleet.agent().post(fleet.upstream.http_url + path, data=b'{"to": "x", "amount": 9000}',
                              headers={"content-type": "application/json"}, timeout=30)
    assert same.json()["error"]["approval_id"] in ids
    [approval_id] = ids
    assert api(fleet.far, "GET", f"/api/approvals/{approval_id}", "bob").json()["joins"] == 10
    assert api(fleet.far, "POST", f"/api/approvals/{approval_id}/approve", "alice").status_code == 200
    changed = fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 90000, "to": "x"}, timeout=30)
    assert changed.status_code == 409 and changed.json()["error"]["approval_id"] not in ids
    other_account = fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 9000, "to": "x"},
                                       headers={"Authorization": "Bearer another-customer"}, timeout=30)
    assert other_account.status_code == 409 and other_account.json()["error"]["approval_id"] not in ids
    assert hits(fleet, path) == 0
    ok = fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 9000, "to": "x"}, timeout=30)
    assert ok.status_code == 200 and hits(fleet, path) == 1


def test_an_approval_covers_only_what_was_approved(fleet: Fleet) -> None:
    """Credentials in other headers, and stricter rules for a variant of the call, need their own approval."""
    path = refund_path()
    url = fleet.upstream.http_url + path
    first = fleet.agent().post(url, json={"amount": 10}, headers={"Stripe-Account": "acct_OWN"}, timeout=30)
    approval_id = first.json()["error"]["approval_id"]
    assert api(fleet.far, "POST", f"/api/approvals/{approval_id}/approve", "alice").status_code == 200
    swapped = fleet.agent().post(url, json={"amount": 10}, headers={"Stripe-Account": "acct_VICTIM"}, timeout=30)
    assert swapped.status_code == 409 and swapped.json()["error"]["approval_id"] != approval_id
    gold = fleet.agent().post(url, json={"amount": 10}, headers={"Stripe-Account": "acct_OWN", "x-tier": "gold"},
                              timeout=30)
    assert gold.status_code == 409 and gold.json()["error"]["approval_id"] != approval_id
    assert hits(fleet, path) == 0
    exact = fleet.agent().post(url, json={"amount": 10}, headers={"Stripe-Account": "acct_OWN"}, timeout=30)
    assert exact.status_code == 200 and hits(fleet, path) == 1


def test_an_approval_used_by_a_call_a_lock_refused_is_given_back(fleet: Fleet) -> None:
    ticket = uuid.uuid4().hex[:8]
    assert fleet.agent("billing-bot").post(f"{fleet.upstream.http_url}/work/{ticket}", json={},
                                           timeout=30).status_code == 200
    url = f"{fleet.upstream.http_url}/locked/{ticket}"
    first = fleet.agent().post(url, json={"pay": 1}, timeout=30)
    approval_id = first.json()["error"]["approval_id"]
    assert api(fleet.far, "POST", f"/api/approvals/{approval_id}/approve", "alice").status_code == 200
    locked = fleet.agent().post(url, json={"pay": 1}, timeout=30)
    assert locked.status_code == 423 and locked.json()["error"]["holder"] == "billing-bot"
    assert api(fleet.far, "GET", f"/api/approvals/{approval_id}", "bob").json()["state"] == "approved"
    assert api(fleet.far, "POST", f"/api/locks/ticket%3A{ticket}/release", "carol").status_code == 200
    done = fleet.agent().post(url, json={"pay": 1}, timeout=30)
    assert done.status_code == 200 and hits(fleet, f"/locked/{ticket}") == 1
    assert api(fleet.far, "GET", f"/api/approvals/{approval_id}", "bob").json()["state"] == "executed"


def test_the_approver_sees_what_the_upstream_will_read(fleet: Fleet) -> None:
    path = refund_path()
    doc = {"amount": 4200, "api_key": "sk-live-abcdefghijklmnopqrstuvwx", "note": "é" * 10}
    body = gzip.compress(json.dumps(doc).encode())
    resp = fleet.agent().post(fleet.upstream.http_url + path, data=body, timeout=30,
                              headers={"content-type": "application/json", "content-encoding": "gzip",
                                       "x-api-key": "sk-live-abcdefghijklmnopqrstuvwx"})
    approval = api(fleet.far, "GET", f"/api/approvals/{resp.json()['error']['approval_id']}", "bob").json()
    preview = approval["preview"]
    shown = json.loads(preview["body"])
    assert shown["amount"] == 4200 and shown["note"] == "é" * 10
    assert "abcdefghijklmnop" not in json.dumps(approval)  # the key is masked in the body and the header
    assert preview["content_encoding"] == "gzip" and preview["body_size"] == len(body)


def test_a_client_that_leaves_never_reaches_the_upstream_until_it_resends(fleet: Fleet) -> None:
    path = refund_path()
    with pytest.raises(requests.exceptions.ReadTimeout):
        fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 1}, timeout=1)
    pending = pending_for(fleet, path)
    time.sleep(WAIT)  # past the hold: the sidecar let go of the connection
    assert api(fleet.far, "POST", f"/api/approvals/{pending['id']}/approve", "alice").status_code == 200
    time.sleep(1.0)
    assert hits(fleet, path) == 0
    resend = fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 1}, timeout=30)
    assert resend.status_code == 200 and hits(fleet, path) == 1


def test_client_gone_while_held_then_approved_is_not_forwarded(fleet: Fleet) -> None:
    path = refund_path()
    with pytest.raises(requests.exceptions.ReadTimeout):
        fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 2}, timeout=0.5)
    pending = pending_for(fleet, path)
    # decide while the sidecar may still be holding the dead connection (the hold lasts WAIT seconds)
    assert api(fleet.far, "POST", f"/api/approvals/{pending['id']}/approve", "alice").status_code == 200
    time.sleep(WAIT + 0.5)
    assert hits(fleet, path) == 0
    assert api(fleet.far, "GET", f"/api/approvals/{pending['id']}", "bob").json()["state"] == "approved"


def test_nobody_decides_in_time(fleet: Fleet) -> None:
    path = f"/expiring/{uuid.uuid4().hex[:12]}"
    resp = fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 1}, timeout=30)
    assert resp.status_code == 403
    err = resp.json()["error"]
    assert err["type"] == "approval_expired" and err["approval_id"].startswith("apr_")
    assert "Sending the same call again asks for a new approval" in err["message"]
    late = api(fleet.far, "POST", f"/api/approvals/{err['approval_id']}/approve", "alice")
    assert late.status_code == 409 and "expired" in late.json()["error"]["message"]
    assert hits(fleet, path) == 0


def test_who_may_decide(fleet: Fleet) -> None:
    path = refund_path()
    first = fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 3}, timeout=30)
    approval_id = first.json()["error"]["approval_id"]
    owner = api(fleet.far, "POST", f"/api/approvals/{approval_id}/approve", "olga")
    assert owner.status_code == 403 and "owns agent 'support-bot'" in owner.json()["error"]["message"]
    viewer = api(fleet.far, "POST", f"/api/approvals/{approval_id}/approve", "bob")
    assert viewer.status_code == 403 and "approver role" in viewer.json()["error"]["message"]
    assert api(fleet.far, "GET", "/api/approvals", "nemo").status_code == 403  # no reading role: sees nothing
    anonymous = api(fleet.far, "POST", f"/api/approvals/{approval_id}/approve", None)
    assert anonymous.status_code == 401 and api(fleet.far, "GET", "/api/approvals", None).status_code == 401
    cli_owner = fleet.cli("approve", approval_id, user="olga")
    assert cli_owner.returncode == 1 and "owns agent" in cli_owner.stderr
    assert api(fleet.far, "GET", f"/api/approvals/{approval_id}", "bob").json()["state"] == "pending"
    # billing-bot has no owner: olga may decide its calls
    other = fleet.agent("billing-bot").post(fleet.upstream.http_url + path, json={"amount": 3}, timeout=30)
    assert api(fleet.far, "POST", f"/api/approvals/{other.json()['error']['approval_id']}/approve",
               "olga").status_code == 200


def test_two_distinct_approvers(fleet: Fleet) -> None:
    path = f"/payouts/{uuid.uuid4().hex[:12]}"
    call = post_later(fleet.agent("billing-bot").post, fleet.upstream.http_url + path, json={"n": 1}, timeout=30)
    pending = pending_for(fleet, path)
    assert api(fleet.far, "POST", f"/api/approvals/{pending['id']}/approve", "alice").status_code == 200
    assert api(fleet.far, "POST", f"/api/approvals/{pending['id']}/approve", "alice").status_code == 409
    assert api(fleet.far, "POST", f"/api/approvals/{pending['id']}/approve", "carol").status_code == 200
    call["thread"].join(20)
    assert call["response"].status_code == 200 and hits(fleet, path) == 1


def test_a_grant_passes_that_agent_and_rule_only(fleet: Fleet) -> None:
    path = refund_path()
    first = fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 5}, timeout=30)
    approval_id = first.json()["error"]["approval_id"]
    granted = api(fleet.far, "POST", f"/api/approvals/{approval_id}/approve", "alice",
                  {"comment": "batch of refunds", "grant": "30m"})
    assert granted.status_code == 200 and granted.json()["approval"]["grant"]["by"] == "alice"
    grant_id = granted.json()["approval"]["grant"]["id"]
    other_call = refund_path()
    passed = fleet.agent().post(fleet.upstream.http_url + other_call, json={"amount": 6}, timeout=30)
    assert passed.status_code == 200 and hits(fleet, other_call) == 1
    not_covered = fleet.agent("billing-bot").post(fleet.upstream.http_url + other_call, json={"amount": 6},
                                                  timeout=30)
    assert not_covered.status_code == 409
    payouts = f"/payouts/{uuid.uuid4().hex[:12]}"
    assert fleet.agent().post(fleet.upstream.http_url + payouts, json={}, timeout=30).status_code == 409
    listed = api(fleet.far, "GET", "/api/grants", "bob").json()["grants"]
    assert any(g["id"] == grant_id and g["agent"] == "support-bot" for g in listed)
    assert api(fleet.far, "POST", f"/api/grants/{grant_id}/revoke", "olga").status_code == 403
    assert api(fleet.far, "POST", f"/api/grants/{grant_id}/revoke", "alice").status_code == 200
    after = fleet.agent().post(fleet.upstream.http_url + refund_path(), json={"amount": 7}, timeout=30)
    assert after.status_code == 409


def test_an_agent_cannot_flood_approvers_with_distinct_calls(fleet: Fleet) -> None:
    base = f"{fleet.upstream.http_url}/refunds/flood-{uuid.uuid4().hex[:8]}"
    calls = [post_later(fleet.agent("flood-bot").post, f"{base}/{i}", json={"i": i}, timeout=30)
             for i in range(MAX_OPEN + 5)]
    for c in calls:
        c["thread"].join(30)
    statuses = sorted(c["response"].status_code for c in calls)
    assert statuses == [409] * MAX_OPEN + [429] * 5
    throttled = next(c["response"] for c in calls if c["response"].status_code == 429)
    err = throttled.json()["error"]
    assert err["type"] == "approval_rate_limited" and throttled.headers["x-should-retry"] == "false"
    pending = next(c for c in calls if c["response"].status_code == 409)
    url = pending["response"].request.url
    again = fleet.agent("flood-bot").post(url, data=pending["response"].request.body,
                                          headers={"content-type": "application/json"}, timeout=30)
    assert again.status_code == 409  # re-sending a call that has its approval is never limited
    assert again.json()["error"]["approval_id"] == pending["response"].json()["error"]["approval_id"]
    assert not any(p.startswith(base.removeprefix(fleet.upstream.http_url)) for p in fleet.upstream.paths())


def test_webhook_is_signed_and_carries_no_body(fleet: Fleet) -> None:
    path = refund_path()
    first = fleet.agent().post(fleet.upstream.http_url + path, json={"amount": 8, "card": "4111"}, timeout=30)
    approval_id = first.json()["error"]["approval_id"]
    headers, body = fleet.hook.wait_for(approval_id, "pending")
    stamp = headers["x-bastion-timestamp"]
    expected = "sha256=" + hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-bastion-signature"], expected)
    assert headers["idempotency-key"] == f"{approval_id}:pending"
    doc = json.loads(body)
    assert doc["link"] == f"https://bastion.example.com/approvals/{approval_id}"
    assert doc["link"] in doc["text"] and "support-bot" in doc["text"]
    assert b"4111" not in body
    denied = fleet.cli("deny", approval_id, "--reason", "no", user="alice")
    assert denied.returncode == 0, denied.stderr
    _, decided = fleet.hook.wait_for(approval_id, "denied")
    assert json.loads(decided)["decided_by"] == "alice"


def test_openai_sdk_sees_approval_pending_and_does_not_retry(fleet: Fleet) -> None:
    base = f"{fleet.upstream.http_url}/llm/v1"
    http_client = openai.DefaultHttpxClient(proxy=fleet.near.proxy_url("support-bot", TOKENS["support-bot"]),
                                            trust_env=False)
    client = openai.OpenAI(api_key="sk-test", base_url=base, http_client=http_client)  # default: 2 retries
    nonce = uuid.uuid4().hex
    with pytest.raises(openai.ConflictError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": nonce}])
    assert "waits for a person's approval" in str(info.value)
    body = info.value.response.json()
    approval = api(fleet.far, "GET", f"/api/approvals/{body['error']['approval_id']}", "bob").json()
    assert approval["joins"] == 0  # the SDK did not send it again


def test_metrics_and_audit_record_the_decision(fleet: Fleet) -> None:
    path = refund_path()
    call = post_later(fleet.agent().post, fleet.upstream.http_url + path, json={"amount": 9}, timeout=30)
    pending = pending_for(fleet, path)
    api(fleet.far, "POST", f"/api/approvals/{pending['id']}/approve", "alice", {"comment": "audited"})
    call["thread"].join(20)
    request_id = call["response"].headers["X-Bastion-Request-Id"]
    deadline = time.monotonic() + 15
    while True:
        flow = api(fleet.near, "GET", f"/api/flows/{request_id}", "bob")
        if flow.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert flow.status_code == 200, flow.text
    approval = flow.json()["approval"]
    assert (approval["id"], approval["state"], approval["decided_by"], approval["note"]) == (
        pending["id"], "approved", "alice", "audited")
    assert approval["waited_us"] > 0
    text = requests.get(fleet.near.admin_url + "/metrics", timeout=10, proxies={"http": "", "https": ""}).text
    assert 'bastion_approvals_total{outcome="executed"}' in text
    assert "bastion_approval_wait_seconds_count" in text and "bastion_approvals_pending" in text


def test_held_calls_survive_a_restart(tmp_path: Path, bastion_home: Path, test_certs: CertFiles,
                                      upstream: Upstream, hook: Hook) -> None:
    rules = write_policy(tmp_path / "rules.yaml", hook.port)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    args = ["--store", store]
    path = refund_path()
    with run_bastion(tmp_path / "first", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                     extra_args=args) as first:
        held = first.session("support-bot", TOKENS["support-bot"]).post(
            upstream.http_url + path, json={"amount": 11}, timeout=30)
        assert held.status_code == 409
    approval_id = held.json()["error"]["approval_id"]
    cli = run_cli("approvals", "approve", approval_id, "--rules", str(rules), "--store", store,
                  "--home", str(bastion_home), env={"BASTION_USER_TOKEN": USERS["alice"]})
    assert cli.returncode == 0, cli.stderr
    with run_bastion(tmp_path / "second", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                     extra_args=args) as second:
        resend = second.session("support-bot", TOKENS["support-bot"]).post(
            upstream.http_url + path, json={"amount": 11}, timeout=30)
        assert resend.status_code == 200 and sum(1 for p in upstream.paths() if p == path) == 1


def test_store_outage_refuses_held_calls_and_recovers(tmp_path: Path, bastion_home: Path, test_certs: CertFiles,
                                                     upstream: Upstream, hook: Hook) -> None:
    """The sidecar's Redis goes away: held calls fail closed with 503 (other calls pass); once Redis is back,
    holds work again without a restart."""
    rules = write_policy(tmp_path / "rules.yaml", hook.port)
    with RedisServer() as redis_server, run_bastion(
            tmp_path / "s", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
            extra_args=["--store", redis_server.url]) as srv:
        agent = srv.session("support-bot", TOKENS["support-bot"])
        redis_server.stop()
        path = refund_path()
        refused = agent.post(upstream.http_url + path, json={"amount": 1}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "store_unavailable"
        assert refused.headers["x-should-retry"] == "false"
        assert agent.get(upstream.http_url + "/plain", timeout=30).status_code == 200
        redis_server.start()
        deadline = time.monotonic() + 15
        while True:
            again = agent.post(upstream.http_url + path, json={"amount": 1}, timeout=30)
            if again.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.status_code == 409 and again.json()["error"]["type"] == "approval_pending"
        assert sum(1 for p in upstream.paths() if p == path) == 0


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
