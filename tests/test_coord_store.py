"""Task-lock stores: one behavioural suite run against SQLite and a real Redis, then each backend's failure modes.

Redis tests use the server at 127.0.0.1:6379 (tests/services.py) with a key prefix unique to the test, deleted
afterwards, and a private `redis-server` of their own when they need to kill and restart it.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from lockhistory import (
    RedisServer,
    StoreClientFactory,
    WorkerConfig,
    check_history,
    delete_prefix,
    load_history,
    worker_process,
)
from services import require_redis

from bastion.config import ConfigError
from bastion.coord import (
    Conflict,
    Lease,
    LockStore,
    StoreUnavailable,
    StoreURLError,
    open_store,
)
from bastion.coord.redis import RedisLockStore
from bastion.coord.sqlite import HostClock, SqliteLockStore
from bastion.metrics import REGISTRY


@dataclass
class Backend:
    """Where one test's locks live; `open()` gives another store object on the same shared state, the way a
    second `bastion serve` process would see it."""

    name: str
    url: str
    prefix: str

    def open(self) -> LockStore:
        return open_store(self.url, key_prefix=self.prefix)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'bastion.db'}", "")
        return
    url = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    yield Backend("redis", url, prefix)
    delete_prefix(url, prefix)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[LockStore]:
    s = backend.open()
    yield s
    await s.close()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- the behavioural suite, both backends -------------------------------------------------------------------


async def test_grant_gives_a_fenced_lease(store: LockStore) -> None:
    lease = await store.acquire("ticket:42", "support-bot", 30)
    assert isinstance(lease, Lease) and lease.granted
    assert (lease.key, lease.agent, lease.renewed) == ("ticket:42", "support-bot", False)
    assert lease.fence > 0
    assert lease.acquired_at <= lease.expires_at <= lease.acquired_at + 31
    assert await store.verify("ticket:42", "support-bot", lease.fence)


async def test_conflict_names_holder_and_expiry(store: LockStore) -> None:
    lease = await store.acquire("ticket:42", "support-bot", 30)
    assert isinstance(lease, Lease)
    conflict = await store.acquire("ticket:42", "billing-bot", 30)
    assert isinstance(conflict, Conflict) and not conflict.granted
    assert (conflict.holder, conflict.pending) == ("support-bot", False)
    assert abs(conflict.expires_at - lease.expires_at) < 1
    assert not await store.verify("ticket:42", "billing-bot", lease.fence)


async def test_renewal_by_holder_extends_the_lease(store: LockStore) -> None:
    first = await store.acquire("ticket:42", "support-bot", 1.0)
    await asyncio.sleep(0.6)
    again = await store.acquire("ticket:42", "support-bot", 1.0)
    assert isinstance(first, Lease) and isinstance(again, Lease)
    assert again.renewed and again.fence == first.fence and again.acquired_at == first.acquired_at
    assert again.expires_at > first.expires_at
    await asyncio.sleep(0.6)  # past the first lease's end, inside the renewed one
    conflict = await store.acquire("ticket:42", "billing-bot", 1.0)
    assert isinstance(conflict, Conflict) and conflict.holder == "support-bot"
    assert await store.verify("ticket:42", "support-bot", first.fence)


async def test_renewal_never_shortens_a_lease(store: LockStore) -> None:
    first = await store.acquire("ticket:42", "support-bot", 60)
    short = await store.acquire("ticket:42", "support-bot", 0.05)
    assert isinstance(first, Lease) and isinstance(short, Lease) and short.renewed
    assert short.expires_at > first.expires_at - 1
    await asyncio.sleep(0.15)
    assert await store.verify("ticket:42", "support-bot", first.fence)


async def test_expired_lease_is_free(store: LockStore) -> None:
    first = await store.acquire("ticket:42", "support-bot", 0.1)
    await asyncio.sleep(0.3)
    assert isinstance(first, Lease)
    assert not await store.verify("ticket:42", "support-bot", first.fence)
    assert await store.get("ticket:42") is None
    assert await store.list_locks() == []
    second = await store.acquire("ticket:42", "billing-bot", 30)
    assert isinstance(second, Lease) and not second.renewed and second.fence > first.fence


async def test_same_agent_after_expiry_gets_a_new_fence(store: LockStore) -> None:
    first = await store.acquire("ticket:42", "support-bot", 0.1)
    await asyncio.sleep(0.3)
    second = await store.acquire("ticket:42", "support-bot", 30)
    assert isinstance(first, Lease) and isinstance(second, Lease)
    assert not second.renewed and second.fence > first.fence
    assert not await store.verify("ticket:42", "support-bot", first.fence)


async def test_release_by_holder_frees_the_lock(store: LockStore) -> None:
    lease = await store.acquire("ticket:42", "support-bot", 30)
    assert isinstance(lease, Lease)
    assert await store.release("ticket:42", "support-bot")
    assert await store.get("ticket:42") is None
    assert not await store.release("ticket:42", "support-bot")  # repeated: nothing left to free
    assert isinstance(await store.acquire("ticket:42", "billing-bot", 30), Lease)


async def test_release_by_non_holder_or_stale_fence_is_refused(store: LockStore) -> None:
    lease = await store.acquire("ticket:42", "support-bot", 30)
    assert isinstance(lease, Lease)
    assert not await store.release("ticket:42", "billing-bot")
    assert not await store.release("ticket:42", "support-bot", lease.fence - 1)
    assert not await store.release("ticket:7", "support-bot")
    assert await store.verify("ticket:42", "support-bot", lease.fence)
    assert await store.release("ticket:42", "support-bot", lease.fence)


async def test_admin_release_frees_anyones_lock(store: LockStore) -> None:
    lease = await store.acquire("ticket:42", "support-bot", 30)
    assert isinstance(lease, Lease)
    freed = await store.admin_release("ticket:42")
    assert freed is not None and (freed.holder, freed.fence) == ("support-bot", lease.fence)
    assert await store.admin_release("ticket:42") is None
    assert not await store.verify("ticket:42", "support-bot", lease.fence)
    other = await store.acquire("ticket:42", "billing-bot", 30)
    assert isinstance(other, Lease) and other.fence > lease.fence


async def test_handoff_passes_the_lock_to_the_recipient(store: LockStore) -> None:
    lease = await store.acquire("ticket:42", "support-bot", 30)
    assert isinstance(lease, Lease)
    offer = await store.handoff("ticket:42", "billing-bot")
    assert offer is not None
    assert (offer.holder, offer.fence, offer.handoff_to) == ("support-bot", lease.fence, "billing-bot")

    # The former holder is out: refused, its fence no longer verifies, it cannot release.
    former = await store.acquire("ticket:42", "support-bot", 30)
    assert isinstance(former, Conflict) and (former.holder, former.pending) == ("billing-bot", True)
    assert not await store.verify("ticket:42", "support-bot", lease.fence)
    assert not await store.release("ticket:42", "support-bot")
    third = await store.acquire("ticket:42", "legal-bot", 30)
    assert isinstance(third, Conflict) and (third.holder, third.pending) == ("billing-bot", True)

    claimed = await store.acquire("ticket:42", "billing-bot", 30)
    assert isinstance(claimed, Lease) and not claimed.renewed and claimed.fence > lease.fence
    assert await store.verify("ticket:42", "billing-bot", claimed.fence)
    [listed] = await store.list_locks()
    assert (listed.holder, listed.fence, listed.handoff_to) == ("billing-bot", claimed.fence, None)
    after = await store.acquire("ticket:42", "support-bot", 30)
    assert isinstance(after, Conflict) and (after.holder, after.pending) == ("billing-bot", False)


async def test_handoff_of_a_free_lock_does_nothing(store: LockStore) -> None:
    assert await store.handoff("ticket:42", "billing-bot") is None
    assert await store.get("ticket:42") is None


async def test_unclaimed_handoff_lapses(store: LockStore) -> None:
    assert isinstance(await store.acquire("ticket:42", "support-bot", 30), Lease)
    assert await store.handoff("ticket:42", "billing-bot", ttl=0.1) is not None
    await asyncio.sleep(0.3)
    assert isinstance(await store.acquire("ticket:42", "legal-bot", 30), Lease)


async def test_handoff_can_be_retargeted(store: LockStore) -> None:
    assert isinstance(await store.acquire("ticket:42", "support-bot", 30), Lease)
    await store.handoff("ticket:42", "billing-bot")
    offer = await store.handoff("ticket:42", "legal-bot")
    assert offer is not None and (offer.holder, offer.handoff_to) == ("support-bot", "legal-bot")
    refused = await store.acquire("ticket:42", "billing-bot", 30)
    assert isinstance(refused, Conflict) and refused.holder == "legal-bot"
    assert isinstance(await store.acquire("ticket:42", "legal-bot", 30), Lease)


async def test_fences_strictly_increase_per_key(store: LockStore) -> None:
    fences = []
    agents = ["a", "b", "c"]
    for i in range(6):
        lease = await store.acquire("ticket:42", agents[i % 3], 30)
        assert isinstance(lease, Lease)
        fences.append(lease.fence)
        if i % 3 == 0:
            assert await store.release("ticket:42", lease.agent)
        elif i % 3 == 1:
            await store.handoff("ticket:42", agents[(i + 1) % 3])
        else:
            await store.admin_release("ticket:42")
    other = await store.acquire("ticket:7", "a", 30)
    assert isinstance(other, Lease)
    assert fences == sorted(set(fences))


async def test_list_reports_every_live_lock(store: LockStore) -> None:
    keys = ["ticket:1", "customer:{7}", "a*b?[c]\\d", "ticket:ünïcode"]
    for key in keys:
        assert isinstance(await store.acquire(key, "support-bot", 30), Lease)
    await store.handoff("ticket:1", "billing-bot")
    locks = await store.list_locks()
    assert [lk.key for lk in locks] == sorted(keys)
    by_key = {lk.key: lk for lk in locks}
    assert by_key["ticket:1"].handoff_to == "billing-bot"
    assert all(lk.holder == "support-bot" for lk in locks)
    got = await store.get("a*b?[c]\\d")
    assert got is not None and got.to_json()["key"] == "a*b?[c]\\d"
    item = by_key["customer:{7}"].to_json()
    assert set(item) == {"key", "holder", "fence", "acquired_at", "expires_at", "handoff_to"}
    assert item["expires_at"].endswith("Z") and item["handoff_to"] is None
    assert metric("bastion_locks_held") == len(keys)


async def test_two_store_objects_share_the_locks(backend: Backend) -> None:
    async with backend.open() as one, backend.open() as two:
        lease = await one.acquire("ticket:42", "support-bot", 30)
        assert isinstance(lease, Lease)
        conflict = await two.acquire("ticket:42", "billing-bot", 30)
        assert isinstance(conflict, Conflict) and conflict.holder == "support-bot"
        assert [lk.key for lk in await two.list_locks()] == ["ticket:42"]
        assert await two.verify("ticket:42", "support-bot", lease.fence)
        assert await one.release("ticket:42", "support-bot")
        second = await two.acquire("ticket:42", "billing-bot", 30)
        assert isinstance(second, Lease) and second.fence > lease.fence


async def test_bad_arguments_are_value_errors(store: LockStore) -> None:
    for ttl in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="ttl"):
            await store.acquire("ticket:42", "support-bot", ttl)
    with pytest.raises(ValueError, match="lock key"):
        await store.acquire("", "support-bot", 30)
    with pytest.raises(ValueError, match="agent"):
        await store.acquire("ticket:42", "", 30)
    with pytest.raises(ValueError, match="lock key"):
        await store.release("x" * 5000, "support-bot")
    with pytest.raises(ValueError, match="ttl"):
        await store.handoff("ticket:42", "billing-bot", ttl=0)


async def test_acquire_latency_is_measured(store: LockStore) -> None:
    before = metric("bastion_lock_acquire_seconds_count")
    await store.acquire("ticket:42", "support-bot", 30)
    await store.acquire("ticket:42", "billing-bot", 30)
    assert metric("bastion_lock_acquire_seconds_count") == before + 2
    await store.ping()


def run_contenders(factory: StoreClientFactory, tmp_path: Path, procs: int, seconds: float,
                   ttl: float = 0.2) -> list[dict]:
    """`procs` spawned OS processes contend for two keys through their own store objects."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(procs)
    workers = []
    for i in range(procs):
        cfg = WorkerConfig(proc=f"w{i}", keys=("k0", "k1"), ttl=ttl, duration=seconds,
                           history=str(tmp_path / f"w{i}.jsonl"), seed=i, pause_p=0.05, stale_p=0.05)
        p = ctx.Process(target=worker_process, args=(cfg, factory, ready))
        p.start()
        workers.append(p)
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    return load_history([tmp_path])


