"""HAR 1.2 export: a structural validator written from the HAR 1.2 spec checks what `bastion audit export
--format har` and `show --format har` produce, for ordinary, refused, interrupted and binary exchanges."""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import io
import json
import re
from contextlib import redirect_stdout
from datetime import datetime
from pathlib import Path
from typing import Any

from bastion.audit.bodies import capture_bytes
from bastion.audit.record import (
    ApprovalFact,
    AuditRecord,
    DecisionFacts,
    ErrorFacts,
    Identity,
    LockFact,
    Request,
    Response,
    Timings,
)
from bastion.audit.sample import sample_exchange
from bastion.audit.settings import AuditConfig
from bastion.audit.writer import AuditWriter
from bastion.ids import new_request_id

NUM = (int, float)


class HarError(AssertionError):
    pass


def _obj(value: Any, where: str, required: dict[str, Any], optional: dict[str, Any]) -> None:
    """`value` is an object with the required fields (of the given types), maybe the optional ones, and no
    other fields except custom ones starting with `_` (HAR 1.2, "Custom fields")."""
    if not isinstance(value, dict):
        raise HarError(f"{where}: not an object")
    for name, kind in required.items():
        if name not in value:
            raise HarError(f"{where}: missing {name}")
        _typed(value[name], kind, f"{where}.{name}")
    for name, kind in optional.items():
        if name in value:
            _typed(value[name], kind, f"{where}.{name}")
    for name in value:
        if name not in required and name not in optional and not name.startswith("_"):
            raise HarError(f"{where}: unknown field {name} (custom fields must start with _)")


def _typed(value: Any, kind: Any, where: str) -> None:
    if callable(kind) and not isinstance(kind, type) and not isinstance(kind, tuple):
        kind(value, where)
    elif isinstance(value, bool) or not isinstance(value, kind):
        raise HarError(f"{where}: expected {kind}, got {value!r:.40}")


def _array(check: Any) -> Any:
    def run(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise HarError(f"{where}: not an array")
        for i, item in enumerate(value):
            check(item, f"{where}[{i}]")
    return run


def _pair(value: Any, where: str) -> None:
    _obj(value, where, {"name": str, "value": str}, {"comment": str})


def _cookie(value: Any, where: str) -> None:
    _obj(value, where, {"name": str, "value": str}, {"path": str, "domain": str, "expires": str, "httpOnly": bool,
                                                       "secure": bool, "comment": str})


def _post(value: Any, where: str) -> None:
    _obj(value, where, {"mimeType": str}, {"params": list, "text": str, "comment": str})
    if "params" in value and "text" in value:
        raise HarError(f"{where}: params and text are mutually exclusive")


def _content(value: Any, where: str) -> None:
    _obj(value, where, {"size": int, "mimeType": str}, {"compression": int, "text": str, "encoding": str,
                                                         "comment": str})


ISO_8601 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)")


def _date(value: Any, where: str) -> None:
    if not isinstance(value, str) or not ISO_8601.fullmatch(value):
        raise HarError(f"{where}: not an ISO 8601 date-time with offset: {value!r}")
    datetime.fromisoformat(value)


def _timings(value: Any, where: str) -> None:
    opt = {k: NUM for k in ("blocked", "dns", "connect", "ssl")}
    _obj(value, where, {"send": NUM, "wait": NUM, "receive": NUM}, {**opt, "comment": str})
    for k in ("send", "wait", "receive"):
        if value[k] < 0:
            raise HarError(f"{where}.{k}: must not be negative")
    for k in opt:
        if k in value and value[k] < 0 and value[k] != -1:
            raise HarError(f"{where}.{k}: -1 or a duration")


