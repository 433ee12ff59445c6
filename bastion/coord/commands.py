"""`bastion locks list | release KEY | handoff KEY --to AGENT`: task locks, straight on the shared store.

The commands open the same store URL as the sidecars (`--store`, `BASTION_STORE`, default the SQLite file
under `--home`), so an operator can act on a whole fleet without reaching any sidecar. They act as a user:
`--user-token` (or `BASTION_USER_TOKEN`, which stays out of `ps`) is checked against the rules' `users`; any
valid user may list, releasing and handing off need the `admin` role. Every failure is one clear line on
stderr and exit status 1, never a traceback; exit status 2 when the SQLite store named does not exist.

These commands never create a store: a missing file means a wrong `--home` (or none given, so the default
`~/.bastion`), and an empty store made there would answer "no live locks" while the sidecars' store holds some.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.config import (
    DEFAULT_HOME,
    ConfigError,
    add_home_args,
    add_rules_arg,
    data_settings,
    resolve_rules,
    sqlite_path,
)
from bastion.coord import open_store
from bastion.coord.store import (
    DEFAULT_HANDOFF_TTL,
    LockInfo,
    LockStore,
    StoreUnavailable,
    iso_time,
)

if TYPE_CHECKING:
    from bastion.policy.engine import Policy, UserSpec

EXIT_OK, EXIT_FAIL, EXIT_NO_STORE = 0, 1, 2
ADMIN_ROLE = "admin"


def add_user_args(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that acts on the shared store as a user."""
    add_home_args(parser)  # --audit too: every data command takes the same data flags
    add_rules_arg(parser)
    parser.add_argument("--user-token", metavar="TOKEN",
                        help="act as the user with this token (BASTION_USER_TOKEN; the variable keeps it out of ps)")


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_user_args(common)

    locks = sub.add_parser("locks", help="list, release or hand off task locks")
    actions = locks.add_subparsers(dest="locks_action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("list", parents=[common], help="every live lock, one a line (any user)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_list)

    p = actions.add_parser("release", parents=[common], help="free a lock whoever holds it (admin)")
    p.add_argument("key", help="the lock key, as `locks list` shows it")
    p.set_defaults(handler=cmd_release)

    p = actions.add_parser("handoff", parents=[common],
                           help="pass a lock to another agent, which claims it with its next request (admin)")
    p.add_argument("key", help="the lock key, as `locks list` shows it")
    p.add_argument("--to", required=True, metavar="AGENT", help="the agent that takes the lock over")
    p.add_argument("--ttl", type=duration_arg, default=DEFAULT_HANDOFF_TTL, metavar="DURATION",
                   help="how long the offer waits for the agent before the lock frees itself (default 5m)")
    p.set_defaults(handler=cmd_handoff)


def duration_arg(text: str) -> float:
    from bastion.policy.schema import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fail(message: str, code: int = EXIT_FAIL) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


class Refused(Exception):
    """The command may not run: the message says why and what to do."""


class StoreMissing(Exception):
    """A control command was pointed at a SQLite store (or JSONL audit directory) that does not exist."""


def require_existing_store(url: str, *, what: str, flag: str, variable: str) -> None:
    """Raise StoreMissing when `url` names a local file or directory that is not there. Redis and PostgreSQL
    URLs pass: they answer or fail to connect, and never appear empty because of a typo in a path."""
    if url.startswith("sqlite:"):
        path = sqlite_path(url)
    elif url.startswith("jsonl:///"):
        path = Path(url[len("jsonl:///"):]).expanduser()
    else:
        return
    if path.exists():
        return
    raise StoreMissing(
        f"the {what} {path} does not exist: no sidecar has written there, and this command does not create it. "
        f"Point at the sidecars' data with --home DIR or BASTION_HOME (default {DEFAULT_HOME}, whose "
        f"bastion.db holds the store and the audit), or name it with {flag} URL or {variable}.")


def authorize(args: argparse.Namespace, *, admin_for: str | None) -> Policy:
    """The rules, once the user token is valid (and, for `admin_for`, the user has the admin role)."""
    return authorize_user(args, admin_for=admin_for)[0]