async def test_os_processes_contending_stay_exclusive(backend: Backend, tmp_path: Path) -> None:
    if backend.name == "sqlite":
        store: Callable[[], LockStore] = functools.partial(SqliteLockStore, tmp_path / "bastion.db")
    else:
        store = functools.partial(RedisLockStore.from_url, backend.url, key_prefix=backend.prefix)
    factory = StoreClientFactory(store=store, register_dir=str(tmp_path / "resource"))
    history = await asyncio.to_thread(run_contenders, factory, tmp_path, 2, 1.5)
    report = check_history(history)
    assert report.ok, report.format()
    granted = {e["proc"] for e in history if e["op"] == "acquire" and e["ok"]}
    assert granted == {"w0", "w1"}
    assert report.stats["conflicts"] > 0 and report.stats["writes_accepted"] > 0


# --- SQLite -------------------------------------------------------------------------------------------------


async def test_sqlite_missing_directory_is_unavailable_until_it_exists(tmp_path: Path) -> None:
    path = tmp_path / "later" / "bastion.db"
    before = metric("bastion_store_errors_total", operation="acquire")
    async with SqliteLockStore(path) as store:
        with pytest.raises(StoreUnavailable, match="unable to open"):
            await store.acquire("ticket:42", "support-bot", 30)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert metric("bastion_store_errors_total", operation="acquire") == before + 1
        path.parent.mkdir()
        assert isinstance(await store.acquire("ticket:42", "support-bot", 30), Lease)


