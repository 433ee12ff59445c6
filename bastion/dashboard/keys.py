"""The aiohttp app keys the dashboard's modules share, and the types of what they hold.

A leaf module: it imports nothing from the dashboard, so `app` (which installs every area) and the areas
(which read these keys) both import it and never each other's keys.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web


class ReloadOutcome(Protocol):
    ok: bool

    def to_json(self) -> dict[str, Any]: ...


class PolicySource(Protocol):
    """The active policy and how to reload it (`bastion.proxy.state.PolicyState` is one)."""

    @property
    def policy(self) -> Any: ...

    def to_json(self) -> dict[str, Any]: ...

    async def reload(self, trigger: str) -> ReloadOutcome: ...


ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]

POLICY_SOURCE = web.AppKey("bastion_policy_source", PolicySource)
READY_CHECKS = web.AppKey("bastion_ready_checks", list)
"""(name, check) pairs `/readyz` runs; areas with a store of their own append theirs."""
LOCK_STORE: web.AppKey[Any] = web.AppKey("bastion_lock_store", object)
FLEET_STORE: web.AppKey[Any] = web.AppKey("bastion_fleet_store", object)
"""The `bastion.coord.fleet.FleetStore` (pauses, milestones, budgets), when the app was given one."""
APPROVAL_STORE: web.AppKey[Any] = web.AppKey("bastion_approval_store", object)
AUDIT_READER: web.AppKey[Any] = web.AppKey("bastion_audit_reader", object)
NOTIFY: web.AppKey[Any] = web.AppKey("bastion_approval_notify", object)
SESSIONS: web.AppKey[Any] = web.AppKey("bastion_sessions", object)
MODE: web.AppKey[str] = web.AppKey("bastion_mode", str)
""""sidecar" (the admin listener of `bastion serve`) or "dashboard" (`bastion dashboard`, no proxy)."""
