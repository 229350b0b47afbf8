"""PooledTransport against real loopback trio + h11 servers (no mocks)."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus

import h11
import httpx
import pytest
import trio

from hookgate.transport.fields import TOKEN
from hookgate.transport.pool import PooledTransport, RawResponse
from hookgate.transport.url import parse_url

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
            with pytest.raises(httpx.ConnectError) as info:
                request = httpx.Request("GET", f"http://127.0.0.1:{port}/")
                await transport.handle_async_request(request)
    assert str(info.value) == f"could not connect to 127.0.0.1:{port}: Connection refused"


async def test_connect_error_names_the_addresses_tried_and_says_why_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def resolve(host: str, port: int) -> list[str]:
        if host == "gone.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ["127.0.0.1", "127.0.0.2"] if host == "two.test" else ["127.0.0.1"]

    messages = []
    with trio.fail_after(LIMIT):
        async with PooledTransport(resolve=resolve) as transport:
            for host in ("127.0.0.1", "svc.test", "two.test", "gone.test"):
                with pytest.raises(httpx.ConnectError) as info:
                    await transport.send(parse_url(f"http://{host}:{port}/"), [], b"x", 5)
                messages.append(str(info.value))
    assert messages == [
        f"could not connect to 127.0.0.1:{port}: Connection refused",
        f"could not connect to svc.test:{port} (127.0.0.1): Connection refused",
        f"could not connect to two.test:{port} (127.0.0.1, 127.0.0.2): Connection refused",
        "could not resolve gone.test: Name or service not known",
    ]


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


# --- the fast path: PooledTransport.send --------------------------------------------------------


class RawConn:
    """The server side of one connection, for tests that need exact bytes in or out."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def read_request(self) -> bytes | None:
        """One request, head and Content-Length body, as received; None at EOF."""
        while b"\r\n\r\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
        size = int(length.group(1)) if length else 0
        while len(rest) < size:
            rest += await self.stream.receive_some(65536)
        self.buffer = rest[size:]
        return head + b"\r\n\r\n" + rest[:size]


@asynccontextmanager
async def raw_serve(handler: Callable[[RawConn], Awaitable[None]]) -> AsyncIterator[int]:
    """A server running `handler` on each connection; yields its port."""

    async def serve_connection(stream: trio.SocketStream) -> None:
        async with stream:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await handler(RawConn(stream))

    async with trio.open_nursery() as nursery:
        serve_tcp = partial(trio.serve_tcp, serve_connection, 0, host="127.0.0.1")
        listeners = await nursery.start(serve_tcp)
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


def ok_response(body: bytes = b"ok", *headers: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body) + b"".join(h + b"\r\n" for h in headers)
    return head + b"\r\n" + body


def has_no_request(exc: httpx.RequestError) -> bool:
    try:
        exc.request  # noqa: B018
    except RuntimeError:
        return True
    return False


def test_parse_url() -> None:
    target = parse_url("http://127.0.0.1:8080/hooks/in?x=1&y=%20#frag")
    assert (target.scheme, target.host, target.port) == ("http", "127.0.0.1", 8080)
    assert (target.host_header, target.path) == (b"127.0.0.1:8080", b"/hooks/in?x=1&y=%20")
    target = parse_url("https://user:pw@Example.COM")
    assert (target.host, target.port, target.host_header, target.path) == (
        "example.com",
        443,
        b"example.com",
        b"/",
    )
    assert parse_url("http://example.com:80/a b").path == b"/a%20b"
    assert parse_url("http://example.com:80/").host_header == b"example.com"  # the default port
    ipv6 = parse_url("http://[::1]:9000/")
    assert (ipv6.host, ipv6.port, ipv6.host_header) == ("::1", 9000, b"[::1]:9000")
    assert parse_url("http://bücher.example/").host == "xn--bcher-kva.example"
    assert parse_url("http://a.example/x") == parse_url("http://a.example/x")
    with pytest.raises(httpx.UnsupportedProtocol):
        parse_url("ftp://example.com/")
    with pytest.raises(httpx.InvalidURL):
        parse_url("http:///no-host")


