"""Normalization: what rules see, and what the proxy forwards, for tricky hosts and paths.

The path variants of README "How requests are normalized": each one's fate under the default `normalize:`
settings and under every setting that changes it (refused with a FactsError, which the proxy answers 400;
matched as some segments; forwarded as some target).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policyhelp import decide, policy_from

from bastion.cli import main
from bastion.policy.facts import (
    ALLOWABLE_FORMS,
    DEFAULT_NORMALIZE,
    EvalError,
    FactsError,
    NormalizeSettings,
    RequestFacts,
    canonical_host,
    fold_case,
    normalize_path,
)

KEEP = NormalizeSettings(escaped_slashes="keep")
DECODE = NormalizeSettings(escaped_slashes="decode")
ALLOW_ALL = NormalizeSettings(allow=frozenset(ALLOWABLE_FORMS))


def allowing(*forms: str) -> NormalizeSettings:
    return NormalizeSettings(allow=frozenset(forms))


@pytest.mark.parametrize(
    ("raw", "segments", "forward"),
    [
        ("/", (), "/"),
        ("", (), "/"),
        ("/a/b", ("a", "b"), "/a/b"),
        ("/a/b/", ("a", "b"), "/a/b/"),
        ("/a/../b", ("b",), "/b"),
        ("/a/./b", ("a", "b"), "/a/b"),
        ("/../../etc/passwd", ("etc", "passwd"), "/etc/passwd"),
        ("/a/%2e%2e/b", ("b",), "/b"),
        ("/a/%2E%2E/%2e/b", ("b",), "/b"),
        ("/a/.%2e/b", ("b",), "/b"),
        ("/a//b", ("a", "b"), "/a/b"),
        ("//a///b//", ("a", "b"), "/a/b/"),
        ("/caf%C3%A9", ("café",), "/caf%C3%A9"),
        ("/a/b/..", ("a",), "/a"),
        ("/v1.2/files/report.pdf", ("v1.2", "files", "report.pdf"), "/v1.2/files/report.pdf"),
        ("/%61dmin/%7Euser/%2D%5F", ("admin", "~user", "-_"), "/admin/~user/-_"),  # escaped unreserved: decoded
        ("/a%3Ab/%40me/%3F", ("a:b", "@me", "?"), "/a%3Ab/%40me/%3F"),  # other escapes forwarded as sent
        ("/ADMIN/Users", ("ADMIN", "Users"), "/ADMIN/Users"),  # case is never changed in facts
        ("/%EF%BD%81dmin", ("ａdmin",), "/%EF%BD%81dmin"),  # noqa: RUF001 - a fullwidth lookalike stays itself
    ],
)
def test_path_normalization(raw: str, segments: tuple[str, ...], forward: str) -> None:
    n = normalize_path(raw)
    assert n.segments == segments
    assert n.forward_target == forward


# -- ambiguous variants: refused by default, each allow key lets exactly its form through --------------------


@pytest.mark.parametrize(
    ("raw", "form", "message", "segments"),
    [
        ("/admin;x/a", "semicolon", "';' path parameter", ("admin;x", "a")),
        ("/admin%3Bx/a", "semicolon", "';' path parameter", ("admin;x", "a")),
        ("/admin\\a", "backslash", "backslash", ("admin\\a",)),
        ("/admin%5ca", "backslash", "backslash", ("admin\\a",)),
        ("/admin./a", "trailing_dot", "ends with '.'", ("admin.", "a")),
        ("/admin%2e/a", "trailing_dot", "ends with '.'", ("admin.", "a")),
        ("/files/report.", "trailing_dot", "ends with '.'", ("files", "report.")),
        ("/admin%20/a", "trailing_space", "ends with a space", ("admin ", "a")),
        ("/admin%C2%A0/a", "trailing_space", "ends with a space", ("admin\xa0", "a")),
        ("/a%252Fb", "double_encoding", "percent-encoded twice", ("a%2Fb",)),
        ("/files/100%2525", "double_encoding", "percent-encoded twice", ("files", "100%25")),
    ],
)
def test_ambiguous_forms_are_refused_unless_allowed(raw: str, form: str, message: str,
                                                    segments: tuple[str, ...]) -> None:
    with pytest.raises(FactsError, match=message) as refused:
        normalize_path(raw)
    assert f"normalize.allow: [{form}]" in str(refused.value)  # the refusal says how to let it through
    for other in ALLOWABLE_FORMS:
        if other != form:
            with pytest.raises(FactsError):
                normalize_path(raw, allowing(other))
    allowed = normalize_path(raw, allowing(form))
    assert allowed.segments == segments
    assert normalize_path(allowed.forward_target, allowing(form)).segments == segments  # forwarded as matched


def test_allowed_forms_are_forwarded_as_sent() -> None:
    assert normalize_path("/admin;x/a", allowing("semicolon")).forward_target == "/admin;x/a"
    assert normalize_path("/admin%3bx/a", allowing("semicolon")).forward_target == "/admin%3bx/a"
    assert normalize_path("/a\\b", allowing("backslash")).forward_target == "/a\\b"
    assert normalize_path("/zones/example.org.", allowing("trailing_dot")).forward_target == "/zones/example.org."
    assert normalize_path("/a%20", allowing("trailing_space")).forward_target == "/a%20"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("/admin%00/a", "control character"),
        ("/admin\x00/a", "control character"),
        ("/a%01", "control character"),
        ("/a%1F", "control character"),
        ("/a%7f", "control character"),
        ("/a\x7f", "control character"),
        ("/a%0d%0aX-Injected:%201", "control character"),
        ("/a%09", "control character"),
        ("/a%C2%85", "control character"),  # C1 (NEL)
        ("/public/..;/admin", "'.' or '..' segment"),  # Tomcat strips ';' and climbs
        ("/public/..;x/admin", "'.' or '..' segment"),
        ("/public/.../admin", "'.' or '..' segment"),  # Windows strips trailing dots
        ("/public/..%20/admin", "'.' or '..' segment"),
        ("/public/.%20./admin", "'.' or '..' segment"),
        ("/public/..\\admin", "'.' or '..' segment"),  # Windows reads '\' as '/'
        ("/public/%2e%2e%5cadmin", "'.' or '..' segment"),
        ("/public/%252e%252e/admin", "'.' or '..' segment"),  # a double-decoding server climbs
        ("/public/a%252F..%252Fadmin", "'.' or '..' segment"),
        ("/100%", "'%' not followed by two hex digits"),
        ("/a%zzb", "'%' not followed by two hex digits"),
        ("/a%2", "'%' not followed by two hex digits"),
        ("/a#b", "raw '#'"),
        ("/a b", "raw space"),
        ("/a\udcffb", "not valid UTF-8"),  # a raw invalid byte, as mitmproxy hands it over
        ("/%ff%fe", "not valid percent-encoded UTF-8"),
        ("/%C0%AE%C0%AE/admin", "not valid percent-encoded UTF-8"),  # overlong '.'
    ],
)
def test_never_allowable_forms_are_refused_whatever_the_policy_allows(raw: str, message: str) -> None:
    for settings_ in (DEFAULT_NORMALIZE, ALLOW_ALL, NormalizeSettings(escaped_slashes="keep",
                                                                      allow=frozenset(ALLOWABLE_FORMS))):
        with pytest.raises(FactsError, match=message):
            normalize_path(raw, settings_)


def test_refusal_quotes_a_bounded_part_of_the_segment() -> None:
    with pytest.raises(FactsError) as refused:
        normalize_path("/" + "a" * 10_000 + ";x")
    assert len(str(refused.value)) < 300


# -- escaped slashes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["/admin%2fa", "/admin%2Fa", "/repos/acme%2Fsecrets/contents", "/%2F"])
def test_escaped_slashes_are_refused_by_default(raw: str) -> None:
    with pytest.raises(FactsError, match=r"encoded slash \(%2F\)"):
        normalize_path(raw)


@pytest.mark.parametrize(
    ("raw", "keep", "decode"),
    [
        ("/admin%2fa", (("admin/a",), "/admin%2fa"), (("admin", "a"), "/admin/a")),
        ("/projects/group%2Fproject/issues", (("projects", "group/project", "issues"),
                                              "/projects/group%2Fproject/issues"),
         (("projects", "group", "project", "issues"), "/projects/group/project/issues")),
        ("/a%2F%2Fb", (("a//b",), "/a%2F%2Fb"), (("a", "b"), "/a/b")),
        ("/public/x%2F..%2F..%2Fadmin", None, (("admin",), "/admin")),
        ("/a%252Fb", None, None),  # decoded once: a literal %2F remains, which is double encoding
    ],
)
def test_escaped_slashes_keep_and_decode(raw: str, keep: tuple[tuple[str, ...], str] | None,
                                         decode: tuple[tuple[str, ...], str] | None) -> None:
    for settings_, expected in ((KEEP, keep), (DECODE, decode)):
        if expected is None:
            with pytest.raises(FactsError):
                normalize_path(raw, settings_)
        else:
            n = normalize_path(raw, settings_)
            assert (n.segments, n.forward_target) == expected


@pytest.mark.parametrize("raw", ["/public/..%2Fadmin", "/public/x;y%2F..%2F..%2Fadmin", "/public/a;b%5C..%5Cadmin"])
def test_kept_escaped_slash_cannot_smuggle_a_dot_segment(raw: str) -> None:
    lenient = NormalizeSettings(escaped_slashes="keep", allow=frozenset(ALLOWABLE_FORMS))
    with pytest.raises(FactsError, match=r"'\.' or '\.\.' segment"):
        normalize_path(raw, lenient)


# -- the forwarded path is what was matched ------------------------------------------------------------------

_PIECES = ["a", "B", ".", "..", "%2e", "%2E%2e", "%41", "%2F", "%25", "%3B", ";", "\\", "%5C", "%20", "~", "é",
           "%C3%A9", "", "%00", "%", "#", " "]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_PIECES), max_size=4).map("".join), max_size=6),
       st.sampled_from([DEFAULT_NORMALIZE, KEEP, DECODE, ALLOW_ALL,
                        NormalizeSettings(escaped_slashes="decode", allow=frozenset(ALLOWABLE_FORMS))]))
def test_forward_target_normalizes_to_the_matched_segments(segs: list[str], settings_: NormalizeSettings) -> None:
    """Whatever is let through is forwarded in a form that normalizes to exactly what the rules saw, and is
    already normal: the upstream cannot be shown one path and serve another."""
    try:
        n = normalize_path("/" + "/".join(segs), settings_)
    except FactsError:
        return
    again = normalize_path(n.forward_target, settings_)
    assert again.segments == n.segments
    assert again.forward_target == n.forward_target
    assert ".." not in n.segments and "." not in n.segments and "" not in n.segments


# -- case ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "folded"),
    [("Admin", "admin"), ("ADMIN", "admin"), ("v1.2", "v1.2"), ("Straße", "strasse"),
     ("\uff21\uff44\uff4d\uff49\uff4e", "admin"), ("\u212aelvin", "kelvin"),
     ("adm\u0131n", "admin"), ("ADM\u0130N", "admin"), ("\u017fecret", "secret"), ("caf\u0065\u0301", "café")],
)
def test_fold_case(text: str, folded: str) -> None:
    assert fold_case(text) == folded


def test_folded_segments_are_computed_once() -> None:
    f = RequestFacts.from_url("GET", "https://x.example/Admin/%C3%89t%C3%A9")
    assert f.folded_segments() == ("admin", "été")
    assert f.folded_segments() is f.folded_segments()
    assert f.segments == ("Admin", "Été")


CASE_POLICY = """
version: 1
defaults: {{effect: deny}}
agents: {{bot: {{}}}}
{normalize}
rules:
  - {{id: everything, effect: allow, agents: [bot], unless: {{path: "/public/private/**"}}}}
  - {{id: no-admin, effect: deny, agents: [bot], match: {{path: "/admin/**"}}, unless: {{path: "/admin/Help"}}}}
  - id: tickets
    effect: hold
    agents: [bot]
    match: {{path: "/tickets/{{id}}/refund"}}
    lock: {{key: "ticket:{{id}}"}}
