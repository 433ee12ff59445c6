"""Redaction: by name (headers, query parameters, JSON and form keys), by value (credential formats), the list
of masked paths, and, end to end, that secrets never reach the store's bytes, the spool, or any export."""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import html
import io
import json
import re
import secrets
from contextlib import redirect_stdout
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.audit.bodies import capture_bytes
from bastion.audit.finalize import finalize
from bastion.audit.record import AuditRecord, ErrorFacts, Identity, Request, Response, Timings
from bastion.audit.redact import ECHO_MAX_FORMS, ECHO_PARTIAL_MIN, MASK, Redactor, echo_forms, is_secret_name
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


# --- echoes: a masked value is masked wherever else the exchange shows it ----------------------------------------

def _exchange(request_headers: list[tuple[str, str]], request_body: bytes, response_headers: list[tuple[str, str]],
              response_body: bytes, *, mime: str = "application/json", encoding: str = "", max_body: int = 1 << 20,
              url: str = "https://api.example.test/v1/items", error: str | None = None,
              ) -> tuple[AuditRecord, bytes, bytes]:
    """Finalize one exchange; returns the record and the stored (unpacked) request and response bodies."""
    from bastion.audit.bodies import unpack

    rec = AuditRecord(id=new_request_id(), started_us=1, ended_us=2, identity=Identity("a", "basic", "c"),
                      request=Request("POST", url, "HTTP/1.1", request_headers), outcome="forwarded",
                      timings=Timings(total_us=1), response=Response(400, "Bad Request", "HTTP/1.1", response_headers),
                      error=ErrorFacts("upstream_error", error) if error else None)
    req_cap = capture_bytes(request_body, max_body, content_type="application/json")
    resp_cap = capture_bytes(response_body, max_body, content_type=mime, content_encoding=encoding)
    req_blob, resp_blob = finalize(rec, req_cap, resp_cap, redactor=r(), max_body_bytes=max_body)
    assert rec.response is not None and rec.response.body is not None
    req = unpack(req_blob, rec.request.body.stored) if req_blob and rec.request.body else b""
    resp = unpack(resp_blob, rec.response.body.stored) if resp_blob else b""
    return rec, req, resp


def _everything(rec: AuditRecord, *bodies: bytes) -> str:
    return json.dumps(rec.to_json()) + "".join(b.decode("latin-1") for b in bodies)


def test_values_masked_in_the_request_are_masked_where_the_upstream_echoes_them() -> None:
    api_key = "k-" + secrets.token_hex(16)  # no credential format: only the header's name gives it away
    bearer = secrets.token_urlsafe(32)
    field = "pw-" + secrets.token_hex(10)
    request = json.dumps({"api_key": field, "prompt": "hello"}).encode()
    response = json.dumps({"error": {"message": f"key {api_key} rejected", "echo": {"api_key_seen": field,
                                                                                     bearer: "as a key"}},
                           "kept": "the rest is intact"}).encode()
    rec, req, resp = _exchange([("x-api-key", api_key), ("Authorization", f"Bearer {bearer}")], request,
                               [("X-Echo-Key", api_key), ("X-Echo-Auth", f"Bearer {bearer}"),
                                ("X-Request-Id", "abc")], response,
                               url=f"https://api.example.test/v1/keys/{api_key}?q=1", error=f"upstream said {field}")
    everything = _everything(rec, req, resp)
    for secret in (api_key, bearer, field):
        assert secret not in everything
    doc = json.loads(resp)  # still JSON, the rest untouched
    assert doc["kept"] == "the rest is intact" and doc["error"]["message"].startswith("key [REDACTED:")
    header_mask = dict(rec.request.headers)["x-api-key"]
    assert doc["error"]["message"] == f"key {header_mask} rejected"  # the echo carries the original's tag
    assert doc["error"]["echo"]["api_key_seen"] == json.loads(req)["api_key"]
    assert dict(rec.response.headers)["X-Echo-Key"] == header_mask  # type: ignore[union-attr]
    assert dict(rec.response.headers)["X-Request-Id"] == "abc"  # type: ignore[union-attr]
    assert rec.request.url == f"https://api.example.test/v1/keys/{header_mask}?q=1"
    assert {"/response/headers/x-echo-key", "/response/headers/x-echo-auth", "/response/body/error/message",
            "/response/body/error/echo/api_key_seen", "/request/url", "/error/message"} <= set(rec.redactions)
    assert not any(bearer in p for p in rec.redactions)  # the key that held the token is masked in its path too
    assert rec.response.body is not None and rec.response.body.sha256 is None  # type: ignore[union-attr]
    assert rec.response.body.stored_sha256 == hashlib.sha256(resp).hexdigest()  # type: ignore[union-attr]


