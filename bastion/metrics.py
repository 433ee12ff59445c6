"""Prometheus metrics, all in one registry so `/metrics` shows exactly Bastion's series.

Names are part of the public interface (README "Admin listener"): they start with `bastion_`, the
`decision` label takes `allow`, `deny`, `hold`, and token `kind` takes `input`, `output`, `cached`.
Label values that come from outside (agent names, models) are bounded by the policy (agents) or truncated.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# --- proxy and policy ---------------------------------------------------------------------------------------
REQUESTS = Counter("bastion_requests", "Agent requests, one per request (not per tunnel), by outcome: the "
                   "policy's decision (allow, deny, hold), or the refusal type that stopped a request the policy "
                   "did not (lock_conflict, bad_request, audit_unavailable, ...).",
                   ["agent", "decision"], registry=REGISTRY)
REFUSALS = Counter("bastion_refusals", "Requests Bastion answered itself, by error type.", ["type"],
                   registry=REGISTRY)
DECISION_SECONDS = Histogram("bastion_decision_seconds", "Time to evaluate the policy for one request.",
                             buckets=_LATENCY_BUCKETS, registry=REGISTRY)
UPSTREAM_SECONDS = Histogram("bastion_upstream_seconds", "Time from forwarding a request to the end of the "
                             "upstream response.", buckets=_UPSTREAM_BUCKETS, registry=REGISTRY)
POLICY_RELOAD_SUCCESS = Gauge("bastion_policy_reload_success", "1 if the last policy (re)load succeeded.",
                              registry=REGISTRY)
POLICY_RELOADS = Counter("bastion_policy_reloads", "Policy reload attempts by result.", ["result"],
                         registry=REGISTRY)
POLICY_RULES = Gauge("bastion_policy_rules", "Rules in the active policy.", registry=REGISTRY)
LLM_TOKENS = Counter("bastion_llm_tokens", "LLM tokens the upstream reported in its answers, by kind: input "
                     "(includes cached and cache_creation), output (includes reasoning), cached (read from the "
                     "prompt cache), cache_creation, reasoning.", ["agent", "model", "kind"], registry=REGISTRY)
LLM_TIME_TO_FIRST_TOKEN = Histogram("bastion_llm_time_to_first_token_seconds", "Streamed LLM answers: time from "
                                    "forwarding the request to the first content or tool-call token.", ["model"],
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60), registry=REGISTRY)
MCP_CALLS = Counter("bastion_mcp_calls", "JSON-RPC (MCP) requests by method, tool and how they ended: result, "
                    "error, tool_error (a result with isError), refused (by Bastion), none (no answer seen).",
                    ["agent", "method", "tool", "outcome"], registry=REGISTRY)
WEBSOCKET_MESSAGES = Counter("bastion_websocket_messages", "WebSocket messages relayed, by direction (client: "
                             "from the agent).", ["direction"], registry=REGISTRY)
WEBSOCKET_REFUSALS = Counter("bastion_websocket_refusals", "WebSocket client messages refused by the policy "
                             "(the session was closed with code 1008).", registry=REGISTRY)

# --- coordination -------------------------------------------------------------------------------------------
LOCKS_HELD = Gauge("bastion_locks_held", "Task locks currently held (as last listed from the store).",
                   registry=REGISTRY)
LOCK_CONFLICTS = Counter("bastion_lock_conflicts", "Requests refused because another agent holds the lock.",
                         registry=REGISTRY)
LOCK_ACQUIRE_SECONDS = Histogram("bastion_lock_acquire_seconds", "Time to acquire or renew a task lock.",
                                 buckets=(*_LATENCY_BUCKETS, 0.25, 0.5, 1.0), registry=REGISTRY)
STORE_ERRORS = Counter("bastion_store_errors", "Store operations that failed (store unreachable).",
                       ["operation"], registry=REGISTRY)
AGENTS_PAUSED = Gauge("bastion_agents_paused", "Agents paused fleet-wide (as this sidecar last read the store; a "
                      "pause of every agent counts once).", registry=REGISTRY)
DEPENDENCY_PENDING = Counter("bastion_dependency_pending", "Calls refused because a milestone they require does "
                             "not exist yet (424).", registry=REGISTRY)
MILESTONES_COMPLETED = Counter("bastion_milestones_completed", "Milestones recorded after a 2xx answer.",
                               registry=REGISTRY)
BUDGET_EXCEEDED = Counter("bastion_budget_exceeded", "Calls refused because a budget was used up (429), by "
                          "budget.", ["budget"], registry=REGISTRY)
BUDGET_SPENT = Counter("bastion_budget_spent", "Units settled against budgets (calls, or LLM tokens), by budget.",
                       ["budget", "unit"], registry=REGISTRY)
GUARD_TRIPS = Counter("bastion_guard_trips", "Times a guard paused an agent, by guard.", ["guard"],
                      registry=REGISTRY)
APPROVALS_PENDING = Gauge("bastion_approvals_pending", "Approvals waiting for a human decision.",
                          registry=REGISTRY)
APPROVALS = Counter("bastion_approvals", "Approval outcomes: approved, denied, cancelled (counted where a person "
                    "decided), executed (a held call passed under an approval), granted (passed under a grant), "
                    "expired.", ["outcome"], registry=REGISTRY)
APPROVAL_WAIT_SECONDS = Histogram("bastion_approval_wait_seconds", "How long held calls kept the agent waiting.",
                                  buckets=(0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
APPROVAL_NOTIFICATIONS = Counter("bastion_approval_notifications", "Approval webhook deliveries by result: sent, "
                                 "retried, failed (gave up), dropped (queue full), unsigned (secret missing).",
                                 ["result"], registry=REGISTRY)

# --- audit --------------------------------------------------------------------------------------------------
AUDIT_RECORDS = Counter("bastion_audit_records", "Audit records written to the sink.", registry=REGISTRY)
AUDIT_BACKLOG = Gauge("bastion_audit_backlog", "Audit records accepted but not yet in the sink.",
                      registry=REGISTRY)
AUDIT_DROPPED = Counter("bastion_audit_dropped", "Audit records lost, by reason: spool_error, spool_full, overloaded, "
                        "writer_down (the audit worker was not running), closed, capture_error, invalid.", ["reason"],
                        registry=REGISTRY)
AUDIT_WRITE_ERRORS = Counter("bastion_audit_write_errors", "Failed attempts to write to the audit sink.",
                             registry=REGISTRY)


def render() -> tuple[bytes, str]:
    """The exposition body and its content type, for the admin listener."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
