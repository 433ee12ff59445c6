"""Turn a submitted record into the one that is stored: decode and cap bodies, redact, digest, compress.

Runs on the audit writer's thread, never on the event loop: decoding and redaction cost real CPU (a 1 MiB
JSON body is parsed and walked). It is the only place a record's raw values are read; what leaves this module
holds no secret the redactor knows how to find.
"""

from __future__ import annotations

import hashlib

from bastion.audit.bodies import CapturedBody, DecodeError, decode_content, pack
from bastion.audit.record import AuditRecord, Body
from bastion.audit.redact import Redactor


def finalize(record: AuditRecord, request_body: CapturedBody | None, response_body: CapturedBody | None, *,
             redactor: Redactor, max_body_bytes: int) -> tuple[bytes | None, bytes | None]:
    """Redact `record` in place and fill its bodies; returns the packed request and response bodies."""
    found: list[str] = []
    req = record.request
    req.url = redactor.url(req.url, "/request/url", found)
    req.headers = redactor.headers(req.headers, "/request/headers", found)
    req.body, req_blob = stored_body(request_body, redactor, max_body_bytes, "/request/body", found)
    resp_blob = None
    if record.response is not None:
        resp = record.response
        resp.headers = redactor.headers(resp.headers, "/response/headers", found)
        resp.body, resp_blob = stored_body(response_body, redactor, max_body_bytes, "/response/body", found)
    _free_text(record, redactor, found)
    record.redactions = list(dict.fromkeys([*record.redactions, *found]))
    return req_blob, resp_blob


def _free_text(record: AuditRecord, redactor: Redactor, found: list[str]) -> None:
    """Messages and notes can quote a request (an upstream error naming a URL with a key in it)."""
    if record.identity.claimed:
        record.identity.claimed = redactor.text(record.identity.claimed, "/identity/claimed", found)
    if record.error is not None:
        record.error.message = redactor.text(record.error.message, "/error/message", found)
    if record.decision is not None:
        d = record.decision
        if d.message:
            d.message = redactor.text(d.message, "/decision/message", found)
        d.errors = [redactor.text(e, f"/decision/errors/{i}", found) for i, e in enumerate(d.errors)]
    for i, lock in enumerate(record.locks):
        lock.key = redactor.text(lock.key, f"/locks/{i}/key", found)
    if record.approval is not None and record.approval.note:
        record.approval.note = redactor.text(record.approval.note, "/approval/note", found)
    if record.upstream:
        record.upstream = redactor.text(record.upstream, "/upstream", found)
    if record.extra:
        record.extra = redactor.value(record.extra, "/extra", found)


def stored_body(cap: CapturedBody | None, redactor: Redactor, max_body_bytes: int, path: str,
                found: list[str]) -> tuple[Body | None, bytes | None]:
    """The `Body` description and the packed stored bytes for one captured body (None, None if empty).

    Content the redactor cannot read (an unknown or corrupt Content-Encoding) is not stored at all: storing
    bytes nobody scanned for secrets would defeat redaction.
    """
    if cap is None or (cap.size == 0 and cap.complete):
        return None, None
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
    redacted = len(found) > before
    body = Body(
        size=cap.size,
        sha256=None if redacted else cap.sha256,
        mime_type=cap.mime_type,
        encoding=cap.encoding,
        stored=len(stored),
        stored_sha256=hashlib.sha256(stored).hexdigest() if stored else None,
        truncated=cut and note is None,
        complete=cap.complete,
        note=note,
    )
    return body, (pack(stored) if stored else None)
