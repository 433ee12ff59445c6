"""The audit record: one per HTTP exchange an agent made through Bastion, whatever its outcome.

The JSON shape produced by `AuditRecord.to_json` is the stored, exported and hashed form; `SCHEMA` names its
version. It is written out field by field (not derived from a library's model) so that an upgrade can never
change the bytes a hash chain was computed over.

Conventions:
- integers only for numbers Bastion produces: times are Unix microseconds (`*_us`), durations microseconds;
- header lists keep order and repeats, as `{"name", "value"}` objects like HAR;
- a body is described by `Body` (sizes, digests, truncation); its stored bytes travel beside the JSON
  (`Body.content`) so retention can delete bodies without touching what the chain covers;
- the canonical encoding (`canonical`) is sorted-keys, compact, UTF-8 JSON without NaN; `hash` and body
  `content` are never part of it.

The proxy builds a record with raw values; the audit writer redacts it, fills the bodies and the chain link
before anything is written (see `bastion.audit.writer`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

SCHEMA = "bastion.audit/1"

Outcome = Literal["forwarded", "refused", "upstream_error", "client_gone"]
OUTCOMES: tuple[str, ...] = ("forwarded", "refused", "upstream_error", "client_gone")
"""forwarded: the upstream answered and the answer went back (whatever its status).
refused: Bastion answered itself (407, 403, 409, 423, 503, ...); `error.type` is the refusal's type.
upstream_error: the upstream could not be reached or broke off; Bastion answered 502/504.
client_gone: the agent disconnected before the exchange finished."""

Header = tuple[str, str]


class RecordError(ValueError):
    """Stored JSON that is not a valid audit record (corrupt or tampered with)."""


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(obj: object) -> bytes:
    """The bytes a record hash is computed over: sorted keys, no whitespace, UTF-8, no NaN or Infinity."""
    return _CANONICAL.encode(obj).encode()


# --- small typed readers for from_json: a tampered or truncated record must fail with RecordError ------------

def _get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if not isinstance(d, Mapping):
        raise RecordError(f"expected an object around {key!r}")
    value = d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"field {key!r}: expected {getattr(kind, '__name__', kind)}, got {value!r:.60}")
    return value


def _opt_obj(d: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    return _get(d, key, dict, optional=True)


def _str_list(d: Mapping[str, Any], key: str) -> list[str]:
    values = _get(d, key, list, optional=True) or []
    if not all(isinstance(v, str) for v in values):
        raise RecordError(f"field {key!r}: expected a list of strings")
    return list(values)


def _headers_to_json(headers: list[Header]) -> list[dict[str, str]]:
    return [{"name": n, "value": v} for n, v in headers]


def _headers_from_json(d: Mapping[str, Any]) -> list[Header]:
    out: list[Header] = []
    for h in _get(d, "headers", list, optional=True) or []:
        out.append((_get(h, "name", str), _get(h, "value", str)))
    return out


# --- parts -----------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Body:
    """What was transferred and what was kept of one message body.

    `size` and `sha256` describe the bytes as they crossed the proxy (after HTTP framing, before any
    Content-Encoding was undone): they identify the body even when only a prefix is stored. `sha256` is left
    out (None) when redaction changed the stored copy: a digest of the original would let anyone confirm a
    guessed secret (a short password) offline. The stored copy is decoded (gzip/deflate/br/zstd undone),
    redacted, and at most `max_body_bytes` long; `stored_sha256` is its digest, which `verify` checks while
    the body is kept. `note` says why less than the whole body is stored, when that happened.
    """

    size: int
    sha256: str | None
    mime_type: str = ""
    encoding: str = ""
    stored: int = 0
    stored_sha256: str | None = None
    truncated: bool = False
    complete: bool = True
    note: str | None = None
    content: bytes | None = field(default=None, compare=False, repr=False)

    def to_json(self, *, content: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size": self.size, "sha256": self.sha256, "mime_type": self.mime_type, "encoding": self.encoding,
            "stored": self.stored, "stored_sha256": self.stored_sha256, "truncated": self.truncated,
            "complete": self.complete, "note": self.note,
        }
        if content and self.content is not None:
            try:
                out["content"] = {"text": self.content.decode("utf-8")}
            except UnicodeDecodeError:
                out["content"] = {"base64": base64.b64encode(self.content).decode("ascii")}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Body:
        body = cls(
            size=_get(d, "size", int), sha256=_get(d, "sha256", str, optional=True),
            mime_type=_get(d, "mime_type", str, optional=True) or "",
            encoding=_get(d, "encoding", str, optional=True) or "",
            stored=_get(d, "stored", int, optional=True) or 0,
            stored_sha256=_get(d, "stored_sha256", str, optional=True),
            truncated=bool(_get(d, "truncated", bool, optional=True)),
            complete=_get(d, "complete", bool, optional=True) is not False,
            note=_get(d, "note", str, optional=True),
        )
        c = _opt_obj(d, "content")
        if c is not None:
            if isinstance(c.get("text"), str):
                body.content = c["text"].encode("utf-8")
            elif isinstance(c.get("base64"), str):
                try:
                    body.content = base64.b64decode(c["base64"], validate=True)
                except (binascii.Error, ValueError):
                    raise RecordError("body content: bad base64") from None
        return body

    @property
    def text(self) -> str | None:
        """The stored content as text, if it is valid UTF-8."""
        if self.content is None:
            return None
        try:
            return self.content.decode("utf-8")
        except UnicodeDecodeError:
            return None


def _body_to_json(body: Body | None, content: bool) -> dict[str, Any] | None:
    return None if body is None else body.to_json(content=content)


def _body_from_json(d: Mapping[str, Any]) -> Body | None:
    b = _opt_obj(d, "body")
    return None if b is None else Body.from_json(b)


@dataclass(slots=True)
class Identity:
    """Who made the call, as the authenticated channel says; `claimed` is the name sent with bad credentials.

    `auth`: "pinned" (`--agent`), "basic" (Proxy-Authorization checked), "missing" (no credentials),
    "invalid" (wrong credentials or unknown agent).
    """

    agent: str | None
    auth: str
    client: str
    claimed: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "auth": self.auth, "client": self.client, "claimed": self.claimed}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Identity:
        return cls(_get(d, "agent", str, optional=True), _get(d, "auth", str), _get(d, "client", str),
                   _get(d, "claimed", str, optional=True))


@dataclass(slots=True)
class Request:
    method: str
    url: str
    http_version: str = "HTTP/1.1"
    headers: list[Header] = field(default_factory=list)
    body: Body | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    def to_json(self, *, content: bool = False) -> dict[str, Any]:
        return {"method": self.method, "url": self.url, "http_version": self.http_version,
                "headers": _headers_to_json(self.headers), "body": _body_to_json(self.body, content)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Request:
        return cls(_get(d, "method", str), _get(d, "url", str), _get(d, "http_version", str),
                   _headers_from_json(d), _body_from_json(d))


@dataclass(slots=True)
class Response:
    """The answer the agent got. `source` is "upstream", or "bastion" for Bastion's own refusals and errors."""

    status: int
    reason: str = ""
    http_version: str = "HTTP/1.1"
    headers: list[Header] = field(default_factory=list)
    body: Body | None = None
    source: Literal["upstream", "bastion"] = "upstream"
    streamed: bool = False

    def to_json(self, *, content: bool = False) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "http_version": self.http_version,
                "headers": _headers_to_json(self.headers), "body": _body_to_json(self.body, content),
                "source": self.source, "streamed": self.streamed}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Response:
        source = _get(d, "source", str, optional=True) or "upstream"
        if source not in ("upstream", "bastion"):
            raise RecordError(f"response source {source!r}")
        return cls(_get(d, "status", int), _get(d, "reason", str, optional=True) or "",
                   _get(d, "http_version", str, optional=True) or "", _headers_from_json(d), _body_from_json(d),
                   source, bool(_get(d, "streamed", bool, optional=True)))


