"""Approvals in the shared store: one record per distinct held call, from `pending` to its end, for the fleet.

A rule with `effect: hold` makes the proxy hold the call until a person decides. The record of that wait
lives in the shared store (SQLite on one host, Redis for a fleet), never only in a sidecar's memory, so

- a decision taken anywhere (any sidecar's API, a central dashboard, `bastion approvals` on a laptop) reaches
  the sidecar holding the call: that sidecar polls the store for the approvals its held calls wait on;
- a call re-sent after a 409 `approval_pending`, a restart of the sidecar, or a retry by an SDK finds its
  approval again: approvals are found by the call's **fingerprint** (agent, method, normalized URL, canonical
  body hash), and there is at most one live approval per fingerprint (the *head*), however often a client
  retries.

Life of an approval::

    pending --approve (N distinct approvers)--> approved --the call passes once--> executed
       |                                            '--not re-sent within use_within--> lapsed
       |--deny (any one approver: final)--> denied      (identical re-sends get the denial for `deny_for`)
       |--nobody decided within timeout--> expired      (the next re-send is told, the one after asks again)
       '--an admin cancelled it--> cancelled

Time moves states lazily: every read applies `Approval.current(now)`, so no background job is needed and a
sidecar that was down meanwhile sees the right state. Times are wall-clock epoch seconds of the host that
wrote them (approval times are minutes to hours; NTP-synced hosts agree far better than that).

The store keeps the state machine (`admit`, `consume`, `decide`, ...), atomically per record; *who* may
decide is checked by the callers against the current rules (`may_decide`), since users live in the rules.
"""

from __future__ import annotations

import abc
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, TypeVar

from bastion.coord.store import GuardedStore, iso_time

T = TypeVar("T")

State = Literal["pending", "approved", "denied", "expired", "cancelled", "executed", "lapsed"]
STATES: tuple[str, ...] = ("pending", "approved", "denied", "expired", "cancelled", "executed", "lapsed")
FINAL_STATES = frozenset({"denied", "expired", "cancelled", "executed", "lapsed"})

RETENTION = 7 * 24 * 3600.0
"""How long an approval is kept after its last change (seconds): the store is not the audit log."""

MAX_GRANT = 24 * 3600.0
"""Longest grant an approver may give (seconds)."""

MAX_NOTE = 2000
"""Longest comment or reason kept (characters)."""

PREVIEW_BODY_BYTES = 16 << 10
"""How much of the request body the approver's preview shows (bytes, after redaction)."""


class ApprovalError(Exception):
    """A decision or change the state machine refuses. `status` is the HTTP status an API answers with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def new_id(prefix: str) -> str:
    """`apr_` / `grt_` + 20 random hex digits: unguessable, short enough to type."""
    return prefix + secrets.token_hex(10)


_ID = re.compile(r"^(apr|grt)_[0-9a-f]{20}$")


def valid_id(value: str, prefix: str) -> bool:
    """Is `value` shaped like an id `new_id(prefix)` makes? (Checked before it reaches the store.)"""
    return len(value) == len(prefix) + 20 and value.startswith(prefix) and bool(_ID.match(value))


class _Ambiguous(ValueError):
    """A JSON body that parsers may read differently: it is then bound byte for byte."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs) or len({k.lower() for k in obj}) != len(obj):
        raise _Ambiguous  # a repeated key, or keys a case-insensitive decoder (Go's) would merge
    return obj


_NUMBER = "\x00bastion:number\x00"


def _literal(text: str) -> tuple[str, str]:
    """Non-integer numbers and constants keep their literal text: `1e400` is not `Infinity`, and
    `9007199254740993.0` is not `9007199254740992.0`, to a decoder that reads them exactly."""
    return (_NUMBER, text)


def canonical_body(body: bytes | None, content_type: str = "") -> bytes:
    """The body as the fingerprint sees it: a body declared as JSON re-encoded with sorted keys and no
    whitespace (so a client that reorders keys on a retry still joins its approval), anything else byte for
    byte. JSON that parsers may read differently (a key given twice, keys equal but for case) stays byte for
    byte too: `{"amount": 1, "amount": 9000}` must never count as the same call as `{"amount": 9000}`."""
    if not body:
        return b""
    if "json" not in content_type.lower():
        return body
    try:
        doc = json.loads(body, object_pairs_hook=_no_duplicates, parse_float=_literal, parse_constant=_literal)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