async def test_send_round_trip() -> None:
    async def echo(r: Received) -> Reply:
        headers = [
            (b"X-Method", r.method),
            (b"X-Custom-Seen", r.headers.get(b"x-custom", b"")),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ]
        return Reply(201, headers, b"%s %s %s" % (r.method, r.target, r.body))

    with trio.fail_after(LIMIT):
        async with serve(echo) as server, PooledTransport() as transport:
            target = parse_url(server.url("/hook?b=1"))
            response = await transport.send(target, [("X-Custom", "yes")], b'{"x": 1}', 5)
            assert isinstance(response, RawResponse)
            assert response.status_code == 201
            assert response.content == b'POST /hook?b=1 {"x": 1}'
            assert not response.truncated
            assert response.headers == [
                ("content-length", "23"),
                ("x-method", "POST"),
                ("x-custom-seen", "yes"),
                ("set-cookie", "a=1"),  # repeated headers stay separate
                ("set-cookie", "b=2"),
            ]
            seen = server.requests[0].headers
            assert seen[b"host"] == f"127.0.0.1:{server.port}".encode()
            assert seen[b"content-length"] == b"8"
            assert seen[b"x-custom"] == b"yes"

            response = await transport.send(target, [], method="GET")
            assert response.content == b"GET /hook?b=1 "
            assert b"content-length" not in server.requests[1].headers  # no body, no framing


async def test_send_writes_exactly_the_request_given() -> None:
    requests: list[bytes] = []

    async def record(conn: RawConn) -> None:
        while (request := await conn.read_request()) is not None:
            requests.append(request)
            await conn.stream.send_all(ok_response())

    headers = [
        ("Content-Type", "application/json"),
        ("content-length", "999"),  # the transport frames the body itself
        ("Transfer-Encoding", "chunked"),
        ("X-Latin", "caf\xe9"),  # ISO-8859-1 goes out as is
        ("X-Tab", "a\tb"),
        ("X-Empty", ""),
    ]
    with trio.fail_after(LIMIT):
        async with raw_serve(record) as port, PooledTransport() as transport:
            target = parse_url(f"http://127.0.0.1:{port}/in?x=1")
            await transport.send(target, headers, b"abc", 5)
            await transport.send(target, [("Host", "virtual.example"), ("X-A", "1")], b"", 5)
    assert requests == [
        b"POST /in?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"X-Latin: caf\xe9\r\nX-Tab: a\tb\r\nX-Empty: \r\nContent-Length: 3\r\n\r\nabc" % port,
        b"POST /in?x=1 HTTP/1.1\r\nHost: virtual.example\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n",
    ]


@pytest.mark.parametrize(
    ("headers", "method"),
    [
        ([("X-Evil", "a\r\nInjected: 1")], "POST"),
        ([("X-Evil", "a\nb")], "POST"),
        ([("X-Evil", "nul\x00")], "POST"),
        ([("X-Evil", "snow\u2603")], "POST"),  # not ISO-8859-1
        ([("Bad Name", "x")], "POST"),
        ([("Bad:Name", "x")], "POST"),
        ([("Host", "a\r\nb")], "POST"),
        ([("Connection", "close\r\nX: y")], "POST"),
        ([], "PO ST"),
    ],
)
async def test_send_refuses_illegal_headers_before_connecting(
    headers: list[tuple[str, str]], method: str
) -> None:
    with trio.fail_after(LIMIT):
        async with serve(ok) as server, PooledTransport() as transport:
            with pytest.raises(httpx.LocalProtocolError) as info:
                await transport.send(parse_url(server.url()), headers, b"x", 5, method=method)
            assert has_no_request(info.value)
            assert server.accepted == 0
    # A refused value may be a credential: the error names the header, never the value.
    for name, value in headers:
        if TOKEN.fullmatch(name):  # refused for its value
            assert value not in str(info.value)
            assert repr(value)[1:-1] not in str(info.value)


async def test_send_keepalive_reuses_one_connection() -> None:
    with trio.fail_after(LIMIT):
        async with serve(ok) as server, PooledTransport() as transport:
            target = parse_url(server.url())
            for i in range(5):
                response = await transport.send(target, [("X-N", str(i))], b"x", 5)
                assert (response.status_code, response.content) == (200, b"ok")
            assert server.accepted == 1
            assert [r.index for r in server.requests] == [0, 1, 2, 3, 4]
            # Both entry points share the pool.
            await transport.handle_async_request(httpx.Request("GET", server.url()))
            assert server.accepted == 1


