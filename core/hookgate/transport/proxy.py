"""Forward proxies: parsing a proxy URL (`parse_proxy`), and reaching a target through one.

https targets go through a ``CONNECT`` tunnel (TLS end to end with the target, inside it); http
targets are sent to the proxy as absolute-form requests (``POST http://host:port/path``). The
``resolve`` hook (the SSRF guard) vets every target before the proxy is contacted, and the proxy is
handed the vetted address, never the name, so its own DNS cannot steer a delivery elsewhere; SNI
and the Host header keep the name. The proxy's own address is not vetted.

The config loader checks proxy URLs with `parse_proxy`, so this module stays free of the pool.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import httpx
import trio

from hookgate.transport.tcp import CONNECTION_LOST, READ_SIZE, Resolver, why
from hookgate.transport.url import Key, authority, shown_url

__all__ = ["Proxy", "ProxyConnectError", "open_via_proxy", "parse_proxy", "refused_request"]


class ProxyConnectError(httpx.ConnectError, httpx.ProxyError):
    """The forward proxy could not be reached, or would not pass a request on (a CONNECT answered
    with a non-2xx status, or 407 to a plain-http request). A ConnectError, so callers treat it as
    a connect failure; a ProxyError, so they can tell it came from the proxy. Messages name the
    proxy by host:port only, never with its credentials."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """A forward proxy, parsed and validated by `parse_proxy`."""

    host: str  # IDNA-encoded, IPv6 unbracketed
    port: int
    # The Proxy-Authorization value ("Basic ..."), if the URL had credentials; kept out of repr.
    authorization: bytes | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """host:port, for messages: never the credentials."""
        return authority(self.host, self.port)

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Added to every request to the proxy: the CONNECT, or each absolute-form request."""
        return [] if self.authorization is None else [(b"Proxy-Authorization", self.authorization)]

    def auth_hint(self, status: int) -> str:
        """What a 407 from the proxy means, given whether its URL had credentials."""
        if status != 407:
            return ""
        if self.authorization is not None:
            return " (the proxy rejected the credentials in the proxy URL)"
        return " (the proxy requires credentials: http://user:password@host:port)"


def parse_proxy(url: str) -> Proxy:
    """Parse a forward proxy URL, ``http://[user:pass@]host[:port]`` (port 80 if omitted).

    Raises ValueError, with a message that never contains the credentials, for anything else:
    https:// proxies (TLS to the proxy itself) are not supported, nor are SOCKS proxies, nor a
    URL with a path, query or fragment. Percent-encoded credentials are decoded, then sent as
    ``Proxy-Authorization: Basic base64(user:pass)`` (UTF-8).
    """
    shown = shown_url(url)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        reason = "" if shown != url else f": {exc}"  # httpx may quote a character of a password
        raise ValueError(f"invalid proxy URL {shown!r}{reason}") from None
    if parsed.scheme == "https":
        raise ValueError(
            f"proxy {shown!r}: https:// proxies (TLS to the proxy) are not supported; use an http:// "
            "proxy URL (https deliveries through it are still encrypted end to end, via CONNECT)"
        )
    if parsed.scheme != "http":
        raise ValueError(f"proxy {shown!r}: unsupported scheme; expected http://[user:pass@]host:port")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise ValueError(f"proxy {shown!r}: no host; expected http://[user:pass@]host:port")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValueError(f"proxy {shown!r}: invalid port {parsed.port}")
    if parsed.raw_path not in (b"", b"/") or parsed.fragment:
        raise ValueError(f"proxy {shown!r}: a proxy URL has no path; expected http://[user:pass@]host:port")
    authorization = None
    if parsed.userinfo:
        credentials = f"{parsed.username}:{parsed.password}".encode()
        authorization = b"Basic " + base64.b64encode(credentials)
    return Proxy(host, parsed.port or 80, authorization)


def _status(code: int) -> str:
    # The standard phrase, not the proxy's: the message stays predictable and free of odd text.
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"status {code}"


def refused_request(proxy: Proxy, request: httpx.Request | None) -> ProxyConnectError:
    """The error for a 407 to a plain-http request through the proxy (only a proxy sends 407)."""
    msg = f"proxy {proxy.address} refused the request: {_status(407)}{proxy.auth_hint(407)}"
    return ProxyConnectError(msg, request=request)


async def open_via_proxy(
    proxy: Proxy, resolve: Resolver | None, key: Key, request: httpx.Request | None
) -> tuple[trio.SocketStream, bytes | None]:
    """Vet the target, connect to the proxy and, for https, open a tunnel to the target.

    Returns the socket to the proxy and, for http, the absolute-form prefix for its requests.
    The target is vetted (`resolve`) before the proxy is contacted, and the proxy is given the
    first vetted address rather than the name, so the proxy's DNS cannot pick another one.
    """
    scheme, host, port = key
    address = host  # no resolve hook: the proxy resolves the name, as proxies do
    if resolve is not None:
        try:
            addresses = await resolve(host, port)
        except OSError as exc:
            raise httpx.ConnectError(f"could not resolve {host}: {why(exc)}", request=request) from exc
        if not addresses:
            raise httpx.ConnectError(f"{host} resolved to no address", request=request)
        address = addresses[0]
    target = authority(address, port)
    try:
        sock = await trio.open_tcp_stream(proxy.host, proxy.port)
    except OSError as exc:
        msg = f"could not connect to proxy {proxy.address}: {why(exc)}"
        raise ProxyConnectError(msg, request=request) from exc
    if scheme == "http":
        return sock, b"http://" + target.encode("ascii")
    try:
        await _tunnel(proxy, sock, target, request)
    except BaseException:
        sock.socket.close()
        raise
    return sock, None


async def _tunnel(proxy: Proxy, sock: trio.SocketStream, target: str, request: httpx.Request | None) -> None:
    """Ask the proxy on `sock` for a tunnel to `target` (CONNECT); return once it is open."""
    raw = target.encode("ascii")
    h = h11.Connection(h11.CLIENT)
    connect = h11.Request(method=b"CONNECT", target=raw, headers=[(b"Host", raw), *proxy.headers])
    try:
        await sock.send_all(h.send(connect) + h.send(h11.EndOfMessage()))
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await sock.receive_some(READ_SIZE))
            elif type(event) is h11.Response:
                break
            elif type(event) is not h11.InformationalResponse:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
    except CONNECTION_LOST as exc:
        msg = f"proxy {proxy.address} failed while opening a tunnel to {target}: {exc!r}"
        raise ProxyConnectError(msg, request=request) from exc
    status = event.status_code
    if not 200 <= status < 300:
        msg = f"proxy {proxy.address} refused to open a tunnel to {target}: {_status(status)}"
        raise ProxyConnectError(msg + proxy.auth_hint(status), request=request)
    if h.trailing_data[0]:  # the target speaks after our TLS hello, never before
        msg = f"proxy {proxy.address} sent unexpected data after opening a tunnel to {target}"
        raise ProxyConnectError(msg, request=request)