@pytest.mark.parametrize("style", ["raw", "json", "json-ascii", "json-slash", "url", "url-lower", "url-plus",
                                   "html"])
def test_encoded_echoes_are_masked(style: str) -> None:
    secret = 'Sé/"cr+t &<x> ' + secrets.token_hex(8)
    escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
    shown = {
        "raw": secret, "json": escaped, "json-ascii": json.dumps(secret)[1:-1],
        "json-slash": escaped.replace("/", "\\/"), "url": quote(secret, safe=""),
        "url-lower": re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(secret, safe="")),
        "url-plus": quote_plus(secret, safe=""), "html": html.escape(secret),
    }[style]
    body = f"error: the value <<{shown}>> is not valid".encode()  # UTF-8, searched as Latin-1 text
    _, _, resp = _exchange([("x-api-key", secret)], b"", [], body, mime="text/plain")
    assert resp.startswith(b"error: the value <<[REDACTED:") and resp.endswith(b"]>> is not valid")
    assert secret.encode() not in resp and shown.encode() not in resp


def test_basic_credentials_and_cookie_values_are_searched_for_decoded() -> None:
    password = "pa55-" + secrets.token_hex(6)
    session = secrets.token_hex(12)
    basic = base64.b64encode(f"bob:{password}".encode()).decode()
    body = json.dumps({"debug": f"user bob, password {password}, session {session}, user again: bob"}).encode()
    rec, _, resp = _exchange([("Authorization", f"Basic {basic}"), ("Cookie", f"theme=dark; sid={session}")], b"",
                             [], body)
    text = json.loads(resp)["debug"]
    assert password not in text and session not in text and basic not in _everything(rec)
    assert text.startswith("user bob, password [REDACTED:") and text.endswith("user again: bob")


def test_short_values_are_not_searched_for() -> None:
    """Below ECHO_MIN characters a masked value is too likely to be ordinary text ("true", a small number)."""
    body = json.dumps({"status": "hunter2 true 12345678", "n": 1234567}).encode()
    request = json.dumps({"password": "hunter2", "token": "true", "pin_password": 12345678, "secret": 1234567}).encode()
    rec, req, resp = _exchange([], request, [], body)
    assert json.loads(resp)["status"].startswith("hunter2 true [REDACTED:")  # 8 characters: masked
    assert json.loads(resp)["n"] == 1234567 and rec.response.body.sha256 is None  # type: ignore[union-attr]
    assert b"hunter2" not in req


def test_a_number_equal_to_a_secret_is_masked_and_the_json_stays_valid() -> None:
    request = json.dumps({"api_key": 987654321}).encode()
    _, _, resp = _exchange([], request, [], json.dumps({"your_pin": 987654321, "ok": False}).encode())
    doc = json.loads(resp)
    assert doc["your_pin"].startswith("[REDACTED:") and doc["ok"] is False


@pytest.mark.parametrize("into", [ECHO_PARTIAL_MIN, ECHO_PARTIAL_MIN + 1, 20])
def test_an_echo_cut_by_max_body_bytes_is_masked_up_to_the_cut(into: int) -> None:
    secret = "tok-" + secrets.token_hex(20)
    filler = b"x" * 1000
    body = filler + b" key=" + secret.encode() + b" tail"
    limit = len(filler) + 5 + into  # the cut falls `into` characters into the echo
    rec, _, resp = _exchange([("x-api-key", secret)], b"", [], body, mime="text/plain", max_body=limit)
    assert rec.response.body is not None and rec.response.body.truncated  # type: ignore[union-attr]
    assert resp.startswith(filler + b" key=[REDACTED:") and resp.endswith(b"]")
    assert secret[:ECHO_PARTIAL_MIN].encode() not in resp


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab/%\"é+ ", min_size=8, max_size=14), min_size=1, max_size=4), st.data())
def test_no_form_of_a_masked_value_survives_echo_masking(values: list[str], data: st.DataObject) -> None:
    """Echoes of several values, in any encoding, overlapping or cut anywhere: none is left, nor (when cut)
    a start of one of ECHO_PARTIAL_MIN characters or more at the very end."""
    echoes = r().exchange()
    for v in values:
        echoes.mask(v)
    masker = echoes.echoes()
    assert masker is not None
    pieces = [data.draw(st.text("ab/%\"xyz", max_size=4)) + data.draw(st.sampled_from(echo_forms(v)))
              for v in data.draw(st.lists(st.sampled_from(values), min_size=1, max_size=5))]
    text = "".join(pieces).encode()
    cut = text[: data.draw(st.integers(1, len(text)))]
    out = masker.body(cut, "text/plain", "/response/body", [], cut=True).decode("latin-1")
    for form in masker.forms:
        assert form not in out
        assert not any(out.endswith(form[:k]) for k in range(ECHO_PARTIAL_MIN, len(form)))


