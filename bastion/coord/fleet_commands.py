"""`bastion agents | milestones | budgets`: the fleet's kill switch, milestones and budgets, on the shared store.

Like `bastion locks` (`bastion.coord.commands`, whose flags, user check and store handling these reuse), the
commands open the store URL the sidecars share, so an operator stops a runaway agent on every sidecar at once
without reaching any of them: each sidecar reads the pauses from the store within about a second.

- `agents list`: every agent of the rules, its roles, status and pause (its own or the `*` one). Any user.
- `agents pause NAME|* [--reason TEXT] [--action pause|hold]`, `agents resume NAME|*`: the `admin` role.
- `milestones list` (any user), `milestones complete KEY [--ttl 7d]` and `milestones clear KEY` (admin).
- `budgets list`: each budget of the rules with its current windows from the store. Any user.

Who did it is recorded as `user:<name>` (the pause's `paused_by`, the milestone's `by`), so a pause set by a
person is told apart from one set by a guard (`guard:<id>`). Every failure is one line on stderr and exit
status 1; a SQLite store that does not exist is never created here (exit 2), for the reason given in
`bastion.coord.commands`.

Pause reasons and milestone keys reach the store from agents' URLs and guards, so text output quotes any value
that holds spaces or characters that are not printable: nothing a terminal would interpret gets printed raw.
The helpers `agents_report` and `budgets_report` build the JSON that the admin API answers too, so the CLI
and `GET /api/budgets` always agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from bastion.coord import open_fleet_store
from bastion.coord.commands import (
    EXIT_OK,
    Refused,
    add_user_args,
    authorize,
    authorize_user,
    duration_arg,
    fail,
    run_on_store,
)
from bastion.coord.fleet import ALL_AGENTS, MAX_REASON, BudgetUsage, FleetStore, Pause
from bastion.coord.store import iso_time

if TYPE_CHECKING:
    from bastion.policy.engine import Policy

DEFAULT_MILESTONE_TTL = 7 * 24 * 3600.0
"""How long a milestone completed by hand lives unless `--ttl` (or the API's `ttl`) says otherwise: long enough
to unblock a fleet over a weekend, short enough that a forgotten one does not gate work forever."""


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_user_args(common)

    agents = sub.add_parser("agents", help="list agents with their pause state; pause or resume them fleet-wide")
    actions = agents.add_subparsers(dest="agents_action", metavar="ACTION")
    actions.required = True
    p = actions.add_parser("list", parents=[common], help="every agent of the rules and its pause (any user)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_agents_list)
    p = actions.add_parser("pause", parents=[common],
                           help="stop an agent's calls on every sidecar; * stops every agent (admin)")
    p.add_argument("name", help="an agent of the rules, or * for every agent")
    p.add_argument("--reason", default="", help=f"why, shown to the agent and to people (at most {MAX_REASON} "
                                                "characters)")
    p.add_argument("--action", choices=("pause", "hold"), default="pause",
                   help="pause: refuse its calls (403 agent_paused); hold: hold each call for a person")
    p.set_defaults(handler=cmd_agents_pause)
    p = actions.add_parser("resume", parents=[common], help="lift an agent's (or the *) pause (admin)")
    p.add_argument("name", help="the paused agent, or *")
    p.set_defaults(handler=cmd_agents_resume)

    milestones = sub.add_parser("milestones", help="list, complete or clear milestones (`requires` / `complete`)")
    actions = milestones.add_subparsers(dest="milestones_action", metavar="ACTION")
    actions.required = True
    p = actions.add_parser("list", parents=[common], help="every live milestone, one a line (any user)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_milestones_list)
    p = actions.add_parser("complete", parents=[common],
                           help="record a milestone by hand, unblocking the rules that require it (admin)")
    p.add_argument("key", help="the milestone key, as the rules' `requires` renders it (e.g. extracted:42)")
    p.add_argument("--ttl", type=duration_arg, default=DEFAULT_MILESTONE_TTL, metavar="DURATION",
                   help="how long the milestone lives (default 7d, at most 30d)")
    p.set_defaults(handler=cmd_milestones_complete)
    p = actions.add_parser("clear", parents=[common], help="remove a milestone (admin)")
    p.add_argument("key", help="the milestone key, as `milestones list` shows it")
    p.set_defaults(handler=cmd_milestones_clear)

    budgets = sub.add_parser("budgets", help="list the budgets of the rules and their current usage")
    actions = budgets.add_subparsers(dest="budgets_action", metavar="ACTION")
    actions.required = True
    p = actions.add_parser("list", parents=[common], help="each budget and its current windows (any user)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_budgets_list)


# -- what the CLI and the admin API both answer -----------------------------------------------------------------


def pause_map(pauses: Iterable[Pause]) -> dict[str, Pause]:
    return {p.agent: p for p in pauses}


def pause_of(pauses: dict[str, Pause], agent: str) -> Pause | None:
    """The pause that stops `agent`: its own, else the `*` one (the same precedence as the sidecars')."""
    return pauses.get(agent) or pauses.get(ALL_AGENTS)


def agents_report(policy: Policy, pauses: Iterable[Pause]) -> dict[str, Any]:
    """`bastion agents list --format json`: each agent of the rules with the pause applying to it, the `*`
    pause, and every pause in force (one of an agent since removed from the rules must stay visible, or nobody
    would know to lift it)."""
    found = pause_map(pauses)
    agents = []
    for name, spec in sorted(policy.agents.items()):
        pause = pause_of(found, name)
        agents.append({"name": name, "roles": sorted(spec.roles), "status": spec.status,
                       "paused": pause.to_json() if pause else None})
    star = found.get(ALL_AGENTS)
    return {"agents": agents, "all_paused": star.to_json() if star else None,
            "pauses": [p.to_json() for p in sorted(found.values(), key=lambda p: p.agent)]}


def budgets_report(policy: Policy, usage: Iterable[BudgetUsage]) -> list[dict[str, Any]]:
    """Each budget of the rules with its current windows (`BudgetUsage.to_json()`); a budget nothing has used
    yet in this window has none. Windows of budgets no longer in the rules are left out: their limits are
    no longer enforced."""
    windows: dict[str, list[BudgetUsage]] = {}
    for u in usage:
        windows.setdefault(u.budget, []).append(u)
    out = []
    for budget in policy.budgets:
        spec = budget.to_json()
        out.append({"id": budget.id, "unit": budget.unit, "limit": budget.limit, "per": budget.per,
                    "agents": list(budget.selectors), "key": spec.get("key", "{agent}"),
                    "description": spec.get("description"), "source": budget.source,
                    "usage": [u.to_json() for u in windows.get(budget.id, [])]})
    return out


def fmt_span(seconds: float) -> str:
    """A window length as people write it in the rules: 3600 -> `1h`, 5400 -> `1h30m`, 86400 -> `1d`."""
    if seconds < 1 or seconds != int(seconds):
        return f"{seconds:g}s"
    rest = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def show(text: str) -> str:
    """A value from the store, safe on one line of a terminal: as is when plain, else JSON-quoted with every
    character that is not printable escaped (JSON leaves DEL, C1 controls and line separators raw)."""
    if text and text.isprintable() and not any(c.isspace() for c in text) and '"' not in text:
        return text
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in quoted)


def _pause_fields(pause: Pause) -> str:
    via = " via=*" if pause.agent == ALL_AGENTS else ""
    return (f"paused={pause.action}{via} paused_by={show(pause.paused_by)} since={iso_time(pause.paused_at)} "
            f"reason={show(pause.reason)}")


# -- agents -------------------------------------------------------------------------------------------------------


def cmd_agents_list(args: argparse.Namespace) -> int:
    try:
        policy = authorize(args, admin_for=None)
    except Refused as e:
        return fail(str(e))

    async def action(store: FleetStore) -> int:
        pauses = await store.list_pauses()
        if args.format == "json":
            print(json.dumps(agents_report(policy, pauses), ensure_ascii=False))
            return EXIT_OK
        found = pause_map(pauses)
        if ALL_AGENTS in found:
            print(f"* (every agent) {_pause_fields(found[ALL_AGENTS])}")
        for name, spec in sorted(policy.agents.items()):
            pause = pause_of(found, name)
            state = _pause_fields(pause) if pause else "paused=no"
            print(f"{show(name)} roles={','.join(sorted(spec.roles)) or '-'} status={spec.status} {state}")
        for name in sorted(found.keys() - policy.agents.keys() - {ALL_AGENTS}):
            print(f"{show(name)} (not in the rules) {_pause_fields(found[name])}")
        if not policy.agents:
            print("the rules define no agents", file=sys.stderr)
        return EXIT_OK

    return run_on_store(args, action, open_fleet_store)


def cmd_agents_pause(args: argparse.Namespace) -> int:
    try:
        policy, user = authorize_user(args, admin_for="pause agents")
    except Refused as e:
        return fail(str(e))
    name = args.name
    if name != ALL_AGENTS and name not in policy.agents:
        return fail(f"unknown agent {name!r}: the rules define no such agent (use * to pause every agent)")
    if len(args.reason) > MAX_REASON:
        return fail(f"the reason is longer than {MAX_REASON} characters")

    async def action(store: FleetStore) -> int:
        pause = await store.pause(name, args.reason, f"user:{user.name}", args.action)
        who = "every agent (*)" if name == ALL_AGENTS else show(name)
        verb = "paused" if pause.action == "pause" else "holding every call of"
        reason = f": {show(pause.reason)}" if pause.reason else ""
        print(f"{verb} {who} on every sidecar, by {pause.paused_by}{reason}")
        return EXIT_OK

    return run_on_store(args, action, open_fleet_store)


def cmd_agents_resume(args: argparse.Namespace) -> int:
    try:
        authorize(args, admin_for="resume agents")
    except Refused as e:
        return fail(str(e))
    name = args.name

    async def action(store: FleetStore) -> int:
        lifted = await store.resume(name)
        if lifted is None:
            what = "every agent (*) is" if name == ALL_AGENTS else f"agent {show(name)} is"
            return fail(f"{what} not paused: nothing to resume")
        who = "every agent (*)" if name == ALL_AGENTS else show(name)
        print(f"resumed {who} (paused by {show(lifted.paused_by)} since {iso_time(lifted.paused_at)}, "
              f"reason {show(lifted.reason)})")
        if name != ALL_AGENTS:
            star = pause_map(await store.list_pauses()).get(ALL_AGENTS)
            if star is not None:
                print(f"note: every agent is still paused by {show(star.paused_by)} (*): "
                      f"`bastion agents resume '*'` lifts that", file=sys.stderr)
        return EXIT_OK

    return run_on_store(args, action, open_fleet_store)


# -- milestones ---------------------------------------------------------------------------------------------------


def cmd_milestones_list(args: argparse.Namespace) -> int:
    try:
        authorize(args, admin_for=None)
    except Refused as e:
        return fail(str(e))

    async def action(store: FleetStore) -> int:
        found = await store.list_milestones()
        if args.format == "json":
            print(json.dumps({"milestones": [m.to_json() for m in found]}, ensure_ascii=False))
            return EXIT_OK
        now = time.time()
        for m in found:
            request = f" request_id={show(m.request_id)}" if m.request_id else ""
            print(f"{show(m.key)} by={show(m.by)} completed_at={iso_time(m.completed_at)} "
                  f"expires_in={fmt_span(max(1.0, round(m.expires_at - now)))}{request}")
        if not found:
            print("no live milestones", file=sys.stderr)
        return EXIT_OK

    return run_on_store(args, action, open_fleet_store)


def cmd_milestones_complete(args: argparse.Namespace) -> int:
    try:
        _, user = authorize_user(args, admin_for="complete milestones")
    except Refused as e:
        return fail(str(e))

    async def action(store: FleetStore) -> int:
        done = await store.complete_milestone(args.key, args.ttl, f"user:{user.name}")
        print(f"completed {show(done.key)} by {done.by}; it lives until {iso_time(done.expires_at)}")
        return EXIT_OK

    return run_on_store(args, action, open_fleet_store)


def cmd_milestones_clear(args: argparse.Namespace) -> int:
    try:
        authorize(args, admin_for="clear milestones")
    except Refused as e:
        return fail(str(e))

    async def action(store: FleetStore) -> int:
        gone = await store.clear_milestone(args.key)
        if gone is None:
            return fail(f"no live milestone {show(args.key)}")
        print(f"cleared {show(gone.key)} (completed by {show(gone.by)} at {iso_time(gone.completed_at)})")
        return EXIT_OK

    return run_on_store(args, action, open_fleet_store)


# -- budgets ------------------------------------------------------------------------------------------------------


def cmd_budgets_list(args: argparse.Namespace) -> int:
    try:
        policy = authorize(args, admin_for=None)
    except Refused as e:
        return fail(str(e))

    async def action(store: FleetStore) -> int:
        report = budgets_report(policy, await store.list_budgets())
        if args.format == "json":
            print(json.dumps({"budgets": report}, ensure_ascii=False))
            return EXIT_OK
        for b in report:
            print(f"{b['id']} unit={b['unit']} limit={b['limit']} per={fmt_span(b['per'])} "
                  f"agents={','.join(b['agents'])} key={show(b['key'])}")
            for u in b["usage"]:
                print(f"  key={show(u['key'])} used={u['used']} reserved={u['reserved']} "
                      f"remaining={u['remaining']} resets_at={u['resets_at']}")
            if not b["usage"]:
                print(f"  used=0 reserved=0 remaining={b['limit']} (nothing used in the current window)")
        if not report:
            print("the rules define no budgets", file=sys.stderr)
        return EXIT_OK

    return run_on_store(args, action, open_fleet_store)
