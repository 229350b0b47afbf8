"""PooledTransport through a forward proxy: a real (tiny) proxy and real targets on loopback.

The proxy here speaks just enough HTTP/1.1: CONNECT (it connects to the target and splices bytes
both ways) and absolute-form requests (it forwards them to the target, Host as received), and it
records what it saw. It refuses to go anywhere but 127.0.0.1. The https target has a certificate
for the name "target.test", issued at test time by a test CA that the client trusts.
"""

from __future__ import annotations

import base64
import datetime
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hookgate.transport.pool import PooledTransport
from hookgate.transport.proxy import Proxy, ProxyConnectError, parse_proxy
from hookgate.transport.ssrf import EgressGuard, SsrfRefused
from hookgate.transport.url import parse_url
from tests.test_transport import LIMIT, Handler, RawConn, Received, Reply, Server, has_no_request, ok, serve

NAME = "target.test"  # the targets' name; the test resolver maps it to 127.0.0.1
USER, PASSWORD = "hook gate", "p@ss:w0rd/é"  # characters that must be percent-encoded in a URL
CREDENTIALS = "hook%20gate:p%40ss%3Aw0rd%2F%C3%A9"
TOKEN = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())


# --- a forward proxy -----------------------------------------------------------------------------


@dataclass
class Seen:
    """One request the proxy received."""

    line: bytes  # the request line
    headers: dict[bytes, bytes]  # lower-cased names
    head: bytes  # exactly as received, up to and including the blank line
    conn_id: int  # 1-based, in accept order


@dataclass
class ForwardProxy:
    require: bytes | None = None  # a Proxy-Authorization value to insist on (407 otherwise)
    status: int | None = None  # answer every request with this instead of passing it on
    hang: bool = False  # read the request, never answer
    port: int = 0
    accepted: int = 0
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        conn_id = self.accepted
        conn = RawConn(stream)
        async with stream:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while (raw := await conn.read_request()) is not None:
                    head, _, body = raw.partition(b"\r\n\r\n")
                    line, *lines = head.split(b"\r\n")
                    headers = {}
                    for header in lines:
                        name, _, value = header.partition(b":")
                        headers[name.strip().lower()] = value.strip()
                    self.seen.append(Seen(line, headers, head + b"\r\n\r\n", conn_id))
                    if self.hang:
                        await trio.sleep_forever()
                    method, target, _ = line.split(b" ")
                    status = self.status
                    if self.require is not None and headers.get(b"proxy-authorization") != self.require:
                        status = 407
                    if status is not None:
                        await stream.send_all(_refusal(status))
                        if method == b"CONNECT":
                            return
                    elif method == b"CONNECT":
                        host, _, port = target.decode().rpartition(":")
                        await self._splice(stream, conn.buffer, host, int(port))
                        return
                    else:
                        await stream.send_all(await self._forward(method, target, lines, body))

    @staticmethod
    async def _splice(client: trio.SocketStream, leftover: bytes, host: str, port: int) -> None:
        assert host == "127.0.0.1", host  # loopback only, whatever the client asks for
        async with await trio.open_tcp_stream(host, port) as upstream:
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await upstream.send_all(leftover)
            async with trio.open_nursery() as nursery:

                async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while data := await source.receive_some(65536):
                            await sink.send_all(data)
                    nursery.cancel_scope.cancel()  # one side is done: so is the tunnel

                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)

    @staticmethod
    async def _forward(method: bytes, target: bytes, lines: list[bytes], body: bytes) -> bytes:
        url = httpx.URL(target.decode())
        assert (url.scheme, url.host) == ("http", "127.0.0.1"), url  # loopback only
        hop_by_hop = (b"proxy-authorization", b"connection", b"proxy-connection")
        kept = [line for line in lines if line.partition(b":")[0].strip().lower() not in hop_by_hop]
        request = b"\r\n".join([b"%s %s HTTP/1.1" % (method, url.raw_path), *kept, b"Connection: close"])
        async with await trio.open_tcp_stream("127.0.0.1", url.port or 80) as upstream:
            await upstream.send_all(request + b"\r\n\r\n" + body)
            response = b""
            while chunk := await upstream.receive_some(65536):
                response += chunk
        head, _, rest = response.partition(b"\r\n\r\n")
        # The target closes after answering (we asked it to); the client may keep its connection.
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        return b"\r\n".join(lines) + b"\r\n\r\n" + rest


