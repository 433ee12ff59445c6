"""`bastion dashboard`: the dashboard and JSON API without a proxy, over a fleet's shared store and audit sink.

Sidecars write; this process reads the audit sink (`--audit`, PostgreSQL for a fleet), reads and decides
approvals and administers locks, pauses, milestones and budgets in the shared store (`--store`, Redis for a
fleet). A decision or pause taken here reaches the sidecars through the store, as one taken in any sidecar's API
would. Users and roles come from `--rules`, reloaded when the files change, on SIGHUP and on
`POST /api/rules/reload`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from aiohttp import web

from bastion.config import ConfigError, add_home_args, add_rules_arg, data_settings, parse_hostport, resolve_rules

log = logging.getLogger("bastion")

DEFAULT_ADMIN = "127.0.0.1:8081"


def register(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="run the dashboard alone, over a fleet's store and audit sink",
                       description="Serve the dashboard and JSON API without a proxy, reading the shared store "
                       "(--store) and audit sink (--audit) that the sidecars write.")
    add_rules_arg(p)
    p.add_argument("--admin", metavar="HOST:PORT", help=f"listen address (BASTION_ADMIN, default {DEFAULT_ADMIN})")
    add_home_args(p)
    p.set_defaults(handler=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    import os

    from bastion.logs import configure_logging

    try:
        data = data_settings(args)
        admin = parse_hostport(args.admin or os.environ.get("BASTION_ADMIN") or DEFAULT_ADMIN, "--admin")
        rules = resolve_rules(args.rules)
        if not rules:
            raise ConfigError("the dashboard needs the rules (its users and roles): pass --rules or BASTION_RULES")
    except ConfigError as e:
        print(f"bastion dashboard: error: {e}", file=sys.stderr)
        return 2
    configure_logging()
    return asyncio.run(run(data, admin, rules))


async def run(data: Any, admin: tuple[str, int], rules: list[str]) -> int:
    from bastion.audit.sinks import StoreError as AuditStoreError
    from bastion.audit.sinks import open_store as open_audit
    from bastion.coord import open_approval_store, open_fleet_store, open_store
    from bastion.coord.notify import ApprovalNotifier
    from bastion.dashboard.app import create_app
    from bastion.policy.load import PolicyLoadError
    from bastion.proxy.reload import RulesWatcher, cancel_and_wait
    from bastion.proxy.state import PolicyState

    try:
        state = await PolicyState.load(rules)
    except PolicyLoadError as e:
        for issue in e.issues:
            print(issue, file=sys.stderr)
        print(f"bastion dashboard: the policy is invalid ({len(e.issues)} problem(s)); not starting", file=sys.stderr)
        return 3
    try:
        await asyncio.to_thread(data.home.ensure)
        locks = open_store(data.store)
        approvals = open_approval_store(data.store)
        fleet = open_fleet_store(data.store)
        audit = open_audit(data.audit)
    except (ConfigError, AuditStoreError, OSError) as e:
        print(f"bastion dashboard: error: {e}", file=sys.stderr)
        return 2
    notifier = ApprovalNotifier(lambda: state.policy.approvals)
    app = create_app(state, lock_store=locks, audit_store=audit, approval_store=approvals, notify=notifier,
                     fleet_store=fleet, home=data.home.path, mode="dashboard")
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, admin[0], admin[1]).start()
        except OSError as e:
            print(f"bastion dashboard: cannot listen on {admin[0]}:{admin[1]}: {e.strerror or e}", file=sys.stderr)
            return 1
        host, port = runner.addresses[0][:2]
        print(f"bastion: dashboard on http://{host}:{port} (policy {state.policy.revision[:12]}, store "
              f"{locks.backend}, audit {audit.display_url})", flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(state.reload("sighup")))

        async def on_change() -> None:
            await state.reload("watch")

        watcher = asyncio.create_task(RulesWatcher(rules, on_change).run(), name="rules-watcher")
        await stop.wait()
        await cancel_and_wait(watcher)
        return 0
    finally:
        await runner.cleanup()
        await notifier.flush(2.0)
        await notifier.close()
        for closer in (locks.close, approvals.close, fleet.close, audit.close):
            try:
                await closer()
            except Exception as e:
                log.warning("while closing: %s", e)
