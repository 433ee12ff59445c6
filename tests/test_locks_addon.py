"""The task-lock addon driven with in-memory flows against a real SQLite store: fast checks of its semantics
(what is taken, renewed, refused, given back and released, and what lands on the flow for the audit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from bastion.coord import Conflict, Lease, StoreUnavailable
from bastion.coord.sqlite import SqliteLockStore
from bastion.metrics import LOCK_CONFLICTS
from bastion.policy.decision import Decision, LockAction, ReleaseAction
from bastion.proxy import flowmeta
from bastion.proxy.locks import FENCE_HEADER, TaskLocks, plan


@pytest.fixture
async def store(tmp_path: Path):
    s = SqliteLockStore(tmp_path / "locks.db")
    yield s
    await s.close()


def flow_for(agent: str, *, locks: tuple[LockAction, ...] = (), releases: tuple[ReleaseAction, ...] = (),
             obligations: set[str] | None = None) -> http.HTTPFlow:
    f = tflow.tflow()
    decision = Decision(effect="allow", would_effect="allow", mode="enforce", agent=agent, rules=("r",),
                        locks=locks, releases=releases)
    f.metadata.update({
        flowmeta.REQUEST_ID: "req-1", flowmeta.AGENT: agent, flowmeta.DECISION: decision,
        flowmeta.OBLIGATIONS: {flowmeta.OBLIGATION_LOCK} if obligations is None else obligations,
    })
    return f


async def run(addon: TaskLocks, f: http.HTTPFlow) -> None:
    pending = addon.request(f)
    if pending is not None:
        await pending


async def answer(addon: TaskLocks, f: http.HTTPFlow, status: int) -> None:
    f.response = http.Response.make(status, b"{}")
    pending = addon.response(f)
    if pending is not None:
        await pending


def error(f: http.HTTPFlow) -> dict:
    assert f.response is not None
    return json.loads(f.response.content)["error"]


def lock(key: str, ttl: float = 30, rule: str = "work") -> LockAction:
    return LockAction(key, ttl, rule)


def events(f: http.HTTPFlow) -> list[str]:
    return [e["event"] for e in f.metadata.get(flowmeta.LOCK_EVENTS, [])]


async def test_requests_without_a_lock_stay_synchronous_and_cannot_forge_a_fence(store: SqliteLockStore) -> None:
    addon = TaskLocks(store)
    f = flow_for("a", obligations=set())
    f.request.headers[FENCE_HEADER] = "999999999999999999"
    f.request.headers.add("bastion-fence", "1")
    assert addon.request(f) is None
    assert FENCE_HEADER not in f.request.headers
    held = flow_for("a", obligations={flowmeta.OBLIGATION_LOCK, flowmeta.OBLIGATION_APPROVAL},
                    locks=(lock("t:1"),))
    assert addon.request(held) is None  # not approved yet: no lock is taken, the gate refuses it
    assert await store.get("t:1") is None


async def test_grant_then_renewal_keeps_the_fence_and_is_recorded(store: SqliteLockStore) -> None:
    addon = TaskLocks(store)
    first = flow_for("a", locks=(lock("t:1"),))
    await run(addon, first)
    assert first.response is None
    assert flowmeta.OBLIGATION_LOCK not in first.metadata[flowmeta.OBLIGATIONS]
    fence = int(first.request.headers[FENCE_HEADER])
    [info] = first.metadata[flowmeta.LOCKS]
    assert info["key"] == "t:1" and info["fence"] == fence and info["renewed"] is False
    assert info["expires_at"].endswith("Z") and info["release"] is False
    assert events(first) == ["acquired"]
    again = flow_for("a", locks=(lock("t:1"),))
    await run(addon, again)
    assert int(again.request.headers[FENCE_HEADER]) == fence
    assert again.metadata[flowmeta.LOCKS][0]["renewed"] is True
    assert events(again) == ["renewed"]


async def test_conflict_refuses_with_holder_and_expiry(store: SqliteLockStore) -> None:
    addon = TaskLocks(store)
    await run(addon, flow_for("a", locks=(lock("t:1", ttl=90),)))
    before = LOCK_CONFLICTS._value.get()
    f = flow_for("b", locks=(lock("t:1"),))
    await run(addon, f)
    assert f.response is not None and f.response.status_code == 423
    assert f.response.headers["x-should-retry"] == "false"
    assert 85 <= int(f.response.headers["retry-after"]) <= 90
    err = error(f)
    assert (err["type"], err["lock"], err["holder"], err["rule"]) == ("lock_conflict", "t:1", "a", "work")
    assert err["expires_at"].endswith("Z")
    assert "Another agent (a) is working on t:1" in err["message"]
    assert LOCK_CONFLICTS._value.get() == before + 1
    assert flowmeta.LOCKS not in f.metadata and events(f) == ["conflict"]


async def test_several_locks_send_fences_in_order_and_a_conflict_gives_new_grants_back(
        store: SqliteLockStore) -> None:
    addon = TaskLocks(store)
    both = flow_for("a", locks=(lock("t:1", rule="first"), lock("t:2", rule="second"), lock("t:1", ttl=60)))
    await run(addon, both)
    assert [n.key for n in plan(both.metadata[flowmeta.DECISION])] == ["t:1", "t:2"]
    fences = [int(x) for x in both.request.headers[FENCE_HEADER].split(",")]
    assert fences == [(await store.get("t:1")).fence, (await store.get("t:2")).fence]
    # b takes t:3, then asks for t:3 and t:2: refused, and its new grant of t:4 is given back, t:3 kept.
    await run(addon, flow_for("b", locks=(lock("t:3"),)))
    f = flow_for("b", locks=(lock("t:3"), lock("t:4"), lock("t:2")))
    await run(addon, f)
    assert f.response is not None and f.response.status_code == 423
    assert events(f) == ["renewed", "acquired", "conflict", "rolled_back"]
    assert await store.get("t:4") is None
    assert (await store.get("t:3")).holder == "b"


async def test_release_rule_frees_the_callers_lock_only_after_a_2xx(store: SqliteLockStore) -> None:
    addon = TaskLocks(store)
    await run(addon, flow_for("a", locks=(lock("t:1"),)))
    fence = (await store.get("t:1")).fence
    close = (ReleaseAction("t:1", "close"),)
    failed = flow_for("a", releases=close)
    await run(addon, failed)
    assert int(failed.request.headers[FENCE_HEADER]) == fence
    await answer(addon, failed, 404)
    assert (await store.get("t:1")).holder == "a"
    assert events(failed) == ["checked", "not_released"]
    ok = flow_for("a", releases=close)
    await run(addon, ok)
    await answer(addon, ok, 204)
    assert await store.get("t:1") is None
    assert events(ok) == ["checked", "released"]
    assert ok.metadata[flowmeta.LOCKS][0] | {"expires_at": None} == {
        "key": "t:1", "rule": "close", "fence": fence, "renewed": False, "expires_at": None, "release": True}


async def test_release_rule_on_a_free_lock_passes_without_a_fence(store: SqliteLockStore) -> None:
    addon = TaskLocks(store)
    f = flow_for("a", releases=(ReleaseAction("t:9", "close"),))
    await run(addon, f)
    assert f.response is None and FENCE_HEADER not in f.request.headers
    assert f.metadata[flowmeta.LOCKS][0]["fence"] is None
    assert addon.response(f) is None


async def test_release_rule_on_someone_elses_lock_is_refused(store: SqliteLockStore) -> None:
    addon = TaskLocks(store)
    await run(addon, flow_for("a", locks=(lock("t:1"),)))
    f = flow_for("b", releases=(ReleaseAction("t:1", "close"),))
    await run(addon, f)
    assert f.response is not None and f.response.status_code == 423
    assert (error(f)["holder"], error(f)["rule"]) == ("a", "close")
    assert (await store.get("t:1")).holder == "a"


async def test_lock_handed_off_to_the_caller_is_claimed_by_its_release(store: SqliteLockStore) -> None:
    addon = TaskLocks(store)
    await run(addon, flow_for("a", locks=(lock("t:1"),)))
    old = (await store.get("t:1")).fence
    await store.handoff("t:1", "b", 60)
    refused = flow_for("a", locks=(lock("t:1"),))
    await run(addon, refused)
    assert error(refused)["holder"] == "b" and "handed off to agent b" in error(refused)["message"]
    f = flow_for("b", releases=(ReleaseAction("t:1", "close"),))
    await run(addon, f)
    assert int(f.request.headers[FENCE_HEADER]) > old
    await answer(addon, f, 200)
    assert await store.get("t:1") is None


class LosingStore(SqliteLockStore):
    """Hands t:1 to someone else while t:2 is being taken: a lease lost while the request waited."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.verified: list[str] = []

    async def acquire(self, key: str, agent: str, ttl: float) -> Lease | Conflict:
        if key == "t:2":
            await self.handoff("t:1", "c", 60)
        return await super().acquire(key, agent, ttl)

    async def verify(self, key: str, agent: str, fence: int) -> bool:
        self.verified.append(key)
        return await super().verify(key, agent, fence)


