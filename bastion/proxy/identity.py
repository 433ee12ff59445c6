"""Agent identity: who is calling, from the authenticated proxy connection only, never from headers.

An agent sends `Proxy-Authorization: Basic base64(name:token)`, which every common client does on its own
when the proxy URL is `http://name:token@host:port`. HTTPS goes through a CONNECT tunnel: the credentials
arrive once, on the CONNECT, and bind to that client connection (`WeakKeyDictionary` keyed by the mitmproxy
`Client`, so nothing leaks when the connection goes). Plain HTTP requests carry the header each time.

A sidecar started with `--agent NAME` is pinned: every connection is that agent, with or without credentials.

Each request re-checks its connection's identity against the policy it is evaluated with, so a token rotated
or an agent retired by a reload takes effect on open tunnels too. `Proxy-Authorization`, `Proxy-Connection`
and every `X-Bastion-*` header are removed before anything else looks at the request: upstream never sees
the agent's token, and no header an agent sets can claim to come from Bastion.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import time
import weakref
from dataclasses import dataclass

from mitmproxy import connection, http

from bastion.ids import new_request_id
from bastion.policy.engine import AgentSpec, Policy
from bastion.proxy import flowmeta, responses
from bastion.proxy.state import PolicyState

PROXY_AUTHENTICATE = {"Proxy-Authenticate": 'Basic realm="bastion"'}


def parse_basic(value: str) -> tuple[str, str] | None:
    """`Basic base64(name:token)` -> (name, token); None for anything else. Tokens may contain ':'."""
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    name, sep, token = text.partition(":")
    if not sep or not name:
        return None
    return name, token


@dataclass(slots=True)
class _Verified:
    """One verified credential: the raw header (fast path for repeats), the parsed pair, and which policy
    object verified it (a reload invalidates it)."""

    header: str
    name: str
    token: str
    policy: Policy
    spec: AgentSpec


class MalformedHeaders(ValueError):
    """A request whose header block a lenient upstream (or Bastion itself) could read two ways."""


_LINE_BREAKING = re.compile(rb"[\r\n\x00]")


def strip_private_headers(headers: http.Headers) -> str | None:
    """Remove `Proxy-Authorization`, `Proxy-Connection` and `X-Bastion-*`; return the Proxy-Authorization
    value if there was one. Allocates only when something is removed (the common tunnel case has none).

    Raises `MalformedHeaders` for a CR, LF or NUL in a header name or value (a bare CR is a line break to
    some upstreams, which would then read headers injected after this stripping, such as a forged
    `X-Bastion-Agent`) and for two `Proxy-Authorization` headers (which one names the agent?)."""
    fields = headers.fields
    auth: str | None = None
    keep: list[tuple[bytes, bytes]] | None = None
    search = _LINE_BREAKING.search
    for i, (name, value) in enumerate(fields):
        if search(value) is not None or search(name) is not None:
            raise MalformedHeaders(f"header {name.decode('latin-1')[:64]!r} contains a CR, LF or NUL character")
        lname = name.lower()
        if lname == b"proxy-authorization" or lname == b"proxy-connection" or lname.startswith(b"x-bastion-"):
            if keep is None:
                keep = list(fields[:i])
            if lname == b"proxy-authorization":
                if auth is not None:
                    raise MalformedHeaders("the request has more than one Proxy-Authorization header")
                auth = value.decode("latin-1")
        elif keep is not None:
            keep.append((name, value))
    if keep is not None:
        headers.fields = tuple(keep)
    return auth


class Identity:
    """mitmproxy addon: authenticates CONNECT tunnels and plain requests, sets `flow.metadata[AGENT]`."""

    def __init__(self, state: PolicyState, pinned: str | None = None) -> None:
        self._state = state
        self._pinned = pinned
        self._tunnels: weakref.WeakKeyDictionary[connection.Client, _Verified] = weakref.WeakKeyDictionary()
        self._plain: weakref.WeakKeyDictionary[connection.Client, _Verified] = weakref.WeakKeyDictionary()

    # -- hooks ----------------------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        if flow.response is not None:  # a stage before failed and answered: that answer, and its id, stand
            self._answered(flow)
            return
        meta[flowmeta.REQUEST_ID] = new_request_id()
        policy = meta[flowmeta.POLICY] = self._state.policy
        auths = flow.request.headers.get_all("proxy-authorization")
        if len(auths) > 1:
            responses.refuse(flow, 400, responses.BAD_REQUEST,
                             "Malformed request: the CONNECT has more than one Proxy-Authorization header.")
            return
        header = auths[0] if auths else None
        if self._pinned is not None:
            meta[flowmeta.AGENT] = self._pinned
            return
        verified = self._verify(header, policy, None)
        if verified is None:
            self._auth_required(flow, "no" if header is None else "invalid")
            return
        # A retired agent still gets its tunnel: the refusal inside it is readable, one at CONNECT is not.
        self._tunnels[flow.client_conn] = verified
        meta[flowmeta.AGENT] = verified.name

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        meta[flowmeta.STARTED] = time.monotonic()
        if flow.response is not None:  # a stage before failed and answered: that answer, and its id, stand
            self._answered(flow)
            return
        meta[flowmeta.REQUEST_ID] = new_request_id()
        policy = meta[flowmeta.POLICY] = self._state.policy
        try:
            header = strip_private_headers(flow.request.headers)
        except MalformedHeaders as e:
            if self._pinned is not None:
                meta[flowmeta.AGENT] = self._pinned
            responses.refuse(flow, 400, responses.BAD_REQUEST, f"Malformed request: {e}.",
                             headers={"connection": "close"})
            return
        if self._pinned is not None:
            self._admit(flow, policy.agents.get(self._pinned), self._pinned)
            return
        client = flow.client_conn
        tunnel = self._tunnels.get(client)
        if tunnel is not None and header is None:  # the usual case inside a CONNECT tunnel
            if tunnel.policy is not policy:  # a reload happened: the tunnel's credentials must still hold
                fresh = self._verify(tunnel.header, policy, None)
                if fresh is None:
                    self._tunnels.pop(client, None)
                    self._auth_required(flow, "revoked")
                    return
                self._tunnels[client] = tunnel = fresh
            self._admit(flow, tunnel.spec, tunnel.name)
            return
        if header is None:
            self._auth_required(flow, "no")
            return
        verified = self._verify(header, policy, self._plain.get(client))
        if verified is None:
            self._auth_required(flow, "invalid")
            return
        self._plain[client] = verified
        self._admit(flow, verified.spec, verified.name)

    # -- helpers --------------------------------------------------------------------------------------------

    def _answered(self, flow: http.HTTPFlow) -> None:
        """Keep what the record of an answered flow needs (the policy: its redaction settings), decide nothing."""
        meta = flow.metadata
        if flowmeta.REQUEST_ID not in meta:
            meta[flowmeta.REQUEST_ID] = new_request_id()
        if flowmeta.POLICY not in meta:
            meta[flowmeta.POLICY] = self._state.policy

    @staticmethod
    def _verify(header: str | None, policy: Policy, cached: _Verified | None) -> _Verified | None:
        if header is None:
            return None
        if cached is not None and cached.policy is policy and hmac.compare_digest(
                cached.header.encode("utf-8", "surrogateescape"), header.encode("utf-8", "surrogateescape")):
            return cached  # same connection, same credentials, same policy: verified already
        creds = parse_basic(header)
        if creds is None:
            return None
        spec = policy.authenticate_agent(*creds)
        if spec is None:
            return None
        return _Verified(header, creds[0], creds[1], policy, spec)

    @staticmethod
    def _admit(flow: http.HTTPFlow, spec: AgentSpec | None, name: str) -> None:
        flow.metadata[flowmeta.AGENT] = name
        if spec is not None and spec.status == "retired":
            responses.refuse(flow, 403, responses.AGENT_RETIRED,
                             f"Agent {name!r} is retired: Bastion no longer forwards its calls.")

    @staticmethod
    def _auth_required(flow: http.HTTPFlow, why: str) -> None:
        message = {
            "no": "Proxy authentication required: use the proxy URL http://AGENT:TOKEN@host:port.",
            "invalid": "Proxy authentication failed: unknown agent or wrong token.",
            "revoked": "Proxy authentication no longer valid: the rules changed this agent's credentials.",
        }[why]
        responses.refuse(flow, 407, responses.PROXY_AUTH_REQUIRED, message, headers=PROXY_AUTHENTICATE)