"""

PUBLIC_POLICY = """
version: 1
defaults: {{effect: deny}}
agents: {{bot: {{}}}}
{normalize}
rules:
  - {{id: public, effect: allow, agents: [bot], match: {{path: "/public/**"}}}}
"""


@pytest.mark.parametrize(
    ("path_case", "admin_upper", "help_upper", "public_upper", "private_upper", "lock"),
    [
        # cautious: a deny/hold `match` folds, its `unless` does not; an allow `match` does not, its `unless` does
        ("cautious", "deny", "deny", "deny", "deny", "ticket:AbC"),
        ("sensitive", "allow", "deny", "deny", "allow", "ticket:AbC"),
        ("insensitive", "deny", "allow", "allow", "deny", "ticket:abc"),
    ],
)
def test_path_case(tmp_path: Path, path_case: str, admin_upper: str, help_upper: str, public_upper: str,
                   private_upper: str, lock: str) -> None:
    section = f"normalize: {{path_case: {path_case}}}" if path_case != "cautious" else ""
    p = policy_from(tmp_path, CASE_POLICY.format(normalize=section))
    pub = policy_from(tmp_path, PUBLIC_POLICY.format(normalize=section), "public.yaml")
    assert p.normalize.path_case == path_case
    # exact spellings behave the same in every mode
    assert decide(p, "bot", "GET", "https://x.example/admin/a").effect == "deny"
    assert decide(p, "bot", "GET", "https://x.example/admin/Help").effect == "allow"
    assert decide(pub, "bot", "GET", "https://x.example/public/x").effect == "allow"
    assert decide(p, "bot", "GET", "https://x.example/public/private/x").effect == "deny"
    # other spellings
    assert decide(p, "bot", "GET", "https://x.example/ADMIN/a").effect == admin_upper
    assert decide(p, "bot", "GET", "https://x.example/admin/help").effect == help_upper
    assert decide(pub, "bot", "GET", "https://x.example/PUBLIC/x").effect == public_upper
    assert decide(p, "bot", "GET", "https://x.example/public/PRIVATE/x").effect == private_upper
    held = decide(p, "bot", "POST", "https://x.example/Tickets/AbC/refund")
    expected_hold = "hold" if path_case != "sensitive" else "allow"
    assert held.effect == expected_hold
    exact = decide(p, "bot", "POST", "https://x.example/tickets/AbC/refund")
    assert exact.effect == "hold" and [lk.key for lk in exact.locks] == [lock]


def test_cautious_deny_catches_fullwidth_lookalikes(tmp_path: Path) -> None:
    p = policy_from(tmp_path, CASE_POLICY.format(normalize=""))
    assert decide(p, "bot", "GET", "https://x.example/%EF%BC%A1dmin/a").effect == "deny"  # fullwidth A


def test_explain_says_which_patterns_ignore_case(tmp_path: Path) -> None:
    p = policy_from(tmp_path, CASE_POLICY.format(normalize=""))
    d = p.explain(RequestFacts.from_url("GET", "https://x.example/ADMIN/a"), "bot")
    (entry,) = [t for t in d.trace if t.rule == "no-admin"]
    assert entry.matched and "/admin/** (any case)" in " ".join(entry.reasons)


# -- the policy's section reaches the facts, and the tools refuse what the proxy refuses -----------------------

SEMI_POLICY = """
version: 1
defaults: {effect: allow}
agents: {bot: {}}
normalize: {escaped_slashes: keep, allow: [semicolon]}
rules:
  - {id: no-admin, effect: deny, agents: [bot], match: {path: "/admin/**"}}
