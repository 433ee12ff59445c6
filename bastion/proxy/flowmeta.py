"""The `flow.metadata` keys Bastion's addons share. One place, so every addon reads the same names.

Set per agent request (not on CONNECT flows, except REQUEST_ID, AGENT and POLICY):

- REQUEST_ID: str, the `X-Bastion-Request-Id` of this call (UUIDv7), also the audit record id.
- AGENT: str, the authenticated (or pinned) agent name. Absent when identity failed (the flow then already has
  its 407 response).
- POLICY: the `Policy` object this request is evaluated against: identity and decision use exactly this one,
  even when a reload swaps the active policy meanwhile.
- FACTS: the `RequestFacts` the rules saw (normalized host, path, query, headers, body).
- DECISION: the `Decision` (`effect`, `would_effect`, `mode`, `rules`, `locks`, `releases`, `approval`, ...).
- OBLIGATIONS: set[str] of conditions that must be met before the request may be forwarded: "approval" (a
  hold decision), "lock" (the decision takes or releases task locks), "milestone" (it requires milestones),
  "budget" (it counts against budgets). The addon that satisfies one removes it;
  the gate refuses whatever is left (fail closed).
- REFUSAL: str, the `error.type` when Bastion answered the request itself (absent for upstream responses).
- UPSTREAM_ADDRESS: (ip, port) the request is pinned to after the network guard vetted it.
- STARTED: float, `time.monotonic()` when the request headers arrived.
- LOCKS: list of dicts, the task locks a forwarded request went out under (set by the lock addon), each
  `{"key", "rule", "fence", "renewed", "expires_at", "release"}`: `fence` is None for a `release` key that was
  free, `expires_at` ISO 8601 UTC (None for a free key), `release` True when a 2xx answer frees the lock.
- LOCK_EVENTS: list of dicts, what the lock addon did for this request, in order, for the audit record:
  `{"event", "key", ...}` with event one of acquired, renewed, checked, conflict, lost, rolled_back,
  store_unavailable, released, not_released.
- APPROVAL: dict, the approval of a held call, for the audit record (set by the approval addon):
  `{"id", "state", "decided_by", "note", "waited_s"}`; state one of pending (answered 409, or the client
  left), approved (decided while the call waited, and it passed), consumed (a re-sent call used an earlier
  approval), granted (`id` is the grant's), denied, cancelled, expired, given_back (it passed the hold but a
  later stage refused it, so the approval was returned for the re-send); `decided_by`, `note` may be None;
  `waited_s` is how long the agent's connection was held.
- BODY_LIMIT: `bastion.proxy.httplimits.BodyLimit`, how many body bytes this request may send before it is
  refused with 413 while it arrives (set by enforcement at `requestheaders`).
- DECIDED_EARLY: True when enforcement decided at `requestheaders` (a large body no rule can read, on a plain
  allow): the pipeline then runs every stage's `request` step at once, and streams the body to the upstream.
- FLEET: dict, what the fleet stages did, for the audit record's `extra["fleet"]`: `paused` (the pause that
  refused or held the call), `requires` / `missing` (milestones checked), `completed` (milestones recorded),
  `budgets` (reservations and how they were settled), `guards` (guards this call tripped).
- RESERVATIONS: the budget reservations a call holds until it is settled (`bastion.proxy.budgets`).
- TRAFFIC: dict, what the traffic meant, for the audit record's `extra` (set by `bastion.proxy.traffic`):
  `llm` (an LLM API call: model, tools, usage...), `mcp` (a JSON-RPC / MCP call: method, tool, outcome),
  `websocket` (the messages of a session). Absent for plain HTTP.
- JSONRPC_ID: the `id` of a JSON-RPC request (None for a notification), once known: a refusal of such a
  request is a JSON-RPC error response for that id (`bastion.proxy.responses`).
- CAPTURE: the audit capture's own state for this exchange (`bastion.proxy.exchange.Exchange`): what the
  agent sent, taken before any stage changes the request, and the response body tap. Only capture uses it.
"""

from __future__ import annotations

REQUEST_ID = "bastion.request_id"
AGENT = "bastion.agent"
POLICY = "bastion.policy"
FACTS = "bastion.facts"
DECISION = "bastion.decision"
OBLIGATIONS = "bastion.obligations"
REFUSAL = "bastion.refusal"
UPSTREAM_ADDRESS = "bastion.upstream_address"
STARTED = "bastion.started"
LOCKS = "bastion.locks"
LOCK_EVENTS = "bastion.lock_events"
APPROVAL = "bastion.approval"
CAPTURE = "bastion.capture"
BODY_LIMIT = "bastion.body_limit"
DECIDED_EARLY = "bastion.decided_early"
TRAFFIC = "bastion.traffic"
FLEET = "bastion.fleet"
RESERVATIONS = "bastion.reservations"
JSONRPC_ID = "bastion.jsonrpc_id"

OBLIGATION_APPROVAL = "approval"
OBLIGATION_LOCK = "lock"
OBLIGATION_MILESTONE = "milestone"
OBLIGATION_BUDGET = "budget"

REQUEST_ID_HEADER = "X-Bastion-Request-Id"
