"""The fleet in the admin API: pause and resume agents fleet-wide, milestones, and budgets' usage.

Routes; `{key}` is a milestone key, URL-encoded like lock keys (`extracted%3A42`; a `/` may be sent as is or as
`%2F`); `{name}` an agent of the rules, or `*` (every agent):

- `GET /api/agents` (in `pages.agents_json`) gains each agent's `paused`: the pause applying to it (its own, else
  the `*` one), or null; and `all_paused`, the `*` pause or null.
- `POST /api/agents/{name}/pause` with `{"reason": "...", "action": "pause"|"hold"}` (both optional; reason at
  most 500 characters) -> 200 `{"paused": pause}`; 404 for an agent the rules do not define.
- `POST /api/agents/{name}/resume` -> 200 `{"resumed": pause}` (the pause lifted); 404 when it was not paused.
- `GET /api/milestones` -> `{"milestones": [{key, completed_at, expires_at, by, request_id}, ...]}`
- `POST /api/milestones/{key}/complete` with `{"ttl": "7d"}` (optional; default 7 days) -> 200
  `{"completed": milestone}`; `POST /api/milestones/{key}/clear` -> 200 `{"cleared": milestone}`, 404 when
  no live milestone has that key.
- `GET /api/budgets` -> `{"budgets": [{id, unit, limit, per, agents, key, description, source, usage: [...]}]}`
  (each budget of the rules, `per` in seconds, `usage` its current windows, empty when nothing used it yet).

Changes need the `admin` role (403 otherwise); a store that cannot answer gives 503 `store_unavailable`. They
act on the shared store, so one sidecar's API stops an agent on every sidecar, like `bastion agents pause`.

Every change is logged (logger `bastion.fleet`, with the user) and handed to the listeners in
`app[FLEET_LISTENERS]` (callables taking one event dict): the sidecar registers one that applies a pause at once
instead of at its next poll, and the audit can record who paused what. The dashboard's forms (`forms.py`) call
the same functions as these routes, so a page and the API can never disagree on what is allowed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bastion.coord.fleet import ALL_AGENTS, MAX_REASON, Milestone, Pause
from bastion.coord.fleet_commands import DEFAULT_MILESTONE_TTL, budgets_report
from bastion.coord.store import StoreUnavailable
from bastion.dashboard.auth import USER, json_error, require
from bastion.dashboard.keys import FLEET_STORE, POLICY_SOURCE

log = logging.getLogger("bastion.fleet")

FLEET_LISTENERS = web.AppKey("bastion_fleet_listeners", list)
"""Callables taking one event dict, called after each pause, resume, milestone completion or clearing."""

ADMIN = ["role:admin"]
MAX_BODY = 8192
"""Largest request body read by these routes (bytes): a reason and a ttl need far less; past it, 400."""


class FleetError(Exception):
    """A refused change: the HTTP status, error type and message the API answers (forms show the message)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def install(app: web.Application, store: Any) -> None:
    """Add the fleet routes over `store` (a `bastion.coord.fleet.FleetStore`; its owner closes it)."""
    app[FLEET_STORE] = store
    app[FLEET_LISTENERS] = []
    app.router.add_post("/api/agents/{name}/pause", pause_api)
    app.router.add_post("/api/agents/{name}/resume", resume_api)
    app.router.add_get("/api/milestones", list_milestones_api)
    # [\s\S]: a key may hold any character, as a rule's template rendered it from an agent's URL
    app.router.add_post(r"/api/milestones/{key:[\s\S]+}/complete", complete_api)
    app.router.add_post(r"/api/milestones/{key:[\s\S]+}/clear", clear_api)
    app.router.add_get("/api/budgets", list_budgets_api)


def store_unavailable(error: StoreUnavailable) -> web.Response:
    """The same answer as the lock routes give: callers retry, nothing was changed."""
    log.warning("fleet admin API: %s", error)
    return json_error(503, "store_unavailable", "The fleet store is unavailable; try again in a few seconds.",
                      {"Retry-After": "5"})


# -- the changes, shared by the API and the dashboard's forms ---------------------------------------------------


def publish(request: web.Request, action: str, **fields: Any) -> None:
    """Log a change with the user who made it and hand it to the listeners; a failing listener never fails the
    call (the change is already in the store)."""
    user = request[USER].name
    event = {"action": action, "user": user, **fields}
    shown = " ".join(f"{k}={v!r}" for k, v in fields.items() if k not in ("pause", "record"))
    log.info("fleet %s by user %s: %s", action, user, shown)
    for listener in request.app.get(FLEET_LISTENERS, []):
        try:
            listener(event)
        except Exception:
            log.exception("fleet event listener failed")


def _store(request: web.Request) -> Any:
    store = request.app.get(FLEET_STORE)
    if store is None:
        raise FleetError(404, "not_found", "This listener has no fleet store.")
    return store


async def pause_agent(request: web.Request, name: str, reason: str, action: str = "pause") -> Pause:
    """Pause `name` (or `*`) fleet-wide as the request's user. Raises `FleetError`, `StoreUnavailable`."""
    policy = request.app[POLICY_SOURCE].policy
    if name != ALL_AGENTS and name not in policy.agents:
        raise FleetError(404, "not_found", f"Unknown agent {name!r}: the rules define no such agent (* pauses "
                                           "every agent).")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise FleetError(400, "bad_request", f"The reason must be text of at most {MAX_REASON} characters.")
    if action not in ("pause", "hold"):
        raise FleetError(400, "bad_request", 'The action must be "pause" or "hold".')
    store = _store(request)
    try:
        pause = await store.pause(name, reason, f"user:{request[USER].name}", action)
    except ValueError as e:
        raise FleetError(400, "bad_request", str(e)) from None
    publish(request, "pause", agent=name, pause_action=pause.action, reason=pause.reason, pause=pause.to_json(),
            record=pause)
    return pause