def _refusal(status: int) -> bytes:
    body = b"<html>no</html>"
    return b'HTTP/1.1 %d %s\r\nProxy-Authenticate: Basic realm="test"\r\nContent-Length: %d\r\n\r\n%s' % (
        status,
        HTTPStatus(status).phrase.encode(),
        len(body),
        body,
    )


@asynccontextmanager
async def proxy_server(**kwargs: Any) -> AsyncIterator[ForwardProxy]:
    proxy = ForwardProxy(**kwargs)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


# --- a TLS target --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    cert_file: Path
    key_file: Path
    ca_pem: str

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hookgate test CA")])

    def builder(subject: str | x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        name = (
            subject
            if isinstance(subject, x509.Name)
            else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        )
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )

    usage = dict.fromkeys(
        ["content_commitment", "key_encipherment", "data_encipherment", "key_agreement"], False
    )
    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
                **usage,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        builder(NAME, key.public_key())
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("certs")
    cert_file, key_file = folder / "target.pem", folder / "target.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Certs(cert_file, key_file, ca.public_bytes(serialization.Encoding.PEM).decode())


@dataclass
class TlsServer:
    server: Server
    sni: list[str | None]  # the server name each handshake asked for

    @property
    def port(self) -> int:
        return self.server.port


@asynccontextmanager
async def serve_tls(handler: Handler, certs: Certs) -> AsyncIterator[TlsServer]:
    server = Server(handler)
    tls = TlsServer(server, [])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    context.sni_callback = lambda _sock, name, _context: tls.sni.append(name)

    async def serve_connection(stream: trio.SocketStream) -> None:
        wrapped = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        try:
            await wrapped.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(stream)
            return
        await server.serve_connection(wrapped)  # type: ignore[arg-type]  # any trio Stream works

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_connection, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield tls
        finally:
            nursery.cancel_scope.cancel()


# --- helpers -------------------------------------------------------------------------------------


class Refused(Exception):
    """What the test resolver raises for a name it refuses, like the SSRF guard's SsrfRefused."""


def resolver(
    calls: list[tuple[str, int]] | None = None, refuse: tuple[str, ...] = ()
) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        if host in refuse:
            raise Refused(f"refused {host}")
        return ["127.0.0.1"]

    return resolve


async def echo(r: Received) -> Reply:
    return Reply(
        200, [(b"X-Host-Seen", r.headers.get(b"host", b""))], b"%s %s %s" % (r.method, r.target, r.body)
    )


def closed_port() -> int:
    with socket.socket() as s:  # grab a free port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- tests ---------------------------------------------------------------------------------------


async def test_http_target_goes_through_the_proxy_in_absolute_form() -> None:
    calls: list[tuple[str, int]] = []
    with trio.fail_after(LIMIT):
        async with serve(echo) as target, proxy_server() as proxy:
            transport = PooledTransport(proxy=proxy.url, resolve=resolver(calls))
            async with transport:
                hook = parse_url(f"http://{NAME}:{target.port}/hook?x=1")
                for i in range(2):
                    response = await transport.send(hook, [("X-N", str(i))], b"abc", 5)
                    assert (response.status_code, response.content) == (200, b"POST /hook?x=1 abc")
                    assert ("x-host-seen", f"{NAME}:{target.port}") in response.headers
    # The proxy was given the vetted address in the request line, and the name in Host.
    assert proxy.seen[0].head == (
        b"POST http://127.0.0.1:%d/hook?x=1 HTTP/1.1\r\nHost: target.test:%d\r\nX-N: 0\r\n"
        b"Content-Length: 3\r\n\r\n" % (target.port, target.port)
    )
    assert [s.line for s in proxy.seen] == [b"POST http://127.0.0.1:%d/hook?x=1 HTTP/1.1" % target.port] * 2
    assert b"proxy-authorization" not in proxy.seen[0].headers  # no credentials configured
    # One proxy connection for both, vetted once, like a direct connection.
    assert [s.conn_id for s in proxy.seen] == [1, 1]
    assert proxy.accepted == 1
    assert calls == [(NAME, target.port)]
    assert [(r.method, r.target, r.body) for r in target.requests] == [(b"POST", b"/hook?x=1", b"abc")] * 2