VOLATILE_HEADERS = frozenset({
    "content-length", "connection", "keep-alive", "te", "date", "traceparent", "tracestate", "baggage",
    "x-request-id", "x-correlation-id", "x-amzn-trace-id", "x-cloud-trace-context", "sentry-trace",
    "idempotency-key", "x-idempotency-key", "user-agent", "accept-encoding",
})
"""Request headers that may change when a client sends the same call again (a retry's counter, tracing ids, a
new idempotency key per attempt). Every *other* header binds the approval: credentials (`Authorization`,
`Stripe-Account`, `X-Vault-Token`, ...), how the body and method are read, routing headers. Headers starting
with `x-stainless-` (the retry counters and timeouts of the openai and anthropic SDKs) and `x-b3-` are
volatile too."""


def binding_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers that bind an approval, names lower-cased, sorted by name (values in their order)."""
    kept = []
    for name, value in headers:
        low = name.lower()
        if low in VOLATILE_HEADERS or low.startswith(("x-stainless-", "x-b3-", "proxy-", "x-bastion-")):
            continue
        kept.append((low, value))
    return sorted(kept, key=lambda nv: nv[0])


def fingerprint(agent: str, method: str, url: str, body: bytes | None, content_type: str = "",
                headers: Iterable[tuple[str, str]] = (), held_by: object = ()) -> str:
    """What binds an approval to exactly one call: sha256 over agent, method, normalized URL, the binding
    headers (all but `VOLATILE_HEADERS`), the canonical body's hash, and `held_by` (the rules that held the
    call and who may approve it: a call that stricter rules hold, or the same call after a reload that
    tightened its approvers, is not covered by an approval given under looser ones)."""
    body_hash = hashlib.sha256(canonical_body(body, content_type)).hexdigest()
    bound = json.dumps([binding_headers(headers), held_by], separators=(",", ":"), ensure_ascii=True)
    material = "\x00".join((agent, method.upper(), url, bound, body_hash))
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(slots=True)
class Vote:
    user: str
    verdict: Literal["approve", "deny"]
    at: float
    note: str | None = None


@dataclass(slots=True)
class Approval:
    """One held call's approval, as stored. `preview` is what the approver sees (already redacted): method,
    url, headers, body (cut to `PREVIEW_BODY_BYTES`), body_size, body_sha256, content_type."""

    id: str
    fingerprint: str
    agent: str
    owner: str | None
    rules: list[str]
    approvers: list[list[str]]
    required: int
    state: str
    created_at: float
    expires_at: float
    use_within: float
    deny_for: float
    grants_allowed: bool
    preview: dict[str, Any]
    request_id: str
    revision: str = ""
    joins: int = 0
    last_seen_at: float = 0.0
    votes: list[Vote] = field(default_factory=list)
    decided_at: float | None = None
    decided_by: str | None = None
    note: str | None = None
    use_by: float | None = None
    grant: dict[str, Any] | None = None
    executed_at: float | None = None
    executed_request_id: str | None = None
    expiry_reported: bool = False
    updated_at: float = 0.0

    # -- time ------------------------------------------------------------------------------------------------

    def current(self, now: float) -> Approval:
        """This approval as of `now`: an undecided one past its timeout is expired, an approved one not used
        within its window has lapsed. Returns `self` when nothing changed, else a changed copy."""
        if self.state == "pending" and now >= self.expires_at:
            return replace(self, state="expired", decided_at=self.expires_at, votes=list(self.votes))
        if self.state == "approved" and self.use_by is not None and now >= self.use_by:
            return replace(self, state="lapsed", votes=list(self.votes))
        return self

    @property
    def approvals_given(self) -> int:
        return sum(1 for v in self.votes if v.verdict == "approve")

    # -- codec -----------------------------------------------------------------------------------------------

    def to_doc(self) -> str:
        """The stored form (compact JSON)."""
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_doc(cls, doc: str | bytes) -> Approval:
        data = json.loads(doc)
        data["votes"] = [Vote(**v) for v in data.get("votes", [])]
        return cls(**data)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The shape of `GET /api/approvals/{id}` and `bastion approvals show --format json`."""
        a = self.current(time.time() if now is None else now)
        return {
            "id": a.id, "state": a.state, "agent": a.agent, "owner": a.owner, "rules": list(a.rules),
            "approvers": [list(g) for g in a.approvers], "required": a.required,
            "approvals_given": a.approvals_given,
            "created_at": iso_time(a.created_at), "expires_at": iso_time(a.expires_at),
            "decided_at": None if a.decided_at is None else iso_time(a.decided_at),
            "decided_by": a.decided_by, "note": a.note,
            "votes": [{"user": v.user, "verdict": v.verdict, "at": iso_time(v.at), "note": v.note}
                      for v in a.votes],
            "use_by": None if a.use_by is None else iso_time(a.use_by),
            "grant": None if a.grant is None else {**a.grant, "until": iso_time(a.grant["until"])},
            "executed_at": None if a.executed_at is None else iso_time(a.executed_at),
            "executed_request_id": a.executed_request_id,
            "request_id": a.request_id, "joins": a.joins,
            "last_seen_at": iso_time(a.last_seen_at or a.created_at),
            "fingerprint": a.fingerprint, "revision": a.revision, "preview": dict(a.preview),
        }


