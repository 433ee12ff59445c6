"""Request facts: the canonical, normalized view of one HTTP request that rules are matched against.

The proxy builds one `RequestFacts` per request and the engine only ever reads it. Normalization happens here,
exactly once, so that what a rule matched is what gets forwarded:

- host: lower-case, no trailing dot, IDNA (punycode); IP literals kept as written (IPv6 without brackets).
- path: split on literal ``/`` first, so an encoded ``%2F`` never splits a segment; each segment is
  percent-decoded exactly once; empty segments (``//``) are merged; ``.`` and ``..`` segments, including their
  encoded forms ``%2e``/``%2e%2e``, are resolved and can never climb above the root. ``forward_target`` is the
  same normalization applied to the raw (still encoded) segments: the proxy forwards that, so upstream sees the
  path the rules saw.
- query: parsed once; a parameter given twice is ambiguous and rules that look at it fail closed.
- JSON body: parsed lazily and at most once, only when a rule asks, and only up to ``body_limit`` bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import idna

DEFAULT_BODY_LIMIT = 1 << 20  # JSON bodies larger than this are not parsed: json conditions fail closed.


class EvalError(Exception):
    """A condition could not be evaluated (bad body, type mismatch, ambiguous input). Never allows."""


class FactsError(ValueError):
    """The request itself is malformed (bad host, bad URL): refuse it before any rule runs."""


_MISSING = object()


def canonical_host(host: str) -> str:
    """Lower-case, strip one trailing dot, IDNA-encode. Raises FactsError for hosts that cannot be canonical."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h.endswith("."):
        h = h[:-1]
    if not h:
        raise FactsError("empty host")
    if ":" in h:  # IPv6 literal
        return h.lower()
    if h.isascii():
        h = h.lower()
        if any(not (c.isalnum() or c in "-_.") for c in h):
            raise FactsError(f"invalid host {host!r}")
        return h
    try:
        return idna.encode(h, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise FactsError(f"invalid host {host!r}: {e}") from None


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    segments: tuple[str, ...]  # decoded, for matching
    forward_target: str  # encoded, dot segments resolved, for forwarding (no query)
    trailing_slash: bool


def normalize_path(raw_path: str) -> NormalizedPath:
    """RFC 3986 dot-segment removal on the raw segments; decode each segment once, never split on %2F."""
    if not raw_path.startswith("/"):
        raw_path = "/" + raw_path
    raw_segments = raw_path.split("/")[1:]
    trailing = raw_path != "/" and raw_path.endswith("/")
    stack_raw: list[str] = []
    stack_dec: list[str] = []
    for raw in raw_segments:
        if raw == "":
            continue
        dec = unquote(raw, errors="strict") if "%" in raw else raw
        if dec == ".":
            continue
        if dec == "..":
            if stack_raw:
                stack_raw.pop()
                stack_dec.pop()
            continue
        stack_raw.append(raw)
        stack_dec.append(dec)
    target = "/" + "/".join(stack_raw)
    if trailing and stack_raw:
        target += "/"
    return NormalizedPath(tuple(stack_dec), target, trailing)


@dataclass(slots=True)
class RequestFacts:
    """Everything a rule may look at. Build with `RequestFacts.build` (or `from_url` in tools and tests)."""

    method: str
    scheme: str
    host: str
    port: int
    segments: tuple[str, ...]
    forward_target: str  # normalized path + "?" + raw query if any: what the proxy forwards
    query: Mapping[str, tuple[str, ...]]
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes | None = None
    body_limit: int = DEFAULT_BODY_LIMIT
    content_type: str = ""
    _json: Any = field(default=_MISSING, repr=False)
    _json_error: str | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        """The decoded, normalized path, for display and `{path}`-style messages ('/' inside a segment is %2F)."""
        return "/" + "/".join(s.replace("%", "%25").replace("/", "%2F") for s in self.segments)

    @classmethod
    def build(
        cls,
        *,
        method: str,
        scheme: str,
        host: str,
        port: int,
        raw_path: str,
        raw_query: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        body_limit: int = DEFAULT_BODY_LIMIT,
    ) -> RequestFacts:
        try:
            npath = normalize_path(raw_path or "/")
        except UnicodeDecodeError:
            raise FactsError("path is not valid percent-encoded UTF-8") from None
        pairs: dict[str, list[str]] = {}
        for k, v in parse_qsl(raw_query, keep_blank_values=True):
            pairs.setdefault(k, []).append(v)
        hdrs = {k.lower(): v for k, v in (headers or {}).items()}
        target = npath.forward_target + (f"?{raw_query}" if raw_query else "")
        return cls(
            method=method.upper(),
            scheme=scheme.lower(),
            host=canonical_host(host),
            port=port,
            segments=npath.segments,
            forward_target=target,
            query={k: tuple(v) for k, v in pairs.items()},
            headers=hdrs,
            body=body,
            body_limit=body_limit,
            content_type=hdrs.get("content-type", ""),
        )

    @classmethod
    def from_url(
        cls,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        body_limit: int = DEFAULT_BODY_LIMIT,
    ) -> RequestFacts:
        """Facts from an absolute URL: used by `bastion explain`, `bastion test` and unit tests."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise FactsError(f"not an absolute http(s) URL: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
        except ValueError:
            raise FactsError(f"bad port in {url!r}") from None
        return cls.build(
            method=method,
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            raw_path=parts.path or "/",
            raw_query=parts.query,
            headers=headers,
            body=body,
            body_limit=body_limit,
        )

    def query_value(self, name: str) -> Any:
        """The single value of a query parameter; _MISSING if absent; EvalError if given more than once."""
        values = self.query.get(name)
        if values is None:
            return _MISSING
        if len(values) > 1:
            raise EvalError(f"query parameter {name!r} given {len(values)} times")
        return values[0]

    def json(self) -> Any:
        """The parsed JSON body, parsed on first use. EvalError when there is none or it is not JSON."""
        if self._json is _MISSING and self._json_error is None:
            if self.body is None or self.body == b"":
                self._json_error = "request has no body"
            elif len(self.body) > self.body_limit:
                self._json_error = f"body of {len(self.body)} bytes exceeds the {self.body_limit}-byte JSON limit"
            else:
                try:
                    self._json = json.loads(self.body)
                except (ValueError, UnicodeDecodeError) as e:
                    self._json_error = f"body is not valid JSON ({e})"
        if self._json_error is not None:
            raise EvalError(self._json_error)
        return self._json


MISSING = _MISSING
