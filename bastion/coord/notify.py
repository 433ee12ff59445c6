"""Telling people about approvals: the rules' `approvals.webhook`, called on a new pending approval and on
its decision.

The body is JSON for programs plus a Slack-compatible `text` (an incoming-webhook URL of Slack, Mattermost or
Rocket.Chat shows it as is). It names the agent, the call's method and (redacted) URL, the rules and a link
to the approval (`approvals.link` + `/approvals/<id>`), never the request body: chat channels are read by
more people than approvers, and the body is one click away for those who may see it.

Each delivery carries `Idempotency-Key: <approval id>:<event>` (a retry or a second sidecar re-sending the
same event is recognisable), `X-Bastion-Timestamp` and, when `secret_env` names a variable holding a secret,
`X-Bastion-Signature: sha256=HEX`, the HMAC-SHA256 of `"<timestamp>.<body>"` (the receiver recomputes it
and refuses stale timestamps). Deliveries run in the background, are retried with growing delays on network
errors and 5xx/429 answers, are bounded in number, and are counted in `bastion_approval_notifications_total`:
a slow or dead webhook never delays a call or a decision.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from bastion.coord.approvals import Approval
from bastion.coord.store import iso_time
from bastion.metrics import APPROVAL_NOTIFICATIONS

log = logging.getLogger("bastion.approvals")

EVENTS = ("pending", "approved", "denied", "cancelled")
MAX_IN_FLIGHT = 256
"""Deliveries (with their retries) in progress at once; more are dropped and counted."""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def approval_link(base: str | None, approval_id: str) -> str | None:
    return None if not base else f"{base.rstrip('/')}/approvals/{approval_id}"


def slack_escape(text: str) -> str:
    """Agent-controlled text inside Slack mrkdwn: `&`, `<`, `>` escaped as Slack asks (so a URL cannot forge a
    link), backticks replaced (so it cannot leave its code span)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "'")


def payload(event: str, a: Approval, link: str | None) -> dict[str, Any]:
    """What the webhook receives (pure, for tests and for the CLI). `text` is Slack mrkdwn; the other fields
    are plain values for programs."""
    method, url = a.preview.get("method", "?"), a.preview.get("url", "?")
    shown = slack_escape(f"{method} {url}")
    rules = ", ".join(a.rules)
    who = " or ".join(" and ".join(g) for g in a.approvers)
    where = f"<{link}|review it>" if link else f"`bastion approvals show {a.id}`"
    if event == "pending":
        text = (f"Approval needed: agent *{a.agent}* wants to `{shown}` (rule {rules}). Approvers: {who}; "
                f"expires {iso_time(a.expires_at)}. {where}")
    else:
        note = f": {slack_escape(a.note)}" if a.note else ""
        text = (f"Approval {a.id} {event} by {a.decided_by or 'nobody'}{note} (agent *{a.agent}*, "
                f"`{shown}`). {where}")
    return {
        "event": f"approval.{event}", "approval_id": a.id, "state": a.state, "agent": a.agent,
        "rules": list(a.rules),
        "method": method, "url": url, "approvers": [list(g) for g in a.approvers],
        "created_at": iso_time(a.created_at), "expires_at": iso_time(a.expires_at),
        "decided_by": a.decided_by, "note": a.note, "link": link, "text": text,
    }


class ApprovalNotifier:
    """Callable `(event, approval)`; reads the webhook settings from `settings()` (the current policy's
    `approvals`) at each delivery, so a reload takes effect at once."""

    def __init__(self, settings: Callable[[], Any], *, attempts: int = 5, first_delay: float = 1.0,
                 concurrency: int = 4) -> None:
        self._settings = settings
        self._attempts = attempts
        self._first_delay = first_delay
        self._tasks: set[asyncio.Task[None]] = set()
        self._gate = asyncio.Semaphore(concurrency)
        self._session: Any = None

    def __call__(self, event: str, approval: Approval) -> None:
        settings = self._settings()
        if settings is None or not settings.webhook_url:
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            APPROVAL_NOTIFICATIONS.labels("dropped").inc()
            log.warning("approval webhook: %d deliveries in flight, dropping %s of %s", len(self._tasks), event,
                        approval.id)
            return
        task = asyncio.get_running_loop().create_task(self._deliver(event, approval, settings))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event: str, approval: Approval, settings: Any) -> None:
        import aiohttp

        body = json.dumps(payload(event, approval, approval_link(settings.link, approval.id)),
                          separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "bastion-approvals",
                   "Idempotency-Key": f"{approval.id}:{event}", "X-Bastion-Event": f"approval.{event}"}
        secret = os.environ.get(settings.webhook_secret_env) if settings.webhook_secret_env else None
        if settings.webhook_secret_env and not secret:
            APPROVAL_NOTIFICATIONS.labels("unsigned").inc()
            log.error("approval webhook: %s is not set, so %s of %s is not sent (the receiver would not trust it "
                      "unsigned)", settings.webhook_secret_env, event, approval.id)
            return
        delay = self._first_delay
        for attempt in range(1, self._attempts + 1):
            stamp = str(int(time.time()))
            headers["X-Bastion-Timestamp"] = stamp
            if secret:
                headers["X-Bastion-Signature"] = sign(secret.encode(), stamp, body)
            problem: str
            try:
                async with self._gate:
                    if self._session is None:
                        self._session = aiohttp.ClientSession(trust_env=False)
                    async with self._session.post(settings.webhook_url, data=body, headers=headers,
                                                  timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout),
                                                  allow_redirects=False) as resp:
                        await resp.read()
                        if resp.status < 300:
                            APPROVAL_NOTIFICATIONS.labels("sent").inc()
                            return
                        problem = f"HTTP {resp.status}"
                        if resp.status < 500 and resp.status != 429:  # the receiver refuses it: retrying won't help
                            break
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                problem = str(e) or type(e).__name__
            if attempt < self._attempts:
                APPROVAL_NOTIFICATIONS.labels("retried").inc()
                await asyncio.sleep(delay)
                delay *= 2
        APPROVAL_NOTIFICATIONS.labels("failed").inc()
        log.warning("approval webhook: gave up on %s of %s: %s", event, approval.id, problem)

    async def flush(self, seconds: float) -> None:
        """Wait up to `seconds` for deliveries in flight (the CLI, before it exits)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=seconds)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        if self._session is not None:
            await self._session.close()
            self._session = None
