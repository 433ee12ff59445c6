"""Fleet stores (milestones, budgets, pauses, guard counters): one behavioural suite run against SQLite and a
real Redis.

Redis tests use the server at 127.0.0.1:6379 (tests/services.py) with a key prefix unique to the test, deleted
afterwards. Two store objects on the same state stand for two sidecars.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lockhistory import delete_prefix
from services import require_redis

from bastion.coord import StoreUnavailable, open_fleet_store
from bastion.coord.fleet import (
    MAX_REASON,
    MAX_WINDOW,
    BudgetUsage,
    Exceeded,
    FleetStore,
    Reservation,
)

LONG = MAX_WINDOW  # a window no test crosses the end of (epoch-aligned 31-day windows)


@dataclass
class Backend:
    """Where one test's fleet state lives; `open()` gives another store object on it, as a second sidecar."""

    name: str
    url: str
    prefix: str

    def open(self) -> FleetStore:
        return open_fleet_store(self.url, key_prefix=self.prefix)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'bastion.db'}", "")
        return
    url = require_redis()
    prefix = f"test-fleet-{uuid.uuid4().hex}:"
    yield Backend("redis", url, prefix)
    delete_prefix(url, prefix)


@pytest.fixture
async def stores(backend: Backend) -> AsyncIterator[tuple[FleetStore, FleetStore]]:
    one, two = backend.open(), backend.open()
    yield one, two
    await one.close()
    await two.close()


@pytest.fixture
def store(stores: tuple[FleetStore, FleetStore]) -> FleetStore:
    return stores[0]


async def next_window(per: float) -> None:
    """Sleep until just after the next epoch-aligned window of `per` seconds starts (stores run on this host's
    clock), so the calls that follow happen well inside one window."""
    now = time.time()
    await asyncio.sleep(math.floor(now / per) * per + per - now + 0.02)


async def usage(store: FleetStore, budget: str, key: str) -> BudgetUsage:
    [found] = [b for b in await store.list_budgets() if (b.budget, b.key) == (budget, key)]
    return found


# --- milestones ---------------------------------------------------------------------------------------------


async def test_milestone_complete_missing_clear_list(stores: tuple[FleetStore, FleetStore]) -> None:
    one, two = stores
    before = time.time()
    done = await one.complete_milestone("extracted:42", 60, "agent-a", "req-1")
    assert done.key == "extracted:42" and done.by == "agent-a" and done.request_id == "req-1"
    assert before - 1 <= done.completed_at <= time.time() + 1
    assert done.expires_at == pytest.approx(done.completed_at + 60, abs=0.01)

    # the other sidecar sees it
    assert await two.missing_milestones(["extracted:42", "reviewed:42", "extracted:43"]) == [
        "reviewed:42", "extracted:43"]
    assert await two.missing_milestones(["extracted:42"]) == []
    assert await two.missing_milestones([]) == []

    await two.complete_milestone("reviewed:42", 60, "user:alice")
    listed = await one.list_milestones()
    assert [m.key for m in listed] == ["extracted:42", "reviewed:42"]
    assert listed[1].by == "user:alice" and listed[1].request_id is None
    assert listed[0].to_json()["key"] == "extracted:42"

    cleared = await two.clear_milestone("extracted:42")
    assert cleared is not None and cleared.key == "extracted:42" and cleared.by == "agent-a"
    assert cleared.request_id == "req-1"
    assert await one.clear_milestone("extracted:42") is None
    assert await one.missing_milestones(["extracted:42", "reviewed:42"]) == ["extracted:42"]


async def test_milestone_refresh_replaces(store: FleetStore) -> None:
    first = await store.complete_milestone("k", 60, "agent-a", "r1")
    second = await store.complete_milestone("k", 120, "agent-b")
    assert second.completed_at >= first.completed_at
    [listed] = await store.list_milestones()
    assert listed.by == "agent-b" and listed.request_id is None
    assert listed.expires_at == pytest.approx(second.expires_at, abs=0.01)


async def test_milestone_expires_after_ttl(stores: tuple[FleetStore, FleetStore]) -> None:
    one, two = stores
    await one.complete_milestone("short", 0.3, "agent-a")
    await one.complete_milestone("long", 60, "agent-a")
    assert await two.missing_milestones(["short", "long"]) == []
    await asyncio.sleep(0.45)
    assert await two.missing_milestones(["short", "long"]) == ["short"]
    assert [m.key for m in await two.list_milestones()] == ["long"]
    assert await two.clear_milestone("short") is None