async def test_sqlite_write_lock_held_too_long_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    async with SqliteLockStore(path, busy_timeout=0.2) as store:
        lease = await store.acquire("ticket:42", "support-bot", 30)
        assert isinstance(lease, Lease)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                await store.acquire("ticket:7", "support-bot", 30)
            # WAL: readers are never blocked by a writer, so the pre-forward check still answers.
            assert await store.verify("ticket:42", "support-bot", lease.fence)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert isinstance(await store.acquire("ticket:7", "support-bot", 30), Lease)


async def test_sqlite_lease_from_before_a_reboot_is_free(tmp_path: Path) -> None:
    path = tmp_path / "bastion.db"
    async with SqliteLockStore(path, clock=HostClock("boot:previous", True)) as before_reboot:
        old = await before_reboot.acquire("ticket:42", "support-bot", 3600)
    async with SqliteLockStore(path) as store:
        assert await store.list_locks() == []
        new = await store.acquire("ticket:42", "billing-bot", 30)
        assert isinstance(old, Lease) and isinstance(new, Lease) and new.fence > old.fence


async def test_sqlite_use_after_close_is_an_error(tmp_path: Path) -> None:
    store = SqliteLockStore(tmp_path / "bastion.db")
    await store.close()
    with pytest.raises(RuntimeError, match="closed"):
        await store.list_locks()


