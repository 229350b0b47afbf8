"""The egress SSRF guard: refuse deliveries to internal addresses, after DNS resolution.

``EgressGuard.resolve`` is the ``resolve`` callable of ``PooledTransport``: it resolves the host
once, drops every refused address and returns the rest, and the transport connects to exactly
those addresses (keeping the hostname for SNI and Host). A second lookup never happens, so a name
that re-resolves to an internal address later (DNS rebinding) cannot slip past the check.

Refused unless inside one of ``egress.allow_networks`` (first match in ``_REFUSED`` wins):

IPv4: 0.0.0.0/8 unspecified; 127.0.0.0/8 loopback; 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16
private; 169.254.0.0/16 link-local (cloud metadata); 224.0.0.0/4 multicast; 100.64.0.0/10 shared
(CGNAT); 192.0.0.0/24 IETF protocol assignments, 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24
documentation, 198.18.0.0/15 benchmarking, 240.0.0.0/4 reserved; 255.255.255.255 broadcast.

IPv6: :: unspecified; ::1 loopback; fc00::/7 unique-local and fec0::/10 site-local (private);
fe80::/10 link-local; ff00::/8 multicast; 100::/64 discard, 2001:db8::/32 and 3fff::/20
documentation, 2001:2::/48 benchmarking; and everything outside global unicast 2000::/3.
IPv4 embedded in IPv6 is judged as that IPv4 address: IPv4-mapped ::ffff:0:0/96, NAT64
64:ff9b::/96, 6to4 2002::/16 and the Teredo client address in 2001::/32.

The table is explicit rather than built on ``ipaddress``'s ``is_private``/``is_reserved``, whose
meaning changed between Python versions and which treat all of ::ffff:0:0/96 as private and all
of ::/8 (hence NAT64 to public addresses) as reserved.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import httpx
import trio

from hookgate.transport.url import Target, parse_url, shown_url

__all__ = ["EgressGuard", "SsrfRefused"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LINK_LOCAL = "a link-local address (where cloud metadata services live)"
# (network, category, description): what makes an address unsafe to deliver to.
_REFUSED: list[tuple[IPNetwork, str, str]] = [
    (ipaddress.ip_network(net), category, description)
    for net, category, description in [
        ("0.0.0.0/8", "unspecified", "an unspecified ('this network') address"),
        ("127.0.0.0/8", "loopback", "a loopback address"),
        ("10.0.0.0/8", "private", "a private (RFC 1918) address"),
        ("172.16.0.0/12", "private", "a private (RFC 1918) address"),
        ("192.168.0.0/16", "private", "a private (RFC 1918) address"),
        ("169.254.0.0/16", "link-local", _LINK_LOCAL),
        ("224.0.0.0/4", "multicast", "a multicast address"),
        ("100.64.0.0/10", "shared", "a shared (carrier-grade NAT) address"),
        ("192.0.0.0/24", "reserved", "a reserved (IETF protocol assignment) address"),
        ("192.0.2.0/24", "reserved", "a reserved (documentation) address"),
        ("198.51.100.0/24", "reserved", "a reserved (documentation) address"),
        ("203.0.113.0/24", "reserved", "a reserved (documentation) address"),
        ("198.18.0.0/15", "reserved", "a reserved (benchmarking) address"),
        ("255.255.255.255/32", "broadcast", "the broadcast address"),
        ("240.0.0.0/4", "reserved", "a reserved address"),
        ("::/128", "unspecified", "the unspecified address"),
        ("::1/128", "loopback", "a loopback address"),
        ("fc00::/7", "private", "a private (unique local) address"),
        ("fec0::/10", "private", "a private (site-local) address"),
        ("fe80::/10", "link-local", _LINK_LOCAL),
        ("ff00::/8", "multicast", "a multicast address"),
        ("100::/64", "reserved", "a reserved (discard-only) address"),
        ("2001:db8::/32", "reserved", "a reserved (documentation) address"),
        ("3fff::/20", "reserved", "a reserved (documentation) address"),
        ("2001:2::/48", "reserved", "a reserved (benchmarking) address"),
    ]
]
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class SsrfRefused(Exception):
    """A delivery target that the SSRF guard refuses; a permanent failure, never worth retrying."""

    def __init__(self, message: str, *, host: str = "", address: str = "", category: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.address = address  # the refused address, or "" for a refused URL scheme
        self.category = category  # loopback, private, link-local, ..., or "scheme"


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address a packet to `ip` really goes to, for the IPv6 forms that embed one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip.teredo is not None:
        return ip.teredo[1], "Teredo"
    return None


def _classify(ip: IPAddress) -> tuple[str, str] | None:
    """(category, description) if `ip` must be refused, None if it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_v4(ip)
        if embedded is not None:
            v4, form = embedded
            found = _classify(v4)
            if found is not None:
                return found[0], f"{found[1]} ({v4}, {form})"
            if form in ("IPv4-mapped", "NAT64"):  # outside 2000::/3 but judged by their IPv4 part
                return None
    for network, category, description in _REFUSED:
        if ip in network:
            return category, description
    if ip.version == 6 and ip not in _GLOBAL_UNICAST_V6:
        return "reserved", "a reserved address (not IPv6 global unicast)"
    return None


