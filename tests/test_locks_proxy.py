"""Task locks through two real sidecars sharing one store, for each backend (a SQLite file, real Redis).

Two `bastion serve` processes, one pinned to agent-a and one to agent-b, share the store and sit in front of
a local fenced upstream (tests/lockproxy.py) that records every request with the `Bastion-Fence` it got.
Clients are requests, httpx and curl; admin actions go through `bastion locks` and the admin API. Each test
works on tickets of its own, so the tests share the two sidecars without seeing each other's locks.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import requests
from lockhistory import RedisServer, delete_prefix
from lockproxy import FencedUpstream
from services import require_redis
from support.bastion import BastionServer, clean_env, run_bastion, run_cli

A, B = "agent-a", "agent-b"
ALICE, BOB = "alice-token", "bob-token"  # alice: admin; bob: viewer


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


RULES = textwrap.dedent(f"""\
    version: 1
    defaults: {{effect: deny}}
    agents:
      agent-a: {{roles: [worker]}}
      agent-b: {{roles: [worker]}}
      old-bot: {{roles: [worker], status: retired}}
    users:
      alice: {{roles: [admin], token_sha256: {_sha(ALICE)}}}
      bob: {{roles: [viewer], token_sha256: {_sha(BOB)}}}
    rules:
      - id: upstream
        effect: allow
        agents: ["role:worker"]
        match: {{host: 127.0.0.1}}
      - id: ticket-work
        effect: allow
        agents: ["role:worker"]
        match: {{method: POST, path: "/tickets/{{ticket}}/comments"}}
        lock: {{key: "ticket:{{ticket}}", ttl: 30s}}
      - id: ticket-close
        effect: allow
        agents: ["role:worker"]
        match: {{method: POST, path: "/tickets/{{ticket}}/close"}}
        release: "ticket:{{ticket}}"
      - id: quick-work
        effect: allow
        agents: ["role:worker"]
        match: {{method: POST, path: "/quick/{{ticket}}"}}
        lock: {{key: "quick:{{ticket}}", ttl: 1s}}
      - id: short-work
        effect: allow
        agents: ["role:worker"]
        match: {{method: POST, path: "/short/{{ticket}}"}}
        lock: {{key: "short:{{ticket}}", ttl: 2s}}
      - id: pair-first
        effect: allow
        agents: ["role:worker"]
        match: {{method: POST, path: "/pair/{{x}}/{{y}}"}}
        lock: {{key: "ticket:{{x}}", ttl: 30s}}
      - id: pair-second
        effect: allow
        agents: ["role:worker"]
        match: {{method: POST, path: "/pair/{{x}}/{{y}}"}}
        lock: {{key: "ticket:{{y}}", ttl: 30s}}
    network:
      allow_private: ["127.0.0.0/8"]
    """)


@dataclass
class Pair:
    a: BastionServer
    b: BastionServer
    store: str
    rules: Path
    home: Path


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lock-rules") / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shared store: a SQLite file both sidecars open, or real Redis under a prefix of this run's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('lock-store') / 'locks.db'}"
        return
    url = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    try:
        yield f"{url}?prefix={prefix}"
    finally:
        delete_prefix(url, prefix)


@pytest.fixture(scope="module")
def fenced() -> Iterator[FencedUpstream]:
    with FencedUpstream().in_thread() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, bastion_home: Path, rules: Path, store_url: str,
         fenced: FencedUpstream) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("lock-pair")
    store = ["--store", store_url]
    with run_bastion(workdir / "a", [rules], home=bastion_home, agent=A, extra_args=store) as a, \
            run_bastion(workdir / "b", [rules], home=bastion_home, agent=B, extra_args=store) as b:
        yield Pair(a, b, store_url, rules, bastion_home)


def ticket() -> str:
    return uuid.uuid4().hex[:10]


def post(server: BastionServer, fenced: FencedUpstream, path: str, **headers: str) -> requests.Response:
    """A POST through `server` with requests (no proxy variables, no retries)."""
    with requests.Session() as s:
        s.trust_env = False
        return s.post(fenced.url + path, proxies={"http": server.proxy_url()}, headers=headers, timeout=20)


def fence_of(resp: requests.Response | httpx.Response) -> int:
    assert resp.status_code == 200, resp.text
    return int(resp.json()["fence"])


def refusal(resp: requests.Response | httpx.Response, status: int = 423) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def admin(server: BastionServer, method: str, path: str, token: str | None = None,
          body: dict | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with requests.Session() as s:
        s.trust_env = False
        return s.request(method, server.admin_url + path, json=body, headers=headers, timeout=20)


def locks_cli(pair: Pair, *args: str, token: str = ALICE) -> subprocess.CompletedProcess[str]:
    return run_cli("locks", *args, "--store", pair.store, "--rules", str(pair.rules), "--home", str(pair.home),
                   "--user-token", token)


def metric(server: BastionServer, name: str) -> float:
    status, body = server.admin_get("/metrics")
    assert status == 200
    m = re.search(rf"^{name} (\S+)$", body.decode(), re.MULTILINE)
    assert m is not None, f"{name} not in /metrics"
    return float(m.group(1))


def audit_tail_label(pair: Pair, request_id: str, timeout: float = 20.0) -> str:
    """The decision column `bastion audit tail` prints for one request (once its record reached the audit)."""
    deadline = time.monotonic() + timeout
    while True:
        tail = run_cli("audit", "tail", "-n", "200", "--store", pair.store, "--home", str(pair.home))
        line = next((ln for ln in tail.stdout.splitlines() if request_id in ln), None)
        if line is not None:
            return line.split()[3]
        assert time.monotonic() < deadline, f"{request_id} never appeared in audit tail: {tail.stderr}"
        time.sleep(0.2)


def wait_for_status(send: Callable[[], requests.Response], status: int, timeout: float = 15.0) -> requests.Response:
    """Send until the answer has `status` (a lease running out, a store coming back)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = send()
        if resp.status_code == status or time.monotonic() > deadline:
            return resp
        time.sleep(0.1)