def authorize_user(args: argparse.Namespace, *, admin_for: str | None) -> tuple[Policy, UserSpec]:
    """The rules and the acting user, once the user token is valid (see `authorize`)."""
    from bastion.policy.load import PolicyLoadError, load_policy

    token = args.user_token or os.environ.get("BASTION_USER_TOKEN")
    if not token:
        raise Refused("this command acts as a user: pass --user-token TOKEN or set BASTION_USER_TOKEN")
    rules = resolve_rules(args.rules)
    if not rules:
        raise Refused("checking the user token needs the rules: pass --rules PATH or set BASTION_RULES")
    try:
        policy = load_policy(rules)
    except PolicyLoadError as e:
        raise Refused(f"the rules are invalid:\n{e}") from None
    user = policy.authenticate_user(token)
    if user is None:
        raise Refused("the user token is not valid for these rules")
    if admin_for and ADMIN_ROLE not in user.roles:
        raise Refused(f"user {user.name!r} may not {admin_for}: that needs the {ADMIN_ROLE!r} role")
    return policy, user


def run_on_store(args: argparse.Namespace, action: Callable[[Any], Awaitable[int]],
                 opener: Callable[[str], Any] = open_store) -> int:
    """Open the store (`opener(url)`: the lock store by default), run `action` on it, close it; store trouble
    becomes one line and exit 1, a SQLite store that does not exist (never created here) exit 2."""
    try:
        data = data_settings(args)
        require_existing_store(data.store, what="store", flag="--store", variable="BASTION_STORE")
        store = opener(data.store)
    except StoreMissing as e:
        return fail(str(e), EXIT_NO_STORE)
    except (ConfigError, OSError) as e:
        return fail(str(e))

    async def main() -> int:
        async with store:
            return await action(store)

    try:
        return asyncio.run(main())
    except (StoreUnavailable, ValueError) as e:  # ValueError: a key the store refuses (empty, too long)
        return fail(str(e))


def _show(key: str) -> str:
    """Keys come from URLs: quote one that would break the one-lock-a-line format."""
    return json.dumps(key, ensure_ascii=False) if not key.isprintable() or any(c.isspace() for c in key) else key


def _line(lock: LockInfo, now: float) -> str:
    parts = [_show(lock.key), f"holder={lock.holder}", f"fence={lock.fence}",
             f"expires_in={max(0.0, lock.expires_at - now):.0f}s", f"acquired_at={iso_time(lock.acquired_at)}"]
    if lock.handoff_to:
        parts.append(f"handoff_to={lock.handoff_to}")
    return " ".join(parts)


def cmd_list(args: argparse.Namespace) -> int:
    try:
        authorize(args, admin_for=None)
    except Refused as e:
        return fail(str(e))

    async def action(store: LockStore) -> int:
        locks = await store.list_locks()
        if args.format == "json":
            print(json.dumps({"locks": [lock.to_json() for lock in locks]}, ensure_ascii=False))
        else:
            now = time.time()
            for lock in locks:
                print(_line(lock, now))
            if not locks:
                print("no live locks", file=sys.stderr)
        return EXIT_OK

    return run_on_store(args, action)


def cmd_release(args: argparse.Namespace) -> int:
    try:
        authorize(args, admin_for="release locks")
    except Refused as e:
        return fail(str(e))

    async def action(store: LockStore) -> int:
        freed = await store.admin_release(args.key)
        if freed is None:
            return fail(f"no live lock {_show(args.key)}")
        offered = f", offered to {freed.handoff_to}" if freed.handoff_to else ""
        print(f"released {_show(freed.key)} (held by {freed.holder}{offered}, fence {freed.fence})")
        return EXIT_OK

    return run_on_store(args, action)


def cmd_handoff(args: argparse.Namespace) -> int:
    try:
        policy = authorize(args, admin_for="hand off locks")
    except Refused as e:
        return fail(str(e))
    agent = policy.agents.get(args.to)
    if agent is None:
        return fail(f"unknown agent {args.to!r}: the rules define no such agent")
    if agent.status == "retired":
        return fail(f"agent {args.to!r} is retired and cannot take a lock over")

    async def action(store: LockStore) -> int:
        offer = await store.handoff(args.key, args.to, args.ttl)
        if offer is None:
            return fail(f"no live lock {_show(args.key)}: only a held lock can be handed off")
        print(f"handed off {_show(offer.key)} from {offer.holder} to {offer.handoff_to}: its next request "
              f"claims the lock; the offer lapses at {iso_time(offer.expires_at)}")
        return EXIT_OK

    return run_on_store(args, action)
