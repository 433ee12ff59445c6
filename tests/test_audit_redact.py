"""Redaction: by name (headers, query parameters, JSON and form keys), by value (credential formats), the list
of masked paths, and, end to end, that secrets never reach the store's bytes, the spool, or any export."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import secrets
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from bastion.audit.bodies import capture_bytes
from bastion.audit.finalize import finalize
from bastion.audit.record import AuditRecord, ErrorFacts, Identity, Request, Response, Timings
from bastion.audit.redact import MASK, Redactor, is_secret_name
from bastion.audit.settings import AuditConfig
from bastion.audit.sinks import open_store
from bastion.audit.writer import AuditWriter
from bastion.ids import new_request_id

KEY = b"k" * 32


def r(**kw: object) -> Redactor:
    return Redactor(key=KEY, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [
    "Authorization", "proxy-authorization", "Cookie", "Set-Cookie", "x-api-key", "api-key", "X-Auth-Token",
    "x-csrf-token", "apiKey", "api_key", "client_secret", "password", "db_passwd", "accessToken", "refresh_token",
    "X-Amz-Security-Token", "Ocp-Apim-Subscription-Key", "private_key", "signature", "x-goog-api-key",
])
def test_secret_like_names(name: str) -> None:
    assert r().secret_header(name) or r().secret_key(name)


@pytest.mark.parametrize("name", [
    "content-type", "max_tokens", "prompt_tokens", "x-ratelimit-remaining-tokens", "author", "authority_level",
    "anthropic-version", "model", "messages", "user-agent", "total_tokens", "keyboard",
])
def test_ordinary_names_are_kept(name: str) -> None:
    assert not is_secret_name(name)
    assert not r().secret_header(name)


SECRETS = {
    "openai": "sk-proj-" + "A1b2C3d4" * 6,
    "anthropic": "sk-ant-api03-" + "x" * 93 + "AA",
    "aws": "AKIA" + "ABCDEFGHIJ234567",
    "github": "ghp_" + "a" * 36,
    "github-fine": "github_pat_" + "B" * 40,
    "gitlab": "glpat-" + "c" * 20,
    "slack": "xoxb-123456789012-1234567890123-abcdefghijklmnop",
    "google": "AIza" + "d" * 35,
    "stripe": "sk_live_" + "e" * 24,
    "hf": "hf_" + "f" * 34,
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----",
}


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_credential_formats_are_masked_inside_text(kind: str) -> None:
    secret = SECRETS[kind]
    out = r().scan(f"before {secret} after")
    assert secret not in out
    assert out.startswith("before [REDACTED:") and out.endswith(" after")


def test_masks_correlate_equal_secrets_only_with_a_key() -> None:
    red = r()
    a, b = red.mask("s3cret-one"), red.mask("s3cret-two")
    assert a == red.mask("s3cret-one") and a != b and a.startswith("[REDACTED:") and len(a) == len("[REDACTED:]") + 8
    assert Redactor().mask("s3cret-one") == MASK
    assert Redactor(key=b"other" * 8).mask("s3cret-one") != a  # the tag depends on the deployment's key


def test_headers_are_masked_by_name_keeping_the_scheme_and_by_value() -> None:
    found: list[str] = []
    out = r(headers=["X-Internal-Key"]).headers([
        ("Authorization", "Bearer abc.def"), ("Content-Type", "application/json"),
        ("x-internal-key", "letmein"), ("X-Trace", "token=" + SECRETS["github"]), ("Cookie", "a=b; c=d")],
        "/request/headers", found)
    values = dict(out)
    assert values["Authorization"].startswith("Bearer [REDACTED:") and "abc.def" not in values["Authorization"]
    assert values["Content-Type"] == "application/json"
    assert values["x-internal-key"].startswith("[REDACTED") and values["Cookie"].startswith("[REDACTED")
    assert SECRETS["github"] not in values["X-Trace"] and values["X-Trace"].startswith("token=[REDACTED")
    assert found == ["/request/headers/authorization", "/request/headers/x-internal-key",
                     "/request/headers/x-trace", "/request/headers/cookie"]


def test_url_query_userinfo_and_path_tokens() -> None:
    found: list[str] = []
    url = ("https://bot:pa55word@api.example.com/hooks/" + SECRETS["slack"] +
           "/x?key=AIzaXYZ&model=gpt&access_token=tok%2Fen&Signature=abc&q=")
    out = r().url(url, "/request/url", found)
    for secret in ("pa55word", SECRETS["slack"], "AIzaXYZ", "tok%2Fen", "abc&"):
        assert secret not in out
    assert "model=gpt" in out and out.endswith("&q=") and out.startswith("https://bot:[REDACTED:")
    assert set(found) == {"/request/url/password", "/request/url/query/key", "/request/url/query/access_token",
                          "/request/url/query/Signature", "/request/url"}


def test_json_bodies_are_walked_and_paths_are_json_pointers() -> None:
    body = {"model": "gpt-4o", "max_tokens": 5, "api_key": "hunter2", "nested": {"list": [
        {"client_secret": {"a": 1}}, {"note": "use " + SECRETS["openai"]}]}, "a/b": {"password": 123},
        "flags": {"token": True, "secret": None, "password": ""}}
    found: list[str] = []
    out = json.loads(r(json_keys=["model"]).body(json.dumps(body).encode(), "application/json", "/request/body",
                                                 found))
    assert out["model"].startswith("[REDACTED") and out["max_tokens"] == 5
    assert out["api_key"].startswith("[REDACTED") and out["nested"]["list"][0]["client_secret"].startswith("[RED")
    assert SECRETS["openai"] not in out["nested"]["list"][1]["note"]
    assert out["a/b"]["password"].startswith("[REDACTED")
    assert out["flags"] == {"token": True, "secret": None, "password": ""}  # nothing secret in those
    assert found == ["/request/body/model", "/request/body/api_key", "/request/body/nested/list/0/client_secret",
                     "/request/body/nested/list/1/note", "/request/body/a~1b/password"]


def test_untouched_bodies_keep_their_exact_bytes() -> None:
    raw = b'{"b": 1,   "a": [1, 2]}'
    assert r().body(raw, "application/json", "/request/body", []) is raw


def test_form_text_sse_cut_json_and_binary_bodies() -> None:
    red = r()
    found: list[str] = []
    form = red.body(b"user=bob&password=hunter2&x=1", "application/x-www-form-urlencoded", "/request/body", found)
    assert b"hunter2" not in form and b"user=bob" in form and b"x=1" in form
    sse = (b'data: {"type": "delta", "text": "hi"}\n\ndata: {"api_key": "plain-secret-1", "t": "'
           + SECRETS["slack"].encode() + b'"}\n\n')
    out = red.body(sse, "text/event-stream", "/response/body", found)
    assert b"plain-secret-1" not in out and SECRETS["slack"].encode() not in out and b'"text": "hi"' in out
    cut = b'{"messages": [{"content": "x"}], "password": "pw-in-cut-json", "more": "trunc'
    out = red.body(cut, "application/json", "/request/body", found)
    assert b"pw-in-cut-json" not in out
    binary = b"\x89PNG\x00\xff" + SECRETS["aws"].encode() + b"\xfe\x00"
    out = red.body(binary, "image/png", "/response/body", found)
    assert SECRETS["aws"].encode() not in out and out.startswith(b"\x89PNG\x00\xff") and out.endswith(b"\xfe\x00")


def test_configured_patterns_mask_the_secret_group_or_the_match() -> None:
    red = r(patterns=[r"employee-\d{6}", r"pin=(?P<s>\d{4})"])
    out = red.scan("id employee-123456 with pin=1234!")
    assert "123456" not in out and "1234!" not in out and "pin=[REDACTED:" in out
    with pytest.raises(ValueError, match="not a valid regex"):
        Redactor(patterns=["("])


def test_finalize_redacts_free_text_and_drops_the_digest_of_redacted_bodies() -> None:
    rec = AuditRecord(id=new_request_id(), started_us=1, ended_us=2, identity=Identity("a", "basic", "c"),
                      request=Request("POST", "https://x.test/?token=abc"), outcome="upstream_error",
                      timings=Timings(total_us=1), error=ErrorFacts("upstream_error", "GET " + SECRETS["github"]),
                      extra={"note": SECRETS["stripe"], "password": "x"})
    clean = capture_bytes(b'{"a": 1}', 100, content_type="application/json")
    dirty = capture_bytes(b'{"api_key": "hunter2"}', 100, content_type="application/json")
    rec.response = Response(502, "Bad Gateway", source="bastion")
    finalize(rec, dirty, clean, redactor=r(), max_body_bytes=100)
    assert rec.request.body is not None and rec.request.body.sha256 is None  # no oracle for a short secret
    assert rec.response.body is not None and rec.response.body.sha256 == clean.sha256
    assert rec.error is not None and SECRETS["github"] not in rec.error.message
    assert "token=abc" not in rec.request.url and "token=[REDACTED:" in rec.request.url
    text = json.dumps(rec.to_json())
    assert SECRETS["stripe"] not in text and '"password": "x"' not in text
    assert {"/request/url/query/token", "/request/body/api_key", "/error/message", "/extra/note",
            "/extra/password"} <= set(rec.redactions)


# --- end to end: the store's bytes and every export -------------------------------------------------------------

def _cli(args: list[str]) -> tuple[int, str]:
    from bastion.audit import commands

    parser = argparse.ArgumentParser(prog="bastion")
    commands.register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(args)
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = ns.handler(ns)
    return rc, buf.getvalue()


def test_secrets_never_reach_the_sqlite_file_the_spool_or_any_export(tmp_path: Path) -> None:
    header_secret = "sk-ant-api03-" + secrets.token_urlsafe(60)
    json_secret = "pw-" + secrets.token_hex(12)  # no credential format: only the key name gives it away
    query_secret = secrets.token_hex(10)
    db = tmp_path / "audit.db"

    async def write() -> str:
        writer = await AuditWriter.open(f"sqlite:///{db}", tmp_path / "spool", config=AuditConfig())
        rec = AuditRecord(
            id=new_request_id(), started_us=1_795_000_000_000_000, ended_us=1_795_000_000_100_000,
            identity=Identity("support-bot", "basic", "127.0.0.1:1"),
            request=Request("POST", f"https://api.anthropic.com/v1/messages?api_key={query_secret}", "HTTP/1.1",
                            [("Authorization", f"Bearer {header_secret}"), ("content-type", "application/json")]),
            response=Response(200, "OK", "HTTP/1.1", [("content-type", "application/json")]),
            outcome="forwarded", timings=Timings(total_us=100_000))
        body = json.dumps({"model": "claude", "api_key": json_secret, "echo": header_secret}).encode()
        assert writer.submit(rec, capture_bytes(body, 1 << 20, content_type="application/json"),
                             capture_bytes(body, 1 << 20, content_type="application/json"))
        assert await writer.flush()
        async with open_store(f"sqlite:///{db}") as store:  # read before close: the WAL still holds it
            stored = await store.get(rec.id)
            assert stored is not None and stored.request.body is not None and stored.request.body.content
            assert json.loads(stored.request.body.content)["model"] == "claude"
            contents = stored.request.body.content + (stored.response.body.content if stored.response and
                                                      stored.response.body and stored.response.body.content
                                                      else b"")
        raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
        for s in (header_secret, json_secret, query_secret):
            assert s.encode() not in raw, "secret in a file on disk"
            assert s.encode() not in contents, "secret in a stored body"
        await writer.close()
        return rec.id

    rid = asyncio.run(write())
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    outputs = [raw]
    for args in (["export", "--format", "har"], ["export", "--format", "jsonl"], ["show", rid],
                 ["show", rid, "--format", "json"], ["show", rid, "--format", "har"], ["tail"]):
        rc, out = _cli(["audit", *args, "--audit", f"sqlite:///{db}", "--home", str(tmp_path / "home")])
        assert rc == 0 and out
        outputs.append(out.encode())
    assert b"[REDACTED:" in outputs[1]
    for blob in outputs:
        for s in (header_secret, json_secret, query_secret):
            assert s.encode() not in blob
