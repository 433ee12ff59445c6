"""The dashboard's pages: server-rendered HTML (Jinja2, autoescaped) over the same stores as the JSON API.

Each page has a `*_data(request) -> dict` function that gathers what it shows; the template sees only that
dict (plus the user, the CSRF token and formatting filters). Every value that came from an agent (URLs,
headers, bodies, rule messages) is escaped by the template engine: no template marks audit data safe.
Forms post to routes in `forms.py`; scripts are static files (`static/app.js`), never inline.

Reads are bounded: the flow list reads one indexed page (keyset, newest first; the model and tool filters are
tested on each record of that walk, see `RecordQuery`), the overview and agents pages one grouped count of the
last hour, approvals and locks their store's live set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from bastion.audit.display import USAGE_KINDS, llm_view, mcp_view, websocket_view
from bastion.audit.record import OUTCOMES, AuditRecord, Body
from bastion.audit.sinks import RecordQuery, StoreError
from bastion.audit.sinks.base import matches_facts, page_key, parse_page_key
from bastion.coord.approvals import may_decide
from bastion.coord.fleet import ALL_AGENTS, Pause
from bastion.coord.fleet_commands import fmt_span, pause_map, pause_of
from bastion.coord.store import StoreUnavailable, iso_time
from bastion.dashboard.auth import READERS, SESSION, USER
from bastion.dashboard.flows_api import DECISIONS, summary
from bastion.dashboard.keys import (
    APPROVAL_STORE,
    AUDIT_READER,
    FLEET_STORE,
    LOCK_STORE,
    MODE,
    POLICY_SOURCE,
    READY_CHECKS,
)

log = logging.getLogger("bastion.dashboard")

PAGE_SIZE = 50
SHOW_CHARS = 256 << 10
"""A body is shown up to this many characters (the whole stored record stays available as JSON and HAR)."""
PRETTY_CHARS = 64 << 10
"""JSON bodies up to this size are re-indented for reading; larger ones are shown as stored."""
STATS_SECONDS = 15.0
"""The last hour's counts are computed at most this often per process (every page shows the same)."""
HOUR_US = 3600 * 1_000_000
DENY_REASONS = ("Not within policy", "Wrong amount or target", "Needs a ticket first", "Suspicious arguments",
                "Wrong environment")
GRANTS = ("15m", "30m", "1h", "4h")


def context(request: web.Request, active: str, **data: Any) -> dict[str, Any]:
    user = request[USER]
    session = request.get(SESSION)
    policy = request.app[POLICY_SOURCE].policy
    return {"user": user, "roles": sorted(user.roles), "csrf": session.csrf if session is not None else "",
            "active": active, "mode": request.app.get(MODE, "sidecar"),
            "is_admin": policy.user_matches(user, ["role:admin"]), "revision": policy.revision[:12],
            "notice": request.query.get("notice", "")[:300], **data}


def render(request: web.Request, template: str, active: str, data: dict[str, Any], status: int = 200) -> web.Response:
    return aiohttp_jinja2.render_template(template, request, context(request, active, **data), status=status)


class AuditUnavailable(Exception):
    """The audit store cannot be opened or read: pages say so instead of failing."""


async def _audit(request: web.Request) -> Any:
    store = request.app.get(AUDIT_READER)
    if store is None:
        return None
    try:
        await store.open()
    except Exception as e:  # a down or misconfigured sink must degrade the page, never 500 it
        raise AuditUnavailable(str(e) or type(e).__name__) from e
    return store


# -- overview -------------------------------------------------------------------------------------------------


STATS: web.AppKey[dict[str, Any]] = web.AppKey("bastion_hour_stats", dict)


async def hour_stats(request: web.Request) -> dict[str, Any]:
    """The last hour by agent and outcome, from one grouped count, shared by every page for `STATS_SECONDS`
    (the count scans the hour's index range: many viewers must not multiply it)."""
    cache = request.app[STATS]
    lock = cache.setdefault("lock", asyncio.Lock())
    async with lock:
        if cache.get("at", 0.0) + STATS_SECONDS > time.monotonic():
            return cache["value"]  # type: ignore[no-any-return]
        value = await _hour_stats(request)
        cache.update(at=time.monotonic(), value=value)
        return value