def test_open_store_picks_the_backend_from_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///locks.db")
    assert isinstance(relative, SqliteLockStore) and relative.path == Path("locks.db")
    absolute = open_store(f"sqlite:///{tmp_path}/x/locks.db")
    assert isinstance(absolute, SqliteLockStore) and absolute.path == tmp_path / "x" / "locks.db"
    assert isinstance(open_store("redis://127.0.0.1:6379/0"), RedisLockStore)
    assert isinstance(open_store("rediss://127.0.0.1:6380/1"), RedisLockStore)


@pytest.mark.parametrize("url", ["mysql://app:s3cret@db/x", "sqlite://relative.db", "sqlite:///", "",
                                 "redis://app:s3cret@127.0.0.1:notaport/0"])
def test_open_store_rejects_bad_urls_without_showing_secrets(url: str) -> None:
    with pytest.raises(StoreURLError) as err:
        open_store(url)
    assert isinstance(err.value, ConfigError)
    assert "s3cret" not in str(err.value)


# --- Redis --------------------------------------------------------------------------------------------------


async def test_redis_down_is_unavailable_and_the_same_store_recovers_after_a_restart() -> None:
    RedisServer.require_binary()
    with RedisServer() as server:
        store = RedisLockStore.from_url(server.url, key_prefix="bastiontest:", timeout=1.0)
        try:
            before = await store.acquire("ticket:42", "support-bot", 60)
            assert isinstance(before, Lease)

            server.stop()
            errors = metric("bastion_store_errors_total", operation="acquire")
            with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{server.port}"):
                await store.acquire("ticket:42", "support-bot", 60)
            assert metric("bastion_store_errors_total", operation="acquire") == errors + 1
            for call in (store.verify("ticket:42", "support-bot", before.fence), store.list_locks(),
                         store.release("ticket:42", "support-bot"), store.ping(),
                         store.handoff("ticket:42", "b"), store.admin_release("ticket:42")):
                with pytest.raises(StoreUnavailable):
                    await call

            server.start()  # same port, no data, empty script cache (NOSCRIPT on the first EVALSHA)
            assert await store.list_locks() == []
            after = await store.acquire("ticket:42", "billing-bot", 60)
            assert isinstance(after, Lease) and not after.renewed
            assert after.fence > before.fence
            assert not await store.verify("ticket:42", "support-bot", before.fence)
        finally:
            await store.close()


