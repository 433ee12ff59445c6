"""The dashboard against hostile data and hostile pages: escaping, CSRF, roles, cookies, CSP, logins.

One `bastion serve` on SQLite; agents go through it to the local echo upstream, so what the pages show is
what an agent can put into the audit log and the approval queue.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
import requests
from dashboardhelp import AGENTS, USERS, login, write_policy
from support.bastion import BastionServer, run_bastion
from support.certs import CertFiles
from support.upstream import Upstream

from bastion.dashboard.security import CSP

PAYLOAD = '<script>alert("xss")</script><img src=x onerror=alert(1)>'
PAGES = ("/", "/flows", "/approvals", "/locks", "/agents", "/rules")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, bastion_home: Path, test_certs: CertFiles,
        upstream: Upstream) -> Iterator[BastionServer]:
    work = tmp_path_factory.mktemp("dash-security")
    rules = write_policy(work / "rules.yaml")
    with run_bastion(work / "a", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                     extra_args=["--store", f"sqlite:///{work / 'store.db'}"]) as a:
        yield a


def session_for(srv: BastionServer, user: str) -> tuple[requests.Session, str]:
    """A logged-in requests session (as a browser would be) and its CSRF token, read from a page."""
    s = requests.Session()
    s.trust_env = False
    resp = s.post(srv.admin_url + "/login", data={"token": USERS[user], "next": "/"},
                  headers={"Origin": srv.admin_url}, allow_redirects=False)
    assert resp.status_code == 303, resp.text
    page = s.get(srv.admin_url + "/locks")
    m = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert m is not None
    return s, m.group(1)


def agent(srv: BastionServer, name: str = "support-bot") -> requests.Session:
    return srv.session(name, AGENTS[name])


def test_agent_data_renders_as_text_and_never_runs(srv: BastionServer, upstream: Upstream, browser: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    sent = agent(srv).post(f"{upstream.http_url}/x/{tag}?q=%3Cscript%3E", data=PAYLOAD.encode(),
                           headers={"X-Evil": PAYLOAD, "Content-Type": "text/html"}, timeout=10)
    request_id = sent.headers["X-Bastion-Request-Id"]
    held_path = f"/refunds/{tag}"
    threading.Thread(target=lambda: agent(srv).post(f"{upstream.http_url}{held_path}",
                                                    data=PAYLOAD.encode(), timeout=90), daemon=True).start()
    s, _ = session_for(srv, "carol")
    deadline = time.monotonic() + 20
    while s.get(srv.admin_url + f"/api/flows/{request_id}").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for path in (f"/flows/{request_id}", "/flows", "/approvals"):
        html = s.get(srv.admin_url + path).text
        assert "<script>alert" not in html and "<img src=x onerror" not in html, path
    detail = s.get(srv.admin_url + f"/flows/{request_id}").text
    assert "&lt;script&gt;alert(&#34;xss&#34;)&lt;/script&gt;" in detail
    page = login(browser, srv.admin_url, "carol")
    for path in (f"/flows/{request_id}", "/flows", "/approvals"):
        page.goto(srv.admin_url + path)
        page.wait_for_timeout(300)
    assert page.dialogs == [] and page.script_errors == []
    page.goto(srv.admin_url + f"/flows/{request_id}")
    assert PAYLOAD in page.inner_text("main")  # shown to the reader, as text


def test_csp_and_headers_on_every_answer(srv: BastionServer) -> None:
    s, _ = session_for(srv, "bob")
    answers = [s.get(srv.admin_url + p) for p in (*PAGES, "/flows/nope", "/approvals/apr_nope")]
    answers += [requests.get(srv.admin_url + p, allow_redirects=False, timeout=10)
                for p in ("/login", "/", "/api/locks", "/healthz")]
    answers.append(s.post(srv.admin_url + "/locks/x/release"))  # refused: no CSRF token
    for resp in answers:
        assert resp.headers["Content-Security-Policy"] == CSP, resp.url
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
    assert CSP == ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
                   "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    for resp in answers[: len(PAGES)]:
        assert "<script>" not in resp.text  # no inline script: every script is a file
        assert not re.search(r"<[^>]+\son[a-z]+=", resp.text), resp.url
        assert not re.search(r"<[^>]+\sstyle=", resp.text), resp.url


def test_session_cookie_flags(srv: BastionServer) -> None:
    resp = requests.post(srv.admin_url + "/login", data={"token": USERS["bob"], "next": "/flows"},
                         headers={"Origin": srv.admin_url}, allow_redirects=False, timeout=10)
    assert resp.status_code == 303 and resp.headers["Location"] == "/flows"
    cookie = resp.headers["Set-Cookie"]
    assert "bastion_session=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/" in cookie and "Max-Age=" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure is set when the request came over TLS
    assert USERS["bob"] not in cookie and "bob" not in cookie  # encrypted: neither token nor name readable


@pytest.mark.parametrize("bad", ["//evil.example/x", "https://evil.example", "/\\evil.example", "/\t/evil.example",
                                 "/\n/evil.example", "/\r/evil.example"])
def test_login_never_redirects_off_the_listener(srv: BastionServer, bad: str) -> None:
    resp = requests.post(srv.admin_url + "/login", data={"token": USERS["bob"], "next": bad},
                         headers={"Origin": srv.admin_url}, allow_redirects=False, timeout=10)
    assert resp.headers["Location"] == "/"


def test_wrong_token_and_cross_site_login_are_refused(srv: BastionServer) -> None:
    wrong = requests.post(srv.admin_url + "/login", data={"token": "nope"}, headers={"Origin": srv.admin_url},
                          timeout=10)
    assert wrong.status_code == 401 and "not valid" in wrong.text and "Set-Cookie" not in wrong.headers
    cross = requests.post(srv.admin_url + "/login", data={"token": USERS["bob"]},
                          headers={"Origin": "https://evil.example"}, timeout=10, allow_redirects=False)
    assert cross.status_code == 401 and "Set-Cookie" not in cross.headers


def test_unsafe_requests_need_the_csrf_token_and_the_same_origin(srv: BastionServer, upstream: Upstream) -> None:
    ticket = uuid.uuid4().hex[:8]
    assert agent(srv).post(f"{upstream.http_url}/tickets/{ticket}/comments", json={}, timeout=10).status_code == 200
    s, csrf = session_for(srv, "carol")
    target = srv.admin_url + f"/locks/ticket%3A{ticket}/release"
    no_token = s.post(target, headers={"Origin": srv.admin_url})
    assert no_token.status_code == 403 and no_token.json()["error"]["type"] == "csrf"
    wrong_origin = s.post(target, data={"csrf": csrf}, headers={"Origin": "https://evil.example"})
    assert wrong_origin.status_code == 403
    api_with_cookie = s.post(srv.admin_url + f"/api/locks/ticket%3A{ticket}/release",
                             headers={"Origin": srv.admin_url})
    assert api_with_cookie.status_code == 403  # the API too, when the cookie authenticates it
    locks = s.get(srv.admin_url + "/api/locks").json()["locks"]
    assert any(lk["key"] == f"ticket:{ticket}" for lk in locks)
    done = s.post(target, data={"csrf": csrf}, headers={"Origin": srv.admin_url}, allow_redirects=False)
    assert done.status_code == 303 and "Released" in unquote_plus(done.headers["Location"])


def test_each_role_sees_and_does_what_it_may(srv: BastionServer, upstream: Upstream) -> None:
    path = f"/refunds/{uuid.uuid4().hex[:8]}"
    holder = threading.Thread(target=lambda: agent(srv).post(f"{upstream.http_url}{path}", json={"n": 1},
                                                             timeout=90), daemon=True)
    holder.start()
    carol, _ = session_for(srv, "carol")
    deadline = time.monotonic() + 20
    while not (pending := [a for a in carol.get(srv.admin_url + "/api/approvals?state=pending").json()["approvals"]
                           if a["preview"]["url"].endswith(path)]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    approval_id = pending[0]["id"]

    # nemo has no reading role: nothing, on pages and API alike
    nemo, _ = session_for_no_page(srv, "nemo")
    for p in PAGES:
        assert nemo.get(srv.admin_url + p).status_code == 403
    assert requests.get(srv.admin_url + "/api/flows", headers={"Authorization": f"Bearer {USERS['nemo']}"},
                        timeout=10).status_code == 403
    # without any token: 401 on the API, the login page for pages
    assert requests.get(srv.admin_url + "/api/approvals", timeout=10).status_code == 401
    assert requests.get(srv.admin_url + "/approvals", timeout=10, allow_redirects=False).status_code == 303

    # bob (viewer) reads everything but decides nothing and administers nothing
    bob, bob_csrf = session_for(srv, "bob")
    approvals_page = bob.get(srv.admin_url + "/approvals").text
    assert path in approvals_page and "needs the approver role" in approvals_page
    assert 'action="/approvals/' not in approvals_page
    refused = bob.post(srv.admin_url + f"/approvals/{approval_id}/approve", data={"csrf": bob_csrf},
                       headers={"Origin": srv.admin_url}, allow_redirects=False)
    assert "approver" in unquote_plus(refused.headers["Location"])
    assert "Release" not in bob.get(srv.admin_url + "/locks").text
    # olga owns support-bot: she may not decide its call
    olga, olga_csrf = session_for(srv, "olga")
    assert "owns agent" in olga.get(srv.admin_url + "/approvals").text
    own = olga.post(srv.admin_url + f"/approvals/{approval_id}/approve", data={"csrf": olga_csrf},
                    headers={"Origin": srv.admin_url}, allow_redirects=False)
    assert "owns agent" in unquote_plus(own.headers["Location"])
    # alice (approver) may decide, but not administer locks
    alice, alice_csrf = session_for(srv, "alice")
    assert "Release" not in alice.get(srv.admin_url + "/locks").text
    ok = alice.post(srv.admin_url + f"/approvals/{approval_id}/deny", data={"csrf": alice_csrf, "reason": "no"},
                    headers={"Origin": srv.admin_url}, allow_redirects=False)
    assert ok.status_code == 303 and "Denied" in unquote_plus(ok.headers["Location"])
    assert carol.get(srv.admin_url + f"/api/approvals/{approval_id}").json()["state"] == "denied"
    holder.join(30)


def session_for_no_page(srv: BastionServer, user: str) -> tuple[requests.Session, None]:
    """A logged-in session for a user whose pages are all refused (no CSRF token to read)."""
    s = requests.Session()
    s.trust_env = False
    resp = s.post(srv.admin_url + "/login", data={"token": USERS[user], "next": "/"},
                  headers={"Origin": srv.admin_url}, allow_redirects=False)
    assert resp.status_code == 303
    return s, None


def test_a_tampered_or_foreign_cookie_is_no_session(srv: BastionServer) -> None:
    s, _ = session_for(srv, "bob")
    value = s.cookies.get("bastion_session")
    assert value
    for forged in (value[:-4] + "AAAA", "gAAAA" + "x" * 100, "x" * 5000):
        resp = requests.get(srv.admin_url + "/flows", cookies={"bastion_session": forged}, allow_redirects=False,
                            timeout=10)
        assert resp.status_code == 303 and resp.headers["Location"].startswith("/login")


def test_a_deeply_nested_body_cannot_blow_up_its_page(srv: BastionServer, upstream: Upstream) -> None:
    """Re-indenting grows with nesting: a small body of deep arrays must give a bounded page, and a body too
    deep to parse must not make its flow unreadable."""
    deep = ("[" * 4000 + "]" * 4000).encode()
    wide = b"[" + b",".join([deep] * 12) + b"]"
    too_deep = ("[" * 20000 + "]" * 20000).encode()
    ids = []
    for body in (wide, too_deep):
        r = agent(srv).post(f"{upstream.http_url}/nested/{uuid.uuid4().hex[:6]}", data=body,
                            headers={"Content-Type": "application/json"}, timeout=30)
        ids.append(r.headers["X-Bastion-Request-Id"])
    s, _ = session_for(srv, "bob")
    for request_id in ids:
        deadline = time.monotonic() + 20
        while s.get(srv.admin_url + f"/api/flows/{request_id}").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        page = s.get(srv.admin_url + f"/flows/{request_id}")
        assert page.status_code == 200 and len(page.content) < 2 << 20


def test_a_new_token_ends_the_old_sessions(tmp_path: Path, bastion_home: Path, test_certs: CertFiles) -> None:
    rules = write_policy(tmp_path / "rules.yaml")
    with run_bastion(tmp_path / "a", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                     extra_args=["--store", f"sqlite:///{tmp_path / 'store.db'}"]) as a:
        s, _ = session_for(a, "bob")
        assert s.get(a.admin_url + "/flows", allow_redirects=False).status_code == 200
        import hashlib

        text = rules.read_text().replace(hashlib.sha256(USERS["bob"].encode()).hexdigest(),
                                         hashlib.sha256(b"bob-new-token").hexdigest())
        rules.write_text(text)
        assert requests.post(a.admin_url + "/api/rules/reload", timeout=10,
                             headers={"Authorization": f"Bearer {USERS['carol']}"}).status_code == 200
        assert s.get(a.admin_url + "/flows", allow_redirects=False).status_code == 303


def test_one_user_cannot_take_every_live_view(srv: BastionServer) -> None:
    s, _ = session_for(srv, "bob")
    streams = [s.get(srv.admin_url + "/flows/stream", stream=True, timeout=10) for _ in range(3)]
    try:
        assert [r.status_code for r in streams] == [200, 200, 503]
        other, _ = session_for(srv, "carol")
        mine = other.get(srv.admin_url + "/flows/stream", stream=True, timeout=10)
        assert mine.status_code == 200
        mine.close()
    finally:
        for r in streams:
            r.close()


def test_agents_api(srv: BastionServer, upstream: Upstream) -> None:
    agent(srv).get(f"{upstream.http_url}/seen", timeout=10)
    resp = requests.get(srv.admin_url + "/api/agents", headers={"Authorization": f"Bearer {USERS['bob']}"},
                        timeout=10)
    agents = {a["name"]: a for a in resp.json()["agents"]}
    assert set(agents) == {"support-bot", "billing-bot"} and agents["support-bot"]["owner"] == "olga"
    assert requests.get(srv.admin_url + "/api/agents", timeout=10).status_code == 401