async def test_milestone_keys_are_free_text(store: FleetStore) -> None:
    keys = ["a:b", "a*", "x{y}z", "ticket https://jira/BUG-1?x=[1]", "ünïcødé ✓"]
    for key in keys:
        await store.complete_milestone(key, 60, "agent")
    assert await store.missing_milestones([*keys, "a"]) == ["a"]
    assert [m.key for m in await store.list_milestones()] == sorted(keys)


# --- budgets ------------------------------------------------------------------------------------------------


async def test_call_budget_is_exact(stores: tuple[FleetStore, FleetStore]) -> None:
    one, two = stores
    granted = [await s.reserve("calls", "agent-a", "calls", 3, LONG, 1) for s in (one, two, one)]
    assert all(isinstance(r, Reservation) and r.granted for r in granted)
    assert [r.used for r in granted] == [1, 2, 3]
    first = granted[0]
    assert isinstance(first, Reservation)
    assert first.window_start <= time.time() < first.resets_at
    assert first.resets_at - first.window_start == pytest.approx(LONG)

    refused = await two.reserve("calls", "agent-a", "calls", 3, LONG, 1)
    assert isinstance(refused, Exceeded) and not refused.granted
    assert refused.used == 3 and refused.limit == 3 and refused.resets_at == first.resets_at
    assert (await usage(one, "calls", "agent-a")).used == 3  # nothing was added

    # another key, another budget: their own counters
    assert (await one.reserve("calls", "agent-b", "calls", 3, LONG, 1)).granted
    assert (await one.reserve("other", "agent-a", "calls", 3, LONG, 1)).granted


async def test_zero_limit_refuses_everything(store: FleetStore) -> None:
    refused = await store.reserve("b", "k", "calls", 0, LONG, 1)
    assert isinstance(refused, Exceeded) and refused.used == 0
    assert isinstance(await store.reserve("t", "k", "tokens", 0, LONG, 1), Exceeded)
    assert await store.list_budgets() == []


async def test_token_budget_admits_while_some_is_left(store: FleetStore) -> None:
    a = await store.reserve("tokens", "agent-a", "tokens", 100, LONG, 60)
    b = await store.reserve("tokens", "agent-a", "tokens", 100, LONG, 60)  # 60 < 100: admitted, goes past
    assert isinstance(a, Reservation) and isinstance(b, Reservation) and b.used == 120
    c = await store.reserve("tokens", "agent-a", "tokens", 100, LONG, 1)
    assert isinstance(c, Exceeded) and c.used == 120 and c.resets_at == a.resets_at


async def test_settle_replaces_estimate(stores: tuple[FleetStore, FleetStore]) -> None:
    one, two = stores
    r = await one.reserve("tokens", "agent-a", "tokens", 1000, LONG, 400)
    assert isinstance(r, Reservation)
    u = await usage(two, "tokens", "agent-a")
    assert (u.used, u.reserved) == (400, 400)

    await two.settle(r, 150)  # the real usage replaces the estimate
    u = await usage(one, "tokens", "agent-a")
    assert (u.used, u.reserved) == (150, 0)

    r2 = await one.reserve("tokens", "agent-a", "tokens", 1000, LONG, 300)
    assert isinstance(r2, Reservation) and r2.used == 450
    await one.settle(r2, 0)  # refused later: all of it back
    u = await usage(one, "tokens", "agent-a")
    assert (u.used, u.reserved) == (150, 0)

    r3 = await one.reserve("tokens", "agent-a", "tokens", 1000, LONG, 10)
    assert isinstance(r3, Reservation)
    await one.settle(r3, 900)  # more than estimated
    assert (await usage(one, "tokens", "agent-a")).used == 1050
    assert isinstance(await one.reserve("tokens", "agent-a", "tokens", 1000, LONG, 1), Exceeded)


async def test_settle_never_goes_below_zero_and_leaves_gone_windows_alone(store: FleetStore) -> None:
    r = await store.reserve("calls", "k", "calls", 5, LONG, 1)
    assert isinstance(r, Reservation)
    big = Reservation(budget=r.budget, key=r.key, unit=r.unit, amount=50, limit=5, used=1,
                      window_start=r.window_start, resets_at=r.resets_at)
    await store.settle(big, 0)
    u = await usage(store, "calls", "k")
    assert (u.used, u.reserved) == (0, 0)

    gone = Reservation(budget="calls", key="old", unit="calls", amount=1, limit=5, used=1,
                       window_start=r.window_start - 2 * LONG, resets_at=r.window_start - LONG)
    await store.settle(gone, 0)
    assert [(b.budget, b.key) for b in await store.list_budgets()] == [("calls", "k")]


