"""The fleet-wide kill switch on the proxy: refuse (or hold) the calls of a paused agent.

An operator pauses an agent with `bastion agents pause NAME`, the admin API or the dashboard, and a guard
pauses one that runs away; the pause lives in the shared store (`bastion.coord.fleet`). Every sidecar learns
of it by polling the store (`PauseWatch`, one small read every `POLL_INTERVAL`; the sidecar whose API made
the change applies it at once), so a pause takes effect fleet-wide within a second. Then, for every new call
of that agent (or of every agent, for a `*` pause):

- `action: pause`: 403 `agent_paused` with the reason and who paused it, `x-should-retry: false`;
- `action: hold`: the call is held for a person, like a `hold` rule (approvers `role:approver`), whatever the
  rules decided (a call the rules deny stays denied).

Calls already forwarded finish; calls waiting for an approval when the pause arrives are woken and refused.
While the store cannot be read, the last pauses read stay in force (and are logged): a sidecar cannot learn
of a new pause then, but it never forgets one. A sidecar that starts while the store cannot be read knows of
no pause until its first successful read (it logs that the store does not answer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from mitmproxy import http

from bastion.coord.fleet import ALL_AGENTS, FleetStore, Pause
from bastion.coord.store import StoreUnavailable
from bastion.metrics import AGENTS_PAUSED
from bastion.policy.decision import ApprovalSpec
from bastion.proxy import flowmeta, responses

log = logging.getLogger("bastion.fleet")

POLL_INTERVAL = 0.5
"""How often each sidecar reads the pauses from the store (seconds): a pause takes effect within about this."""

HOLD_APPROVERS = ("role:approver",)
HOLD_WAIT = 30.0
HOLD_TIMEOUT = 3600.0


class PauseWatch:
    """This sidecar's view of the pauses in the store, refreshed every `interval` seconds.

    `on_pause(agent)` is called for each agent (or `*`) newly paused with `action: pause`, so the calls this
    sidecar holds for a person can be refused."""

    def __init__(self, store: FleetStore, interval: float = POLL_INTERVAL,
                 on_pause: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.interval = interval
        self.on_pause = on_pause
        self._pauses: dict[str, Pause] = {}
        self._failing = False

    def paused(self, agent: str) -> Pause | None:
        """The pause that applies to `agent` (its own, else the `*` one), or None."""
        if not self._pauses:
            return None
        own, everyone = self._pauses.get(agent), self._pauses.get(ALL_AGENTS)
        if own is None or everyone is None:
            return own or everyone
        return everyone if everyone.action == "pause" and own.action == "hold" else own  # the stricter stop

    def apply(self, pauses: Iterable[Pause]) -> None:
        """Take `pauses` as the complete set now in force."""
        new = {p.agent: p for p in pauses}
        for agent, pause in new.items():
            before = self._pauses.get(agent)
            if before is None:
                log.warning("agent %s paused (%s) by %s: %s", agent, pause.action, pause.paused_by,
                            pause.reason or "(no reason)")
            newly = pause.action == "pause" and (before is None or before.action != "pause")
            if newly and self.on_pause is not None:
                try:
                    self.on_pause(agent)
                except Exception:
                    log.exception("pause listener failed")
        for agent in self._pauses.keys() - new.keys():
            log.warning("agent %s resumed", agent)
        self._pauses = new
        AGENTS_PAUSED.set(len(new))

    def add(self, pause: Pause) -> None:
        """A pause this sidecar just stored (its API, a guard): in force here at once, before the next poll."""
        self.apply([*(p for p in self._pauses.values() if p.agent != pause.agent), pause])

    def remove(self, agent: str) -> None:
        """A pause this sidecar just lifted."""
        self.apply(p for p in self._pauses.values() if p.agent != agent)

    async def refresh(self) -> None:
        """Read the pauses now. Raises `StoreUnavailable` (the last pauses read stay in force)."""
        self.apply(await self.store.list_pauses())

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            try:
                await self.refresh()
                if self._failing:
                    log.info("pauses can be read from the store again")
                self._failing = False
            except StoreUnavailable as e:
                if not self._failing:
                    log.warning("cannot read pauses from the store (%s); the %d pause(s) last read stay in "
                                "force", e, len(self._pauses))
                self._failing = True
            except Exception:
                log.exception("reading pauses failed")
            await asyncio.sleep(self.interval)


def _fleet(flow: http.HTTPFlow) -> dict[str, Any]:
    return flow.metadata.setdefault(flowmeta.FLEET, {})  # type: ignore[no-any-return]


def refuse_paused(flow: http.HTTPFlow, pause: Pause) -> None:
    """403 `agent_paused`, naming who paused the agent and why."""
    agent = flow.metadata.get(flowmeta.AGENT, "?")
    _fleet(flow)["paused"] = pause.to_json()
    everyone = " (every agent is paused)" if pause.agent == ALL_AGENTS else ""
    reason = f": {pause.reason}" if pause.reason else ""
    responses.refuse(flow, 403, responses.AGENT_PAUSED,
                     f"Agent {agent} is paused{everyone} by {pause.paused_by}{reason}. Stop and report to a person; "
                     "calls are refused until someone resumes it.",
                     headers={"x-should-retry": "false"},
                     extra={"reason": pause.reason, "paused_by": pause.paused_by})


class PauseCheck:
    """Pipeline stage, right after enforcement: refuse or hold the calls of a paused agent.

    Placed once more after the approval stage (`recheck=True`): a call that waited for a person while its
    agent was paused is refused there instead of being forwarded."""

    def __init__(self, watch: PauseWatch, *, recheck: bool = False) -> None:
        self.watch = watch
        self.recheck = recheck

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        meta = flow.metadata
        agent = meta.get(flowmeta.AGENT)
        if agent is None or flowmeta.DECISION not in meta:
            return
        pause = self.watch.paused(agent)
        if pause is None:
            return
        # A call decided before its body arrived cannot be held: an approval binds the body it was shown.
        if pause.action == "pause" or self.recheck or meta.get(flowmeta.DECIDED_EARLY):
            if self.recheck and pause.action == "hold" and flowmeta.OBLIGATION_APPROVAL not in (
                    meta.get(flowmeta.OBLIGATIONS) or ()):
                return  # a person approved this call while the agent is held: that is what `hold` asks for
            refuse_paused(flow, pause)
            return
        decision = meta[flowmeta.DECISION]
        if decision.effect != "allow":
            return  # denied stays denied; a held call is already waiting for a person
        spec = ApprovalSpec(approvers=(HOLD_APPROVERS,), wait=HOLD_WAIT, timeout=HOLD_TIMEOUT,
                            rules=(pause.paused_by,), grants=False)
        meta[flowmeta.DECISION] = dataclasses.replace(decision, effect="hold", approval=spec)
        meta.setdefault(flowmeta.OBLIGATIONS, set()).add(flowmeta.OBLIGATION_APPROVAL)
        _fleet(flow)["paused"] = pause.to_json()