async def test_http_target_through_the_proxy_via_httpx_client() -> None:
    with trio.fail_after(LIMIT):
        async with serve(echo) as target, proxy_server() as proxy:
            transport = PooledTransport(proxy=proxy.url, resolve=resolver())
            async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
                response = await client.get(f"http://{NAME}:{target.port}/a?b=1", headers={"X-A": "1"})
                assert response.content == b"GET /a?b=1 "
                response = await client.post(f"http://{NAME}:{target.port}/p", content=b"xyz")
                assert response.content == b"POST /p xyz"
    assert [s.line for s in proxy.seen] == [
        b"GET http://127.0.0.1:%d/a?b=1 HTTP/1.1" % target.port,
        b"POST http://127.0.0.1:%d/p HTTP/1.1" % target.port,
    ]
    assert {s.headers[b"host"] for s in proxy.seen} == {b"target.test:%d" % target.port}
    assert proxy.seen[0].headers[b"x-a"] == b"1"
    assert proxy.accepted == 1


async def test_https_target_goes_through_a_connect_tunnel(certs: Certs) -> None:
    calls: list[tuple[str, int]] = []
    with trio.fail_after(LIMIT):
        async with serve_tls(echo, certs) as tls, proxy_server() as proxy:
            transport = PooledTransport(
                proxy=proxy.url, resolve=resolver(calls), ssl_context=certs.client_context()
            )
            async with transport:
                hook = parse_url(f"https://{NAME}:{tls.port}/hook")
                for _ in range(2):
                    response = await transport.send(hook, [], b"secret body", 5)
                    assert response.content == b"POST /hook secret body"
                # The other entry point shares the pool, hence the tunnel.
                async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
                    got = await client.get(f"https://{NAME}:{tls.port}/get")
                    assert got.content == b"GET /get "
    # One CONNECT, to the vetted address, with a matching Host header.
    authority = b"127.0.0.1:%d" % tls.port
    assert proxy.seen[0].head == b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)
    assert len(proxy.seen) == proxy.accepted == 1  # the rest went through the tunnel, encrypted
    assert calls == [(NAME, tls.port)]
    # Inside the tunnel: TLS to the name (SNI, verified against it) and the name in Host.
    assert tls.sni == [NAME]
    assert tls.server.accepted == 1
    assert [r.headers[b"host"] for r in tls.server.requests] == [b"target.test:%d" % tls.port] * 3


