"""PooledTransport against real loopback trio + h11 servers (no mocks)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus

import h11
import httpx
import pytest
import trio

from hookgate.transport import PooledTransport

LIMIT = 5  # seconds; every test runs under trio.fail_after(LIMIT)


@dataclass
class Received:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]  # lower-cased names
    body: bytes
    conn_id: int  # 1-based, in accept order
    index: int  # 0-based position of the request on its connection


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    close_after: bool = False  # close the socket after responding, without telling the client


CLOSE = "close"  # read the request, then close without responding
HANG = "hang"  # read the request, never respond; wait for the client to go away

Handler = Callable[[Received], Awaitable[Reply | str]]


class Server:
    """A tiny HTTP/1.1 server that records what it sees, for assertions."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.accepted = 0
        self.disconnects = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[Received] = []
        self._changed = trio.Event()

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        conn_id = self.accepted
        self._notify()
        conn = h11.Connection(h11.SERVER)
        try:
            for index in range(1_000_000):
                received = await self._read_request(stream, conn, conn_id, index)
                if received is None:
                    return
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self.requests.append(received)
                self._notify()
                try:
                    reply = await self.handler(received)
                    if reply == HANG:
                        while await stream.receive_some(65536):
                            pass
                        return
                    if not isinstance(reply, Reply):
                        return  # CLOSE
                    await stream.send_all(_encode(conn, reply))
                finally:
                    self.in_flight -= 1
                if reply.close_after or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass  # the client went away or spoke garbage (e.g. a TLS hello): just hang up
        finally:
            await trio.aclose_forcefully(stream)
            self.disconnects += 1
            self._notify()

    @staticmethod
    async def _read_request(
        stream: trio.SocketStream, conn: h11.Connection, conn_id: int, index: int
    ) -> Received | None:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                headers = {name: value for name, value in request.headers}
                return Received(request.method, request.target, headers, body, conn_id, index)


def _encode(conn: h11.Connection, reply: Reply) -> bytes:
    headers = [(b"Content-Length", str(len(reply.body)).encode()), *reply.headers]
    reason = HTTPStatus(reply.status).phrase.encode()
    data = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason))
    return data + conn.send(h11.Data(data=reply.body)) + conn.send(h11.EndOfMessage())


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    async with trio.open_nursery() as nursery:
        serve_tcp = partial(trio.serve_tcp, server.serve_connection, 0, host="127.0.0.1")
        listeners = await nursery.start(serve_tcp)
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def ok(received: Received) -> Reply:
    return Reply(body=b"ok")


def timeout(**kwargs: float | None) -> dict[str, dict[str, float | None]]:
    return {"timeout": httpx.Timeout(LIMIT, **kwargs).as_dict()}


async def test_get_and_post_round_trip() -> None:
    async def echo(r: Received) -> Reply:
        headers = [(b"X-Method", r.method), (b"X-Custom-Seen", r.headers.get(b"x-custom", b""))]
        return Reply(201, headers, b"%s %s %s" % (r.method, r.target, r.body))

    with trio.fail_after(LIMIT):
        async with serve(echo) as server, PooledTransport() as transport:
            get = httpx.Request("GET", server.url("/a?b=1"), headers={"X-Custom": "yes"})
            response = await transport.handle_async_request(get)
            assert response.status_code == 201
            assert response.headers["x-method"] == "GET"
            assert response.headers["x-custom-seen"] == "yes"
            assert response.content == b"GET /a?b=1 "
            assert response.request is get
            assert response.extensions["http_version"] == b"HTTP/1.1"
            assert response.extensions["reason_phrase"] == b"Created"

            post = httpx.Request("POST", server.url("/hook"), content=b'{"x": 1}')
            response = await transport.handle_async_request(post)
            assert response.content == b'POST /hook {"x": 1}'
            assert server.requests[1].headers[b"content-length"] == b"8"
            assert server.requests[1].headers[b"host"] == f"127.0.0.1:{server.port}".encode()


async def test_keepalive_reuses_one_connection() -> None:
    with trio.fail_after(LIMIT):
        async with serve(ok) as server, PooledTransport() as transport:
            for _ in range(5):
                request = httpx.Request("POST", server.url(), content=b"x")
                assert (await transport.handle_async_request(request)).content == b"ok"
            assert server.accepted == 1
            assert [r.index for r in server.requests] == [0, 1, 2, 3, 4]


async def test_expired_idle_connection_is_not_reused() -> None:
    with trio.fail_after(LIMIT):
        async with serve(ok) as server, PooledTransport(keepalive_expiry=0) as transport:
            for _ in range(3):
                await transport.handle_async_request(httpx.Request("GET", server.url()))
            assert server.accepted == 3


async def test_concurrency_is_bounded_by_max_connections() -> None:
    release = trio.Event()

    async def held(r: Received) -> Reply:
        await release.wait()
        return Reply(body=b"done")

    results: list[bytes] = []

    async def one(transport: PooledTransport, url: str) -> None:
        request = httpx.Request("POST", url, content=b"x")
        results.append((await transport.handle_async_request(request)).content)

    with trio.fail_after(LIMIT):
        async with serve(held) as server, PooledTransport(max_connections=3) as transport:
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(one, transport, server.url())
                await server.wait_for(lambda: server.in_flight == 3)
                # All three slots are busy, so one more request waits and hits the pool timeout.
                extra = httpx.Request("GET", server.url(), extensions=timeout(pool=0.1))
                with pytest.raises(httpx.PoolTimeout):
                    await transport.handle_async_request(extra)
                release.set()
            assert results == [b"done"] * 10
            assert server.max_in_flight == 3
            assert server.accepted == 3


