"""Budgets on the proxy: reserve before forwarding, settle after the answer, refuse past the limit.

A policy's `budgets:` give an agent (or a ticket, any key template) so many calls or LLM tokens per window,
shared by every sidecar through the store. Each call the rules let through, and that a budget's `match`
selects, is checked and reserved in one atomic step in the store (`FleetStore.reserve`) as the last step
before the task locks and the forward:

- a call budget reserves 1: it is exact, concurrent calls included;
- a token budget reserves an estimate (the budget's `estimate`, else the request's size / 4 plus its
  `max_tokens`), admitted while any of the window's tokens are left. After the answer the reservation is
  *settled* with the real usage the upstream reported (`extra["llm"]["usage"]`: input + output tokens); an
  answer without usage keeps the estimate. So concurrent calls overshoot a limit by at most the reservations
  in flight (LiteLLM-style "admit first, count later" overshoots by every call in flight).

Over the limit: 429 `budget_exceeded` with `Retry-After` = the seconds until the window resets (windows are
aligned to the epoch on the store's clock, so this is the real reset, not the window's length), and the
budget, limit, used and reset time in the body. A call refused after its reservation (a lock conflict), or that
never got an answer, gives its reservation back. The store being down refuses budgeted calls with 503
`store_unavailable`: there is no local counter to fall back on, since one per sidecar would multiply the limit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable
from typing import Any

from mitmproxy import http

from bastion.coord.fleet import Exceeded, FleetStore, Reservation
from bastion.coord.store import StoreUnavailable, iso_time
from bastion.metrics import BUDGET_EXCEEDED, BUDGET_SPENT
from bastion.policy.decision import BudgetCharge, Decision
from bastion.policy.facts import EvalError, RequestFacts
from bastion.proxy import flowmeta, responses
from bastion.proxy.locks import STORE_RETRY_AFTER

log = logging.getLogger("bastion.fleet")

_OUTPUT_LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
MAX_ESTIMATE = 10_000_000


def _fleet(flow: http.HTTPFlow) -> dict[str, Any]:
    return flow.metadata.setdefault(flowmeta.FLEET, {})  # type: ignore[no-any-return]


def estimate_tokens(facts: RequestFacts | None, body_size: int) -> int:
    """Tokens to reserve for an LLM call before its usage is known: about one token per 4 bytes of request,
    plus the output limit the request sets. A call that is not an LLM call reserves nothing."""
    if facts is None:
        return 0
    try:
        if facts.llm() is None:
            return 0
        body = facts.json()
    except EvalError:  # the body could not be read (too large, encoded): it may well be an LLM call
        return min(MAX_ESTIMATE, math.ceil(body_size / 4))
    out = 0
    if isinstance(body, dict):
        for key in _OUTPUT_LIMIT_KEYS:
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                out = value
                break
    return min(MAX_ESTIMATE, math.ceil(body_size / 4) + out)


def used_tokens(flow: http.HTTPFlow) -> int | None:
    """Input + output tokens the upstream reported for this call, None if it reported none."""
    traffic = flow.metadata.get(flowmeta.TRAFFIC) or {}
    llm = traffic.get("llm")
    if not isinstance(llm, dict) or not llm.get("usage_reported"):
        return None
    usage = llm.get("usage")
    if not isinstance(usage, dict):
        return None
    total = 0
    for key in ("input_tokens", "output_tokens"):
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            total += value
    return total


def _body_size(flow: http.HTTPFlow) -> int:
    """The request body's size: read, or announced (`Content-Length`) when it has not been read."""
    body = flow.request.raw_content
    if body is not None and not flow.request.stream:
        return len(body)
    try:
        return max(0, int(flow.request.headers.get("content-length", "0") or 0))
    except ValueError:
        return 0


