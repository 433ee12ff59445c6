"""What a candidate policy would have decided for requests the audit log recorded (`bastion replay`).

The audit keeps every request's facts (agent, method, URL, headers, body) beside the decision the running
policy took. Deciding them again under a candidate answers the question a policy author has before enforcing
a change: which real calls would it have refused, held or let through that it did not before?

What is compared is the *policy's* decision: its effect (allow, deny, hold), what report mode would have done,
the deciding rules, and the store-backed obligations (locks, milestones, budgets). The candidate is not run
against the store's state of the time, which the audit does not hold. A call is therefore **undetermined**,
never guessed, when:

- the candidate reads a part of the request the audit does not hold as it was: a header, query parameter or
  body that redaction masked, a URL masked by value, a body cut at the audit's size cap, streamed in part, not
  stored, removed by retention, or stored decoded while the proxy saw it content-encoded;
- the candidate lets the call through only on a lock, milestone or budget the recorded call did not pass
  (whether it would have passed depends on the store then).

Records the rules never decided are skipped and counted by reason: a caller without a valid identity (407),
a request refused before the rules (malformed, too large).

`Replay.add(record)` judges one record; `Replay.report()` sums them up, grouped by kind of change and rule,
and by agent, with a few example request ids each (`bastion audit show ID`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bastion.policy.engine import Policy
from bastion.policy.facts import EvalError, FactsError, RequestFacts
from bastion.policy.testing import check_jsonrpc

DEFAULT_GROUP = "(default)"
UNKNOWN_AGENT = "(agent not in the candidate)"
MALFORMED = "(malformed under the candidate)"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The part of a decision replay compares. `rules` is sorted, so two decisions by the same rules compare
    equal whatever the order they were listed in; `obligations` are the store-backed ones
    (`lock:KEY`, `release:KEY`, `requires:KEY`, `budget:ID:KEY`)."""

    effect: str
    would: str
    rules: tuple[str, ...]
    obligations: frozenset[str] = frozenset()

    def rule_label(self) -> str:
        return ",".join(self.rules) if self.rules else DEFAULT_GROUP


def change_kind(old: Verdict, new: Verdict) -> str | None:
    """How the decision changed, or None: the effect first, then what report mode would do, the deciding rules,
    and last the obligations (a lock dropped from an allow rule lets through calls a lock once refused)."""
    if old.effect != new.effect:
        return f"{old.effect} → {new.effect}"
    if old.would != new.would:
        return f"report: would {old.would} → would {new.would}"
    if old.rules != new.rules:
        return "rules changed"
    if old.obligations != new.obligations:
        return "obligations changed"
    return None


class _Watched(Mapping[str, str]):
    """The request's headers, remembering which names a rule asked for (a rule that reads a masked header
    cannot be decided from the audit)."""

    def __init__(self, headers: dict[str, str], read: set[str]) -> None:
        self._headers = headers
        self._read = read

    def __getitem__(self, name: str) -> str:
        self._read.add(f"header:{name}")
        return self._headers[name]

    def __contains__(self, name: object) -> bool:
        self._read.add(f"header:{name}")
        return name in self._headers

    def __iter__(self) -> Any:
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)


@dataclass(slots=True)
class ReplayFacts(RequestFacts):
    """RequestFacts that note what the rules read: `header:NAME`, `query:NAME`, `body`."""

    read: set[str] = field(default_factory=set)

    def query_value(self, name: str) -> Any:
        self.read.add(f"query:{name}")
        return RequestFacts.query_value(self, name)

    def json(self) -> Any:
        self.read.add("body")
        return RequestFacts.json(self)

    def llm(self) -> Any:
        self.read.add("body")
        return RequestFacts.llm(self)

    def mcp(self) -> Any:
        self.read.add("body")
        return RequestFacts.mcp(self)


def recorded_verdict(record: Any) -> Verdict | None:
    """The decision the record holds, or None when no rule decided the request."""
    d = record.decision
    if d is None:
        return None
    return Verdict(d.effect, d.would_effect, tuple(sorted(d.rules)), recorded_obligations(record))


