"""The active policy and its reload history: one object every addon and the admin API read.

A reload builds the new `Policy` completely in a worker thread (parsing and compiling YAML must not stall the
proxy) and then swaps one reference. Requests capture the reference once (identity stores it on the flow),
so each request is evaluated against exactly one policy, old or new, never a mix. An invalid policy keeps
the last good one running and is reported (log, `GET /api/rules`, `bastion_policy_reload_success` = 0).

A large policy must not stall the loop either while it is built or when the previous one goes: see
`bastion.proxy.longlived` (no full collections during the build, the new policy frozen out of later ones, the
old one freed object by object on a worker thread once no request holds it).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.metrics import POLICY_RELOAD_SUCCESS, POLICY_RELOADS, POLICY_RULES
from bastion.policy.engine import Policy
from bastion.policy.load import PolicyIssue, PolicyLoadError, load_policy
from bastion.policy.pacing import release_paced
from bastion.proxy.longlived import full_collections_deferred

log = logging.getLogger("bastion.policy")

Validator = Callable[[Policy], list[PolicyIssue]]


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of one load attempt, as `GET /api/rules` shows it."""

    ok: bool
    trigger: str  # "startup", "watch", "sighup", "api"
    at: float  # unix seconds
    revision: str | None  # the active revision after the attempt
    changed: bool = False
    issues: tuple[PolicyIssue, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "trigger": self.trigger,
            "at": self.at,
            "revision": self.revision,
            "changed": self.changed,
            "errors": [{"file": i.file, "line": i.line, "code": i.code, "message": i.message} for i in self.issues],
        }


def _load(paths: Sequence[str], validate: Validator | None) -> Policy:
    policy = load_policy(paths)
    if validate is not None:
        issues = validate(policy)
        if issues:
            raise PolicyLoadError(issues)
    return policy


class PolicyState:
    """Holds the active policy; `reload()` swaps it atomically or keeps it and records why not."""

    def __init__(self, paths: Sequence[str], policy: Policy, validate: Validator | None = None) -> None:
        self.paths = tuple(paths)
        self._policy = policy
        self._validate = validate
        self._lock = asyncio.Lock()
        self.loaded_at = time.time()
        self.last = ReloadResult(True, "startup", self.loaded_at, policy.revision, True)
        self._listeners: list[Callable[[Policy], None]] = []
        self._retiring: set[asyncio.Task[None]] = set()
        _publish(policy, ok=True)

    @classmethod
    async def load(cls, paths: Sequence[str], validate: Validator | None = None) -> PolicyState:
        """The first load. Raises PolicyLoadError: the caller refuses to start on an invalid policy."""
        policy = await asyncio.to_thread(_load, paths, validate)
        return cls(paths, policy, validate)

    @property
    def policy(self) -> Policy:
        return self._policy

    def on_swap(self, listener: Callable[[Policy], None]) -> None:
        """Call `listener(new_policy)` after each swap (on the event loop)."""
        self._listeners.append(listener)

    async def reload(self, trigger: str) -> ReloadResult:
        """Load the rules again. Concurrent calls run one after another, each on the files as they are then."""
        async with self._lock:
            with full_collections_deferred():
                return self._reloaded(trigger, await self._build(trigger))

    async def _build(self, trigger: str) -> Policy | ReloadResult:
        try:
            return await asyncio.to_thread(_load, self.paths, self._validate)
        except PolicyLoadError as e:
            return self._failed(trigger, tuple(e.issues))
        except Exception as e:  # an unexpected loader failure must not take the proxy down
            log.exception("policy reload (%s) failed unexpectedly", trigger)
            return self._failed(trigger, (PolicyIssue("<rules>", None, f"unexpected error: {e!r}", "internal_error"),))

    def _reloaded(self, trigger: str, new: Policy | ReloadResult) -> ReloadResult:
        if isinstance(new, ReloadResult):
            return new
        old = self._policy
        changed = new.revision != old.revision
        if changed:
            self._policy = new
            self.loaded_at = time.time()
            log.info("policy reloaded (%s): revision %s -> %s, %d rules", trigger, old.revision[:12],
                     new.revision[:12], len(new.rules))
            for listener in self._listeners:
                try:
                    listener(new)
                except Exception:
                    log.exception("policy swap listener failed")
            self._retire([old])
        else:
            log.info("policy reload (%s): unchanged (revision %s)", trigger, old.revision[:12])
            self._retire([new])
        del old, new
        self.last = ReloadResult(True, trigger, time.time(), self._policy.revision, changed)
        POLICY_RELOADS.labels("success").inc()
        _publish(self._policy, ok=True)
        return self.last

    def _retire(self, holder: list[Policy]) -> None:
        """Free a policy that is no longer active, without a stall (see `bastion.proxy.longlived`)."""
        task = asyncio.get_running_loop().create_task(_retire(holder), name="policy-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def retired(self) -> None:
        """Wait until the policies this state replaced have been freed (tests and benchmarks)."""
        while self._retiring:
            await asyncio.gather(*self._retiring)

    def _failed(self, trigger: str, issues: tuple[PolicyIssue, ...]) -> ReloadResult:
        log.error("policy reload (%s) failed, keeping revision %s:\n%s", trigger, self._policy.revision[:12],
                  "\n".join(str(i) for i in issues))
        self.last = ReloadResult(False, trigger, time.time(), self._policy.revision, False, issues)
        POLICY_RELOADS.labels("failure").inc()
        POLICY_RELOAD_SUCCESS.set(0)
        return self.last

    def to_json(self) -> dict[str, Any]:
        """`GET /api/rules`: the active policy plus the last reload attempt (with its errors)."""
        out = self._policy.to_json()
        out["loaded_at"] = self.loaded_at
        out["paths"] = list(self.paths)
        out["last_reload"] = self.last.to_json()
        return out


RETIRE_POLL_S = 1.0
RETIRE_WAIT_S = 3600.0  # then the last request holding it frees it, as any object is freed


async def _retire(holder: list[Policy]) -> None:
    """Wait until no request holds the policy any more (requests keep the one they started with), then free it
    on a worker thread, paced."""
    waited = 0.0
    while sys.getrefcount(holder[0]) > 2 and waited < RETIRE_WAIT_S:  # the list and the call's argument
        await asyncio.sleep(RETIRE_POLL_S)
        waited += RETIRE_POLL_S
    await asyncio.to_thread(release_paced, holder)


def _publish(policy: Policy, *, ok: bool) -> None:
    POLICY_RELOAD_SUCCESS.set(1 if ok else 0)
    POLICY_RULES.set(len(policy.rules))
