"""The admin API's and dashboard's fleet routes (pauses, milestones, budgets) on a real aiohttp server over a real
SQLite fleet store: who may do what, input checks, key encoding, listeners, a store that cannot answer, and
pages that show what the store holds as text."""

from __future__ import annotations

import hashlib
import logging
import re
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bastion.coord.fleet_sqlite import SqliteFleetStore
from bastion.dashboard.app import create_app
from bastion.dashboard.fleet_api import FLEET_LISTENERS
from bastion.policy.load import load_policy
from bastion.proxy.state import PolicyState

TOKENS = {"alice": "alice-token", "bob": "bob-token", "nemo": "nemo-token"}
ADMIN = {"Authorization": "Bearer alice-token"}
VIEWER = {"Authorization": "Bearer bob-token"}
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}
XSS = '<script>alert("x")</script>'


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_rules(tmp_path: Path) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(f"""\
        version: 1
        defaults: {{effect: deny}}
        agents:
          agent-a: {{roles: [w]}}
          agent-b: {{roles: [w, x]}}
          old-bot: {{status: retired}}
        users:
          alice: {{roles: [admin], token_sha256: {sha(TOKENS["alice"])}}}
          bob: {{roles: [viewer], token_sha256: {sha(TOKENS["bob"])}}}
          nemo: {{roles: [], token_sha256: {sha(TOKENS["nemo"])}}}
        rules: []
        budgets:
          - id: calls-per-agent
            agents: ["*"]
            limit: {{calls: 10, per: 1h}}
          - id: llm-tokens
            agents: [role:x]
            limit: {{tokens: 5000, per: 1d}}
            description: LLM spend
        """))
    return rules


Api = tuple[TestClient, SqliteFleetStore, list[dict[str, Any]]]


def make_app(tmp_path: Path, store: SqliteFleetStore | None) -> Any:
    rules = write_rules(tmp_path)
    return create_app(PolicyState([str(rules)], load_policy([rules])), fleet_store=store)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    store = SqliteFleetStore(tmp_path / "x.db")
    app = make_app(tmp_path, store)
    events: list[dict[str, Any]] = []
    app[FLEET_LISTENERS].append(events.append)
    async with TestClient(TestServer(app)) as client:
        yield client, store, events
    await store.close()


async def login(client: TestClient, user: str) -> str:
    """Log `client` in as a browser would; returns the session's CSRF token, read from a page."""
    resp = await client.post("/login", data={"token": TOKENS[user], "next": "/"}, headers=SAME_ORIGIN,
                             allow_redirects=False)
    assert resp.status == 303, await resp.text()
    page = await (await client.get("/agents")).text()
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m is not None
    return m.group(1)


def seconds_from_now(iso: str) -> float:
    return (datetime.fromisoformat(iso.replace("Z", "+00:00")) - datetime.now(UTC)).total_seconds()


# -- pauses ---------------------------------------------------------------------------------------------------


