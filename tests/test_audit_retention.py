"""The retention job the server runs: it follows the current settings, prunes as they say, and survives a
store that is down."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bastion.audit.retention import run_retention
from bastion.audit.sample import sample_exchange
from bastion.audit.settings import AuditConfig
from bastion.audit.sinks import RecordQuery, open_store
from bastion.audit.verify import verify_store
from bastion.audit.writer import AuditWriter

DAY_US = 86400 * 1_000_000


async def test_the_job_follows_the_settings_and_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    writer = await AuditWriter.open(url, tmp_path / "spool")
    now = time.time_ns() // 1000
    for k in range(10):  # records 0-6 are 10 to 4 days old, 7-9 are fresh
        rec, req, resp = sample_exchange(seed=k)
        rec.started_us = now - (10 - k) * DAY_US if k < 7 else now
        assert writer.submit(rec, req, resp)
    assert await writer.flush()

    settings = AuditConfig()
    task = asyncio.create_task(run_retention(writer.store, lambda: settings, interval=0.05))
    async with open_store(url) as store:
        await asyncio.sleep(0.2)
        assert len((await store.query(RecordQuery(limit=100))).records) == 10  # no retention configured
        settings = AuditConfig(retention_records=5.5 * 86400, retention_bodies=86400)
        async with asyncio.timeout(10):
            while len((await store.query(RecordQuery(limit=100))).records) > 5:
                await asyncio.sleep(0.05)
            while not all(r.purged_us for r in (await store.query(RecordQuery(limit=100, ascending=True))).records
                          [:-3]):
                await asyncio.sleep(0.05)
        left = (await store.query(RecordQuery(limit=100, ascending=True))).records
        assert len(left) == 5  # the records 5 and 4 days old, and the fresh ones
        assert [r.purged_us is not None for r in left] == [True, True, False, False, False]
        report = await verify_store(store)
        assert report.intact and report.chains[0].pruned_through == 5
    task.cancel()
    await writer.close()


async def test_the_job_survives_a_store_that_is_down(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/missing/audit.db")  # never opened: every pass fails
    task = asyncio.create_task(run_retention(store, lambda: AuditConfig(retention_records=60), interval=0.02))
    await asyncio.sleep(0.2)
    assert not task.done()
    task.cancel()