class _DecisionLike(Protocol):
    effect: str
    would_effect: str
    mode: str
    rules: tuple[str, ...]
    reason: str
    message: str | None
    errors: tuple[str, ...]


@dataclass(slots=True)
class DecisionFacts:
    """The policy outcome: `effect` enforced, `would_effect` what the rules said (they differ in report mode)."""

    effect: str
    would_effect: str
    mode: str
    rules: list[str] = field(default_factory=list)
    reason: str = "rule"
    message: str | None = None
    errors: list[str] = field(default_factory=list)

    @classmethod
    def from_decision(cls, decision: _DecisionLike) -> DecisionFacts:
        """From a `bastion.policy.decision.Decision` (or anything shaped like it)."""
        return cls(decision.effect, decision.would_effect, decision.mode, list(decision.rules),
                   decision.reason, decision.message, list(decision.errors))

    def to_json(self) -> dict[str, Any]:
        return {"effect": self.effect, "would_effect": self.would_effect, "mode": self.mode,
                "rules": list(self.rules), "reason": self.reason, "message": self.message,
                "errors": list(self.errors)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DecisionFacts:
        return cls(_get(d, "effect", str), _get(d, "would_effect", str), _get(d, "mode", str),
                   _str_list(d, "rules"), _get(d, "reason", str), _get(d, "message", str, optional=True),
                   _str_list(d, "errors"))


@dataclass(slots=True)
class LockFact:
    """One task-lock step for this call. `action`: "acquired", "renewed", "conflict", "released",
    "release_failed"; `holder` is the other agent on a conflict; `fence` the lock's fencing token."""

    key: str
    action: str
    rule: str | None = None
    holder: str | None = None
    fence: int | None = None
    expires_us: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "action": self.action, "rule": self.rule, "holder": self.holder,
                "fence": self.fence, "expires_us": self.expires_us}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LockFact:
        return cls(_get(d, "key", str), _get(d, "action", str), _get(d, "rule", str, optional=True),
                   _get(d, "holder", str, optional=True), _get(d, "fence", int, optional=True),
                   _get(d, "expires_us", int, optional=True))