def _parse_network(cidr: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(cidr)
    except ValueError as exc:
        problem = f"egress.allow_networks: {cidr!r} is not a valid CIDR network ({exc})"
    with contextlib.suppress(ValueError):  # host bits set: suggest the network meant
        problem += f"; did you mean {ipaddress.ip_network(cidr, strict=False)}?"
    raise ValueError(problem)


def _literal(host: str) -> list[IPAddress] | None:
    """The addresses `host` denotes if it is a numeric address in any form the resolver accepts
    (``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``[::1]``, ``fe80::1%eth0``), else None. No DNS."""
    host = host.removeprefix("[").removesuffix("]")
    try:
        return [ipaddress.ip_address(host.partition("%")[0])]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


class EgressGuard:
    """Decides which delivery targets are allowed; `resolve` plugs into `PooledTransport(resolve=...)`.

    `allow_networks` (CIDR strings, IPv4 or IPv6) opens refused ranges on purpose; `https_only`
    refuses plain-http URLs (checked by `check_url`, since the resolver never sees the scheme).
    """

    def __init__(self, allow_networks: Iterable[str] = (), *, https_only: bool = False) -> None:
        self.allow_networks = [_parse_network(cidr) for cidr in allow_networks]
        self.https_only = https_only

    def refusal(self, ip: IPAddress) -> tuple[str, str] | None:
        """(category, description) if the guard refuses `ip`, None if it may be connected to."""
        found = _classify(ip)
        if found is None:
            return None
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_v4(ip)) is not None:
            candidates.append(embedded[0])  # allowing 127.0.0.0/8 also allows ::ffff:127.0.0.1
        if any(c in net for c in candidates for net in self.allow_networks):
            return None
        return found

    def check_url(self, url: str) -> Target:
        """Refuse (SsrfRefused) a URL by its scheme or by a literal-IP host; names are left to
        `resolve`. Cheap and synchronous: usable at config load and before every attempt.

        The URL is parsed by the transport's own parser (`parse_url`), whose result is returned: a
        URL it cannot send to raises ValueError here, not later in the transport."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"invalid URL {shown_url(url)!r}: {exc}") from None
        host = parsed.host
        if parsed.scheme not in ("http", "https"):
            msg = f"refused {shown_url(url)}: only http and https URLs can be delivered to"
            raise SsrfRefused(msg, host=host, category="scheme")
        if self.https_only and parsed.scheme != "https":
            msg = f"refused {shown_url(url)}: egress.https_only allows only https URLs"
            raise SsrfRefused(msg, host=host, category="scheme")
        try:
            target = parse_url(parsed)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise ValueError(f"invalid URL: {exc}") from None
        self._check_literal(host)
        return target

    async def resolve(self, host: str, port: int) -> list[str]:
        """Resolve `host` (A and AAAA) and return the addresses that may be connected to, in the
        resolver's order; raise SsrfRefused if none may. A literal IP skips DNS. Lookup failures
        stay OSError (the transport reports them as connect errors, worth retrying)."""
        self._check_literal(host)
        bare = host.removeprefix("[").removesuffix("]")
        infos = await trio.socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)
        return self._allowed(host, infos)

    def vet_url(self, url: str) -> None:
        """`check_url`, then resolve the host here and now as a delivery would, blocking: for
        `hookgate check`, which warns of endpoints every delivery to would be refused. Raises
        SsrfRefused, ValueError for a URL that does not parse, OSError if the name does not
        resolve from this host."""
        self.check_url(url)
        parsed = httpx.URL(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        infos = socket.getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
        self._allowed(parsed.host, infos)

    def _allowed(self, host: str, infos: Sequence[tuple[Any, ...]]) -> list[str]:
        """The addresses of a getaddrinfo answer that may be connected to; SsrfRefused if none."""
        allowed: list[str] = []
        refused: list[tuple[str, tuple[str, str]]] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = str(sockaddr[0])
            scope = sockaddr[3] if len(sockaddr) == 4 else 0
            if scope and "%" not in address:
                address += f"%{scope}"  # keep the scope of a link-local address
            why = self.refusal(ipaddress.ip_address(address))
            if why is not None:
                refused.append((address, why))
            elif address not in allowed:
                allowed.append(address)
        if allowed:
            return allowed
        if not refused:
            raise OSError(f"{host} resolved to no IPv4 or IPv6 address")
        address, (category, description) = refused[0]
        others = sorted({a for a, _ in refused} - {address})
        also = f" (also refused: {', '.join(others)})" if others else ""
        raise SsrfRefused(
            f"refused to connect to {host}: it resolves to {address}, which is {description}{also}; "
            f"add it to egress.allow_networks to allow it",
            host=host,
            address=address,
            category=category,
        )

    def _check_literal(self, host: str) -> None:
        for ip in _literal(host) or []:
            why = self.refusal(ip)
            if why is not None:
                category, description = why
                what = "it is" if str(ip) == host else f"it is {ip},"
                raise SsrfRefused(
                    f"refused to connect to {host}: {what} {description}; "
                    f"add it to egress.allow_networks to allow it",
                    host=host,
                    address=str(ip),
                    category=category,
                )
