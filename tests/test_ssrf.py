"""The SSRF guard: address categories, the allowlist, and the guard in front of the real transport.

No traffic ever goes to a non-loopback address: refusals of 10.0.0.1 and 169.254.169.254 are
shown to happen in resolution, before a socket exists. Names other than `localhost` are answered
by a fake DNS installed with trio's own hook (`set_custom_hostname_resolver`); the transport and
the HTTP server are real.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import httpx
import pytest
import trio

from hookgate.transport.pool import PooledTransport
from hookgate.transport.ssrf import EgressGuard, SsrfRefused

LOOPBACK = ["127.0.0.0/8", "::1/128"]

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("169.254.0.1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("100.64.0.1", "shared"),
    ("100.127.255.254", "shared"),
    ("192.0.0.8", "reserved"),
    ("192.0.2.1", "reserved"),
    ("198.18.0.1", "reserved"),
    ("198.19.255.255", "reserved"),
    ("198.51.100.7", "reserved"),
    ("203.0.113.9", "reserved"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "private"),
    ("fe80::1", "link-local"),
    ("fe80::1%1", "link-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "reserved"),
    ("100::1", "reserved"),
    ("::127.0.0.1", "reserved"),  # deprecated IPv4-compatible form, outside global unicast
    ("64:ff9b:1::a00:1", "reserved"),  # local-use NAT64, outside global unicast
    # IPv4 embedded in IPv6 is judged as the IPv4 address it reaches.
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("64:ff9b::127.0.0.1", "loopback"),  # NAT64
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:c0a8:101::1", "private"),  # 6to4 of 192.168.1.1
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
]
PUBLIC = [
    "1.1.1.1",
    "8.8.8.8",
    "93.184.215.14",
    "100.63.255.255",
    "100.128.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "192.169.0.1",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize(("address", "category"), REFUSED)
def test_refused_categories(address: str, category: str) -> None:
    found = EgressGuard().refusal(ipaddress.ip_address(address))
    assert found is not None and found[0] == category


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert EgressGuard().refusal(ipaddress.ip_address(address)) is None


def test_agrees_with_ipaddress_where_its_properties_are_reliable() -> None:
    for address in [*(a for a, _ in REFUSED), *PUBLIC]:
        ip = ipaddress.ip_address(address)
        unsafe = ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
        if unsafe:
            assert EgressGuard().refusal(ip) is not None, address
        if ip.version == 4 and (ip.is_private or ip.is_reserved):
            assert EgressGuard().refusal(ip) is not None, address


def test_allowlist_opens_only_its_ranges() -> None:
    guard = EgressGuard(["10.0.0.0/8", "169.254.169.254/32", "fd00::/8", "fe80::/10"])
    for allowed in ["10.0.0.1", "10.255.0.9", "169.254.169.254", "fd00::5", "fe80::1%1", "::ffff:10.0.0.1"]:
        assert guard.refusal(ipaddress.ip_address(allowed)) is None, allowed
    for refused in ["127.0.0.1", "192.168.0.1", "169.254.169.253", "fc00::1", "::1"]:
        assert guard.refusal(ipaddress.ip_address(refused)) is not None, refused
    assert EgressGuard(["::ffff:0:0/96"]).refusal(ipaddress.ip_address("::ffff:127.0.0.1")) is None
    assert EgressGuard(["127.0.0.1"]).allow_networks == [ipaddress.ip_network("127.0.0.1/32")]


def test_bad_cidr_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"'10.0.0.1/8' is not a valid CIDR.*did you mean 10.0.0.0/8\?"):
        EgressGuard(["10.0.0.1/8"])
    with pytest.raises(ValueError, match=r"egress.allow_networks: 'intranet' is not a valid CIDR"):
        EgressGuard(["127.0.0.0/8", "intranet"])
    with pytest.raises(ValueError, match=r"'::1/129'"):
        EgressGuard(["::1/129"])


def test_check_url_refuses_literal_ips_in_every_form() -> None:
    guard = EgressGuard()
    for url in [
        "http://127.0.0.1:8080/hook",
        "https://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:80/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1%25eth0]/",
        "http://127.1/",  # what the resolver would make of these: 127.0.0.1
        "http://2130706433/",
        "http://0x7f.0.0.1/",
    ]:
        with pytest.raises(SsrfRefused, match=r"egress\.allow_networks"):
            guard.check_url(url)
    with pytest.raises(ValueError, match="invalid URL"):  # httpx refuses this form outright
        guard.check_url("http://0177.0.0.1/")
    guard.check_url("http://93.184.215.14/")
    guard.check_url("https://example.com/hook")  # names are checked by resolve, after DNS
    guard.check_url("http://localhost/")
    EgressGuard(LOOPBACK).check_url("http://127.0.0.1:8080/hook")
    EgressGuard(LOOPBACK).check_url("http://[::1]:8080/hook")


def test_refusal_message_names_host_address_and_reason() -> None:
    with pytest.raises(SsrfRefused) as info:
        EgressGuard().check_url("http://169.254.169.254/latest/meta-data/")
    exc = info.value
    assert (exc.host, exc.address, exc.category) == ("169.254.169.254", "169.254.169.254", "link-local")
    assert str(exc) == (
        "refused to connect to 169.254.169.254: it is a link-local address (where cloud metadata "
        "services live); add it to egress.allow_networks to allow it"
    )
    with pytest.raises(SsrfRefused, match=r"it is 127\.0\.0\.1, a loopback address"):
        EgressGuard().check_url("http://127.1/")


def test_https_only_and_schemes() -> None:
    strict = EgressGuard(https_only=True)
    strict.check_url("https://example.com/")
    with pytest.raises(SsrfRefused, match="https_only") as info:
        strict.check_url("http://example.com/")
    assert info.value.category == "scheme"
    EgressGuard().check_url("http://example.com/")
    with pytest.raises(SsrfRefused, match="only http and https"):
        EgressGuard().check_url("file:///etc/passwd")
    with pytest.raises(SsrfRefused, match="loopback"):  # both rules apply
        EgressGuard(https_only=True).check_url("https://127.0.0.1/")


# --- resolution ------------------------------------------------------------------------------


@dataclass
class FakeDns(trio.abc.HostnameResolver):
    """Answers for made-up names; each lookup takes the next answer (the last one repeats)."""

    answers: dict[str, list[list[str]]]
    lookups: list[str] = field(default_factory=list)

    async def getaddrinfo(self, host: bytes | None, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = (host or b"").decode()
        if name not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, f"unknown test name {name!r}")
        n = sum(1 for looked in self.lookups if looked == name)
        self.lookups.append(name)
        addresses = self.answers[name][min(n, len(self.answers[name]) - 1)]
        infos: list[Any] = []
        for address in addresses:
            if ":" in address:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return infos

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


@contextmanager
def fake_dns(**answers: list[list[str]]) -> Iterator[FakeDns]:
    dns = FakeDns({name.replace("_", "."): a for name, a in answers.items()})
    previous = trio.socket.set_custom_hostname_resolver(dns)
    try:
        yield dns
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


class CountingSockets(trio.abc.SocketFactory):
    """Counts the sockets trio creates, to prove that a refusal came before any connection."""

    def __init__(self) -> None:
        self.created = 0

    def socket(self, family: Any = socket.AF_INET, type: Any = socket.SOCK_STREAM, proto: int = 0) -> Any:
        self.created += 1
        return trio.socket.from_stdlib_socket(socket.socket(family, type, proto))


@contextmanager
def counting_sockets() -> Iterator[CountingSockets]:
    factory = CountingSockets()
    previous = trio.socket.set_custom_socket_factory(factory)
    try:
        yield factory
    finally:
        trio.socket.set_custom_socket_factory(previous)


async def test_resolve_localhost() -> None:
    with trio.fail_after(5):
        with pytest.raises(SsrfRefused, match=r"refused to connect to localhost: it resolves to (127\.|::1)"):
            await EgressGuard().resolve("localhost", 80)
        addresses = await EgressGuard(LOOPBACK).resolve("localhost", 80)
    assert addresses and set(addresses) <= {"127.0.0.1", "::1"}


async def test_resolve_literal_ips_without_dns() -> None:
    with fake_dns() as dns:  # knows no names: any DNS lookup would fail
        assert await EgressGuard().resolve("93.184.215.14", 80) == ["93.184.215.14"]
        assert await EgressGuard().resolve("2606:4700:4700::1111", 443) == ["2606:4700:4700::1111"]
        assert await EgressGuard(LOOPBACK).resolve("127.0.0.1", 80) == ["127.0.0.1"]
        assert await EgressGuard(LOOPBACK).resolve("[::1]", 80) == ["::1"]
        for host in ["10.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "2130706433", "fe80::1%1"]:
            with pytest.raises(SsrfRefused):
                await EgressGuard().resolve(host, 80)
    assert dns.lookups == []


async def test_resolve_drops_refused_addresses_and_keeps_order() -> None:
    with fake_dns(
        mixed_test=[["10.0.0.1", "93.184.215.14", "fd00::1", "2606:4700::1", "93.184.215.14"]],
        internal_test=[["10.1.2.3", "fd00::1", "10.1.2.3"]],
        metadata_test=[["169.254.169.254"]],
    ):
        guard = EgressGuard()
        assert await guard.resolve("mixed.test", 443) == ["93.184.215.14", "2606:4700::1"]
        with pytest.raises(SsrfRefused) as info:
            await guard.resolve("internal.test", 443)
        assert (info.value.host, info.value.address, info.value.category) == (
            "internal.test",
            "10.1.2.3",
            "private",
        )
        assert str(info.value) == (
            "refused to connect to internal.test: it resolves to 10.1.2.3, which is a private (RFC 1918) "
            "address (also refused: fd00::1); add it to egress.allow_networks to allow it"
        )
        with pytest.raises(SsrfRefused, match="link-local"):
            await guard.resolve("metadata.test", 80)
        assert await EgressGuard(["10.0.0.0/8"]).resolve("internal.test", 443) == ["10.1.2.3"]


async def test_lookup_failure_stays_an_os_error() -> None:
    with fake_dns(), pytest.raises(OSError):  # the transport reports it as a (retryable) ConnectError
        await EgressGuard().resolve("nxdomain.test", 80)


# --- with the real transport -----------------------------------------------------------------


@dataclass
class Server:
    port: int = 0
    accepted: int = 0
    requests: list[h11.Request] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Request):
                    self.requests.append(event)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            response = h11.Response(
                status_code=200, headers=[("Content-Length", "2"), ("Connection", "close")]
            )
            await stream.send_all(
                conn.send(response) + conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage())
            )


@asynccontextmanager
async def serve() -> AsyncIterator[Server]:
    server = Server()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def post(url: str) -> httpx.Request:
    return httpx.Request(
        "POST", url, content=b'{"type":"x"}', extensions={"timeout": httpx.Timeout(5).as_dict()}
    )


async def test_transport_refuses_loopback_by_default_and_allows_it_when_listed() -> None:
    with trio.fail_after(5):
        async with serve() as server:
            urls = [f"http://127.0.0.1:{server.port}/hook", f"http://localhost:{server.port}/hook"]
            async with PooledTransport(resolve=EgressGuard().resolve) as transport:
                for url in urls:
                    with pytest.raises(SsrfRefused, match="loopback"):
                        await transport.handle_async_request(post(url))
            assert server.accepted == 0 and server.requests == []

            async with PooledTransport(resolve=EgressGuard(LOOPBACK).resolve) as transport:
                for url in urls:
                    response = await transport.handle_async_request(post(url))
                    assert (response.status_code, response.content) == (200, b"ok")
            assert [r.target for r in server.requests] == [b"/hook", b"/hook"]
            assert dict(server.requests[1].headers)[b"host"] == f"localhost:{server.port}".encode()


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/"])
async def test_transport_refuses_internal_targets_before_any_connection(url: str) -> None:
    async with PooledTransport(resolve=EgressGuard().resolve) as transport:
        with counting_sockets() as sockets, trio.fail_after(1), pytest.raises(SsrfRefused) as info:
            await transport.handle_async_request(post(url))
    assert sockets.created == 0
    assert info.value.address == httpx.URL(url).host


async def test_transport_refuses_a_name_resolving_to_metadata_before_any_connection() -> None:
    with fake_dns(metadata_test=[["169.254.169.254"]]) as dns:
        async with PooledTransport(resolve=EgressGuard().resolve) as transport:
            with (
                counting_sockets() as sockets,
                trio.fail_after(1),
                pytest.raises(SsrfRefused, match="link-local"),
            ):
                await transport.handle_async_request(post("http://metadata.test/"))
    assert sockets.created == 0 and dns.lookups == ["metadata.test"]


async def test_transport_connects_to_the_checked_address_no_dns_rebinding() -> None:
    # The name answers 127.0.0.1 (allowed here) at first, then rebinds to 10.0.0.1.
    with fake_dns(rebind_test=[["127.0.0.1"], ["10.0.0.1"]]) as dns:
        async with serve() as server:
            guard = EgressGuard(["127.0.0.0/8"])
            async with PooledTransport(resolve=guard.resolve, keepalive_expiry=0) as transport:
                with trio.fail_after(5):
                    response = await transport.handle_async_request(
                        post(f"http://rebind.test:{server.port}/")
                    )
                assert response.status_code == 200
                # One lookup, by the guard: the transport connected to the checked address.
                assert dns.lookups == ["rebind.test"]
                assert dict(server.requests[0].headers)[b"host"] == f"rebind.test:{server.port}".encode()

                with counting_sockets() as sockets, trio.fail_after(1), pytest.raises(SsrfRefused) as info:
                    await transport.handle_async_request(post(f"http://rebind.test:{server.port}/"))
                assert sockets.created == 0 and info.value.address == "10.0.0.1"
                assert dns.lookups == ["rebind.test", "rebind.test"]
            assert server.accepted == 1