async def _hour_stats(request: web.Request) -> dict[str, Any]:
    since = int(time.time() * 1_000_000) - HOUR_US
    out: dict[str, Any] = {"available": False, "agents": {}, "rules": {}, "total": 0, "denials": 0,
                           "p50_ms": None, "p95_ms": None, "error": None}
    try:
        store = await _audit(request)
        if store is None:
            return out
        rows, durations = await asyncio.gather(store.stats(since), store.durations(since, 1000))
    except Exception as e:
        out["error"] = str(e) or type(e).__name__
        return out
    if rows is None:
        return out
    out["available"] = True
    for r in rows:
        agent = out["agents"].setdefault(r.agent or "(none)", {"calls": 0, "denied": 0, "refused": 0,
                                                               "forwarded": 0, "held": 0, "last_us": 0})
        agent["calls"] += r.count
        agent["last_us"] = max(agent["last_us"], r.last_us)
        if r.effect == "deny":
            agent["denied"] += r.count
            out["denials"] += r.count
        if r.effect == "hold":
            agent["held"] += r.count
        if r.outcome == "refused":
            agent["refused"] += r.count
        if r.outcome == "forwarded":
            agent["forwarded"] += r.count
        out["total"] += r.count
        if r.rule:
            out["rules"][r.rule] = out["rules"].get(r.rule, 0) + r.count
    if durations:
        ordered = sorted(durations)
        out["p50_ms"] = statistics.median(ordered) / 1000
        out["p95_ms"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] / 1000
    return out


async def _pending(request: web.Request) -> tuple[list[Any], str | None]:
    store = request.app.get(APPROVAL_STORE)
    if store is None:
        return [], None
    try:
        return await store.list("pending", 200), None
    except StoreUnavailable as e:
        return [], str(e)


async def _locks(request: web.Request) -> tuple[list[Any], str | None]:
    store = request.app.get(LOCK_STORE)
    if store is None:
        return [], None
    try:
        return await store.list_locks(), None
    except StoreUnavailable as e:
        return [], str(e)


async def overview(request: web.Request) -> web.Response:
    stats, (pending, approvals_error), (locks, locks_error) = await asyncio.gather(
        hour_stats(request), _pending(request), _locks(request))
    source = request.app[POLICY_SOURCE]
    checks = []
    for name, check in request.app[READY_CHECKS]:
        try:
            ok, detail = await check()
        except Exception as e:
            ok, detail = False, str(e)
        checks.append({"name": name, "ok": ok, "detail": detail})
    return render(request, "overview.html", "overview", {
        "stats": stats, "pending": pending, "approvals_error": approvals_error, "locks": locks,
        "locks_error": locks_error, "rules": source.to_json(), "checks": checks, "now": time.time(),
    })


# -- flows ----------------------------------------------------------------------------------------------------

FLOW_FILTERS = ("agent", "decision", "outcome", "host", "q", "model", "tool", "rule", "status", "since", "until")


def flow_query(params: Any, limit: int = PAGE_SIZE) -> tuple[RecordQuery, dict[str, str], list[str]]:
    """The store query for the flow filters in `params`, the filters as given, and problems to show."""
    given = {k: params.get(k, "").strip()[:200] for k in FLOW_FILTERS if params.get(k, "").strip()}
    problems: list[str] = []
    decision = given.get("decision")
    if decision and decision not in DECISIONS:
        problems.append(f"decision must be one of {', '.join(DECISIONS)}")
        decision = None
    outcome = given.get("outcome")
    if outcome and outcome not in OUTCOMES:
        problems.append(f"outcome must be one of {', '.join(OUTCOMES)}")
        outcome = None
    since_us = until_us = None
    for key in ("since", "until"):
        if key in given:
            try:
                from datetime import datetime

                value = int(datetime.fromisoformat(given[key]).timestamp() * 1_000_000)
            except ValueError:
                problems.append(f"{key} must be a date and time like 2026-12-04T10:00")
                continue
            if key == "since":
                since_us = value
            else:
                until_us = value
    cursor = params.get("before") or None
    if cursor:
        try:
            parse_page_key(cursor)
        except StoreError:
            problems.append("that page link is not valid any more")
            cursor = None
    query = RecordQuery(agent=given.get("agent"), effect=decision, outcome=outcome, host=given.get("host"),
                        text=given.get("q"), model=given.get("model"), tool=given.get("tool"), since_us=since_us,
                        until_us=until_us, limit=limit, cursor=cursor)
    return query, given, problems


