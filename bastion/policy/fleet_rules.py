"""The policy's `budgets:` and `guards:` sections, compiled: which calls count against which budget, and which
rates pause a runaway agent.

Budgets are evaluated with the same matchers as rules, after the rules decided: a call the rules refuse spends
nothing. A budget whose `match` cannot be evaluated on a call (a body that cannot be read) counts the call:
failing closed for a budget means spending, never skipping. Guards are not evaluated per request: the proxy
counts outcomes per agent in the shared store and compares them with `GuardSpec.limit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from bastion.policy.decision import BudgetCharge
from bastion.policy.facts import EvalError, RequestFacts
from bastion.policy.matchers import Captures, Matcher
from bastion.policy.templates import Template

GuardMetric = Literal["denials", "errors", "calls"]


@dataclass(frozen=True, slots=True)
class CompiledBudget:
    id: str
    selectors: tuple[str, ...]
    matchers: tuple[Matcher, ...]
    key: Template
    unit: Literal["calls", "tokens"]
    limit: int
    per: float
    estimate: int | None
    source: str  # "file:line"
    model: Any

    def charge(self, facts: RequestFacts, agent: str) -> BudgetCharge | None:
        """The charge for this call, None if the budget's `match` does not hold. Raises `EvalError` when the
        key cannot be computed (the caller refuses the call: an unknown key must not mean "no budget")."""
        caps: Captures = {}
        for matcher in self.matchers:
            try:
                if not matcher.test(facts, caps):
                    return None
            except EvalError:
                continue  # cannot tell: count the call (fail closed)
        return BudgetCharge(self.id, self.key.render(facts, caps, agent), self.unit, self.limit, self.per,
                            self.estimate)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = self.model.model_dump(mode="json", by_alias=True, exclude_none=True)
        out["source"] = self.source
        return out


@dataclass(frozen=True, slots=True)
class GuardSpec:
    """Past `limit` `metric` events of one agent within a fixed window of `per` seconds: pause the agent
    fleet-wide (`action: pause`) or hold each of its calls for a person (`action: hold`)."""

    id: str
    selectors: tuple[str, ...]
    metric: GuardMetric
    limit: int
    per: float
    action: Literal["pause", "hold"]
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "agents": list(self.selectors), "when": {self.metric: self.limit, "per": self.per},
                "action": self.action, "source": self.source}