async def test_concurrent_reservations_never_exceed_limit(stores: tuple[FleetStore, FleetStore]) -> None:
    one, two = stores
    for _ in range(7):
        assert (await one.reserve("calls", "busy", "calls", 10, LONG, 1)).granted
    results = await asyncio.gather(*(s.reserve("calls", "busy", "calls", 10, LONG, 1)
                                     for s in [one, two] * 25))
    granted = [r for r in results if isinstance(r, Reservation)]
    assert len(granted) == 3
    assert sorted(r.used for r in granted) == [8, 9, 10]
    assert all(isinstance(r, Exceeded) and r.used == 10 for r in results if not r.granted)
    assert (await usage(two, "calls", "busy")).used == 10


async def test_window_resets_after_per(stores: tuple[FleetStore, FleetStore]) -> None:
    one, two = stores
    await next_window(1.0)
    first = await one.reserve("rate", "agent-a", "calls", 1, 1.0, 1)
    assert isinstance(first, Reservation)
    assert first.resets_at - first.window_start == pytest.approx(1.0)
    refused = await two.reserve("rate", "agent-a", "calls", 1, 1.0, 1)
    assert isinstance(refused, Exceeded) and refused.resets_at == first.resets_at

    await asyncio.sleep(max(0.0, first.resets_at - time.time()) + 0.05)
    again = await two.reserve("rate", "agent-a", "calls", 1, 1.0, 1)
    assert isinstance(again, Reservation) and again.used == 1
    assert again.window_start == pytest.approx(first.resets_at)
    [current] = await one.list_budgets()  # only the current window is listed
    assert current.window_start == pytest.approx(again.window_start) and current.used == 1

    await one.settle(first, 0)  # a late settle of the previous window does not touch this one
    assert (await usage(one, "rate", "agent-a")).used == 1


async def test_list_budgets(stores: tuple[FleetStore, FleetStore]) -> None:
    one, two = stores
    assert await one.list_budgets() == []
    r = await one.reserve("tok", "agent-b", "tokens", 1000, LONG, 250)
    assert isinstance(r, Reservation)
    await two.reserve("calls", "agent-a", "calls", 5, LONG, 1)
    await two.reserve("calls", "agent-a", "calls", 6, LONG, 1)  # the latest call's limit is shown
    listed = await two.list_budgets()
    assert [(b.budget, b.key) for b in listed] == [("calls", "agent-a"), ("tok", "agent-b")]
    calls, tok = listed
    assert (calls.unit, calls.limit, calls.used, calls.reserved) == ("calls", 6, 2, 0)  # calls settle at once
    assert (tok.unit, tok.limit, tok.used, tok.reserved) == ("tokens", 1000, 250, 250)
    assert tok.window_start == pytest.approx(r.window_start) and tok.resets_at == pytest.approx(r.resets_at)
    doc = tok.to_json()
    assert doc["remaining"] == 750 and doc["resets_at"].endswith("Z")

    assert isinstance(await one.reserve("calls", "agent-a", "calls", 1, LONG, 1), Exceeded)
    assert (await usage(one, "calls", "agent-a")).limit == 1  # a refused call updates the limit too


async def test_budget_names_never_collide(store: FleetStore) -> None:
    pairs = [("a", "b:c"), ("a:b", "c"), ("a", "b"), ("a:1", "k"), ("a", "1:k"), ("x*", "[y]"),
             ("{b}", "{k}"), ("ü", "✓ key with spaces")]
    for budget, key in pairs:
        r = await store.reserve(budget, key, "calls", 1, LONG, 1)
        assert isinstance(r, Reservation) and r.used == 1, (budget, key)
    listed = await store.list_budgets()
    assert sorted((b.budget, b.key) for b in listed) == sorted(pairs)
    assert all(b.used == 1 for b in listed)
    for budget, key in pairs:
        assert isinstance(await store.reserve(budget, key, "calls", 1, LONG, 1), Exceeded)


# --- pauses -------------------------------------------------------------------------------------------------


