"""Approvals in the admin API: list and read them, approve (optionally with a grant), deny, cancel.

Routes (`Authorization: Bearer <user token>`; 401 without a valid one):

- `GET /api/approvals[?state=pending&limit=100]` -> `{"approvals": [...]}`, newest first.
- `GET /api/approvals/{id}` -> the approval (preview of the call included); 404 if unknown.
- `POST /api/approvals/{id}/approve` `{"comment": "...", "grant": "30m"}` -> 200 `{"approval": ...}`.
  `grant` also lets the same agent pass the same rules' held calls for that long (never past a denial).
- `POST /api/approvals/{id}/deny` `{"reason": "..."}` -> 200 `{"approval": ...}`; the reason reaches the agent.
- `POST /api/approvals/{id}/cancel` `{"reason": "..."}` (role `admin`).
- `GET /api/grants` -> `{"grants": [...]}`; `POST /api/grants/{id}/revoke` (role `admin`, or the grantor).

Reading needs one of the roles viewer, approver or admin. Deciding needs a match with every approver group
of the rules that held the call (default `role:approver`; `admin` alone is not enough, so that a rule can
keep, say, refunds with the finance leads), and never the owner of the agent that made the call: 403
otherwise. A decision on an approval that is no longer pending is 409 (the first decision wins). The store
being down is 503. Decisions reach the sidecar holding the call through the shared store, whichever sidecar
or dashboard took them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from bastion.coord.approvals import MAX_NOTE, STATES, Approval, ApprovalError, ApprovalStore, may_decide
from bastion.coord.store import StoreUnavailable
from bastion.dashboard.auth import USER, json_error, require
from bastion.dashboard.keys import APPROVAL_STORE, NOTIFY, POLICY_SOURCE
from bastion.metrics import APPROVALS

log = logging.getLogger("bastion.approvals")


READERS = ["role:viewer", "role:approver", "role:admin"]
ADMIN = ["role:admin"]


def install(app: web.Application, store: ApprovalStore, notify: Any = None) -> None:
    """Add the approval routes. `notify(event, approval)` is told about every decision (the webhook)."""
    app[APPROVAL_STORE] = store
    app[NOTIFY] = notify
    app.router.add_get("/api/approvals", list_approvals)
    app.router.add_get("/api/approvals/{id}", get_approval)
    app.router.add_post("/api/approvals/{id}/approve", approve)
    app.router.add_post("/api/approvals/{id}/deny", deny)
    app.router.add_post("/api/approvals/{id}/cancel", cancel)
    app.router.add_get("/api/grants", list_grants)
    app.router.add_post("/api/grants/{id}/revoke", revoke_grant)


def _policy(request: web.Request) -> Any:
    return request.app[POLICY_SOURCE].policy


def _store_unavailable(error: StoreUnavailable) -> web.Response:
    log.warning("approvals API: %s", error)
    return json_error(503, "store_unavailable", "The approval store is unavailable; try again in a few seconds.",
                      {"Retry-After": "5"})


async def _body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object body (empty allowed), with only `allowed` string fields. Raises 400."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _bad(f"The body must be a JSON object with {', '.join(allowed)}.") from None
    if not isinstance(body, dict):
        raise _bad(f"The body must be a JSON object with {', '.join(allowed)}.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise _bad(f"Unknown field(s) {', '.join(unknown)}; expected {', '.join(allowed)}.")
    for key, value in body.items():
        if value is not None and not isinstance(value, str):
            raise _bad(f"{key} must be a string.")
        if isinstance(value, str) and len(value) > MAX_NOTE:
            raise _bad(f"{key} is longer than {MAX_NOTE} characters.")
    return body


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"type": "error", "error": {"type": "bad_request", "message": message}}),
                              content_type="application/json")


def _approval_error(e: ApprovalError) -> web.Response:
    kind = {400: "bad_request", 403: "forbidden", 404: "not_found", 409: "conflict"}.get(e.status, "conflict")
    return json_error(e.status, kind, str(e))


async def list_approvals(request: web.Request) -> web.Response:
    require(request, _policy(request), READERS, "Reading approvals")
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        return json_error(400, "bad_request", f"state must be one of {', '.join(STATES)}")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return json_error(400, "bad_request", "limit must be a number")
    try:
        found = await request.app[APPROVAL_STORE].list(state, limit)
    except StoreUnavailable as e:
        return _store_unavailable(e)
    return web.json_response({"approvals": [a.to_json() for a in found]})


async def get_approval(request: web.Request) -> web.Response:
    require(request, _policy(request), READERS, "Reading approvals")
    try:
        found = await request.app[APPROVAL_STORE].get(request.match_info["id"])
    except StoreUnavailable as e:
        return _store_unavailable(e)
    if found is None:
        return json_error(404, "not_found", f"No approval {request.match_info['id']!r}.")
    return web.json_response(found.to_json())


async def decide_as(app: web.Application, user: Any, policy: Any, approval_id: str, verdict: str,
                    note: str | None, grant_for: float | None) -> Approval:
    """One person's decision, checked against the current rules, recorded, announced. Raises `ApprovalError`
    (400, 403, 404, 409) or `StoreUnavailable`. The API and the dashboard's forms both decide through here."""
    store = app[APPROVAL_STORE]
    current = await store.get(approval_id)
    if current is None:
        raise ApprovalError(f"No approval {approval_id[:40]!r}.", 404)
    owner = getattr(policy.agents.get(current.agent), "owner", None)
    refusal = may_decide(current, user.name, user.roles, owner)
    if refusal is not None:
        raise ApprovalError(refusal[0].upper() + refusal[1:] + ".", 403)
    decided = await store.decide(approval_id, user.name, verdict, note, grant_for)  # type: ignore[arg-type]
    announce(app, decided, user.name, verdict)
    return decided


