"""`ExchangeSnapshot`: what the proxy hands the audit per exchange, and how it becomes an `AuditRecord`.

Why a snapshot and not the record itself: the proxy takes it on its event loop, once per exchange, so it
holds only references and small values copied off the flow (header tuples as bytes, bodies as received,
floats for times, the other stages' facts as the plain dicts and tuples they left). It crosses to the audit
worker process as one pickle of plain data. Everything that costs CPU (decoding header bytes to text,
formatting addresses and URLs, hashing bodies, interpreting the lock and approval facts, computing
timings) happens in `to_record`, in the worker, off the proxy's event loop.

A body in a snapshot is either the bytes as they crossed the proxy (still Content-Encoded; digested and cut
here) or a `CapturedBody` already taken by the proxy (a streamed response tapped chunk by chunk, or a body
too large to ship whole).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from bastion.audit.bodies import CapturedBody, capture_bytes
from bastion.audit.record import (
    ApprovalFact,
    AuditRecord,
    DecisionFacts,
    ErrorFacts,
    Header,
    Identity,
    LockFact,
    Outcome,
    Request,
    Response,
    Timings,
)

HeaderFields = tuple[tuple[bytes, bytes], ...]
Address = tuple[Any, ...]  # a socket address as the proxy has it: (host, port, ...)
Body = bytes | CapturedBody | None


class ResponseFacts(NamedTuple):
    """The answer the agent got. `source`: "upstream", or "bastion" for Bastion's own answers."""

    status: int
    reason: str
    http_version: str
    fields: HeaderFields
    source: str = "upstream"
    streamed: bool = False


class DecisionTuple(NamedTuple):
    """The policy's decision as plain values (a `bastion.policy.decision.Decision`'s fields)."""

    effect: str
    would_effect: str
    mode: str
    rules: tuple[str, ...]
    reason: str
    message: str | None
    errors: tuple[str, ...]

    @classmethod
    def of(cls, decision: Any) -> DecisionTuple:
        return cls(decision.effect, decision.would_effect, decision.mode, tuple(decision.rules), decision.reason,
                   decision.message, tuple(decision.errors))


class ExchangeSnapshot(NamedTuple):
    """One finished exchange as the proxy saw it. Times are Unix seconds (floats, as mitmproxy keeps them)
    except `ended_us`. `target` and `request_fields` are what the agent sent; `forwarded_path` is set when
    Bastion forwarded a different (normalized) path. `refusal` is the `error.type` of Bastion's own answer.
    `upstream_tried` says whether the request left for the upstream (or tried to)."""

    id: str
    outcome: Outcome
    started: float
    ended_us: int
    request_end: float | None
    decided: float | None
    response_end: float | None
    agent: str | None
    auth: str
    claimed: str | None
    client: Address | None
    method: str
    scheme: str
    host: str
    port: int
    target: str
    http_version: str
    request_fields: HeaderFields
    request_body: Body
    response: ResponseFacts | None
    response_body: Body
    error: tuple[str, str] | None
    decision: DecisionTuple | None
    refusal: str | None
    locks: tuple[Mapping[str, Any], ...]
    approval: Mapping[str, Any] | None
    policy_revision: str | None
    upstream: Address | None
    upstream_tried: bool
    forwarded_path: str | None
    extra: Mapping[str, Any] | None = None  # what the traffic meant (`llm`, `mcp`, `websocket` facts)

    @property
    def body_bytes(self) -> int:
        """Bytes of body data this snapshot carries (for the writer's memory bound)."""
        return _body_len(self.request_body) + _body_len(self.response_body)

    def to_wire(self) -> tuple[Any, ...]:
        """Plain tuples only, for `pickle`: a named tuple or dataclass is pickled by class reference and
        rebuilt by a call, which costs the proxy three times as much per exchange. `from_wire` undoes it."""
        values = list(self)
        values[_RESPONSE] = None if self.response is None else tuple(self.response)
        values[_DECISION] = None if self.decision is None else tuple(self.decision)
        values[_REQUEST_BODY] = _body_to_wire(self.request_body)
        values[_RESPONSE_BODY] = _body_to_wire(self.response_body)
        return tuple(values)

    @classmethod
    def from_wire(cls, values: tuple[Any, ...]) -> ExchangeSnapshot:
        fields = list(values)
        response, decision = fields[_RESPONSE], fields[_DECISION]
        fields[_RESPONSE] = None if response is None else ResponseFacts._make(response)
        fields[_DECISION] = None if decision is None else DecisionTuple._make(decision)
        fields[_REQUEST_BODY] = _body_from_wire(fields[_REQUEST_BODY])
        fields[_RESPONSE_BODY] = _body_from_wire(fields[_RESPONSE_BODY])
        return cls._make(fields)


_RESPONSE, _DECISION, _REQUEST_BODY, _RESPONSE_BODY = (
    ExchangeSnapshot._fields.index(name) for name in ("response", "decision", "request_body", "response_body"))


def _body_to_wire(body: Body) -> Any:
    if isinstance(body, CapturedBody):
        return (body.raw, body.size, body.sha256, body.encoding, body.mime_type, body.complete)
    return body


def _body_from_wire(value: Any) -> Body:
    return CapturedBody(*value) if isinstance(value, tuple) else value


def _body_len(body: Body) -> int:
    if body is None:
        return 0
    return len(body.raw) if isinstance(body, CapturedBody) else len(body)


