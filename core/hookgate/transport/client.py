"""A small per-endpoint HTTP/1.1 connection pool over trio + h11.

httpx's default httpcore pool contends badly on trio under concurrency (roughly a tenth of
the throughput of a bare trio+h11 client), so egress uses this transport instead. Two ways in,
sharing one pool and one request/response exchange:

- ``PooledTransport.send(target, headers, body, timeout)``, the gateway's hot path: the URL is
  parsed once per endpoint (``parse_url``), headers are plain ``(str, str)`` pairs, one timeout
  covers the whole exchange, and the result is a small ``RawResponse``. No httpx objects are
  built, yet errors are the httpx exception types (with no ``.request`` attached).
- ``handle_async_request``: it is an ``httpx.AsyncBaseTransport``, usable via
  ``httpx.AsyncClient(transport=...)``, with httpx's per-phase timeouts.

With ``proxy="http://[user:pass@]host:port"`` every request goes through that forward proxy: https
targets through a ``CONNECT`` tunnel (TLS end to end with the target, inside it), http targets as
absolute-form requests (``POST http://host:port/path``). Connections are pooled per target either
way: a tunnel, or a proxy connection whose requests all name the same target address. The
``resolve`` hook (the SSRF guard) still vets every target before the proxy is contacted, and the
proxy is handed the vetted address, never the name, so its own DNS cannot steer a delivery
elsewhere; SNI and the Host header keep the name. The proxy's own address is not vetted.
"""

from __future__ import annotations

import base64
import math
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import NamedTuple

import h11
import httpx
import trio

from hookgate.transport.fields import FIELD_VALUE as _FIELD_VALUE
from hookgate.transport.fields import TOKEN as _TOKEN

__all__ = [
    "PooledTransport",
    "Proxy",
    "ProxyConnectError",
    "RawResponse",
    "Target",
    "parse_proxy",
    "parse_url",
    "shown_url",
]

Resolver = Callable[[str, int], Awaitable[list[str]]]
_Key = tuple[str, str, int]
_Timeouts = Mapping[str, float | None]
_READ_SIZE = 64 * 1024
# Errors meaning "the socket is gone"; everything else from trio/h11 is handled explicitly.
_NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_CONNECTION_LOST = (h11.RemoteProtocolError, *_NETWORK_ERRORS)
_END = h11.EndOfMessage()  # events are immutable: one instance serves every request
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

# What `send` raises when its one timeout expires, by the phase the exchange was in.
_TIMEOUT_ERRORS: dict[str, tuple[type[httpx.TimeoutException], str]] = {
    "pool": (httpx.PoolTimeout, "waiting for a free connection slot"),
    "connect": (httpx.ConnectTimeout, "connecting"),
    "write": (httpx.WriteTimeout, "sending the request"),
    "read": (httpx.ReadTimeout, "waiting for the response"),
}


