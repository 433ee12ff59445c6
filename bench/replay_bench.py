"""`bastion replay` throughput: records per second re-decided from an audit store of 100,000 records.

The store is filled with realistic exchanges (LLM chat calls with a few KB of JSON each way, an Authorization
header the writer redacts, `bastion.audit.sample`) by the real audit writer, spread over two agents, a few
hosts and paths. The candidate policy reads the JSON body (an `llm` model condition) on most of them, so the
figure includes fetching and parsing bodies. Baseline, in the same run: `bastion audit export --format jsonl`
of the same records (reading and decoding the store with bodies, no policy).

    .venv/bin/python bench/replay_bench.py [--records 100000] [--sinks sqlite,postgres]
                                           [--postgres postgresql://postgres@127.0.0.1:5432/test]

PostgreSQL runs in a throwaway schema that is dropped afterwards. Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_bench import drop_schema  # this directory

from bastion.audit.record import DecisionFacts
from bastion.audit.sample import sample_exchange
from bastion.audit.writer import AuditWriter

REPO = Path(__file__).resolve().parent.parent

POLICY = """\
version: 1
defaults: {effect: deny}
agents:
  support-bot: {roles: [support]}
  billing-bot: {roles: [billing]}
rules:
  - id: llm-chat
    effect: allow
    agents: ["*"]
    match: {host: api.openai.com, method: POST, path: /v1/chat/completions}
  - id: tickets
    effect: allow
    agents: [role:support]
    match: {host: tickets.example.com, path: "/tickets/**"}
"""

CANDIDATE = POLICY + """\
  - id: billing-small-models
    effect: deny
    agents: [role:billing]
    match: {llm: {model: gpt-4o-mini}}
  - id: ticket-writes-held
    effect: hold
    agents: ["*"]
    match: {host: tickets.example.com, method: POST, path: "/tickets/{id}/close"}
    approval: {approvers: [role:lead]}
users:
  lead: {roles: [lead]}
"""


async def fill(url: str, spool: Path, records: int) -> None:
    writer = await AuditWriter.open(url, spool, max_pending_bytes=4 << 30)
    for i in range(records):
        agent = "billing-bot" if i % 3 == 0 else "support-bot"
        rec, req, resp = sample_exchange(seed=i % 1000, body_words=200, agent=agent)
        if i % 5 == 4:  # a ticket call instead of a model call
            rec.request.method = "POST" if i % 10 == 9 else "GET"
            rec.request.url = f"https://tickets.example.com/tickets/{i}/close"
            rec.extra = {}
            allowed = agent == "support-bot"
            rec.decision = DecisionFacts("allow" if allowed else "deny", "allow" if allowed else "deny", "enforce",
                                         ["tickets"] if allowed else [])
        if not writer.submit(rec, req, resp):
            raise SystemExit(f"{url}: submit refused at record {i}")
        if i % 200 == 0:
            await asyncio.sleep(0)
    if not await writer.flush():
        raise SystemExit(f"{url}: flush failed")
    await writer.close()


def timed(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bastion", *args], cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("BASTION_")})
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"bastion {' '.join(args)} failed:\n{done.stderr}")
    return elapsed, done.stdout


def bench(url: str, work: Path, records: int) -> None:
    started = time.perf_counter()
    asyncio.run(fill(url, work / f"spool-{secrets.token_hex(3)}", records))
    print(f"  filled in {time.perf_counter() - started:.1f} s")
    candidate = work / "candidate.yaml"
    candidate.write_text(CANDIDATE)
    export_s, _ = timed("audit", "export", "--audit", url, "--format", "jsonl", "-o", os.devnull)
    replay_s, out = timed("replay", "--rules", str(candidate), "--audit", url, "--format", "json")
    report = json.loads(out)
    assert report["records"] == records, report["records"]
    print(f"  export (baseline): {export_s:6.1f} s  {records / export_s:8,.0f} records/s")
    print(f"  replay:            {replay_s:6.1f} s  {records / replay_s:8,.0f} records/s  "
          f"({export_s / replay_s:.2f}x the export's rate; in-process {report['records_per_second']:,}/s)")
    print(f"  report: {report['changed']:,} changed, {report['unchanged']:,} unchanged, "
          f"{report['undetermined']:,} undetermined")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--sinks", default="sqlite,postgres")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print(f"replay bench: {args.records:,} records; {platform.node()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for sink in args.sinks.split(","):
            print(sink)
            if sink == "sqlite":
                bench(f"sqlite:///{work / 'audit.db'}", work, args.records)
            elif sink == "postgres":
                schema = f"bastion_replay_bench_{secrets.token_hex(4)}"
                try:
                    bench(f"{args.postgres}?schema={schema}", work, args.records)
                finally:
                    asyncio.run(drop_schema(args.postgres, schema))
            else:
                raise SystemExit(f"unknown sink {sink!r}")


if __name__ == "__main__":
    main()
