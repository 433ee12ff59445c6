"""Which IP addresses an agent may reach: pure functions, no I/O except `local_addresses()`.

An address is *special* when it is not globally routable: loopback, RFC 1918 private, link-local (cloud
metadata at 169.254.169.254 included), CGNAT 100.64.0.0/10, unspecified, multicast, reserved, documentation,
unique-local IPv6 (fd00:ec2::254, the AWS IPv6 metadata endpoint, included). IPv6 forms that carry an IPv4
address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, 6to4 `2002:AABB:CCDD::`, Teredo, NAT64
`64:ff9b::/96`) are judged by the IPv4 address inside as well, so `::ffff:127.0.0.1` is loopback.

Special addresses are refused unless the policy lists them under `network.allow_private`. Bastion's own
listeners and its store/audit services are refused regardless (`ProtectedTargets`).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})


def parse_ip(text: str) -> IPAddress | None:
    """An IP literal (IPv6 without brackets, optional %scope) -> address; None for a host name."""
    if not text or not (text[0].isdigit() or ":" in text):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, for the transition formats that route to one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    packed = ip.packed
    if ip in _NAT64 or (packed[:12] == bytes(12) and int.from_bytes(packed[12:], "big") > 1):
        return ipaddress.IPv4Address(packed[12:])  # NAT64 well-known prefix, or IPv4-compatible ::a.b.c.d
    return None


def special_kind(ip: IPAddress) -> str | None:
    """Why `ip` is not an ordinary public address, or None if it is one."""
    if ip in _METADATA:
        return "cloud metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "carrier-grade NAT"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def _allowed(ip: IPAddress, allow: Iterable[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in allow)


def forbidden_kind(ip: IPAddress, allow: Iterable[IPNetwork]) -> str | None:
    """The reason an agent may not reach `ip` under `allow` (the policy's network.allow_private), or None.

    An IPv6 address carrying an IPv4 address is judged by the IPv4 address it routes to (and named that way
    in the reason), so allowing 127.0.0.0/8 also allows ::ffff:127.0.0.1, and 10/8 stays private in any form.
    """
    allow = tuple(allow)
    if _allowed(ip, allow):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            if _allowed(inner, allow):
                return None
            inner_kind = special_kind(inner)
            return None if inner_kind is None else f"{inner_kind} ({inner} embedded in IPv6)"
    return special_kind(ip)


def normalize(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 -> IPv4, and drop any %scope, so one address has one form in sets."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


@dataclass
class ProtectedTargets:
    """Bastion's own listeners and its store/audit services: never reachable through the proxy.

    `local_ports` are the admin and proxy ports, and the ports of store/audit services that run on this host:
    each is refused on every address of this host (any loopback address, the unspecified address, which
    Linux connects to this host, the host's own interface addresses, and every IPv6 form that carries one of
    them). `pairs` are the resolved addresses of services elsewhere, `names` their host names (checked before
    DNS, so a changed record does not open them up).
    """

    local_ports: set[int] = field(default_factory=set)
    local_ips: set[IPAddress] = field(default_factory=set)
    pairs: dict[tuple[IPAddress, int], str] = field(default_factory=dict)
    names: dict[tuple[str, int], str] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)

    def add_local(self, port: int, label: str, bind_host: str | None = None) -> None:
        self.local_ports.add(port)
        self.labels.setdefault(port, label)
        if bind_host:
            ip = parse_ip(bind_host)
            if ip is not None:
                self.local_ips.add(normalize(ip))

    def add_service(self, host: str, port: int, label: str, addresses: Iterable[IPAddress]) -> None:
        """A store/audit service. One on this host is protected on every local address form, whatever the
        address it was configured with: Redis on 127.0.0.1 answers on 0.0.0.0 and often on [::1] too."""
        self.names[(host.lower().rstrip("."), port)] = label
        for ip in addresses:
            ip = normalize(ip)
            if self._is_local(ip):
                self.local_ports.add(port)
                self.labels.setdefault(port, label)
            self.pairs[(ip, port)] = label

    def name_label(self, host: str, port: int) -> str | None:
        return self.names.get((host, port))

    def address_label(self, ip: IPAddress, port: int) -> str | None:
        ip = normalize(ip)
        inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        if port in self.local_ports and (self._is_local(ip) or (inner is not None and self._is_local(inner))):
            return self.labels[port]
        label = self.pairs.get((ip, port))
        if label is None and inner is not None:
            label = self.pairs.get((inner, port))
        return label

    def _is_local(self, ip: IPAddress) -> bool:
        return ip.is_loopback or ip.is_unspecified or ip in self.local_ips


def local_addresses() -> set[IPAddress]:
    """This host's own interface addresses (blocking: call from a thread). Linux reads /proc; elsewhere the
    addresses the host name resolves to. Loopback and unspecified addresses are covered separately."""
    found: set[IPAddress] = set()
    try:
        last = None
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("|--", "+--")):
                last = stripped[3:].strip().split("/")[0]
            elif "/32 host LOCAL" in stripped and last:
                ip = parse_ip(last)
                if ip is not None:
                    found.add(ip)
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexaddr = line.split()[0]
            found.add(ipaddress.IPv6Address(int(hexaddr, 16)))
    except (OSError, ValueError, IndexError):
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM):
            ip = parse_ip(str(info[4][0]))
            if ip is not None:
                found.add(normalize(ip))
    except (OSError, UnicodeError):
        pass
    return found