class RawResponse(NamedTuple):
    """What `PooledTransport.send` returns."""

    status_code: int
    # Lower-cased names, in the order received, repeated names kept as separate entries. Values
    # are decoded as UTF-8 when all of them are valid UTF-8, else as ISO-8859-1 (like httpx).
    headers: list[tuple[str, str]]
    content: bytes  # at most the transport's max_response_body bytes
    truncated: bool  # the body was longer than that, and the rest was not read


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go, parsed and validated once (see `parse_url`) and reused for every request."""

    scheme: str  # "http" or "https"
    host: str  # to connect to (and for TLS SNI and verification): IDNA-encoded, IPv6 unbracketed
    port: int
    host_header: bytes  # the Host header: host, plus the port unless it is the scheme's default
    path: bytes  # the request target: path and query, percent-encoded
    key: _Key = field(init=False, repr=False, compare=False)  # the pool's key for its connections
    # What `send` tells h11 about a request, by method: it is the same for every request.
    _events: dict[bytes, h11.Request] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.scheme, self.host, self.port))
        object.__setattr__(self, "_events", {})


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
    if not _TARGET.fullmatch(path) or not _FIELD_VALUE.fullmatch(host_header):
        raise httpx.InvalidURL(f"cannot send a request to {shown_url(url)!r}")
    return Target(scheme, host, parsed.port or (443 if scheme == "https" else 80), host_header, path)


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
        return _authority(self.host, self.port)


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
        why = "" if shown != url else f": {exc}"  # httpx may quote a character of a password
        raise ValueError(f"invalid proxy URL {shown!r}{why}") from None
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


def _authority(host: str, port: int) -> str:
    """host:port as in a URL or CONNECT request: IPv6 bracketed, an address's zone ID dropped (it
    means nothing on the proxy's host)."""
    host = host.partition("%")[0]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(exc: OSError) -> str:
    """Why a connection or lookup failed, said once ("Connection refused").

    trio wraps each address's error in an OSError that repeats the address, with the errors in an
    ExceptionGroup as its cause; the operating system's own words are what the reader needs.
    """
    group = exc.__cause__
    errors = list(group.exceptions) if isinstance(group, BaseExceptionGroup) else [exc]
    reasons: list[str] = []
    for error in errors:
        if isinstance(error, socket.gaierror) or not isinstance(error, OSError):
            reason = str(getattr(error, "strerror", None) or error)
        elif error.errno is not None and error.errno > 0:
            reason = os.strerror(error.errno)
        else:
            reason = str(error)
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or type(exc).__name__


def _status(code: int) -> str:
    # The standard phrase, not the proxy's: the message stays predictable and free of odd text.
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"status {code}"


class _Conn:
    __slots__ = ("h11", "idle_since", "prefix", "sock", "stream")

    def __init__(self, sock: trio.SocketStream, stream: trio.abc.Stream, prefix: bytes | None = None) -> None:
        self.sock = sock  # the raw socket, for liveness checks and synchronous close
        self.stream = stream  # what we talk HTTP over: `sock` itself or an SSLStream on it
        # For a plain-http target through a proxy: what goes before the path in the request line,
        # b"http://<vetted address>:<port>" (absolute form). None otherwise.
        self.prefix = prefix
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def close(self) -> None:
        # Synchronous on purpose: it must work in cancelled/finally paths without a checkpoint.
        # Closing the socket abandons any TLS state, which is exactly the forceful close we want.
        self.sock.socket.close()


class _Call:
    """One request on its way through the pool: what both entry points hand to `_round_trip`."""

    __slots__ = ("body", "event", "head", "key", "phase", "request", "timeouts")

    def __init__(
        self,
        key: _Key,
        event: h11.Request,
        head: bytes | None,
        body: bytes,
        request: httpx.Request | None = None,
        timeouts: _Timeouts | None = None,
    ) -> None:
        self.key = key
        self.event = event  # immutable, so a stale-connection retry sends the same one
        self.head = head  # the serialized request head, if not h11's to write (see _send_request)
        self.body = body
        self.request = request  # attached to errors; None on the `send` path
        self.timeouts = timeouts  # httpx's per-phase timeouts; None: the caller has one overall
        self.phase = "pool"  # then "connect", "write", "read": which timeout error applies


class _StaleConnection(Exception):
    """A reused connection failed before any response bytes arrived; safe to retry once."""


@contextmanager
def _deadline(
    seconds: float | None, exc: type[httpx.TimeoutException], request: httpx.Request | None
) -> Iterator[None]:
    try:
        with trio.fail_after(math.inf if seconds is None else seconds):
            yield
    except trio.TooSlowError:
        raise exc(f"{exc.__name__} after {seconds}s", request=request) from None


# Header names seen before, validated, mapped to their bytes. Never the names _send_request treats
# specially (Host, _FRAMING, _H11_READS), so a hit means: write it as is.
_NAMES: dict[str, bytes] = {}
_NAMES_MAX = 4096  # a bound, so a stream of distinct names cannot grow it forever
_METHODS: dict[str, bytes] = {m: m.encode() for m in ("POST", "PUT", "PATCH", "GET", "DELETE", "HEAD")}