def _matches_extra(record: AuditRecord, given: dict[str, str]) -> bool:
    """Filters the store does not index (rule, status), applied to a fetched page."""
    if "rule" in given and given["rule"] not in (record.decision.rules if record.decision else []):
        return False
    return not ("status" in given and str(record.status) != given["status"])


async def flows(request: web.Request) -> web.Response:
    query, given, problems = flow_query(request.query)
    rows: list[dict[str, Any]] = []
    next_url = None
    error = None
    try:
        store = await _audit(request)
    except AuditUnavailable as e:
        store, error = None, f"The audit store cannot be read: {e}"
    if store is None:
        error = error or "This dashboard has no audit store (--audit)."
    else:
        try:
            extra = "rule" in given or "status" in given
            page = await store.query(query if not extra else RecordQuery(**{**_fields(query), "limit": 500}))
            matching = [r for r in page.records if _matches_extra(r, given)]
            rows = [summary(r) for r in matching[:PAGE_SIZE]]
            cursor = page.next
            if len(matching) > PAGE_SIZE:  # the next page starts after the last row shown, not the last scanned
                cursor = page_key(matching[PAGE_SIZE - 1])
            if cursor:
                next_url = "/flows?" + urlencode({**given, "before": cursor})
        except Exception as e:
            error = f"The audit store cannot be read: {e}"
    filters_qs = urlencode(given)
    return render(request, "flows.html", "flows", {
        "rows": rows, "given": {k: given.get(k, "") for k in FLOW_FILTERS}, "problems": problems,
        "next_url": next_url, "error": error,
        "decisions": DECISIONS, "outcomes": OUTCOMES, "filters_qs": filters_qs, "paged": bool(query.cursor),
        "agents": sorted(request.app[POLICY_SOURCE].policy.agents),
    })


def _fields(q: RecordQuery) -> dict[str, Any]:
    return {k: getattr(q, k) for k in ("agent", "effect", "outcome", "host", "text", "model", "tool", "since_us",
                                       "until_us", "limit", "cursor", "ascending", "bodies")}


MAX_STREAMS = 32
MAX_STREAMS_PER_USER = 2
STREAMS: web.AppKey[set[Any]] = web.AppKey("bastion_flow_streams", set)