async def test_a_lease_lost_before_forwarding_is_refused(tmp_path: Path) -> None:
    store = LosingStore(tmp_path / "locks.db")
    try:
        addon = TaskLocks(store)
        single = flow_for("a", locks=(lock("t:0"),))
        await run(addon, single)  # the acquire is the last look at the store: nothing to re-check
        assert single.response is None and store.verified == []
        f = flow_for("a", locks=(lock("t:1"), lock("t:2")))
        await run(addon, f)
        assert store.verified == ["t:1"]
        assert f.response is not None and f.response.status_code == 423
        err = error(f)
        assert (err["lock"], err["holder"]) == ("t:1", "c")
        assert "was lost before this request could be sent" in err["message"]
        assert FENCE_HEADER not in f.request.headers
        assert events(f) == ["acquired", "acquired", "lost", "rolled_back"]  # t:2 given back; t:1 is c's
        assert await store.get("t:2") is None
    finally:
        await store.close()


class DownStore(SqliteLockStore):
    async def acquire(self, key: str, agent: str, ttl: float) -> Lease | Conflict:
        raise StoreUnavailable("lock store sqlite:///x unavailable: disk I/O error")


async def test_store_down_fails_closed_and_too_long_keys_are_bad_requests(tmp_path: Path,
                                                                          store: SqliteLockStore) -> None:
    down = DownStore(tmp_path / "down.db")
    f = flow_for("a", locks=(lock("t:1"),))
    await run(TaskLocks(down), f)
    await down.close()
    assert f.response is not None and f.response.status_code == 503
    assert f.response.headers["retry-after"] == "5" and f.response.headers["x-should-retry"] == "false"
    err = error(f)
    assert err["type"] == "store_unavailable" and "disk I/O" not in err["message"]
    assert flowmeta.OBLIGATION_LOCK in f.metadata[flowmeta.OBLIGATIONS]
    long = flow_for("a", locks=(lock("t:" + "x" * 2000),))
    await run(TaskLocks(store), long)
    assert long.response is not None and long.response.status_code == 400
    assert "longer than" in error(long)["message"]
