"""Task locks in the admin API: any reader may list them, an `admin` may release or hand one off.

Routes; `{key}` is the lock key, URL-encoded (`ticket%3A42`; a `/` in a key may
be sent as is or as `%2F`):

- `GET /api/locks` -> `{"locks": [{key, holder, fence, acquired_at, expires_at, handoff_to}, ...]}`
- `POST /api/locks/{key}/release` -> 200 `{"released": lock}`; 404 when no live lock has that key.
- `POST /api/locks/{key}/handoff` with `{"to": AGENT}` (and optionally `"ttl"`, how long the offer waits,
  like `5m`; default 5 minutes) -> 200 `{"handoff": lock}`; 400 when the agent is unknown or retired;
  404 when no live lock has that key.

Release and handoff need the `admin` role (403 otherwise); a store that cannot answer gives 503
`store_unavailable`. The routes act on the shared store, so one sidecar's admin API acts on the whole fleet,
exactly like `bastion locks`.

Every admin action is logged and handed to the listeners in `app[LOCK_ADMIN_LISTENERS]` (callables taking
one event dict), which is how the audit log records who released or handed off what.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from bastion.coord.store import DEFAULT_HANDOFF_TTL, LockInfo, LockStore, StoreUnavailable
from bastion.dashboard.auth import USER, json_error, require
from bastion.dashboard.keys import LOCK_STORE, POLICY_SOURCE, READY_CHECKS

log = logging.getLogger("bastion.locks")

LOCK_ADMIN_LISTENERS = web.AppKey("bastion_lock_admin_listeners", list)

PING_TIMEOUT = 3.0
"""`/readyz` reports the store unreachable when it does not answer a ping within this many seconds."""

ADMIN = ["role:admin"]


def install(app: web.Application, store: LockStore) -> None:
    """Add the lock routes and a `store` readiness check (/readyz: policy loaded, store reachable)."""
    app[LOCK_STORE] = store
    app[LOCK_ADMIN_LISTENERS] = []
    app[READY_CHECKS].append(("store", _ready_check(store)))
    app.router.add_get("/api/locks", list_locks)
    # [\s\S]: a key may hold any character, a newline from an agent's URL too
    app.router.add_post(r"/api/locks/{key:[\s\S]+}/release", release_lock)
    app.router.add_post(r"/api/locks/{key:[\s\S]+}/handoff", handoff_lock)


def _ready_check(store: LockStore) -> Callable[[], Any]:
    async def check() -> tuple[bool, str]:
        try:
            await asyncio.wait_for(store.ping(), PING_TIMEOUT)
        except StoreUnavailable as e:
            return False, str(e)
        except TimeoutError:
            return False, f"the {store.backend} lock store did not answer within {PING_TIMEOUT:g}s"
        return True, f"{store.backend} lock store reachable"

    return check


def _store_unavailable(error: StoreUnavailable) -> web.Response:
    log.warning("lock admin API: %s", error)
    return json_error(503, "store_unavailable", "The task lock store is unavailable; try again in a few seconds.",
                      {"Retry-After": "5"})


def _bad_request(message: str) -> web.Response:
    return json_error(400, "bad_request", message)


def _no_such_lock(key: str) -> web.Response:
    return json_error(404, "not_found", f"No live lock {key!r}.")


def publish_admin_action(request: web.Request, action: str, lock: LockInfo, **fields: Any) -> None:
    """Log an admin action and hand it to the listeners (audit); a failing listener never fails the call."""
    user = request[USER].name
    event = {"action": action, "user": user, "key": lock.key, "holder": lock.holder, "fence": lock.fence, **fields}
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    log.info("lock %s by admin user %s: key=%r holder=%s fence=%d%s", action, user, lock.key, lock.holder,
             lock.fence, extra)
    for listener in request.app[LOCK_ADMIN_LISTENERS]:
        try:
            listener(event)
        except Exception:
            log.exception("lock admin event listener failed")


async def list_locks(request: web.Request) -> web.Response:
    try:
        locks = await request.app[LOCK_STORE].list_locks()
    except StoreUnavailable as e:
        return _store_unavailable(e)
    return web.json_response({"locks": [lock.to_json() for lock in locks]})


async def release_lock(request: web.Request) -> web.Response:
    require(request, request.app[POLICY_SOURCE].policy, ADMIN, "Releasing a lock")
    key = request.match_info["key"]
    try:
        freed = await request.app[LOCK_STORE].admin_release(key)
    except StoreUnavailable as e:
        return _store_unavailable(e)
    except ValueError as e:
        return _bad_request(str(e))
    if freed is None:
        return _no_such_lock(key)
    publish_admin_action(request, "release", freed, handoff_to=freed.handoff_to)
    return web.json_response({"released": freed.to_json()})


async def handoff_lock(request: web.Request) -> web.Response:
    policy = request.app[POLICY_SOURCE].policy
    require(request, policy, ADMIN, "Handing off a lock")
    key = request.match_info["key"]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _bad_request('The body must be JSON like {"to": "AGENT"}.')
    if not isinstance(body, dict) or not isinstance(body.get("to"), str) or not body["to"]:
        return _bad_request('The body must be JSON like {"to": "AGENT"}: name the agent that takes the lock over.')
    to = body["to"]
    agent = policy.agents.get(to)
    if agent is None:
        return _bad_request(f"Unknown agent {to!r}: the rules define no such agent.")
    if agent.status == "retired":
        return _bad_request(f"Agent {to!r} is retired and cannot take a lock over.")
    ttl = DEFAULT_HANDOFF_TTL
    if body.get("ttl") is not None:
        from bastion.policy.schema import parse_duration

        try:
            ttl = parse_duration(body["ttl"])
        except ValueError as e:
            return _bad_request(f"ttl: {e}")
    try:
        offer = await request.app[LOCK_STORE].handoff(key, to, ttl)
    except StoreUnavailable as e:
        return _store_unavailable(e)
    except ValueError as e:
        return _bad_request(str(e))
    if offer is None:
        return _no_such_lock(key)
    publish_admin_action(request, "handoff", offer, to=to)
    return web.json_response({"handoff": offer.to_json()})