def parse_grant(value: str | None) -> float | None:
    """A grant's duration (`30m`), or None for no grant. Raises `ApprovalError` 400."""
    from bastion.policy.schema import parse_duration

    if not value:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ApprovalError(f"grant: {e}", 400) from None


async def _decide(request: web.Request, verdict: str) -> web.Response:
    body = await _body(request, ("comment", "grant") if verdict == "approve" else ("reason",))
    note = body.get("comment") if verdict == "approve" else body.get("reason")
    try:
        decided = await decide_as(request.app, request[USER], _policy(request), request.match_info["id"], verdict,
                                  note, parse_grant(body.get("grant")))
    except StoreUnavailable as e:
        return _store_unavailable(e)
    except ApprovalError as e:
        return _approval_error(e)
    return web.json_response({"approval": decided.to_json()})


def announce(app: web.Application, decided: Approval, user: str, verdict: str) -> None:
    """Log, count and notify one decision."""
    if decided.state in ("approved", "denied", "cancelled"):
        APPROVALS.labels(decided.state).inc()
        grant = f", grant until {decided.to_json()['grant']['until']}" if decided.grant else ""
        log.info("approval %s %s by %s (agent=%s rules=%s%s)", decided.id, decided.state, user, decided.agent,
                 ",".join(decided.rules), grant)
        notify = app.get(NOTIFY)
        if notify is not None:
            notify(decided.state, decided)
    else:
        log.info("approval %s: %s by %s, %d of %d approvals given", decided.id, verdict, user,
                 decided.approvals_given, decided.required)


async def approve(request: web.Request) -> web.Response:
    return await _decide(request, "approve")


async def deny(request: web.Request) -> web.Response:
    return await _decide(request, "deny")


async def cancel(request: web.Request) -> web.Response:
    require(request, _policy(request), ADMIN, "Cancelling an approval")
    body = await _body(request, ("reason",))
    try:
        cancelled = await request.app[APPROVAL_STORE].cancel(request.match_info["id"], request[USER].name,
                                                              body.get("reason"))
    except StoreUnavailable as e:
        return _store_unavailable(e)
    except ApprovalError as e:
        return _approval_error(e)
    announce(request.app, cancelled, request[USER].name, "cancel")
    return web.json_response({"approval": cancelled.to_json()})


async def list_grants(request: web.Request) -> web.Response:
    require(request, _policy(request), READERS, "Reading grants")
    try:
        grants = await request.app[APPROVAL_STORE].list_grants()
    except StoreUnavailable as e:
        return _store_unavailable(e)
    return web.json_response({"grants": [g.to_json() for g in grants]})


async def revoke_grant(request: web.Request) -> web.Response:
    store = request.app[APPROVAL_STORE]
    user = request[USER]
    grant_id = request.match_info["id"]
    try:
        grant = next((g for g in await store.list_grants() if g.id == grant_id), None)
        if grant is None:
            return json_error(404, "not_found", f"No live grant {grant_id!r}.")
        if grant.by != user.name:
            require(request, _policy(request), ADMIN, "Revoking someone else's grant")
        revoked = await store.revoke_grant(grant_id)
    except StoreUnavailable as e:
        return _store_unavailable(e)
    if revoked is None:
        return json_error(404, "not_found", f"No live grant {grant_id!r}.")
    log.info("grant %s revoked by %s (agent=%s rules=%s, given by %s)", revoked.id, user.name, revoked.agent,
             ",".join(revoked.rules), revoked.by)
    return web.json_response({"revoked": revoked.to_json()})
