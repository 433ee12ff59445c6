"""The dashboard in a real browser (Debian's Chromium driven by Playwright), as approvers and operators use it.

Two setups run the same tests: one `bastion serve` on SQLite, its dashboard on its admin listener; and a fleet
of two sidecars sharing Redis (locks, approvals) and PostgreSQL (audit), watched by a standalone
`bastion dashboard` that reaches neither sidecar. Agents are real clients going through the sidecars to the
local echo upstream. Each page is saved as a screenshot (laptop and narrow) under tests/.screenshots/.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from dashboardhelp import AGENTS, LAPTOP, NARROW, USERS, login, run_dashboard, shoot, write_policy
from lockhistory import delete_prefix
from services import require_postgres, require_redis
from support.bastion import BastionServer, run_bastion
from support.certs import CertFiles
from support.upstream import Upstream


@dataclass
class Setup:
    name: str
    dash: str  # the dashboard's base URL
    agents_via: list[BastionServer]  # the sidecars agents call through
    upstream: Upstream

    def agent(self, name: str = "support-bot", via: int = 0) -> requests.Session:
        return self.agents_via[via].session(name, AGENTS[name])

    def api(self, method: str, path: str, user: str = "carol") -> requests.Response:
        return requests.request(method, self.dash + path, headers={"Authorization": f"Bearer {USERS[user]}"},
                                timeout=10, proxies={"http": "", "https": ""})


@pytest.fixture(scope="module", params=["sqlite", "fleet"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, bastion_home: Path,
          test_certs: CertFiles, upstream: Upstream) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp(f"dash-{request.param}")
    rules = write_policy(work / "rules.yaml")
    if request.param == "sqlite":
        with run_bastion(work / "a", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                         extra_args=["--store", f"sqlite:///{work / 'store.db'}"]) as a:
            yield Setup("sqlite", a.admin_url, [a], upstream)
        return
    redis_url = require_redis()
    dsn = require_postgres()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    schema = f"bastion_dash_{secrets.token_hex(6)}"
    store = f"{redis_url}?prefix={prefix}"
    audit = f"{dsn}?schema={schema}"
    try:
        with run_bastion(work / "a", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                         extra_args=["--store", store, "--audit", audit]) as a, \
             run_bastion(work / "b", [rules], home=bastion_home, upstream_ca=test_certs.ca_cert,
                         extra_args=["--store", store, "--audit", audit]) as b, \
             run_dashboard(work / "dash", rules, home=work / "dash-home", store=store, audit=audit) as dash:
            yield Setup("fleet", dash, [a, b], upstream)
    finally:
        delete_prefix(redis_url, prefix)
        from auditproxy import drop_schema

        # Playwright's sync API keeps an event loop on this thread: drop the schema from another one.
        dropper = threading.Thread(target=lambda: asyncio.run(drop_schema(dsn, schema)))
        dropper.start()
        dropper.join(30)


def held_call(setup: Setup, path: str, body: dict[str, Any], via: int = 0) -> dict[str, Any]:
    """Send a call a hold rule keeps waiting, in a thread; the dict gets its "response"."""
    out: dict[str, Any] = {}

    def run() -> None:
        out["response"] = setup.agent(via=via).post(setup.upstream.http_url + path, json=body, timeout=90)

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def wait_flow(setup: Setup, request_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while setup.api("GET", f"/api/flows/{request_id}", "bob").status_code != 200:
        assert time.monotonic() < deadline, f"flow {request_id} never reached the audit store"
        time.sleep(0.1)


def test_log_in_filter_flows_and_open_a_detail(setup: Setup, browser: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    ok = setup.agent().get(f"{setup.upstream.http_url}/docs/{tag}?page=1", timeout=10)
    denied = setup.agent("billing-bot", via=len(setup.agents_via) - 1).post(
        f"{setup.upstream.http_url}/erp/{tag}", json={"x": 1}, timeout=10)
    assert ok.status_code == 200 and denied.status_code == 403
    for r in (ok, denied):
        wait_flow(setup, r.headers["X-Bastion-Request-Id"])

    page = login(browser, setup.dash, "bob")
    assert page.locator("h1").first.inner_text().startswith("Overview")
    shoot(page, f"{setup.name}-overview")
    page.goto(setup.dash + "/flows")
    page.select_option("select[name=agent]", "billing-bot")
    page.select_option("select[name=decision]", "deny")
    page.fill("input[name=q]", tag)
    page.click("form.filters button[type=submit]")
    rows = page.locator("#flow-rows tr")
    assert rows.count() == 1 and "erp-read-only" in rows.first.inner_text()
    shoot(page, f"{setup.name}-flows-filtered")
    rows.first.locator("a").first.click()
    page.wait_for_url("**/flows/*")
    text = page.inner_text("main")
    assert "The ERP is read-only for agents." in text and f"/erp/{tag}" in text
    assert "erp-read-only" in page.inner_text(".trace")
    assert page.locator("a", has_text="Download HAR").count() == 1
    shoot(page, f"{setup.name}-flow-detail")
    assert not page.script_errors


def test_approve_a_held_call_by_clicking(setup: Setup, browser: Any) -> None:
    path = f"/refunds/{uuid.uuid4().hex[:10]}"
    call = held_call(setup, path, {"amount": 9000}, via=len(setup.agents_via) - 1)
    page = login(browser, setup.dash, "alice")
    page.goto(setup.dash + "/approvals")
    card = page.locator("li.approval", has_text=path)
    for _ in range(50):
        if card.count():
            break
        page.wait_for_timeout(200)
        page.reload()
    assert card.count() == 1
    assert '"amount": 9000' in card.inner_text() or '"amount":9000' in card.inner_text()
    shoot(page, f"{setup.name}-approvals")
    card.locator("input[name=comment]").fill("checked the ticket")
    card.locator("button", has_text="Approve").click()
    page.wait_for_url("**/approvals?notice=*")
    assert "Approved" in page.inner_text(".notice")
    call["thread"].join(30)
    resp = call["response"]
    assert resp.status_code == 200 and resp.json()["path"] == path
    assert sum(1 for p in setup.upstream.paths() if p == path) == 1
    history = page.locator("section.card", has_text="Recently decided")
    page.reload()
    assert "checked the ticket" in history.inner_text()


def test_deny_with_the_keyboard(setup: Setup, browser: Any) -> None:
    path = f"/refunds/{uuid.uuid4().hex[:10]}"
    call = held_call(setup, path, {"amount": 5})
    page = login(browser, setup.dash, "alice")
    page.goto(setup.dash + "/approvals")
    for _ in range(50):
        if page.locator("li.approval", has_text=path).count():
            break
        page.wait_for_timeout(200)
        page.reload()
    cards = page.locator("li.approval")
    index = next(i for i in range(cards.count()) if path in cards.nth(i).inner_text())
    for _ in range(index):
        page.keyboard.press("j")
    card = cards.nth(index)
    assert "sel" in (card.get_attribute("class") or "")
    card.locator("input[name=reason]").fill("Needs a ticket first")
    page.locator("body").click(position={"x": 5, "y": 200})  # leave the field so the key reaches the queue
    page.keyboard.press("d")
    page.wait_for_url("**/approvals?notice=*")
    call["thread"].join(30)
    resp = call["response"]
    assert resp.status_code == 403 and resp.json()["error"]["reason"] == "Needs a ticket first"


def test_release_a_lock(setup: Setup, browser: Any) -> None:
    ticket = uuid.uuid4().hex[:8]
    taken = setup.agent().post(f"{setup.upstream.http_url}/tickets/{ticket}/comments", json={"t": 1}, timeout=10)
    assert taken.status_code == 200
    page = login(browser, setup.dash, "carol")
    page.goto(setup.dash + "/locks")
    row = page.locator("tr", has_text=f"ticket:{ticket}")
    assert row.count() == 1 and "support-bot" in row.inner_text()
    shoot(page, f"{setup.name}-locks")
    row.locator("button", has_text="Release").click()
    page.wait_for_url("**/locks?notice=*")
    assert f"Released ticket:{ticket}" in page.inner_text(".notice")
    assert all(lk["key"] != f"ticket:{ticket}" for lk in setup.api("GET", "/api/locks").json()["locks"])
    other = setup.agent("billing-bot").post(f"{setup.upstream.http_url}/tickets/{ticket}/comments", json={},
                                            timeout=10)
    assert other.status_code == 200  # the ticket is free for the next agent


def test_every_page_on_a_laptop_and_a_narrow_screen(setup: Setup, browser: Any) -> None:
    for size, viewport in (("laptop", LAPTOP), ("narrow", NARROW)):
        page = login(browser, setup.dash, "carol", viewport)
        for path, name in (("/", "overview"), ("/flows", "flows"), ("/approvals", "approvals"),
                           ("/locks", "locks"), ("/agents", "agents"), ("/rules", "rules")):
            page.goto(setup.dash + path)
            assert page.locator("h1").count() >= 1
            shoot(page, f"{setup.name}-{name}-{size}")
        page.goto(setup.dash + "/agents")
        assert "support-bot" in page.inner_text("main") and "olga" in page.inner_text("main")
        page.goto(setup.dash + "/rules")
        assert "refunds" in page.inner_text("main")
        assert not page.script_errors, page.script_errors
        page.context.close()