async def test_read_timeout_when_server_hangs() -> None:
    async def hang(r: Received) -> str:
        return HANG

    with trio.fail_after(LIMIT):
        async with serve(hang) as server, PooledTransport() as transport:
            request = httpx.Request("GET", server.url(), extensions=timeout(read=0.2))
            with pytest.raises(httpx.ReadTimeout):
                await transport.handle_async_request(request)
            await server.wait_for(lambda: server.disconnects == 1)  # the client hung up


async def test_connect_error_on_closed_port() -> None:
    with socket.socket() as s:  # grab a free port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(LIMIT):
        async with PooledTransport() as transport:
            with pytest.raises(httpx.ConnectError):
                request = httpx.Request("GET", f"http://127.0.0.1:{port}/")
                await transport.handle_async_request(request)


async def test_tls_failure_is_connect_error() -> None:
    with trio.fail_after(LIMIT):
        async with serve(ok) as server, PooledTransport() as transport:
            url = server.url().replace("http://", "https://")
            with pytest.raises(httpx.ConnectError, match="TLS"):
                await transport.handle_async_request(httpx.Request("GET", url))


async def test_server_closing_idle_connection_does_not_fail_next_request() -> None:
    async def once(r: Received) -> Reply:
        return Reply(body=b"ok", close_after=True)  # like a server's idle timeout firing

    with trio.fail_after(LIMIT):
        async with serve(once) as server, PooledTransport() as transport:
            await transport.handle_async_request(httpx.Request("GET", server.url()))
            await server.wait_for(lambda: server.disconnects == 1)
            response = await transport.handle_async_request(httpx.Request("GET", server.url()))
            assert response.content == b"ok"
            assert server.accepted == 2


async def test_stale_connection_is_retried_on_a_fresh_one() -> None:
    async def one_per_connection(r: Received) -> Reply | str:
        # The second request on a connection is read and dropped: the race where the server
        # closes an idle connection just as the client reuses it.
        return CLOSE if r.index > 0 else Reply(body=b"ok")

    with trio.fail_after(LIMIT):
        async with serve(one_per_connection) as server, PooledTransport() as transport:
            for _ in range(2):
                request = httpx.Request("POST", server.url(), content=b"x")
                assert (await transport.handle_async_request(request)).content == b"ok"
            assert server.accepted == 2
            assert [(r.conn_id, r.index) for r in server.requests] == [(1, 0), (1, 1), (2, 0)]


async def test_fresh_connection_closed_without_response_is_protocol_error() -> None:
    async def close(r: Received) -> str:
        return CLOSE

    with trio.fail_after(LIMIT):
        async with serve(close) as server, PooledTransport() as transport:
            with pytest.raises(httpx.RemoteProtocolError):
                await transport.handle_async_request(httpx.Request("GET", server.url()))
            assert server.accepted == 1  # no retry on a fresh connection


async def test_oversize_response_body_is_truncated() -> None:
    big = bytes(range(256)) * 40  # 10,240 bytes

    async def large(r: Received) -> Reply:
        return Reply(body=big)

    with trio.fail_after(LIMIT):
        async with (
            serve(large) as server,
            PooledTransport(max_response_body=1000) as transport,
        ):
            for _ in range(2):
                response = await transport.handle_async_request(httpx.Request("GET", server.url()))
                assert response.content == big[:1000]
            assert server.accepted == 2  # a truncated connection is closed, not pooled


async def test_resolve_hook_picks_the_address() -> None:
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        # Nothing listens on 127.0.0.2 (the server is bound to 127.0.0.1): the second is used.
        return ["127.0.0.2", "127.0.0.1"]

    with trio.fail_after(LIMIT):
        async with serve(ok) as server, PooledTransport(resolve=resolve) as transport:
            url = server.url("/via-resolve", host="example.invalid")
            response = await transport.handle_async_request(httpx.Request("GET", url))
            assert response.content == b"ok"
            assert calls == [("example.invalid", server.port)]
            assert server.requests[0].headers[b"host"] == f"example.invalid:{server.port}".encode()


async def test_cancellation_releases_the_slot() -> None:
    async def hang_or_ok(r: Received) -> Reply | str:
        return HANG if r.target == b"/hang" else Reply(body=b"ok")

    async def doomed(transport: PooledTransport, url: str) -> None:
        await transport.handle_async_request(httpx.Request("GET", url))

    with trio.fail_after(LIMIT):
        async with serve(hang_or_ok) as server, PooledTransport(max_connections=1) as transport:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(doomed, transport, server.url("/hang"))
                await server.wait_for(lambda: server.in_flight == 1)
                nursery.cancel_scope.cancel()
            await server.wait_for(lambda: server.disconnects == 1)  # that connection was closed
            request = httpx.Request("GET", server.url("/next"), extensions=timeout(pool=1))
            response = await transport.handle_async_request(request)
            assert response.content == b"ok"
            assert server.accepted == 2


async def test_works_as_async_client_transport() -> None:
    async def echo(r: Received) -> Reply:
        return Reply(headers=[(b"Content-Type", b"application/json")], body=r.body)

    with trio.fail_after(LIMIT):
        async with (
            serve(echo) as server,
            httpx.AsyncClient(transport=PooledTransport()) as client,
        ):
            response = await client.post(server.url(), json={"event": "ping"})
            assert response.status_code == 200
            assert response.json() == {"event": "ping"}
            response = await client.get(server.url(), timeout=httpx.Timeout(LIMIT, read=2))
            assert response.content == b""
            assert server.accepted == 1
