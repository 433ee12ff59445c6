"""`bastion audit tail | show ID | export | verify`: read the audit store named by --audit (or the default).

These commands read the store directly, so they work against a fleet's shared PostgreSQL without reaching
any sidecar. Records still waiting in a sidecar's spool (its sink was down) appear once they drain.
Exit codes: 0 ok; 1 not found (`show`) or chain broken (`verify`); 2 the store cannot be read or bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bastion.config import ConfigError, add_home_args, data_settings
from bastion.outcomes import outcome_label

if TYPE_CHECKING:
    from bastion.audit.checkpoint import TrustedKey
    from bastion.audit.record import AuditRecord, Body
    from bastion.audit.sinks.base import AuditStore
    from bastion.audit.verify import ChainReport, VerifyReport

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str, *, now: float | None = None) -> int:
    """`--since`/`--until`: ISO 8601 (UTC unless it says otherwise) or an age like 90s, 15m, 2h, 7d, 1w.
    Returns Unix microseconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if m:
        base = datetime.now(UTC).timestamp() if now is None else now
        return int((base - float(m.group(1)) * _UNITS[m.group(2)]) * 1_000_000)
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected an ISO 8601 time (2026-11-24T10:00Z) or an age "
                                         "(30m, 2h, 7d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1_000_000)


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def register(sub: Any) -> None:
    parser = sub.add_parser("audit", help="read, export and verify the audit log",
                            description="Read, export and verify the audit log (--audit URL or BASTION_AUDIT).")
    actions = parser.add_subparsers(dest="audit_action", metavar="ACTION")
    actions.required = True

    tail = actions.add_parser("tail", help="recent records, one a line (oldest first)")
    add_home_args(tail)
    tail.add_argument("-n", "--lines", type=_positive, default=20, help="how many records (default 20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records as they arrive")
    tail.add_argument("--agent", help="only this agent's records")
    _add_fact_filters(tail)
    tail.add_argument("--format", choices=("text", "json"), default="text", help="json: one record per line")
    tail.set_defaults(handler=lambda a: _run(a, _tail))

    show = actions.add_parser("show", help="one record in full: identity, decision, request and response")
    add_home_args(show)
    show.add_argument("id", help="the record id (X-Bastion-Request-Id)")
    show.add_argument("--format", choices=("text", "json", "har"), default="text",
                      help="text for people (default), the record as json, or a one-entry HAR document")
    show.set_defaults(handler=lambda a: _run(a, _show))

    export = actions.add_parser("export", help="records as HAR 1.2 (browsers, HAR viewers) or JSON lines (SIEM)")
    add_home_args(export)
    export.add_argument("--format", choices=("har", "jsonl"), default="har",
                        help="har: one HAR 1.2 document (default); jsonl: one record per line, bodies included")
    export.add_argument("--agent", help="only this agent's records")
    _add_fact_filters(export)
    export.add_argument("--since", type=parse_time, help="records started at or after TIME (ISO 8601 or 30m/2h/7d)")
    export.add_argument("--until", type=parse_time, help="records started before TIME")
    export.add_argument("-o", "--output", help="write to FILE instead of standard output")
    export.set_defaults(handler=lambda a: _run(a, _export))

    verify = actions.add_parser("verify", help="check hash chains and signed checkpoints; exit 0 intact, 1 broken",
                                description="Check every writer's hash chain, and hold it against the writers' "
                                "signed checkpoints (from --store and --home): a cut-off or rewritten tail fails.")
    add_home_args(verify)
    verify.add_argument("--format", choices=("text", "json"), default="text",
                        help="json: the full report, per chain")
    verify.add_argument("--keys", metavar="FILE", type=Path,
                        help="trust only these checkpoint signing keys (one 'ed25519 BASE64 [comment]' a line, as "
                        "`bastion audit key` prints them); default: the key under --home and the keys registered "
                        "in the store (trusted on first use)")
    verify.set_defaults(handler=lambda a: _run(a, _verify))

    key = actions.add_parser("key", help="print this home's checkpoint signing key (public half, for --keys)")
    add_home_args(key, store=False, audit=False)
    key.set_defaults(handler=_key)