"""


def test_settings_reach_request_facts(tmp_path: Path) -> None:
    p = policy_from(tmp_path, SEMI_POLICY)
    assert p.normalize == NormalizeSettings(escaped_slashes="keep", allow=frozenset({"semicolon"}))
    assert p.to_json()["normalize"] == {"path_case": "cautious", "escaped_slashes": "keep", "allow": ["semicolon"]}
    f = RequestFacts.from_url("GET", "https://x.example/a;v=1/b%2Fc?q=1", normalize=p.normalize)
    assert f.segments == ("a;v=1", "b/c") and f.forward_target == "/a;v=1/b%2Fc?q=1"
    with pytest.raises(FactsError):
        RequestFacts.from_url("GET", "https://x.example/a;v=1")  # not with the defaults


def test_bastion_test_and_explain_use_the_policy_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "p.yaml"
    rules.write_text(SEMI_POLICY)
    suite = tmp_path / "p_test.yaml"
    suite.write_text("""
- name: a path parameter the policy allows is matched literally
  agent: bot
  method: GET
  url: https://x.example/admin;x/a
  expect: {decision: allow}
- name: a backslash is refused before any rule runs
  agent: bot
  method: GET
  url: https://x.example/admin\\a
  expect: {decision: bad_request}
- name: the admin pages
  agent: bot
  method: GET
  url: https://x.example/admin/a
  expect: {decision: deny, rules: [no-admin]}
