"""One pooled connection: a trio stream with the sans-IO `HTTP11Connection` driving it, and the
`Connector` that opens them (directly or through the proxy, with TLS for https).

The I/O half of the exchange lives here: writing and reading with httpx's per-phase timeouts,
and turning what goes wrong into httpx's errors.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import h11
import httpx
import trio

from hookgate.transport.http11 import HTTP11Connection, Received
from hookgate.transport.proxy import Proxy, open_via_proxy
from hookgate.transport.tcp import CONNECTION_LOST, NETWORK_ERRORS, READ_SIZE, Resolver, open_tcp
from hookgate.transport.url import Key

__all__ = ["Call", "Connection", "Connector", "StaleConnection", "deadline"]

Timeouts = Mapping[str, float | None]


class Call:
    """One request on its way through the pool: what both entry points hand to its round trip."""

    __slots__ = ("body", "event", "head", "key", "phase", "request", "timeouts")

    def __init__(
        self,
        key: Key,
        event: h11.Request,
        head: bytes | None,
        body: bytes,
        request: httpx.Request | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.key = key
        self.event = event  # immutable, so a stale-connection retry sends the same one
        self.head = head  # the serialized request head, if not h11's to write (see serialize_request)
        self.body = body
        self.request = request  # attached to errors; None on the `send` path
        self.timeouts = timeouts  # httpx's per-phase timeouts; None: the caller has one overall
        self.phase = "pool"  # then "connect", "write", "read": which timeout error applies


class StaleConnection(Exception):
    """A reused connection failed before any response bytes arrived; safe to retry once."""


@contextmanager
def deadline(
    seconds: float | None, exc: type[httpx.TimeoutException], request: httpx.Request | None
) -> Iterator[None]:
    """Raise `exc` (for `request`) when the block runs longer than `seconds`; None: no limit."""
    try:
        with trio.fail_after(math.inf if seconds is None else seconds):
            yield
    except trio.TooSlowError:
        raise exc(f"{exc.__name__} after {seconds}s", request=request) from None


class Connection:
    """One open connection to a target (or to the proxy for it), pooled while idle."""

    __slots__ = ("http", "idle_since", "sock", "stream")

    def __init__(self, sock: trio.SocketStream, stream: trio.abc.Stream, http: HTTP11Connection) -> None:
        self.sock = sock  # the raw socket, for liveness checks and synchronous close
        self.stream = stream  # what we talk HTTP over: `sock` itself or an SSLStream on it
        self.http = http
        self.idle_since = 0.0

    def close(self) -> None:
        # Synchronous on purpose: it must work in cancelled/finally paths without a checkpoint.
        # Closing the socket abandons any TLS state, which is exactly the forceful close we want.
        self.sock.socket.close()

    def closed_by_server(self) -> bool:
        """Whether the idle connection has something to read: EOF (or junk) from the server."""
        return self.sock.socket.is_readable()

    async def exchange(self, call: Call, *, reused: bool) -> Received:
        """Send `call` and read the response: the response head, its body (cut at the limit) and
        whether it was cut. Any error closes the connection, then raises StaleConnection (a
        reused connection that failed before any response bytes: retry on a new one) or an httpx
        error."""
        received = False
        call.phase = "write"
        try:
            await self._send_all(self.http.send_request(call.event, call.head, call.body), call)
            call.phase = "read"
            # Nothing is buffered yet (pooled connections have no leftover bytes), so read first.
            while True:
                chunk = await self._receive_some(call)
                if chunk:
                    received = True
                if self.http.receive_data(chunk):
                    return self.http.response()
        except BaseException as exc:
            # Covers cancellation too: never pool a connection in an unknown state.
            self.close()
            error = _httpx_error(exc, call, stale=reused and not received)
            if error is None:
                raise
            raise error from exc

    async def _send_all(self, data: bytes, call: Call) -> None:
        if call.timeouts is None:
            await self.stream.send_all(data)
        else:
            with deadline(call.timeouts.get("write"), httpx.WriteTimeout, call.request):
                await self.stream.send_all(data)

    async def _receive_some(self, call: Call) -> bytes | bytearray:
        if call.timeouts is None:
            chunk = await self.stream.receive_some(READ_SIZE)
        else:
            with deadline(call.timeouts.get("read"), httpx.ReadTimeout, call.request):
                chunk = await self.stream.receive_some(READ_SIZE)
        return chunk


def _httpx_error(exc: BaseException, call: Call, *, stale: bool) -> Exception | None:
    """What an exchange that failed with `exc` raises instead; None: `exc` itself."""
    request = call.request
    if isinstance(exc, CONNECTION_LOST):
        if stale:
            return StaleConnection()
        if isinstance(exc, h11.RemoteProtocolError):
            return httpx.RemoteProtocolError(str(exc), request=request)
        error = httpx.WriteError if call.phase == "write" else httpx.ReadError
        return error(f"{call.phase} failed: {exc!r}", request=request)
    if isinstance(exc, h11.LocalProtocolError):
        return httpx.LocalProtocolError(str(exc), request=request)
    return None


class Connector:
    """Opens the pool's connections: to the target, or through the proxy; with TLS for https."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        resolve: Resolver | None,
        proxy: Proxy | None,
        max_body: int,
    ) -> None:
        self._ssl_context = ssl_context
        self._resolve = resolve
        self._proxy = proxy
        self._max_body = max_body

    async def connect(self, call: Call) -> Connection:
        scheme, host, port = call.key
        if scheme == "https" and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()  # lazily: loading CAs is slow
        ssl_context = self._ssl_context if scheme == "https" else None
        timeout = None if call.timeouts is None else call.timeouts.get("connect")
        # Covers resolving, the proxy's CONNECT and the TLS handshake too.
        with deadline(timeout, httpx.ConnectTimeout, call.request):
            if self._proxy is None:
                via = ""
                try:
                    sock = await open_tcp(host, port, self._resolve)
                except OSError as exc:
                    raise httpx.ConnectError(str(exc), request=call.request) from exc
                http = HTTP11Connection(self._max_body)
            else:
                via = f" (through proxy {self._proxy.address})"
                sock, prefix = await open_via_proxy(self._proxy, self._resolve, call.key, call.request)
                proxy_headers = () if prefix is None else self._proxy.headers
                http = HTTP11Connection(self._max_body, prefix, proxy_headers)
            if ssl_context is None:
                return Connection(sock, sock, http)
            tls = await _start_tls(sock, ssl_context, host, port, via, call.request)
            return Connection(sock, tls, http)


async def _start_tls(
    sock: trio.SocketStream,
    ssl_context: ssl.SSLContext,
    host: str,
    port: int,
    via: str,
    request: httpx.Request | None,
) -> trio.SSLStream[trio.SocketStream]:
    """TLS on `sock` to `host` (SNI and verification); `sock` is closed if the handshake fails."""
    # https_compatible: many HTTPS servers close without a TLS close_notify.
    tls = trio.SSLStream(sock, ssl_context, server_hostname=host, https_compatible=True)
    try:
        await tls.do_handshake()
    except BaseException as exc:
        sock.socket.close()
        if isinstance(exc, NETWORK_ERRORS):
            msg = f"TLS handshake with {host}:{port}{via} failed: {exc.__cause__ or exc}"
            raise httpx.ConnectError(msg, request=request) from exc
        raise
    return tls
