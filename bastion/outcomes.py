"""How one agent request is counted: by the policy's decision, unless something else stopped it.

Shared by the proxy (`bastion_requests_total{agent,decision}`) and the audit's readers (`bastion audit tail`),
so the metric and the log never disagree. A lock conflict on a call the rules allowed is a `lock_conflict`,
never an `allow`.
"""

from __future__ import annotations

DECIDED_REFUSALS = frozenset({
    "policy_denied", "agent_retired", "approval_denied", "approval_expired", "approval_pending",
})
"""Refusals that *are* the policy's decision (a deny, or a hold no person has approved): counted under that
decision. Every other refusal (a lock conflict, a bad request, an unavailable store or audit, a forbidden
destination) is counted under its own type."""


def outcome_label(decision_effect: str | None, refusal: str | None) -> str | None:
    """The label of one request: the refusal type when Bastion refused it for a reason other than the
    policy's decision, else the decision (`allow`, `deny`, `hold`); None when neither is known."""
    if refusal is not None and refusal not in DECIDED_REFUSALS:
        return refusal
    if decision_effect is not None:
        return decision_effect
    return "deny" if refusal is not None else None
