"""Request facts: the canonical, normalized view of one HTTP request that rules are matched against.

The proxy builds one `RequestFacts` per request and the engine only ever reads it. Normalization happens here,
exactly once, so that what a rule matched is what gets forwarded:

- host: lower-case, no trailing dot, IDNA (punycode); IP literals kept as written (IPv6 without brackets).
- path: split on literal ``/`` first; each segment is percent-decoded exactly once; empty segments (``//``) are
  merged; ``.`` and ``..`` segments, including their encoded forms ``%2e``/``%2e%2e``, are resolved and can never
  climb above the root. ``forward_target`` is the same normalization applied to the raw (still encoded)
  segments, with escaped unreserved characters (``%61`` -> ``a``) decoded: the proxy forwards that, so upstream
  sees the path the rules saw.
- ambiguous paths are refused (FactsError, a 400 at the proxy): forms that common upstreams read differently
  from their spelling (a ``;`` path parameter that Tomcat strips, a backslash that Windows servers read as
  ``/``, a trailing dot or space that Windows strips, ``%2F`` that Go decodes before routing, ``%25XX`` that a
  double-decoding server reads as another escape), unless the policy's `normalize:` section lets that form
  through, in which case it is matched and forwarded literally. Control characters, malformed escapes and
  anything that could be read as a dot segment are refused always.
- query: parsed once; a parameter given twice is ambiguous and rules that look at it fail closed.
- JSON body: parsed lazily and at most once, only when a rule asks, and only up to ``body_limit`` bytes.

Case is not folded here: rules compare case-insensitively (per `normalize.path_case`) against
`RequestFacts.folded_segments()`, computed on first use, and the path is forwarded as sent.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import idna

from bastion.protocols.llm import MAX_TOOL_NAMES, LlmRequest, llm_body_problem, llm_request, may_be_llm
from bastion.protocols.mcp import McpProblem, McpRequest, may_be_jsonrpc, parse_jsonrpc

DEFAULT_BODY_LIMIT = 1 << 20  # JSON bodies larger than this are not parsed: json conditions fail closed.

PATH_CASES = ("cautious", "sensitive", "insensitive")
ESCAPED_SLASHES = ("reject", "keep", "decode")
ALLOWABLE_FORMS = ("semicolon", "backslash", "trailing_dot", "trailing_space", "double_encoding")


class EvalError(Exception):
    """A condition could not be evaluated (bad body, type mismatch, ambiguous input). Never allows."""


class FactsError(ValueError):
    """The request itself is malformed (bad host, bad URL): refuse it before any rule runs."""


@dataclass(frozen=True, slots=True)
class NormalizeSettings:
    """The policy's `normalize:` section. The defaults refuse every path form that some common upstream reads
    differently from its literal spelling, because a rule cannot know which upstream it guards.

    - path_case: `cautious` (deny and hold rules match any case, allow rules only the exact case),
      `sensitive` (exact everywhere) or `insensitive` (any case everywhere; captures are case-folded).
    - escaped_slashes: `reject` (%2F is a 400), `keep` (%2F stays inside its segment, forwarded encoded) or
      `decode` (%2F is a `/`: it splits segments and is forwarded as `/`).
    - allow: ambiguous forms (`ALLOWABLE_FORMS`) matched and forwarded literally instead of refused.
    """

    path_case: str = "cautious"
    escaped_slashes: str = "reject"
    allow: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {"path_case": self.path_case, "escaped_slashes": self.escaped_slashes, "allow": sorted(self.allow)}


DEFAULT_NORMALIZE = NormalizeSettings()

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


# A path made only of these characters (and no segment ending in '.') needs no per-segment checks: one regex
# search keeps the common case (a clean ASCII path) fast. Anything else takes the careful path below.
_NEEDS_CARE = re.compile(r"[^A-Za-z0-9\-_~!$&'()*+,=:@/.]|\.(?=/|$)")
_ESCAPED_SLASH = re.compile(r"%2[fF]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED_ESCAPE = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DdEe]|5[Ff]|7[Ee])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_PIECES = re.compile(r"[\\/]")
_SHOWN = 60  # characters of a refused segment quoted back in the error


def _show(raw: str) -> str:
    return repr(raw if len(raw) <= _SHOWN else raw[:_SHOWN] + "...")


def _dot_like(dec: str) -> bool:
    """Could an upstream read this segment as `.` or `..`: after stripping a `;` parameter (Tomcat), splitting
    on `\\` (Windows) or on a kept `%2F` (Go), dropping trailing dots and spaces (Windows), or decoding it a
    second time (`%252e%252e`)?"""
    readings = (dec, unquote(dec, errors="replace")) if "%" in dec else (dec,)
    for text in readings:
        for piece in _PIECES.split(text):
            core = piece.split(";", 1)[0]
            rest = core.replace(".", "")
            if len(rest) < len(core) and (not rest or rest.isspace()):
                return True
    return False


def _problem(raw: str, dec: str, allow: frozenset[str]) -> str | None:
    """Why this (non-dot) segment is ambiguous, or None. Never-allowable problems come first."""
    if _CONTROL.search(dec):
        return "contains a control character (never allowed in a path)"
    if _SURROGATE.search(dec):
        return "is not valid UTF-8"
    if "#" in raw:
        return "contains a raw '#' (a fragment never belongs in a request; encode it as %23)"
    if " " in raw:
        return "contains a raw space (encode it as %20)"
    if _dot_like(dec):
        return "could be read as a '.' or '..' segment by some servers (never allowed)"
    if "\\" in dec and "backslash" not in allow:
        return "contains a backslash, which some servers read as '/' (normalize.allow: [backslash] lets it through)"
    if ";" in dec and "semicolon" not in allow:
        return ("has a ';' path parameter, which some servers strip "
                "(normalize.allow: [semicolon] lets it through)")
    if "%" in dec and "double_encoding" not in allow and _ESCAPE.search(dec):
        return ("is percent-encoded twice (%25XX), which some servers decode again "
                "(normalize.allow: [double_encoding] lets it through)")
    if dec.endswith(".") and "trailing_dot" not in allow:
        return "ends with '.', which some servers strip (normalize.allow: [trailing_dot] lets it through)"
    if dec[-1].isspace() and "trailing_space" not in allow:
        return "ends with a space, which some servers strip (normalize.allow: [trailing_space] lets it through)"
    return None


def _decode_segment(raw: str, settings: NormalizeSettings) -> tuple[str, str]:
    """(decoded, forwarded) for one raw segment, or FactsError naming why it is refused."""
    if "%" in raw:
        if _BAD_ESCAPE.search(raw):
            raise FactsError(f"path segment {_show(raw)} has a '%' not followed by two hex digits")
        if settings.escaped_slashes == "reject" and _ESCAPED_SLASH.search(raw):
            raise FactsError(f"path segment {_show(raw)} contains an encoded slash (%2F), which some servers "
                             "decode into '/' (normalize.escaped_slashes: keep or decode accepts it)")
        try:
            dec = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise FactsError("path is not valid percent-encoded UTF-8") from None
        fwd = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group()[1:], 16)), raw)
    else:
        dec = fwd = raw
    if dec != "." and dec != "..":
        problem = _problem(raw, dec, settings.allow)
        if problem is not None:
            raise FactsError(f"path segment {_show(raw)} {problem}")
    return dec, fwd


def normalize_path(raw_path: str, settings: NormalizeSettings = DEFAULT_NORMALIZE) -> NormalizedPath:
    """RFC 3986 dot-segment removal on the raw segments; decode each segment once; refuse ambiguous segments
    (FactsError). `%2F` splits segments only with `escaped_slashes: decode`."""
    if not raw_path.startswith("/"):
        raw_path = "/" + raw_path
    if _NEEDS_CARE.search(raw_path) is None:  # clean ASCII, no dot segments: nothing to decode or refuse
        trailing = raw_path != "/" and raw_path.endswith("/")
        if "//" not in raw_path:
            return NormalizedPath(tuple(s for s in raw_path.split("/") if s), raw_path, trailing)
        segs = tuple(s for s in raw_path.split("/") if s)
        return NormalizedPath(segs, "/" + "/".join(segs) + ("/" if trailing and segs else ""), trailing)
    if settings.escaped_slashes == "decode" and "%" in raw_path:
        raw_path = _ESCAPED_SLASH.sub("/", raw_path)
    trailing = raw_path != "/" and raw_path.endswith("/")
    stack_fwd: list[str] = []
    stack_dec: list[str] = []
    for raw in raw_path.split("/"):
        if raw == "":
            continue
        dec, fwd = _decode_segment(raw, settings)
        if dec == ".":
            continue
        if dec == "..":
            if stack_fwd:
                stack_fwd.pop()
                stack_dec.pop()
            continue
        stack_fwd.append(fwd)
        stack_dec.append(dec)
    target = "/" + "/".join(stack_fwd)
    if trailing and stack_fwd:
        target += "/"
    return NormalizedPath(tuple(stack_dec), target, trailing)


# The only letters outside ASCII whose simple upper- or lower-case mapping is an ASCII letter (dotted and
# dotless i, long s, Kelvin sign). Java's equalsIgnoreCase, and servers built on it, compares char by char
# through those mappings, so admin spelled with a dotless i equals ADMIN there; the full case fold alone would
# keep them apart.
_ASCII_CASE_PARTNERS = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})


def fold_case(text: str) -> str:
    """The caseless form of a path segment or pattern literal: ASCII lower-case, or for other text the NFKC
    case fold (with `_ASCII_CASE_PARTNERS`), so that ADMIN, Admin, admin with a dotless i and the fullwidth
    form of admin (U+FF41...) all compare equal."""
    if text.isascii():
        return text.lower()
    nfkc = unicodedata.normalize("NFKC", text).translate(_ASCII_CASE_PARTNERS)
    return unicodedata.normalize("NFKC", nfkc.casefold())


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
    _folded: tuple[str, ...] | None = field(default=None, repr=False)
    _llm: Any = field(default=_MISSING, repr=False)
    _mcp: Any = field(default=_MISSING, repr=False)

    @property
    def path(self) -> str:
        """The decoded, normalized path, for display and `{path}`-style messages ('/' inside a segment is %2F)."""
        return "/" + "/".join(s.replace("%", "%25").replace("/", "%2F") for s in self.segments)

    def folded_segments(self) -> tuple[str, ...]:
        """The segments in caseless form (`fold_case`), computed once and only if a case-insensitive path
        pattern asks: most requests never pay for it."""
        folded = self._folded
        if folded is None:
            folded = self._folded = tuple(map(fold_case, self.segments))
        return folded

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
        normalize: NormalizeSettings = DEFAULT_NORMALIZE,
    ) -> RequestFacts:
        """Normalize one request. Raises FactsError (the proxy answers 400) for a malformed or ambiguous one."""
        npath = normalize_path(raw_path or "/", normalize)
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
        normalize: NormalizeSettings = DEFAULT_NORMALIZE,
    ) -> RequestFacts:
        """Facts from an absolute URL: used by `bastion explain`, `bastion test` and unit tests. Pass the
        policy's `normalize` settings so a tool refuses exactly what the proxy refuses."""
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
            normalize=normalize,
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
                except RecursionError:
                    self._json_error = "body is nested too deeply to read"
        if self._json_error is not None:
            raise EvalError(self._json_error)
        return self._json

    def llm(self) -> LlmRequest | None:
        """The LLM API call this request makes (OpenAI- or Anthropic-style, by path and body shape), or None.
        Raises EvalError when the path says it may be one but the body cannot be read (none, too large, not
        JSON), cannot be read unambiguously (a deciding member given twice or in another letter case), or
        offers more tools than rules can see: `llm` conditions then fail closed."""
        got = self._llm
        if isinstance(got, EvalError):
            raise got
        if got is _MISSING:
            got = None
            if may_be_llm(self.method, self.segments):
                try:
                    got = self._read_llm()
                except EvalError as e:
                    self._llm = e
                    raise
            self._llm = got
        return got

    def _read_llm(self) -> LlmRequest | None:
        doc = self.json()
        problem = llm_body_problem(self.body or b"", doc)
        if problem is not None:
            raise EvalError(f"the model call cannot be read unambiguously: {problem}")
        got = llm_request(self.method, self.segments, self.headers, doc)
        if got is not None and not got.tools_complete:
            raise EvalError(f"the request offers more than {MAX_TOOL_NAMES} tools: rules cannot see them all")
        return got

    def mcp(self) -> McpRequest | None:
        """The JSON-RPC (MCP) message this request carries, or None when it carries none.

        Raises McpProblem (the proxy answers 400) for what must never pass: a batch holding a call, duplicate
        keys, `Mcp-Method`/`Mcp-Name` headers that disagree with the body. Raises EvalError when the body is not
        available to check (too large, or not read yet): `mcp` conditions then fail closed."""
        got = self._mcp
        if isinstance(got, Exception):
            raise got
        if got is _MISSING:
            try:
                got = self._parse_mcp()
            except (McpProblem, EvalError) as e:
                self._mcp = e
                raise
            self._mcp = got
        return got

    def _parse_mcp(self) -> McpRequest | None:
        body = self.body
        if not body:
            if self.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in self.headers:
                raise EvalError("the request body is not available to check")
            return parse_jsonrpc(b"", self.headers)
        encoded = self.encoded_body()
        if encoded is not None:  # a server may decode what the rules cannot read: never "not a call"
            raise EvalError(f"the body is {encoded}, so it cannot be checked for a JSON-RPC call")
        if not may_be_jsonrpc(body):
            return parse_jsonrpc(b"", self.headers) if _MCP_HEADERS & self.headers.keys() else None
        if len(body) > self.body_limit:
            raise EvalError(f"body of {len(body)} bytes exceeds the {self.body_limit}-byte JSON limit")
        return parse_jsonrpc(body, self.headers)

    def encoded_body(self) -> str | None:
        """Why the body bytes are not the text a server reads, or None: a Content-Encoding (gzip, ...) or a
        charset other than UTF-8 (servers decode both before parsing)."""
        coding = self.headers.get("content-encoding", "").strip().lower()
        if coding not in ("", "identity"):
            return f"content-encoded ({coding[:40]})"
        _, _, params = self.content_type.partition(";")
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset":
                charset = value.strip().strip('"').lower()
                if charset not in ("utf-8", "utf8", "us-ascii", "ascii"):
                    return f"in the charset {charset[:40]!r}"
        return None


_MCP_HEADERS = frozenset({"mcp-method", "mcp-name"})

MISSING = _MISSING
