"""Endpoint URLs: `parse_url` validates one once and yields the `Target` the pool sends to.

The config loader and the API check endpoint URLs with `parse_url` too, so this module stays free
of the pool (and of trio).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from hookgate.transport.fields import FIELD_VALUE

if TYPE_CHECKING:
    import h11

__all__ = ["Key", "Target", "authority", "parse_url", "shown_url"]

Key = tuple[str, str, int]  # (scheme, host, port): the pool's key for its connections


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go, parsed and validated once (see `parse_url`) and reused for every request."""

    scheme: str  # "http" or "https"
    host: str  # to connect to (and for TLS SNI and verification): IDNA-encoded, IPv6 unbracketed
    port: int
    host_header: bytes  # the Host header: host, plus the port unless it is the scheme's default
    path: bytes  # the request target: path and query, percent-encoded
    key: Key = field(init=False, repr=False, compare=False)  # the pool's key for its connections
    # What `send` tells h11 about a request, by method: it is the same for every request.
    h11_events: dict[bytes, h11.Request] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.scheme, self.host, self.port))
        object.__setattr__(self, "h11_events", {})


_TARGET = re.compile(rb"[\x21-\x7e]+")  # a request target: visible ASCII, no spaces


_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#]*@")


def shown_url(url: str | httpx.URL) -> str:
    """A URL for a message: any credentials in it replaced with ***."""
    return _USERINFO.sub(r"\1***@", str(url))


def parse_url(url: str | httpx.URL) -> Target:
    """Parse an endpoint URL for `PooledTransport.send`; do it once per endpoint, not per request.

    Raises httpx.UnsupportedProtocol for a scheme other than http/https and httpx.InvalidURL for a
    URL without a host, with a port outside 1-65535, or one httpx cannot parse. Userinfo and any
    fragment are ignored. The config loader and the API check endpoint URLs with this, so a URL
    they accept is one the transport can send to.
    """
    parsed = httpx.URL(url)
    scheme = parsed.scheme
    if scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r} in {shown_url(url)!r}")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise httpx.InvalidURL(f"no host in {shown_url(url)!r}")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise httpx.InvalidURL(f"invalid port {parsed.port} in {shown_url(url)!r}")
    path, host_header = parsed.raw_path, parsed.netloc
    if not _TARGET.fullmatch(path) or not FIELD_VALUE.fullmatch(host_header):
        raise httpx.InvalidURL(f"cannot send a request to {shown_url(url)!r}")
    return Target(scheme, host, parsed.port or (443 if scheme == "https" else 80), host_header, path)


def authority(host: str, port: int) -> str:
    """host:port as in a URL or CONNECT request: IPv6 bracketed, an address's zone ID dropped (it
    means nothing on the proxy's host)."""
    host = host.partition("%")[0]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
