"""Secret redaction, applied to every record before anything is spooled, stored, hashed or exported.

Two nets, both always on:

1. By name: header names (a built-in list, any name made of secret-like words such as token, secret,
   password, api-key, plus `audit.redact_headers`), query parameters and JSON / form keys (secret-like
   names plus `audit.redact_json_keys`). The whole value is masked.
2. By value: credential formats wherever they appear (header values, URLs, bodies, error messages): OpenAI and
   Anthropic `sk-` keys, AWS access key ids, GitHub and GitLab tokens, Slack tokens and webhooks, Google, Stripe
   and Hugging Face keys, JWTs, PEM private-key blocks, `Bearer` tokens, plus `audit.redact_patterns`. Each
   built-in pattern has literal keywords checked first, so a body without any costs a few substring searches.

A masked value reads `[REDACTED]`, or `[REDACTED:1a2b3c4d]` when the redactor has a correlation key: the tag is
the first 32 bits of HMAC-SHA256(key, secret), so an auditor can tell that two calls used the same credential,
while nobody without the key can test a guess (a plain hash of a short password would be brute-forced).
The writer keeps the key in its spool directory (one per sidecar home, never in the audit store).

Every masked spot is listed by JSON-pointer-like path (`/request/headers/authorization`,
`/request/url/query/key`, `/request/body/messages/0/api_key`, `/response/body`) in `AuditRecord.redactions`.

Bodies: JSON is parsed and walked (re-serialised only when something was masked); form bodies are parsed by
pair; anything else (text, SSE streams, truncated JSON, binary) is scanned as Latin-1 text, which maps bytes
1:1 so the ASCII-only patterns never split a UTF-8 character, and `"secret_name": "value"` pairs are masked
there too (also one a cut body ends inside). Redaction has false negatives by nature; restrict who can read
bodies accordingly.

Echoes (`Redactor.exchange`, `Echoes`): a secret masked in one place is masked wherever else it appears in the
same exchange, since upstreams quote what they were sent (a validation error repeating the input, a model
repeating a prompt that held a key, a header reflected back). The values masked by the two nets are
remembered, with what a Basic `Authorization` decodes to and each cookie's value; a second pass then masks
every occurrence of any of them anywhere in the record: URL, headers, bodies, messages, `extra`, and the
redaction paths themselves. Values shorter than `ECHO_MIN` characters are not searched for (a token is long,
and "true" or a 4-digit id would be masked everywhere); besides the value itself, its JSON-escaped,
URL-encoded and HTML-escaped forms and its UTF-8 bytes are searched for. A body cut at `max_body_bytes` that
ends with at least `ECHO_PARTIAL_MIN` characters of the start of such a value has that tail masked too. An
echo split across stream events (a model streaming a key token by token) is not found.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import functools
import hashlib
import hmac
import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, unquote_plus, urlencode, urlsplit, urlunsplit

from bastion.audit.record import Header

MASK = "[REDACTED]"

BUILTIN_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "x-goog-api-key",
    "ocp-apim-subscription-key", "x-amz-security-token", "x-auth-token", "x-csrf-token", "x-xsrf-token",
})
BUILTIN_PARAMS = frozenset({
    "key", "api_key", "apikey", "access_token", "refresh_token", "id_token", "token", "code", "client_secret",
    "password", "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
})
# A name is secret-like when one of its words is in _WORDS, or its letters (separators dropped) contain one of
# _COMPOUNDS. "max_tokens", "author" or "x-ratelimit-remaining-tokens" are not; "apiKey", "x-auth-token" are.
_WORDS = frozenset({"auth", "token", "pwd", "passphrase", "cookie", "signature", "jwt", "bearer"})
_COMPOUNDS = ("password", "passwd", "secret", "credential", "apikey", "accesskey", "privatekey",
              "subscriptionkey", "accesstoken", "refreshtoken", "idtoken", "authtoken", "sessiontoken",
              "authorization")
_WORD_RE = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


@functools.lru_cache(maxsize=8192)
def is_secret_name(name: str) -> bool:
    """True for header, parameter and key names that usually hold credentials."""
    if any(w.lower() in _WORDS for w in _WORD_RE.findall(name)):
        return True
    compact = re.sub(r"[^a-z0-9]", "", name.lower())
    return any(c in compact for c in _COMPOUNDS)


@dataclass(frozen=True, slots=True)
class _Pattern:
    name: str
    regex: re.Pattern[str]
    keywords: tuple[str, ...]  # empty: always run


def _p(name: str, regex: str, *keywords: str) -> _Pattern:
    # ASCII: `\b` must see "é" or a Latin-1-decoded byte like "\xff" as a boundary, not a letter.
    return _Pattern(name, re.compile(regex, re.ASCII), keywords)


# Written for Bastion after the published formats (and gitleaks' MIT rule set); a named group `s` marks the
# part to mask when the pattern needs context around the secret.
BUILTIN_PATTERNS: tuple[_Pattern, ...] = (
    _p("private-key", r"-----BEGIN[ A-Z0-9_-]{0,40}PRIVATE KEY(?: BLOCK)?-----[\s\S]{0,65536}?"
       r"-----END[ A-Z0-9_-]{0,40}PRIVATE KEY(?: BLOCK)?-----", "PRIVATE KEY"),
    _p("openai-anthropic-key", r"\bsk-[A-Za-z0-9_-]{20,}", "sk-"),
    _p("aws-access-key", r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b", "AKIA", "ASIA", "ABIA", "ACCA",
       "A3T"),
    _p("github-token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
       "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    _p("gitlab-token", r"\bgl(?:pat|ptt|dt|rt|soat|cbt|imt|oas|ffct|ft|agent)-[A-Za-z0-9_-]{20,}",
       "glpat-", "glptt-", "gldt-", "glrt-", "glsoat-", "glcbt-", "glimt-", "gloas-", "glffct-", "glft-",
       "glagent-"),
    _p("slack-token", r"\bxox[abposre]-[A-Za-z0-9-]{10,}", "xox"),
    _p("slack-webhook", r"hooks\.slack\.com/(?:services|workflows|triggers)/(?P<s>[A-Za-z0-9+/_-]{20,})",
       "hooks.slack.com"),
    _p("google-api-key", r"\bAIza[0-9A-Za-z_-]{35}", "AIza"),
    _p("stripe-key", r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}", "k_live_", "k_test_"),
    _p("huggingface-token", r"\bhf_[A-Za-z0-9]{30,}", "hf_"),
    _p("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*", "eyJ"),
    _p("bearer", r"\b[Bb]earer\s+(?P<s>[A-Za-z0-9._~+/-]{16,}=*)", "earer"),
)



def _keyword_regex(words: Iterable[str]) -> str:
    """One alternation of `words`, factored into a trie (`A(?:KIA|SIA|...)`): the regex engine then rejects a
    position after one or two characters instead of trying every keyword there, which makes this search about
    2.5x faster than a flat `a|b|c` on text without any keyword (the common case)."""
    trie: dict[str, dict] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict[str, dict]) -> str:
        if "" in node:  # a keyword ends here; longer ones sharing this prefix are found by it anyway
            return ""
        alts = [re.escape(ch) + emit(sub) for ch, sub in sorted(node.items())]
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return emit(trie)


def _anchor(keyword: str) -> str:
    """The part of `keyword` the pre-check searches: from its first character that is rare in ordinary text
    (keeping at least two characters). A position in the text is only tried further when its character could
    start an anchor, so anchors starting with "k", "y" or "." instead of "s", "e" or "h" (as in "sk-", "eyJ",
    "hooks.slack.com") make the search about twice as fast. Sound: a keyword in the text contains its anchor."""
    for i, ch in enumerate(keyword[:-1]):
        if ch not in _COMMON_CHARS:
            return keyword[i:]
    return keyword


_COMMON_CHARS = frozenset("etaoinshrdlucm ")
# One search for every keyword first: most strings (and most bodies) contain none, and then no pattern runs.
# "earer" (either case of "Bearer") is searched as its two spellings, so no alternative starts with "e".
_KEYWORD_LIST = tuple(sorted({k for p in BUILTIN_PATTERNS for k in p.keywords if k != "earer"} | {"Bearer", "bearer"}))
_ANCHORS = tuple(sorted({_anchor(k) for k in _KEYWORD_LIST}))
_KEYWORDS = re.compile(_keyword_regex(_ANCHORS))
_KEYWORDS_BYTES = re.compile(_keyword_regex(_ANCHORS).encode("ascii"))
_MIN_SECRET = 15  # no built-in pattern matches fewer characters
_MEMO_SIZE = 4096  # names whose secret-or-not verdict a Redactor remembers

# `"name": "value"` pairs in text that is JSON-ish but not parseable (cut bodies, SSE events, logs in bodies).
_JSON_PAIR = re.compile(r'"((?:[^"\\\n]|\\.){1,100})"\s*:\s*"((?:[^"\\\n]|\\.){1,65536})"')
# The same pair with its value cut off by the end of the text (a body cut at max_body_bytes); searched in the
# last `_TAIL_CHARS` characters only.
_JSON_TAIL = re.compile(r'"((?:[^"\\\n]|\\.){1,100})"\s*:\s*"((?:[^"\\\n]|\\.){1,65536})\\?\Z')
_TAIL_CHARS = 65536 + 256

ECHO_MIN = 8  # shortest masked value whose other occurrences are masked too
ECHO_MAX = 8192  # longest one (a PEM key fits); longer values are masked where found, not searched for
ECHO_PARTIAL_MIN = 4  # shortest start of such a value masked at the very end of a cut body
ECHO_MAX_VALUES = 64  # values remembered per exchange, first found first (URL and headers come first)
ECHO_MAX_FORMS = 256  # searched strings per exchange (a value and its encodings), bounding the work per byte


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901) from path parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class Redactor:
    """Masks secrets in one record's parts. Settings are fixed at construction; safe to share between threads.

    Each method takes the path prefix of the part and a `found` list it appends masked paths to.
    """

    def __init__(self, *, headers: Iterable[str] = (), json_keys: Iterable[str] = (),
                 patterns: Iterable[str] = (), key: bytes | None = None) -> None:
        self._headers = BUILTIN_HEADERS | {h.strip().lower() for h in headers}
        self._keys = frozenset(k.strip().lower() for k in json_keys)
        extra: list[_Pattern] = []
        for i, rx in enumerate(patterns):
            try:
                extra.append(_Pattern(f"custom-{i}", re.compile(rx), ()))
            except re.error as e:
                raise ValueError(f"redaction pattern {rx!r} is not a valid regex: {e}") from None
        self._custom = tuple(extra)
        self._key = key
        # Verdicts of secret_header / secret_key by name. Header and JSON key names repeat from call to call
        # (an LLM API has a few dozen), so after warm-up a name costs one dict lookup instead of lower(),
        # set lookups and a word split. Filled racily from several threads: every writer stores the same
        # verdict, so that is harmless. Bounded, so hostile traffic with random names cannot grow it.
        self._header_memo: dict[str, bool] = {}
        self._key_memo: dict[str, bool] = {}
        self._seen: dict[str, None] | None = None  # values masked so far, in an `exchange()` copy only

    # --- one exchange ----------------------------------------------------------------------------------------

    def exchange(self) -> Redactor:
        """A redactor for one exchange: the same settings (and shared memos), plus a memory of every value it
        masks, for `echoes()`. Use one per record, on one thread."""
        ex = copy.copy(self)
        ex._seen = {}
        return ex

    def echoes(self) -> Echoes | None:
        """What masks the other occurrences of the values this exchange's redactor masked (None: nothing to
        look for)."""
        return Echoes(self, self._seen) if self._seen else None

    def _remember(self, secret: str) -> None:
        seen = self._seen
        if seen is not None and ECHO_MIN <= len(secret) <= ECHO_MAX and len(seen) < ECHO_MAX_VALUES:
            seen[secret] = None

    def _remember_leaves(self, node: Any) -> None:
        """The strings and numbers inside a JSON value masked whole (`"credentials": {"password": ...}`)."""
        if self._seen is None:
            return
        stack = [node]
        while stack and len(self._seen) < ECHO_MAX_VALUES:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, str):
                self._remember(item)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                self._remember(json.dumps(item))

    def _remember_header(self, name: str, scheme: str, credentials: str, value: str) -> None:
        """What a masked header's value stands for besides itself: the password of Basic credentials (an
        upstream may quote it decoded) and each cookie's value."""
        if self._seen is None:
            return
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                return
            self._remember(decoded)
            self._remember(decoded.partition(":")[2])
        elif name.lower() in ("cookie", "set-cookie"):
            pairs = value.split(";")
            for pair in pairs if name.lower() == "cookie" else pairs[:1]:  # Set-Cookie: attributes follow
                self._remember(pair.partition("=")[2].strip().strip('"'))

    # --- masks and names -------------------------------------------------------------------------------------

    def mask(self, secret: str) -> str:
        self._remember(secret)
        if not self._key:
            return MASK
        tag = hmac.new(self._key, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:8]
        return f"[REDACTED:{tag}]"

    def secret_header(self, name: str) -> bool:
        verdict = self._header_memo.get(name)
        if verdict is None:
            low = name.lower()
            verdict = low in self._headers or is_secret_name(low)
            if len(self._header_memo) < _MEMO_SIZE:
                self._header_memo[name] = verdict
        return verdict

    def secret_key(self, name: str) -> bool:
        """JSON keys, form fields and query parameters."""
        verdict = self._key_memo.get(name)
        if verdict is None:
            low = name.lower()
            verdict = low in self._keys or low in BUILTIN_PARAMS or is_secret_name(name)
            if len(self._key_memo) < _MEMO_SIZE:
                self._key_memo[name] = verdict
        return verdict

    # --- values ----------------------------------------------------------------------------------------------

    def scan(self, text: str) -> str:
        """Mask every credential-shaped value in `text`; returns `text` itself when nothing matched."""
        out = text
        if len(text) >= _MIN_SECRET and _KEYWORDS.search(text):
            for pat in BUILTIN_PATTERNS:
                if any(k in out for k in pat.keywords):
                    out = pat.regex.sub(self._replace, out)
        for pat in self._custom:
            out = pat.regex.sub(self._replace, out)
        return out

    def _replace(self, m: re.Match[str]) -> str:
        if "s" in m.re.groupindex and m.group("s") is not None:
            start, end = m.span("s")
            whole = m.group(0)
            base = m.start()
            return whole[: start - base] + self.mask(m.group("s")) + whole[end - base:]
        return self.mask(m.group(0))

    def text(self, value: str, path: str, found: list[str]) -> str:
        out = self.scan(value)
        if out != value:
            found.append(path)
        return out

    # --- parts -----------------------------------------------------------------------------------------------

    def headers(self, headers: Sequence[Header], path: str, found: list[str]) -> list[Header]:
        out: list[Header] = []
        for name, value in headers:
            if value and self.secret_header(name):
                found.append(path + pointer(name.lower()))
                scheme, sep, rest = value.partition(" ")
                if sep and rest and scheme.isalpha() and len(scheme) <= 16:  # keep "Bearer", "Basic"
                    self._remember_header(name, scheme, rest.strip(), value)
                    value = f"{scheme} {self.mask(rest.strip())}"
                else:
                    self._remember_header(name, "", "", value)
                    value = self.mask(value)
            else:
                masked = self.scan(value)
                if masked != value:
                    found.append(path + pointer(name.lower()))
                    value = masked
            out.append((name, value))
        return out

    def url(self, url: str, path: str, found: list[str]) -> str:
        """Mask a password in the userinfo, secret query parameters, then credential-shaped values."""
        if "?" not in url and "@" not in url:  # no userinfo, no query: only values can hold a secret
            return self.text(url, path, found)
        try:
            parts = urlsplit(url)
        except ValueError:
            return self.text(url, path, found)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, password = userinfo.partition(":")
            if sep and password:
                found.append(path + "/password")
                netloc = f"{user}:{self.mask(unquote_plus(password))}@{hostport}"
        query = parts.query
        if query:
            pieces = []
            for piece in query.split("&"):
                name, eq, value = piece.partition("=")
                if eq and value and self.secret_key(unquote_plus(name)):
                    found.append(path + pointer("query", unquote_plus(name)))
                    piece = f"{name}={self.mask(unquote_plus(value))}"
                pieces.append(piece)
            query = "&".join(pieces)
        rebuilt = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        return self.text(rebuilt, path, found)

    def body(self, data: bytes, mime_type: str, path: str, found: list[str]) -> bytes:
        """A stored body (already decoded, possibly cut). Returns `data` itself when nothing was masked."""
        if not data:
            return data
        mime = mime_type.split(";", 1)[0].strip().lower()
        if "json" in mime or (not mime and data[:1] in (b"{", b"[")):
            out = self._json_body(data, path, found)
            if out is not None:
                return out
        if mime == "application/x-www-form-urlencoded":
            out = self._form_body(data, path, found)
            if out is not None:
                return out
        return self._text_body(data, path, found)

    def _json_body(self, data: bytes, path: str, found: list[str]) -> bytes | None:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if self._plain_json(data) and not self._any_secret_key(doc):
            return data
        before = len(found)
        try:
            new = self.value(doc, path, found)
        except RecursionError:
            del found[before:]
            return None
        if len(found) == before:
            return data
        return json.dumps(new, ensure_ascii=False).encode("utf-8")

    def _plain_json(self, data: bytes) -> bool:
        """True when no string inside the JSON document `data` can hold a credential format, judged on the raw
        bytes in one search instead of one per string.

        Sound because the keywords are made of letters, digits, `-`, `_`, `.` and spaces, none of which a JSON
        escape other than `\\uXXXX` produces: without `\\u` in the text, a keyword in a decoded string is
        a keyword in the bytes. The bytes must be UTF-8 (json.loads also reads UTF-16 and UTF-32), and custom
        patterns, which may match anything, must be absent.
        """
        return (not self._custom and b"\\u" not in data and json.detect_encoding(data) in ("utf-8", "utf-8-sig")
                and _KEYWORDS_BYTES.search(data) is None)

    def _any_secret_key(self, doc: Any) -> bool:
        """Whether any object key in the parsed document is secret-like: a walk that builds nothing (no copies,
        no paths), for the common body that has nothing to mask."""
        known = self._key_memo.get  # names seen before: one lookup, no method call (most keys, after warm-up)
        stack = [doc]
        while stack:
            node = stack.pop()
            if type(node) is dict:
                for k, v in node.items():
                    verdict = known(k)
                    if verdict or (verdict is None and self.secret_key(k)):
                        return True
                    if type(v) is dict or type(v) is list:
                        stack.append(v)
            elif type(node) is list:
                stack.extend(v for v in node if type(v) is dict or type(v) is list)
        return False

    def value(self, node: Any, path: str, found: list[str]) -> Any:
        """A parsed JSON value: secret-named keys masked, strings scanned. Returns a new value.

        Numbers under `/extra` are Bastion's own measurements (`time_to_first_token_s`, an error `code`), not
        credentials, so their names do not mask them; strings there are scanned like everywhere else. A numeric
        `code` anywhere is a status (JSON-RPC's `error.code`); an authorization code is a string."""
        # Paths are only built for containers and hits: most leaves are neither.
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            measured = path.startswith("/extra")
            for k, v in node.items():
                if self.secret_key(k) and not (v is None or v == "" or isinstance(v, bool) or (
                        isinstance(v, int | float) and (measured or k.lower() == "code"))):
                    found.append(path + pointer(k))
                    if isinstance(v, (dict, list)):
                        self._remember_leaves(v)
                    out[k] = self.mask(v if isinstance(v, str) else json.dumps(v, sort_keys=True))
                elif isinstance(v, str):
                    out[k] = new = self.scan(v)
                    if new != v:
                        found.append(path + pointer(k))
                elif isinstance(v, (dict, list)):
                    out[k] = self.value(v, path + pointer(k), found)
                else:
                    out[k] = v
            return out
        if isinstance(node, list):
            return [self.value(v, f"{path}/{i}", found) for i, v in enumerate(node)]
        if isinstance(node, str):
            return self.text(node, path, found)
        return node

    def _form_body(self, data: bytes, path: str, found: list[str]) -> bytes | None:
        try:
            pairs = parse_qsl(data.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return None
        before = len(found)
        out = []
        for name, value in pairs:
            where = path + pointer(name)
            if value and self.secret_key(name):
                found.append(where)
                value = self.mask(value)
            else:
                value = self.text(value, where, found)
            out.append((name, value))
        return data if len(found) == before else urlencode(out).encode("ascii")

    def _text_body(self, data: bytes, path: str, found: list[str]) -> bytes:
        text = data.decode("latin-1")
        masked = _JSON_PAIR.sub(self._json_pair, text)
        masked = self._cut_pair(masked)
        masked = self.scan(masked)
        if masked == text:
            return data
        found.append(path)
        # Masks are ASCII; Latin-1 maps every other character back to the byte it came from.
        return masked.encode("latin-1", "replace")

    def _cut_pair(self, text: str) -> str:
        """Mask the value of a secret-named pair the text ends inside (`..."password": "hunt` in a cut body)."""
        start = max(text.rfind("\n") + 1, len(text) - _TAIL_CHARS)  # a pair never spans a raw newline
        if text.find('"', start) >= 0:
            m = _JSON_TAIL.search(text, start)
            if m is not None and self.secret_key(m.group(1)):
                return text[: m.start(2)] + self.mask(m.group(2))
        return text

    def _json_pair(self, m: re.Match[str]) -> str:
        if not self.secret_key(m.group(1)):
            return m.group(0)
        start, end = m.span(2)
        base = m.start()
        return m.group(0)[: start - base] + self.mask(m.group(2)) + m.group(0)[end - base:]


# --- echoes ------------------------------------------------------------------------------------------------------

_PERCENT_HEX = re.compile(r"%[0-9A-F]{2}")
_PARTIAL_TRIES = 64


def echo_forms(secret: str) -> list[str]:
    """The strings an echo of `secret` may show: the value as masked (and, when that was still escaped or
    percent-encoded, decoded), each JSON-escaped (three styles), percent-encoded (upper and lower-case hex,
    `+` for spaces or not) and HTML-escaped, and the Latin-1 view of each form's UTF-8 bytes (how a text body
    is scanned). Every form is at least as long as the value it encodes."""
    bases = [secret]
    if "\\" in secret:  # masked inside JSON-ish text, still escaped
        with contextlib.suppress(ValueError):
            bases.append(json.loads(f'"{secret}"'))
    if "%" in secret:
        bases.append(unquote(secret))
    with contextlib.suppress(UnicodeError):  # a value from a text body is the Latin-1 view of its bytes
        bases.append(secret.encode("latin-1").decode("utf-8"))
    forms: dict[str, None] = {}
    for base in bases:
        if not ECHO_MIN <= len(base) <= ECHO_MAX:
            continue
        escaped = json.dumps(base, ensure_ascii=False)[1:-1]
        quoted = quote(base, safe="")
        for form in (base, escaped, json.dumps(base)[1:-1], escaped.replace("/", "\\/"), quoted,
                     _PERCENT_HEX.sub(lambda m: m.group(0).lower(), quoted), quote_plus(base, safe=""),
                     html.escape(base), html.escape(base, quote=False)):
            forms[form] = None
            forms[form.encode("utf-8", "surrogatepass").decode("latin-1")] = None
    return list(forms)


class Echoes:
    """Masks every occurrence, in one record, of the values its redactor masked elsewhere in the same exchange.

    Search: each form is looked for with `str.find` (CPython's two-way/Horspool search, a few GB/s). One regex
    alternation of the forms, even factored into a trie, measured 2 to 13 times slower on a 1 MiB body for 8
    to 512 forms: the backtracking engine tries the branches at every position. The work is bounded by
    `ECHO_MAX_FORMS` passes over each string (about 30 ms for a 1 MiB body at the bound), so a hostile
    exchange with thousands of secret-named fields costs no more. Masks carry the tag of the value they hide,
    so an echo reads like the original's mask; overlapping hits of different values merge into one mask.
    """

    def __init__(self, redactor: Redactor, secrets: Iterable[str]) -> None:
        self._redactor = redactor
        forms: dict[str, str] = {}
        for secret in secrets:
            new = [f for f in echo_forms(secret) if f not in forms]
            if len(forms) + len(new) > ECHO_MAX_FORMS:
                break
            forms.update(dict.fromkeys(new, secret))
        # Longest first: where two forms start at the same place, the longer one decides the mask.
        self._forms = sorted(forms.items(), key=lambda f: -len(f[0]))

    def _only(self, secrets: set[str]) -> Echoes:
        """The same search narrowed to `secrets` (those a whole-document search hit)."""
        narrowed = copy.copy(self)
        narrowed._forms = [(f, s) for f, s in self._forms if s in secrets]
        return narrowed

    @property
    def forms(self) -> list[str]:
        return [f for f, _ in self._forms]

    # --- search and replace ----------------------------------------------------------------------------------

    def _spans(self, text: str, *, cut: bool = False) -> list[tuple[int, int, str]]:
        spans: list[tuple[int, int, str]] = []
        for form, secret in self._forms:
            i = text.find(form)
            while i >= 0:
                spans.append((i, i + len(form), secret))
                i = text.find(form, i + len(form))
        if cut:
            tail = self._partial_tail(text)
            if tail is not None:
                spans.append(tail)
        return spans

    def _partial_tail(self, text: str) -> tuple[int, int, str] | None:
        """The longest start (`ECHO_PARTIAL_MIN` characters or more) of a form that `text` ends with: what is
        left of an echo a cut went through. Candidates are where the form's first characters occur in the
        last `len(form) - 1` characters, leftmost (longest) first, at most `_PARTIAL_TRIES` per form."""
        best: tuple[int, int, str] | None = None
        end = len(text)
        for form, secret in self._forms:
            anchor = form[:ECHO_PARTIAL_MIN]
            # Starts from `lo` to before `hi` (str.find's bound is where the anchor must end); once a partial
            # is found, only a longer one (starting earlier) can win.
            lo, hi = max(0, end - len(form) + 1), end - ECHO_PARTIAL_MIN + 1 if best is None else best[0]
            i = text.find(anchor, lo, hi + ECHO_PARTIAL_MIN - 1)
            for _ in range(_PARTIAL_TRIES):
                if i < 0:
                    break
                if text.startswith(form[: end - i], i):
                    best = (i, end, secret)
                    break
                i = text.find(anchor, i + 1, hi + ECHO_PARTIAL_MIN - 1)
        return best

    def _apply(self, text: str, spans: list[tuple[int, int, str]]) -> str:
        pieces: list[str] = []
        pos = 0
        current: tuple[int, int, str] | None = None
        for start, end, secret in sorted(spans, key=lambda s: (s[0], -s[1])):
            if current is not None and start < current[1]:
                current = (current[0], max(current[1], end), current[2])
                continue
            if current is not None:
                pieces += (text[pos:current[0]], self._redactor.mask(current[2]))
                pos = current[1]
            current = (start, end, secret)
        if current is not None:
            pieces += (text[pos:current[0]], self._redactor.mask(current[2]))
            pos = current[1]
        pieces.append(text[pos:])
        return "".join(pieces)

    def scrub(self, text: str) -> str:
        """`text` with every echo masked; `text` itself when there was none."""
        spans = self._spans(text)
        return self._apply(text, spans) if spans else text

    # --- record parts ----------------------------------------------------------------------------------------

    def text(self, value: str, path: str, found: list[str]) -> str:
        out = self.scrub(value)
        if out != value:
            found.append(path)
        return out

    def headers(self, headers: Sequence[Header], path: str, found: list[str]) -> list[Header]:
        return [(name, self.text(value, path + pointer(name.lower()), found)) for name, value in headers]

    def value(self, node: Any, path: str, found: list[str]) -> Any:
        """A parsed JSON value with echoes masked in strings, object keys and numbers. Returns a new value, or
        `node` itself when it holds no echo: its strings, keys and numbers are searched together first (as for
        JSON bodies), which costs far less than the walk a record's `extra` would otherwise take every time."""
        if isinstance(node, (dict, list)):
            hit = {secret for _, _, secret in self._spans("\x00".join(_json_strings(node)))}
            return self._only(hit)._value(node, path, found) if hit else node
        return self._value(node, path, found)

    def _value(self, node: Any, path: str, found: list[str]) -> Any:
        if isinstance(node, str):
            return self.text(node, path, found)
        if isinstance(node, list):
            return [self._value(v, f"{path}/{i}", found) for i, v in enumerate(node)]
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for k, v in node.items():
                key = self.scrub(k)
                if key != k:
                    while key in out or key in node:  # keep both when two keys mask alike
                        key += "~"
                    found.append(path + pointer(key))
                out[key] = self._value(v, path + pointer(key), found)
            return out
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            text = json.dumps(node)
            if self.scrub(text) != text:
                found.append(path)
                return self.scrub(text)
        return node

    def body(self, data: bytes, mime_type: str, path: str, found: list[str], *, cut: bool) -> bytes:
        """A stored body (decoded, already redacted) with echoes masked; `data` itself when there was none.

        JSON that parses is walked, so a mask never breaks it; anything else (and JSON where a hit crosses
        its structure) is masked as Latin-1 text, like `Redactor.body`. `cut`: the body may end inside an
        echo. The bytes are searched first: without a hit, and without a `\\u` escape that could hide one,
        nothing is parsed.
        """
        if not data:
            return data
        text = data.decode("latin-1")
        spans = self._spans(text, cut=cut)
        mime = mime_type.split(";", 1)[0].strip().lower()
        is_json = "json" in mime or (not mime and data[:1] in (b"{", b"["))
        if not spans and not (is_json and b"\\u" in data and self._spans(_unicode_unescaped(text))):
            return data
        if is_json and not cut:
            out = self._json_body(data, path, found)
            if out is not None:
                return out
        if not spans:
            return data
        found.append(path)
        return self._apply(text, spans).encode("latin-1")

    def _json_body(self, data: bytes, path: str, found: list[str]) -> bytes | None:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        # One search over every decoded string, then a walk looking only for the values that search hit:
        # the walk's cost no longer grows with the number of forms times the number of strings.
        hit = {secret for _, _, secret in self._spans("\x00".join(_json_strings(doc)))}
        before = len(found)
        out = data
        if hit:
            try:
                new = self._only(hit)._value(doc, path, found)
            except RecursionError:
                del found[before:]
                return None
            if len(found) > before:
                out = json.dumps(new, ensure_ascii=False).encode("utf-8", "surrogatepass")
        text = out.decode("latin-1")
        rest = self._spans(text)
        if rest:  # a hit across the document's structure (a number, a key and its value): mask the text
            found.append(path)
            out = self._apply(text, rest).encode("latin-1")
        return out


_U_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _unicode_unescaped(text: str) -> str:
    """JSON text with its `\\uXXXX` escapes decoded (surrogate pairs joined), to look for echoes an encoder
    hid that way. Rough (an escaped backslash before `u` is decoded too): a hit is only a reason to parse."""
    out = _U_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    with contextlib.suppress(UnicodeError):
        out = out.encode("utf-16", "surrogatepass").decode("utf-16")
    return out


def _json_strings(doc: Any) -> list[str]:
    """Every string, object key and number of a parsed JSON document (iteratively: any depth)."""
    out: list[str] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, dict):
            out.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out.append(_number_text(node))
    return out


def _number_text(number: int | float) -> str:
    """`json.dumps(number)`, without the encoder's per-call cost (this runs for every number of a record)."""
    if isinstance(number, int):
        return int.__repr__(number)
    if math.isfinite(number):
        return float.__repr__(number)
    return "NaN" if math.isnan(number) else "Infinity" if number > 0 else "-Infinity"
