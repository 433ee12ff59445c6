"""Audit flows in the admin API: list, read one full request/response pair, download it as HAR.

Routes; any user with the viewer, approver or admin role may read (see `auth`):

- `GET /api/flows[?agent=&decision=&outcome=&host=&q=&model=&tool=&limit=&before=]` ->
  `{"flows": [summary, ...], "next": CURSOR}`, newest first. `decision` is the enforced effect (allow, deny,
  hold), `outcome` how the exchange ended (forwarded, refused, upstream_error, client_gone), `q` a substring of
  the URL or an exact record id, `model` an LLM model asked for or served, `tool` a tool called over MCP or by
  the model (exact names; see `RecordQuery`), `limit` 1..1000 (default 50), `before` the `next` of the previous
  page (null on the last page). A summary carries `llm` (`{"model", "input_tokens", "output_tokens"}` or null),
  `tool` (the MCP tool, else the model's first tool call, or null) and `mcp_method` (or null).
- `GET /api/flows/{id}` -> the record as stored (`bastion.audit/1`): identity, request and response with
  headers and body content, decision, locks, approval, timings, chain position and hash.
- `GET /api/flows/{id}/har` -> a one-entry HAR 1.2 document, as a download.

Records come from the audit store (`--audit`), already redacted; a record still in a sidecar's spool
appears once it drained. The store is read through its own connection, opened on first use, so the admin
listener starts even while the store is down; then these routes answer 503 `audit_unavailable`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from bastion.audit.display import first_tool, llm_brief, mcp_method
from bastion.audit.har import har_log
from bastion.audit.record import OUTCOMES, AuditRecord
from bastion.audit.sinks import AuditStore, RecordQuery, StoreError
from bastion.audit.sinks.base import parse_page_key
from bastion.dashboard.auth import json_error
from bastion.dashboard.keys import AUDIT_READER

log = logging.getLogger("bastion.dashboard")

_OPENED = web.AppKey("bastion_audit_reader_opened", asyncio.Lock)

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
DECISIONS = ("allow", "deny", "hold")
MAX_NAME = 1000


def install(app: web.Application, store: AuditStore) -> None:
    """Add the flow routes, reading from `store` (not yet opened; its owner closes it)."""
    app[AUDIT_READER] = store
    app[_OPENED] = asyncio.Lock()
    app.router.add_get("/api/flows", list_flows)
    app.router.add_get("/api/flows/{id}", get_flow)
    app.router.add_get("/api/flows/{id}/har", get_flow_har)


class _BadQuery(Exception):
    pass


async def _store(request: web.Request) -> AuditStore:
    """The opened store. `open` is idempotent; the lock keeps concurrent first requests from racing it."""
    store = request.app[AUDIT_READER]
    async with request.app[_OPENED]:
        await store.open()
    return store


def _unavailable(error: Exception) -> web.Response:
    log.warning("audit flows API: the audit store cannot be read: %s", error or type(error).__name__)
    return json_error(503, "audit_unavailable", "The audit store cannot be read right now; try again shortly.",
                      {"Retry-After": "5"})


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def summary(record: AuditRecord) -> dict[str, Any]:
    """One line of a flow listing: enough to find and triage a call without its headers and bodies."""
    req, resp = record.request, record.response
    return {
        "id": record.id,
        "started": _iso(record.started_us),
        "started_us": record.started_us,
        "duration_us": record.timings.total_us,
        "agent": record.agent,
        "auth": record.identity.auth,
        "method": req.method,
        "url": req.url,
        "host": req.host,
        "status": resp.status if resp else None,
        "decision": record.effect,
        "rules": list(record.decision.rules) if record.decision else [],
        "outcome": record.outcome,
        "error": record.error.type if record.error else None,
        "request_bytes": req.body.size if req.body else 0,
        "response_bytes": resp.body.size if resp and resp.body else 0,
        "streamed": bool(resp and resp.streamed),
        "locks": sorted({lk.key for lk in record.locks}),
        "approval": record.approval.id if record.approval else None,
        "llm": llm_brief(record.extra),
        "tool": first_tool(record.extra),
        "mcp_method": mcp_method(record.extra),
    }


def _query(request: web.Request) -> RecordQuery:
    params = request.query
    decision = params.get("decision") or None
    if decision is not None and decision not in DECISIONS:
        raise _BadQuery(f"decision must be one of {', '.join(DECISIONS)}")
    outcome = params.get("outcome") or None
    if outcome is not None and outcome not in OUTCOMES:
        raise _BadQuery(f"outcome must be one of {', '.join(OUTCOMES)}")
    limit = DEFAULT_LIMIT
    if params.get("limit"):
        try:
            limit = int(params["limit"])
        except ValueError:
            raise _BadQuery("limit must be a whole number") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise _BadQuery(f"limit must be between 1 and {MAX_LIMIT}")
    cursor = params.get("before") or None
    if cursor is not None:
        try:
            parse_page_key(cursor)
        except StoreError:
            raise _BadQuery("before must be the `next` cursor of a previous page") from None
    return RecordQuery(agent=params.get("agent") or None, effect=decision, outcome=outcome,
                       host=params.get("host") or None, text=params.get("q") or None,
                       model=_name(params, "model"), tool=_name(params, "tool"), limit=limit, cursor=cursor)


def _name(params: Any, key: str) -> str | None:
    """An exact-name filter (`model`, `tool`). Model and tool names are short; a longer value is refused rather
    than compared against every record the walk reaches."""
    value = params.get(key) or None
    if value is not None and len(value) > MAX_NAME:
        raise _BadQuery(f"{key} must be at most {MAX_NAME} characters")
    return value


async def list_flows(request: web.Request) -> web.Response:
    try:
        query = _query(request)
    except _BadQuery as e:
        return json_error(400, "bad_request", str(e))
    try:
        store = await _store(request)
        page = await store.query(query)
    except (StoreError, OSError) as e:
        return _unavailable(e)
    return web.json_response({"flows": [summary(r) for r in page.records], "next": page.next})


async def _record(request: web.Request) -> AuditRecord | web.Response:
    record_id = request.match_info["id"]
    try:
        store = await _store(request)
        record = await store.get(record_id)
    except (StoreError, OSError) as e:
        return _unavailable(e)
    if record is None:
        return json_error(404, "not_found", f"No audit record {record_id!r} (a record still in a sidecar's "
                                            "spool appears once it drained).")
    return record


async def get_flow(request: web.Request) -> web.Response:
    record = await _record(request)
    if isinstance(record, web.Response):
        return record
    return web.json_response(record.to_json(with_content=True, with_hash=True),
                             dumps=lambda obj: json.dumps(obj, ensure_ascii=False))


async def get_flow_har(request: web.Request) -> web.Response:
    record = await _record(request)
    if isinstance(record, web.Response):
        return record
    name = re.sub(r"[^A-Za-z0-9_-]", "", record.id)[:64] or "record"
    return web.Response(text=json.dumps(har_log([record]), ensure_ascii=False), content_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="flow-{name}.har"'})
