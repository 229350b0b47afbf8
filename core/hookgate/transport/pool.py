"""A small per-endpoint HTTP/1.1 connection pool over trio + h11.

httpx's default httpcore pool contends badly on trio under concurrency (roughly a tenth of
the throughput of a bare trio+h11 client), so egress uses this transport instead. Two ways in,
sharing one pool and one request/response exchange:

- ``PooledTransport.send(target, headers, body, timeout)``, the gateway's hot path: the URL is
  parsed once per endpoint (``parse_url``), headers are plain ``(str, str)`` pairs, one timeout
  covers the whole exchange, and the result is a small ``RawResponse``. No httpx objects are
  built, yet errors are the httpx exception types (with no ``.request`` attached).
- ``handle_async_request``: it is an ``httpx.AsyncBaseTransport``, usable via
  ``httpx.AsyncClient(transport=...)``, with httpx's per-phase timeouts (see `httpx_adapter`).

With ``proxy="http://[user:pass@]host:port"`` every request goes through that forward proxy (see
`proxy`). Connections are pooled per target either way: a tunnel, or a proxy connection whose
requests all name the same target address.
"""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Iterable
from typing import NamedTuple

import h11
import httpx
import trio

from hookgate.transport.connection import Call, Connection, Connector, StaleConnection, deadline
from hookgate.transport.http11 import Received, decode_headers, serialize_request
from hookgate.transport.httpx_adapter import httpx_call, httpx_response
from hookgate.transport.proxy import parse_proxy, refused_request
from hookgate.transport.tcp import Resolver
from hookgate.transport.url import Key, Target

__all__ = ["PooledTransport", "RawResponse"]

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
        self._keepalive_expiry = keepalive_expiry
        self._proxy = None if proxy is None else parse_proxy(proxy)
        self._connector = Connector(
            ssl_context=ssl_context, resolve=resolve, proxy=self._proxy, max_body=max_response_body
        )
        # One slot per in-flight request; each holds at most one connection, so together with
        # evicting idle connections (see _take_idle) this caps open connections.
        self._slots = trio.Semaphore(max_connections)
        self._idle: dict[Key, list[Connection]] = {}  # per key, oldest first

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
            event, head = serialize_request(method, target, headers, body)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from None
        call = Call(target.key, event, head, body)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            response, content, truncated = await self._round_trip(call)
            return RawResponse(
                response.status_code, decode_headers(response.headers.raw_items()), content, truncated
            )
        error, doing = _TIMEOUT_ERRORS[call.phase]
        raise error(f"no response within {timeout:g}s: timed out {doing}")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call = await httpx_call(request)
        return httpx_response(request, await self._round_trip(call))

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _round_trip(self, call: Call) -> Received:
        """Take a slot, then a pooled or a new connection, and exchange `call` on it."""
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # no scheduling round trip unless cancelled
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            if call.timeouts is None:
                await self._slots.acquire()
            else:
                with deadline(call.timeouts.get("pool"), httpx.PoolTimeout, call.request):
                    await self._slots.acquire()
        try:
            conn = self._take_idle(call.key)
            if conn is not None:
                try:
                    return await self._exchange(conn, call, reused=True)
                except StaleConnection:
                    pass  # the server dropped it while idle; fall through to a fresh one
            call.phase = "connect"
            conn = await self._connector.connect(call)
            return await self._exchange(conn, call, reused=False)
        finally:
            self._slots.release()

    async def _exchange(self, conn: Connection, call: Call, *, reused: bool) -> Received:
        """Exchange `call` on `conn`, then pool `conn` again if it can take another request."""
        received = await conn.exchange(call, reused=reused)
        if conn.http.start_next_cycle():
            conn.idle_since = time.monotonic()
            self._idle.setdefault(call.key, []).append(conn)
        else:
            conn.close()
        if received.head.status_code == 407 and conn.http.prefix is not None:  # only a proxy sends 407
            assert self._proxy is not None
            raise refused_request(self._proxy, call.request)
        return received

    def _take_idle(self, key: Key) -> Connection | None:
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
            if not conn.closed_by_server():
                return conn
            conn.close()
        # We will open a new connection. Idle connections to other endpoints may be using up
        # the budget, so close the oldest ones until in-flight + idle fits again.
        in_flight = self._max_connections - self._slots.value
        while in_flight + sum(map(len, self._idle.values())) > self._max_connections:
            oldest = min((c for c in self._idle.values() if c), key=lambda c: c[0].idle_since)
            oldest.pop(0).close()
        return None