@dataclass(slots=True)
class Grant:
    """An approver's "let this agent pass these rules' held calls for a while" (`approve --for 30m`)."""

    id: str
    agent: str
    rules: list[str]
    until: float
    by: str
    approval_id: str
    created_at: float
    approvers: list[list[str]] = field(default_factory=list)

    def covers(self, agent: str, rules: Iterable[str], now: float,
               approvers: Iterable[Iterable[str]] | None = None) -> bool:
        """Does this grant pass `agent`'s call held by `rules`? Only while the rules still name the approvers
        the grant was given under: a reload that changes who may approve ends it."""
        if approvers is not None and self.approvers and [list(g) for g in approvers] != self.approvers:
            return False
        return self.agent == agent and now < self.until and set(rules) <= set(self.rules)

    def to_doc(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_doc(cls, doc: str | bytes) -> Grant:
        return cls(**json.loads(doc))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "agent": self.agent, "rules": list(self.rules), "until": iso_time(self.until),
                "by": self.by, "approval_id": self.approval_id, "created_at": iso_time(self.created_at)}


@dataclass(frozen=True, slots=True)
class HeldCall:
    """What the proxy knows about a held call when it asks the store (`ApprovalStore.admit`)."""

    fingerprint: str
    agent: str
    owner: str | None
    rules: tuple[str, ...]
    approvers: tuple[tuple[str, ...], ...]
    required: int
    timeout: float
    use_within: float
    grants_allowed: bool
    preview: Mapping[str, Any]
    request_id: str
    revision: str = ""

    def new_approval(self, now: float) -> Approval:
        return Approval(
            id=new_id("apr_"), fingerprint=self.fingerprint, agent=self.agent, owner=self.owner,
            rules=list(self.rules), approvers=[list(g) for g in self.approvers], required=self.required,
            state="pending", created_at=now, expires_at=now + self.timeout, use_within=self.use_within,
            deny_for=self.timeout, grants_allowed=self.grants_allowed, preview=dict(self.preview),
            request_id=self.request_id, revision=self.revision, last_seen_at=now, updated_at=now,
        )


Verdict = Literal["wait", "pass", "granted", "denied", "expired", "throttled"]


@dataclass(frozen=True, slots=True)
class Admission:
    """What `admit` decided for one call: `wait` (pending, `created` when this call opened it), `pass` (an
    approved approval was used by this call, now executed), `granted` (a grant lets it pass; `approval` is
    None), `denied` or `expired` (answer with 403), `throttled` (it would open a new approval, but its agent
    may not open more now; `approval` is None)."""

    verdict: Verdict
    approval: Approval | None
    created: bool = False
    grant: Grant | None = None


def admit_transition(head: Approval | None, call: HeldCall, now: float, grant: Grant | None = None,
                     may_open: bool = True) -> tuple[Approval | None, Admission]:
    """The state machine's entry: what happens to a call given its fingerprint's head approval and a grant
    that covers it, if any. A grant never overrides a denial of this very call. `may_open` False: the call
    may join or use an approval but not open a new one. Pure."""
    if head is not None:
        head = head.current(now)
        if head.state == "denied" and head.decided_at is not None and now < head.decided_at + head.deny_for:
            seen = replace(head, last_seen_at=now, updated_at=now, votes=list(head.votes))
            return seen, Admission("denied", seen)
        if head.state == "approved":
            used = replace(head, state="executed", executed_at=now, executed_request_id=call.request_id,
                           last_seen_at=now, updated_at=now, votes=list(head.votes))
            return used, Admission("pass", used)
    if grant is not None:
        return None, Admission("granted", None, grant=grant)
    if head is not None:
        if head.state == "pending":
            joined = replace(head, joins=head.joins + 1, last_seen_at=now, updated_at=now, votes=list(head.votes))
            return joined, Admission("wait", joined)
        if head.state == "expired" and not head.expiry_reported:
            told = replace(head, expiry_reported=True, last_seen_at=now, updated_at=now, votes=list(head.votes))
            return told, Admission("expired", told)
    if not may_open:
        return None, Admission("throttled", None)
    fresh = call.new_approval(now)
    return fresh, Admission("wait", fresh, created=True)


