"""`auth: [{type: ip_allow}]`: only callers from listed networks (IPv4 and IPv6 CIDRs).

    sources:
      github:
        auth:
          - type: ip_allow
            networks: [192.30.252.0/22, 185.199.108.0/22, "2a0a:a440::/29"]
            trusted_proxies: [10.0.0.0/8]       # optional: load balancers in front of hookgate

The client is the peer address of the connection. Only when the peer is a trusted proxy is
`X-Forwarded-For` read: from the right, skipping trusted proxies, the first address that is not
one is the client. A header sent by anyone else is ignored, so it cannot be spoofed; a header a
trusted proxy passed on that holds something other than addresses is refused (403), as is a
client outside `networks`. An IPv4-mapped IPv6 peer (`::ffff:192.0.2.1`) counts as its IPv4
address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Annotated

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.types import ComponentRegistry, IngressRequest, Rejection

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _at(path: str, message: str) -> ValueError:
    """A ValueError the config loader reports at `<rule path><path>` (msgspec's own suffix)."""
    return ValueError(f"{message} - at `${path}`")


def parse_networks(values: Sequence[str], key: str) -> list[Network]:
    networks: list[Network] = []
    for i, value in enumerate(values):
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError:
            hint = ""
            try:
                loose = ipaddress.ip_network(value.strip(), strict=False)
                hint = f" (host bits are set: did you mean {loose}?)"
            except ValueError:
                pass
            raise _at(
                f".{key}[{i}]",
                f'expected a network like "10.0.0.0/8" or "2001:db8::/32", got "{value}"{hint}',
            ) from None
    return networks


class IpAllowConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    networks: Annotated[list[str], msgspec.Meta(min_length=1)]
    trusted_proxies: list[str] = []

    def __post_init__(self) -> None:
        parse_networks(self.networks, "networks")
        parse_networks(self.trusted_proxies, "trusted_proxies")


def parse_address(value: str) -> Address | None:
    """An IP address, IPv4-mapped IPv6 as IPv4; None for anything else."""
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


class IpAllowRule:
    def __init__(self, config: IpAllowConfig):
        self.networks = parse_networks(config.networks, "networks")
        self.trusted = parse_networks(config.trusted_proxies, "trusted_proxies")

    def client_address(self, request: IngressRequest) -> Address | None:
        """The client as the trusted proxies saw it; None if it cannot be known."""
        address = parse_address(request.client) if request.client else None
        if address is None or not _within(address, self.trusted):
            return address
        # Several X-Forwarded-For headers are one list, in order (RFC 9110, 5.3).
        forwarded = ",".join(v for k, v in request.headers if k.lower() == "x-forwarded-for")
        hops = [hop.strip() for hop in forwarded.split(",")]
        for hop in reversed([h for h in hops if h]):  # empty list elements are ignored
            address = parse_address(hop)
            if address is None or not _within(address, self.trusted):
                return address
        return address  # every hop is a trusted proxy: the leftmost one is the client

    def check(self, request: IngressRequest) -> Rejection | None:
        address = self.client_address(request)
        if address is None:
            return _forbidden("the client address is unknown or malformed")
        if not _within(address, self.networks):
            return _forbidden(f"the client address {address} is not allowed")
        return None


def _forbidden(message: str) -> Rejection:
    return Rejection(status=403, code="forbidden", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_access_rule("ip_allow", IpAllowConfig, IpAllowRule)