@dataclass(slots=True)
class ApprovalFact:
    """A held call's approval. `state`: "pending", "approved", "denied", "cancelled", "expired", "consumed" (an
    approved call re-sent and let through once), "granted" (`id` is the grant's), "given_back" (a later stage
    refused the call, so its approval was returned); `note` is the approver's comment or reason."""

    id: str
    state: str
    decided_by: str | None = None
    note: str | None = None
    waited_us: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "decided_by": self.decided_by, "note": self.note,
                "waited_us": self.waited_us}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ApprovalFact:
        return cls(_get(d, "id", str), _get(d, "state", str), _get(d, "decided_by", str, optional=True),
                   _get(d, "note", str, optional=True), _get(d, "waited_us", int, optional=True) or 0)


@dataclass(slots=True)
class Timings:
    """Microseconds: policy evaluation, forward-to-last-byte upstream, and first byte in to last byte out."""

    total_us: int
    decision_us: int | None = None
    upstream_us: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"total_us": self.total_us, "decision_us": self.decision_us, "upstream_us": self.upstream_us}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Timings:
        return cls(_get(d, "total_us", int), _get(d, "decision_us", int, optional=True),
                   _get(d, "upstream_us", int, optional=True))


@dataclass(slots=True)
class ErrorFacts:
    """Why the exchange did not simply complete: a refusal's `error.type` (as the agent saw it), or
    "upstream_error" / "client_gone" with what the proxy knew."""

    type: str
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ErrorFacts:
        return cls(_get(d, "type", str), _get(d, "message", str, optional=True) or "")


@dataclass(slots=True, frozen=True)
class ChainLink:
    """Place of a record in its writer's hash chain: `prev` is the hash of record `seq - 1` of `writer`."""

    writer: str
    seq: int
    prev: str

    def to_json(self) -> dict[str, Any]:
        return {"writer": self.writer, "seq": self.seq, "prev": self.prev}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ChainLink:
        return cls(_get(d, "writer", str), _get(d, "seq", int), _get(d, "prev", str))