def _method(method: str) -> bytes:
    raw = _METHODS.get(method)
    if raw is None:
        if not _TOKEN.fullmatch(method):
            raise h11.LocalProtocolError(f"illegal method {method!r}")
        raw = method.encode("ascii")
    return raw


def _header_value(name: str, value: str) -> bytes:
    if value.isascii() and value.isprintable():  # nearly always; both are cheap C checks
        return value.encode("ascii")
    # The errors name the header, never its value: it may be a credential, and the message ends
    # up in attempt records and logs.
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raise h11.LocalProtocolError(f"the value of header {name!r} is not ISO-8859-1") from None
    if not _FIELD_VALUE.fullmatch(raw):
        raise h11.LocalProtocolError(f"the value of header {name!r} holds a control character")
    return raw


# Header names `send` shows h11 as well as writing them: those it acts on when reading the
# response (keep-alive, protocol switch proposals, 100-continue).
_H11_READS = frozenset({"connection", "upgrade", "expect"})
_FRAMING = frozenset({"content-length", "transfer-encoding"})  # ours to set; dropped from the input


def _send_request(
    method: str, target: Target, headers: Iterable[tuple[str, str]], body: bytes
) -> tuple[h11.Request, bytes]:
    """The request head for `send`, validated and serialized here, and the h11 event to go with it.

    h11 validates and serializes requests far more slowly (about half of the write cost in a
    profile). It still tracks the exchange, since it reads the response: it is sent an event with
    the method, Host and any header it acts on (_H11_READS), while the wire gets the bytes built
    here. A Host header replaces the target's; Content-Length is set from the body.
    """
    raw_method = _method(method)
    lines = [raw_method, b" ", target.path, b" HTTP/1.1\r\nHost: ", target.host_header, b"\r\n"]
    h11_headers: list[tuple[bytes, bytes]] | None = None  # if h11 must see more than the usual
    for name, value in headers:
        raw_name = _NAMES.get(name)
        if raw_name is None:  # a name not seen before, or one that needs special handling
            if not _TOKEN.fullmatch(name):
                raise h11.LocalProtocolError(f"illegal header name {name!r}")
            lower = name.lower()
            if lower in _FRAMING:
                continue
            raw_name = name.encode("ascii")
            if lower == "host" or lower in _H11_READS:
                raw_value = _header_value(name, value)
                if h11_headers is None:
                    h11_headers = [(b"Host", target.host_header)]
                if lower == "host":
                    lines[4] = raw_value  # in place of the target's, and still the first header
                    h11_headers[0] = (b"Host", raw_value)
                else:
                    lines += (raw_name, b": ", raw_value, b"\r\n")
                    h11_headers.append((raw_name, raw_value))
                continue
            if len(_NAMES) < _NAMES_MAX:
                _NAMES[name] = raw_name
        lines += (raw_name, b": ", _header_value(name, value), b"\r\n")
    if body or raw_method in _BODY_METHODS:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    head = b"".join(lines)
    if h11_headers is not None:
        return h11.Request(method=raw_method, target=target.path, headers=h11_headers), head
    event = target._events.get(raw_method)  # the usual case: the same event every time
    if event is None:
        event = h11.Request(method=raw_method, target=target.path, headers=[(b"Host", target.host_header)])
        if len(target._events) < 16:
            target._events[raw_method] = event
    return event, head


def _httpx_event(request: httpx.Request, body: bytes) -> h11.Request:
    """The h11 request for an httpx.Request, fully validated by h11."""
    headers = [
        (name, value)
        for name, value in request.headers.raw
        if name.lower() not in (b"content-length", b"transfer-encoding")
    ]
    if not any(name.lower() == b"host" for name, _ in headers):
        headers.insert(0, (b"Host", request.url.netloc))
    # The gateway always has the full body, so plain Content-Length framing suffices.
    if body or request.method in ("POST", "PUT", "PATCH"):
        headers.append((b"Content-Length", str(len(body)).encode()))
    return h11.Request(method=request.method, target=request.url.raw_path, headers=headers)


