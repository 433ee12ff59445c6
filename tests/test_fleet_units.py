"""Pure parts of the fleet stages: which pause applies, how a cut answer is charged, what a guard counts."""

from __future__ import annotations

from typing import Any

from mitmproxy.test import tflow

from bastion.coord.fleet import Pause, Reservation
from bastion.policy.fleet_rules import GuardSpec
from bastion.proxy import flowmeta
from bastion.proxy.agent_guards import hits
from bastion.proxy.budgets import BudgetSettle
from bastion.proxy.pauses import PauseWatch


def pause(agent: str, action: str = "pause") -> Pause:
    return Pause(agent, "why", "user:alice", 0.0, action)  # type: ignore[arg-type]


def test_the_stricter_of_an_agents_own_pause_and_the_fleet_wide_one_applies() -> None:
    watch = PauseWatch(store=None)  # type: ignore[arg-type]
    watch.apply([pause("bot", "hold")])
    assert watch.paused("bot").action == "hold"  # type: ignore[union-attr]
    assert watch.paused("other") is None
    watch.add(pause("*", "pause"))
    assert watch.paused("bot").action == "pause"  # type: ignore[union-attr]  # the kill switch wins over a hold
    assert watch.paused("other").agent == "*"  # type: ignore[union-attr]
    watch.remove("*")
    assert watch.paused("bot").action == "hold"  # type: ignore[union-attr]


def test_a_new_pause_wakes_held_calls_only_when_it_stops_the_agent() -> None:
    woken: list[str] = []
    watch = PauseWatch(store=None, on_pause=woken.append)  # type: ignore[arg-type]
    watch.apply([pause("a", "hold")])
    watch.apply([pause("a", "hold"), pause("b")])
    watch.apply([pause("a"), pause("b")])
    assert woken == ["b", "a"]


class _Store:
    def __init__(self) -> None:
        self.settled: list[tuple[Reservation, int]] = []

    async def settle(self, r: Reservation, actual: int) -> None:
        self.settled.append((r, actual))


def _reserved(flow: Any, unit: str, amount: int) -> Reservation:
    r = Reservation("b", "k", unit, amount, 100, amount, 0.0, 3600.0)  # type: ignore[arg-type]
    flow.metadata[flowmeta.RESERVATIONS] = [r]
    return r


async def test_an_answer_cut_short_is_charged_and_no_answer_gives_back() -> None:
    store = _Store()
    settle = BudgetSettle(store)  # type: ignore[arg-type]
    cut = tflow.tflow(resp=True)
    _reserved(cut, "calls", 1)
    assert settle.error(cut) is None  # charged as answered: nothing to change
    unanswered = tflow.tflow()
    r = _reserved(unanswered, "calls", 1)
    pending = settle.error(unanswered)
    assert pending is not None
    await pending
    assert store.settled == [(r, 0)]


async def test_tokens_settle_with_the_reported_usage() -> None:
    store = _Store()
    settle = BudgetSettle(store)  # type: ignore[arg-type]
    flow = tflow.tflow(resp=True)
    r = _reserved(flow, "tokens", 10)
    flow.metadata[flowmeta.TRAFFIC] = {"llm": {"usage_reported": True,
                                               "usage": {"input_tokens": 31, "output_tokens": 12}}}
    pending = settle.response(flow)
    assert pending is not None
    await pending
    assert store.settled == [(r, 43)]


def test_what_each_guard_counts() -> None:
    def guard(metric: str) -> GuardSpec:
        return GuardSpec("g", ("*",), metric, 5, 60.0, "pause", "x:1")  # type: ignore[arg-type]

    assert hits(guard("denials"), "policy_denied", 403, False)
    assert not hits(guard("denials"), "agent_paused", 403, False)
    assert hits(guard("errors"), None, 503, False)
    assert hits(guard("errors"), "upstream_unreachable", 502, False)
    assert hits(guard("errors"), None, None, True)
    assert not hits(guard("errors"), None, 404, False)
    assert hits(guard("calls"), None, 200, False)