class Budgets:
    """Pipeline stage after approvals, before the task locks: reserve or refuse (module docstring)."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response is not None:
            return None
        pending = flow.metadata.get(flowmeta.OBLIGATIONS)
        if not pending or flowmeta.OBLIGATION_BUDGET not in pending or flowmeta.OBLIGATION_APPROVAL in pending:
            return None
        return self._reserve(flow)

    async def _reserve(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        decision: Decision = meta[flowmeta.DECISION]
        size = _body_size(flow)
        estimate: int | None = None
        held: list[Reservation] = []
        meta[flowmeta.RESERVATIONS] = held  # settled (given back) even if a later step fails
        try:
            for charge in decision.budgets:
                if charge.unit == "calls":
                    amount = 1
                elif charge.estimate is not None:
                    amount = charge.estimate
                else:
                    if estimate is None:
                        estimate = estimate_tokens(meta.get(flowmeta.FACTS), size)
                    amount = estimate
                result = await self.store.reserve(charge.budget, charge.key, charge.unit, charge.limit, charge.per,
                                                  amount)
                if isinstance(result, Exceeded):
                    await self._give_back(flow, held)
                    self._exceeded(flow, charge, result)
                    return
                held.append(result)
        except StoreUnavailable as e:
            await self._give_back(flow, held)
            budgets = ", ".join(c.budget for c in decision.budgets)
            log.warning("store unavailable, refusing a budgeted call (budget %s, request_id=%s): %s", budgets,
                        meta.get(flowmeta.REQUEST_ID), e)
            responses.refuse(flow, 503, responses.STORE_UNAVAILABLE,
                             f"The shared store is unavailable, so this call (budget {budgets}) was refused and "
                             "not forwarded: budgets are never counted locally. Try again in a few seconds.",
                             headers={"x-should-retry": "false", "retry-after": str(STORE_RETRY_AFTER)})
            return
        except ValueError as e:  # a key the store refuses (too long)
            await self._give_back(flow, held)
            responses.refuse(flow, 400, responses.BAD_REQUEST, f"Cannot count this call against its budget: {e}.")
            return
        _fleet(flow)["budgets"] = [
            {"budget": r.budget, "key": r.key, "unit": r.unit, "reserved": r.amount, "used": r.used,
             "limit": r.limit, "resets_at": iso_time(r.resets_at)} for r in held]
        meta[flowmeta.OBLIGATIONS].discard(flowmeta.OBLIGATION_BUDGET)

    async def _give_back(self, flow: http.HTTPFlow, held: list[Reservation]) -> None:
        for r in held:
            try:
                await self.store.settle(r, 0)
            except StoreUnavailable as e:
                log.warning("could not give back %d %s of budget %s (%s): %s", r.amount, r.unit, r.budget, r.key, e)
        held.clear()

    @staticmethod
    def _exceeded(flow: http.HTTPFlow, charge: BudgetCharge, result: Exceeded) -> None:
        BUDGET_EXCEEDED.labels(charge.budget).inc()
        seconds = max(1, math.ceil(result.resets_at - time.time()))
        resets = iso_time(result.resets_at)
        _fleet(flow)["exceeded"] = {"budget": charge.budget, "key": charge.key, "unit": charge.unit,
                                    "limit": result.limit, "used": result.used, "resets_at": resets}
        responses.refuse(flow, 429, responses.BUDGET_EXCEEDED,
                         f"Budget {charge.budget} ({charge.key}) is used up: {result.used} of {result.limit} "
                         f"{charge.unit} in this window. It resets at {resets} (in {seconds}s); until then do "
                         "not retry these calls.",
                         headers={"retry-after": str(seconds)},
                         extra={"budget": charge.budget, "key": charge.key, "unit": charge.unit,
                                "limit": result.limit, "used": result.used, "resets_at": resets})


class BudgetSettle:
    """Observer after the traffic stage (which knows the call's token usage): settle each reservation once.

    The settlement is awaited before the answer reaches the agent (for a streamed answer, before its end), like
    a lock release, so the agent's next call already sees the real usage; a call budget has nothing to settle
    unless the call was refused or failed."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._settle(flow, answered=flowmeta.REFUSAL not in flow.metadata)

    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # An answer that was cut (the agent hung up before its end, or the upstream broke off mid-stream) was
        # still an answer: the agent read what came, and tokens were spent. Only no answer at all gives back.
        answered = flow.response is not None and flowmeta.REFUSAL not in flow.metadata
        return self._settle(flow, answered=answered)

    def _settle(self, flow: http.HTTPFlow, *, answered: bool) -> Awaitable[None] | None:
        held: list[Reservation] | None = flow.metadata.pop(flowmeta.RESERVATIONS, None)
        if not held:
            return None
        tokens = used_tokens(flow) if answered else None
        actual = []
        for r in held:
            if not answered:
                actual.append(0)  # refused by Bastion after the reservation, or no answer: nothing was spent
            elif r.unit == "calls" or tokens is None:
                actual.append(r.amount)
            else:
                actual.append(tokens)
        for r, spent in zip(held, actual, strict=True):
            if spent:
                BUDGET_SPENT.labels(r.budget, r.unit).inc(spent)
        notes = _fleet(flow).get("budgets")
        if isinstance(notes, list):
            for note, spent in zip(notes, actual, strict=False):
                note["settled"] = spent
        changes = [(r, spent) for r, spent in zip(held, actual, strict=True) if spent != r.amount]
        return self._write(changes) if changes else None

    async def _write(self, changes: list[tuple[Reservation, int]]) -> None:
        for r, spent in changes:
            try:
                await self.store.settle(r, spent)
            except StoreUnavailable as e:
                log.warning("could not settle budget %s (%s): %d %s reserved, %d used: %s", r.budget, r.key,
                            r.amount, r.unit, spent, e)
