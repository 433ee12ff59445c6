"""`bastion replay --rules CANDIDATE`: what the candidate would have decided for the recorded traffic.

Reads the audit store named by --audit (or the default) directly, streaming it oldest first, so it works
against a fleet's shared PostgreSQL without any sidecar running. Exit codes: 0 no decision would change,
1 some would, 2 the store cannot be read, 3 the candidate policy is invalid. Undetermined calls do not change
the exit code; the report counts them and says why (`bastion.policy.replay`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bastion.audit.commands import parse_time
from bastion.config import ConfigError, add_home_args, add_rules_arg, data_settings, resolve_rules

if TYPE_CHECKING:
    from bastion.audit.sinks.base import AuditStore
    from bastion.policy.replay import Replay

EXIT_OK, EXIT_CHANGED, EXIT_STORE, EXIT_INVALID = 0, 1, 2, 3
PAGE = 500  # records per read: bounded memory, few round trips


def register(sub: Any) -> None:
    p = sub.add_parser("replay", help="re-decide recorded requests under a candidate policy (exit 0 no change, "
                       "1 changes)", description="Re-evaluate the requests of the audit log under a candidate "
                       "policy and report every decision that would change, grouped by rule and by agent.")
    add_rules_arg(p, required=True)
    add_home_args(p)
    p.add_argument("--since", type=parse_time, help="records started at or after TIME (ISO 8601 or 30m/2h/7d)")
    p.add_argument("--until", type=parse_time, help="records started before TIME")
    p.add_argument("--agent", help="only this agent's records")
    p.add_argument("--examples", type=int, default=3, metavar="N",
                   help="request ids shown per group of changes (default 3)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from bastion.audit.sinks import StoreError, open_store
    from bastion.coord.commands import StoreMissing, require_existing_store
    from bastion.policy.load import PolicyLoadError, load_policy
    from bastion.policy.replay import Replay

    try:
        policy = load_policy(resolve_rules(args.rules))
    except PolicyLoadError as e:
        for issue in e.issues:
            print(issue, file=sys.stderr)
        print(f"candidate policy invalid: {len(e.issues)} problem(s)", file=sys.stderr)
        return EXIT_INVALID
    try:
        url = data_settings(args).audit
        require_existing_store(url, what="audit store", flag="--audit", variable="BASTION_AUDIT")
        store = open_store(url)
    except (ConfigError, StoreError, StoreMissing) as e:
        print(f"bastion replay: {e}", file=sys.stderr)
        return EXIT_STORE
    replay = Replay(policy, examples=max(0, args.examples))
    try:
        asyncio.run(_read(store, replay, args))
    except StoreError as e:
        print(f"bastion replay: {e}", file=sys.stderr)
        return EXIT_STORE
    except Exception as e:  # a driver error mid-way (connection lost): a message, not a traceback
        print(f"bastion replay: {store.display_url}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_STORE
    report = replay.report()
    report["audit"] = store.display_url
    if args.format == "json":
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return EXIT_CHANGED if report["changed"] else EXIT_OK


async def _read(store: AuditStore, replay: Replay, args: argparse.Namespace) -> None:
    from bastion.audit.sinks.base import RecordQuery

    query = RecordQuery(agent=args.agent, since_us=args.since, until_us=args.until, limit=PAGE, ascending=True,
                        bodies=True)
    async with store:
        async for record in store.scan(query):
            replay.add(record)


def _stamp(us: int | None) -> str:
    return "-" if us is None else datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_report(r: dict[str, Any]) -> None:
    files = ", ".join(r["candidate"]["files"])
    print(f"candidate: {files} (revision {r['candidate']['revision'][:12]})")
    print(f"audit: {r['audit']}, records from {_stamp(r['first_started_us'])} to {_stamp(r['last_started_us'])}")
    print(f"{r['records']:,} records: {r['unchanged']:,} unchanged, {r['changed']:,} changed, "
          f"{r['undetermined']:,} undetermined, {r['skipped']:,} skipped")
    if r["changes"]:
        print(f"\nchanged ({r['changed']:,}):")
        width = max(len(c["change"]) for c in r["changes"])
        for c in r["changes"]:
            rules = c["to_rules"] if c["from_rules"] == c["to_rules"] else f"{c['from_rules']} → {c['to_rules']}"
            print(f"  {c['change']:<{width}}  {c['count']:>7,}  rule {rules}  e.g. {' '.join(c['examples'])}")
    if r["undetermined_reasons"]:
        print(f"\nundetermined ({r['undetermined']:,}):")
        for u in r["undetermined_reasons"]:
            print(f"  {u['count']:>7,}  {u['reason']}  e.g. {' '.join(u['examples'])}")
    touched = {name: a for name, a in r["agents"].items() if a["changed"] or a["undetermined"]}
    if touched:
        print("\nby agent:")
        for name, a in touched.items():
            kinds = ", ".join(f"{k} {n:,}" for k, n in a["changed"].items())
            print(f"  {name}: {a['replayed']:,} replayed, {sum(a['changed'].values()):,} changed"
                  + (f" ({kinds})" if kinds else "") + f", {a['undetermined']:,} undetermined")
    if r["skipped_reasons"]:
        print(f"\nskipped ({r['skipped']:,}):")
        for reason, n in r["skipped_reasons"].items():
            print(f"  {n:>7,}  {reason}")
    print(f"\nreplayed {r['records']:,} records in {r['seconds']:.2f} s ({r['records_per_second']:,} records/s); "
          "open an example with `bastion audit show ID`")
