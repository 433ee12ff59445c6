"""The admin API's lock routes on a real aiohttp server and a real SQLite store: key encoding, bad input,
readiness, and the admin-event hook (the end-to-end tests through sidecars are in test_locks_proxy.py)."""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bastion.coord.sqlite import SqliteLockStore
from bastion.dashboard.app import create_app
from bastion.dashboard.locks_api import LOCK_ADMIN_LISTENERS
from bastion.policy.load import load_policy
from bastion.proxy.state import PolicyState

ADMIN = {"Authorization": "Bearer alice-token"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient, SqliteLockStore, list[dict]]]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(f"""\
        version: 1
        defaults: {{effect: deny}}
        agents:
          agent-a: {{roles: [w]}}
          agent-b: {{roles: [w]}}
        users:
          alice: {{roles: [admin], token_sha256: {hashlib.sha256(b"alice-token").hexdigest()}}}
        rules: []
        """))
    store = SqliteLockStore(tmp_path / "locks.db")
    app = create_app(PolicyState([str(rules)], load_policy([rules])), lock_store=store)
    events: list[dict] = []
    app[LOCK_ADMIN_LISTENERS].append(events.append)
    async with TestClient(TestServer(app)) as client:
        yield client, store, events
    await store.close()


async def test_keys_with_slashes_and_spaces_round_trip(api: tuple[TestClient, SqliteLockStore, list[dict]]) -> None:
    client, store, events = api
    key = "repo:acme/widgets issue 7"
    await store.acquire(key, "agent-a", 60)
    listed = await (await client.get("/api/locks", headers=ADMIN)).json()
    assert [lock["key"] for lock in listed["locks"]] == [key]
    for path in (quote(key, safe=""), quote(key, safe="/")):  # `/` encoded or not
        await store.acquire(key, "agent-a", 60)
        resp = await client.post(f"/api/locks/{path}/release", headers=ADMIN)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["released"]["key"] == key
    seen = [(e["action"], e["user"], e["key"], e["holder"]) for e in events]
    assert seen == [("release", "alice", key, "agent-a")] * 2


async def test_handoff_input_is_checked(api: tuple[TestClient, SqliteLockStore, list[dict]]) -> None:
    client, store, events = api
    await store.acquire("t:1", "agent-a", 60)
    url = "/api/locks/t%3A1/handoff"
    for body in (b"not json", b'["agent-b"]', b'{"to": ""}', b'{"to": 7}', b'{"to": "agent-b", "ttl": "soon"}'):
        resp = await client.post(url, data=body, headers=ADMIN)
        assert resp.status == 400, body
        assert (await resp.json())["error"]["type"] == "bad_request"
    resp = await client.post(url, json={"to": "agent-b", "ttl": "90s"}, headers=ADMIN)
    assert resp.status == 200
    offer = (await resp.json())["handoff"]
    assert (offer["holder"], offer["handoff_to"]) == ("agent-a", "agent-b")
    lapses = datetime.fromisoformat(offer["expires_at"].replace("Z", "+00:00"))
    assert 80 < (lapses - datetime.now(UTC)).total_seconds() <= 90
    assert events[-1] | {"fence": 0} == {"action": "handoff", "user": "alice", "key": "t:1", "holder": "agent-a",
                                          "fence": 0, "to": "agent-b"}
    too_long = await client.post(f"/api/locks/{'x' * 2000}/release", headers=ADMIN)
    assert too_long.status == 400


async def test_readiness_includes_the_store(api: tuple[TestClient, SqliteLockStore, list[dict]]) -> None:
    client, store, _ = api
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"]["store"] == {"ok": True, "detail": "sqlite lock store reachable"}
    await store.close()  # a closed store cannot answer: not ready
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["checks"]["store"]["ok"] is False
