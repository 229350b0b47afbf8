"""A small per-endpoint HTTP/1.1 connection pool over trio + h11.

httpx's default httpcore pool contends badly on trio under concurrency (roughly a tenth of
the throughput of a bare trio+h11 client), so egress uses this transport instead. It is an
``httpx.AsyncBaseTransport``: usable via ``httpx.AsyncClient(transport=...)`` or called
directly with ``await transport.handle_async_request(request)`` on the hot path.
"""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import h11
import httpx
import trio

__all__ = ["PooledTransport"]

Resolver = Callable[[str, int], Awaitable[list[str]]]
_Key = tuple[str, str, int]
_READ_SIZE = 64 * 1024
# Errors meaning "the socket is gone"; everything else from trio/h11 is handled explicitly.
_NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_CONNECTION_LOST = (h11.RemoteProtocolError, *_NETWORK_ERRORS)


class _Conn:
    __slots__ = ("h11", "idle_since", "sock", "stream")

    def __init__(self, sock: trio.SocketStream, stream: trio.abc.Stream) -> None:
        self.sock = sock  # the raw socket, for liveness checks and synchronous close
        self.stream = stream  # what we talk HTTP over: `sock` itself or an SSLStream on it
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def close(self) -> None:
        # Synchronous on purpose: it must work in cancelled/finally paths without a checkpoint.
        # Closing the socket abandons any TLS state, which is exactly the forceful close we want.
        self.sock.socket.close()


class _StaleConnection(Exception):
    """A reused connection failed before any response bytes arrived; safe to retry once."""


@contextmanager
def _deadline(
    seconds: float | None, exc: type[httpx.TimeoutException], request: httpx.Request
) -> Iterator[None]:
    try:
        with trio.fail_after(math.inf if seconds is None else seconds):
            yield
    except trio.TooSlowError:
        raise exc(f"{exc.__name__} after {seconds}s", request=request) from None


class PooledTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int = 10,
        ssl_context: ssl.SSLContext | None = None,
        max_response_body: int = 1024 * 1024,
        keepalive_expiry: float = 30.0,
        resolve: Resolver | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._max_response_body = max_response_body
        self._keepalive_expiry = keepalive_expiry
        self._resolve = resolve
        # One slot per in-flight request; each holds at most one connection, so together with
        # evicting idle connections (see _take_idle) this caps open connections.
        self._slots = trio.Semaphore(max_connections)
        self._idle: dict[_Key, list[_Conn]] = {}  # per key, oldest first

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scheme = request.url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}", request=request)
        host = request.url.raw_host.decode("ascii")
        key = (scheme, host, request.url.port or (443 if scheme == "https" else 80))
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()

        with _deadline(timeouts.get("pool"), httpx.PoolTimeout, request):
            await self._slots.acquire()
        try:
            conn = self._take_idle(key)
            if conn is not None:
                try:
                    return await self._exchange(conn, key, request, body, reused=True)
                except _StaleConnection:
                    pass  # the server dropped it while idle; fall through to a fresh one
            conn = await self._connect(key, request)
            return await self._exchange(conn, key, request, body, reused=False)
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _take_idle(self, key: _Key) -> _Conn | None:
        """Pop a reusable idle connection for `key`, or make room for a new one."""
        cutoff = time.monotonic() - self._keepalive_expiry
        for conns in self._idle.values():
            while conns and conns[0].idle_since <= cutoff:  # lists are oldest first
                conns.pop(0).close()
        conns = self._idle.get(key, [])
        while conns:
            conn = conns.pop()  # most recently used: least likely to have been closed
            # Readable while idle means EOF (or junk) from the server: it is done with it.
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

    async def _connect(self, key: _Key, request: httpx.Request) -> _Conn:
        scheme, host, port = key
        timeout = request.extensions.get("timeout", {}).get("connect")
        if scheme == "https" and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()  # lazily: loading CAs is slow
        ssl_context = self._ssl_context if scheme == "https" else None
        with _deadline(timeout, httpx.ConnectTimeout, request):  # covers the TLS handshake too
            try:
                sock = await self._open_tcp(host, port)
            except OSError as exc:
                msg = f"connect to {host}:{port} failed: {exc}"
                raise httpx.ConnectError(msg, request=request) from exc
            if ssl_context is None:
                return _Conn(sock, sock)
            # https_compatible: many HTTPS servers close without a TLS close_notify.
            tls = trio.SSLStream(sock, ssl_context, server_hostname=host, https_compatible=True)
            try:
                await tls.do_handshake()
            except BaseException as exc:
                sock.socket.close()
                if isinstance(exc, _NETWORK_ERRORS):
                    msg = f"TLS handshake with {host}:{port} failed: {exc.__cause__ or exc}"
                    raise httpx.ConnectError(msg, request=request) from exc
                raise
            return _Conn(sock, tls)

    async def _open_tcp(self, host: str, port: int) -> trio.SocketStream:
        if self._resolve is None:
            return await trio.open_tcp_stream(host, port)
        addresses = await self._resolve(host, port)
        errors: list[OSError] = []
        for address in addresses:  # in the resolver's order: it may have vetted them
            try:
                return await trio.open_tcp_stream(address, port)
            except OSError as exc:
                errors.append(exc)
        raise OSError(f"no address of {host} accepted a connection ({addresses}): {errors}")

    async def _exchange(
        self, conn: _Conn, key: _Key, request: httpx.Request, body: bytes, *, reused: bool
    ) -> httpx.Response:
        """Send `request` on `conn` and read the response; owns `conn` from here on."""
        timeouts = request.extensions.get("timeout", {})
        received = False
        phase = "write"
        try:
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
            h = conn.h11
            target = request.url.raw_path
            data = h.send(h11.Request(method=request.method, target=target, headers=headers))
            data += h.send(h11.Data(data=body)) if body else b""
            data += h.send(h11.EndOfMessage())
            with _deadline(timeouts.get("write"), httpx.WriteTimeout, request):
                await conn.stream.send_all(data)

            phase = "read"
            content = bytearray()
            truncated = False
            response: h11.Response | None = None
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    with _deadline(timeouts.get("read"), httpx.ReadTimeout, request):
                        chunk = await conn.stream.receive_some(_READ_SIZE)
                    received = received or bool(chunk)
                    h.receive_data(bytes(chunk))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    content += event.data
                    if len(content) > self._max_response_body:
                        del content[self._max_response_body :]
                        truncated = True  # stop reading; the connection is closed below
                        break
                elif isinstance(event, h11.EndOfMessage):
                    break
                # InformationalResponse (1xx): nothing to do, the final response follows.
        except BaseException as exc:
            # Covers cancellation too: never pool a connection in an unknown state.
            conn.close()
            if isinstance(exc, _CONNECTION_LOST):
                if reused and not received:
                    raise _StaleConnection from exc
                if isinstance(exc, h11.RemoteProtocolError):
                    raise httpx.RemoteProtocolError(str(exc), request=request) from exc
                error = httpx.WriteError if phase == "write" else httpx.ReadError
                raise error(f"{phase} failed: {exc!r}", request=request) from exc
            if isinstance(exc, h11.LocalProtocolError):
                raise httpx.LocalProtocolError(str(exc), request=request) from exc
            raise

        assert response is not None  # h11 always yields the Response before Data/EndOfMessage
        if not truncated and h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            conn.idle_since = time.monotonic()
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()
        return httpx.Response(
            response.status_code,
            headers=list(response.headers.raw_items()),
            content=bytes(content),
            extensions={
                "http_version": b"HTTP/" + response.http_version,
                "reason_phrase": response.reason,
            },
            request=request,
        )
