"""What the dashboard tests share: their policy, a headless Chromium (Debian's, driven by Playwright), logins.

Screenshots go to `tests/.screenshots/` (ignored by git), one per page and screen size, for people to look at.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from services import in_ci

SHOTS = Path(__file__).resolve().parent / ".screenshots"
CHROMIUM = os.environ.get("BASTION_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
LAPTOP = {"width": 1366, "height": 800}
NARROW = {"width": 390, "height": 844}

AGENTS = {"support-bot": "sb-dash-token", "billing-bot": "bb-dash-token"}
USERS = {"alice": "alice-dash-token", "carol": "carol-dash-token", "bob": "bob-dash-token",
         "olga": "olga-dash-token", "nemo": "nemo-dash-token"}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_policy(path: Path) -> Path:
    path.write_text(f"""\
version: 1
defaults: {{effect: deny}}
agents:
  support-bot: {{roles: [support], owner: olga, token_sha256: {_sha(AGENTS["support-bot"])}}}
  billing-bot: {{roles: [support], token_sha256: {_sha(AGENTS["billing-bot"])}}}
users:
  alice: {{roles: [approver], token_sha256: {_sha(USERS["alice"])}}}
  carol: {{roles: [admin, approver], token_sha256: {_sha(USERS["carol"])}}}
  bob: {{roles: [viewer], token_sha256: {_sha(USERS["bob"])}}}
  olga: {{roles: [approver], token_sha256: {_sha(USERS["olga"])}}}
  nemo: {{roles: [], token_sha256: {_sha(USERS["nemo"])}}}
rules:
  - id: local-upstream
    effect: allow
    agents: ["*"]
    match: {{host: [127.0.0.1, localhost]}}
  - id: erp-read-only
    effect: deny
    agents: ["*"]
    match: {{method: [POST, PUT, DELETE], path: "/erp/**"}}
    message: "The ERP is read-only for agents."
  - id: refunds
    effect: hold
    agents: ["*"]
    match: {{method: POST, path: "/refunds/**"}}
    approval: {{wait: 60s, timeout: 1h}}
  - id: tickets
    effect: allow
    agents: ["*"]
    match: {{method: POST, path: "/tickets/{{ticket}}/comments"}}
    lock: {{key: "ticket:{{ticket}}", ttl: 15m}}
network:
  allow_private: ["127.0.0.0/8"]
""")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, one per test module (Playwright's sync API keeps an event loop running on this thread
    while it is open, which the asyncio tests of other modules must not meet); skipped (failed under CI=true)
    when Playwright or Debian's chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if in_ci():
            pytest.fail("the playwright package is not installed; CI=true requires it", pytrace=False)
        pytest.skip("the playwright package is not installed")
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        if in_ci():
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium); CI=true requires it", pytrace=False)
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def login(browser: Any, base: str, user: str, viewport: dict[str, int] = LAPTOP) -> Any:
    """A new browser context logged in as `user`; returns its page. Script errors and dialogs are recorded
    on the page as `page.script_errors` / `page.dialogs` (a dialog would mean injected script ran)."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.script_errors = []
    page.dialogs = []
    page.on("pageerror", lambda e: page.script_errors.append(str(e)))
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.goto(base + "/login")
    page.fill("#token", USERS[user])
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/login" not in url)
    return page


def shoot(page: Any, name: str) -> Path:
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# -- a standalone `bastion dashboard` process ------------------------------------------------------------------


def run_dashboard(workdir: Path, rules: Path, *, home: Path, store: str, audit: str) -> Any:
    """`bastion dashboard` on a free port: a context manager yielding its base URL."""
    import re
    import signal
    import subprocess
    import time
    from contextlib import contextmanager

    from support.bastion import REPO, bastion_cmd, clean_env

    @contextmanager
    def running() -> Iterator[str]:
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "dashboard.log"
        with out.open("wb") as log:
            proc = subprocess.Popen(bastion_cmd("dashboard", "--rules", str(rules), "--admin", "127.0.0.1:0",
                                                "--home", str(home), "--store", store, "--audit", audit),
                                    cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while (m := re.search(r"dashboard on (http://\S+)", out.read_text(errors="replace"))) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("bastion dashboard did not start:\n" + out.read_text(errors="replace"))
                time.sleep(0.05)
            yield m.group(1)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    return running()
