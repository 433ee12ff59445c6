"""Every operator, host pattern, path pattern and template, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.policy.facts import MISSING, EvalError, NormalizeSettings, RequestFacts
from bastion.policy.matchers import (
    CompileError,
    compile_condition,
    compile_host,
    compile_json_path,
    compile_path,
)
from bastion.policy.templates import compile_template

ERR = "error"

# (condition, value, textual, expected): expected is True, False or ERR (cannot evaluate).
CONDITIONS: list[tuple[Any, Any, bool, Any]] = [
    ("gpt-4", "gpt-4", False, True),
    ("gpt-4", "gpt-5", False, False),
    (5, 5, False, True),
    (5, 5.0, False, True),
    (1, True, False, False),  # no True == 1 surprise
    (True, 1, False, False),
    (True, True, False, True),
    (None, None, False, True),
    ("5", 5, False, False),  # JSON types are exact
    (5, "5", True, True),  # query and header values are text
    (True, "true", True, True),
    ({"eq": "a"}, "a", False, True),
    ({"ne": "a"}, "b", False, True),
    ({"ne": "a"}, "a", False, False),
    ({"ne": "a"}, MISSING, False, False),  # nothing to compare: only `exists` speaks about absence
    ({"in": ["a", "b"]}, "b", False, True),
    ({"in": ["a", "b"]}, "c", False, False),
    ({"not_in": ["a", "b"]}, "c", False, True),
    ({"not_in": ["a", "b"]}, "a", False, False),
    ({"gt": 5000}, 5001, False, True),
    ({"gt": 5000}, 5000, False, False),
    ({"gte": 5000}, 5000, False, True),
    ({"lt": 10}, 9.5, False, True),
    ({"lte": 10}, 10, False, True),
    ({"lte": 10}, 11, False, False),
    ({"gt": 5000}, "9000", False, ERR),  # a string where a number belongs: type mismatch
    ({"gt": 5000}, "9000", True, True),  # ...but a query parameter is parsed
    ({"gt": 5000}, "lots", True, ERR),
    ({"gt": 5000}, True, False, ERR),
    ({"gt": 5, "lt": 10}, 7, False, True),
    ({"gt": 5, "lt": 10}, 12, False, False),
    ({"prefix": "gpt-"}, "gpt-4", False, True),
    ({"prefix": "gpt-"}, "o1", False, False),
    ({"prefix": "gpt-"}, 4, False, ERR),
    ({"suffix": ".pdf"}, "a.pdf", False, True),
    ({"contains": "secret"}, "top secret", False, True),
    ({"contains": "x"}, ["a", "x"], False, True),
    ({"contains": "x"}, ["a"], False, False),
    ({"contains": "x"}, 42, False, ERR),
    ({"regex": "^org:acme( |$)"}, "org:acme foo", False, True),
    ({"regex": "acme"}, "my-acme-repo", False, True),  # search, not full match
    ({"regex": "^acme$"}, "my-acme", False, False),
    ({"regex": "x"}, 1, False, ERR),
    ({"exists": True}, "anything", False, True),
    ({"exists": True}, MISSING, False, False),
    ({"exists": False}, MISSING, False, True),
    ({"exists": False}, None, False, False),  # null is present
    ({"eq": "a"}, MISSING, False, False),
]


@pytest.mark.parametrize(("spec", "value", "textual", "expected"), CONDITIONS)
def test_condition(spec: Any, value: Any, textual: bool, expected: Any) -> None:
    cond = compile_condition(spec, textual)
    if expected == ERR:
        with pytest.raises(EvalError):
            cond.test(value)
    else:
        assert cond.test(value) is expected


@pytest.mark.parametrize(
    "spec",
    [{"in": "a"}, {"in": []}, {"gt": "5"}, {"prefix": 1}, {"regex": "("}, {"exists": "yes"}, {"bogus": 1},
     {"eq": [1]}, {}, ["a", "b"]],
)
def test_condition_compile_errors(spec: Any) -> None:
    with pytest.raises(CompileError):
        compile_condition(spec, False)


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.example.com", "api.example.com", True),
        ("API.Example.com.", "api.example.com", True),
        ("api.example.com", "example.com", False),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("[::1]", "::1", True),
        ("bücher.example", "xn--bcher-kva.example", True),
    ],
)
def test_host_pattern(pattern: str, host: str, expected: bool) -> None:
    assert compile_host(pattern).matches(host) is expected


@pytest.mark.parametrize("bad", ["*", "*.", "*.com", "api.*.com", "ex*ample.com", "example.com:443",
                                 "https://example.com", ""])
def test_bad_host_patterns(bad: str) -> None:
    with pytest.raises(CompileError):
        compile_host(bad)


@pytest.mark.parametrize(
    ("pattern", "path", "captures"),
    [
        ("/v1/chat/completions", "/v1/chat/completions", {}),
        ("/v1/chat/completions", "/v1/chat/completions/", {}),
        ("/v1/chat/completions", "/v1/chat", None),
        ("/v1/chat/completions", "/v1/chat/completions/x", None),
        ("/api/tickets/{ticket}/comments", "/api/tickets/42/comments", {"ticket": "42"}),
        ("/api/tickets/{ticket}/comments", "/api/tickets/4%2F2/comments", {"ticket": "4/2"}),
        ("/api/tickets/{ticket}/comments", "/api/tickets/4/2/comments", None),
        ("/repos/*/*/pulls", "/repos/acme/app/pulls", {}),
        ("/repos/*/*/pulls", "/repos/acme/pulls", None),
        ("/repos/acme/**", "/repos/acme", {}),
        ("/repos/acme/**", "/repos/acme/a/b/c", {}),
        ("/repos/acme/**", "/repos/acmeX/a", None),
        ("/**", "/", {}),
        ("/", "/", {}),
        ("/", "/x", None),
        ("/{a}/{b}", "/x/y", {"a": "x", "b": "y"}),
    ],
)
def test_path_pattern(pattern: str, path: str, captures: dict[str, str] | None) -> None:
    keep = NormalizeSettings(escaped_slashes="keep")  # %2F accepted, and kept inside its segment
    facts = RequestFacts.from_url("GET", "https://h.example" + path, normalize=keep)
    assert compile_path(pattern).match(facts.segments) == captures


@pytest.mark.parametrize("bad", ["v1/x", "/a/**/b", "/a/{b}c", "/a/{b", "/a/x*", "/{a}/{a}", "/a?x=1",
                                 "/a/../b"])
def test_bad_path_patterns(bad: str) -> None:
    with pytest.raises(CompileError):
        compile_path(bad)


@pytest.mark.parametrize(
    ("path", "doc", "values"),
    [
        ("a.b", {"a": {"b": 1}}, [1]),
        ("a.b", {"a": {}}, [MISSING]),
        ("a.b", {"a": "str"}, [MISSING]),
        ("a.0.c", {"a": [{"c": 2}]}, [2]),
        ("a.5.c", {"a": [{"c": 2}]}, [MISSING]),
        ("a.*.c", {"a": [{"c": 1}, {"d": 0}, {"c": 3}]}, [1, 3]),
        ("a.*", {"a": {"x": 1, "y": 2}}, [1, 2]),
        ("a.*.c", {"a": []}, []),
    ],
)
def test_json_paths(path: str, doc: Any, values: list[Any]) -> None:
    assert list(compile_json_path(path).values(doc)) == values


def test_templates_render_every_kind() -> None:
    facts = RequestFacts.from_url(
        "POST", "https://h.example/t/42?env=prod", headers={"X-Tenant": "acme"},
        body=b'{"a": {"b": "x"}, "n": 7, "flag": true}',
    )
    tpl = compile_template("t:{ticket}/{json.a.b}/{json.n}/{json.flag}/{query.env}/{header.X-Tenant}/{agent}")
    assert tpl.captures == {"ticket"}
    assert tpl.render(facts, {"ticket": "42"}, "bot") == "t:42/x/7/true/prod/acme/bot"


@pytest.mark.parametrize("ref", ["{json.missing}", "{query.nope}", "{header.x-none}", "{json.a}"])
def test_template_missing_or_non_scalar_values_are_errors(ref: str) -> None:
    facts = RequestFacts.from_url("POST", "https://h.example/", body=b'{"a": {"b": 1}}')
    with pytest.raises(EvalError):
        compile_template(ref).render(facts, {}, "bot")


@pytest.mark.parametrize("bad", ["", "{}", "{json.*.x}", "{bad name}", "a}b", "x{json.}"])
def test_bad_templates(bad: str) -> None:
    with pytest.raises(CompileError):
        compile_template(bad)