def consume_transition(a: Approval, request_id: str, now: float) -> tuple[Approval, bool]:
    """A waiting call takes an approval that became approved: True if this call may pass (exactly one)."""
    a = a.current(now)
    if a.state != "approved":
        return a, False
    return replace(a, state="executed", executed_at=now, executed_request_id=request_id, updated_at=now,
                   votes=list(a.votes)), True


def expire_transition(a: Approval, now: float) -> Approval:
    """A waiting call saw its approval's timeout pass: expired, and that call tells the agent."""
    a = a.current(now)
    if a.state == "expired" and not a.expiry_reported:
        return replace(a, expiry_reported=True, updated_at=now, votes=list(a.votes))
    return a


def decide_transition(a: Approval, user: str, verdict: Literal["approve", "deny"], note: str | None,
                      now: float, grant_for: float | None = None) -> Approval:
    """Record one person's decision. The first decision that ends an approval wins; later ones (and a second
    vote by the same person) raise `ApprovalError` (409). Any deny is final; an approval needs `required`
    distinct approvers. A grant is attached only when this decision approves the call."""
    a = a.current(now)
    if a.state != "pending":
        by = f" (decided by {a.decided_by})" if a.decided_by else ""
        raise ApprovalError(f"approval {a.id} is already {a.state}{by}; nothing was changed")
    if any(v.user == user for v in a.votes):
        raise ApprovalError(f"user {user!r} has already approved {a.id}; it needs {a.required} distinct approvers")
    note = None if note is None else note[:MAX_NOTE]
    votes = [*a.votes, Vote(user, verdict, now, note)]
    if verdict == "deny":
        return replace(a, state="denied", votes=votes, decided_at=now, decided_by=user, note=note, updated_at=now)
    if sum(1 for v in votes if v.verdict == "approve") < a.required:
        return replace(a, votes=votes, updated_at=now)
    grant = None
    if grant_for is not None:
        grant = {"id": new_id("grt_"), "until": now + grant_for, "by": user}
    return replace(a, state="approved", votes=votes, decided_at=now, decided_by=user, note=note,
                   use_by=now + a.use_within, grant=grant, updated_at=now)


def cancel_transition(a: Approval, user: str, reason: str | None, now: float) -> Approval:
    a = a.current(now)
    if a.state not in ("pending", "approved"):
        raise ApprovalError(f"approval {a.id} is already {a.state}; nothing was changed")
    return replace(a, state="cancelled", decided_at=now, decided_by=user,
                   note=None if reason is None else reason[:MAX_NOTE], updated_at=now, votes=list(a.votes))


def may_decide(a: Approval, user_name: str, user_roles: frozenset[str], owner_now: str | None = None) -> str | None:
    """Why `user` may not decide `a` (None if they may): they must satisfy every approver group of the rules
    that held the call, and never be the owner of the agent that made it (as the call's record names it, or
    `owner_now`, as the current rules do)."""
    from bastion.policy.engine import selects

    if user_name in (a.owner, owner_now):
        return f"user {user_name!r} owns agent {a.agent!r}, which made this call: someone else must decide it"
    for group in a.approvers:
        if not selects(group, user_name, user_roles):
            wanted = " or ".join(s.removeprefix("role:") + (" role" if s.startswith("role:") else "") for s in group)
            return f"deciding this approval needs the {wanted}; user {user_name!r} lacks it"
    return None


# --- the store ----------------------------------------------------------------------------------------------

Mutation = Callable[[Approval | None], tuple[Approval | None, T]]


