"""Holding calls for a person's approval: the proxy stage that meets the `approval` obligation of a hold.

For an agent request whose decision is `hold`, in its `request` hook this stage

1. fingerprints the call (agent, method, normalized URL, canonical body hash) and asks the shared store
   (`ApprovalStore.admit`): a re-sent call joins its pending approval, uses an approved one (exactly once),
   is told about a denial or an expiry, or passes under an approver's grant; otherwise a new pending approval
   is opened with a redacted preview for the approver, and the webhook (if any) is told;
2. holds the agent's connection up to the rule's `approval.wait`, while `ApprovalWatch` polls the store for
   the approvals this sidecar's held calls wait on (a decision taken anywhere reaches it within a poll);
3. answers: approved -> the call goes upstream exactly once (taking the approval is atomic in the store, so
   of several identical held calls one passes and the others wait for an approval of their own); denied ->
   403 `approval_denied` with the approver's reason; nobody decided in time -> 403 `approval_expired`; still
   undecided at the end of the wait -> 409 `approval_pending` with the approval id, `Retry-After` and
   `x-should-retry: false` (LLM SDKs would otherwise retry a 409 by themselves).

A client that disconnects while held leaves its approval pending and nothing is sent upstream: an approval
is only ever used by a live call. The approval lives in the store, so the call survives a sidecar restart:
re-sent, it finds its approval again. The store being down refuses held calls with 503 `store_unavailable`
(fail closed). What happened is recorded for the audit in `flow.metadata[APPROVAL]`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http
from mitmproxy.connection import ConnectionState

from bastion.audit.bodies import DecodeError, decode_content
from bastion.audit.redact import Redactor
from bastion.coord.approvals import (
    PREVIEW_BODY_BYTES,
    Admission,
    Approval,
    ApprovalStore,
    HeldCall,
    fingerprint,
)
from bastion.coord.store import StoreUnavailable, iso_time
from bastion.metrics import APPROVAL_WAIT_SECONDS, APPROVALS, APPROVALS_PENDING
from bastion.proxy import flowmeta, responses

log = logging.getLogger("bastion.approvals")

APPROVAL_RATE_LIMITED = "approval_rate_limited"
APPROVAL_DENIED = "approval_denied"
APPROVAL_EXPIRED = "approval_expired"
APPROVAL_PENDING = "approval_pending"

POLL_INTERVAL = 0.25
"""How often the store is asked about the approvals held calls wait on (seconds)."""

PENDING_RETRY_AFTER_MAX = 60
"""`Retry-After` of a 409 `approval_pending` is the rule's wait, at most this (seconds)."""

PENDING_GAUGE_INTERVAL = 10.0

MAX_HELD = 1000
"""Connections one sidecar holds at once; a held call beyond it is answered 409 at once (its approval is still
opened or joined, so a re-send learns the decision)."""

MAX_HELD_PER_AGENT = 200
"""Connections one agent may have held on one sidecar at once (identical calls joining one approval count)."""

PREVIEW_HEADERS = 64
PREVIEW_HEADER_VALUE = 1024
"""The approver's preview keeps at most this many headers, each value cut to this many characters."""

MAX_HELD_BYTES = 256 << 20
"""Request bodies those held connections may keep in memory together (bytes); same answer beyond it."""


Notify = Callable[[str, Approval], None]

USED = "bastion.approval_used"
"""flow.metadata key: the id of the approval this call used (set once the store let it pass)."""


def client_gone(flow: http.HTTPFlow) -> bool:
    """Has the agent hung up on this held call? (Its connection can no longer send; mitmproxy marks that at
    once, while the flow's own error hook waits until our hook returns.)"""
    return flow.error is not None or not (flow.client_conn.state & ConnectionState.CAN_READ)


@dataclass(slots=True, eq=False)  # compared by identity: each waiter is one held call
class _Waiter:
    flow: http.HTTPFlow
    event: asyncio.Event = field(default_factory=asyncio.Event)
    result: Approval | str | None = None

    def wake(self, result: Approval | str) -> None:
        if not self.event.is_set():
            self.result = result
            self.event.set()


