"""The admin listener's aiohttp application: the dashboard, health, readiness, metrics and the JSON API.

It runs on the proxy's event loop (one process, one loop), or alone in `bastion dashboard`, so handlers must
never block: everything here reads in-memory state or awaits. Routes:

- `GET /healthz`: the process is alive.
- `GET /readyz`: a policy is loaded and every registered readiness check passes (503 otherwise, e.g. while
  shutting down, so a load balancer stops sending work).
- `GET /metrics`: Prometheus text format.
- `GET /api/rules`: the active policy, its sources and revision, and the last reload attempt with errors.
- `POST /api/rules/reload`: reload now (role `admin`); 200 when the new policy is active, 422 with the
  `FILE:LINE` errors when it is invalid (the old policy stays).

Other areas add their routes (`locks_api`, `flows_api`, `approvals_api`, `fleet_api`); the HTML pages and their forms
are `pages` and `forms`, over the same stores, behind the same authentication (`auth`: Bearer tokens or a
browser session, CSRF-checked) and with the same headers on every answer (`security`: CSP and friends).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from bastion import metrics
from bastion.dashboard.auth import UserDirectory, auth_middleware, require
from bastion.dashboard.keys import MODE, POLICY_SOURCE, READY_CHECKS, SESSIONS, PolicySource, ReadyCheck

HERE = Path(__file__).resolve().parent


def create_app(source: PolicySource, *, ready_checks: Sequence[tuple[str, ReadyCheck]] = (),
               lock_store: Any = None, audit_store: Any = None, approval_store: Any = None,
               notify: Any = None, fleet_store: Any = None, home: Path | None = None,
               mode: str = "sidecar") -> web.Application:
    """The admin app. `home` keeps the sessions' key (`<home>/dashboard.key`), so sessions outlive a
    restart; `mode` is "sidecar" or "dashboard" (`bastion dashboard`: no proxy of its own)."""
    import aiohttp_jinja2
    import jinja2

    from bastion.dashboard import forms, pages
    from bastion.dashboard.security import add_security_headers
    from bastion.dashboard.session import SessionCodec, load_key

    def directory() -> UserDirectory:
        return source.policy  # type: ignore[no-any-return]

    codec = SessionCodec(load_key(home))
    app = web.Application(middlewares=[auth_middleware(directory, codec)], client_max_size=1 << 20)
    app[POLICY_SOURCE] = source
    app[READY_CHECKS] = list(ready_checks)
    app[SESSIONS] = codec
    app[MODE] = mode
    app[pages.STREAMS] = set()
    app[pages.STATS] = {}
    app.on_response_prepare.append(add_security_headers)
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                               autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                               undefined=jinja2.StrictUndefined)
    app[aiohttp_jinja2.static_root_key] = "/static"
    env.filters.update(pages.FILTERS)
    env.globals["lock_path"] = forms.lock_path
    env.globals["agent_path"] = forms.agent_path
    env.globals["milestone_path"] = forms.milestone_path
    app.router.add_static("/static/", HERE / "static", append_version=True)
    app.router.add_get("/login", forms.login_page)
    app.router.add_post("/login", forms.login)
    app.router.add_post("/logout", forms.logout)
    app.router.add_get("/", pages.overview)
    app.router.add_get("/flows", pages.flows)
    app.router.add_get("/flows/stream", pages.flow_stream)
    app.router.add_get("/flows/{id}", pages.flow_detail)
    app.router.add_get("/approvals", pages.approvals)
    app.router.add_get("/approvals/{id}", pages.approval_detail)
    app.router.add_post("/approvals/{id}/{verdict}", forms.decide)
    app.router.add_get("/locks", pages.locks)
    app.router.add_post(r"/locks/{key:[\s\S]+}/{action:release|handoff}", forms.lock_action)
    app.router.add_get("/agents", pages.agents)
    app.router.add_get("/api/agents", pages.agents_json)
    app.router.add_post("/agents/{name}/{action:pause|resume}", forms.agent_action)
    app.router.add_get("/milestones", pages.milestones)
    app.router.add_post("/milestones", forms.milestone_new)
    app.router.add_post(r"/milestones/{key:[\s\S]+}/{action:complete|clear}", forms.milestone_action)
    app.router.add_get("/budgets", pages.budgets)
    app.router.add_get("/rules", pages.rules)
    app.router.add_post("/rules/reload", forms.reload_rules)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/api/rules", get_rules)
    app.router.add_post("/api/rules/reload", post_reload)
    if lock_store is not None:  # a `bastion.coord.LockStore`: lock routes and the store's readiness check
        from bastion.dashboard import locks_api

        locks_api.install(app, lock_store)
    if audit_store is not None:  # a `bastion.audit.AuditStore` to read flows from (its owner closes it)
        from bastion.dashboard import flows_api

        flows_api.install(app, audit_store)
    if approval_store is not None:  # a `bastion.coord.approvals.ApprovalStore`; `notify` tells the webhook
        from bastion.dashboard import approvals_api

        approvals_api.install(app, approval_store, notify)
    if fleet_store is not None:  # a `bastion.coord.fleet.FleetStore`: pauses, milestones, budgets (owner closes)
        from bastion.dashboard import fleet_api

        fleet_api.install(app, fleet_store)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    source = request.app[POLICY_SOURCE]
    policy = source.policy
    checks: dict[str, dict[str, Any]] = {
        "policy": {"ok": policy is not None,
                   "detail": f"revision {policy.revision[:12]}" if policy is not None else "no policy loaded"},
    }
    for name, check in request.app[READY_CHECKS]:
        try:
            ok, detail = await check()
        except Exception as e:  # a failing check means "not ready", never a 500
            ok, detail = False, f"check failed: {e}"
        checks[name] = {"ok": ok, "detail": detail}
    ready = all(c["ok"] for c in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def get_rules(request: web.Request) -> web.Response:
    return web.json_response(request.app[POLICY_SOURCE].to_json())


async def post_reload(request: web.Request) -> web.Response:
    source = request.app[POLICY_SOURCE]
    require(request, source.policy, ["role:admin"], "Reloading the rules")
    result = await source.reload("api")
    return web.json_response({"ok": result.ok, "reload": result.to_json()}, status=200 if result.ok else 422)