async def flow_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one `flow` event per new record matching the page's filters (summaries only), so a
    page follows new calls with one connection instead of polling."""
    streams = request.app[STREAMS]
    user = request[USER]
    if len(streams) >= MAX_STREAMS or sum(1 for u, _ in streams if u == user.name) >= MAX_STREAMS_PER_USER:
        raise web.HTTPServiceUnavailable(text="Too many live views are open; close some, or reload later.")
    _, given, _ = flow_query(request.query)
    try:
        store = await _audit(request)
    except AuditUnavailable as e:
        raise web.HTTPServiceUnavailable(text=f"The audit store cannot be read: {e}") from None
    if store is None:
        raise web.HTTPNotFound(text="no audit store")
    source = request.app[POLICY_SOURCE]
    entry = (user.name, object())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    streams.add(entry)
    try:
        _, token = await store.changes(None)
        while True:
            current = source.policy.users.get(user.name)
            if current is None or current.token_sha256 != user.token_sha256 or \
                    not source.policy.user_matches(current, READERS):
                break  # the user was removed, their token changed, or they lost their role: stop at once
            records, token = await store.changes(token, 200)
            for record in records:
                if _live_match(record, given):
                    data = json.dumps(summary(record), ensure_ascii=False)
                    await resp.write(f"event: flow\ndata: {data}\n\n".encode())
            if not records:
                await resp.write(b": keep-alive\n\n")
                await asyncio.sleep(1.0)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    except Exception as e:
        log.warning("live flows stream ended: %s", e)
    finally:
        streams.discard(entry)
    return resp


def _live_match(record: AuditRecord, given: dict[str, str]) -> bool:
    if "since" in given or "until" in given:
        return False  # a page bounded in time gets no live rows
    if "agent" in given and record.agent != given["agent"]:
        return False
    if "decision" in given and record.effect != given["decision"]:
        return False
    if "outcome" in given and record.outcome != given["outcome"]:
        return False
    if "host" in given and record.request.host != given["host"].lower():
        return False
    if "q" in given and given["q"] not in record.request.url and given["q"] != record.id:
        return False
    if not matches_facts(record.extra, given.get("model"), given.get("tool")):
        return False
    return _matches_extra(record, given)


def body_view(body: Body | None, headers: list[tuple[str, str]]) -> dict[str, Any]:
    """How a body is shown: pretty JSON, an SSE stream's reassembled text, plain text, or size and digest."""
    if body is None:
        return {"kind": "none"}
    view: dict[str, Any] = {"kind": "binary", "size": body.size, "sha256": body.sha256 or body.stored_sha256,
                            "cut": body.truncated or not body.complete, "note": body.note, "encoding": body.encoding,
                            "mime": body.mime_type, "purged": body.content is None and body.stored > 0}
    content = body.content
    if content is None:
        return view
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return view
    mime = (body.mime_type or "").lower()
    shown = text[:SHOW_CHARS]
    view["shown_cut"] = len(text) > SHOW_CHARS
    if ("json" in mime or text[:1] in "{[") and len(text) <= PRETTY_CHARS:
        try:
            pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except (ValueError, RecursionError):
            pretty = None
        # Indentation grows with nesting: a small, deeply nested body must not become a huge page.
        if pretty is not None and len(pretty) <= SHOW_CHARS:
            view.update(kind="json", text=pretty)
            return view
    if "event-stream" in mime:
        view.update(kind="sse", text=shown, assembled=_assemble_sse(text)[:SHOW_CHARS])
        return view
    view.update(kind="text", text=shown)
    return view


def _assemble_sse(text: str) -> str:
    """The text an LLM streamed: the deltas of OpenAI- and Anthropic-style events, joined."""
    out: list[str] = []
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data or data == "[DONE]":
            continue
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            out.append(data)
            continue
        if not isinstance(event, dict):
            continue
        for choice in event.get("choices") or []:
            delta = (choice or {}).get("delta") or {}
            if isinstance(delta.get("content"), str):
                out.append(delta["content"])
        delta = event.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("text"), str):
            out.append(delta["text"])
    return "".join(out)


async def flow_detail(request: web.Request) -> web.Response:
    record_id = request.match_info["id"]
    try:
        store = await _audit(request)
        if store is None:
            raise web.HTTPNotFound(text="This dashboard has no audit store.")
        record = await store.get(record_id)
    except web.HTTPException:
        raise
    except Exception as e:
        raise web.HTTPServiceUnavailable(text=f"The audit store cannot be read: {e}") from None
    if record is None:
        return render(request, "missing.html", "flows", {"what": f"audit record {record_id}"}, status=404)
    policy = request.app[POLICY_SOURCE].policy
    trace = None
    if record.decision is not None:
        trace = _trace(policy, record)
    req, resp = record.request, record.response
    return render(request, "flow.html", "flows", {
        "r": record, "s": summary(record),
        "request_body": body_view(req.body, req.headers),
        "response_body": body_view(resp.body if resp else None, resp.headers if resp else []),
        "trace": trace, "record_json": json.dumps(record.to_json(with_hash=True), indent=2, ensure_ascii=False),
        "llm": llm_view(record.extra), "mcp": mcp_view(record.extra), "ws": websocket_view(record.extra),
        "usage_kinds": USAGE_KINDS,
    })