def validate_har(doc: Any) -> list[dict[str, Any]]:
    _obj(doc, "$", {"log": dict}, {})
    log = doc["log"]
    _obj(log, "log", {"version": str, "creator": dict, "entries": list},
         {"browser": dict, "pages": list, "comment": str})
    if log["version"] != "1.2":
        raise HarError("log.version must be 1.2")
    _obj(log["creator"], "log.creator", {"name": str, "version": str}, {"comment": str})
    for i, e in enumerate(log["entries"]):
        w = f"log.entries[{i}]"
        _obj(e, w, {"startedDateTime": _date, "time": NUM, "request": dict, "response": dict, "cache": dict,
                    "timings": _timings}, {"pageref": str, "serverIPAddress": str, "connection": str,
                                           "comment": str})
        _obj(e["request"], w + ".request", {
            "method": str, "url": str, "httpVersion": str, "cookies": _array(_cookie), "headers": _array(_pair),
            "queryString": _array(_pair), "headersSize": int, "bodySize": int}, {"postData": _post, "comment": str})
        _obj(e["response"], w + ".response", {
            "status": int, "statusText": str, "httpVersion": str, "cookies": _array(_cookie),
            "headers": _array(_pair), "content": _content, "redirectURL": str, "headersSize": int, "bodySize": int},
            {"comment": str})
        _obj(e["cache"], w + ".cache", {}, {"beforeRequest": (dict, type(None)), "afterRequest": (dict, type(None)),
                                            "comment": str})
        total = sum(v for k, v in e["timings"].items() if k not in ("ssl", "comment") and not k.startswith("_")
                    and v != -1)
        if abs(total - e["time"]) > 0.0015:
            raise HarError(f"{w}.time {e['time']} is not the sum of its timings ({total})")
        if "#" in e["request"]["url"]:
            raise HarError(f"{w}.request.url must not carry a fragment")
    return log["entries"]


# --- records of every shape ------------------------------------------------------------------------------------

def exchanges() -> list[tuple[AuditRecord, Any, Any]]:
    out = [sample_exchange(seed=1)]
    refused = AuditRecord(
        id=new_request_id(), started_us=1_795_000_000_000_000, ended_us=1_795_000_000_000_500,
        identity=Identity(None, "invalid", "127.0.0.1:4000", claimed="intruder"),
        request=Request("GET", "https://api.example.com/v1/things?page=2&q=a%20b#frag", "HTTP/1.1",
                        [("Proxy-Authorization", "Basic aW50cnVkZXI6bm9wZQ==")]),
        response=Response(407, "Proxy Authentication Required", "HTTP/1.1",
                          [("Proxy-Authenticate", 'Basic realm="bastion"'), ("content-type", "application/json")],
                          source="bastion"),
        outcome="refused", error=ErrorFacts("proxy_auth_required", "wrong credentials"),
        timings=Timings(total_us=500))
    out.append((refused, None, capture_bytes(b'{"error": {"type": "proxy_auth_required"}}', 1 << 20,
                                             content_type="application/json")))
    gone = AuditRecord(
        id=new_request_id(), started_us=1_795_000_000_100_000, ended_us=1_795_000_030_100_000,
        identity=Identity("billing-bot", "pinned", "127.0.0.1:4001"),
        request=Request("POST", "https://payments.example.com/v1/refunds", "HTTP/2.0",
                        [("content-type", "application/json")]),
        outcome="client_gone", error=ErrorFacts("client_gone", "agent disconnected while held"),
        decision=DecisionFacts("hold", "hold", "enforce", ["big-refund"]),
        approval=ApprovalFact("apr_1", "pending", waited_us=30_000_000),
        locks=[LockFact("ticket:42", "acquired", rule="ticket-reply", fence=7)],
        timings=Timings(total_us=30_000_000, decision_us=50))
    out.append((gone, capture_bytes(b'{"amount": 9000}', 1 << 20, content_type="application/json"), None))
    binary = AuditRecord(
        id=new_request_id(), started_us=1_795_000_000_200_000, ended_us=1_795_000_000_300_000,
        identity=Identity("support-bot", "basic", "127.0.0.1:4002"),
        request=Request("GET", "https://cdn.example.com/logo.png"),
        response=Response(302, "Found", "HTTP/1.1", [("Location", "https://cdn.example.com/v2/logo.png"),
                                                     ("content-type", "image/png"), ("content-encoding", "gzip")]),
        outcome="forwarded", decision=DecisionFacts("allow", "allow", "enforce", ["cdn"]),
        upstream="[2001:db8::1]:443", timings=Timings(total_us=100_000, decision_us=20, upstream_us=99_000))
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    out.append((binary, None, capture_bytes(gzip.compress(png), 1 << 20, content_encoding="gzip",
                                            content_type="image/png")))
    return out


async def export_har(tmp_path: Path, config: AuditConfig | None = None) -> tuple[dict[str, Any], list[str]]:
    url = f"sqlite:///{tmp_path}/audit.db"
    writer = await AuditWriter.open(url, tmp_path / "spool", config=config)
    ids = []
    for rec, req, resp in exchanges():
        ids.append(rec.id)
        assert writer.submit(rec, req, resp)
    assert await writer.flush()
    await writer.close()
    out = await asyncio.to_thread(run_cli, ["audit", "export", "--format", "har", "--audit", url])
    return json.loads(out), ids


def run_cli(args: list[str]) -> str:
    from bastion.audit import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    ns = parser.parse_args(args)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert ns.handler(ns) == 0
    return buf.getvalue()


