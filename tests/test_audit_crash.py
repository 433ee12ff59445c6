"""Crash safety: SIGKILL a process while it submits records; everything it had submitted more than a second
before the kill must be in the store once a new writer has recovered the spool, and the chain must verify."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

from bastion.audit.sinks import RecordQuery, open_store
from bastion.audit.verify import verify_store
from bastion.audit.writer import AuditWriter

ROOT = Path(__file__).resolve().parent.parent

SUBMITTER = textwrap.dedent("""
    import asyncio, sys
    from bastion.audit.sample import sample_exchange
    from bastion.audit.writer import AuditWriter

    async def main(url, spool):
        writer = await AuditWriter.open(url, spool)
        print("ready", flush=True)
        i = 0
        while True:
            rec, req, resp = sample_exchange(seed=i, body_words=60)
            if writer.submit(rec, req, resp):
                print(rec.id, flush=True)  # printed only after submit() returned
            i += 1
            await asyncio.sleep(0.001)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


async def run_and_kill(script: Path, url: str, spool: Path, run_for: float) -> tuple[list[tuple[float, str]], float]:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), url, str(spool), cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
    seen: list[tuple[float, str]] = []
    deadline = time.monotonic() + run_for
    while time.monotonic() < deadline:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 1)
        except TimeoutError:
            continue
        seen.append((time.monotonic(), line.decode().strip()))
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return seen, killed_at


async def test_sigkill_loses_nothing_submitted_more_than_a_second_earlier(tmp_path: Path) -> None:
    script = tmp_path / "submitter.py"
    script.write_text(SUBMITTER)
    url = f"sqlite:///{tmp_path}/audit.db"
    spool = tmp_path / "spool"

    seen, killed_at = await run_and_kill(script, url, spool, 2.5)
    old_enough = [rid for t, rid in seen if t < killed_at - 1.0]
    assert len(old_enough) > 100

    # A second life of the same sidecar: recovers the spool, drains it, keeps writing the same chain.
    seen2, killed_at2 = await run_and_kill(script, url, spool, 1.5)
    old_enough += [rid for t, rid in seen2 if t < killed_at2 - 1.0]

    writer = await AuditWriter.open(url, spool)
    async with asyncio.timeout(30):
        assert await writer.flush()
    await writer.close()
    async with open_store(url) as store:
        stored = {r.id async for r in store.iter_records(RecordQuery(limit=500))}
        missing = [rid for rid in old_enough if rid not in stored]
        assert not missing, f"{len(missing)} records lost"
        report = await verify_store(store)
        assert report.intact, report.to_json()
        assert len(report.chains) == 1  # both lives wrote one chain
