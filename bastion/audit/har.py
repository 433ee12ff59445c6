"""HAR 1.2 export (http://www.softwareishard.com/blog/har-12-spec/), for browser devtools and HAR viewers.

Built from stored records, so it is already redacted: HAR files are notorious for leaking live credentials,
and these never hold any the redactor found. One record is one entry; Bastion's own facts (agent, decision,
rules, locks, approval, chain position, truncation) are under the entry's `_bastion` key, which HAR readers
ignore. Timings: `blocked` is the time Bastion spent itself (policy, locks, approval hold), `wait` the
upstream's, so `time` equals their sum, as the spec requires.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterable
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlsplit

from bastion import __version__
from bastion.audit.record import AuditRecord, Body, Header


def iso_time(us: int) -> str:
    """ISO 8601 with milliseconds and an explicit UTC offset, as HAR wants `startedDateTime`."""
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat(timespec="milliseconds")


def _headers(headers: list[Header]) -> list[dict[str, str]]:
    return [{"name": n, "value": v} for n, v in headers]


def _content_text(body: Body) -> tuple[str, str | None]:
    """(text, encoding): UTF-8 content as is, anything else base64."""
    if body.content is None:
        return "", None
    try:
        return body.content.decode("utf-8"), None
    except UnicodeDecodeError:
        return base64.b64encode(body.content).decode("ascii"), "base64"


def _body_facts(body: Body | None) -> dict[str, Any] | None:
    return None if body is None else body.to_json()


def har_entry(record: AuditRecord) -> dict[str, Any]:
    req = record.request
    query = urlsplit(req.url).query
    request: dict[str, Any] = {
        "method": req.method,
        "url": req.url.split("#", 1)[0],
        "httpVersion": req.http_version,
        "cookies": [],  # Cookie headers are always redacted whole
        "headers": _headers(req.headers),
        "queryString": [{"name": k, "value": v} for k, v in parse_qsl(query, keep_blank_values=True)],
        "headersSize": -1,
        "bodySize": req.body.size if req.body else 0,
    }
    if req.body is not None:
        text, encoding = _content_text(req.body)
        post: dict[str, Any] = {"mimeType": req.body.mime_type or "application/octet-stream", "text": text}
        if encoding:
            post["_encoding"] = encoding
        request["postData"] = post

    resp = record.response
    if resp is None:  # the agent went away before any answer: HAR's convention for "no response"
        response: dict[str, Any] = {
            "status": 0, "statusText": "", "httpVersion": "", "cookies": [], "headers": [],
            "content": {"size": 0, "mimeType": "x-unknown"}, "redirectURL": "", "headersSize": -1, "bodySize": -1,
        }
    else:
        content: dict[str, Any] = {"size": 0, "mimeType": "x-unknown"}
        if resp.body is not None:
            text, encoding = _content_text(resp.body)
            content = {"size": resp.body.size if resp.body.truncated else resp.body.stored,
                       "mimeType": resp.body.mime_type or "x-unknown", "text": text}
            if encoding:
                content["encoding"] = encoding
            if resp.body.truncated:
                content["comment"] = f"cut to the first {resp.body.stored} bytes"
        response = {
            "status": resp.status, "statusText": resp.reason, "httpVersion": resp.http_version, "cookies": [],
            "headers": _headers(resp.headers), "content": content,
            "redirectURL": next((v for n, v in resp.headers if n.lower() == "location"), ""),
            "headersSize": -1, "bodySize": resp.body.size if resp.body else 0,
        }

    total = record.timings.total_us / 1000
    wait = min(total, (record.timings.upstream_us or 0) / 1000)
    entry: dict[str, Any] = {
        "startedDateTime": iso_time(record.started_us),
        "time": round(total, 3),
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"blocked": round(total - wait, 3), "dns": -1, "connect": -1, "ssl": -1, "send": 0,
                    "wait": round(wait, 3), "receive": 0},
        "_bastion": {
            "id": record.id, "identity": record.identity.to_json(), "outcome": record.outcome,
            "error": None if record.error is None else record.error.to_json(),
            "decision": None if record.decision is None else record.decision.to_json(),
            "locks": [lk.to_json() for lk in record.locks],
            "approval": None if record.approval is None else record.approval.to_json(),
            "policy_revision": record.policy_revision, "timings": record.timings.to_json(),
            "request_body": _body_facts(req.body), "response_body": _body_facts(resp.body if resp else None),
            "response_source": resp.source if resp else None, "streamed": resp.streamed if resp else False,
            "redactions": list(record.redactions), "extra": record.extra,
            "chain": None if record.chain is None else {**record.chain.to_json(), "hash": record.hash},
            "purged_us": record.purged_us,
        },
    }
    if record.upstream:
        entry["serverIPAddress"] = record.upstream.rsplit(":", 1)[0].strip("[]")
    # `time` must equal the sum of the non-negative timings; rounding could make them differ by 0.001.
    entry["time"] = round(entry["timings"]["blocked"] + entry["timings"]["wait"], 3)
    return entry


def _creator() -> dict[str, str]:
    return {"name": "Bastion", "version": __version__}


def har_log(records: list[AuditRecord]) -> dict[str, Any]:
    """A complete HAR document for a few records (the dashboard's single-flow download)."""
    return {"log": {"version": "1.2", "creator": _creator(), "entries": [har_entry(r) for r in records]}}


async def write_har(records: AsyncIterable[AuditRecord], out: TextIO) -> int:
    """Stream a HAR document to `out` without holding all entries in memory. Returns the entry count."""
    out.write('{"log":{"version":"1.2","creator":' + json.dumps(_creator()) + ',"entries":[\n')
    n = 0
    async for record in records:
        if n:
            out.write(",\n")
        out.write(json.dumps(har_entry(record), ensure_ascii=False))
        n += 1
    out.write("\n]}}\n")
    return n
