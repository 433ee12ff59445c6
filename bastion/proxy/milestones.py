"""Dependency gates between agents on the proxy: `requires` before forwarding, `complete` after a 2xx.

A rule's `requires: ["extracted:{report}"]` keeps the reporting agent's call back until the extraction agent
has finished: the milestone keys (rendered like lock keys) are checked in the shared store in one read, and
any that is missing refuses the call with 424 `dependency_pending`, naming what is missing, with
`x-should-retry: false` (retrying at once will not help; the agent should do other work). A rule's
`complete: {key, ttl}` records its milestone once the upstream answers 2xx, before the answer reaches the
agent, so whoever waits on it can go on at once, on any sidecar. A milestone found in the store is trusted
for `SEEN_FOR` (a second) before the store is asked again, so a busy gate costs no store call per request;
clearing a milestone by hand therefore takes effect within that second.

The store being down refuses calls that require milestones with 503 `store_unavailable` (fail closed); a
milestone that cannot be recorded after a 2xx is logged and noted in the audit record (the call itself went
through; `bastion milestones complete KEY` records it by hand).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from mitmproxy import http

from bastion.coord.fleet import FleetStore
from bastion.coord.store import StoreUnavailable
from bastion.metrics import DEPENDENCY_PENDING, MILESTONES_COMPLETED
from bastion.policy.decision import Decision
from bastion.proxy import flowmeta, responses
from bastion.proxy.locks import STORE_RETRY_AFTER

log = logging.getLogger("bastion.fleet")


def _fleet(flow: http.HTTPFlow) -> dict[str, Any]:
    return flow.metadata.setdefault(flowmeta.FLEET, {})  # type: ignore[no-any-return]


SEEN_FOR = 1.0
"""How long a sidecar trusts that a milestone it found exists (seconds) before asking the store again. A
milestone only appears by itself; clearing one by hand takes effect on every sidecar within this."""

MAX_SEEN = 10_000


class Milestones:
    """Pipeline stage before the approval stage (no person is asked about a call that cannot go yet)."""

    def __init__(self, store: FleetStore, seen_for: float = SEEN_FOR) -> None:
        self.store = store
        self.seen_for = seen_for
        self._seen: dict[str, float] = {}  # milestone key -> monotonic time until which it is known to exist

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response is not None:
            return None
        pending = flow.metadata.get(flowmeta.OBLIGATIONS)
        if not pending or flowmeta.OBLIGATION_MILESTONE not in pending:
            return None
        requires = flow.metadata[flowmeta.DECISION].requires
        now = time.monotonic()
        if all(self._seen.get(need.key, 0.0) > now for need in requires):  # found moments ago: no store call
            _fleet(flow)["requires"] = list(dict.fromkeys(need.key for need in requires))
            pending.discard(flowmeta.OBLIGATION_MILESTONE)
            return None
        return self._check(flow)

    def forget(self, key: str | None = None) -> None:
        """Ask the store again next time (a milestone cleared through this sidecar's API): `key`, or all."""
        if key is None:
            self._seen.clear()
        else:
            self._seen.pop(key, None)

    async def _check(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        decision: Decision = meta[flowmeta.DECISION]
        keys = list(dict.fromkeys(need.key for need in decision.requires))
        rule = decision.requires[0].rule
        try:
            missing = await self.store.missing_milestones(keys)
        except StoreUnavailable as e:
            log.warning("store unavailable, refusing a call that requires milestones %s (request_id=%s): %s",
                        ", ".join(keys), meta.get(flowmeta.REQUEST_ID), e)
            responses.refuse(flow, 503, responses.STORE_UNAVAILABLE,
                             f"The shared store is unavailable, so this call (which requires {', '.join(keys)}, "
                             f"rule {rule}) was refused and not forwarded. Try again in a few seconds.",
                             rule=rule, headers={"x-should-retry": "false", "retry-after": str(STORE_RETRY_AFTER)})
            return
        except ValueError as e:  # a key the store refuses (too long)
            responses.refuse(flow, 400, responses.BAD_REQUEST, f"Cannot check this call's milestones: {e}.",
                             rule=rule)
            return
        _fleet(flow)["requires"] = keys
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()
        until = time.monotonic() + self.seen_for
        for key in keys:
            if key not in missing:
                self._seen[key] = until
        if missing:
            _fleet(flow)["missing"] = missing
            DEPENDENCY_PENDING.inc()
            by = next((n.rule for n in decision.requires if n.key == missing[0]), rule)
            responses.refuse(flow, 424, responses.DEPENDENCY_PENDING,
                             f"This call must wait: rule {by} requires {', '.join(missing)}, which "
                             f"{'is' if len(missing) == 1 else 'are'} not done yet (another agent's work, "
                             "or a person's). Do other work and try again later.",
                             rule=by, headers={"x-should-retry": "false"}, extra={"missing": missing})
            return
        meta[flowmeta.OBLIGATIONS].discard(flowmeta.OBLIGATION_MILESTONE)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Record the decision's milestones after a 2xx; awaited before the agent gets the answer."""
        meta = flow.metadata
        decision: Decision | None = meta.get(flowmeta.DECISION)
        if decision is None or not decision.completes or flowmeta.REFUSAL in meta or flow.response is None:
            return None
        if not 200 <= flow.response.status_code < 300:
            _fleet(flow)["not_completed"] = {"keys": [c.key for c in decision.completes],
                                             "reason": f"upstream answered {flow.response.status_code}"}
            return None
        return self._complete(flow, decision)

    async def _complete(self, flow: http.HTTPFlow, decision: Decision) -> None:
        meta = flow.metadata
        agent: str = meta[flowmeta.AGENT]
        done: list[str] = []
        for action in decision.completes:
            try:
                await self.store.complete_milestone(action.key, action.ttl, agent, meta.get(flowmeta.REQUEST_ID))
            except (StoreUnavailable, ValueError) as e:
                log.error("could not record milestone %s (rule %s) after a 2xx: %s; record it with `bastion "
                          "milestones complete`", action.key, action.rule, e)
                _fleet(flow).setdefault("not_completed", {"keys": [], "reason": str(e)})["keys"].append(action.key)
                continue
            MILESTONES_COMPLETED.inc()
            done.append(action.key)
        if done:
            _fleet(flow)["completed"] = done