async def test_a_tunnel_closed_by_the_target_is_replaced(certs: Certs) -> None:
    async def once(r: Received) -> Reply:
        return Reply(body=b"ok", close_after=True)

    with trio.fail_after(LIMIT):
        async with serve_tls(once, certs) as tls, proxy_server() as proxy:
            transport = PooledTransport(
                proxy=proxy.url, resolve=resolver(), ssl_context=certs.client_context()
            )
            async with transport:
                hook = parse_url(f"https://{NAME}:{tls.port}/")
                for _ in range(2):
                    assert (await transport.send(hook, [], b"x", 5)).content == b"ok"
                    await tls.server.wait_for(lambda: tls.server.disconnects == tls.server.accepted)
    assert [s.line.split(b" ")[0] for s in proxy.seen] == [b"CONNECT", b"CONNECT"]
    assert tls.server.accepted == 2


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_proxy_credentials_are_sent_to_the_proxy_only_and_never_shown(
    scheme: str, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = (PASSWORD, "p%40ss", TOKEN.decode(), TOKEN.split()[1].decode())
    with trio.fail_after(LIMIT):
        async with (
            serve(echo) as plain,
            serve_tls(echo, certs) as tls,
            proxy_server(require=TOKEN) as proxy,
        ):
            port = plain.port if scheme == "http" else tls.port
            url = f"{scheme}://{NAME}:{port}/hook"
            ssl_context = certs.client_context()
            good = PooledTransport(
                proxy=f"http://{CREDENTIALS}@127.0.0.1:{proxy.port}",
                resolve=resolver(),
                ssl_context=ssl_context,
            )
            async with good:
                assert (await good.send(parse_url(url), [], b"x", 5)).status_code == 200
            assert proxy.seen[-1].headers[b"proxy-authorization"] == TOKEN
            target = plain if scheme == "http" else tls.server
            assert b"proxy-authorization" not in target.requests[0].headers  # not past the proxy

            bad = PooledTransport(
                proxy=f"http://{USER}:wrong@127.0.0.1:{proxy.port}",
                resolve=resolver(),
                ssl_context=ssl_context,
            )
            async with bad:
                with pytest.raises(ProxyConnectError) as info:
                    await bad.send(parse_url(url), [], b"x", 5)
            assert proxy.seen[-1].headers[b"proxy-authorization"] == b"Basic " + base64.b64encode(
                f"{USER}:wrong".encode()
            )
    message = str(info.value)
    assert f"proxy 127.0.0.1:{proxy.port} refused" in message
    assert "407 Proxy Authentication Required" in message
    assert "rejected the credentials" in message
    assert "wrong" not in message and USER not in message
    assert isinstance(info.value, httpx.ConnectError) and isinstance(info.value, httpx.ProxyError)
    assert has_no_request(info.value)
    for secret in secrets:
        assert secret not in caplog.text
        assert secret not in message
    assert PASSWORD not in repr(parse_proxy(f"http://{CREDENTIALS}@proxy.example:3128"))


@pytest.mark.parametrize(
    ("status", "shown"),
    [
        (407, "407 Proxy Authentication Required (the proxy requires credentials"),
        (403, "403 Forbidden"),
        (502, "502 Bad Gateway"),
    ],
)
async def test_connect_refused_by_the_proxy_is_a_clear_connect_error(status: int, shown: str) -> None:
    with trio.fail_after(LIMIT):
        async with (
            serve(ok) as target,
            proxy_server(status=status) as proxy,
            PooledTransport(proxy=proxy.url, resolve=resolver()) as transport,
        ):
            with pytest.raises(ProxyConnectError) as info:
                await transport.send(parse_url(f"https://{NAME}:{target.port}/"), [], b"x", 5)
            # The httpx entry point reports the same, with the request attached.
            request = httpx.Request("POST", f"https://{NAME}:{target.port}/", content=b"x")
            with pytest.raises(httpx.ConnectError, match=str(status)) as via_httpx:
                await transport.handle_async_request(request)
            assert via_httpx.value.request is request
    message = str(info.value)
    assert message.startswith(f"proxy 127.0.0.1:{proxy.port} refused to open a tunnel to 127.0.0.1:")
    assert shown in message
    assert "TLS" not in message and "SSL" not in message  # the dispatcher would call it a TLS failure
    assert isinstance(info.value, httpx.ConnectError)
    assert target.accepted == 0


async def test_407_to_an_absolute_form_request_is_a_proxy_error() -> None:
    with trio.fail_after(LIMIT):
        async with (
            serve(ok) as target,
            proxy_server(status=407) as proxy,
            PooledTransport(proxy=proxy.url, resolve=resolver()) as transport,
        ):
            with pytest.raises(ProxyConnectError, match="407 Proxy Authentication Required"):
                await transport.send(parse_url(f"http://{NAME}:{target.port}/"), [], b"x", 5)
    assert target.accepted == 0


async def test_proxy_down_is_a_connect_error() -> None:
    port = closed_port()
    with trio.fail_after(LIMIT):
        async with serve(ok) as target:
            transport = PooledTransport(proxy=f"http://{CREDENTIALS}@127.0.0.1:{port}", resolve=resolver())
            async with transport:
                for scheme in ("http", "https"):
                    with pytest.raises(httpx.ConnectError) as info:
                        await transport.send(parse_url(f"{scheme}://{NAME}:{target.port}/"), [], b"x", 5)
                    assert isinstance(info.value, ProxyConnectError)
                    message = str(info.value)
                    assert message == f"could not connect to proxy 127.0.0.1:{port}: Connection refused"
                    assert "TLS" not in message and PASSWORD not in message and "p%40ss" not in message
            assert target.accepted == 0


async def test_refused_target_raises_before_the_proxy_sees_anything() -> None:
    calls: list[tuple[str, int]] = []
    with trio.fail_after(LIMIT):
        async with proxy_server() as proxy:
            transport = PooledTransport(proxy=proxy.url, resolve=resolver(calls, refuse=("internal.test",)))
            async with transport:
                for scheme in ("http", "https"):
                    with pytest.raises(Refused):
                        await transport.send(parse_url(f"{scheme}://internal.test:8080/"), [], b"x", 5)
                    with pytest.raises(Refused):
                        await transport.handle_async_request(
                            httpx.Request("GET", f"{scheme}://internal.test/")
                        )
            # With the real guard: loopback is refused, whether or not a proxy would carry it.
            async with PooledTransport(proxy=proxy.url, resolve=EgressGuard().resolve) as guarded:
                for scheme in ("http", "https"):
                    with pytest.raises(SsrfRefused, match="loopback"):
                        await guarded.send(parse_url(f"{scheme}://127.0.0.1:{proxy.port}/"), [], b"x", 5)
    assert calls == [
        ("internal.test", 8080),
        ("internal.test", 80),
        ("internal.test", 8080),
        ("internal.test", 443),
    ]
    assert proxy.accepted == 0
    assert proxy.seen == []


async def test_the_real_guard_vets_targets_but_not_the_proxy() -> None:
    # The proxy is on loopback, which the guard refuses; it is not vetted. The target is allowed.
    guard = EgressGuard(["127.0.0.0/8"])
    with trio.fail_after(LIMIT):
        async with (
            serve(echo) as target,
            proxy_server() as proxy,
            PooledTransport(proxy=proxy.url, resolve=guard.resolve) as transport,
        ):
            response = await transport.send(parse_url(f"http://127.0.0.1:{target.port}/g"), [], b"", 5)
            assert response.content == b"POST /g "
    assert proxy.seen[0].line == b"POST http://127.0.0.1:%d/g HTTP/1.1" % target.port


async def test_without_a_resolve_hook_the_proxy_gets_the_name() -> None:
    with trio.fail_after(LIMIT):
        async with proxy_server(status=502) as proxy, PooledTransport(proxy=proxy.url) as transport:
            with pytest.raises(ProxyConnectError, match="502"):
                await transport.send(parse_url(f"https://{NAME}:8443/"), [], b"x", 5)
            response = await transport.send(parse_url(f"http://{NAME}/x"), [], b"", 5, method="GET")
            assert response.status_code == 502  # only 407 is known to be the proxy's own answer
    assert [s.line for s in proxy.seen] == [
        b"CONNECT target.test:8443 HTTP/1.1",
        b"GET http://target.test:80/x HTTP/1.1",
    ]


async def test_tls_failure_inside_the_tunnel_is_a_tls_connect_error(certs: Certs) -> None:
    with trio.fail_after(LIMIT):
        async with serve(ok) as plain, proxy_server() as proxy:  # plain http where https is expected
            transport = PooledTransport(
                proxy=proxy.url, resolve=resolver(), ssl_context=certs.client_context()
            )
            async with transport:
                with pytest.raises(httpx.ConnectError, match=r"TLS handshake with target\.test") as info:
                    await transport.send(parse_url(f"https://{NAME}:{plain.port}/"), [], b"x", 5)
    assert f"through proxy 127.0.0.1:{proxy.port}" in str(info.value)
    assert not isinstance(info.value, ProxyConnectError)


async def test_connect_timeout_when_the_proxy_does_not_answer_connect() -> None:
    with trio.fail_after(LIMIT):
        async with (
            proxy_server(hang=True) as proxy,
            PooledTransport(proxy=proxy.url, resolve=resolver()) as transport,
        ):
            with pytest.raises(httpx.ConnectTimeout, match="timed out connecting"):
                await transport.send(parse_url(f"https://{NAME}/"), [], b"x", 0.3)
    assert proxy.seen[0].line == b"CONNECT 127.0.0.1:443 HTTP/1.1"


def test_parse_proxy() -> None:
    assert parse_proxy("http://proxy:3128") == Proxy("proxy", 3128)
    assert parse_proxy("http://proxy.example/") == Proxy("proxy.example", 80)
    assert parse_proxy("http://[::1]:3128").address == "[::1]:3128"
    with_auth = parse_proxy(f"http://{CREDENTIALS}@proxy:3128")
    assert with_auth.authorization == TOKEN
    assert with_auth.address == "proxy:3128"
    assert PASSWORD not in repr(with_auth) and TOKEN.decode() not in repr(with_auth)
    assert parse_proxy("http://user@proxy:3128").authorization == b"Basic " + base64.b64encode(b"user:")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://user:secret@proxy:3128", "https:// proxies (TLS to the proxy) are not supported"),
        ("socks5://user:secret@proxy:1080", "unsupported scheme"),
        ("http://user:secret@proxy:3128/path", "a proxy URL has no path"),
        ("http://user:secret@:3128", "no host"),
        ("http://user:secret@proxy:99999", "invalid port 99999"),
        ("http://user:secret@proxy:port", "invalid proxy URL"),
        ("proxy:3128", "unsupported scheme"),
    ],
)
def test_parse_proxy_refuses_what_it_does_not_support(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        parse_proxy(url)
    assert "secret" not in str(info.value)
    if "@" in url:
        assert "***@" in str(info.value)
    with pytest.raises(ValueError, match=re.escape(problem)):
        PooledTransport(proxy=url)
