"""The aiohttp app keys the dashboard's modules share (a leaf module: it imports none of them)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

LOCK_STORE: web.AppKey[Any] = web.AppKey("bastion_lock_store", object)
FLEET_STORE: web.AppKey[Any] = web.AppKey("bastion_fleet_store", object)
"""The `bastion.coord.fleet.FleetStore` (pauses, milestones, budgets), when the app was given one."""
APPROVAL_STORE: web.AppKey[Any] = web.AppKey("bastion_approval_store", object)
AUDIT_READER: web.AppKey[Any] = web.AppKey("bastion_audit_reader", object)
NOTIFY: web.AppKey[Any] = web.AppKey("bastion_approval_notify", object)
SESSIONS: web.AppKey[Any] = web.AppKey("bastion_sessions", object)
MODE: web.AppKey[str] = web.AppKey("bastion_mode", str)
""""sidecar" (the admin listener of `bastion serve`) or "dashboard" (`bastion dashboard`, no proxy)."""
