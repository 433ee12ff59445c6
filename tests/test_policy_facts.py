"""Normalization: what rules see, and what the proxy forwards, for tricky hosts and paths."""

from __future__ import annotations

import pytest

from bastion.policy.facts import EvalError, FactsError, RequestFacts, canonical_host, normalize_path


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
        ("/a%2Fb/c", ("a/b", "c"), "/a%2Fb/c"),
        ("/a%252Fb", ("a%2Fb",), "/a%252Fb"),  # decoded exactly once
        ("/a//b", ("a", "b"), "/a/b"),
        ("/caf%C3%A9", ("café",), "/caf%C3%A9"),
        ("/a/b/..", ("a",), "/a"),
        ("/%2e%2e%2fadmin", ("../admin",), "/%2e%2e%2fadmin"),  # one segment that only looks like a climb
    ],
)
def test_path_normalization(raw: str, segments: tuple[str, ...], forward: str) -> None:
    n = normalize_path(raw)
    assert n.segments == segments
    assert n.forward_target == forward


def test_invalid_utf8_in_path_is_a_facts_error() -> None:
    with pytest.raises(FactsError):
        RequestFacts.from_url("GET", "http://example.com/%ff%fe")


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