def _trace(policy: Any, record: AuditRecord) -> list[dict[str, Any]] | None:
    """Each rule of the *current* policy considered for this request and why it matched or not (the record
    keeps the determining rules; the full trace is recomputed from the stored request)."""
    from bastion.policy.facts import RequestFacts

    req = record.request
    agent = record.agent
    if agent is None or agent not in policy.agents:
        return None
    try:
        complete = req.body is not None and not req.body.truncated and req.body.complete
        facts = RequestFacts.from_url(req.method, req.url, headers={k.lower(): v for k, v in req.headers},
                                      body=req.body.content if complete and req.body else None)
        decision = policy.explain(facts, agent)
    except Exception:
        return None
    return [{"rule": t.rule, "effect": t.effect, "matched": t.matched, "reasons": list(t.reasons),
             "error": t.error} for t in decision.trace]


# -- approvals, locks, agents, rules -------------------------------------------------------------------------


async def approvals(request: web.Request) -> web.Response:
    store = request.app.get(APPROVAL_STORE)
    policy = request.app[POLICY_SOURCE].policy
    user = request[USER]
    pending: list[Any] = []
    history: list[Any] = []
    error = None
    if store is not None:
        try:
            pending, recent = await asyncio.gather(store.list("pending", 200), store.list(None, 100))
            history = [a for a in recent if a.state != "pending"][:50]
        except StoreUnavailable as e:
            error = str(e)
    items = []
    for a in reversed(pending):  # oldest first: the queue order
        owner = getattr(policy.agents.get(a.agent), "owner", None)
        items.append({"a": a, "why_not": may_decide(a, user.name, user.roles, owner)})
    return render(request, "approvals.html", "approvals", {
        "items": items, "history": history, "error": error, "reasons": DENY_REASONS, "grants": GRANTS,
        "now": time.time(),
    })


async def approval_detail(request: web.Request) -> web.Response:
    store = request.app.get(APPROVAL_STORE)
    approval_id = request.match_info["id"]
    a = None
    if store is not None:
        try:
            a = await store.get(approval_id)
        except StoreUnavailable as e:
            raise web.HTTPServiceUnavailable(text=str(e)) from None
    if a is None:
        return render(request, "missing.html", "approvals", {"what": f"approval {approval_id}"}, status=404)
    policy = request.app[POLICY_SOURCE].policy
    owner = getattr(policy.agents.get(a.agent), "owner", None)
    user = request[USER]
    return render(request, "approval.html", "approvals", {
        "a": a, "why_not": may_decide(a, user.name, user.roles, owner), "reasons": DENY_REASONS,
        "grants": GRANTS, "now": time.time(),
    })


async def locks(request: web.Request) -> web.Response:
    found, error = await _locks(request)
    return render(request, "locks.html", "locks", {
        "locks": found, "error": error, "now": time.time(),
        "agents": sorted(n for n, a in request.app[POLICY_SOURCE].policy.agents.items() if a.status != "retired"),
    })


async def _pauses(request: web.Request) -> tuple[dict[str, Pause] | None, str | None]:
    """The pauses in force by agent (None without a fleet store, or when it cannot answer: then the error)."""
    store = request.app.get(FLEET_STORE)
    if store is None:
        return None, None
    try:
        return pause_map(await store.list_pauses()), None
    except StoreUnavailable as e:
        return None, str(e)


async def agents(request: web.Request) -> web.Response:
    policy = request.app[POLICY_SOURCE].policy
    stats, (pauses, pauses_error) = await asyncio.gather(hour_stats(request), _pauses(request))
    rows = []
    for name, spec in sorted(policy.agents.items()):
        s = stats["agents"].get(name, {})
        rows.append({"spec": spec, "calls": s.get("calls", 0), "denied": s.get("denied", 0),
                     "refused": s.get("refused", 0), "last_us": s.get("last_us") or None,
                     "pause": pause_of(pauses, name) if pauses else None, "own": bool(pauses and name in pauses)})
    found = pauses or {}
    return render(request, "agents.html", "agents", {
        "rows": rows, "stats": stats, "fleet": request.app.get(FLEET_STORE) is not None,
        "pauses_known": pauses is not None, "pauses_error": pauses_error, "all_paused": found.get(ALL_AGENTS),
        "others": [p for a, p in sorted(found.items()) if a != ALL_AGENTS and a not in policy.agents],
        "all_agents": ALL_AGENTS,
    })