# --- the record ------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class AuditRecord:
    """One HTTP exchange. Build it in the proxy, hand it to `AuditWriter.submit`, then leave it alone.

    `id` is the `X-Bastion-Request-Id` the agent saw (`new_request_id()`). `redactions` (JSON-pointer paths of
    masked values), `chain`, `hash` and the bodies are filled in by the writer. `extra` carries facts other
    parts add (for instance LLM token usage); it must be JSON-serialisable. `purged_us` is not part of the
    record's JSON: stores set it when retention removed the bodies.
    """

    id: str
    started_us: int
    ended_us: int
    identity: Identity
    request: Request
    outcome: Outcome
    timings: Timings
    response: Response | None = None
    error: ErrorFacts | None = None
    decision: DecisionFacts | None = None
    locks: list[LockFact] = field(default_factory=list)
    approval: ApprovalFact | None = None
    policy_revision: str | None = None
    upstream: str | None = None
    redactions: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    chain: ChainLink | None = None
    hash: str | None = None
    purged_us: int | None = None
    schema: str = SCHEMA

    @property
    def agent(self) -> str | None:
        return self.identity.agent

    @property
    def effect(self) -> str | None:
        return self.decision.effect if self.decision else None

    @property
    def status(self) -> int | None:
        return self.response.status if self.response else None

    def to_json(self, *, with_content: bool = False, with_hash: bool = False) -> dict[str, Any]:
        """The record as JSON. Without content and hash this is exactly what the chain hashes."""
        out: dict[str, Any] = {
            "schema": self.schema, "id": self.id, "started_us": self.started_us, "ended_us": self.ended_us,
            "identity": self.identity.to_json(), "request": self.request.to_json(content=with_content),
            "response": None if self.response is None else self.response.to_json(content=with_content),
            "outcome": self.outcome, "error": None if self.error is None else self.error.to_json(),
            "decision": None if self.decision is None else self.decision.to_json(),
            "locks": [lk.to_json() for lk in self.locks],
            "approval": None if self.approval is None else self.approval.to_json(),
            "policy_revision": self.policy_revision, "upstream": self.upstream, "timings": self.timings.to_json(),
            "redactions": list(self.redactions), "extra": dict(self.extra),
            "chain": None if self.chain is None else self.chain.to_json(),
        }
        if with_hash:
            out["hash"] = self.hash
            if self.purged_us is not None:
                out["purged_us"] = self.purged_us
        return out

    def canonical_bytes(self) -> bytes:
        return canonical(self.to_json())

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AuditRecord:
        """Parse a record (with or without `hash` and body `content`). Raises RecordError when malformed."""
        schema = _get(d, "schema", str)
        if schema != SCHEMA:
            raise RecordError(f"unknown record schema {schema!r}")
        outcome = _get(d, "outcome", str)
        if outcome not in OUTCOMES:
            raise RecordError(f"unknown outcome {outcome!r}")
        resp, err, dec, appr, chain = (_opt_obj(d, k) for k in ("response", "error", "decision", "approval",
                                                                  "chain"))
        extra = _get(d, "extra", dict, optional=True) or {}
        return cls(
            id=_get(d, "id", str), started_us=_get(d, "started_us", int), ended_us=_get(d, "ended_us", int),
            identity=Identity.from_json(_get(d, "identity", dict)),
            request=Request.from_json(_get(d, "request", dict)),
            outcome=outcome,  # type: ignore[arg-type]
            timings=Timings.from_json(_get(d, "timings", dict)),
            response=None if resp is None else Response.from_json(resp),
            error=None if err is None else ErrorFacts.from_json(err),
            decision=None if dec is None else DecisionFacts.from_json(dec),
            locks=[LockFact.from_json(x) for x in _get(d, "locks", list, optional=True) or []],
            approval=None if appr is None else ApprovalFact.from_json(appr),
            policy_revision=_get(d, "policy_revision", str, optional=True),
            upstream=_get(d, "upstream", str, optional=True),
            redactions=_str_list(d, "redactions"),
            extra=dict(extra),
            chain=None if chain is None else ChainLink.from_json(chain),
            hash=_get(d, "hash", str, optional=True),
            purged_us=_get(d, "purged_us", int, optional=True),
            schema=schema,
        )

    @classmethod
    def from_bytes(cls, data: bytes | str) -> AuditRecord:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RecordError(f"not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise RecordError("a record is a JSON object")
        return cls.from_json(obj)


def hashed_form(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A record's JSON (as exported, with `hash`, `purged_us` and body `content`) reduced to what was hashed.

    Works on the raw dict so that verification also catches fields a parser would ignore.
    """
    out = {k: v for k, v in obj.items() if k not in ("hash", "purged_us")}
    for part in ("request", "response"):
        msg = out.get(part)
        if isinstance(msg, dict) and isinstance(msg.get("body"), dict) and "content" in msg["body"]:
            body = {k: v for k, v in msg["body"].items() if k != "content"}
            out[part] = {**msg, "body": body}
    return out
