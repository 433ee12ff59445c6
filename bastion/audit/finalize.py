"""Turn a submitted record into the one that is stored: decode and cap bodies, redact, digest, compress.

Runs on the audit writer's thread, never on the event loop: decoding and redaction cost real CPU (a 1 MiB
JSON body is parsed and walked). It is the only place a record's raw values are read; what leaves this module
holds no secret the redactor knows how to find.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from bastion.audit.bodies import CapturedBody, DecodeError, decode_content, pack
from bastion.audit.record import AuditRecord, Body
from bastion.audit.redact import Echoes, Redactor
from bastion.audit.snapshot import ExchangeSnapshot, to_record

log = logging.getLogger("bastion.audit")

TextFix = Callable[[str, str, list[str]], str]
ValueFix = Callable[[Any, str, list[str]], Any]


class Prepared(NamedTuple):
    """A record ready to be chained and spooled, with its packed bodies."""

    record: AuditRecord
    request_blob: bytes | None
    response_blob: bytes | None


def prepare(item: AuditRecord | ExchangeSnapshot, request_body: CapturedBody | None,
            response_body: CapturedBody | None, *, redactor: Redactor, max_body_bytes: int) -> Prepared | None:
    """What the writer's spool thread makes of a submitted item: the record (built here from an exchange
    snapshot), finalized. None when the item must be dropped (it is logged; the caller counts the loss).

    A record whose bodies cannot be processed is kept without them, marked `audit_error` in `extra`: an
    exchange with a missing body is better evidence than no record of it. Touches no writer state, so it can
    be tested alone; like `finalize`, it changes `item` in place when it is a record.
    """
    if isinstance(item, ExchangeSnapshot):
        try:
            record, request_body, response_body = to_record(item, max_body_bytes)
        except Exception:
            log.exception("audit record %s: cannot be built from the exchange; dropped", item.id)
            return None
    else:
        record = item
    try:
        req, resp = finalize(record, request_body, response_body, redactor=redactor,
                             max_body_bytes=max_body_bytes)
    except Exception:
        log.exception("audit record %s: body processing failed; storing it without bodies", record.id)
        try:
            req, resp = finalize(record, None, None, redactor=redactor, max_body_bytes=0)
            record.extra = {**record.extra, "audit_error": "bodies could not be processed"}
        except Exception:
            log.exception("audit record %s: cannot be prepared; dropped", record.id)
            return None
    return Prepared(record, req, resp)


def finalize(record: AuditRecord, request_body: CapturedBody | None, response_body: CapturedBody | None, *,
             redactor: Redactor, max_body_bytes: int) -> tuple[bytes | None, bytes | None]:
    """Redact `record` in place and fill its bodies; returns the packed request and response bodies.

    Two passes: the first masks secrets by name and by format and remembers every value it masked; the second
    masks each other occurrence of those values anywhere in the record (an upstream quoting the API key it was
    sent, a header reflected back): see `bastion.audit.redact.Echoes`. Bodies are described (digests) only
    after both.
    """
    found: list[str] = []
    ex = redactor.exchange()
    req = record.request
    req.url = ex.url(req.url, "/request/url", found)
    req.headers = ex.headers(req.headers, "/request/headers", found)
    bodies = [_kept_body(request_body, ex, max_body_bytes, "/request/body", found)]
    if record.response is not None:
        record.response.headers = ex.headers(record.response.headers, "/response/headers", found)
        bodies.append(_kept_body(response_body, ex, max_body_bytes, "/response/body", found))
    _free_text(record, ex.text, ex.value, found)
    _websocket_texts(record, ex, found)
    echoes = ex.echoes()
    if echoes is not None:
        _mask_echoes(record, bodies, echoes, found)
    paths = [*record.redactions, *found]
    record.redactions = list(dict.fromkeys(paths if echoes is None else map(echoes.scrub, paths)))
    req.body, req_blob = _stored_body(bodies[0])
    resp_blob = None
    if record.response is not None:
        record.response.body, resp_blob = _stored_body(bodies[1])
    return req_blob, resp_blob


def _free_text(record: AuditRecord, text: TextFix, value: ValueFix, found: list[str]) -> None:
    """Messages and notes can quote a request (an upstream error naming a URL with a key in it)."""
    if record.identity.claimed:
        record.identity.claimed = text(record.identity.claimed, "/identity/claimed", found)
    if record.error is not None:
        record.error.message = text(record.error.message, "/error/message", found)
    if record.decision is not None:
        d = record.decision
        if d.message:
            d.message = text(d.message, "/decision/message", found)
        d.errors = [text(e, f"/decision/errors/{i}", found) for i, e in enumerate(d.errors)]
    for i, lock in enumerate(record.locks):
        lock.key = text(lock.key, f"/locks/{i}/key", found)
    if record.approval is not None and record.approval.note:
        record.approval.note = text(record.approval.note, "/approval/note", found)
    if record.upstream:
        record.upstream = text(record.upstream, "/upstream", found)
    if record.extra:
        record.extra = value(record.extra, "/extra", found)


def _websocket_texts(record: AuditRecord, redactor: Redactor, found: list[str]) -> None:
    """A WebSocket session's text messages are bodies too (a realtime API's `session.update` may carry a key):
    JSON ones are walked for secret-named keys, others scanned, as `Redactor.body` does for request bodies."""
    ws = record.extra.get("websocket")
    messages = ws.get("messages") if isinstance(ws, dict) else None
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        text = message.get("text") if isinstance(message, dict) else None
        if isinstance(text, str) and text:
            data = text.encode("utf-8", "replace")
            out = redactor.body(data, "", f"/extra/websocket/messages/{i}/text", found)
            if out is not data:
                message["text"] = out.decode("utf-8", "replace")


def _mask_echoes(record: AuditRecord, bodies: list[_Kept | None], echoes: Echoes, found: list[str]) -> None:
    """The second pass: every part the first one read, plus the response's reason phrase."""
    req = record.request
    req.url = echoes.text(req.url, "/request/url", found)
    req.headers = echoes.headers(req.headers, "/request/headers", found)
    if record.response is not None:
        resp = record.response
        resp.reason = echoes.text(resp.reason, "/response/reason", found)
        resp.headers = echoes.headers(resp.headers, "/response/headers", found)
    _free_text(record, echoes.text, echoes.value, found)
    for kept in bodies:
        if kept is not None and kept.data:
            before = len(found)
            kept.data = echoes.body(kept.data, kept.cap.mime_type, kept.path, found, cut=kept.cut)
            kept.redacted = kept.redacted or len(found) > before