# -- conflicts and releases ------------------------------------------------------------------------------


def test_other_agent_is_refused_with_423_before_the_upstream_sees_it(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    conflicts = metric(pair.b, "bastion_lock_conflicts_total")
    held = post(pair.a, fenced, f"/tickets/{t}/comments")
    fence = fence_of(held)
    refused = post(pair.b, fenced, f"/tickets/{t}/comments?from=b")
    err = refusal(refused)
    assert (err["type"], err["lock"], err["holder"], err["rule"]) == ("lock_conflict", f"ticket:{t}", A, "ticket-work")
    expires = datetime.fromisoformat(err["expires_at"].replace("Z", "+00:00"))
    assert expires > datetime.now(UTC)
    assert refused.headers["x-should-retry"] == "false"
    assert 1 <= int(refused.headers["Retry-After"]) <= 30
    assert refused.headers["X-Bastion-Request-Id"] == err["request_id"]
    assert f"/tickets/{t}/comments?from=b" not in fenced.seen_paths()
    assert metric(pair.b, "bastion_lock_conflicts_total") == conflicts + 1
    # Counted under its own outcome, not as the `allow` the rules said before the lock stage refused it.
    assert metric(pair.b, f'bastion_requests_total{{agent="{B}",decision="lock_conflict"}}') >= 1
    assert audit_tail_label(pair, refused.headers["X-Bastion-Request-Id"]) == "lock_conflict"
    # The holder keeps working under the same fence.
    assert fence_of(post(pair.a, fenced, f"/tickets/{t}/comments")) == fence


def test_release_rule_frees_the_lock_after_a_2xx_only(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    fence = fence_of(post(pair.a, fenced, f"/tickets/{t}/comments"))
    failed = post(pair.a, fenced, f"/tickets/{t}/close?status=409")
    assert failed.status_code == 409 and failed.json()["fence"] == fence  # forwarded under the lock, kept
    assert refusal(post(pair.b, fenced, f"/tickets/{t}/comments"))["holder"] == A
    closed = post(pair.a, fenced, f"/tickets/{t}/close")
    assert fence_of(closed) == fence
    assert fence_of(post(pair.b, fenced, f"/tickets/{t}/comments")) > fence


def test_closing_someone_elses_ticket_is_refused_and_a_free_one_passes(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    post(pair.a, fenced, f"/tickets/{t}/comments")
    err = refusal(post(pair.b, fenced, f"/tickets/{t}/close?from=b"))
    assert (err["holder"], err["rule"]) == (A, "ticket-close")
    assert f"/tickets/{t}/close?from=b" not in fenced.seen_paths()
    free = post(pair.b, fenced, f"/tickets/{ticket()}/close")
    assert free.status_code == 200 and free.json()["fence"] is None


def test_lock_expires_after_its_ttl(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    fence = fence_of(post(pair.a, fenced, f"/quick/{t}"))
    assert refusal(post(pair.b, fenced, f"/quick/{t}"))["holder"] == A
    taken = wait_for_status(lambda: post(pair.b, fenced, f"/quick/{t}"), 200, timeout=10)
    assert fence_of(taken) > fence
    assert refusal(post(pair.a, fenced, f"/quick/{t}"))["holder"] == B


def test_holder_requests_renew_the_lock_past_its_ttl(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    with httpx.Client(proxy=pair.a.proxy_url(), trust_env=False, timeout=20) as client:
        started = time.monotonic()
        fences = set()
        while time.monotonic() - started < 3.0:  # the rule's ttl is 2s
            fences.add(fence_of(client.post(f"{fenced.url}/short/{t}")))
            time.sleep(0.4)
    assert len(fences) == 1  # renewals keep the grant
    assert refusal(post(pair.b, fenced, f"/short/{t}"))["holder"] == A


def test_several_locks_send_every_fence_in_rule_order(pair: Pair, fenced: FencedUpstream) -> None:
    x, y = ticket(), ticket()
    fy = fence_of(post(pair.a, fenced, f"/tickets/{y}/comments"))
    resp = post(pair.a, fenced, f"/pair/{x}/{y}")
    assert resp.status_code == 200
    first, second = (int(f) for f in resp.json()["fence"].split(","))
    assert second == fy and first != fy
    # b cannot take the pair while a holds either ticket, and its refused grant of the other is given back.
    other = ticket()
    assert refusal(post(pair.b, fenced, f"/pair/{other}/{y}"))["lock"] == f"ticket:{y}"
    assert fence_of(post(pair.a, fenced, f"/tickets/{other}/comments")) > 0


def test_agents_cannot_forge_the_fence_header(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    plain = post(pair.a, fenced, f"/plain/{t}", **{"Bastion-Fence": "99999999999999999"})
    assert plain.status_code == 200 and plain.json()["fence"] is None
    guarded = post(pair.a, fenced, f"/tickets/{t}/comments", **{"bastion-fence": "99999999999999999"})
    assert fence_of(guarded) < 99999999999999999


# -- admin: handoff, release, listing --------------------------------------------------------------------


def test_handoff_with_the_cli(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    before = fence_of(post(pair.a, fenced, f"/tickets/{t}/comments"))
    done = locks_cli(pair, "handoff", f"ticket:{t}", "--to", B)
    assert done.returncode == 0, done.stderr
    assert f"from {A} to {B}" in done.stdout
    err = refusal(post(pair.a, fenced, f"/tickets/{t}/comments"))
    assert err["holder"] == B and "handed off" in err["message"]
    after = fence_of(post(pair.b, fenced, f"/tickets/{t}/comments"))
    assert after > before
    assert fenced.seen[-1]["fence"] == str(after)


def test_handoff_with_the_api(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    key = quote(f"ticket:{t}", safe="")
    path = f"/api/locks/{key}/handoff"
    before = fence_of(post(pair.a, fenced, f"/tickets/{t}/comments"))
    assert admin(pair.a, "POST", path, body={"to": B}).status_code == 401
    assert admin(pair.a, "POST", path, BOB, {"to": B}).status_code == 403
    assert "no such agent" in admin(pair.a, "POST", path, ALICE, {"to": "nobody"}).json()["error"]["message"]
    retired = admin(pair.a, "POST", path, ALICE, {"to": "old-bot"})
    assert retired.status_code == 400 and "retired" in retired.json()["error"]["message"]
    assert admin(pair.a, "POST", path, ALICE, {"too": B}).status_code == 400
    assert admin(pair.a, "POST", f"/api/locks/{quote('ticket:none', safe='')}/handoff", ALICE,
                 {"to": B}).status_code == 404
    done = admin(pair.a, "POST", path, ALICE, {"to": B})
    assert done.status_code == 200, done.text
    assert done.json()["handoff"] | {"expires_at": None, "acquired_at": None} == {
        "key": f"ticket:{t}", "holder": A, "fence": before, "handoff_to": B, "expires_at": None, "acquired_at": None}
    assert refusal(post(pair.a, fenced, f"/tickets/{t}/comments"))["holder"] == B
    assert fence_of(post(pair.b, fenced, f"/tickets/{t}/comments")) > before
    assert re.search(rf"lock handoff by admin user alice: key='ticket:{t}' holder={A}", pair.a.logs())


def test_admin_release_with_the_cli(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    post(pair.a, fenced, f"/tickets/{t}/comments")
    assert locks_cli(pair, "release", f"ticket:{t}", token=BOB).returncode == 1
    done = locks_cli(pair, "release", f"ticket:{t}")
    assert done.returncode == 0, done.stderr
    assert f"held by {A}" in done.stdout
    assert post(pair.b, fenced, f"/tickets/{t}/comments").status_code == 200


def test_admin_release_and_listing_with_the_api(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    fence = fence_of(post(pair.a, fenced, f"/tickets/{t}/comments"))
    listed = admin(pair.b, "GET", "/api/locks", BOB)  # any user may read, on any sidecar of the fleet
    assert listed.status_code == 200
    mine = [lock for lock in listed.json()["locks"] if lock["key"] == f"ticket:{t}"]
    assert [(lock["holder"], lock["fence"], lock["handoff_to"]) for lock in mine] == [(A, fence, None)]
    assert metric(pair.b, "bastion_locks_held") >= 1  # refreshed by the listing
    assert admin(pair.b, "GET", "/api/locks").status_code == 401
    path = f"/api/locks/{quote(f'ticket:{t}', safe='')}/release"
    assert admin(pair.b, "POST", path).status_code == 401
    forbidden = admin(pair.b, "POST", path, BOB)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "forbidden"
    done = admin(pair.b, "POST", path, ALICE)
    assert done.status_code == 200 and done.json()["released"]["holder"] == A
    assert admin(pair.b, "POST", path, ALICE).status_code == 404
    assert post(pair.b, fenced, f"/tickets/{t}/comments").status_code == 200


def test_curl_sees_the_refusal_an_llm_sdk_would(pair: Pair, fenced: FencedUpstream) -> None:
    t = ticket()
    post(pair.b, fenced, f"/tickets/{t}/comments")
    out = subprocess.run(["curl", "-sS", "-i", "--max-time", "20", "-x", pair.a.proxy_url(), "-X", "POST",
                          f"{fenced.url}/tickets/{t}/comments"], capture_output=True, text=True, timeout=30,
                         env=clean_env())
    head, _, body = out.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 423")
    assert "x-should-retry: false" in head.lower()
    assert f'"holder":"{B}"' in body and '"type":"lock_conflict"' in body


# -- the store going away and coming back ----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Outage]]:
    if request.param == "redis":
        with RedisServer() as server:
            yield f"{server.url}?prefix=bastiontest:", RedisOutage(server)
    else:
        path = tmp_path / "locks.db"
        yield f"sqlite:///{path}", SqliteOutage(path)


class Outage:
    """Takes the store away and gives it back."""

    def begin(self) -> None: ...

    def end(self) -> None: ...


class RedisOutage(Outage):
    """Kills this test's own redis-server and starts it again on the same port (without the old data)."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server

    def begin(self) -> None:
        self.server.stop()

    def end(self) -> None:
        self.server.start()


class SqliteOutage(Outage):
    """Another process holds the database's write lock past the store's busy timeout (a stuck writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def begin(self) -> None:
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def end(self) -> None:
        assert self.conn is not None
        self.conn.execute("ROLLBACK")
        self.conn.close()


def test_store_outage_fails_lock_rules_closed_and_recovers_by_itself(
        tmp_path: Path, bastion_home: Path, rules: Path, fenced: FencedUpstream,
        outage: tuple[str, Outage]) -> None:
    url, store = outage
    with run_bastion(tmp_path / "a", [rules], home=bastion_home, agent=A, extra_args=["--store", url]) as a:
        t = ticket()
        fence = fence_of(post(a, fenced, f"/tickets/{t}/comments"))
        store.begin()
        try:
            err = refusal(post(a, fenced, f"/tickets/{t}/comments?during=outage"), 503)
            assert err["type"] == "store_unavailable" and f"ticket:{t}" in err["message"]
            assert f"/tickets/{t}/comments?during=outage" not in fenced.seen_paths()
            assert post(a, fenced, f"/plain/{t}").status_code == 200  # calls without a lock still pass
            if isinstance(store, RedisOutage):
                status, body = a.admin_get("/readyz")
                assert status == 503 and json.loads(body)["checks"]["store"]["ok"] is False
        finally:
            store.end()
        back = wait_for_status(lambda: post(a, fenced, f"/tickets/{t}/comments"), 200)
        # The SQLite lease survived the outage. Redis came back empty, so the lock is granted anew, and its
        # fence still increases (the fence follows the Redis clock, not only a counter the restart lost).
        if isinstance(store, SqliteOutage):
            assert fence_of(back) == fence
        else:
            assert fence_of(back) > fence
        assert a.admin_get("/readyz")[0] == 200