def _decode_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    try:
        return [(name.decode("ascii").lower(), value.decode("utf-8")) for name, value in raw]
    except UnicodeDecodeError:
        return [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw]


class PooledTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int = 10,
        ssl_context: ssl.SSLContext | None = None,
        max_response_body: int = 1024 * 1024,
        keepalive_expiry: float = 30.0,
        resolve: Resolver | None = None,
        proxy: str | None = None,
    ) -> None:
        """`resolve(host, port)` returns the addresses that may be connected to for a target (the
        SSRF guard's vetting); without it the system resolver is used. `proxy`: send everything
        through this forward proxy (see `parse_proxy`, whose ValueError an invalid URL raises)."""
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._max_response_body = max_response_body
        self._keepalive_expiry = keepalive_expiry
        self._resolve = resolve
        self._proxy = None if proxy is None else parse_proxy(proxy)
        auth = None if self._proxy is None else self._proxy.authorization
        # Added to every request to the proxy: the CONNECT, or each absolute-form request.
        self._proxy_headers = [] if auth is None else [(b"Proxy-Authorization", auth)]
        self._proxy_auth_line = b"" if auth is None else b"Proxy-Authorization: " + auth + b"\r\n"
        # One slot per in-flight request; each holds at most one connection, so together with
        # evicting idle connections (see _take_idle) this caps open connections.
        self._slots = trio.Semaphore(max_connections)
        self._idle: dict[_Key, list[_Conn]] = {}  # per key, oldest first

    async def send(
        self,
        target: Target,
        headers: Iterable[tuple[str, str]],
        body: bytes = b"",
        timeout: float | None = None,
        *,
        method: str = "POST",
    ) -> RawResponse:
        """Send one request to `target` (from `parse_url`) and read the response: the hot path.

        `timeout` (seconds, None for none) covers everything: waiting for a free connection slot,
        connecting (with the TLS handshake), sending, and reading the whole response. When it
        expires, the error is the httpx.TimeoutException subclass for the phase it expired in:
        PoolTimeout, ConnectTimeout, WriteTimeout or ReadTimeout. Other errors are those of
        `handle_async_request` (httpx.ConnectError, with "TLS" in the message for a failed
        handshake; httpx.RemoteProtocolError; httpx.ReadError/WriteError; httpx.LocalProtocolError
        for an illegal method, header name or value), all with no request attached. Through a
        proxy, ProxyConnectError (a ConnectError) when the proxy is unreachable or refuses.
        Whatever the `resolve` hook raises (the SSRF guard's refusal) passes through unchanged.
        """
        try:
            event, head = _send_request(method, target, headers, body)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from None
        call = _Call(target.key, event, head, body)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            response, content, truncated = await self._round_trip(call)
            return RawResponse(
                response.status_code, _decode_headers(response.headers.raw_items()), content, truncated
            )
        error, doing = _TIMEOUT_ERRORS[call.phase]
        raise error(f"no response within {timeout:g}s: timed out {doing}")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scheme = request.url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}", request=request)
        host = request.url.raw_host.decode("ascii")
        key = (scheme, host, request.url.port or (443 if scheme == "https" else 80))
        body = await request.aread()
        try:
            event = _httpx_event(request, body)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        call = _Call(key, event, None, body, request, request.extensions.get("timeout", {}))
        response, content, _ = await self._round_trip(call)
        return httpx.Response(
            response.status_code,
            headers=response.headers.raw_items(),
            content=content,
            extensions={
                "http_version": b"HTTP/" + response.http_version,
                "reason_phrase": response.reason,
            },
            request=request,
        )

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _round_trip(self, call: _Call) -> tuple[h11.Response, bytes, bool]:
        """Take a slot, then a pooled or a new connection, and exchange `call` on it."""
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # no scheduling round trip unless cancelled
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            if call.timeouts is None:
                await self._slots.acquire()
            else:
                with _deadline(call.timeouts.get("pool"), httpx.PoolTimeout, call.request):
                    await self._slots.acquire()
        try:
            conn = self._take_idle(call.key)
            if conn is not None:
                try:
                    return await self._exchange(conn, call, reused=True)
                except _StaleConnection:
                    pass  # the server dropped it while idle; fall through to a fresh one
            call.phase = "connect"
            conn = await self._connect(call)
            return await self._exchange(conn, call, reused=False)
        finally:
            self._slots.release()

    def _take_idle(self, key: _Key) -> _Conn | None:
        """Pop a reusable idle connection for `key`, or make room for a new one."""
        cutoff = time.monotonic() - self._keepalive_expiry
        for conns in self._idle.values():
            while conns and conns[0].idle_since <= cutoff:  # lists are oldest first
                conns.pop(0).close()
        candidates = self._idle.get(key)
        while candidates:
            conn = candidates.pop()  # most recently used: least likely to have been closed
            # Readable while idle means EOF (or junk) from the server: it is done with it. (Under
            # a microsecond per request; skipping it would risk reading, say, an idle-timeout 408
            # as the response to the next request.)
            if not conn.sock.socket.is_readable():
                return conn
            conn.close()
        # We will open a new connection. Idle connections to other endpoints may be using up
        # the budget, so close the oldest ones until in-flight + idle fits again.
        in_flight = self._max_connections - self._slots.value
        while in_flight + sum(map(len, self._idle.values())) > self._max_connections:
            oldest = min((c for c in self._idle.values() if c), key=lambda c: c[0].idle_since)
            oldest.pop(0).close()
        return None

    async def _connect(self, call: _Call) -> _Conn:
        scheme, host, port = call.key
        if scheme == "https" and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()  # lazily: loading CAs is slow
        ssl_context = self._ssl_context if scheme == "https" else None
        timeout = None if call.timeouts is None else call.timeouts.get("connect")
        # Covers resolving, the proxy's CONNECT and the TLS handshake too.
        with _deadline(timeout, httpx.ConnectTimeout, call.request):
            prefix = None
            if self._proxy is None:
                via = ""
                try:
                    sock = await self._open_tcp(host, port)
                except OSError as exc:
                    raise httpx.ConnectError(str(exc), request=call.request) from exc
            else:
                via = f" (through proxy {self._proxy.address})"
                sock, prefix = await self._open_via_proxy(call)
            if ssl_context is None:
                return _Conn(sock, sock, prefix)
            # https_compatible: many HTTPS servers close without a TLS close_notify.
            tls = trio.SSLStream(sock, ssl_context, server_hostname=host, https_compatible=True)
            try:
                await tls.do_handshake()
            except BaseException as exc:
                sock.socket.close()
                if isinstance(exc, _NETWORK_ERRORS):
                    msg = f"TLS handshake with {host}:{port}{via} failed: {exc.__cause__ or exc}"
                    raise httpx.ConnectError(msg, request=call.request) from exc
                raise
            return _Conn(sock, tls)

    async def _open_via_proxy(self, call: _Call) -> tuple[trio.SocketStream, bytes | None]:
        """Vet the target, connect to the proxy and, for https, open a tunnel to the target.

        Returns the socket to the proxy and, for http, the absolute-form prefix for its requests.
        The target is vetted (`resolve`) before the proxy is contacted, and the proxy is given the
        first vetted address rather than the name, so the proxy's DNS cannot pick another one.
        """
        assert self._proxy is not None
        proxy, request = self._proxy, call.request
        scheme, host, port = call.key
        address = host  # no resolve hook: the proxy resolves the name, as proxies do
        if self._resolve is not None:
            try:
                addresses = await self._resolve(host, port)
            except OSError as exc:
                raise httpx.ConnectError(f"could not resolve {host}: {_why(exc)}", request=request) from exc
            if not addresses:
                raise httpx.ConnectError(f"{host} resolved to no address", request=request)
            address = addresses[0]
        authority = _authority(address, port)
        try:
            sock = await trio.open_tcp_stream(proxy.host, proxy.port)
        except OSError as exc:
            msg = f"could not connect to proxy {proxy.address}: {_why(exc)}"
            raise ProxyConnectError(msg, request=request) from exc
        if scheme == "http":
            return sock, b"http://" + authority.encode("ascii")
        try:
            await self._tunnel(sock, authority, call)
        except BaseException:
            sock.socket.close()
            raise
        return sock, None

    async def _tunnel(self, sock: trio.SocketStream, authority: str, call: _Call) -> None:
        """Ask the proxy on `sock` for a tunnel to `authority` (CONNECT); return once it is open."""
        assert self._proxy is not None
        proxy = self._proxy
        raw = authority.encode("ascii")
        h = h11.Connection(h11.CLIENT)
        connect = h11.Request(method=b"CONNECT", target=raw, headers=[(b"Host", raw), *self._proxy_headers])
        try:
            await sock.send_all(h.send(connect) + h.send(_END))
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    h.receive_data(await sock.receive_some(_READ_SIZE))
                elif type(event) is h11.Response:
                    break
                elif type(event) is not h11.InformationalResponse:
                    raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
        except _CONNECTION_LOST as exc:
            msg = f"proxy {proxy.address} failed while opening a tunnel to {authority}: {exc!r}"
            raise ProxyConnectError(msg, request=call.request) from exc
        status = event.status_code
        if not 200 <= status < 300:
            msg = f"proxy {proxy.address} refused to open a tunnel to {authority}: {_status(status)}"
            raise ProxyConnectError(msg + self._auth_hint(status), request=call.request)
        if h.trailing_data[0]:  # the target speaks after our TLS hello, never before
            msg = f"proxy {proxy.address} sent unexpected data after opening a tunnel to {authority}"
            raise ProxyConnectError(msg, request=call.request)

    def _auth_hint(self, status: int) -> str:
        if status != 407:
            return ""
        if self._proxy_headers:
            return " (the proxy rejected the credentials in the proxy URL)"
        return " (the proxy requires credentials: http://user:password@host:port)"

    async def _open_tcp(self, host: str, port: int) -> trio.SocketStream:
        """A connection to host:port; an OSError whose message says once what failed and why."""
        authority = _authority(host, port)
        if self._resolve is None:
            try:
                return await trio.open_tcp_stream(host, port)
            except OSError as exc:
                raise OSError(f"could not connect to {authority}: {_why(exc)}") from exc
        try:
            addresses = await self._resolve(host, port)
        except OSError as exc:
            raise OSError(f"could not resolve {host}: {_why(exc)}") from exc
        failures: dict[str, str] = {}
        for address in addresses:  # in the resolver's order: it may have vetted them
            try:
                return await trio.open_tcp_stream(address, port)
            except OSError as exc:
                failures[address] = _why(exc)
        reasons = set(failures.values())
        if len(reasons) == 1:
            tried = "" if list(failures) == [host] else f" ({', '.join(failures)})"
            raise OSError(f"could not connect to {authority}{tried}: {reasons.pop()}")
        each = "; ".join(f"{address}: {why}" for address, why in failures.items())
        raise OSError(f"could not connect to {authority}: {each or 'no address to connect to'}")

    async def _exchange(self, conn: _Conn, call: _Call, *, reused: bool) -> tuple[h11.Response, bytes, bool]:
        """Send `call` on `conn` and read the response; owns `conn` from here on.

        Returns the response head, its body (cut at max_response_body) and whether it was cut.
        """
        timeouts, request = call.timeouts, call.request
        h = conn.h11
        received = False
        call.phase = "write"
        try:
            if call.head is None:  # h11 writes the request
                ours = call.event
                if conn.prefix is not None:  # through a proxy: absolute form, and its credentials
                    ours = h11.Request(
                        method=ours.method,
                        target=conn.prefix + ours.target,
                        headers=[*ours.headers.raw_items(), *self._proxy_headers],
                    )
                pieces = [h.send(ours)]
                if call.body:  # passed through as is: Content-Length framing adds nothing to it
                    pieces += h.send_with_data_passthrough(h11.Data(data=call.body)) or ()
                pieces.append(h.send(_END))
                data = b"".join(pieces)
            else:  # `send` wrote it; h11 is told what it needs to read the response
                h.send(call.event)
                h.send(_END)
                if conn.prefix is None:
                    data = call.head + call.body
                else:  # through a proxy: absolute form, and the proxy's credentials after the rest
                    head, space = call.head, call.head.index(b" ") + 1  # after the method
                    data = b"".join(
                        (head[:space], conn.prefix, head[space:-2], self._proxy_auth_line, b"\r\n", call.body)
                    )
            if timeouts is None:
                await conn.stream.send_all(data)
            else:
                with _deadline(timeouts.get("write"), httpx.WriteTimeout, request):
                    await conn.stream.send_all(data)

            call.phase = "read"
            content = bytearray()
            truncated = False
            response: h11.Response | None = None
            # Nothing is buffered yet (pooled connections have no leftover bytes), so read first.
            event: object = h11.NEED_DATA
            while True:
                if event is h11.NEED_DATA:
                    if timeouts is None:
                        chunk = await conn.stream.receive_some(_READ_SIZE)
                    else:
                        with _deadline(timeouts.get("read"), httpx.ReadTimeout, request):
                            chunk = await conn.stream.receive_some(_READ_SIZE)
                    if chunk:
                        received = True
                    h.receive_data(chunk)  # type: ignore[arg-type]  # any bytes-like; b"" means EOF
                elif type(event) is h11.Data:
                    content += event.data
                    if len(content) > self._max_response_body:
                        del content[self._max_response_body :]
                        truncated = True  # stop reading; the connection is closed below
                        break
                elif type(event) is h11.Response:
                    response = event
                elif type(event) is h11.EndOfMessage:
                    break
                elif type(event) is not h11.InformationalResponse:  # 1xx: the final one follows
                    # PAUSED (the server switched protocols on us) or something stranger: looping
                    # on it would spin forever, so give up on the connection.
                    raise h11.RemoteProtocolError(f"unexpected {event!r} from the server")
                event = h.next_event()
        except BaseException as exc:
            # Covers cancellation too: never pool a connection in an unknown state.
            conn.close()
            if isinstance(exc, _CONNECTION_LOST):
                if reused and not received:
                    raise _StaleConnection from exc
                if isinstance(exc, h11.RemoteProtocolError):
                    raise httpx.RemoteProtocolError(str(exc), request=request) from exc
                error = httpx.WriteError if call.phase == "write" else httpx.ReadError
                raise error(f"{call.phase} failed: {exc!r}", request=request) from exc
            if isinstance(exc, h11.LocalProtocolError):
                raise httpx.LocalProtocolError(str(exc), request=request) from exc
            raise

        assert response is not None  # h11 always yields the Response before Data/EndOfMessage
        # Bytes after the response (a broken server) would be read as the next one: don't reuse.
        if not truncated and h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0]:
            h.start_next_cycle()
            conn.idle_since = time.monotonic()
            self._idle.setdefault(call.key, []).append(conn)
        else:
            conn.close()
        if response.status_code == 407 and conn.prefix is not None:  # only a proxy sends 407
            assert self._proxy is not None
            msg = f"proxy {self._proxy.address} refused the request: {_status(407)}{self._auth_hint(407)}"
            raise ProxyConnectError(msg, request=request)
        return response, bytes(content), truncated