async def test_send_connection_close_header_is_honoured() -> None:
    with trio.fail_after(LIMIT):
        async with serve(ok) as server, PooledTransport() as transport:
            target = parse_url(server.url())
            for _ in range(2):
                response = await transport.send(target, [("Connection", "close")], b"x", 5)
                assert response.content == b"ok"
            assert server.accepted == 2  # h11 was told, so neither side kept the connection


async def test_send_head_response_has_no_body() -> None:
    async def head(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            # A HEAD response announces the length of the body it does not send.
            await conn.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")

    with trio.fail_after(LIMIT):
        async with raw_serve(head) as port, PooledTransport() as transport:
            target = parse_url(f"http://127.0.0.1:{port}/")
            for _ in range(2):  # and the connection is still usable afterwards
                response = await transport.send(target, [], timeout=5, method="HEAD")
                assert (response.status_code, response.content) == (200, b"")


async def test_send_one_timeout_covers_the_whole_exchange() -> None:
    async def trickle(conn: RawConn) -> None:
        await conn.read_request()
        # Each byte comes quickly, so no per-read timeout would fire, but the response never ends.
        for byte in ok_response(b"x" * 100):
            await conn.stream.send_all(bytes([byte]))
            await trio.sleep(0.05)

    with trio.fail_after(LIMIT):
        async with raw_serve(trickle) as port, PooledTransport() as transport:
            started = trio.current_time()
            with pytest.raises(httpx.ReadTimeout) as info:
                await transport.send(parse_url(f"http://127.0.0.1:{port}/"), [], b"x", 0.5)
            assert 0.5 <= trio.current_time() - started < 1.5
            assert isinstance(info.value, httpx.TimeoutException)
            assert has_no_request(info.value)


async def test_send_read_timeout_when_server_hangs() -> None:
    async def hang(r: Received) -> str:
        return HANG

    with trio.fail_after(LIMIT):
        async with serve(hang) as server, PooledTransport() as transport:
            started = trio.current_time()
            with pytest.raises(httpx.ReadTimeout):
                await transport.send(parse_url(server.url()), [], b"x", 0.3)
            assert 0.3 <= trio.current_time() - started < 1.3
            await server.wait_for(lambda: server.disconnects == 1)  # the client hung up


async def test_send_pool_timeout_when_all_slots_are_busy() -> None:
    async def hang(r: Received) -> str:
        return HANG

    with trio.fail_after(LIMIT):
        async with serve(hang) as server, PooledTransport(max_connections=1) as transport:
            target = parse_url(server.url())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(transport.send, target, [], b"x", LIMIT))
                await server.wait_for(lambda: server.in_flight == 1)
                started = trio.current_time()
                with pytest.raises(httpx.PoolTimeout, match=r"within 0\.2s: timed out waiting for a free"):
                    await transport.send(target, [], b"x", 0.2)
                assert 0.2 <= trio.current_time() - started < 1.2
                nursery.cancel_scope.cancel()
            assert server.accepted == 1


async def test_send_connect_timeout() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        await trio.sleep_forever()  # like a SYN into the void
        raise AssertionError

    with trio.fail_after(LIMIT):
        async with PooledTransport(resolve=resolve) as transport:
            with pytest.raises(httpx.ConnectTimeout):
                await transport.send(parse_url("http://example.invalid/"), [], b"x", 0.2)


async def test_send_write_timeout_when_server_does_not_read() -> None:
    async def deaf(conn: RawConn) -> None:
        await trio.sleep_forever()

    with trio.fail_after(LIMIT):
        async with raw_serve(deaf) as port, PooledTransport() as transport:
            body = b"x" * (64 * 1024 * 1024)  # more than the socket buffers on both sides hold
            with pytest.raises(httpx.WriteTimeout):
                await transport.send(parse_url(f"http://127.0.0.1:{port}/"), [], body, 0.5)


async def test_send_connect_error_on_closed_port() -> None:
    with socket.socket() as s:  # grab a free port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(LIMIT):
        async with PooledTransport() as transport:
            with pytest.raises(httpx.ConnectError) as info:
                await transport.send(parse_url(f"http://127.0.0.1:{port}/"), [], b"x", 5)
            assert "TLS" not in str(info.value)
            assert has_no_request(info.value)


async def test_send_tls_failure_is_connect_error() -> None:
    with trio.fail_after(LIMIT):
        async with serve(ok) as server, PooledTransport() as transport:
            target = parse_url(server.url().replace("http://", "https://"))
            with pytest.raises(httpx.ConnectError, match="TLS"):
                await transport.send(target, [], b"x", 5)