def test_a_secret_pair_a_cut_body_ends_inside_is_masked() -> None:
    value = "s3cret-" + secrets.token_hex(10)
    found: list[str] = []
    out = r().body(b'{"messages": [], "password": "' + value.encode(), "application/json", "/request/body", found)
    assert value.encode() not in out and out.startswith(b'{"messages": [], "password": "[REDACTED:')
    assert found == ["/request/body"]
    sse = b'data: {"x": 1}\n\ndata: {"note": "' + value.encode()  # not a secret name: kept
    assert r().body(sse, "text/event-stream", "/response/body", []) is sse


def test_echoes_in_compressed_bodies_and_the_digests() -> None:
    secret = secrets.token_urlsafe(24)
    plain = json.dumps({"echo": secret, "other": "intact"}).encode()
    rec, _, resp = _exchange([("x-api-key", secret)], b"", [], gzip.compress(plain), encoding="gzip")
    assert secret.encode() not in resp and json.loads(resp)["other"] == "intact"
    body = rec.response.body  # type: ignore[union-attr]
    assert body is not None and body.sha256 is None and body.stored_sha256 == hashlib.sha256(resp).hexdigest()
    clean = json.dumps({"other": "intact"}).encode()  # nothing echoed: bytes and digest as they were
    rec, _, resp = _exchange([("x-api-key", secret)], b"", [], clean)
    assert resp == clean and rec.response.body.sha256 == hashlib.sha256(clean).hexdigest()  # type: ignore[union-attr]


def test_an_echo_hidden_by_unicode_escapes_in_json_is_found() -> None:
    secret = "key-" + secrets.token_hex(12)
    escaped = "".join(f"\\u{ord(c):04x}" for c in secret)
    body = ('{"detail": "bad key ' + escaped + '", "n": 1}').encode()
    _, _, resp = _exchange([("x-api-key", secret)], b"", [], body)
    doc = json.loads(resp)
    assert secret not in doc["detail"] and doc["detail"].startswith("bad key [REDACTED:") and doc["n"] == 1


def test_echo_search_is_bounded_for_thousands_of_secrets() -> None:
    header = "hdr-" + secrets.token_hex(16)
    fields = {f"password{i}": f"value-{i:06d}-{secrets.token_hex(4)}" for i in range(5000)}
    red = r().exchange()
    red.headers([("x-api-key", header)], "/request/headers", [])
    red.body(json.dumps(fields).encode(), "application/json", "/request/body", [])
    echoes = red.echoes()
    assert echoes is not None and len(echoes.forms) <= ECHO_MAX_FORMS
    assert header in echoes.forms  # the header, found first, is kept
    big = (b"lorem ipsum " * 90_000) + header.encode()
    assert header.encode() not in echoes.body(big, "text/plain", "/response/body", [], cut=False)


def test_a_shared_redactor_remembers_nothing() -> None:
    red = r()
    red.headers([("x-api-key", "k" * 20)], "/request/headers", [])
    assert red.echoes() is None  # only an exchange() copy collects values


def test_echoes_in_extra_are_masked_and_an_extra_without_any_is_kept_as_is() -> None:
    """The echo pass searches an `extra`'s strings, keys and numbers at once and walks it only on a hit."""
    token = "tok-" + secrets.token_hex(12)
    pin = 482915736021
    ex = Redactor().exchange()
    ex.headers([("Authorization", f"Bearer {token}"), ("X-Api-Key", str(pin))], "/request/headers", [])
    echoes = ex.echoes()
    assert echoes is not None
    clean = {"llm": {"model": "m", "usage": {"input_tokens": 5}, "time_to_first_token_s": 0.25,
                     "tool_calls": [{"name": "lookup", "arguments": "{}"}]}}
    found: list[str] = []
    assert echoes.value(clean, "/extra", found) is clean and found == []
    dirty = {"llm": {"tool_calls": [{"name": "lookup", "arguments": json.dumps({"auth": token})}],
                     "usage": {"input_tokens": pin}}, "mcp": {f"seen {token}": True}}
    out = echoes.value(dirty, "/extra", found)
    assert token not in json.dumps(out) and str(pin) not in json.dumps(out)
    assert out["llm"]["tool_calls"][0]["name"] == "lookup"
    assert "/extra/llm/tool_calls/0/arguments" in found and "/extra/llm/usage/input_tokens" in found
    assert any(p.startswith("/extra/mcp/seen [REDACTED") for p in found)
