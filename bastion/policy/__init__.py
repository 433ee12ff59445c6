"""The rule engine: pure, no I/O beyond reading the rule files.

`load_policy(paths)` -> an immutable `Policy`; `policy.evaluate(facts, agent)` -> `Decision`.
"""

from bastion.policy.decision import ApprovalSpec, Decision, LockAction, ReleaseAction, TraceEntry
from bastion.policy.facts import EvalError, FactsError, RequestFacts

__all__ = [
    "ApprovalSpec",
    "Decision",
    "EvalError",
    "FactsError",
    "LockAction",
    "ReleaseAction",
    "RequestFacts",
    "TraceEntry",
]