async def resume_agent(request: web.Request, name: str) -> Pause:
    """Lift the pause of `name` (or `*`): any agent that has one, even one since removed from the rules."""
    store = _store(request)
    try:
        lifted = await store.resume(name)
    except ValueError as e:
        raise FleetError(400, "bad_request", str(e)) from None
    if lifted is None:
        if name != ALL_AGENTS and name not in request.app[POLICY_SOURCE].policy.agents:
            raise FleetError(404, "not_found", f"Unknown agent {name!r}: the rules define no such agent.")
        raise FleetError(404, "not_found", "Every agent (*) is not paused." if name == ALL_AGENTS
                         else f"Agent {name!r} is not paused.")
    publish(request, "resume", agent=name, paused_by=lifted.paused_by, reason=lifted.reason,
            pause=lifted.to_json())
    return lifted


def parse_ttl(value: Any) -> float:
    """A milestone's ttl as given (`"7d"`, `"90m"`, seconds), or the default when absent or empty."""
    if value is None or value == "":
        return DEFAULT_MILESTONE_TTL
    from bastion.policy.schema import parse_duration

    try:
        return parse_duration(value)
    except ValueError as e:
        raise FleetError(400, "bad_request", f"ttl: {e}") from None


async def complete_milestone(request: web.Request, key: str, ttl: float) -> Milestone:
    store = _store(request)
    try:
        done = await store.complete_milestone(key, ttl, f"user:{request[USER].name}")
    except ValueError as e:
        raise FleetError(400, "bad_request", str(e)) from None
    publish(request, "milestone_complete", key=done.key, by=done.by, expires_at=done.to_json()["expires_at"])
    return done


async def clear_milestone(request: web.Request, key: str) -> Milestone:
    store = _store(request)
    try:
        gone = await store.clear_milestone(key)
    except ValueError as e:
        raise FleetError(400, "bad_request", str(e)) from None
    if gone is None:
        raise FleetError(404, "not_found", f"No live milestone {key!r}.")
    publish(request, "milestone_clear", key=gone.key, by=gone.by)
    return gone


# -- routes -----------------------------------------------------------------------------------------------------


async def _answer(work: Callable[[], Awaitable[dict[str, Any]]]) -> web.Response:
    try:
        return web.json_response(await work())
    except FleetError as e:
        return json_error(e.status, e.kind, e.message)
    except StoreUnavailable as e:
        return store_unavailable(e)


async def _body(request: web.Request, example: str) -> dict[str, Any]:
    """The JSON object sent, `{}` for an empty body. Bounded: `MAX_BODY` bytes."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise FleetError(400, "bad_request", f"The body is larger than {MAX_BODY} bytes.")
    raw = await request.read()
    if len(raw) > MAX_BODY:
        raise FleetError(400, "bad_request", f"The body is larger than {MAX_BODY} bytes.")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise FleetError(400, "bad_request", f"The body must be a JSON object like {example}.")
    return body


async def pause_api(request: web.Request) -> web.Response:
    require(request, request.app[POLICY_SOURCE].policy, ADMIN, "Pausing an agent")

    async def work() -> dict[str, Any]:
        body = await _body(request, '{"reason": "why"}')
        reason = "" if body.get("reason") is None else body["reason"]
        action = "pause" if body.get("action") is None else body["action"]
        pause = await pause_agent(request, request.match_info["name"], reason, action)
        return {"paused": pause.to_json()}

    return await _answer(work)


async def resume_api(request: web.Request) -> web.Response:
    require(request, request.app[POLICY_SOURCE].policy, ADMIN, "Resuming an agent")

    async def work() -> dict[str, Any]:
        return {"resumed": (await resume_agent(request, request.match_info["name"])).to_json()}

    return await _answer(work)


async def list_milestones_api(request: web.Request) -> web.Response:
    async def work() -> dict[str, Any]:
        return {"milestones": [m.to_json() for m in await _store(request).list_milestones()]}

    return await _answer(work)


async def complete_api(request: web.Request) -> web.Response:
    require(request, request.app[POLICY_SOURCE].policy, ADMIN, "Completing a milestone")

    async def work() -> dict[str, Any]:
        body = await _body(request, '{"ttl": "7d"}')
        done = await complete_milestone(request, request.match_info["key"], parse_ttl(body.get("ttl")))
        return {"completed": done.to_json()}

    return await _answer(work)


async def clear_api(request: web.Request) -> web.Response:
    require(request, request.app[POLICY_SOURCE].policy, ADMIN, "Clearing a milestone")

    async def work() -> dict[str, Any]:
        return {"cleared": (await clear_milestone(request, request.match_info["key"])).to_json()}

    return await _answer(work)


async def list_budgets_api(request: web.Request) -> web.Response:
    async def work() -> dict[str, Any]:
        usage = await _store(request).list_budgets()
        return {"budgets": budgets_report(request.app[POLICY_SOURCE].policy, usage)}

    return await _answer(work)