def to_record(snap: ExchangeSnapshot, max_body_bytes: int) -> tuple[AuditRecord, CapturedBody | None,
                                                                      CapturedBody | None]:
    """The record of `snap` (raw values: the writer redacts it next) and its two captured bodies."""
    started_us = _us(snap.started)
    ended_us = max(snap.ended_us, started_us)
    decision_us = upstream_us = None
    if snap.decided is not None and snap.request_end is not None:
        decision_us = max(0, _us(snap.decided - snap.request_end))
    if snap.decided is not None and snap.upstream_tried:
        done = snap.response_end if snap.outcome == "forwarded" else None
        upstream_us = max(0, (_us(done) if done else snap.ended_us) - _us(snap.decided))

    response = None
    resp_fields: HeaderFields = ()
    if snap.response is not None:
        r = snap.response
        resp_fields = r.fields
        response = Response(r.status, r.reason, r.http_version, header_list(r.fields), source=r.source,  # type: ignore[arg-type]
                            streamed=r.streamed)
    error = ErrorFacts(*snap.error) if snap.error is not None else None
    record = AuditRecord(
        id=snap.id,
        started_us=started_us,
        ended_us=ended_us,
        identity=Identity(snap.agent, snap.auth, address(snap.client) or "", claimed=snap.claimed),
        request=Request(snap.method, request_url(snap.method, snap.scheme, snap.host, snap.port, snap.target),
                        snap.http_version, header_list(snap.request_fields)),
        outcome=snap.outcome,
        timings=Timings(max(0, ended_us - started_us), decision_us, upstream_us),
        response=response,
        error=error,
        decision=decision_facts(snap.decision, snap.refusal,
                                error.message if error is not None and error.type == snap.refusal else ""),
        locks=lock_facts(snap.locks),
        approval=approval_fact(snap.approval),
        policy_revision=snap.policy_revision,
        upstream=address(snap.upstream),
        extra=_extra(snap),
    )
    return (record, captured(snap.request_body, snap.request_fields, max_body_bytes),
            captured(snap.response_body, resp_fields, max_body_bytes))


def _extra(snap: ExchangeSnapshot) -> dict[str, Any]:
    extra: dict[str, Any] = dict(snap.extra) if snap.extra else {}
    if snap.forwarded_path is not None:
        extra["forwarded_path"] = snap.forwarded_path
    return extra


def captured(body: Body, fields: HeaderFields, max_body_bytes: int) -> CapturedBody | None:
    """A body as the writer takes it: digested, at most `max_body_bytes` of it kept."""
    if body is None or isinstance(body, CapturedBody):
        return body
    if not body:
        return None
    return capture_bytes(body, max_body_bytes, content_encoding=header_value(fields, b"content-encoding") or "",
                         content_type=header_value(fields, b"content-type") or "")


# --- conversions ---------------------------------------------------------------------------------------------

def _text(raw: bytes) -> str:
    """Header bytes as text: UTF-8 when valid, else Latin-1 (lossless; JSON cannot hold lone surrogates)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def header_list(fields: HeaderFields) -> list[Header]:
    try:  # the usual case, every name and value UTF-8 (ASCII, really): one pass, no per-field call
        return [(k.decode(), v.decode()) for k, v in fields]
    except UnicodeDecodeError:
        return [(_text(k), _text(v)) for k, v in fields]


def header_value(fields: HeaderFields, name: bytes) -> str | None:
    """First value of header `name` (lower-case bytes) in `fields`."""
    n = len(name)
    for k, v in fields:
        if len(k) == n and k.lower() == name:
            return _text(v)
    return None


def address(peer: Address | None) -> str | None:
    """`ip:port` (`[v6]:port`) of a socket address tuple."""
    if not peer:
        return None
    host, port = str(peer[0]), peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def request_url(method: str, scheme: str, host: str, port: int, target: str) -> str:
    """The URL the agent asked for. A CONNECT names no URL, only an authority: `//host:port` (RFC 3986's
    network-path form) keeps the host readable to URL parsers, listings and the `host` search column."""
    shown = f"[{host}]" if ":" in host else host
    if method == "CONNECT":
        return f"//{shown}:{port}"
    authority = shown if (scheme, port) in (("http", 80), ("https", 443)) else f"{shown}:{port}"
    return f"{scheme}://{authority}{'' if target == '*' else target}"


def decision_facts(decision: DecisionTuple | None, refusal: str | None, message: str) -> DecisionFacts | None:
    """The policy's decision; for a call refused before the rules ran (407, a retired agent, a malformed
    request) a deny whose `reason` is the refusal's `error.type`, so such calls list with the other denials."""
    if decision is not None:
        return DecisionFacts.from_decision(decision)
    if refusal is None:
        return None
    return DecisionFacts("deny", "deny", "enforce", [], refusal, message or None)


def lock_facts(events: Iterable[Mapping[str, Any]]) -> list[LockFact]:
    """The lock stage's events, in order: the action is the event name."""
    out = []
    for event in events:
        fence = event.get("fence")
        out.append(LockFact(
            key=str(event.get("key", "")), action=str(event.get("event", "")), rule=_opt_str(event.get("rule")),
            holder=_opt_str(event.get("holder")), fence=fence if isinstance(fence, int) else None,
            expires_us=_epoch_us(event.get("expires_at"))))
    return out


def approval_fact(approval: Mapping[str, Any] | None) -> ApprovalFact | None:
    if not approval:
        return None
    waited = approval.get("waited_s")
    return ApprovalFact(
        id=str(approval.get("id", "")), state=str(approval.get("state", "pending")),
        decided_by=_opt_str(approval.get("decided_by")), note=_opt_str(approval.get("note")),
        waited_us=int(waited * 1_000_000) if isinstance(waited, (int, float)) else 0)


def _epoch_us(iso: Any) -> int | None:
    if not isinstance(iso, str):
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1_000_000)
    except ValueError:
        return None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)
