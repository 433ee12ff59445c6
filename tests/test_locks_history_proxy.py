"""History-based correctness of task locks through real sidecars, under chaos.

Six agents (three per sidecar, each with its own token) contend for three keys of a fenced resource through
two `bastion serve` processes sharing real Redis. Every write the resource accepts is guarded by a lock rule,
and each agent closes its work with a request matching a release rule. Meanwhile a chaos loop

- freezes one sidecar with SIGSTOP for longer than the lease, then SIGCONT: its agents' requests stall with
  it, and their leases run out while others take the keys;
- kills this run's Redis connections (CLIENT KILL by id, only of connections carrying this run's client
  name, which the sidecars get through the store URL): sidecars must retry or fail closed, never guess.

The resource also sits on some writes past the lease before deciding (a slow network between proxy and
resource), so a newer holder may write first: only the fence can stop such a late write.

The agents and the resource record what they saw (tests/lockproxy.py); the offline checker of
tests/lockhistory.py then proves that no two agents held a key inside one lease, that fences follow real
time, that a release never came from a superseded holder, and that the resource only ever moved forward.
Histories stay under pytest's tmp_path; LOCKHISTORY_SEED replays a seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from lockhistory import Recorder, check_history, load_history
from lockproxy import FencedUpstream, HttpWorkerConfig, attribute_forwarded, run_http_worker
from support.bastion import BastionServer, run_bastion

TTL = 1.0
KEYS = ("r0", "r1", "r2")
AGENTS = tuple(f"w{i}" for i in range(6))
SECONDS = 20.0


def token(agent: str) -> str:
    return f"{agent}-token"


def rules_yaml() -> str:
    agents = "\n".join(
        f"  {a}: {{roles: [worker], token_sha256: {hashlib.sha256(token(a).encode()).hexdigest()}}}"
        for a in AGENTS)
    return textwrap.dedent("""\
        version: 1
        defaults: {effect: deny}
        agents:
        %s
        rules:
          - id: resource
            effect: allow
            agents: ["role:worker"]
            match: {host: 127.0.0.1}
          - id: write
            effect: allow
            agents: ["role:worker"]
            match: {method: POST, path: "/res/{key}/write"}
            lock: {key: "res:{key}", ttl: %gs}
          - id: done
            effect: allow
            agents: ["role:worker"]
            match: {method: POST, path: "/res/{key}/release"}
            release: "res:{key}"
        network:
          allow_private: ["127.0.0.0/8"]
        """) % (agents, TTL)


async def chaos(sidecars: list[BastionServer], admin: aioredis.Redis, client_name: str, until: float,
                rng: random.Random, log: Recorder) -> dict[str, int]:
    """Alternately freeze a sidecar past the lease, and kill every Redis connection of this run's sidecars."""
    done = {"frozen": 0, "connections_killed": 0}
    step = 0
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(0.3, 0.6))
        step += 1
        if step % 2:
            victim = rng.randrange(len(sidecars))
            pid = sidecars[victim].proc.pid
            os.kill(pid, signal.SIGSTOP)
            log.record(op="chaos", what=f"SIGSTOP sidecar {victim}", t=time.monotonic_ns())
            try:
                await asyncio.sleep(rng.uniform(1.3, 2.0) * TTL)
            finally:
                os.kill(pid, signal.SIGCONT)
            log.record(op="chaos", what=f"SIGCONT sidecar {victim}", t=time.monotonic_ns())
            done["frozen"] += 1
        else:
            ours = [c["id"] for c in await admin.client_list() if c.get("name") == client_name]
            for client_id in ours:
                done["connections_killed"] += await admin.client_kill_filter(_id=client_id)
            log.record(op="chaos", what=f"CLIENT KILL x{len(ours)}", t=time.monotonic_ns())
    return done


async def contend(sidecars: list[BastionServer], redis_url: str, client_name: str, tmp_path: Path,
                  seed: int, fenced: FencedUpstream) -> dict[str, int]:
    """Run the six agents and the chaos loop for SECONDS; return what chaos did."""
    recorders = {a: Recorder(tmp_path / f"{a}.jsonl") for a in AGENTS}
    clients = {a: httpx.AsyncClient(proxy=sidecars[i // 3].proxy_url(a, token(a)), trust_env=False, timeout=10)
               for i, a in enumerate(AGENTS)}
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    log = Recorder(tmp_path / "chaos.jsonl")
    try:
        workers = [run_http_worker(HttpWorkerConfig(proc=a, keys=KEYS, ttl=TTL, duration=SECONDS, seed=seed + i),
                                   clients[a], fenced.url, recorders[a]) for i, a in enumerate(AGENTS)]
        until = time.monotonic() + SECONDS
        *_, done = await asyncio.gather(*workers, chaos(sidecars, admin, client_name, until,
                                                        random.Random(seed), log))
        return done
    finally:
        for client in clients.values():
            await client.aclose()
        await admin.aclose()
        for rec in (*recorders.values(), log):
            rec.close()


def test_locks_through_sidecars_under_chaos_have_no_violations(tmp_path: Path, redis_url: str, prefix: str,
                                                               seed: int) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_yaml())
    client_name = f"bastiontest-{uuid.uuid4().hex[:12]}"
    store = ["--store", f"{redis_url}?prefix={prefix}&client_name={client_name}"]
    fenced = FencedUpstream()

    async def main(sidecars: list[BastionServer]) -> dict[str, int]:
        async with fenced.serve():
            return await contend(sidecars, redis_url, client_name, tmp_path, seed, fenced)

    home = tmp_path / "home"
    with contextlib.ExitStack() as stack:
        sidecars = [stack.enter_context(run_bastion(tmp_path / f"sidecar{i}", [rules], home=home, extra_args=store))
                    for i in range(2)]
        done = asyncio.run(main(sidecars))
        assert all(s.proc.poll() is None for s in sidecars), "a sidecar died under chaos"

    history = attribute_forwarded([*load_history([tmp_path]), *fenced.writes])
    checked = tmp_path / "checked"  # `python tests/lockhistory.py <this dir>` replays the check
    checked.mkdir()
    (checked / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history))
    report = check_history(history)
    print(report.format(), done, sep="\n")
    assert report.ok, f"{report.format()}\nhistories: {tmp_path}"
    assert done["frozen"] > 0 and done["connections_killed"] > 0
    granted = {e["proc"] for e in history if e["op"] == "acquire" and e.get("ok")}
    assert granted == set(AGENTS)
    assert report.stats["conflicts"] > 0 and report.stats["writes_accepted"] > 0 and report.stats["releases"] > 0
    # Writes the resource sat on past the lease (about 30 a run) met a newer holder's writes: the fence stopped them.
    assert report.stats["writes_rejected"] > 0
    # Every write reached the resource with exactly one fence: the sidecars never forwarded an unguarded one.
    assert all(s["fence"] and s["fence"].isdigit() for s in fenced.seen if s["path"].endswith("/write"))