async def test_export_is_valid_har_1_2_with_bastion_facts(tmp_path: Path) -> None:
    doc, ids = await export_har(tmp_path)
    entries = validate_har(doc)
    by_id = {e["_bastion"]["id"]: e for e in entries}
    assert set(by_id) == set(ids)
    assert doc["log"]["creator"]["name"] == "Bastion"

    chat = by_id[ids[0]]
    assert chat["request"]["postData"]["mimeType"] == "application/json"
    assert json.loads(chat["request"]["postData"]["text"])["model"] == "gpt-4o-mini"
    assert json.loads(chat["response"]["content"]["text"])["object"] == "chat.completion"
    assert chat["_bastion"]["decision"]["rules"] == ["llm-chat"] and chat["serverIPAddress"] == "104.18.7.192"
    assert chat["time"] == 850.0 and chat["timings"]["wait"] == 840.0
    assert {"name": "Authorization", "value": chat["request"]["headers"][2]["value"]} in chat["request"]["headers"]
    assert chat["request"]["headers"][2]["value"].startswith("Bearer [REDACTED:")
    assert chat["_bastion"]["chain"]["seq"] == 1 and len(chat["_bastion"]["chain"]["hash"]) == 64

    refused = by_id[ids[1]]
    assert refused["response"]["status"] == 407 and refused["_bastion"]["response_source"] == "bastion"
    assert refused["_bastion"]["error"]["type"] == "proxy_auth_required" and refused["_bastion"]["decision"] is None
    assert refused["request"]["queryString"] == [{"name": "page", "value": "2"}, {"name": "q", "value": "a b"}]
    assert refused["request"]["url"] == "https://api.example.com/v1/things?page=2&q=a%20b"

    gone = by_id[ids[2]]
    assert gone["response"]["status"] == 0 and gone["response"]["bodySize"] == -1
    assert gone["_bastion"]["outcome"] == "client_gone" and gone["_bastion"]["approval"]["state"] == "pending"
    assert gone["_bastion"]["locks"][0]["key"] == "ticket:42"

    img = by_id[ids[3]]
    assert img["response"]["redirectURL"] == "https://cdn.example.com/v2/logo.png"
    assert img["response"]["content"]["encoding"] == "base64"
    assert base64.b64decode(img["response"]["content"]["text"]).startswith(b"\x89PNG")  # decoded from gzip
    assert img["serverIPAddress"] == "2001:db8::1"


async def test_truncated_bodies_say_so(tmp_path: Path) -> None:
    doc, ids = await export_har(tmp_path, AuditConfig(max_body_bytes=64))
    entries = validate_har(doc)
    chat = next(e for e in entries if e["_bastion"]["id"] == ids[0])
    assert chat["_bastion"]["response_body"]["truncated"] and len(chat["response"]["content"]["text"]) <= 64
    assert "cut to the first 64 bytes" in chat["response"]["content"]["comment"]


async def test_single_record_har_from_show(tmp_path: Path) -> None:
    _, ids = await export_har(tmp_path)
    out = await asyncio.to_thread(run_cli, ["audit", "show", ids[3], "--format", "har", "--audit",
                                            f"sqlite:///{tmp_path}/audit.db"])
    assert [e["_bastion"]["id"] for e in validate_har(json.loads(out))] == [ids[3]]


def test_the_validator_has_teeth() -> None:
    good = {"log": {"version": "1.2", "creator": {"name": "x", "version": "1"}, "entries": []}}
    validate_har(good)
    entry = har_entry_of_sample()
    validate_har({"log": {**good["log"], "entries": [entry]}})
    for bad in ({"log": {**good["log"], "version": "1.1"}},
                {"log": {**good["log"], "extra": 1}},
                {"log": {"version": "1.2", "entries": []}},
                {"log": {**good["log"], "entries": [{**entry, "time": entry["time"] + 5}]}},
                {"log": {**good["log"], "entries": [{k: v for k, v in entry.items() if k != "cache"}]}},
                {"log": {**good["log"], "entries": [{**entry, "startedDateTime": "yesterday"}]}}):
        try:
            validate_har(bad)
        except HarError:
            continue
        raise AssertionError(f"accepted {bad}")


def har_entry_of_sample() -> dict[str, Any]:
    from bastion.audit.finalize import finalize
    from bastion.audit.har import har_entry
    from bastion.audit.redact import Redactor

    rec, req, resp = sample_exchange(seed=9)
    finalize(rec, req, resp, redactor=Redactor(), max_body_bytes=1 << 20)
    return har_entry(rec)