async def test_pause_resume_list(stores: tuple[FleetStore, FleetStore]) -> None:
    one, two = stores
    assert await one.list_pauses() == []
    p = await one.pause("agent-a", "runaway loop", "user:alice")
    assert (p.agent, p.reason, p.paused_by, p.action) == ("agent-a", "runaway loop", "user:alice", "pause")
    assert abs(p.paused_at - time.time()) < 5
    await two.pause("*", "freeze", "guard:errors", "hold")
    listed = await two.list_pauses()
    assert [(x.agent, x.action) for x in listed] == [("*", "hold"), ("agent-a", "pause")]
    assert listed[1].paused_at == pytest.approx(p.paused_at, abs=0.01)
    assert listed[1].to_json()["paused_by"] == "user:alice"

    replaced = await two.pause("agent-a", "x" * (MAX_REASON + 100), "user:bob", "hold")
    assert replaced.reason == "x" * MAX_REASON
    [a] = [x for x in await one.list_pauses() if x.agent == "agent-a"]
    assert (a.reason, a.paused_by, a.action) == ("x" * MAX_REASON, "user:bob", "hold")

    lifted = await one.resume("agent-a")
    assert lifted is not None and lifted.paused_by == "user:bob" and lifted.action == "hold"
    assert await two.resume("agent-a") is None
    assert [x.agent for x in await two.list_pauses()] == ["*"]
    assert (await one.resume("*")) is not None
    assert await one.list_pauses() == []


async def test_pause_reason_free_text(store: FleetStore) -> None:
    reason = 'quotes " and \\ and / and ünïcødé ✓ and\nnewline'
    await store.pause("agent:{1}", reason, "user:x")
    await store.pause("no-reason", "", "user:x")
    listed = {p.agent: p for p in await store.list_pauses()}
    assert listed["agent:{1}"].reason == reason and listed["no-reason"].reason == ""


# --- guard counters -----------------------------------------------------------------------------------------


async def test_guard_count_accumulates_and_restarts(stores: tuple[FleetStore, FleetStore]) -> None:
    one, two = stores
    await next_window(1.0)
    assert await one.count("errors", "agent-a", 1.0) == 1
    assert await two.count("errors", "agent-a", 1.0, 3) == 4
    assert await one.count("errors", "agent-b", 1.0) == 1  # per agent
    assert await one.count("errors:agent", "a", 1.0) == 1  # no collision with ("errors", "agent:a")
    assert await one.count("errors", "agent:a", 1.0) == 1
    assert await one.count("denials", "agent-a", 1.0) == 1  # per guard
    assert await one.count("errors", "agent-a", LONG) == 1  # per window length
    await next_window(1.0)
    assert await two.count("errors", "agent-a", 1.0) == 1
    assert await two.count("errors", "agent-a", LONG) == 2


# --- arguments and failures ---------------------------------------------------------------------------------