- name: wrong on purpose
  agent: bot
  method: GET
  url: https://x.example/admin./a
  expect: {decision: deny}
- name: also wrong on purpose
  agent: bot
  method: GET
  url: https://x.example/fine
  expect: {decision: bad_request}
""")
    assert main(["test", "--rules", str(rules), str(suite)]) == 1
    out = capsys.readouterr().out
    assert "PASS a path parameter the policy allows is matched literally" in out
    assert "PASS a backslash is refused before any rule runs" in out
    assert "PASS the admin pages" in out
    assert "decision: expected deny, got bad_request (path segment 'admin.' ends with '.'" in out
    assert "decision: expected bad_request, but the request is well-formed (path /fine)" in out
    assert "3 passed, 2 failed" in out
    assert main(["explain", "--rules", str(rules), "--agent", "bot", "GET", "https://x.example/admin;x/a"]) == 0
    assert main(["explain", "--rules", str(rules), "--agent", "bot", "GET", "https://x.example/admin./a"]) == 1
    assert "ends with '.'" in capsys.readouterr().err


# -- hosts, query, body --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("API.Example.com.", "api.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("[::1]", "::1"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_canonical_host(raw: str, canonical: str) -> None:
    assert canonical_host(raw) == canonical


@pytest.mark.parametrize("bad", ["", ".", "exa mple.com", "a/b"])
def test_bad_hosts(bad: str) -> None:
    with pytest.raises(FactsError):
        canonical_host(bad)


def test_query_duplicates_are_ambiguous() -> None:
    f = RequestFacts.from_url("GET", "https://x.example/s?q=a&q=b&one=1&empty=")
    assert f.query_value("one") == "1"
    assert f.query_value("empty") == ""
    with pytest.raises(EvalError, match="given 2 times"):
        f.query_value("q")


def test_forward_target_keeps_the_raw_query() -> None:
    f = RequestFacts.from_url("GET", "https://x.example/a/../b?x=%2F&y=1")
    assert f.forward_target == "/b?x=%2F&y=1"
    assert f.path == "/b"


def test_json_is_parsed_lazily_once_and_capped() -> None:
    f = RequestFacts.from_url("POST", "https://x.example/", body=b'{"a": 1}')
    assert f.json() == {"a": 1}
    assert f.json() is f.json()
    big = RequestFacts.from_url("POST", "https://x.example/", body=b'{"a": "' + b"x" * 100 + b'"}', body_limit=50)
    with pytest.raises(EvalError, match="exceeds"):
        big.json()
    for body in (None, b"", b"{not json", b"\xff\xfe"):
        with pytest.raises(EvalError):
            RequestFacts.from_url("POST", "https://x.example/", body=body).json()


def test_from_url_rejects_non_http() -> None:
    with pytest.raises(FactsError):
        RequestFacts.from_url("GET", "ftp://example.com/")
    with pytest.raises(FactsError):
        RequestFacts.from_url("GET", "/relative")
    assert RequestFacts.from_url("GET", "https://example.com").port == 443
    assert RequestFacts.from_url("get", "http://example.com:8080/").method == "GET"
