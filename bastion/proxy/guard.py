"""The network guard: where a request may go, checked after DNS and pinned so DNS cannot change it later.

0. Clients from public addresses may not use the proxy at all (`InboundGuard`).
1. CONNECT is accepted only to ports some allow/hold rule of the agent could match
   (`policy.connect_port_allowed`); anything else is refused at once (403), without a TLS handshake.
2. After the policy allowed a request, its host is resolved (asynchronously, with a timeout, cached
   briefly) and each address is judged: Bastion's own listeners and store/audit services are never
   reachable; special addresses (loopback, private, link-local, metadata, ...; see `netcheck`) only when the
   policy's `network.allow_private` lists them. The first acceptable address is *pinned*.
3. When mitmproxy opens the upstream connection (`server_connect`), it connects to the pinned address, while
   TLS SNI and the Host header keep the host name. A DNS answer that changes between check and connect (DNS
   rebinding) therefore cannot redirect the request. A connection nobody vetted is refused (fail closed).
4. Only HTTP leaves through Bastion: raw TCP/UDP/DNS tunnels (which would bypass every rule) are replaced by
   an HTTP layer, which rejects what is not HTTP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
import weakref
from collections.abc import Awaitable

from mitmproxy import connection, http
from mitmproxy.proxy import layer as mlayer
from mitmproxy.proxy import layers, server_hooks
from mitmproxy.proxy.layers.http import HTTPMode

from bastion.policy.engine import Policy
from bastion.policy.facts import RequestFacts, canonical_host
from bastion.proxy import flowmeta, responses
from bastion.proxy.netcheck import IPAddress, IPNetwork, ProtectedTargets, forbidden_kind, parse_ip

log = logging.getLogger("bastion.proxy")

_NOT_HTTP = (layers.TCPLayer, layers.UDPLayer, layers.DNSLayer, layers.RawQuicLayer)
_UNKNOWN: object = object()


class ResolveError(Exception):
    pass


class Resolver:
    """getaddrinfo off the event loop, with a timeout, a short cache and one lookup per name at a time.

    Caching is safe for the guard: a cached answer is re-judged on every use, and the connection goes to
    the address that was judged.
    """

    def __init__(self, *, ttl: float = 30.0, timeout: float = 5.0, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, tuple[IPAddress, ...]]] = {}
        self._inflight: dict[str, asyncio.Future[tuple[IPAddress, ...]]] = {}

    def cached(self, host: str) -> tuple[IPAddress, ...] | None:
        entry = self._cache.get(host)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    async def resolve(self, host: str) -> tuple[IPAddress, ...]:
        pending = self._inflight.get(host)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(host))
            self._inflight[host] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(host, None))
        return await asyncio.shield(pending)

    async def _lookup(self, host: str) -> tuple[IPAddress, ...]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), self.timeout)
        except TimeoutError:
            raise ResolveError(f"DNS lookup of {host} timed out after {self.timeout:g}s") from None
        except (OSError, UnicodeError) as e:
            raise ResolveError(f"cannot resolve {host}: {getattr(e, 'strerror', None) or e}") from None
        out: list[IPAddress] = []
        for info in infos:
            ip = parse_ip(str(info[4][0]))
            if ip is not None and ip not in out:
                out.append(ip)
        if not out:
            raise ResolveError(f"cannot resolve {host}: no addresses")
        if len(self._cache) >= self.max_entries:
            for key in list(self._cache)[: self.max_entries // 4]:
                del self._cache[key]
        result = tuple(out)
        self._cache[host] = (time.monotonic() + self.ttl, result)
        return result


class InboundGuard:
    """Pipeline stage: who may connect to the proxy. Loopback and private addresses (the host, the pod, the
    cluster) may; clients from public addresses are dropped, so a sidecar listening on 0.0.0.0 by mistake
    is not an open proxy (a pinned sidecar asks no credentials). Same rule as mitmproxy's `block_global`."""

    def client_connected(self, client: connection.Client) -> None:
        ip = parse_ip(str(client.peername[0]).split("%", 1)[0]) if client.peername else None
        if ip is None:
            return
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_loopback and ip.is_global:
            log.warning("refused a client connection from public address %s", ip)
            client.error = "Bastion: connections from public addresses are refused"