@dataclass(slots=True)
class _Kept:
    """A body between the passes: the decoded, capped, redacted bytes not yet described or packed."""

    cap: CapturedBody
    path: str
    data: bytes
    cut: bool  # the stored bytes end before the body did
    note: str | None
    redacted: bool


def _kept_body(cap: CapturedBody | None, redactor: Redactor, max_body_bytes: int, path: str,
               found: list[str]) -> _Kept | None:
    """Decode, cap and redact one captured body (None if empty).

    Content the redactor cannot read (an unknown or corrupt Content-Encoding) is not stored at all: storing
    bytes nobody scanned for secrets would defeat redaction.
    """
    if cap is None or (cap.size == 0 and cap.complete):
        return None
    note: str | None = None
    cut = cap.cut or not cap.complete
    data = cap.raw
    if max_body_bytes == 0:
        data, note = b"", "not stored: audit.max_body_bytes is 0"
    elif cap.encoding and cap.encoding != "identity":
        try:
            decoded = decode_content(cap.raw, cap.encoding, max_body_bytes)
            data, cut = decoded.data, cut or decoded.cut
        except DecodeError as e:
            data, note = b"", f"not stored: {e}"
    if len(data) > max_body_bytes:  # the limit may have shrunk since the capture began
        data, cut = data[:max_body_bytes], True
    before = len(found)
    stored = redactor.body(data, cap.mime_type, path, found)
    return _Kept(cap, path, stored, cut, note, len(found) > before)


def _stored_body(kept: _Kept | None) -> tuple[Body | None, bytes | None]:
    """The `Body` description and the packed stored bytes. `sha256` (of the body as transferred) is left out
    when redaction changed the stored copy, `stored_sha256` is always of the stored copy (see `Body`)."""
    if kept is None:
        return None, None
    cap, stored = kept.cap, kept.data
    body = Body(
        size=cap.size,
        sha256=None if kept.redacted else cap.sha256,
        mime_type=cap.mime_type,
        encoding=cap.encoding,
        stored=len(stored),
        stored_sha256=hashlib.sha256(stored).hexdigest() if stored else None,
        truncated=kept.cut and kept.note is None,
        complete=cap.complete,
        note=kept.note,
    )
    return body, (pack(stored) if stored else None)
