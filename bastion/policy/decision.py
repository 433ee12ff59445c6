"""What the engine answers: a `Decision` per request, with everything enforcement and audit need.

Kept separate from the engine so that the proxy, the audit log and the dashboard can depend on the result
shape without importing the matcher machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Effect = Literal["allow", "deny", "hold"]
Mode = Literal["enforce", "report"]

# Strength order for combining: deny > hold > allow.
EFFECT_RANK: dict[str, int] = {"allow": 1, "hold": 2, "deny": 3}


@dataclass(frozen=True, slots=True)
class LockAction:
    """Take (or renew) `key` for the calling agent before forwarding; lease of `ttl` seconds."""

    key: str
    ttl: float
    rule: str


@dataclass(frozen=True, slots=True)
class ReleaseAction:
    """Free `key` once the upstream answers 2xx."""

    key: str
    rule: str


@dataclass(frozen=True, slots=True)
class MilestoneNeed:
    """`requires`: milestone `key` must exist in the shared store, else 424 dependency_pending."""

    key: str
    rule: str


@dataclass(frozen=True, slots=True)
class MilestoneAction:
    """`complete`: record milestone `key` for `ttl` seconds once the upstream answers 2xx."""

    key: str
    ttl: float
    rule: str


@dataclass(frozen=True, slots=True)
class BudgetCharge:
    """A budget this call counts against: `limit` `unit`s (calls or tokens) per `per` seconds, per `key`.
    `estimate`: the tokens to reserve before the answer is known (None: estimated from the request)."""

    budget: str
    key: str
    unit: Literal["calls", "tokens"]
    limit: int
    per: float
    estimate: int | None = None


@dataclass(frozen=True, slots=True)
class ApprovalSpec:
    """How a held call is approved. Every group in `approvers` must be satisfied by the approving user
    (one group per determining hold rule; a group is satisfied when any selector in it matches).

    `wait`: how long the agent's connection is held; `timeout`: when an undecided approval expires;
    `required`: distinct approvers needed; `use_within`: how long an approved call may take to be re-sent
    before the approval lapses; `grants`: whether an approver may let later calls pass for a while."""

    approvers: tuple[tuple[str, ...], ...]
    wait: float
    timeout: float
    rules: tuple[str, ...]
    required: int = 1
    use_within: float = 900.0
    grants: bool = True


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One rule considered by `explain`: did it match, and why (or why not)."""

    rule: str
    effect: str
    matched: bool
    reasons: tuple[str, ...]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request.

    `effect` is what Bastion enforces; `would_effect` what the rules decided (they differ only in `report`
    mode, where `effect` is always allow). `rules` are the determining rule ids (empty when the default
    decided). `reason` is a machine-readable cause: "rule", "default", "agent_retired", "unknown_agent",
    "budget" (a budget's key could not be computed).
    """

    effect: Effect
    would_effect: Effect
    mode: Mode
    agent: str
    rules: tuple[str, ...] = ()
    reason: str = "rule"
    message: str | None = None
    captures: dict[str, str] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    locks: tuple[LockAction, ...] = ()
    releases: tuple[ReleaseAction, ...] = ()
    approval: ApprovalSpec | None = None
    requires: tuple[MilestoneNeed, ...] = ()
    completes: tuple[MilestoneAction, ...] = ()
    budgets: tuple[BudgetCharge, ...] = ()
    trace: tuple[TraceEntry, ...] = ()
    revision: str = ""

    @property
    def rule(self) -> str | None:
        """The first determining rule id (for the `rule` field agents see), or None for the default."""
        return self.rules[0] if self.rules else None

    def to_json(self) -> dict[str, object]:
        """The shape `bastion explain --format json` prints and the audit log stores."""
        out: dict[str, object] = {
            "decision": self.effect,
            "would_decision": self.would_effect,
            "mode": self.mode,
            "agent": self.agent,
            "rules": list(self.rules),
            "reason": self.reason,
            "message": self.message,
            "captures": dict(self.captures),
            "errors": list(self.errors),
            "locks": [{"key": lk.key, "ttl": lk.ttl, "rule": lk.rule} for lk in self.locks],
            "releases": [{"key": r.key, "rule": r.rule} for r in self.releases],
            "requires": [{"key": m.key, "rule": m.rule} for m in self.requires],
            "completes": [{"key": m.key, "ttl": m.ttl, "rule": m.rule} for m in self.completes],
            "budgets": [{"budget": b.budget, "key": b.key, "unit": b.unit, "limit": b.limit, "per": b.per}
                        for b in self.budgets],
            "approval": None
            if self.approval is None
            else {
                "approvers": [list(g) for g in self.approval.approvers],
                "wait": self.approval.wait,
                "timeout": self.approval.timeout,
                "rules": list(self.approval.rules),
                "required": self.approval.required,
                "use_within": self.approval.use_within,
                "grants": self.approval.grants,
            },
            "revision": self.revision,
        }
        if self.trace:
            out["trace"] = [
                {"rule": t.rule, "effect": t.effect, "matched": t.matched, "reasons": list(t.reasons),
                 "error": t.error}
                for t in self.trace
            ]
        return out