async def test_admin_pauses_and_resumes_an_agent(api: Api) -> None:
    client, store, events = api
    resp = await client.post("/api/agents/agent-a/pause", json={"reason": "runaway loop"}, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    paused = (await resp.json())["paused"]
    assert (paused["agent"], paused["reason"], paused["paused_by"], paused["action"]) == (
        "agent-a", "runaway loop", "user:alice", "pause")
    assert [p.agent for p in await store.list_pauses()] == ["agent-a"]

    agents = {a["name"]: a for a in (await (await client.get("/api/agents", headers=VIEWER)).json())["agents"]}
    assert agents["agent-a"]["paused"]["reason"] == "runaway loop"
    assert agents["agent-b"]["paused"] is None
    assert agents["agent-b"]["roles"] == ["w", "x"] and agents["old-bot"]["status"] == "retired"  # kept fields

    resp = await client.post("/api/agents/agent-a/resume", headers=ADMIN)
    assert resp.status == 200
    assert (await resp.json())["resumed"]["reason"] == "runaway loop"
    again = await client.post("/api/agents/agent-a/resume", headers=ADMIN)
    assert again.status == 404 and "not paused" in (await again.json())["error"]["message"]
    assert await store.list_pauses() == []
    assert [(e["action"], e["user"], e["agent"]) for e in events] == [("pause", "alice", "agent-a"),
                                                                       ("resume", "alice", "agent-a")]
    assert events[0]["reason"] == "runaway loop" and events[1]["paused_by"] == "user:alice"


async def test_pausing_every_agent_applies_to_each(api: Api) -> None:
    client, _, events = api
    await client.post("/api/agents/agent-a/pause", json={"reason": "own", "action": "hold"}, headers=ADMIN)
    resp = await client.post(f"/api/agents/{quote('*', safe='')}/pause", json={"reason": "incident"},
                             headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["paused"]["agent"] == "*"
    listed = await (await client.get("/api/agents", headers=VIEWER)).json()
    agents = {a["name"]: a["paused"] for a in listed["agents"]}
    assert (agents["agent-a"]["agent"], agents["agent-a"]["action"]) == ("agent-a", "hold")  # its own first
    assert agents["agent-b"]["agent"] == "*" and agents["agent-b"]["reason"] == "incident"
    assert listed["all_paused"]["reason"] == "incident"
    resp = await client.post("/api/agents/*/resume", headers=ADMIN)
    assert resp.status == 200
    listed = await (await client.get("/api/agents", headers=VIEWER)).json()
    assert {a["name"]: a["paused"] is None for a in listed["agents"]} == {
        "agent-a": False, "agent-b": True, "old-bot": True}
    assert listed["all_paused"] is None
    assert [e["agent"] for e in events] == ["agent-a", "*", "*"]


async def test_pause_input_is_checked(api: Api) -> None:
    client, store, events = api
    url = "/api/agents/agent-a/pause"
    for body in (b"not json", b'["why"]', b'{"reason": 7}', b'{"action": "stop"}',
                 ('{"reason": "%s"}' % ("x" * 501)).encode(), b'{"reason": "' + b"x" * 9000 + b'"}'):
        resp = await client.post(url, data=body, headers=ADMIN)
        assert resp.status == 400, body[:40]
        assert (await resp.json())["error"]["type"] == "bad_request"
    ok = await client.post(url, json={"reason": "x" * 500}, headers=ADMIN)  # exactly the limit
    assert ok.status == 200
    no_body = await client.post("/api/agents/agent-b/pause", headers=ADMIN)
    assert no_body.status == 200 and (await no_body.json())["paused"]["reason"] == ""
    for path in ("/api/agents/nobody/pause", "/api/agents/nobody/resume"):
        resp = await client.post(path, json={}, headers=ADMIN)
        assert resp.status == 404 and "nobody" in (await resp.json())["error"]["message"]
    assert [p.agent for p in await store.list_pauses()] == ["agent-a", "agent-b"]
    assert len(events) == 2


async def test_changes_need_the_admin_role(api: Api) -> None:
    client, store, events = api
    await store.pause("agent-a", "held", "user:alice")
    await store.complete_milestone("m:1", 60, "user:alice")
    for path in ("/api/agents/agent-b/pause", "/api/agents/agent-a/resume", "/api/milestones/m%3A2/complete",
                 "/api/milestones/m%3A1/clear"):
        resp = await client.post(path, json={}, headers=VIEWER)
        assert resp.status == 403, path
        assert "admin role" in (await resp.json())["error"]["message"]
        assert (await client.post(path, json={})).status == 401  # no token at all
    for path in ("/api/milestones", "/api/budgets", "/api/agents"):
        assert (await client.get(path, headers=VIEWER)).status == 200
        assert (await client.get(path)).status == 401
        assert (await client.get(path, headers={"Authorization": "Bearer nemo-token"})).status == 403
    assert [p.agent for p in await store.list_pauses()] == ["agent-a"]
    assert [m.key for m in await store.list_milestones()] == ["m:1"]
    assert events == []


async def test_a_failing_listener_never_fails_the_call(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    client, store, events = api

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("listener down")

    client.app[FLEET_LISTENERS].insert(0, broken)
    with caplog.at_level(logging.INFO, logger="bastion.fleet"):
        resp = await client.post("/api/agents/agent-b/pause", json={"reason": "disk full"}, headers=ADMIN)
    assert resp.status == 200
    assert [p.agent for p in await store.list_pauses()] == ["agent-b"]
    assert events and events[-1]["action"] == "pause"  # the listeners after the broken one still ran
    messages = [r.getMessage() for r in caplog.records if r.name == "bastion.fleet"]
    assert any("pause by user alice" in m and "agent-b" in m for m in messages), messages
    assert any("listener failed" in m for m in messages)


# -- milestones -----------------------------------------------------------------------------------------------


async def test_milestone_keys_with_slashes_and_spaces_round_trip(api: Api) -> None:
    client, store, events = api
    key = "repo:acme/widgets issue 7"
    for path in (quote(key, safe=""), quote(key, safe="/")):  # `/` encoded or not
        resp = await client.post(f"/api/milestones/{path}/complete", json={"ttl": "90m"}, headers=ADMIN)
        assert resp.status == 200, await resp.text()
        done = (await resp.json())["completed"]
        assert (done["key"], done["by"]) == (key, "user:alice")
        assert 80 * 60 < seconds_from_now(done["expires_at"]) <= 90 * 60
        listed = await (await client.get("/api/milestones", headers=VIEWER)).json()
        assert [m["key"] for m in listed["milestones"]] == [key]
        resp = await client.post(f"/api/milestones/{path}/clear", headers=ADMIN)
        assert resp.status == 200 and (await resp.json())["cleared"]["key"] == key
    assert await store.list_milestones() == []
    missing = await client.post(f"/api/milestones/{quote(key, safe='')}/clear", headers=ADMIN)
    assert missing.status == 404 and (await missing.json())["error"]["type"] == "not_found"
    assert [(e["action"], e["user"], e["key"]) for e in events] == [
        ("milestone_complete", "alice", key), ("milestone_clear", "alice", key)] * 2


async def test_milestone_ttl_defaults_to_a_week_and_is_checked(api: Api) -> None:
    client, store, _ = api
    resp = await client.post("/api/milestones/extracted%3A42/complete", headers=ADMIN)  # no body: 7 days
    assert resp.status == 200
    assert 7 * 86400 - 60 < seconds_from_now((await resp.json())["completed"]["expires_at"]) <= 7 * 86400
    for body in ({"ttl": "soon"}, {"ttl": "60d"}, {"ttl": -5}, ["7d"]):
        resp = await client.post("/api/milestones/other/complete", json=body, headers=ADMIN)
        assert resp.status == 400, body
    too_long = await client.post(f"/api/milestones/{'k' * 2000}/complete", headers=ADMIN)
    assert too_long.status == 400
    assert [m.key for m in await store.list_milestones()] == ["extracted:42"]


# -- budgets --------------------------------------------------------------------------------------------------


async def test_budgets_list_each_budget_with_its_windows(api: Api) -> None:
    client, store, _ = api
    assert (await store.reserve("calls-per-agent", "agent-a", "calls", 10, 3600, 1)).granted
    assert (await store.reserve("calls-per-agent", "agent-a", "calls", 10, 3600, 1)).granted
    assert (await store.reserve("retired-budget", "agent-a", "calls", 5, 60, 1)).granted  # not in the rules
    resp = await client.get("/api/budgets", headers=VIEWER)
    assert resp.status == 200
    budgets = {b["id"]: b for b in (await resp.json())["budgets"]}
    assert list(budgets) == ["calls-per-agent", "llm-tokens"]
    calls = budgets["calls-per-agent"]
    assert (calls["unit"], calls["limit"], calls["per"], calls["agents"]) == ("calls", 10, 3600, ["*"])
    [window] = calls["usage"]
    assert (window["key"], window["used"], window["remaining"], window["limit"]) == ("agent-a", 2, 8, 10)
    assert 0 < seconds_from_now(window["resets_at"]) <= 3600
    tokens = budgets["llm-tokens"]
    assert (tokens["unit"], tokens["limit"], tokens["per"], tokens["agents"], tokens["usage"]) == (
        "tokens", 5000, 86400, ["role:x"], [])


# -- a store that cannot answer -------------------------------------------------------------------------------


async def test_a_store_that_cannot_answer_gives_503(tmp_path: Path) -> None:
    store = SqliteFleetStore(tmp_path / "missing" / "dir" / "x.db")
    app = make_app(tmp_path, store)
    events: list[dict[str, Any]] = []
    app[FLEET_LISTENERS].append(events.append)
    async with TestClient(TestServer(app)) as client:
        answers = [await client.get(p, headers=VIEWER) for p in ("/api/milestones", "/api/budgets", "/api/agents")]
        answers += [await client.post(p, json={}, headers=ADMIN) for p in (
            "/api/agents/agent-a/pause", "/api/agents/agent-a/resume", "/api/milestones/m/complete",
            "/api/milestones/m/clear")]
        for resp in answers:
            assert resp.status == 503, resp.url
            assert resp.headers["Retry-After"] == "5"
            body = await resp.json()
            assert body["type"] == "error" and body["error"]["type"] == "store_unavailable"
        csrf = await login(client, "alice")  # pages degrade: they say so instead of failing
        for path in ("/agents", "/milestones", "/budgets"):
            page = await client.get(path)
            assert page.status == 200
            assert "unavailable" in await page.text()
        resp = await client.post("/agents/agent-a/pause", data={"csrf": csrf, "reason": "x"}, headers=SAME_ORIGIN,
                                 allow_redirects=False)
        assert resp.status == 303 and "nothing was changed" in unquote_plus(resp.headers["Location"])
    assert events == []
    assert not (tmp_path / "missing").exists()
    await store.close()


async def test_without_a_fleet_store_agents_keep_their_old_shape(tmp_path: Path) -> None:
    async with TestClient(TestServer(make_app(tmp_path, None))) as client:
        listed = await (await client.get("/api/agents", headers=VIEWER)).json()
        assert "paused" not in listed["agents"][0] and "all_paused" not in listed
        assert (await client.get("/api/milestones", headers=VIEWER)).status == 404
        await login(client, "bob")
        page = await (await client.get("/milestones")).text()
        assert "no fleet store" in page


# -- pages and forms ------------------------------------------------------------------------------------------


async def test_pages_show_the_store_as_text(api: Api) -> None:
    client, store, _ = api
    await store.pause("agent-a", XSS, "guard:runaway")
    await store.complete_milestone(f"ticket:{XSS}", 600, "agent-a", "req_1")
    await store.reserve("calls-per-agent", f"k{XSS}", "calls", 10, 3600, 3)
    await login(client, "bob")
    for path in ("/agents", "/milestones", "/budgets"):
        resp = await client.get(path)
        assert resp.status == 200, path
        html = await resp.text()
        assert "<script>alert" not in html, path
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html, path
        for nav in ('href="/milestones"', 'href="/budgets"'):
            assert nav in html
    agents = await (await client.get("/agents")).text()
    assert "guard:runaway" in agents and "running" in agents  # agent-a paused, agent-b not
    assert 'action="/agents/' not in agents  # a viewer gets no pause or resume buttons
    budgets = await (await client.get("/budgets")).text()
    assert "3 / 10" in budgets and "Nothing used in the current window: 0 / 5000 tokens" in budgets
    assert "LLM spend" in budgets and "per 1h" in budgets and "per 1d" in budgets
    milestones = await (await client.get("/milestones")).text()
    assert "agent-a" in milestones and "req_1" in milestones and 'action="/milestones' not in milestones


async def test_admin_forms_pause_resume_complete_and_clear(api: Api) -> None:
    client, store, events = api
    csrf = await login(client, "alice")
    page = await (await client.get("/agents")).text()
    assert 'action="/agents/agent-a/pause"' in page and 'action="/agents/%2A/pause"' in page

    async def post(path: str, **form: str) -> str:
        resp = await client.post(path, data={"csrf": csrf, **form}, headers=SAME_ORIGIN, allow_redirects=False)
        assert resp.status == 303, await resp.text()
        return unquote_plus(resp.headers["Location"])

    assert "Paused agent-a" in await post("/agents/agent-a/pause", reason=XSS)
    assert "held for a person" in await post("/agents/%2A/pause", reason="freeze", mode="hold")
    pauses = {p.agent: p for p in await store.list_pauses()}
    assert (pauses["agent-a"].reason, pauses["agent-a"].paused_by) == (XSS, "user:alice")
    assert pauses["*"].action == "hold"
    page = await (await client.get("/agents")).text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert 'action="/agents/agent-a/resume"' in page and 'action="/agents/%2A/resume"' in page
    assert "Resumed agent-a" in await post("/agents/agent-a/resume")
    assert "Resumed every agent" in await post("/agents/%2A/resume")
    assert "not paused" in await post("/agents/agent-a/resume")
    assert "Unknown agent" in await post("/agents/ghost/pause", reason="x")
    assert "at most 500" in await post("/agents/agent-b/pause", reason="x" * 600)

    key = "repo:acme/widgets issue 7"
    assert f"Completed {key}" in await post("/milestones", key=key, ttl="1h")
    page = await (await client.get("/milestones")).text()
    clear = f'action="/milestones/{quote(key, safe="")}/clear"'
    assert clear in page
    assert f"Cleared {key}" in await post(f"/milestones/{quote(key, safe='')}/clear")
    assert "No live milestone" in await post(f"/milestones/{quote(key, safe='')}/clear")
    assert "ttl" in await post("/milestones", key="k", ttl="soon")
    assert await store.list_pauses() == [] and await store.list_milestones() == []
    assert [e["action"] for e in events] == ["pause", "pause", "resume", "resume", "milestone_complete",
                                             "milestone_clear"]


async def test_forms_need_the_csrf_token_and_the_admin_role(api: Api) -> None:
    client, store, events = api
    csrf = await login(client, "alice")
    no_token = await client.post("/agents/agent-a/pause", data={"reason": "x"}, headers=SAME_ORIGIN)
    assert no_token.status == 403 and (await no_token.json())["error"]["type"] == "csrf"
    wrong = await client.post("/milestones", data={"csrf": "nope", "key": "k"}, headers=SAME_ORIGIN)
    assert wrong.status == 403
    cross_site = await client.post("/agents/agent-a/pause", data={"csrf": csrf, "reason": "x"},
                                   headers={"Sec-Fetch-Site": "cross-site"})
    assert cross_site.status == 403
    api_with_cookie = await client.post("/api/agents/agent-a/pause", json={}, headers=SAME_ORIGIN)
    assert api_with_cookie.status == 403  # the API too, when the cookie authenticates it

    await client.post("/logout", headers=SAME_ORIGIN)
    csrf = await login(client, "bob")
    for path, form in (("/agents/agent-a/pause", {"reason": "x"}), ("/milestones", {"key": "k"})):
        resp = await client.post(path, data={"csrf": csrf, **form}, headers=SAME_ORIGIN, allow_redirects=False)
        assert resp.status == 303 and "needs the admin role" in unquote_plus(resp.headers["Location"])
    assert await store.list_pauses() == [] and await store.list_milestones() == []
    assert events == []