class ApprovalWatch:
    """One polling loop per sidecar for every approval its held calls wait on: one store round trip per
    `interval` however many calls are held. It runs only while something waits."""

    def __init__(self, store: ApprovalStore, interval: float = POLL_INTERVAL) -> None:
        self.store = store
        self.interval = interval
        self._waiting: dict[str, set[_Waiter]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def held(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def held_for(self, agent: str) -> int:
        return sum(1 for ws in self._waiting.values() for w in ws if w.flow.metadata.get(flowmeta.AGENT) == agent)

    async def wait(self, approval_id: str, flow: http.HTTPFlow, seconds: float) -> Approval | str:
        """The approval once it is no longer pending, or "timeout", "gone" (the client hung up), "missing"
        (the record vanished), "shutdown" (the sidecar is stopping), "paused" (the agent was paused)."""
        if self._closed:
            return "shutdown"
        waiter = _Waiter(flow)
        self._waiting.setdefault(approval_id, set()).add(waiter)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="approval-watch")
        try:
            await asyncio.wait_for(waiter.event.wait(), max(0.0, seconds))
        except TimeoutError:
            return "timeout"
        finally:
            waiters = self._waiting.get(approval_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiting[approval_id]
        assert waiter.result is not None
        return waiter.result

    async def _run(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(self.interval)
                for waiters in list(self._waiting.values()):
                    for w in list(waiters):
                        if client_gone(w.flow):
                            w.wake("gone")
                ids = list(self._waiting)
                if not ids:
                    break
                try:
                    changed = await self.store.decided(ids)  # one light query; records only for what changed
                    found = await self.store.get_many(changed) if changed else {}
                except StoreUnavailable as e:  # keep waiting: the store reconnects by itself
                    log.warning("cannot poll %d approval(s) held calls wait on: %s", len(ids), e)
                    continue
                except Exception:
                    log.exception("approval poll failed")
                    continue
                for approval_id in changed:
                    approval = found.get(approval_id)
                    if approval is None or approval.state != "pending":
                        for w in list(self._waiting.get(approval_id, ())):
                            w.wake(approval if approval is not None else "missing")
        finally:
            self._task = None

    def wake_agent(self, agent: str) -> None:
        """Stop holding the calls of `agent` (`*`: of everyone) now: it was paused. They come back "paused",
        with their approval obligation unmet, and the pause check after this stage refuses them."""
        for waiters in list(self._waiting.values()):
            for w in list(waiters):
                if agent == "*" or w.flow.metadata.get(flowmeta.AGENT) == agent:
                    w.wake("paused")

    def close(self) -> None:
        """Answer every held call now (409 pending: the approvals stay in the store for the re-sends)."""
        self._closed = True
        for waiters in list(self._waiting.values()):
            for w in list(waiters):
                w.wake("shutdown")


def _is_text(data: bytes, cut: bool) -> bool:
    """UTF-8 text? A body cut short may end inside a character: up to 3 trailing bytes are forgiven then."""
    for trim in range(4 if cut else 1):
        try:
            data[:len(data) - trim].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return True
    return False


class _Preview:
    """The approver's view of a call, redacted as the audit log would store it."""

    def __init__(self) -> None:
        self._redactors: dict[int, Redactor] = {}

    def redactor(self, policy: Any) -> Redactor:
        found = self._redactors.get(id(policy))
        if found is None:
            audit = policy.audit
            found = Redactor(headers=audit.redact_headers, json_keys=audit.redact_json_keys,
                             patterns=audit.redact_patterns)
            self._redactors = {id(policy): found}  # one policy at a time: a reload replaces it
        return found

    def build(self, flow: http.HTTPFlow, url: str, policy: Any) -> dict[str, Any]:
        redactor = self.redactor(policy).exchange()  # remembers what it masks: echoes are masked too
        found: list[str] = []
        req = flow.request
        body = req.raw_content or b""
        ctype = req.headers.get("content-type", "")
        encoding = req.headers.get("content-encoding", "")
        shown: str | None = None
        decoded, cut = body[:PREVIEW_BODY_BYTES], len(body) > PREVIEW_BODY_BYTES
        if encoding and body:  # show what the upstream will read, within a hard cap (no decompression bomb)
            try:
                out = decode_content(body, encoding, PREVIEW_BODY_BYTES)
                decoded, cut = out.data, out.cut
            except DecodeError:
                decoded = b"\x00"  # shown as binary: size and digest only
        text: bytes | None = None
        if decoded and b"\x00" not in decoded and _is_text(decoded, cut):
            text = redactor.body(decoded, ctype, "/request/body", found)
        fields = list(req.headers.items(multi=True))
        kept = redactor.headers(fields[:PREVIEW_HEADERS], "/request/headers", found)
        shown_url = redactor.url(url, "/request/url", found)
        echoes = redactor.echoes()  # a secret masked in one part, repeated in another (a token in the URL, say)
        if echoes is not None:
            kept = echoes.headers(kept, "/request/headers", found)
            shown_url = echoes.text(shown_url, "/request/url", found)
            if text is not None:
                text = echoes.body(text, ctype, "/request/body", found, cut=cut)
        if text is not None:
            shown = text.decode("utf-8", "replace")
        headers = [[k, v if len(v) <= PREVIEW_HEADER_VALUE else v[:PREVIEW_HEADER_VALUE] + "…"] for k, v in kept]
        if len(fields) > PREVIEW_HEADERS:
            headers.append(["…", f"{len(fields) - PREVIEW_HEADERS} more header(s) not shown"])
        return {
            "method": req.method, "url": shown_url, "headers": headers,
            "body": shown, "body_size": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_truncated": cut, "content_type": ctype, "content_encoding": encoding or None,
            "redacted": found,
        }


class HoldForApproval:
    """mitmproxy stage: holds `hold` decisions until a person decides (module docstring)."""

    def __init__(self, store: ApprovalStore, *, notify: Notify | None = None,
                 poll_interval: float = POLL_INTERVAL, max_held: int = MAX_HELD,
                 max_held_bytes: int = MAX_HELD_BYTES) -> None:
        self.store = store
        self.watch = ApprovalWatch(store, poll_interval)
        self._notify = notify
        self._preview = _Preview()
        self._max_held = max_held
        self._max_held_bytes = max_held_bytes
        self._held_bytes = 0
        self._opened: dict[str, collections.deque[float]] = {}

    def _reserve(self, agent: str, per_minute: int) -> float | None:
        """Reserve one of the `per_minute` new approvals `agent` may open on this sidecar per minute (the
        rules' `approvals.max_open_per_minute`): the reservation's stamp, or None when none is left. Joining
        or re-sending a call that has an approval never needs one: the limit only keeps an agent from flooding
        the people who approve with distinct calls. Reserved before the store is asked, so concurrent calls
        cannot overshoot; `_unreserve` gives back what was not used."""
        now = time.monotonic()
        recent = self._opened.setdefault(agent, collections.deque())
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        if len(recent) >= per_minute:
            return None
        recent.append(now)
        return now

    def _unreserve(self, agent: str, stamp: float | None) -> None:
        recent = self._opened.get(agent)
        if stamp is not None and recent is not None:
            with contextlib.suppress(ValueError):
                recent.remove(stamp)

    async def _admit(self, call: HeldCall, per_minute: int) -> Admission:
        stamp = self._reserve(call.agent, per_minute)
        try:
            admission = await self.store.admit(call, may_open=stamp is not None)
        except BaseException:
            self._unreserve(call.agent, stamp)
            raise
        if not admission.created:
            self._unreserve(call.agent, stamp)
        return admission

    def _room_to_hold(self, agent: str, size: int) -> bool:
        return (self.watch.held < self._max_held and self._held_bytes + size <= self._max_held_bytes
                and self.watch.held_for(agent) < MAX_HELD_PER_AGENT)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response is not None:
            return None
        pending = flow.metadata.get(flowmeta.OBLIGATIONS)
        if not pending or flowmeta.OBLIGATION_APPROVAL not in pending:
            return None
        return self._hold(flow)

    async def _hold(self, flow: http.HTTPFlow) -> None:
        started = time.monotonic()
        try:
            await self._decide(flow, started)
        except StoreUnavailable as e:
            self._store_unavailable(flow, e)
        except Exception:
            log.exception("approval handling failed (request_id=%s)", flow.metadata.get(flowmeta.REQUEST_ID))
            if flow.response is None:
                responses.refuse(flow, 500, responses.INTERNAL_ERROR,
                                 "Bastion could not handle the approval of this call; it was not forwarded.")
        finally:
            if flowmeta.APPROVAL in flow.metadata:
                waited = time.monotonic() - started
                flow.metadata[flowmeta.APPROVAL]["waited_s"] = waited
                APPROVAL_WAIT_SECONDS.observe(waited)

    def _held_call(self, flow: http.HTTPFlow) -> HeldCall:
        meta = flow.metadata
        decision = meta[flowmeta.DECISION]
        spec = decision.approval
        facts = meta[flowmeta.FACTS]
        policy = meta[flowmeta.POLICY]
        agent: str = meta[flowmeta.AGENT]
        port = "" if (facts.scheme, facts.port) in (("http", 80), ("https", 443)) else f":{facts.port}"
        host = f"[{facts.host}]" if ":" in facts.host else facts.host
        url = f"{facts.scheme}://{host}{port}{facts.forward_target}"
        spec_owner = policy.agents.get(agent)
        return HeldCall(
            fingerprint=fingerprint(agent, facts.method, url, flow.request.raw_content,
                                    flow.request.headers.get("content-type", ""),
                                    flow.request.headers.items(multi=True),
                                    [sorted(spec.rules), [list(g) for g in spec.approvers], spec.required]),
            agent=agent, owner=spec_owner.owner if spec_owner is not None else None, rules=spec.rules,
            approvers=spec.approvers, required=spec.required, timeout=spec.timeout, use_within=spec.use_within,
            grants_allowed=spec.grants, preview=self._preview.build(flow, url, policy),
            request_id=meta[flowmeta.REQUEST_ID], revision=decision.revision,
        )

    async def _decide(self, flow: http.HTTPFlow, started: float) -> None:
        meta = flow.metadata
        spec = meta[flowmeta.DECISION].approval
        call = self._held_call(flow)
        deadline = started + spec.wait
        per_minute = meta[flowmeta.POLICY].approvals.max_open_per_minute
        admission = await self._admit(call, per_minute)
        while True:
            approval = admission.approval
            if admission.verdict == "throttled":
                return self._throttled(flow, call, per_minute)
            if admission.verdict == "granted":
                grant = admission.grant
                assert grant is not None
                APPROVALS.labels("granted").inc()
                self._record(flow, grant.id, "granted", grant.by, f"grant until {iso_time(grant.until)}")
                return self._release(flow)
            assert approval is not None
            if admission.verdict == "pass":
                APPROVALS.labels("executed").inc()
                self._record(flow, approval.id, "consumed", approval.decided_by, approval.note)
                meta[USED] = approval.id
                return self._release(flow)
            if admission.verdict == "denied":
                return self._denied(flow, approval)
            if admission.verdict == "expired":
                return self._expired(flow, approval)
            if admission.created:
                log.info("call held for approval %s: agent=%s rules=%s %s %s (request_id=%s)", approval.id,
                         call.agent, ",".join(call.rules), call.preview["method"], call.preview["url"],
                         call.request_id)
                APPROVALS_PENDING.inc()
                if self._notify is not None:
                    self._notify("pending", approval)
            size = len(flow.request.raw_content or b"")
            if not self._room_to_hold(call.agent, size):
                log.warning("holding %d calls (%d body bytes) already: answering approval %s at once",
                            self.watch.held, self._held_bytes, approval.id)
                return self._pending(flow, approval, spec.wait)
            now_wall, now_mono = time.time(), time.monotonic()
            until = min(deadline, now_mono + (approval.expires_at - now_wall))
            self._held_bytes += size
            try:
                outcome = await self.watch.wait(approval.id, flow, until - now_mono)
            finally:
                self._held_bytes -= size
            if outcome == "paused":  # the agent was paused meanwhile: the pause check after this stage refuses it
                self._record(flow, approval.id, "pending", None, "not waited for: the agent was paused")
                return None
            if isinstance(outcome, str):
                if outcome == "timeout" and time.time() >= approval.expires_at:
                    told = await self.store.report_expiry(approval.id)
                    if told is not None and told.state != "pending":
                        outcome = told
                if isinstance(outcome, str):
                    return self._pending(flow, approval, spec.wait, gone=outcome == "gone")
            if outcome.state == "approved":
                if client_gone(flow):  # never use an approval for a call nobody waits for
                    return self._pending(flow, outcome, spec.wait, gone=True)
                used = await self.store.consume(outcome.id, call.request_id)
                if used is not None:
                    APPROVALS.labels("executed").inc()
                    self._record(flow, used.id, "approved", used.decided_by, used.note)
                    meta[USED] = used.id
                    return self._release(flow)
                admission = await self._admit(call, per_minute)  # another identical call took it: ask again
                continue
            if outcome.state == "denied":
                return self._denied(flow, outcome)
            if outcome.state == "cancelled":
                return self._denied(flow, outcome, cancelled=True)
            if outcome.state == "expired":
                told = await self.store.report_expiry(outcome.id)
                return self._expired(flow, told or outcome)
            # executed or lapsed meanwhile: this call needs an approval of its own
            admission = await self._admit(call, per_minute)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A call that used an approval but was then refused by Bastion itself (a later stage: a task lock held
        by another agent, say) never reached the upstream: give the approval back for the re-send."""
        approval_id = flow.metadata.get(USED)
        if approval_id is None or flowmeta.REFUSAL not in flow.metadata:
            return None
        return self._give_back(flow, approval_id)

    async def _give_back(self, flow: http.HTTPFlow, approval_id: str) -> None:
        request_id = flow.metadata[flowmeta.REQUEST_ID]
        try:
            if await self.store.give_back(approval_id, request_id):
                log.info("approval %s given back: the call was refused before it was sent (request_id=%s)",
                         approval_id, request_id)
                flow.metadata[flowmeta.APPROVAL]["state"] = "given_back"
        except StoreUnavailable as e:
            log.warning("could not give back approval %s of a refused call: %s", approval_id, e)

    # -- outcomes -------------------------------------------------------------------------------------------

    @staticmethod
    def _record(flow: http.HTTPFlow, approval_id: str, state: str, decided_by: str | None,
                note: str | None) -> None:
        flow.metadata[flowmeta.APPROVAL] = {"id": approval_id, "state": state, "decided_by": decided_by,
                                            "note": note, "waited_s": 0.0}

    @staticmethod
    def _release(flow: http.HTTPFlow) -> None:
        flow.metadata[flowmeta.OBLIGATIONS].discard(flowmeta.OBLIGATION_APPROVAL)

    def _denied(self, flow: http.HTTPFlow, a: Approval, *, cancelled: bool = False) -> None:
        self._record(flow, a.id, "cancelled" if cancelled else "denied", a.decided_by, a.note)
        reason = a.note or "no reason given"
        what = "cancelled" if cancelled else "denied"
        message = (f"A person ({a.decided_by or 'unknown'}) {what} this call (approval {a.id}, rule "
                   f"{', '.join(a.rules)}): {reason}. Do not send it again; change the plan.")
        responses.refuse(flow, 403, APPROVAL_DENIED, message, rule=a.rules[0] if a.rules else None,
                         headers={"x-should-retry": "false"},
                         extra={"approval_id": a.id, "reason": a.note, "decided_by": a.decided_by})

    def _expired(self, flow: http.HTTPFlow, a: Approval) -> None:
        APPROVALS.labels("expired").inc()
        self._record(flow, a.id, "expired", None, None)
        message = (f"Nobody decided on this call in time (approval {a.id}, rule {', '.join(a.rules)}), so it "
                   "expired and was not sent. Sending the same call again asks for a new approval.")
        responses.refuse(flow, 403, APPROVAL_EXPIRED, message, rule=a.rules[0] if a.rules else None,
                         headers={"x-should-retry": "false"},
                         extra={"approval_id": a.id, "reason": "expired"})

    def _pending(self, flow: http.HTTPFlow, a: Approval, wait: float, *, gone: bool = False) -> None:
        self._record(flow, a.id, "pending", None, None)
        retry = max(1, min(PENDING_RETRY_AFTER_MAX, math.ceil(wait)))
        message = (f"This call waits for a person's approval (approval {a.id}, rule {', '.join(a.rules)}); "
                   f"nobody has decided yet. It expires at {iso_time(a.expires_at)}. Send the identical call "
                   "again later to learn the decision: it will not create a second approval, and once approved "
                   "it goes through exactly once.")
        if gone:
            log.info("client left while its call was held (approval %s stays pending, request_id=%s)", a.id,
                     flow.metadata.get(flowmeta.REQUEST_ID))
        responses.refuse(flow, 409, APPROVAL_PENDING, message, rule=a.rules[0] if a.rules else None,
                         headers={"x-should-retry": "false", "retry-after": str(retry)},
                         extra={"approval_id": a.id, "expires_at": iso_time(a.expires_at)})

    @staticmethod
    def _throttled(flow: http.HTTPFlow, call: HeldCall, per_minute: int) -> None:
        log.warning("agent %s opened %d approvals in the last minute on this sidecar; refusing another "
                    "(request_id=%s)", call.agent, per_minute, call.request_id)
        message = (f"This call needs a person's approval (rule {', '.join(call.rules)}), but agent {call.agent} has "
                   f"asked for {per_minute} approvals in the last minute, the most the rules let one agent ask "
                   "for. Nothing was sent and no approval was opened; wait for the pending ones to be decided.")
        responses.refuse(flow, 429, APPROVAL_RATE_LIMITED, message, rule=call.rules[0] if call.rules else None,
                         headers={"x-should-retry": "false", "retry-after": "60"})

    @staticmethod
    def _store_unavailable(flow: http.HTTPFlow, error: StoreUnavailable) -> None:
        log.warning("approval store unavailable, refusing a held call (request_id=%s): %s",
                    flow.metadata.get(flowmeta.REQUEST_ID), error)
        decision = flow.metadata.get(flowmeta.DECISION)
        rule = decision.rule if decision is not None else None
        responses.refuse(flow, 503, responses.STORE_UNAVAILABLE,
                         "This call needs a person's approval, but the approval store is unavailable, so it was "
                         "refused and not forwarded. Bastion reconnects by itself; try again in a few seconds.",
                         rule=rule, headers={"x-should-retry": "false", "retry-after": "5"})


async def keep_pending_gauge(store: ApprovalStore, interval: float = PENDING_GAUGE_INTERVAL) -> None:
    """Refresh `bastion_approvals_pending` (the whole store's, every sidecar's) until cancelled."""
    while True:
        try:
            APPROVALS_PENDING.set(await store.count_pending())
        except StoreUnavailable as e:
            log.debug("pending approvals gauge not refreshed: %s", e)
        except Exception:
            log.exception("pending approvals gauge refresh failed")
        await asyncio.sleep(interval)
