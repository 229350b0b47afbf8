"""Which forward proxies an endpoint created through the API may name."""

from __future__ import annotations

from hookgate.config.schema import EgressConfig
from hookgate.transport.proxy import parse_proxy


def listed_proxy(proxy: str, egress: EgressConfig) -> str | None:
    """The proxy URL from the config (egress.proxies, or egress.proxy) that an API endpoint's `proxy`
    names, or None. It names one by the same host and port, with the same credentials or none (so
    the API never needs a proxy's password); raises ValueError if `proxy` is not a proxy URL."""
    wanted = parse_proxy(proxy)
    for listed in [*egress.proxies, *([egress.proxy] if egress.proxy else [])]:
        try:
            have = parse_proxy(listed)
        except ValueError:
            continue  # reported when the config loaded
        if (have.host, have.port) == (wanted.host, wanted.port) and wanted.authorization in (
            None,
            have.authorization,
        ):
            return listed
    return None


def proxy_address(url: str) -> str:
    """A proxy's host:port, to name it without its credentials ("?" if it is no proxy URL)."""
    try:
        return parse_proxy(url).address
    except ValueError:
        return "?"