async def test_bad_arguments(store: FleetStore) -> None:
    r = Reservation(budget="b", key="k", unit="calls", amount=1, limit=1, used=1, window_start=0.0, resets_at=1.0)
    bad = [
        store.complete_milestone("", 60, "a"),
        store.complete_milestone("k", 0, "a"),
        store.complete_milestone("k", 60, ""),
        store.complete_milestone("k" * 2000, 60, "a"),
        store.missing_milestones(["ok", ""]),
        store.clear_milestone(""),
        store.reserve("", "k", "calls", 1, 60, 1),
        store.reserve("b", "k", "bytes", 1, 60, 1),  # type: ignore[arg-type]
        store.reserve("b", "k", "calls", -1, 60, 1),
        store.reserve("b", "k", "calls", 1, 0, 1),
        store.reserve("b", "k", "calls", 1, MAX_WINDOW * 2, 1),
        store.reserve("b", "k", "calls", 1, float("nan"), 1),
        store.reserve("b", "k", "calls", 1, 60, -1),
        store.reserve("b", "k", "calls", True, 60, 1),
        store.settle(r, -1),
        store.pause("", "r", "user:x"),
        store.pause("a", "r", "user:x", "stop"),  # type: ignore[arg-type]
        store.resume(""),
        store.count("g", "a", 60, 0),
        store.count("g", "", 60),
        store.count("g", "a", -1),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            await call
    assert await store.list_budgets() == [] and await store.list_milestones() == []


async def test_redis_unreachable_is_store_unavailable() -> None:
    store = open_fleet_store("redis://127.0.0.1:1/0", key_prefix=f"test-fleet-{uuid.uuid4().hex}:")
    try:
        with pytest.raises(StoreUnavailable):
            await store.reserve("b", "k", "calls", 1, 60, 1)
        with pytest.raises(StoreUnavailable):
            await store.list_pauses()
        with pytest.raises(StoreUnavailable):
            await store.missing_milestones(["k"])
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.close()


async def test_redis_concurrent_reservations_share_round_trips_and_survive_a_script_flush() -> None:
    """Concurrent reservations go to Redis in pipelines (bastion/coord/redis_batch.py): each still atomic and
    exact, and a script Redis forgot (SCRIPT FLUSH, a restart) is loaded again rather than failing the call."""
    import redis.asyncio as aioredis

    url = require_redis()
    prefix = f"test-fleet-{uuid.uuid4().hex}:"
    store = open_fleet_store(url, key_prefix=prefix)
    admin = aioredis.Redis.from_url(url)
    try:
        for round_ in range(2):
            await admin.script_flush()
            results = await asyncio.gather(*(store.reserve("calls", f"k{round_}", "calls", 30, LONG, 1)
                                             for _ in range(60)))
            granted = [r for r in results if isinstance(r, Reservation)]
            assert sorted(r.used for r in granted) == list(range(1, 31))
            assert all(isinstance(r, Exceeded) and r.used == 30 for r in results if not r.granted)
    finally:
        await store.close()
        await admin.aclose()
        delete_prefix(url, prefix)


async def test_redis_batch_reloads_a_script_redis_forgot() -> None:
    """A batch whose EVALSHA meets NOSCRIPT runs those calls again through the script, which loads it."""
    import redis.asyncio as aioredis

    from bastion.coord.redis_batch import ScriptBatcher

    url = require_redis()
    client = aioredis.Redis.from_url(url)
    key = f"test-fleet-{uuid.uuid4().hex}:n"
    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    batcher = ScriptBatcher(client)
    try:
        await client.script_flush()
        batcher._busy = True  # as if a round trip were in flight: these queue for one batch
        calls = [asyncio.ensure_future(batcher.call(script, [key], [1])) for _ in range(5)]
        await asyncio.sleep(0)
        batcher._busy = False
        batcher._start_drain()
        assert sorted(await asyncio.gather(*calls)) == [1, 2, 3, 4, 5]
    finally:
        await batcher.close()
        await client.delete(key)
        await client.aclose()


async def test_redis_batch_answers_every_call_when_closed_or_abandoned_mid_flight() -> None:
    """No call of a batch is left waiting: not when one caller goes away, not when the store closes."""
    import redis.asyncio as aioredis

    from bastion.coord.redis_batch import ScriptBatcher

    url = require_redis()
    client = aioredis.Redis.from_url(url)
    key = f"test-fleet-{uuid.uuid4().hex}:n"
    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    try:
        for close_it in (False, True):
            batcher = ScriptBatcher(client)
            await client.script_flush()  # the batch will meet NOSCRIPT and retry call by call
            batcher._busy = True
            calls = [asyncio.ensure_future(batcher.call(script, [key], [1])) for _ in range(6)]
            await asyncio.sleep(0)
            batcher._busy = False
            batcher._start_drain()
            await asyncio.sleep(0.001)
            calls[1].cancel()
            if close_it:
                await batcher.close()
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
            assert all(isinstance(o, (int, ConnectionError, asyncio.CancelledError)) for o in outcomes)
            await batcher.close()
    finally:
        await client.delete(key)
        await client.aclose()


@pytest.mark.parametrize("redis_is", ["refusing", "silent"])
async def test_redis_down_fails_every_concurrent_reservation_cleanly(redis_is: str) -> None:
    """Refused connections, or a black-holed Redis (the first call's timeout fails the calls queued behind it
    too): every reservation is StoreUnavailable, never a hang and never a local count."""
    from bastion.coord.fleet_redis import RedisFleetStore

    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts, reads nothing, answers nothing

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1] if redis_is == "silent" else 1
    store = RedisFleetStore.from_url(f"redis://127.0.0.1:{port}/0", key_prefix="t:", timeout=0.2, retries=0)
    try:
        results = await asyncio.gather(*(store.reserve("b", "k", "calls", 5, 60, 1) for _ in range(200)),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results)
    finally:
        await store.close()
        for w in held:
            w.close()
        server.close()


async def test_sqlite_unreachable_is_store_unavailable(tmp_path: Path) -> None:
    store = open_fleet_store(f"sqlite:///{tmp_path / 'missing' / 'bastion.db'}")
    try:
        with pytest.raises(StoreUnavailable):
            await store.reserve("b", "k", "calls", 1, 60, 1)
        with pytest.raises(StoreUnavailable):
            await store.list_pauses()
        with pytest.raises(StoreUnavailable):
            await store.complete_milestone("k", 60, "a")
        (tmp_path / "missing").mkdir()  # the same object recovers once the file can be made
        assert (await store.reserve("b", "k", "calls", 1, 60, 1)).granted
    finally:
        await store.close()