async def agents_json(request: web.Request) -> web.Response:
    """`GET /api/agents`: every agent of the rules with its calls, denials and last call in the last hour, and
    with a fleet store the pause that applies to it (a store that cannot answer: 503, never "not paused")."""
    policy = request.app[POLICY_SOURCE].policy
    stats, (pauses, pauses_error) = await asyncio.gather(hour_stats(request), _pauses(request))
    if pauses_error is not None:
        from bastion.dashboard.fleet_api import store_unavailable

        return store_unavailable(StoreUnavailable(pauses_error))
    out = []
    for name, spec in sorted(policy.agents.items()):
        s = stats["agents"].get(name, {})
        item = {**spec.to_json(), "calls_1h": s.get("calls", 0), "denied_1h": s.get("denied", 0),
                "refused_1h": s.get("refused", 0),
                "last_seen": fmt_time(s["last_us"], True) if s.get("last_us") else None}
        if pauses is not None:
            pause = pause_of(pauses, name)
            item["paused"] = pause.to_json() if pause else None
        out.append(item)
    answer: dict[str, Any] = {"agents": out, "counted": stats["available"]}
    if pauses is not None:
        star = pauses.get(ALL_AGENTS)
        answer["all_paused"] = star.to_json() if star else None
    return web.json_response(answer)


async def milestones(request: web.Request) -> web.Response:
    """The live milestones; admins may complete one by hand or clear one (JSON twin: `GET /api/milestones`)."""
    store = request.app.get(FLEET_STORE)
    found: list[Any] = []
    error = None if store is not None else "This listener has no fleet store."
    if store is not None:
        try:
            found = await store.list_milestones()
        except StoreUnavailable as e:
            error = str(e)
    return render(request, "milestones.html", "milestones", {"milestones": found, "error": error,
                                                             "now": time.time()})


async def budgets(request: web.Request) -> web.Response:
    """Each budget of the rules with its current windows (JSON twin: `GET /api/budgets`)."""
    store = request.app.get(FLEET_STORE)
    policy = request.app[POLICY_SOURCE].policy
    usage: list[Any] = []
    error = None if store is not None else "This listener has no fleet store."
    if store is not None:
        try:
            usage = await store.list_budgets()
        except StoreUnavailable as e:
            error = str(e)
    rows = [{"b": b, "windows": [u for u in usage if u.budget == b.id]} for b in policy.budgets]
    return render(request, "budgets.html", "budgets", {"rows": rows, "error": error, "now": time.time()})


async def rules(request: web.Request) -> web.Response:
    source = request.app[POLICY_SOURCE]
    policy = source.policy
    stats = await hour_stats(request)
    hits = stats["rules"]
    rows = [{"rule": r, "hits": hits.get(r.id, 0)} for r in sorted(policy.rules, key=lambda r: r.id)]
    return render(request, "rules.html", "rules", {
        "state": source.to_json(), "rows": rows, "stats": stats,
        "never_hit": [r["rule"].id for r in rows if not r["hits"]] if stats["available"] else [],
    })


def fmt_time(value: float | int | None, micro: bool = False) -> str:
    if value is None:
        return "—"
    return iso_time(value / 1_000_000 if micro else value)


def fmt_duration_us(value: int | None) -> str:
    if value is None:
        return "—"
    if value < 1000:
        return f"{value} µs"
    if value < 1_000_000:
        return f"{value / 1000:.1f} ms"
    return f"{value / 1_000_000:.2f} s"


def fmt_bytes(value: int | None) -> str:
    if not value:
        return "0 B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value} B"


def fmt_left(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds}s"


FILTERS = {"time": fmt_time, "duration": fmt_duration_us, "bytes": fmt_bytes, "left": fmt_left, "span": fmt_span}