class ApprovalStore(GuardedStore):
    """Approvals and grants in a shared store. Safe to share between tasks of one event loop.

    Every change is an atomic read-modify-write of one record in the store (a SQLite write transaction, a
    Redis WATCH/MULTI), with the transition computed by the pure functions above, so both backends follow
    the same state machine. `StoreUnavailable` means the store cannot answer: fail closed.
    """

    # -- the proxy's calls -----------------------------------------------------------------------------------

    async def admit(self, call: HeldCall, *, may_open: bool = True) -> Admission:
        """Join, use, or open the approval for `call`'s fingerprint, or let a grant pass it (see
        `admit_transition`)."""
        grant = None
        if call.grants_allowed and call.required == 1:  # a call that needs several people is never granted
            grant = await self.active_grant(call.agent, call.rules, call.approvers)
        return await self._guard("approval_admit", self._update_head(
            call.fingerprint, lambda head: admit_transition(head, call, time.time(), grant, may_open)))

    async def consume(self, approval_id: str, request_id: str) -> Approval | None:
        """Use an approved approval for one call; the approval if this call may pass, else None."""
        def step(a: Approval | None) -> tuple[Approval | None, Approval | None]:
            if a is None:
                return None, None
            after, ok = consume_transition(a, request_id, time.time())
            return after, after if ok else None

        return await self._guard("approval_consume", self._update(approval_id, step))

    async def give_back(self, approval_id: str, request_id: str) -> bool:
        """Undo `consume` for a call Bastion refused before sending it upstream (a task lock held by another
        agent, say): the approval is approved again, for a re-send. True if it was given back."""
        def step(a: Approval | None) -> tuple[Approval | None, bool]:
            if a is None or a.state != "executed" or a.executed_request_id != request_id:
                return None, False
            if a.use_by is not None and time.time() >= a.use_by:
                return None, False
            return replace(a, state="approved", executed_at=None, executed_request_id=None, updated_at=time.time(),
                           votes=list(a.votes)), True

        return await self._guard("approval_give_back", self._update(approval_id, step))

    async def decided(self, approval_ids: Iterable[str]) -> list[str]:
        """Of these ids, those no longer stored as pending or past their timeout (or gone): the approvals a
        waiting call must look at. Cheap: the watch asks this several times a second."""
        ids = [i for i in dict.fromkeys(approval_ids) if valid_id(i, "apr_")]
        if not ids:
            return []
        return await self._guard("approval_poll", self._decided(ids, time.time()))

    async def report_expiry(self, approval_id: str) -> Approval | None:
        def step(a: Approval | None) -> tuple[Approval | None, Approval | None]:
            if a is None:
                return None, None
            after = expire_transition(a, time.time())
            return after, after

        return await self._guard("approval_expire", self._update(approval_id, step))

    async def active_grant(self, agent: str, rules: Iterable[str],
                           approvers: Iterable[Iterable[str]] | None = None) -> Grant | None:
        """A live grant letting `agent` pass calls held by all of `rules` (under these approvers), if any."""
        now = time.time()
        rules = tuple(rules)
        grants = await self._guard("grant_find", self._grants(now))
        return next((g for g in grants if g.covers(agent, rules, now, approvers)), None)

    # -- people's calls --------------------------------------------------------------------------------------

    async def decide(self, approval_id: str, user: str, verdict: Literal["approve", "deny"],
                     note: str | None = None, grant_for: float | None = None) -> Approval:
        """Record a decision (authorization is the caller's: `may_decide`). Raises `ApprovalError` 404/409."""
        if grant_for is not None and not 0 < grant_for <= MAX_GRANT:
            raise ApprovalError(f"a grant lasts more than 0 and at most {MAX_GRANT / 3600:g}h", 400)

        if not valid_id(approval_id, "apr_"):
            raise ApprovalError(f"no approval {approval_id[:40]!r}", 404)

        def step(a: Approval | None) -> tuple[Approval | None, Approval]:
            if a is None:
                raise ApprovalError(f"no approval {approval_id!r}", 404)
            if grant_for is not None and (not a.grants_allowed or a.required > 1):
                why = ("its rule does not allow grants" if not a.grants_allowed
                       else f"it needs {a.required} approvers each time")
                raise ApprovalError(f"approval {a.id} cannot be approved with a grant: {why}", 400)
            after = decide_transition(a, user, verdict, note, time.time(), grant_for)
            return after, after

        decided = await self._guard("approval_decide", self._update(approval_id, step))
        if decided.state == "approved" and decided.grant is not None:
            g = decided.grant
            await self._guard("grant_put", self._put_grant(Grant(
                id=g["id"], agent=decided.agent, rules=list(decided.rules), until=g["until"], by=g["by"],
                approval_id=decided.id, created_at=decided.decided_at or time.time(),
                approvers=[list(x) for x in decided.approvers])))
        if decided.state == "denied":
            await self._revoke_where(lambda g: g.agent == decided.agent and bool(set(g.rules) & set(decided.rules)))
        return decided

    async def _revoke_where(self, covers: Callable[[Grant], bool]) -> list[Grant]:
        """End the live grants `covers` selects: a denial suspends the agent's grants for the denied rules
        (a grant must never let through a variant of a call a person just refused), a cancel its own."""
        revoked = []
        for g in await self._guard("grant_list", self._grants(time.time())):
            if covers(g) and await self._guard("grant_revoke", self._delete_grant(g.id)) is not None:
                revoked.append(g)
        return revoked

    async def cancel(self, approval_id: str, user: str, reason: str | None = None) -> Approval:
        if not valid_id(approval_id, "apr_"):
            raise ApprovalError(f"no approval {approval_id[:40]!r}", 404)

        def step(a: Approval | None) -> tuple[Approval | None, Approval]:
            if a is None:
                raise ApprovalError(f"no approval {approval_id!r}", 404)
            after = cancel_transition(a, user, reason, time.time())
            return after, after

        cancelled = await self._guard("approval_cancel", self._update(approval_id, step))
        if cancelled.grant is not None:
            grant_id = cancelled.grant["id"]
            await self._revoke_where(lambda g: g.id == grant_id)
        return cancelled

    async def get(self, approval_id: str) -> Approval | None:
        found = await self.get_many([approval_id])
        return found.get(approval_id)

    async def get_many(self, approval_ids: Iterable[str]) -> dict[str, Approval]:
        """The approvals with these ids that exist, as of now."""
        ids = [i for i in dict.fromkeys(approval_ids) if valid_id(i, "apr_")]
        if not ids:
            return {}
        now = time.time()
        found = await self._guard("approval_get", self._read(ids))
        return {a.id: a.current(now) for a in found}

    async def list(self, state: str | None = None, limit: int = 100) -> list[Approval]:
        """Newest first; `state` filters on the state as of now (`pending` lists what waits for people)."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}: one of {', '.join(STATES)}")
        now = time.time()
        limit = max(1, min(limit, 1000))
        out: list[Approval] = []
        for a in await self._guard("approval_list", self._recent(state, limit * 2 if state else limit, now)):
            a = a.current(now)
            if state is None or a.state == state:
                out.append(a)
        return out[:limit]

    async def count_pending(self) -> int:
        """Approvals waiting for people now (not past their timeout), across the store."""
        return await self._guard("approval_count", self._count_pending(time.time()))

    async def list_grants(self) -> list[Grant]:
        grants = await self._guard("grant_list", self._grants(time.time()))
        return sorted(grants, key=lambda g: g.until)

    async def revoke_grant(self, grant_id: str) -> Grant | None:
        if not valid_id(grant_id, "grt_"):
            return None
        return await self._guard("grant_revoke", self._delete_grant(grant_id))

    async def ping(self) -> None:
        await self._guard("ping", self._ping())

    # -- what a backend provides ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def _update(self, approval_id: str, fn: Mutation[T]) -> T:
        """Atomically: read the approval (None if absent), call `fn`, store what it returns (None: no write)."""

    @abc.abstractmethod
    async def _update_head(self, fingerprint: str, fn: Mutation[T]) -> T:
        """Like `_update` on the fingerprint's head approval; the approval `fn` returns becomes the head."""

    @abc.abstractmethod
    async def _read(self, approval_ids: list[str]) -> list[Approval]: ...

    @abc.abstractmethod
    async def _recent(self, state: str | None, limit: int, now: float) -> list[Approval]:
        """Up to `limit` approvals, newest first; with `state`, those in that state as of `now` (`pending`
        only those not past their timeout; `expired` also those stored as pending past it)."""

    @abc.abstractmethod
    async def _decided(self, approval_ids: list[str], now: float) -> list[str]: ...

    @abc.abstractmethod
    async def _count_pending(self, now: float) -> int: ...

    @abc.abstractmethod
    async def _put_grant(self, grant: Grant) -> None: ...

    @abc.abstractmethod
    async def _grants(self, now: float) -> list[Grant]: ...

    @abc.abstractmethod
    async def _delete_grant(self, grant_id: str) -> Grant | None: ...

    @abc.abstractmethod
    async def _ping(self) -> None: ...
