"""`bastion approvals list | show ID | approve ID | deny ID | cancel ID | grants | revoke GRANT`.

Straight on the shared store, like `bastion locks`: the decision reaches the sidecar holding the call within
a poll, wherever that sidecar runs, without reaching any sidecar. The commands act as a user (`--user-token`
or `BASTION_USER_TOKEN`, checked against the rules' `users`, so they need `--rules`): reading needs the
viewer, approver or admin role; deciding needs a match with the approvers of the rules that held the call and
never the owner of the agent that made it; cancelling and revoking someone else's grant need `admin`.
A decision is told to the rules' `approvals.webhook`, as one taken in the API would be.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bastion.coord import open_approval_store
from bastion.coord.approvals import STATES, Approval, ApprovalError, ApprovalStore, may_decide
from bastion.coord.commands import (
    EXIT_OK,
    Refused,
    add_user_args,
    authorize_user,
    duration_arg,
    fail,
    run_on_store,
)
from bastion.coord.store import iso_time

READER_ROLES = frozenset({"viewer", "approver", "admin"})

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def safe(text: object, *, keep_newlines: bool = False) -> str:
    """Agent-controlled text made harmless for a terminal: control characters (escape sequences could
    rewrite what the approver sees) are shown as \\xNN."""
    table = dict(_CONTROL)
    if keep_newlines:
        table.pop(0x0A)
        table.pop(0x09)
    return str(text).translate(table)


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_user_args(common)

    approvals = sub.add_parser("approvals", help="list, show, approve or deny held calls")
    actions = approvals.add_subparsers(dest="approvals_action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("list", parents=[common], help="approvals, newest first, one a line")
    p.add_argument("--state", choices=STATES, help="only approvals in this state (pending: what waits for people)")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_list)

    p = actions.add_parser("show", parents=[common], help="one approval with the held call's redacted preview")
    p.add_argument("id")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_show)

    p = actions.add_parser("approve", parents=[common], help="approve a held call (it passes once when re-sent)")
    p.add_argument("id")
    p.add_argument("--comment", help="why; stored with the decision and shown in the audit")
    p.add_argument("--for", dest="grant", type=duration_arg, metavar="DURATION",
                   help="also let the same agent pass the same rules' held calls for this long (e.g. 30m)")
    p.set_defaults(handler=cmd_approve)

    p = actions.add_parser("deny", parents=[common], help="deny a held call; the reason reaches the agent")
    p.add_argument("id")
    p.add_argument("--reason", help="what the agent (and its model) is told")
    p.set_defaults(handler=cmd_deny)

    p = actions.add_parser("cancel", parents=[common], help="withdraw a pending or approved call (admin)")
    p.add_argument("id")
    p.add_argument("--reason")
    p.set_defaults(handler=cmd_cancel)

    p = actions.add_parser("grants", parents=[common], help="live grants, one a line")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_grants)

    p = actions.add_parser("revoke", parents=[common], help="end a grant now (admin, or whoever gave it)")
    p.add_argument("grant_id", metavar="GRANT")
    p.set_defaults(handler=cmd_revoke)


def _reader(args: argparse.Namespace) -> Any:
    policy, user = authorize_user(args, admin_for=None)
    if not user.roles & READER_ROLES:
        raise Refused(f"user {user.name!r} may not read approvals: that needs the viewer, approver or admin role")
    return policy, user


def _line(a: Approval) -> str:
    preview = a.preview
    parts = [a.id, a.state, f"agent={a.agent}", f"rules={','.join(a.rules)}",
             safe(f"{preview.get('method', '?')} {preview.get('url', '?')}"), f"created={iso_time(a.created_at)}"]
    if a.state == "pending":
        parts.append(f"expires_in={max(0, a.expires_at - time.time()):.0f}s")
        if a.required > 1:
            parts.append(f"approvals={a.approvals_given}/{a.required}")
    elif a.decided_by:
        parts.append(f"by={a.decided_by}")
    return " ".join(parts)


def _run(args: argparse.Namespace, action: Any) -> int:
    async def guarded(store: ApprovalStore) -> int:
        try:
            return int(await action(store))
        except ApprovalError as e:
            return fail(str(e))

    return run_on_store(args, guarded, open_approval_store)


def cmd_list(args: argparse.Namespace) -> int:
    try:
        _reader(args)
    except Refused as e:
        return fail(str(e))

    async def action(store: ApprovalStore) -> int:
        found = await store.list(args.state, args.limit)
        if args.format == "json":
            print(json.dumps({"approvals": [a.to_json() for a in found]}, ensure_ascii=False))
        else:
            for a in found:
                print(_line(a))
            if not found:
                print("no approvals" + (f" in state {args.state}" if args.state else ""), file=sys.stderr)
        return EXIT_OK

    return _run(args, action)


def cmd_show(args: argparse.Namespace) -> int:
    try:
        _reader(args)
    except Refused as e:
        return fail(str(e))

    async def action(store: ApprovalStore) -> int:
        a = await store.get(args.id)
        if a is None:
            return fail(f"no approval {args.id!r}")
        doc = a.to_json()
        if args.format == "json":
            print(json.dumps(doc, ensure_ascii=False, indent=2))
            return EXIT_OK
        print(_line(a))
        who = " and ".join("any of " + ", ".join(g) for g in a.approvers)
        distinct = f" ({a.required} distinct)" if a.required > 1 else ""
        print(f"approvers  {who}{distinct}" + (f"; not {a.owner} (owner)" if a.owner else ""))
        for v in a.votes:
            print(f"vote       {v.user} {v.verdict} at {iso_time(v.at)}" + (f": {safe(v.note)}" if v.note else ""))
        if a.joins:
            print(f"re-sent    {a.joins} time(s) while pending")
        preview = a.preview
        for name, value in preview.get("headers", []):
            print(f"header     {safe(name)}: {safe(value)}")
        size = preview.get("body_size", 0)
        print(f"body       {size} bytes, sha256 {preview.get('body_sha256', '')}"
              + (" (preview cut)" if preview.get("body_truncated") else ""))
        if preview.get("body") is not None:
            print(safe(preview["body"], keep_newlines=True))
        return EXIT_OK

    return _run(args, action)


def _decide(args: argparse.Namespace, verdict: str, note: str | None, grant: float | None) -> int:
    try:
        policy, user = authorize_user(args, admin_for=None)
    except Refused as e:
        return fail(str(e))

    async def action(store: ApprovalStore) -> int:
        from bastion.coord.notify import ApprovalNotifier
        from bastion.dashboard.approvals_api import APPROVALS

        current = await store.get(args.id)
        if current is None:
            return fail(f"no approval {args.id!r}")
        owner = getattr(policy.agents.get(current.agent), "owner", None)
        refusal = may_decide(current, user.name, user.roles, owner)
        if refusal is not None:
            return fail(refusal)
        decided = await store.decide(args.id, user.name, verdict, note, grant)  # type: ignore[arg-type]
        if decided.state in ("approved", "denied"):
            APPROVALS.labels(decided.state).inc()
            notifier = ApprovalNotifier(lambda: policy.approvals, first_delay=0.5, attempts=3)
            notifier(decided.state, decided)
            await notifier.flush(5.0)
            await notifier.close()
        if decided.state == "pending":
            print(f"{decided.id}: your approval is recorded; {decided.approvals_given} of {decided.required} given")
        else:
            extra = ""
            if decided.grant:
                until = iso_time(decided.grant["until"])
                extra = f"; grant {decided.grant['id']} lets {decided.agent} pass until {until}"
            print(f"{decided.id} {decided.state} by {user.name}{extra}")
        return EXIT_OK

    return _run(args, action)


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, "approve", args.comment, args.grant)


def cmd_deny(args: argparse.Namespace) -> int:
    return _decide(args, "deny", args.reason, None)


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        _, user = authorize_user(args, admin_for="cancel approvals")
    except Refused as e:
        return fail(str(e))

    async def action(store: ApprovalStore) -> int:
        cancelled = await store.cancel(args.id, user.name, args.reason)
        print(f"{cancelled.id} cancelled by {user.name}")
        return EXIT_OK

    return _run(args, action)


def cmd_grants(args: argparse.Namespace) -> int:
    try:
        _reader(args)
    except Refused as e:
        return fail(str(e))

    async def action(store: ApprovalStore) -> int:
        grants = await store.list_grants()
        if args.format == "json":
            print(json.dumps({"grants": [g.to_json() for g in grants]}, ensure_ascii=False))
        else:
            for g in grants:
                print(f"{g.id} agent={g.agent} rules={','.join(g.rules)} until={iso_time(g.until)} by={g.by} "
                      f"approval={g.approval_id}")
            if not grants:
                print("no live grants", file=sys.stderr)
        return EXIT_OK

    return _run(args, action)


def cmd_revoke(args: argparse.Namespace) -> int:
    try:
        _, user = authorize_user(args, admin_for=None)
    except Refused as e:
        return fail(str(e))

    async def action(store: ApprovalStore) -> int:
        grant = next((g for g in await store.list_grants() if g.id == args.grant_id), None)
        if grant is None:
            return fail(f"no live grant {args.grant_id!r}")
        if grant.by != user.name and "admin" not in user.roles:
            return fail(f"user {user.name!r} may not revoke a grant {grant.by} gave: that needs the 'admin' role")
        await store.revoke_grant(grant.id)
        print(f"revoked {grant.id} (agent {grant.agent}, rules {','.join(grant.rules)})")
        return EXIT_OK

    return _run(args, action)