def _add_fact_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="only LLM calls to this model (requested or served, exact name)")
    parser.add_argument("--tool", help="only records that called this tool: an MCP tools/call, or a tool call the "
                        "model made (exact name; tools merely offered do not count)")


def _run(args: argparse.Namespace, action: Callable[[argparse.Namespace, AuditStore], Awaitable[int]]) -> int:
    from bastion.audit.sinks import StoreError, open_store
    from bastion.coord.commands import StoreMissing, require_existing_store

    try:
        url = data_settings(args).audit
        require_existing_store(url, what="audit store", flag="--audit", variable="BASTION_AUDIT")
        store = open_store(url)
    except (ConfigError, StoreError, StoreMissing) as e:
        print(f"bastion audit: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        async with store:
            return await action(args, store)

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except StoreError as e:
        print(f"bastion audit: {e}", file=sys.stderr)
    except Exception as e:  # a driver error mid-way (connection lost, locked file): a message, not a traceback
        print(f"bastion audit: {store.display_url}: {type(e).__name__}: {e}", file=sys.stderr)
    return 2


# --- tail ------------------------------------------------------------------------------------------------------

def _stamp(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def summary_line(r: AuditRecord) -> str:
    """One record on one line: time, id, agent, decision, request, status, duration, rules or error, then what
    an LLM or MCP call was about when known (`gpt-4o-mini 120→45 tok  tool=send_email`)."""
    from bastion.audit.display import tail_facts

    status = str(r.status) if r.status is not None else "-"
    tail = r.error.type if r.error is not None else ",".join(r.decision.rules) if r.decision else ""
    refusal = r.error.type if r.error is not None and r.outcome == "refused" else None
    label = outcome_label(r.effect, refusal)  # a 423 lock conflict is not an `allow`, as in /metrics
    facts = tail_facts(r.extra)
    return (f"{_stamp(r.started_us)}  {r.id}  {r.agent or r.identity.claimed or '-'}  {label or '-'}  "
            f"{r.request.method} {r.request.url}  {status}  {r.timings.total_us / 1000:.1f}ms  {tail}"
            + (f"  {facts}" if facts else "")).rstrip()


def _emit(r: AuditRecord, fmt: str, out: TextIO) -> None:
    if fmt == "json":
        out.write(json.dumps(r.to_json(with_hash=True), ensure_ascii=False) + "\n")
    else:
        out.write(summary_line(r) + "\n")


async def _tail(args: argparse.Namespace, store: AuditStore) -> int:
    from bastion.audit.sinks.base import RecordQuery, matches_facts

    token = (await store.changes(None))[1] if args.follow else None
    page = await store.query(RecordQuery(agent=args.agent, model=args.model, tool=args.tool, limit=args.lines))
    for r in reversed(page.records):
        _emit(r, args.format, sys.stdout)
    sys.stdout.flush()
    while args.follow:
        await asyncio.sleep(1.0)
        records, token = await store.changes(token)
        for r in records:
            if (args.agent is None or r.agent == args.agent) and matches_facts(r.extra, args.model, args.tool):
                _emit(r, args.format, sys.stdout)
        sys.stdout.flush()
    return 0


# --- show ------------------------------------------------------------------------------------------------------

async def _show(args: argparse.Namespace, store: AuditStore) -> int:
    record = await store.get(args.id)
    if record is None:
        print(f"bastion audit: no record with id {args.id!r} in {store.display_url}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(record.to_json(with_content=True, with_hash=True), ensure_ascii=False, indent=2))
    elif args.format == "har":
        from bastion.audit.har import har_log

        print(json.dumps(har_log([record]), ensure_ascii=False, indent=2))
    else:
        sys.stdout.write(render_record(record))
    return 0


def _ms(us: int | None) -> str:
    if us is None:
        return "-"
    return f"{us} µs" if us < 1000 else f"{us / 1000:.1f} ms"


def render_record(r: AuditRecord) -> str:
    """A record for people: facts first, then what an LLM, MCP or WebSocket exchange carried, then the request
    and response as on the wire (redacted)."""
    from bastion.audit.display import fact_sections

    t = r.timings
    ident = r.identity
    lines = [
        f"id         {r.id}",
        f"started    {_stamp(r.started_us)}   total {_ms(t.total_us)}, decision {_ms(t.decision_us)}, "
        f"upstream {_ms(t.upstream_us)}",
        f"agent      {ident.agent or '-'}   (auth {ident.auth}, client {ident.client}"
        + (f", claimed {ident.claimed}" if ident.claimed else "") + ")",
        f"outcome    {r.outcome}" + (f"   error {r.error.type}: {r.error.message}" if r.error else ""),
    ]
    if r.decision is not None:
        d = r.decision
        lines.append(f"decision   {d.effect} ({d.mode}" + (f", rules say {d.would_effect}" if d.would_effect != d.effect
                                                          else "") + f", {d.reason})   rules: "
                     + (", ".join(d.rules) or "(default)"))
        lines += [f"           error: {e}" for e in d.errors]
    if r.policy_revision:
        lines.append(f"policy     {r.policy_revision}")
    if r.upstream:
        lines.append(f"upstream   {r.upstream}")
    for lk in r.locks:
        extra = ", ".join(x for x in (f"holder {lk.holder}" if lk.holder else "", f"fence {lk.fence}" if lk.fence
                                      is not None else "", f"rule {lk.rule}" if lk.rule else "") if x)
        lines.append(f"lock       {lk.key} {lk.action}" + (f" ({extra})" if extra else ""))
    if r.approval is not None:
        a = r.approval
        lines.append(f"approval   {a.id} {a.state}" + (f" by {a.decided_by}" if a.decided_by else "")
                     + f", waited {_ms(a.waited_us)}" + (f": {a.note}" if a.note else ""))
    if r.redactions:
        lines.append(f"redacted   {', '.join(r.redactions)}")
    sections, shown = fact_sections(r.extra)
    rest = {k: v for k, v in r.extra.items() if k not in shown}
    if rest:
        lines.append(f"extra      {json.dumps(rest, ensure_ascii=False, sort_keys=True)}")
    if r.chain is not None:
        lines.append(f"chain      {r.chain.writer} #{r.chain.seq}   hash {r.hash}")
    lines += sections
    lines.append("")
    lines.append(f"> {r.request.method} {r.request.url} {r.request.http_version}")
    lines += [f"> {n}: {v}" for n, v in r.request.headers]
    lines += _body_lines(r.request.body, r.purged_us)
    if r.response is None:
        lines.append("< (no response)")
    else:
        resp = r.response
        src = "" if resp.source == "upstream" else "   (answered by Bastion)"
        lines.append(f"< {resp.http_version} {resp.status} {resp.reason}{src}")
        lines += [f"< {n}: {v}" for n, v in resp.headers]
        lines += _body_lines(resp.body, r.purged_us)
    return "\n".join(lines) + "\n"


def _body_lines(body: Body | None, purged_us: int | None) -> list[str]:
    if body is None:
        return [""]
    facts = [f"{body.size} bytes", body.mime_type or "no type"]
    if body.encoding:
        facts.append(f"content-encoding {body.encoding}")
    if body.sha256:
        facts.append(f"sha256 {body.sha256}")
    if body.truncated:
        facts.append(f"stored cut to {body.stored} bytes")
    if not body.complete:
        facts.append("transfer interrupted")
    if body.note:
        facts.append(body.note)
    out = ["", f"({', '.join(facts)})"]
    if body.content is not None:
        text = body.text
        out.append(text if text is not None else f"({len(body.content)} bytes of binary content; --format json "
                   "shows it as base64)")
    elif body.stored and purged_us is not None:
        out.append(f"(body removed by retention at {_stamp(purged_us)})")
    out.append("")
    return out


# --- export ----------------------------------------------------------------------------------------------------

async def _export(args: argparse.Namespace, store: AuditStore) -> int:
    from bastion.audit.har import write_har
    from bastion.audit.sinks.base import RecordQuery

    query = RecordQuery(agent=args.agent, model=args.model, tool=args.tool, since_us=args.since, until_us=args.until,
                        limit=200, ascending=True, bodies=True)
    out: TextIO = await asyncio.to_thread(open, args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.format == "har":
            await write_har(store.iter_records(query), out)
        else:
            async for record in store.iter_records(query):
                out.write(json.dumps(record.to_json(with_content=True, with_hash=True), ensure_ascii=False,
                                     sort_keys=True) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
    return 0


# --- verify ----------------------------------------------------------------------------------------------------

async def _verify(args: argparse.Namespace, store: AuditStore) -> int:
    from bastion.audit.checkpoint import CheckpointError, gather_evidence
    from bastion.audit.spool import read_cursor_file
    from bastion.audit.verify import verify_store
    from bastion.coord.store import StoreError as SharedStoreError

    data = data_settings(args)
    cursor = await asyncio.to_thread(read_cursor_file, data.home.spool)
    anchor = cursor if cursor is not None and cursor.sink == store.display_url else None
    try:
        evidence = await gather_evidence(data.home.path, data.store, args.keys)
    except CheckpointError as e:
        print(f"bastion audit verify: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"bastion audit verify: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except SharedStoreError as e:
        print(f"bastion audit verify: cannot read the signed checkpoints: {e}", file=sys.stderr)
        return 2
    report = await verify_store(store, anchor=anchor, witnessed=evidence.witnessed, trusted=evidence.trusted)
    if args.format == "json":
        print(json.dumps({**report.to_json(), "checkpoint_store": evidence.store}, indent=2))
    else:
        sys.stdout.write(render_report(report, store.display_url, evidence.store))
    return 0 if report.intact else 1


def _key(args: argparse.Namespace) -> int:
    from bastion.audit.checkpoint import KEY_FILE, CheckpointError, home_public_key, key_comment

    home = data_settings(args).home.path
    try:
        public = home_public_key(home)
    except (CheckpointError, OSError) as e:
        print(f"bastion audit key: {e}", file=sys.stderr)
        return 2
    if public is None:
        print(f"bastion audit key: no {home / KEY_FILE}: `bastion serve` creates it when it first writes audit "
              "records", file=sys.stderr)
        return 1
    print(public.line(key_comment(home)))
    return 0


def render_report(report: VerifyReport, where: str, checkpoint_store: str | None = None) -> str:
    lines = [_key_line(k) for k in report.keys]
    for c in report.chains:
        span = f"{_plural(c.records, 'record')} (#{c.first_seq}-#{c.last_seq})" if c.records else "no records"
        pruned = f", records up to #{c.pruned_through} removed by retention" if c.pruned_through else ""
        if c.problem is None:
            lines.append(f"chain {c.writer}: intact, {span}{pruned}; head {c.head or '-'}; {_sealed(c)}")
        else:
            lines.append(f"chain {c.writer}: BROKEN ({c.problem.kind}) after {c.records} good records: "
                         f"{c.problem.message}")
    lines += [f"writer {u.writer}: checkpoint #{u.seq} ({u.source}) not checked: it was made for {u.sink} and "
              "this store holds no record of that writer" for u in report.unchecked]
    lines += [f"checkpoint problem: {fault}" for fault in report.faults]
    if report.chains and not report.checkpoints_found:
        lines.append(f"no signed checkpoints in {checkpoint_store or 'the store'} or under --home: a cut-off or "
                     "rewritten tail cannot be detected")
    if not report.chains:
        lines.append(f"{where}: no audit records")
    elif report.intact:
        lines.append(f"{where}: intact ({_plural(report.records, 'record')} in "
                     f"{_plural(len(report.chains), 'chain')})")
    else:
        broken = sum(1 for c in report.chains if not c.intact)
        faults = f", {_plural(len(report.faults), 'unreadable checkpoint')}" if report.faults else ""
        lines.append(f"{where}: BROKEN ({broken} of {len(report.chains)} chains{faults})")
    return "\n".join(lines) + "\n"


def _key_line(k: TrustedKey) -> str:
    if k.pinned:
        return f"trusted key {k.key.key_id}: {k.source}"
    return (f"trusted key {k.key.key_id}: {k.source} (trusted on first use: whoever can write the store can add "
            "keys; pin them with --keys)")


def _sealed(c: ChainReport) -> str:
    if c.checkpoint_seq is None:
        return "no signed checkpoint"
    return f"signed checkpoint #{c.checkpoint_seq} ({_stamp(c.checkpoint_time_us or 0)}, key {c.checkpoint_key}) holds"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