def recorded_obligations(record: Any) -> frozenset[str]:
    """The store-backed obligations the recorded call met or tried: its locks, the milestones it required, the
    budgets it was charged against (or refused by)."""
    out = {f"release:{lk.key}" if lk.action.startswith("release") else f"lock:{lk.key}" for lk in record.locks}
    fleet = record.extra.get("fleet") if isinstance(record.extra, dict) else None
    if isinstance(fleet, dict):
        out.update(f"requires:{k}" for k in fleet.get("requires") or () if isinstance(k, str))
        charged = list(fleet.get("budgets") or ())
        if isinstance(fleet.get("exceeded"), dict):
            charged.append(fleet["exceeded"])
        out.update(f"budget:{b.get('budget')}:{b.get('key')}" for b in charged if isinstance(b, dict))
    return frozenset(out)


def decision_obligations(decision: Any) -> dict[str, str]:
    """The candidate's store-backed obligations, each with what to call it in a report (by rule or budget, so
    that calls on a thousand tickets make one group)."""
    return {
        **{f"lock:{lk.key}": f"lock of rule {lk.rule}" for lk in decision.locks},
        **{f"release:{r.key}": f"release of rule {r.rule}" for r in decision.releases},
        **{f"requires:{m.key}": f"milestone required by rule {m.rule}" for m in decision.requires},
        **{f"budget:{b.budget}:{b.key}": f"budget {b.budget}" for b in decision.budgets}}


def request_headers(record: Any) -> dict[str, str]:
    """The record's request headers as the rules saw them: lower-case names, repeats joined with ", "."""
    out: dict[str, str] = {}
    for name, value in record.request.headers:
        key = name.lower()
        out[key] = value if key not in out else f"{out[key]}, {value}"
    return out


def _blind_spots(record: Any, headers: dict[str, str]) -> dict[str, str]:
    """What the audit does not hold as the proxy saw it, as {fact read: why}. `*` means every decision."""
    spots: dict[str, str] = {}
    for path in record.redactions:
        if path == "/request/url":
            spots["*"] = "the URL was redacted"
        elif path.startswith("/request/url/query/"):
            name = _unpointer(path[len("/request/url/query/"):])
            spots[f"query:{name}"] = f"query parameter {name!r} was redacted"
        elif path.startswith("/request/headers/"):
            name = _unpointer(path[len("/request/headers/"):])
            spots[f"header:{name}"] = f"header {name!r} was redacted"
        elif path == "/request/body" or path.startswith("/request/body/"):
            spots.setdefault("body", "the body was redacted")
    body = record.request.body
    if body is not None and body.size > 0:
        if body.content is None:
            spots["body"] = "the body was not stored" if record.purged_us is None else "the body was purged"
        elif body.truncated or not body.complete:
            spots["body"] = "the body was cut at the audit's size cap"
    coding = headers.get("content-encoding", "").strip().lower()
    if body is not None and body.size > 0 and coding not in ("", "identity"):
        spots["body"] = f"the body was stored decoded, the rules saw it {coding[:40]}-encoded"
    return spots


def _unpointer(part: str) -> str:
    return part.split("/", 1)[0].replace("~1", "/").replace("~0", "~")


@dataclass(slots=True)
class Group:
    keep: int
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, record_id: str) -> None:
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(record_id)


@dataclass(slots=True)
class AgentTally:
    replayed: int = 0
    changed: Counter[str] = field(default_factory=Counter)
    undetermined: int = 0