class NetworkGuard:
    """mitmproxy addon: CONNECT port check, destination check after DNS, address pinning, HTTP only."""

    def __init__(self, protected: ProtectedTargets, resolver: Resolver | None = None) -> None:
        self.protected = protected
        self.resolver = resolver or Resolver()
        # client connection -> {(host, port) as the flow names it: vetted IP}
        self._pins: weakref.WeakKeyDictionary[connection.Client, dict[tuple[str, int], str]] = (
            weakref.WeakKeyDictionary())
        self._connecting: weakref.WeakKeyDictionary[connection.Server, tuple[str, int]] = (
            weakref.WeakKeyDictionary())
        self._verdicts: dict[tuple[IPAddress, int], tuple[str, bool] | None] = {}
        self._verdict_allow: object = None
        # Client connections that opened a tunnel: a CONNECT arriving on one comes from inside the tunnel.
        self._tunnels: weakref.WeakSet[connection.Client] = weakref.WeakSet()

    # -- CONNECT --------------------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        meta = flow.metadata
        agent = meta.get(flowmeta.AGENT)
        policy: Policy = meta[flowmeta.POLICY]
        # CONNECT inside a tunnel would be forwarded verbatim. Only a CONNECT that was *answered 2xx* opens
        # one: a client may retry CONNECT on the same connection after a 407 (libcurl, hence git, does).
        if flow.client_conn in self._tunnels:
            responses.refuse(flow, 403, responses.DESTINATION_FORBIDDEN,
                             "CONNECT inside a tunnel is not allowed through Bastion.")
            return
        spec = policy.agents.get(agent) if agent is not None else None
        if spec is not None and spec.status == "retired":
            return  # refused inside the tunnel, where the agent can read why
        port = flow.request.port
        if agent is None or not policy.connect_port_allowed(agent, port):
            responses.refuse(flow, 403, responses.POLICY_DENIED,
                             f"No rule allows agent {agent} to connect to port {port}.")

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._tunnels.add(flow.client_conn)

    # -- after the policy decision --------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Judge the destination. Returns an awaitable only when DNS must be asked (the rest is synchronous,
        which keeps the common path free of task overhead)."""
        if flow.response is not None:
            return None
        meta = flow.metadata
        facts: RequestFacts | None = meta.get(flowmeta.FACTS)
        if facts is None:
            return None  # not decided: the gate refuses it
        label = self.protected.name_label(facts.host, facts.port)
        if label is not None:
            self._forbid_protected(flow, facts, label)
            return None
        ip = parse_ip(facts.host)
        if ip is not None:
            self._vet(flow, facts, (ip,))
            return None
        cached = self.resolver.cached(facts.host)
        if cached is not None:
            self._vet(flow, facts, cached)
            return None
        return self._resolve_and_vet(flow, facts)

    async def _resolve_and_vet(self, flow: http.HTTPFlow, facts: RequestFacts) -> None:
        try:
            addresses = await self.resolver.resolve(facts.host)
        except ResolveError as e:
            responses.refuse(flow, 502, responses.UPSTREAM_UNREACHABLE, f"{e}.")
            return
        if flow.response is None:
            self._vet(flow, facts, addresses)

    def _vet(self, flow: http.HTTPFlow, facts: RequestFacts, addresses: tuple[IPAddress, ...]) -> None:
        allow = flow.metadata[flowmeta.POLICY].network_allow_private
        refusal: tuple[IPAddress, str, bool] | None = None
        for ip in addresses:
            verdict = self._verdict(ip, facts.port, allow)
            if verdict is None:
                self._pin(flow, str(ip))
                return
            refusal = refusal or (ip, *verdict)
        assert refusal is not None
        ip, why, protected = refusal
        if protected:
            self._forbid_protected(flow, facts, why)
            return
        shown = facts.host if facts.host == str(ip) else f"{facts.host} ({ip})"
        responses.refuse(flow, 403, responses.DESTINATION_FORBIDDEN,
                         f"{shown} is a {why} address; agents may reach it only if the rules list it under "
                         "network.allow_private.")

    def _verdict(self, ip: IPAddress, port: int, allow: tuple[IPNetwork, ...]) -> tuple[str, bool] | None:
        """(reason, is-protected) if `ip:port` is off limits, else None. Memoized per allow list: the checks
        walk several networks each, and agents call the same few hosts over and over."""
        if allow is not self._verdict_allow:
            self._verdicts.clear()
            self._verdict_allow = allow
        key = (ip, port)
        verdict = self._verdicts.get(key, _UNKNOWN)
        if verdict is _UNKNOWN:
            label = self.protected.address_label(ip, port)
            if label is not None:
                verdict = (label, True)
            else:
                kind = forbidden_kind(ip, allow)
                verdict = None if kind is None else (kind, False)
            if len(self._verdicts) >= 65536:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict  # type: ignore[return-value]

    def forget_verdicts(self) -> None:
        """Call after changing `protected`."""
        self._verdicts.clear()

    @staticmethod
    def _forbid_protected(flow: http.HTTPFlow, facts: RequestFacts, label: str) -> None:
        responses.refuse(flow, 403, responses.DESTINATION_FORBIDDEN,
                         f"{facts.host}:{facts.port} is {label}, which agents can never reach through the proxy.")

    def _pin(self, flow: http.HTTPFlow, ip: str) -> None:
        req = flow.request
        pins = self._pins.get(flow.client_conn)
        if pins is None:
            pins = self._pins[flow.client_conn] = {}
        pins[(req.host, req.port)] = ip
        flow.metadata[flowmeta.UPSTREAM_ADDRESS] = (ip, req.port)

    # -- the upstream connection ----------------------------------------------------------------------------

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        address = server.address
        pins = self._pins.get(data.client)
        ip = pins.get(address) if pins is not None and address is not None else None
        if ip is None or address is None:
            log.error("refusing an upstream connection to %s that no request vetted", address)
            server.error = "Bastion: upstream address was not vetted"
            return
        if server.sni is not None:  # TLS names the host the rules saw, never what the client hello claimed
            try:
                server.sni = canonical_host(address[0])
            except ValueError:
                server.error = "Bastion: bad upstream host name"
                return
        self._connecting[server] = address
        server.address = (ip, address[1])

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore(data.server)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore(data.server)

    def _restore(self, server: connection.Server) -> None:
        """Give the connection its host name back, so mitmproxy reuses it for later requests to that host.

        This is the state mitmproxy itself keeps for a connection it resolved: `address` the (host, port)
        asked for, `peername` the IP actually connected to. `Server.__setattr__` refuses any change of
        `address` once the connection is open, so the name is put back beneath that guard.
        """
        address = self._connecting.pop(server, None)
        if address is not None:
            object.__setattr__(server, "address", address)

    # -- HTTP only ------------------------------------------------------------------------------------------

    def next_layer(self, nextlayer: mlayer.NextLayer) -> None:
        if isinstance(nextlayer.layer, _NOT_HTTP):
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)

    def tcp_start(self, flow: object) -> None:
        kill = getattr(flow, "kill", None)
        if kill is not None:
            kill()

    udp_start = tcp_start