async def test_redis_list_only_sees_its_own_prefix() -> None:
    url = require_redis()
    base = f"bastiontest:{uuid.uuid4().hex}:"
    try:
        async with (open_store(url, key_prefix=base + "[a]:") as globby,
                    open_store(url, key_prefix=base + "a:") as plain):
            assert isinstance(await plain.acquire("ticket:42", "support-bot", 30), Lease)
            assert await globby.list_locks() == []
            assert isinstance(await globby.acquire("ticket:42", "billing-bot", 30), Lease)
            assert [lk.holder for lk in await plain.list_locks()] == ["support-bot"]
    finally:
        delete_prefix(url, base)


async def test_redis_keys_live_under_the_prefix_and_fences_are_kept() -> None:
    url = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    import redis.asyncio as aioredis

    raw = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        async with open_store(url, key_prefix=prefix) as store:
            lease = await store.acquire("ticket:42", "support-bot", 30)
            assert isinstance(lease, Lease)
            keys = sorted([k async for k in raw.scan_iter(match=prefix + "*")])
            assert keys == [f"{prefix}fence:{{ticket:42}}", f"{prefix}lock:{{ticket:42}}"]
            assert 0 < await raw.pttl(f"{prefix}lock:{{ticket:42}}") <= 30_000
            assert await store.release("ticket:42", "support-bot")
            assert await raw.get(f"{prefix}fence:{{ticket:42}}") == str(lease.fence)
    finally:
        await raw.aclose()
        delete_prefix(url, prefix)


async def test_redis_url_prefix_parameter_namespaces_the_keys() -> None:
    url = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    try:
        async with (open_store(f"{url}?prefix={prefix}one:") as one,
                    open_store(url, key_prefix=f"{prefix}one:") as same,
                    open_store(f"{url}?prefix={prefix}two:&socket_keepalive=true") as two):
            assert isinstance(await one.acquire("ticket:42", "support-bot", 30), Lease)
            assert [lk.key for lk in await same.list_locks()] == ["ticket:42"]
            assert await two.list_locks() == []
            assert isinstance(await two.acquire("ticket:42", "billing-bot", 30), Lease)
    finally:
        delete_prefix(url, prefix)
