"""Audit writer throughput: records per second from `submit` to "in the sink", per sink.

Records are realistic LLM chat exchanges (JSON request and response of a few KB each, an Authorization header
to redact), built before the clock starts. For each sink the writer is opened on a fresh spool, N records are
submitted as fast as the event loop allows, and the clock stops when `flush()` says all of them are in the
sink. Also reported: the time `submit` itself costs the event loop (what the proxy pays per request).

    python bench/audit_bench.py [--records 20000] [--body-words 400] [--sinks sqlite,postgres,jsonl]
                                [--postgres postgresql://postgres@127.0.0.1:5432/test]

PostgreSQL runs in a throwaway schema that is dropped afterwards. Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bastion.audit.sample import sample_exchange
from bastion.audit.writer import AuditWriter


async def run(url: str, spool: Path, records: int, body_words: int) -> dict[str, float]:
    batch = [sample_exchange(seed=i, body_words=body_words) for i in range(records)]
    body_bytes = statistics.mean(len(req.raw) + len(resp.raw) for _, req, resp in batch)
    writer = await AuditWriter.open(url, spool, max_pending_bytes=4 << 30)
    submit_ns: list[int] = []
    start = time.perf_counter()
    for i, (rec, req, resp) in enumerate(batch):
        t = time.perf_counter_ns()
        ok = writer.submit(rec, req, resp)
        submit_ns.append(time.perf_counter_ns() - t)
        if not ok:
            raise SystemExit(f"{url}: submit refused at record {i}")
        if i % 200 == 0:
            await asyncio.sleep(0)  # let the drain task run, as a busy proxy loop would
    if not await writer.flush():
        raise SystemExit(f"{url}: flush failed")
    elapsed = time.perf_counter() - start
    await writer.close()
    submit_ns.sort()
    return {"rate": records / elapsed, "elapsed": elapsed, "body_kb": body_bytes / 1024,
            "submit_p50_us": submit_ns[len(submit_ns) // 2] / 1000,
            "submit_p99_us": submit_ns[int(len(submit_ns) * 0.99)] / 1000}


async def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--body-words", type=int, default=400, help="~6 bytes per word, per body (default ~2.4 KB)")
    parser.add_argument("--sinks", default="sqlite,postgres,jsonl")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print(f"{args.records} records per sink, bodies of ~{args.body_words * 6 / 1024:.1f} KB each way")
    print(f"{'sink':<10} {'records/s':>10} {'seconds':>8} {'KB bodies':>10} {'submit p50':>11} {'submit p99':>11}")
    with tempfile.TemporaryDirectory(prefix="bastion-audit-bench-") as tmp:
        base = Path(tmp)
        for sink in args.sinks.split(","):
            schema = None
            if sink == "sqlite":
                url = f"sqlite:///{base}/audit.db"
            elif sink == "jsonl":
                url = f"jsonl:///{base}/jsonl"
            elif sink == "postgres":
                schema = f"bastion_audit_bench_{secrets.token_hex(4)}"
                url = f"{args.postgres}?schema={schema}"
            else:
                raise SystemExit(f"unknown sink {sink!r}")
            try:
                r = await run(url, base / f"spool-{sink}", args.records, args.body_words)
            finally:
                if schema:
                    await drop_schema(args.postgres, schema)
            print(f"{sink:<10} {r['rate']:>10.0f} {r['elapsed']:>8.2f} {r['body_kb']:>10.1f} "
                  f"{r['submit_p50_us']:>9.1f}µs {r['submit_p99_us']:>9.1f}µs")


if __name__ == "__main__":
    asyncio.run(main())