async def test_send_fresh_connection_closed_without_response_is_protocol_error() -> None:
    async def close(r: Received) -> str:
        return CLOSE

    with trio.fail_after(LIMIT):
        async with serve(close) as server, PooledTransport() as transport:
            with pytest.raises(httpx.RemoteProtocolError) as info:
                await transport.send(parse_url(server.url()), [], b"x", 5)
            assert has_no_request(info.value)
            assert server.accepted == 1  # no retry on a fresh connection


async def test_send_stale_connection_is_retried_on_a_fresh_one() -> None:
    async def one_per_connection(r: Received) -> Reply | str:
        return CLOSE if r.index > 0 else Reply(body=b"ok")

    with trio.fail_after(LIMIT):
        async with serve(one_per_connection) as server, PooledTransport() as transport:
            target = parse_url(server.url())
            for _ in range(2):
                assert (await transport.send(target, [], b"x", 5)).content == b"ok"
            assert server.accepted == 2
            assert [(r.conn_id, r.index) for r in server.requests] == [(1, 0), (1, 1), (2, 0)]


async def test_send_does_not_reuse_a_connection_with_bytes_after_the_response() -> None:
    async def double(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            # A broken server answering twice: the second answer must not be taken for the
            # response to the next request.
            await conn.stream.send_all(ok_response(b"one") + ok_response(b"two"))

    with trio.fail_after(LIMIT):
        async with raw_serve(double) as port, PooledTransport() as transport:
            target = parse_url(f"http://127.0.0.1:{port}/")
            assert [(await transport.send(target, [], b"x", 5)).content for _ in range(3)] == [b"one"] * 3


async def test_protocol_switch_is_an_error_not_a_hang() -> None:
    async def switch(conn: RawConn) -> None:
        while await conn.read_request() is not None:
            await conn.stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\nConnection: Upgrade\r\n\r\n"
            )

    # h11 pauses once the server agrees to switch; waiting for more HTTP from it would spin forever.
    with trio.fail_after(LIMIT):
        async with raw_serve(switch) as port, PooledTransport() as transport:
            url = f"http://127.0.0.1:{port}/"
            headers = [("Connection", "Upgrade"), ("Upgrade", "ws")]
            with pytest.raises(httpx.RemoteProtocolError, match="unexpected"):
                await transport.send(parse_url(url), headers, b"", 5)
            with pytest.raises(httpx.RemoteProtocolError, match="unexpected"):
                await transport.handle_async_request(httpx.Request("GET", url, headers=headers))


async def test_send_truncates_an_oversize_body() -> None:
    big = bytes(range(256)) * 40  # 10,240 bytes

    async def large(r: Received) -> Reply:
        return Reply(body=big)

    with trio.fail_after(LIMIT):
        async with serve(large) as server, PooledTransport(max_response_body=1000) as transport:
            target = parse_url(server.url())
            for _ in range(2):
                response = await transport.send(target, [], b"x", 5)
                assert (response.content, response.truncated) == (big[:1000], True)
            assert server.accepted == 2  # a truncated connection is closed, not pooled


async def test_send_uses_the_resolve_hook() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.2", "127.0.0.1"]  # nothing listens on 127.0.0.2

    with trio.fail_after(LIMIT):
        async with serve(ok) as server, PooledTransport(resolve=resolve) as transport:
            target = parse_url(server.url("/via", host="example.invalid"))
            assert (await transport.send(target, [], b"x", 5)).content == b"ok"
            assert server.requests[0].headers[b"host"] == f"example.invalid:{server.port}".encode()


async def test_send_cancellation_releases_the_slot() -> None:
    async def hang_or_ok(r: Received) -> Reply | str:
        return HANG if r.target == b"/hang" else Reply(body=b"ok")

    with trio.fail_after(LIMIT):
        async with serve(hang_or_ok) as server, PooledTransport(max_connections=1) as transport:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(transport.send, parse_url(server.url("/hang")), [], b"x", LIMIT))
                await server.wait_for(lambda: server.in_flight == 1)
                nursery.cancel_scope.cancel()
            await server.wait_for(lambda: server.disconnects == 1)  # that connection was closed
            response = await transport.send(parse_url(server.url("/next")), [], b"x", 1)
            assert response.content == b"ok"
            assert server.accepted == 2
