"""What the dashboard's forms post to: login, logout, approval decisions, lock release and handoff, reload, and
the fleet's pause / resume and milestone complete / clear (`fleet_api` holds the checks they share with the API).

Each handler does the same checks as its JSON twin (it calls the same functions), then redirects back with a
short notice (POST, redirect, GET), so a reload never re-sends a decision. The auth middleware has already
checked the session and its CSRF token for every one of them except `/login`, which checks the token itself.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp_jinja2
from aiohttp import web

from bastion.coord.approvals import MAX_NOTE, ApprovalError
from bastion.coord.store import StoreUnavailable
from bastion.dashboard.approvals_api import decide_as, parse_grant
from bastion.dashboard.auth import USER, same_origin
from bastion.dashboard.keys import LOCK_STORE, POLICY_SOURCE, SESSIONS
from bastion.dashboard.session import clear_cookie, set_cookie

log = logging.getLogger("bastion.dashboard")


def _back(path: str, notice: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"{path}?{urlencode({'notice': notice[:300]})}")


def _safe_next(value: str | None) -> str:
    """Only a path of this listener: never `//host`, a scheme, a backslash or a control character (URL
    libraries drop tabs and newlines, so `/\t/host` would become `//host`): no open redirect."""
    from urllib.parse import urlsplit

    if (not value or not value.startswith("/") or value.startswith("//") or "\\" in value
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)):
        return "/"
    parts = urlsplit(value)
    return "/" if parts.scheme or parts.netloc else value


async def login_page(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("login.html", request, {
        "next": _safe_next(request.query.get("next")), "error": None, "active": "login"})


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    token = str(form.get("token", ""))[:4096].strip()
    target = _safe_next(str(form.get("next", "")))
    policy = request.app[POLICY_SOURCE].policy
    user = policy.authenticate_user(token) if token and same_origin(request) else None
    if user is None:
        log.info("dashboard login refused from %s", request.remote)
        return aiohttp_jinja2.render_template("login.html", request, {
            "next": target, "error": "That token is not valid for these rules.", "active": "login"}, status=401)
    value, _ = request.app[SESSIONS].issue(user.name, user.token_sha256)  # always a new session: no fixation
    log.info("dashboard login: %s", user.name)
    resp = web.HTTPSeeOther(target)
    set_cookie(resp, request, value)
    raise resp


async def logout(request: web.Request) -> web.Response:
    resp = web.HTTPSeeOther("/login")
    clear_cookie(resp, request)
    raise resp


async def _form(request: web.Request) -> dict[str, str]:
    form = await request.post()
    return {k: str(v)[:MAX_NOTE] for k, v in form.items() if isinstance(v, str)}


async def decide(request: web.Request) -> web.Response:
    verdict = request.match_info["verdict"]
    if verdict not in ("approve", "deny"):
        raise web.HTTPNotFound()
    form = await _form(request)
    approval_id = request.match_info["id"]
    note = form.get("comment") if verdict == "approve" else (form.get("reason") or form.get("preset"))
    back = _safe_next(form.get("back")) if form.get("back") else "/approvals"
    try:
        decided = await decide_as(request.app, request[USER], request.app[POLICY_SOURCE].policy, approval_id,
                                  verdict, note or None, parse_grant(form.get("grant")))
    except ApprovalError as e:
        raise _back(back, str(e)) from None
    except StoreUnavailable:
        raise _back(back, "The approval store is unavailable; nothing was decided. Try again.") from None
    what = {"approved": "Approved", "denied": "Denied"}.get(decided.state, "Recorded your approval for")
    raise _back(back, f"{what} {decided.id} ({decided.agent}).")


def _require_admin(request: web.Request, back: str, action: str) -> None:
    if not request.app[POLICY_SOURCE].policy.user_matches(request[USER], ["role:admin"]):
        raise _back(back, f"{action} needs the admin role.")


async def lock_action(request: web.Request) -> web.Response:
    from bastion.dashboard.locks_api import publish_admin_action

    action = request.match_info["action"]
    key = request.match_info["key"]
    _require_admin(request, "/locks", "Releasing or handing off a lock")
    store: Any = request.app[LOCK_STORE]
    form = await _form(request)
    try:
        if action == "release":
            freed = await store.admin_release(key)
            if freed is None:
                raise _back("/locks", f"No live lock {key!r}.")
            publish_admin_action(request, "release", freed, handoff_to=freed.handoff_to)
            raise _back("/locks", f"Released {key} (held by {freed.holder}).")
        if action == "handoff":
            to = form.get("to", "")
            agent = request.app[POLICY_SOURCE].policy.agents.get(to)
            if agent is None or agent.status == "retired":
                raise _back("/locks", f"Unknown or retired agent {to!r}.")
            offer = await store.handoff(key, to)
            if offer is None:
                raise _back("/locks", f"No live lock {key!r}.")
            publish_admin_action(request, "handoff", offer, to=to)
            raise _back("/locks", f"Handed {key} to {to}: its next request claims it.")
    except StoreUnavailable:
        raise _back("/locks", "The lock store is unavailable; nothing was changed.") from None
    except ValueError as e:
        raise _back("/locks", str(e)) from None
    raise web.HTTPNotFound()


async def agent_action(request: web.Request) -> web.Response:
    """Pause (with the form's `reason` and `mode`) or resume an agent, or `*`, fleet-wide."""
    from bastion.dashboard.fleet_api import FleetError, pause_agent, resume_agent

    action = request.match_info["action"]
    name = request.match_info["name"]
    _require_admin(request, "/agents", "Pausing or resuming an agent")
    form = await _form(request)
    who = "every agent" if name == "*" else name
    try:
        if action == "pause":
            pause = await pause_agent(request, name, form.get("reason", "").strip(), form.get("mode") or "pause")
            raise _back("/agents", f"Paused {who} on every sidecar." if pause.action == "pause"
                        else f"Every call of {who} is now held for a person.")
        if action == "resume":
            await resume_agent(request, name)
            raise _back("/agents", f"Resumed {who}.")
    except FleetError as e:
        raise _back("/agents", e.message) from None
    except StoreUnavailable:
        raise _back("/agents", "The fleet store is unavailable; nothing was changed.") from None
    raise web.HTTPNotFound()


async def milestone_new(request: web.Request) -> web.Response:
    """Complete the milestone named in the form's `key` (for `ttl`, default 7 days)."""
    form = await _form(request)
    return await _milestone(request, "complete", form.get("key", ""), form)


async def milestone_action(request: web.Request) -> web.Response:
    """Complete again (refresh) or clear the milestone in the path."""
    form = await _form(request)
    return await _milestone(request, request.match_info["action"], request.match_info["key"], form)


async def _milestone(request: web.Request, action: str, key: str, form: dict[str, str]) -> web.Response:
    from bastion.dashboard.fleet_api import FleetError, clear_milestone, complete_milestone, parse_ttl

    _require_admin(request, "/milestones", "Completing or clearing a milestone")
    try:
        if action == "complete":
            done = await complete_milestone(request, key, parse_ttl(form.get("ttl", "").strip()))
            raise _back("/milestones", f"Completed {done.key}.")
        if action == "clear":
            gone = await clear_milestone(request, key)
            raise _back("/milestones", f"Cleared {gone.key}.")
    except FleetError as e:
        raise _back("/milestones", e.message) from None
    except StoreUnavailable:
        raise _back("/milestones", "The fleet store is unavailable; nothing was changed.") from None
    raise web.HTTPNotFound()


async def reload_rules(request: web.Request) -> web.Response:
    _require_admin(request, "/rules", "Reloading the rules")
    result = await request.app[POLICY_SOURCE].reload("dashboard")
    raise _back("/rules", "Reloaded: the new policy is active." if result.ok
                else "The rules are invalid; the last good policy stays active (see the errors below).")


def lock_path(key: str, action: str) -> str:
    return f"/locks/{quote(key, safe='')}/{action}"


def agent_path(name: str, action: str) -> str:
    return f"/agents/{quote(name, safe='')}/{action}"


def milestone_path(key: str, action: str) -> str:
    return f"/milestones/{quote(key, safe='')}/{action}"