class Replay:
    """Judges records one by one under `candidate`; memory stays bounded by the number of distinct groups."""

    def __init__(self, candidate: Policy, *, examples: int = 3, body_limit: int | None = None) -> None:
        self.candidate = candidate
        self.examples = examples
        self.body_limit = body_limit
        self.read = 0
        self.unchanged = 0
        self.skipped: Counter[str] = Counter()
        self.changes: dict[tuple[str, str, str], Group] = {}
        self.undetermined: dict[str, Group] = {}
        self.agents: dict[str, AgentTally] = {}
        self.first_us: int | None = None
        self.last_us: int | None = None
        self._started = time.perf_counter()

    def add(self, record: Any) -> str:
        """Judge one record: returns `unchanged`, `changed`, `undetermined` or `skipped`."""
        self.read += 1
        self.first_us = record.started_us if self.first_us is None else min(self.first_us, record.started_us)
        self.last_us = record.started_us if self.last_us is None else max(self.last_us, record.started_us)
        agent = record.agent
        if agent is None:
            self.skipped["no identity (refused before the rules)"] += 1
            return "skipped"
        old = recorded_verdict(record)
        if old is None:
            why = record.error.type if record.error is not None else record.outcome
            self.skipped[f"not decided by the rules ({why})"] += 1
            return "skipped"
        tally = self.agents.setdefault(agent, AgentTally())
        tally.replayed += 1
        new, unknown = self.judge(record, agent)
        if unknown is not None:
            tally.undetermined += 1
            self.undetermined.setdefault(unknown, Group(self.examples)).add(record.id)
            return "undetermined"
        assert new is not None
        kind = change_kind(old, new)
        if kind is None:
            self.unchanged += 1
            return "unchanged"
        tally.changed[kind] += 1
        self.changes.setdefault((kind, old.rule_label(), new.rule_label()), Group(self.examples)).add(record.id)
        return "changed"

    def judge(self, record: Any, agent: str) -> tuple[Verdict | None, str | None]:
        """The candidate's verdict on the record, or why it cannot be known."""
        policy = self.candidate
        if agent not in policy.agents:
            return Verdict("deny", "deny", (UNKNOWN_AGENT,)), None
        req = record.request
        headers = request_headers(record)
        read: set[str] = set()
        body = req.body.content if req.body is not None else None
        url = req.url
        if headers.get("upgrade", "").lower() == "websocket":  # the proxy judges an upgrade as ws:// or wss://
            url = "ws" + url[4:] if url.startswith("http") else url
        try:
            facts = ReplayFacts.from_url(req.method, url, headers=headers, body=body, normalize=policy.normalize,
                                         **({"body_limit": self.body_limit} if self.body_limit else {}))
            check_jsonrpc(facts)  # reads every body and a few headers: only what the rules read counts
            facts.read = read
            facts.headers = _Watched(dict(facts.headers), read)
            decision = policy.evaluate(facts, agent)
        except FactsError:
            spots = _blind_spots(record, headers)
            if spots:  # a masked or cut request may be what the candidate refuses
                return None, next(iter(spots.values()))
            return Verdict("deny", "deny", (MALFORMED,)), None
        except EvalError as e:  # evaluation itself fails closed in the engine; this is a last resort
            return None, f"cannot be evaluated: {e}"
        spots = _blind_spots(record, headers)
        if spots:
            if "*" in spots:
                return None, spots["*"]
            for fact in sorted(read):
                if fact in spots:
                    return None, spots[fact]
        obligations = decision_obligations(decision)
        new = Verdict(decision.effect, decision.would_effect, tuple(sorted(decision.rules)),
                      frozenset(obligations))
        if new.effect != "deny":  # a release never refuses a call: only what must be taken or found counts
            untried = {o for o in obligations if not o.startswith("release:")} - recorded_obligations(record)
            if untried:
                return None, f"depends on the store's state then ({obligations[min(untried)]})"
        return new, None

    def report(self) -> dict[str, Any]:
        """The stable JSON report (documented in the README, "Changing a policy safely")."""
        seconds = max(time.perf_counter() - self._started, 1e-9)
        changed = sum(g.count for g in self.changes.values())
        undetermined = sum(g.count for g in self.undetermined.values())
        changes = sorted(self.changes.items(), key=lambda kv: (-kv[1].count, kv[0]))
        return {
            "candidate": {"revision": self.candidate.revision, "files": list(self.candidate.sources)},
            "records": self.read,
            "replayed": self.unchanged + changed + undetermined,
            "unchanged": self.unchanged,
            "changed": changed,
            "undetermined": undetermined,
            "skipped": sum(self.skipped.values()),
            "first_started_us": self.first_us,
            "last_started_us": self.last_us,
            "changes": [{"change": kind, "from_rules": old, "to_rules": new, "count": g.count,
                         "examples": g.examples} for (kind, old, new), g in changes],
            "undetermined_reasons": [{"reason": reason, "count": g.count, "examples": g.examples}
                                     for reason, g in sorted(self.undetermined.items(),
                                                             key=lambda kv: (-kv[1].count, kv[0]))],
            "skipped_reasons": dict(sorted(self.skipped.items())),
            "agents": {name: {"replayed": t.replayed, "changed": dict(sorted(t.changed.items())),
                              "undetermined": t.undetermined}
                       for name, t in sorted(self.agents.items())},
            "seconds": round(seconds, 3),
            "records_per_second": round(self.read / seconds),
        }
