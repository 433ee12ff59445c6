"""History-based correctness test for the task lock.

Real contention: six spawned worker processes fight over three keys through the Redis store while a chaos
loop freezes workers past their lease (SIGSTOP/SIGCONT) and kills this test's Redis connections. Each worker
records what it saw; the offline checker (tests/lockhistory.py) must find nothing. The same harness around a
deliberately broken store must find violations, so the test has teeth. Histories stay under pytest's
tmp_path; set LOCKHISTORY_SEED to replay a seed.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import signal
import time
import uuid
from pathlib import Path

import redis
from lockhistory import (
    EPS_NS,
    Recorder,
    StoreClientFactory,
    WorkerConfig,
    check_history,
    load_history,
    worker_process,
)

from bastion.coord import Conflict, Lease
from bastion.coord.redis import RedisLockStore

TTL = 0.3
KEYS = ("k0", "k1", "k2")
MS = 1_000_000


class AlwaysGrantStore(RedisLockStore):
    """Mutant: forgets the current holder before acquiring (SET without NX), so every acquire is a grant."""

    async def _acquire(self, key: str, agent: str, ttl: float) -> Lease | Conflict:
        await self._call(self._client.delete(self._lock_key(key)))
        return await super()._acquire(key, agent, ttl)


def chaos(redis_url: str, workers: list[multiprocessing.process.BaseProcess], client_name: str, until: float,
          rng: random.Random, log: Recorder) -> dict[str, int]:
    """Alternately freeze a worker longer than its lease, and kill every Redis connection of this run."""
    done = {"frozen": 0, "connections_killed": 0}
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        step = 0
        while time.monotonic() < until:
            time.sleep(rng.uniform(0.2, 0.4))
            step += 1
            if step % 2:
                victim = rng.choice(workers)
                assert victim.pid is not None
                os.kill(victim.pid, signal.SIGSTOP)
                log.record(op="chaos", what=f"SIGSTOP {victim.name}", t=time.monotonic_ns())
                time.sleep(rng.uniform(1.3, 2.0) * TTL)
                os.kill(victim.pid, signal.SIGCONT)
                log.record(op="chaos", what=f"SIGCONT {victim.name}", t=time.monotonic_ns())
                done["frozen"] += 1
            else:
                ours = [c["id"] for c in admin.client_list() if c.get("name") == client_name]
                for client_id in ours:
                    done["connections_killed"] += admin.client_kill_filter(_id=client_id, _type="normal")
                log.record(op="chaos", what=f"CLIENT KILL x{len(ours)}", t=time.monotonic_ns())
    finally:
        admin.close()
    return done


def run_history(tmp_path: Path, redis_url: str, store_class: type[RedisLockStore], prefix: str, seed: int,
                seconds: float, with_chaos: bool) -> tuple[list[dict], dict[str, int]]:
    client_name = f"bastiontest-{uuid.uuid4().hex[:12]}"
    store = functools.partial(store_class.from_url, redis_url, key_prefix=prefix, client_name=client_name)
    factory = StoreClientFactory(store=store, register_dir=str(tmp_path / "resource"))
    ctx = multiprocessing.get_context("spawn")
    procs = 6
    ready = ctx.Barrier(procs + 1)
    workers = []
    for i in range(procs):
        cfg = WorkerConfig(proc=f"w{i}", keys=KEYS, ttl=TTL, duration=seconds,
                           history=str(tmp_path / f"w{i}.jsonl"), seed=seed + i)
        worker = ctx.Process(target=worker_process, args=(cfg, factory, ready), name=f"w{i}")
        worker.start()
        workers.append(worker)
    ready.wait(timeout=60)
    until = time.monotonic() + seconds
    log = Recorder(tmp_path / "chaos.jsonl")
    try:
        done = chaos(redis_url, workers, client_name, until, random.Random(seed), log) if with_chaos else {}
    finally:
        log.close()
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert [w.exitcode for w in workers] == [0] * procs, f"workers failed; histories in {tmp_path}"
    return load_history([tmp_path]), done


def test_redis_lock_history_under_chaos_has_no_violations(tmp_path: Path, redis_url: str, prefix: str,
                                                          seed: int) -> None:
    history, done = run_history(tmp_path, redis_url, RedisLockStore, prefix, seed, seconds=6.0, with_chaos=True)
    report = check_history(history)
    print(report.format())
    assert report.ok, f"{report.format()}\nhistories: {tmp_path}"
    assert done["frozen"] > 0 and done["connections_killed"] > 0
    granted = {e["proc"] for e in history if e["op"] == "acquire" and e["ok"]}
    assert granted == {f"w{i}" for i in range(6)}
    assert report.stats["conflicts"] > 0 and report.stats["writes_accepted"] > 0
    # Workers frozen past their lease came back and were stopped: by verify, or by the fence at the resource.
    assert report.stats["verify_refused"] + report.stats["writes_rejected"] > 0


def test_checker_catches_a_lock_that_always_grants(tmp_path: Path, redis_url: str, prefix: str,
                                                   seed: int) -> None:
    history, _ = run_history(tmp_path, redis_url, AlwaysGrantStore, prefix, seed, seconds=2.5, with_chaos=False)
    report = check_history(history)
    print(report.format(limit=5))
    assert not report.ok
    assert {v.kind for v in report.violations} >= {"overlap"}
    assert "while fence" in str(next(v for v in report.violations if v.kind == "overlap"))


# --- the checker on hand-written histories ------------------------------------------------------------------


def acq(proc: str, inv_ms: float, fence: int | None, ok: bool | None = True, comp_ms: float | None = None,
        ttl_ms: float = 300, key: str = "k") -> dict:
    comp = inv_ms + 1 if comp_ms is None else comp_ms
    return {"op": "acquire", "proc": proc, "key": key, "inv": int(inv_ms * MS), "comp": int(comp * MS),
            "ok": ok, "fence": fence, "ttl_ns": int(ttl_ms * MS)}


def op(kind: str, proc: str, inv_ms: float, fence: int, ok: bool | None = True, key: str = "k") -> dict:
    return {"op": kind, "proc": proc, "key": key, "fence": fence, "inv": int(inv_ms * MS),
            "comp": int((inv_ms + 1) * MS), "ok": ok}


def write(proc: str, t_ms: float, fence: int, accepted: bool = True, key: str = "k") -> dict:
    return {"op": "write", "proc": proc, "key": key, "fence": fence, "t": int(t_ms * MS), "accepted": accepted}


def kinds(history: list[dict]) -> list[str]:
    return [v.kind for v in check_history(history).violations]


def test_checker_accepts_a_clean_history() -> None:
    history = [
        acq("a", 0, 10), op("verify", "a", 5, 10), write("a", 7, 10), op("release", "a", 10, 10),
        acq("b", 2, None, ok=False),
        acq("b", 12, 11), acq("b", 200, 11), op("verify", "b", 400, 11), write("b", 401, 11),
        acq("c", 450, 12),  # b renewed at 200 with a 300 ms ttl: surely held until 500
    ]
    assert kinds(history) == ["overlap"]
    history[-1] = acq("c", 520, 12)
    report = check_history(history)
    assert report.ok, report.format()
    assert (report.stats["grants"], report.stats["renewals"], report.stats["conflicts"]) == (3, 1, 1)


def test_checker_reports_overlap_with_times() -> None:
    [violation] = check_history([acq("a", 0, 1), acq("b", 100, 2)]).violations
    assert violation.kind == "overlap"
    assert str(violation) == ("[overlap] k: fence 2 (b) granted at +101.000ms while fence 1 (a) was held until "
                              "at least +300.000ms (199.0 ms overlap)")


def test_checker_reports_fence_reuse_and_order() -> None:
    assert "fence-reused" in kinds([acq("a", 0, 1), acq("b", 400, 1)])
    assert "order" in kinds([acq("a", 50, 1, comp_ms=60), acq("b", 0, 2, comp_ms=10)])


def test_checker_reports_release_and_verify_after_a_newer_grant() -> None:
    base = [acq("a", 0, 1, ttl_ms=50), acq("b", 100, 2)]
    assert kinds([*base, op("release", "a", 150, 1)]) == ["release"]
    assert kinds([*base, op("verify", "a", 150, 1)]) == ["verify"]
    assert kinds([acq("a", 0, 1, ttl_ms=50), op("verify", "a", 100, 1)]) == ["verify"]
    assert kinds([*base, op("verify", "a", 150, 1, ok=False), op("release", "a", 150, 1, ok=False)]) == []


def test_checker_reports_resource_regression_and_unowned_writes() -> None:
    grants = [acq("a", 0, 1), op("release", "a", 10, 1), acq("b", 20, 2)]
    assert kinds([*grants, write("b", 30, 2), write("a", 40, 1)]) == ["resource"]
    assert kinds([*grants, write("a", 30, 2)]) == ["write-unowned"]
    assert kinds([*grants, write("c", 30, 7)]) == ["write-unowned"]


def test_checker_notes_but_allows_a_zombie_write_before_the_new_holder_writes() -> None:
    history = [acq("a", 0, 1, ttl_ms=50), acq("b", 100, 2), write("a", 110, 1), write("b", 120, 2),
               write("a", 130, 1, accepted=False)]
    report = check_history(history)
    assert report.ok, report.format()
    assert (report.stats["zombie_writes"], report.stats["writes_rejected"]) == (1, 1)
    assert "accepted because b had not written yet" in report.notes[0]


def test_checker_is_not_fooled_by_lost_replies() -> None:
    # A release whose reply was lost (null), or whose retry answered False after the first attempt freed the
    # lock, may have ended the lease: the next grant is not an overlap. An acquire with unknown outcome is
    # not a grant.
    for outcome in (None, False):
        assert kinds([acq("a", 0, 1), op("release", "a", 10, 1, ok=outcome), acq("b", 20, 2)]) == []
    assert kinds([acq("a", 0, None, ok=None), acq("b", 5, 2)]) == []
    # ...but a renewal with unknown outcome may have extended the lease, so verify may say yes later.
    assert kinds([acq("a", 0, 1), acq("a", 250, None, ok=None), op("verify", "a", 500, 1)]) == []


def test_checker_separates_keys_and_uses_the_epsilon() -> None:
    assert kinds([acq("a", 0, 1, key="x"), acq("b", 10, 2, key="y")]) == []
    edge = (300 * MS - EPS_NS // 2) / MS  # b completes within epsilon of a's lease end
    assert kinds([acq("a", 0, 1), acq("b", edge - 1, 2)]) == []
